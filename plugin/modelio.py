"""Loading and saving Hugging Face causal LMs safely: safetensors only unless the user allows pickle,
remote code only from the command line, never a hub unless asked."""
from __future__ import annotations

import os
import pickle
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .fsutil import check_free_space, resolve_inside
from .options import RunOptions
from .safe_read import check_json_depth, check_regular_file, parse_json, read_json, read_text, walk_files
from .templates import check_template_renders

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _allowed_root(path: Path) -> Path:
    """The folder a model directory's symlinks may point into: the directory itself, or for a
    hub cache snapshot (``models--org--name/snapshots/REV``) its ``models--org--name`` folder,
    whose ``blobs/`` hold the files the snapshot links to."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent
    return path


def file_in_model_dir(model_dir: str | os.PathLike, relative: str, what: str) -> Path:
    """``model_dir/relative`` if it stays inside the model directory (a hub snapshot's links into
    its ``blobs/`` count as inside); UserError for ``..``, absolute paths, NUL or symlinks out."""
    model_dir = Path(model_dir)
    root = _allowed_root(model_dir)
    resolve_inside(root, model_dir.relative_to(root) / relative, what)
    return model_dir / relative


def _check_contained(path: Path) -> None:
    """UserError if a file of ``path`` is a symlink leading out of it, or a shard index names a
    file outside it (a shared model must not make us read, or hash, files elsewhere)."""
    root = _allowed_root(path).resolve()
    for entry in walk_files(path, f"model directory {path}"):
        if entry.is_symlink():
            target = entry.resolve()
            if target != root and root not in target.parents:
                raise UserError(f"{entry} is a symlink to {target}, outside the model directory; "
                                "copy the real file into the directory")
    for index_name in SHARD_INDEXES:
        index = path / index_name
        if index.is_file():
            _check_shard_index(path, index)


def _check_shard_index(path: Path, index: Path) -> None:
    """Every shard an index names is a plain file name beside it (symlinks are checked above)."""
    weight_map = read_json(index, "index", expect=dict).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index} has no weight_map; re-save the model")
    for shard in set(weight_map.values()):
        plain = isinstance(shard, str) and "\0" not in shard and shard not in ("", ".", "..") \
            and "/" not in shard and "\\" not in shard
        if not plain:
            raise UserError(f"{index.name} names {shard!r}, not a file beside it; shards must sit in {path}")
        if not (path / shard).is_file():
            raise UserError(f"{index.name} names {shard!r}, which is missing from {path}")


def _check_remote_code(path: Path, options: RunOptions) -> None:
    """A config or tokenizer config that needs the model's own Python code (``auto_map``) needs
    --trust-remote-code."""
    for name in ("config.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            continue
        config = read_json(path / name, "config", expect=dict)
        if config.get("auto_map") and not options.trust_remote_code:
            raise UserError(f"{path} needs its own Python code ({name} auto_map) to load; read that code and "
                            "pass --trust-remote-code if you trust it, or use a model transformers supports natively")


def check_model_dir(path: str | os.PathLike, options: RunOptions | None = None) -> Path:
    """Return ``path`` if it is a loadable HF model directory; else a UserError saying why.

    Refused: no config.json; no safetensors (pickle ``.bin`` only with ``--allow-pickle``); a
    symlink out of the directory; a shard index naming files outside it; model code
    (``auto_map``) without ``--trust-remote-code``.
    """
    options = options or RunOptions()
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give an HF model directory, a .gguf file or a hub id")
    if not path.is_dir():
        raise UserError(f"{path} is not a model directory (expected config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; is it a Hugging Face model directory?")
    _check_contained(path)
    _check_remote_code(path, options)
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return path
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        if options.allow_pickle:
            return path
        raise UserError(
            f"{path} has only pickle weights (.bin), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    raise UserError(f"{path} has no weights (*.safetensors)")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory: a JSON object, read boundedly (``safe_read``)."""
    return read_json(Path(path) / "config.json", "config", expect=dict)


def check_causal_lm(path: str | os.PathLike) -> dict[str, Any]:
    """The config of ``path`` if it is a causal LM whose weights are the model its config describes
    (``check_weights_match_config``), else a UserError naming what it is."""
    config = read_config(path)
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{path}/config.json: 'architectures' is not a list of names; fix the config")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a.endswith("ForCausalLM") or a in causal for a in archs) or (
            not archs and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        check_weights_match_config(path)
        return config
    what = ", ".join(archs) or config.get("model_type") or "unknown"
    raise UserError(f"{path} is not a causal language model ({what}); give a *ForCausalLM model")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES.get(name, "float32"))


