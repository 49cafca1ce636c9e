"""Writing the GGUF: general.* and provenance metadata, then the header, tensor index and tensor data.

Memory stays bounded: the tensor plan comes from the safetensors headers only, the header and tensor
index are written first, then each tensor is read, converted and appended on its own. The file is
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Sequence

import numpy as np
import yaml

from ollama_compress.embedded import content_sha256
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space
from ollama_compress.modelio import check_causal_lm, check_finite, check_model_dir, check_tokenizer_files
from ollama_compress.options import RunOptions
from ollama_compress.quant_names import UNQUANTIZED
from ollama_compress.safe_read import read_json

from .arch import check_loadable, gguf_py, metadata_type_problem, read_model_config, write_hparams
from .tensors import PlannedTensor, expected_size, plan_tensors, width_warnings_of
from .vocab import build_vocab, load_tokenizer_or_none, write_vocab

OUTTYPES = UNQUANTIZED  # the GGUF types written without llama-quantize
META_PREFIX = "ollama_compress."

log = logging.getLogger(__name__)


def _layer_map(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "layer_map.json"
    if not path.is_file():
        return {}
    return read_json(path, "layer map", expect=dict)


def layer_map_keys(model_dir: Path) -> dict[str, Any]:
    """Provenance keys from the prune stage's ``layer_map.json`` in ``model_dir`` (empty if none)."""
    out: dict[str, Any] = {}
    layer_map = _layer_map(model_dir)
    for key, name in (("removed", "removed_layers"), ("student_to_teacher", "layer_map")):
        value = layer_map.get(key)
        if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            out[name] = value
    if isinstance(layer_map.get("num_layers_before"), int):
        out["teacher_layers"] = layer_map["num_layers_before"]
    if isinstance(layer_map.get("metric"), str):
        out["prune_metric"] = layer_map["metric"]
    return out


def _sha256(model_dir: Path) -> str:
    """The model directory's sha256, hashed once per file version (``fsutil.Fingerprints``)."""
    return content_sha256(model_dir)


def provenance(model_dir: Path, metadata: dict[str, Any] | None, source_sha256: str | None = None) -> dict[str, Any]:
    """Our own ``ollama_compress.*`` keys: source hash (``source_sha256`` when known), layer map, recipe, plus the caller's."""
    out = layer_map_keys(model_dir)
    for key, value in (metadata or {}).items():
        if not key.startswith("general.") and key not in ("name", "license", "base_model", "description"):
            out[key.removeprefix(META_PREFIX)] = value
    out.setdefault("source_sha256", source_sha256 or _sha256(model_dir))
    return out


def _add_value(w, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, str):
        if value:
            w.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        w.add_array(key, [int(v) for v in value])
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        w.add_array(key, list(value))
    elif value is not None and value != [] and value != {}:
        w.add_string(key, json.dumps(value, sort_keys=True, default=str))


# llama.cpp looks these tokens up (and fails to load) when general.name contains "phi3" or "phi-3".
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _loadable_name(name: str, tokens: Sequence[Any]) -> str:
    """``name``, unless it would make llama.cpp apply Phi-3 token rules to a vocabulary without them."""
    lowered = name.lower()
    if "phi3" not in lowered and "phi-3" not in lowered:
        return name
    texts = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
    if all(tok in texts for tok in _PHI3_NAME_TOKENS):
        return name
    safe = re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + " 3", name)
    log.warning("model name %r renamed %r: llama.cpp expects Phi-3 tokens for such names", name, safe)
    return safe


def _write_general(w, model_dir: Path, metadata: dict[str, Any], total_params: int, tokens: Sequence[Any]) -> None:
    gguf = gguf_py()
    meta = _model_card_metadata(model_dir, metadata, total_params)
    if meta.name is None:
        meta.name = model_dir.name
    meta.name = _loadable_name(meta.name, tokens)
    if metadata.get("license"):
        meta.license = metadata["license"]
    if metadata.get("description"):
        meta.description = metadata["description"]
    base = metadata.get("base_model")
    if base:
        names = [base] if isinstance(base, str) else list(base)
        meta.base_models = [{"name": n, **({"repo_url": f"https://huggingface.co/{n}"} if "/" in n and not Path(n).exists() else {})}
                            for n in names]
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


