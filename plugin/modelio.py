"""Loading and saving Hugging Face causal LMs safely: safetensors only unless the user allows pickle,
remote code only from the command line, never a hub unless asked."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from .context import RunOptions
from .errors import UserError

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
    from .fsutil import resolve_inside

    model_dir = Path(model_dir)
    root = _allowed_root(model_dir)
    resolve_inside(root, model_dir.relative_to(root) / relative, what)
    return model_dir / relative


def _check_contained(path: Path) -> None:
    """UserError if a file of ``path`` is a symlink leading out of it, or a shard index names a
    file outside it (a shared model must not make us read, or hash, files elsewhere)."""
    root = _allowed_root(path).resolve()
    for entry in path.rglob("*"):
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
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read {index}: {exc}") from None
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
        try:
            config = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise UserError(f"cannot read {path / name}; is it a Hugging Face model directory?") from None
        if isinstance(config, dict) and config.get("auto_map") and not options.trust_remote_code:
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
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {Path(path) / 'config.json'}: {exc}") from None


def check_causal_lm(path: str | os.PathLike) -> dict[str, Any]:
    """The config of ``path`` if it is a causal LM, else a UserError naming what it is."""
    config = read_config(path)
    archs = config.get("architectures") or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a.endswith("ForCausalLM") or a in causal for a in archs):
        return config
    if not archs and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
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


def load_tokenizer(path: str | os.PathLike, options: RunOptions | None = None):
    options = options or RunOptions()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        path, trust_remote_code=options.trust_remote_code, local_files_only=True
    )


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer, chat template and generation config files that save_pretrained may skip."""
    import shutil

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
    from .fsutil import check_free_space

    out_dir = Path(out_dir)
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    check_free_space(out_dir, weights + (64 << 20), f"the model weights ({weights / 2**20:.0f} MiB)")
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
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index: {exc}") from None
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