def load_model(path: str | os.PathLike, options: RunOptions | None = None, dtype: str = "float32",
               device: str = "cpu"):
    """Load a causal LM in eval mode from a checked local directory."""
    options = options or RunOptions()
    path = check_model_dir(path, options)
    check_causal_lm(path)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype(dtype),
            trust_remote_code=options.trust_remote_code,
            use_safetensors=not options.allow_pickle or None,
            weights_only=True,  # .bin files (only with --allow-pickle) load tensors, never objects; no retry without
            local_files_only=True,
        )
    except (pickle.UnpicklingError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: transformers cannot load these weights ({first[:300]})") from None
    return model.to(device).eval()


TOKENIZER_JSON_FILES = {"tokenizer.json": "tokenizer", "vocab.json": "tokenizer", "tokenizer_config.json": "config",
                        "special_tokens_map.json": "config", "added_tokens.json": "config", "chat_template.json": "config"}
TOKENIZER_TEXT_FILES = {"merges.txt": "tokenizer", "chat_template.jinja": "template"}


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """The tokenizer files of ``path`` are plain files of sane size, JSON nested boundedly, text
    UTF-8: what the tokenizers library and transformers would otherwise choke on or hang reading."""
    path = Path(path)
    for name, kind in {**TOKENIZER_JSON_FILES, **TOKENIZER_TEXT_FILES}.items():
        if os.path.lexists(path / name):
            text = read_text(path / name, kind)
            if name in TOKENIZER_JSON_FILES:
                check_json_depth(text, str(path / name))
    if os.path.lexists(path / "tokenizer.model"):
        check_regular_file(path / "tokenizer.model", "tokenizer")


def load_tokenizer(path: str | os.PathLike, options: RunOptions | None = None):
    """The tokenizer of a local model directory; its files checked first (``check_tokenizer_files``)
    and its chat template too (``templates.check_template_renders``), since transformers renders
    it in this process."""
    options = options or RunOptions()
    from transformers import AutoTokenizer

    if Path(path).is_dir():
        check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=options.trust_remote_code, local_files_only=True
        )
    except Exception as exc:  # the tokenizers library raises bare Exceptions for malformed files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: transformers cannot load the tokenizer ({first[:300]})") from None
    check_template_renders(getattr(tokenizer, "chat_template", None), str(getattr(tokenizer, "bos_token", "") or ""),
                           str(getattr(tokenizer, "eos_token", "") or ""))
    return tokenizer


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer, chat template and generation config files that save_pretrained may skip."""
    src, dst = Path(src), Path(dst)
    names = (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
        "generation_config.json",
    )
    for name in names:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def save_model(model, tokenizer, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> Path:
    """Save weights as safetensors with tokenizer and side files into ``out_dir`` (which must exist)."""
    out_dir = Path(out_dir)
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    check_free_space(out_dir, weights + (64 << 20), f"the model weights ({weights / 2**20:.0f} MiB)")
    check_finite(model.state_dict().items(), "the model to save")
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if source_dir is not None:
        copy_side_files(source_dir, out_dir)
    return out_dir


# ---------------------------------------------------------------- weights on disk, layers in memory
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files holding the weights: the shards the index names, else ``model.safetensors``,
    else every ``*.safetensors`` (a repo may also hold e.g. consolidated.safetensors); ``[]`` when the
    checkpoint has pickle weights only. A UserError for a broken index or a missing shard."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index, "index", expect=dict).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map of file names); re-save the model")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise UserError(f"{model_dir} lacks weight shards listed in its index: {', '.join(missing[:3])}")
        return [model_dir / s for s in shards]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    return sorted(model_dir.glob("*.safetensors"))


def decoder_stack(model) -> tuple[Any, Any]:
    """(the base model, its decoder layer list) of a loaded causal LM: ``model.model.layers``.

    A UserError when the layers are not there or their count is not ``config.num_hidden_layers``.
    """
    import torch

    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or (
            expected is not None and len(layers) != expected):
        raise UserError(f"{type(model).__name__}: the decoder layers aren't where the architecture says (model.model.layers "
                        "with config.num_hidden_layers entries); this architecture is not supported yet")
    return base, layers


@contextmanager
def capture_outputs(modules: dict[Any, Any]) -> Iterator[dict[Any, Any]]:
    """Collect each module's output (the first element of a tuple output) under its key, during
    forward passes in the block.

    The first output per key is kept until the caller clears ``captured``, so that recomputations
    during a checkpointed backward are ignored; clear it between forward passes.
    """
    captured: dict[Any, Any] = {}
    handles = []
    for key, module in modules.items():
        def hook(mod, args, output, _key=key):
            if _key not in captured:
                captured[_key] = output[0] if isinstance(output, tuple) else output
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recorded_outputs(modules: dict[Any, Any]) -> Iterator[dict[Any, list]]:
    """Every output of each module (the first element of a tuple output), in call order, under its
    key, during forward passes in the block; detached."""
    recorded: dict[Any, list] = {key: [] for key in modules}
    handles = [module.register_forward_hook(
        lambda mod, args, output, _key=key: recorded[_key].append(
            (output[0] if isinstance(output, tuple) else output).detach()))
        for key, module in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def replay_prefix(model, count: int, outputs: list) -> None:
    """Skip the first ``count`` decoder layers of ``model`` (in place) by replaying what they
    computed before: its ``count``-th layer returns ``outputs[k]`` on its k-th call (cycling), the
    ones before it pass their input through. ``outputs`` are that layer's outputs recorded
    (``recorded_outputs``) on an unchanged model, one per input, in the order the inputs come again."""
    import torch

    class PassThrough(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    class Replay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, hidden_states, *args, **kwargs):
            out = outputs[self.calls % len(outputs)]
            self.calls += 1
            return out

    _, layers = decoder_stack(model)
    for i in range(count):
        layers[i] = Replay() if i == count - 1 else PassThrough()


# ---------------------------------------------------------------- weights that match their config
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
SAFETENSORS_DTYPES = frozenset({"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
                                "I32", "U32", "F32", "F64", "I64", "U64", "F4", "F6_E2M3", "F6_E3M2"})


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, every field type- and range-checked
    (the data offsets must lie inside the file); a UserError naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= length <= min(SAFETENSORS_MAX_HEADER, size - 8):
                raise UserError(f"{path} is not a safetensors file (header length {length}, file size {size}); "
                                "re-save the model")
            raw = f.read(length)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: safetensors header is not UTF-8; re-save the model") from None
    check_json_depth(text, f"{path} header", 4)
    header = parse_json(text, f"{path} header")
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object; re-save the model")
    data_size = size - 8 - length
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise UserError(f"{path}: safetensors __metadata__ is not a map of strings; re-save the model")
            continue
        shapes[name] = _safetensors_entry(path, name, entry, data_size)
    return shapes


def _safetensors_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, ...]:
    def bad(why: str) -> UserError:
        return UserError(f"{path}: safetensors header entry {name[:80]!r} {why}; re-save the model")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has dtype {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has shape {str(shape)[:60]}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"has data_offsets {str(offsets)[:60]}, not a range inside the file")
    return tuple(shape)


def _expected_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]] | None:
    """(parameter name -> shape, names that may be absent) of the model ``path``'s config
    describes, built on the meta device (no memory, no data); None when transformers cannot
    build it without the model's own code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_json = read_config(path)
    if config_json.get("auto_map"):
        return None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RuntimeError, ZeroDivisionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}/config.json does not describe a model transformers can build ({first[:200]}); "
                        "fix the config") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {name for name in shapes if name.endswith(("inv_freq", ".bias", "masked_bias"))}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        optional.add("lm_head.weight")
    return shapes, optional