def _model_card_metadata(model_dir: Path, metadata: dict[str, Any], total_params: int):
    """gguf-py's Metadata from the model card (README.md front matter) and config; one line when
    the card's YAML is malformed or holds values of the wrong kinds."""
    gguf = gguf_py()
    try:
        return gguf.Metadata.load(None, model_dir, metadata.get("name") or metadata.get("general.name"), total_params)
    except (yaml.YAMLError, TypeError, AttributeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{model_dir}: the model card (README.md) metadata cannot be read ({first[:200]}); "
                        "fix or remove its YAML front matter") from None


def check_metadata_types(w, what: str) -> None:
    """A UserError when a key the writer holds is of a type llama.cpp cannot read (see
    ``arch.metadata_type_problem``; the verifier applies the same rule to files)."""
    gguf = gguf_py()
    for key, value in w.kv_data[0].items():
        if value.type != gguf.GGUFValueType.ARRAY:
            continue
        try:
            item_types = {value.sub_type} if value.sub_type is not None else {
                gguf.GGUFValueType.get_type(item) for item in value.value}
        except ValueError:
            item_types = {gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING}  # items of no GGUF type (maps...)
        problem = metadata_type_problem(key, item_types)
        if problem:
            raise UserError(f"{what}: {problem} (from the model card or metadata?); fix that value")


# ------------------------------------------------------------------------- writing
def _ftype(outtype: str):
    gguf = gguf_py()
    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "BF16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]


def _to_gguf_type(values: np.ndarray, qtype) -> np.ndarray:
    """float32 ``values`` as the bytes of ``qtype`` (F32, F16, or BF16 bits rounded to nearest even)."""
    if qtype.name == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype.name == "F16":
        return values.astype(np.float16)
    return gguf_py().quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _check_output_dir(out_path: Path) -> None:
    parent = out_path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{p} is a file, not a directory; choose another output directory")
            break
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; give a .gguf file path")


@dataclass
class GGUFExport:
    """A written GGUF and what writing it established."""

    path: Path
    outtype: str
    size_bytes: int
    seconds: float
    width_warnings: list[str]  # quant fallbacks the tensor widths cause (see tensors.width_warnings_of)

    def to_dict(self) -> dict[str, Any]:
        return {"gguf": str(self.path), "outtype": self.outtype, "size_bytes": self.size_bytes,
                "export_seconds": round(self.seconds, 2), "width_warnings": self.width_warnings}


def export_gguf(model_dir: Path, out_path: Path, outtype: str = "F16", metadata: dict | None = None,
                options: RunOptions | None = None) -> Path:
    """Write ``model_dir`` as one GGUF of ``outtype`` at ``out_path``; return ``out_path`` (see ``write_gguf``)."""
    return write_gguf(model_dir, out_path, outtype, metadata, options).path


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "F16", metadata: dict | None = None,
               options: RunOptions | None = None) -> GGUFExport:
    """Write ``model_dir`` (an HF causal LM, safetensors) as one GGUF of ``outtype`` at ``out_path``.

    ``metadata`` may set ``name``, ``license``, ``base_model``, ``description`` (general.*) and any
    further keys, stored as ``ollama_compress.<key>`` next to the source hash and the prune stage's
    ``layer_map.json``. Tensors are streamed one at a time; the file appears only when complete.
    """
    started = time.perf_counter()
    outtype = check_outtype(outtype)
    model_dir, out_path = Path(model_dir), Path(out_path)
    check_exportable(model_dir, options)
    _check_output_dir(out_path)
    with ThreadPoolExecutor(1) as pool:  # hashlib releases the GIL: the source hash overlaps the planning
        source_hash = pool.submit(lambda: (metadata or {}).get("source_sha256") or _sha256(model_dir))
        writer, planned = _prepare(model_dir, out_path, outtype, dict(metadata or {}), options or RunOptions(), source_hash)
    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        with open(tmp, "ab") as out:
            _write_tensor_data(out, planned, writer.data_alignment)
    return GGUFExport(out_path, outtype, out_path.stat().st_size, time.perf_counter() - started,
                      width_warnings_of((t.name, t.shape) for t in planned))


