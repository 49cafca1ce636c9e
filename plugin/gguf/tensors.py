"""The tensor plan: every GGUF tensor of an HF directory, from the safetensors headers only.

Each planned tensor knows its GGUF name, shape and type and how to load its final values (Q/K row
order, norm offsets, folded attention scales), so the writer can stream them one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ollama_compress.errors import UserError
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.modelio import weight_files

from .arch import ArchSpec, gemma_query_scale, gguf_py, head_dim, phi3_rope_dims, read_model_config, rope_params

QK_K = 256  # block size of llama.cpp's k-quants and 256-wide i-quants
QK_SMALL = 32  # block size of the legacy quants (Q4_0, Q5_0, Q8_0, IQ4_NL)

# Tensors HF keeps that llama.cpp recomputes.
_SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def _tensor_index(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (file, shape), read from the safetensors headers (no data)."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors weights; GGUF export reads safetensors only")
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    index[name] = (path, tuple(f.get_slice(name).get_shape()))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    return index


def _read_tensor(path: Path, name: str, rows: slice | None = None) -> np.ndarray:
    """One tensor (or its ``rows``) as float32, read on its own (the file is mapped only while reading).

    The values are handled with numpy from here on: torch's worker threads would spin on a busy machine.
    """
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        data = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        return data.to(torch.float32).numpy()


def _block_id(name: str) -> int | None:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


# ------------------------------------------------------------------------- tensor plan
BLOCK_BYTES = 8 << 20  # a large tensor is read and converted in row blocks of about this many float32 bytes


@dataclass
class PlannedTensor:
    """One GGUF tensor: where its data comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols); GGUF stores it reversed
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[slice | None], np.ndarray]  # rows (None: all) -> float32 array of the final values
    source: str = ""
    by_rows: bool = True  # each row's final values depend on that row only, so it can be loaded in blocks

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * (4 if self.qtype.name == "F32" else 2)

    def blocks(self) -> Iterator[np.ndarray]:
        """The final values as float32 arrays: row blocks of about BLOCK_BYTES, or whole."""
        rows = self.shape[0] if self.shape else 1
        step = max(1, BLOCK_BYTES // (4 * max(1, int(np.prod(self.shape[1:], dtype=np.int64)))))
        if not self.by_rows or len(self.shape) < 2 or step >= rows:
            yield self.load(None)
            return
        for start in range(0, rows, step):
            yield self.load(slice(start, min(rows, start + step)))


def _permute_rows(t, n_head: int):
    """HF rotate-half row order -> llama.cpp's interleaved (GPT-J) order, per head."""
    rows = t.shape[0]
    return np.ascontiguousarray(t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2)).reshape(t.shape)

def _transform(hf_name: str, model_type: str, spec: ArchSpec, config, query_scale: float):
    """The value changes one HF tensor needs: (a function of the float32 tensor, whether it works row by row)."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    steps: list[Callable] = []
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        steps.append(lambda t: _permute_rows(t, n_head))
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        steps.append(lambda t: _permute_rows(t, n_kv))
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        steps.append(lambda t: t + spec.norm_shift)
    if query_scale != 1.0:
        # gemma3 normalizes q after the projection, so the factor goes on q_norm; gemma2 on q_proj
        target = "q_norm.weight" if model_type.startswith("gemma3") else ("q_proj.weight", "q_proj.bias")
        if hf_name.endswith(target):
            steps.append(lambda t: t * query_scale)

    def apply(t):
        for step in steps:
            t = step(t)
        return t

    mixes_rows = spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))
    return apply, not mixes_rows


def _tensor_qtype(gguf_name: str, shape: Sequence[int], outtype: str):
    """llama.cpp's rule: 1-D tensors and norms stay F32, every other weight gets ``outtype``."""
    gguf = gguf_py()
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return getattr(gguf.GGMLQuantizationType, outtype)


def _is_tied(spec: ArchSpec, config) -> bool:
    if spec.always_tied:
        return True
    return bool(getattr(config, "tie_word_embeddings", False))


def plan_tensors(model_dir: Path, outtype: str = "F16") -> tuple[list[PlannedTensor], dict[str, Any]]:
    """Every GGUF tensor of ``model_dir`` with its name, shape and type, from the headers only."""
    gguf = gguf_py()
    model_type, spec, config = read_model_config(model_dir)
    arch = getattr(gguf.MODEL_ARCH, spec.arch)
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    query_scale = gemma_query_scale(model_type, config, n_layers)
    tied = _is_tied(spec, config)
    index = _tensor_index(model_dir)
    planned: list[PlannedTensor] = []
    unknown: list[str] = []
    for hf_name, (path, shape) in index.items():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        fix, by_rows = _transform(hf_name, model_type, spec, config, query_scale)
        planned.append(PlannedTensor(
            gguf_name, shape, _tensor_qtype(gguf_name, shape, outtype),
            lambda rows, p=path, n=hf_name, f=fix: f(_read_tensor(p, n, rows)), hf_name, by_rows,
        ))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{model_dir}: {len(unknown)} tensor(s) have no llama.cpp {spec.arch.lower()} name ({shown}); "
                        f"this {model_type} variant is not supported")
    planned.extend(_extra_tensors(model_type, config))
    _check_layers(planned, n_layers, model_dir)
    planned.sort(key=_tensor_order)
    info = {"model_type": model_type, "arch": gguf.MODEL_ARCH_NAMES[arch], "spec": spec, "config": config,
            "n_layers": n_layers, "tied": tied, "query_scale": query_scale}
    return planned, info