def check_weights_match_config(path: str | os.PathLike) -> None:
    """A UserError when the safetensors weights of ``path`` are not the model its config.json
    describes: a tensor of another shape, or parameters (e.g. whole layers) the weights lack,
    which transformers would fill with random values. Headers only; no weights are read."""
    path = Path(path)
    files = weight_files(path)
    if not files:
        return
    present: dict[str, tuple[int, ...]] = {}
    for file in files:
        present.update(safetensors_shapes(file))
    expected = _expected_shapes(path)
    if expected is None:
        return
    shapes, optional = expected
    matched = [name for name in shapes if name in present]
    if len(matched) < len(shapes) // 2:
        return  # another naming convention (transformers renames keys on load); it checks those itself
    for name in matched:
        if tuple(present[name]) != shapes[name]:
            raise UserError(f"{path}: weight {name} has shape {list(present[name])} but config.json describes "
                            f"{list(shapes[name])}; the weights and config.json disagree")
    missing = [name for name in shapes if name not in present and name not in optional]
    if missing:
        raise UserError(f"{path}: config.json describes {len(missing)} weight(s) the files lack (e.g. {missing[0]}); "
                        "the weights and config.json disagree (a config from another model size?)")


# ---------------------------------------------------------------- finite weights
FINITE_CHUNK = 1 << 24  # elements checked at once: bounded temporary memory for any tensor size


def check_finite(named_tensors: Any, what: str, error: type[Exception] = UserError) -> None:
    """An ``error`` (UserError: bad input) naming the first tensor of ``named_tensors`` ((name,
    torch tensor or numpy array) pairs) that holds NaN or Inf: a model with one never gets written
    or registered."""
    for name, tensor in named_tensors:
        if not is_finite(tensor):
            raise error(f"{what}: tensor {name} holds NaN or Inf values; refusing to write a broken model "
                            "(check the source weights, or lower heal.lr if healing diverged)")


def is_finite(tensor: Any) -> bool:
    """Whether every value of a torch tensor or numpy array is finite, checked in chunks."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        if not np.issubdtype(tensor.dtype, np.floating):
            return True
        flat = tensor.reshape(-1)
        return all(np.isfinite(flat[i:i + FINITE_CHUNK]).all() for i in range(0, flat.size, FINITE_CHUNK))
    import torch

    if not torch.is_floating_point(tensor):
        return True
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))