def check_outtype(outtype: str) -> str:
    """``outtype`` in upper case, or a UserError naming the choices."""
    if outtype.upper() not in OUTTYPES:
        raise UserError(f"unknown outtype '{outtype}'; choose one of {', '.join(OUTTYPES)}")
    return outtype.upper()


def check_exportable(model_dir: Path, options: RunOptions | None = None) -> None:
    """A UserError unless ``model_dir`` is an HF causal LM of an architecture the writer knows."""
    check_model_dir(model_dir, options or RunOptions())
    read_model_config(model_dir)  # names an unsupported architecture before anything else
    check_causal_lm(model_dir)


def _prepare(model_dir: Path, out_path: Path, outtype: str, metadata: dict[str, Any], options: RunOptions,
             source_hash: Future):
    """A GGUFWriter holding every key and tensor index entry, and the tensors to stream after them."""
    gguf = gguf_py()
    planned, info = plan_tensors(model_dir, outtype)
    n_vocab = next(t.shape[0] for t in planned if t.name == "token_embd.weight")
    check_tokenizer_files(model_dir)  # before anything (transformers, gguf-py, vocab) reads them
    tokenizer = load_tokenizer_or_none(model_dir, options)
    vocab = build_vocab(model_dir, info["model_type"], n_vocab, tokenizer)
    for note in vocab.notes:
        log.warning(note)
    check_free_space(out_path.parent, expected_size(planned, vocab.approx_bytes(model_dir)), out_path.name)

    w = gguf.GGUFWriter(None, info["arch"])
    total_params = sum(int(np.prod(t.shape)) for t in planned)
    _write_general(w, model_dir, metadata, total_params, vocab.tokens)
    write_hparams(w, info["model_type"], info["config"], info["n_layers"], _ftype(outtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, vocab, model_dir, tokenizer, info["model_type"])
    for key, value in provenance(model_dir, metadata, source_hash.result()).items():
        _add_value(w, META_PREFIX + key, value)
    for t in planned:
        w.add_tensor_info(t.name, t.shape, _np_dtype(t.qtype), t.nbytes, raw_dtype=t.qtype)
    check_metadata_types(w, str(model_dir))
    check_loadable(str(model_dir), info["arch"], {key: v.value for key, v in w.kv_data[0].items()},
                   {t.name for t in planned})
    return w, planned


def _np_dtype(qtype):
    return {"F32": np.float32, "F16": np.float16}.get(qtype.name, np.int16)


def _write_tensor_data(out: BinaryIO, planned: list[PlannedTensor], alignment: int) -> None:
    """Each tensor's bytes in index order, block by block, each starting at a multiple of ``alignment``."""
    for t in planned:
        _pad(out, alignment)
        rows = 0
        for block in t.blocks():
            if tuple(block.shape[1:]) != tuple(t.shape[1:]):
                raise StageFailed(f"tensor {t.source or t.name} changed shape while exporting: "
                                  f"{tuple(block.shape)} does not fit {t.shape}")
            rows += block.shape[0] if block.ndim else 1
            check_finite(((t.source or t.name, block),), "export")
            out.write(memoryview(_to_gguf_type(block, t.qtype)).cast("B"))
        if rows != (t.shape[0] if t.shape else 1):
            raise StageFailed(f"tensor {t.source or t.name} changed shape while exporting: {rows} rows, not {t.shape[0]}")
    _pad(out, alignment)


def _pad(out: BinaryIO, alignment: int) -> None:
    out.write(bytes(-out.tell() % alignment))