def _tensor_order(t: PlannedTensor) -> tuple[int, int, str]:
    """token_embd and friends, then blk.0 .. blk.N, then output_norm/output."""
    bid = _block_id(t.name)
    if bid is not None:
        return (1, bid, t.name)
    return (2 if t.name.startswith("output") else 0, 0, t.name)


def _check_layers(planned: list[PlannedTensor], n_layers: int, model_dir: Path) -> None:
    blocks = {_block_id(t.name) for t in planned} - {None}
    if blocks != set(range(n_layers)):
        raise UserError(f"{model_dir}: config.json says {n_layers} layers but the weights hold blocks "
                        f"{sorted(blocks)[:8]}...; the directory is inconsistent")
    if not any(t.name == "token_embd.weight" for t in planned):
        raise UserError(f"{model_dir}: no token embedding tensor found")


def _extra_tensors(model_type: str, config) -> Iterable[PlannedTensor]:
    """Tensors llama.cpp wants that HF computes on the fly: llama3 rope factors, phi3 longrope factors."""
    gguf = gguf_py()
    f32 = gguf.GGMLQuantizationType.F32
    rope = rope_params(config)
    kind = (rope.get("rope_type") or "").lower()
    if model_type in ("llama", "mistral") and kind == "llama3":
        factors = _llama3_rope_factors(config, rope)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield PlannedTensor(name, (len(factors),), f32, lambda _: np.array(factors, dtype=np.float32), "rope")
    if model_type == "phi3" and rope.get("long_factor"):
        long_f, short_f = list(rope["long_factor"]), list(rope["short_factor"])
        if len(long_f) != len(short_f) or len(long_f) * 2 != phi3_rope_dims(config):
            raise UserError("phi3 rope long/short factors do not match the rope dimension; config.json is inconsistent")
        for key, values in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long_f), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short_f)):
            yield PlannedTensor(gguf.TENSOR_NAMES[key] + ".weight", (len(values),), f32,
                                lambda _, v=values: np.array(v, dtype=np.float32), "rope")


def _llama3_rope_factors(config, rope: dict[str, Any]) -> list[float]:
    """Per-frequency divisors of Llama 3.x rope scaling (wavelength bands: keep, scale, blend)."""
    base = rope.get("rope_theta", 10000.0)
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def expected_size(planned: list[PlannedTensor], vocab_bytes: int = 0) -> int:
    """Bytes the GGUF will take: aligned tensor data plus header, metadata and vocabulary."""
    align = 32
    data = sum((t.nbytes + align - 1) // align * align for t in planned)
    index = sum(len(t.name) + 48 for t in planned)
    return data + index + vocab_bytes + (1 << 20)


# ------------------------------------------------------------------------- width warning
# llama.cpp's quantizer (llama-quant.cpp, tensor_type_fallback) swaps a 256-block type for a 32-block
# one on a tensor whose rows are not a multiple of 256, and for F16 when not a multiple of 32 either.
def width_warnings(source: Path) -> list[str]:
    """The width warnings of an HF directory (from its tensor plan) or of a GGUF file (from its tensor index)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return width_warnings_of((t.name, tuple(reversed(t.shape))) for t in verify_gguf(source).tensors)
    planned, _ = plan_tensors(source, "F16")
    return width_warnings_of((t.name, t.shape) for t in planned)


def width_warnings_of(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> list[str]:
    """One line per kind of row width that is not a multiple of 256, saying which quant types fall back.

    ``shapes`` are (GGUF name, numpy shape) pairs. Empty when every quantizable row fits.
    """
    by_width: dict[int, list[str]] = {}
    for name, shape in shapes:
        if len(shape) == 2 and name.endswith(".weight") and not name.endswith("_norm.weight"):
            width = shape[-1]
            if width % QK_K:
                by_width.setdefault(width, []).append(name)
    lines = []
    for widths, effect in (
        ([w for w in by_width if w % QK_SMALL == 0],
         "llama.cpp quantizes them with a 32-block type instead (Q2_K/Q3_K->Q4_0, Q4_K->Q5_0, Q5_K->Q5_1, "
         "Q6_K->Q8_0, IQ4_XS and other i-quants->IQ4_NL), so K and IQ quants come out larger than nominal"),
        ([w for w in by_width if w % QK_SMALL], "every block quant falls back to F16 for them"),
    ):
        if widths:
            count = sum(len(by_width[w]) for w in widths)
            what = ", ".join(f"{w} (e.g. {by_width[w][0]})" for w in sorted(widths))
            lines.append(f"{count} tensor(s) have rows not a multiple of {QK_K} values: {what}; {effect}")
    return lines

