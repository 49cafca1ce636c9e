"""Depth pruning: choose the layers to remove, and cut them out of a Hugging Face model.

Selection (``select_layers``) turns per-layer importance scores (higher = more important) into
0-based layer indices to remove: the lowest scores go first, protected layers (first and last by
default) never go, and ``block`` removes one contiguous run instead. ``describe_selection`` shows
the kept layers as mergekit ``layer_range`` slices (end exclusive), so a mergekit passthrough
config can be read straight off it.

Surgery works on the weight files, not on a loaded model: ``prune_dir`` streams each safetensors
shard, drops the tensors of removed layers, renames ``model.layers.{teacher}.`` to
``model.layers.{student}.`` and writes the shard again. Tensors are copied byte for byte (same
dtype), so the kept layers are exactly the teacher's and a model of any size needs only one
shard in memory. ``prune_model`` does the same to a model already in memory (used between
iterative steps): it drops the decoder layers and renumbers ``layer_idx`` so the KV cache works.

Config fields tied to the layer count or to layer indices are fixed the same way in both paths:

* ``num_hidden_layers``: the kept count.
* ``layer_types`` (qwen2, qwen3, gemma2, gemma3; any arch that has it): the kept layers' entries.
* ``max_window_layers`` (qwen2, qwen3): the number of kept layers below the old threshold, so the
  same teacher layers stay full-attention and sliding-window.
* ``per_layer_config`` (transformers' heterogeneous configs): keys renumbered, removed ones dropped.
* llama, mistral and phi3 have no per-layer fields (their ``sliding_window`` applies to all layers).

Gemma 2 and Gemma 3 alternate local (sliding-window) and global attention by layer position:
gemma2 makes even-numbered layers local and odd ones global; gemma3 makes every 6th layer
(``sliding_window_pattern``) global and the rest local. Removing a layer shifts the position of
every later layer, so if the pattern were recomputed from the new positions, later layers would
swap local for global attention (for gemma2, removing one layer flips every later layer).
transformers 5 reads an explicit ``layer_types`` list for both gemma2 and gemma3 (see their
``configuration_*.py``: the pattern is only the default when ``layer_types`` is absent), so the
pruned ``config.json`` always carries ``layer_types`` with each kept layer's teacher type:
in transformers every kept layer keeps the attention it was trained with. Two consumers do not
read that list and will see the shifted pattern: transformers before 4.53 (pattern computed from
the index), and llama.cpp, which hard-codes the period (2 for gemma2, 6 for gemma3) when it loads
a GGUF, so there student layer i is local or global by its own index i, not by its teacher's.
A kept layer keeps its type in a GGUF only if the number of removed layers below it is a multiple
of the period, i.e. every removed run that has kept layers after it is 2 (gemma2) or 6 (gemma3)
layers long, or a multiple. Any other selection changes the attention type of later layers in
llama.cpp/Ollama (healing can partly adapt them). For gemma2/gemma3, ``layer_map.json`` records
``gguf_attention_pattern_matches`` (llama.cpp's pattern at the student indices versus the kept
teacher types) and the prune command prints a warning when it is false.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click

from ollama_compress.context import RunOptions, StageContext
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space, write_json
from ollama_compress.gguf.arch import ARCHS
from ollama_compress.hookspecs import hookimpl
from ollama_compress import modelio
from ollama_compress.safe_read import read_json

# model_type in config.json -> what prune calls it: every architecture the GGUF writer knows
SUPPORTED_ARCHITECTURES = {model_type: model_type.removesuffix("_text") for model_type in ARCHS}
LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
INDEX_FILE = modelio.SAFETENSORS_INDEX
LAYER_MAP = "layer_map.json"
KEEP_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "USE_POLICY.md")
DEFAULT_PROTECT = ("first", "last")


# ---------------------------------------------------------------- selection
def resolve_protect(protect: Iterable[str | int], num_layers: int) -> set[int]:
    """The 0-based layer indices named by ``protect`` ("first", "last" or indices)."""
    protected = set()
    for item in protect:
        if item == "first":
            protected.add(0)
        elif item == "last":
            protected.add(num_layers - 1)
        elif isinstance(item, int) and not isinstance(item, bool):
            _check_index(item, num_layers, "protected layer")
            protected.add(item)
        else:
            raise UserError(f"protect: '{item}' is not 'first', 'last' or a layer number")
    return protected


def _check_index(index: int, num_layers: int, what: str = "layer") -> None:
    if not 0 <= index < num_layers:
        raise UserError(
            f"{what} {index} is out of range; this model has {num_layers} layers (0-{num_layers - 1})"
        )


def _count_to_remove(num_layers: int, remove: int | None, keep: int | None) -> int:
    if keep is not None:
        if keep < 1:
            raise UserError(f"keep must be at least 1 (got {keep})")
        if keep > num_layers:
            raise UserError(f"cannot keep {keep} layers; this model has only {num_layers}")
        return num_layers - keep
    if remove < 0:
        raise UserError(f"remove must be 0 or more (got {remove})")
    if remove >= num_layers:
        raise UserError(
            f"removing {remove} of {num_layers} layers leaves none; remove at most {num_layers - 1}"
        )
    return remove


def _check_layers(layers: Sequence[int], num_layers: int, protected: set[int]) -> list[int]:
    for index in layers:
        _check_index(index, num_layers)
    duplicates = sorted({i for i in layers if list(layers).count(i) > 1})
    if duplicates:
        raise UserError(f"layer {duplicates[0]} is named more than once; name each layer once")
    named = sorted(protected.intersection(layers))
    if named:
        raise UserError(
            f"layer {named[0]} is protected; drop it from the layers or change protect (e.g. --protect none)"
        )
    if len(layers) >= num_layers:
        raise UserError(
            f"removing {len(layers)} of {num_layers} layers leaves none; remove at most {num_layers - 1}"
        )
    return sorted(layers)


def _check_scores(scores: Sequence[float], num_layers: int) -> list[float]:
    if len(scores) != num_layers:
        raise StageFailed(f"got {len(scores)} layer scores for a model with {num_layers} layers")
    scores = [float(s) for s in scores]
    if any(math.isnan(s) for s in scores):
        raise StageFailed("the layer scores contain NaN; check the calibration data and the metric")
    return scores


def _choose_block(scores: list[float], n: int, protected: set[int], start: int | None,
                  block_scores: Sequence[float] | None) -> list[int]:
    num_layers = len(scores)
    starts = [s for s in range(num_layers - n + 1) if not protected.intersection(range(s, s + n))]
    if not starts:
        raise UserError(
            f"no run of {n} contiguous layers avoids the protected layers {sorted(protected)}; "
            "remove fewer layers or change protect"
        )
    if start is None and block_scores is not None:
        if len(block_scores) != num_layers - n + 1:
            raise StageFailed(f"got {len(block_scores)} block scores; expected {num_layers - n + 1}")
        start = min(starts, key=lambda s: (float(block_scores[s]), s))
    elif start is None:
        start = min(starts, key=lambda s: (sum(scores[s:s + n]), s))
    elif start not in starts:
        hit = sorted(protected.intersection(range(start, start + n)))
        if hit:
            raise UserError(
                f"the chosen block [{start}, {start + n}) includes protected layer {hit[0]}; "
                "change protect or remove fewer layers"
            )
        raise UserError(f"a block of {n} layers cannot start at layer {start} in a {num_layers}-layer model")
    return list(range(start, start + n))


def select_layers(
    scores: Sequence[float],
    num_layers: int,
    *,
    remove: int | None = None,
    keep: int | None = None,
    layers: Sequence[int] | None = None,
    block: bool = False,
    block_start: int | None = None,
    block_scores: Sequence[float] | None = None,
    protect: Iterable[str | int] = DEFAULT_PROTECT,
) -> list[int]:
    """The sorted 0-based indices of the layers to remove.

    Give exactly one of ``remove`` (how many), ``keep`` (how many stay) or ``layers`` (exactly
    these; ``scores`` may then be empty). Unprotected layers with the lowest scores go first.
    ``block`` removes one contiguous run of layers: the unprotected run starting at
    ``block_start`` when given, else the one with the lowest ``block_scores[start]`` (one score
    per start, e.g. the angular distance across the block) when given, else the run with the
    lowest total per-layer score. Bad input raises a one-line ``UserError``.
    """
    if sum(x is not None for x in (remove, keep, layers)) != 1:
        raise UserError("give exactly one of remove, keep or layers")
    protected = resolve_protect(protect, num_layers)
    if layers is not None:
        if block:
            raise UserError("block chooses its own layers; give remove or keep with it, not layers")
        return _check_layers(list(layers), num_layers, protected)
    n = _count_to_remove(num_layers, remove, keep)
    free = num_layers - len(protected)
    if n > free:
        raise UserError(
            f"cannot remove {n} of {num_layers} layers: only {free} are not protected "
            f"(protected: {sorted(protected)}); remove fewer or change protect"
        )
    if n == 0:
        return []
    if block and (block_start is not None or block_scores is not None) and not scores:
        scores = [0.0] * num_layers
    scores = _check_scores(scores, num_layers)
    if block:
        return _choose_block(scores, n, protected, block_start, block_scores)
    candidates = sorted((i for i in range(num_layers) if i not in protected), key=lambda i: (scores[i], i))
    return sorted(candidates[:n])


def kept_slices(removed: Iterable[int], num_layers: int) -> list[tuple[int, int]]:
    """The kept layers as ``[start, end)`` runs, like mergekit's ``layer_range``."""
    gone = set(removed)
    runs: list[tuple[int, int]] = []
    for i in range(num_layers):
        if i in gone:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def describe_selection(removed: Iterable[int], num_layers: int) -> str:
    """One line: removed layers, kept ranges and the matching mergekit ``layer_range`` slices."""
    removed = sorted(removed)
    runs = kept_slices(removed, num_layers)
    kept = " + ".join(f"[{a}, {b})" for a, b in runs)
    slices = ", ".join(f"[{a}, {b}]" for a, b in runs)
    return (
        f"removed {len(removed)} of {num_layers} layers {removed}; "
        f"kept: {kept} (mergekit slices: layer_range {slices})"
    )


# ---------------------------------------------------------------- config fields
def architecture(config: dict[str, Any]) -> str:
    """prune's name for the model's architecture, or a UserError if prune can't handle it."""
    model_type = config.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return SUPPORTED_ARCHITECTURES[model_type]
    name = ", ".join(config.get("architectures") or []) or model_type or "unknown"
    supported = ", ".join(sorted(set(SUPPORTED_ARCHITECTURES.values())))
    raise UserError(f"architecture {name} is not supported yet by prune; supported: {supported}")


def pruned_config_fields(config: Any, kept: Sequence[int]) -> dict[str, Any]:
    """New values of the config fields tied to the layer count or index, for the kept layers.

    ``config`` is the teacher's loaded transformers config, so defaults computed by its class
    (``layer_types`` from ``sliding_window_pattern`` or ``max_window_layers``) are included.
    """
    fields: dict[str, Any] = {"num_hidden_layers": len(kept)}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        fields["layer_types"] = [layer_types[i] for i in kept]
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int):
        fields["max_window_layers"] = sum(1 for i in kept if i < max_window_layers)
    return fields


# llama.cpp's fixed local/global period per architecture (``set_swa_pattern`` in llama-model.cpp)
LLAMA_CPP_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}


def gguf_attention_pattern_matches(arch: str, teacher_layer_types: Sequence[str] | None,
                                   kept: Sequence[int]) -> bool | None:
    """Whether llama.cpp's fixed pattern gives each kept layer its teacher's attention type.

    None for architectures without a fixed local/global pattern.
    """
    period = LLAMA_CPP_SWA_PERIOD.get(arch)
    if period is None or teacher_layer_types is None:
        return None
    fixed = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(len(kept))]
    return fixed == [teacher_layer_types[t] for t in kept]


def _renumber_per_layer_config(raw: dict[str, Any], kept: Sequence[int]) -> None:
    per_layer = raw.get("per_layer_config")
    if not per_layer:
        return
    new_index = {teacher: student for student, teacher in enumerate(kept)}
    raw["per_layer_config"] = {
        str(new_index[int(k)]): v for k, v in per_layer.items() if int(k) in new_index
    }


def _load_config(model_dir: Path, options: RunOptions):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            model_dir, trust_remote_code=options.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the config of {model_dir}: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------- in-memory surgery
def prune_model(model, remove: Sequence[int]):
    """Remove decoder layers ``remove`` (0-based) from a loaded causal LM, in place; return it.

    Renumbers every ``layer_idx`` so the KV cache lines up, and fixes the config fields tied to
    the layer count (see the module docstring).
    """
    import torch

    architecture(model.config.to_dict())
    if getattr(model.config, "is_heterogeneous", False):
        raise UserError("models with per_layer_config can only be pruned from their directory (prune_dir)")
    base, layers = modelio.decoder_stack(model)
    num_layers = len(layers)
    gone = set(_check_layers(list(remove), num_layers, set()))
    kept = [i for i in range(num_layers) if i not in gone]
    fields = pruned_config_fields(model.config, kept)
    base.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for student, layer in enumerate(base.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = student
    for config in {id(c): c for c in (model.config, base.config)}.values():
        for key, value in fields.items():
            setattr(config, key, value)
    if hasattr(base, "has_sliding_layers"):
        base.has_sliding_layers = "sliding_attention" in (model.config.layer_types or [])
    return model


# ---------------------------------------------------------------- on-disk surgery
def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def check_layer_tensors(model_dir: Path, num_layers: int, arch: str) -> list[Path]:
    """The safetensors files of ``model_dir``; UserError if its layers aren't at ``model.layers.N.``."""
    files = modelio.weight_files(model_dir)
    found: set[int] = set()
    for path in files:
        found.update(int(m.group(1)) for k in _tensor_names(path) if (m := LAYER_TENSOR.match(k)))
    if not found:
        raise UserError(
            f"{model_dir} has no tensors named model.layers.N.*, where {arch} keeps its layers; "
            "is it a plain transformers checkpoint?"
        )
    if found != set(range(num_layers)):
        raise UserError(
            f"{model_dir}: config.json says {num_layers} layers but the weights hold layers "
            f"{min(found)}-{max(found)} ({len(found)}); the checkpoint is inconsistent"
        )
    return files


def _copy_shard(src: Path, dst: Path, new_index: dict[int, int]) -> dict[str, int]:
    """Write ``src`` to ``dst`` without removed layers, renumbered; return {name: nbytes}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        for key in f.keys():
            m = LAYER_TENSOR.match(key)
            if m is None:
                tensors[key] = f.get_tensor(key)
            elif int(m.group(1)) in new_index:
                tensors[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = f.get_tensor(key)
    modelio.check_finite(tensors.items(), str(src))
    if tensors:
        save_file(tensors, str(dst), metadata=metadata)
    return {k: t.numel() * t.element_size() for k, t in tensors.items()}


def _write_weights(model_dir: Path, out: Path, files: list[Path], kept: Sequence[int]) -> None:
    check_free_space(out, sum(f.stat().st_size for f in files), "the pruned model's weights")
    new_index = {teacher: student for student, teacher in enumerate(kept)}
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path in files:
        name = path.name
        written = _copy_shard(path, out / name, new_index)
        weight_map.update({k: name for k in written})
        sizes.update(written)
    if (model_dir / INDEX_FILE).is_file():
        index = read_json(model_dir / INDEX_FILE, "index", expect=dict)
        index.setdefault("metadata", {})["total_size"] = sum(sizes.values())
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(model_dir: Path, out: Path, teacher_config, kept: Sequence[int]) -> None:
    raw = modelio.read_config(model_dir)
    raw.update(pruned_config_fields(teacher_config, kept))
    _renumber_per_layer_config(raw, kept)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def _copy_extra_files(model_dir: Path, out: Path) -> None:
    modelio.copy_side_files(model_dir, out)
    for name in KEEP_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def layer_map(
    removed: Sequence[int], num_layers: int, arch: str, metric: str | None, scores: dict | None,
    **extra: Any,
) -> dict[str, Any]:
    """The content of ``layer_map.json``: which teacher layer each student layer is."""
    gone = set(removed)
    return {
        "student_to_teacher": [i for i in range(num_layers) if i not in gone],
        "removed": sorted(gone),
        "num_layers_before": num_layers,
        "num_layers_after": num_layers - len(gone),
        "kept_slices": [list(r) for r in kept_slices(gone, num_layers)],
        "metric": metric,
        "scores": scores,
        "architecture": arch,
        **extra,
    }


def check_out_dir(out_dir: Path, model_dir: Path) -> Path:
    """``out_dir`` if prune may write there: not the model itself, not someone else's directory."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    resolved, source = out_dir.resolve(), model_dir.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise UserError(f"--out {out_dir} overlaps the model directory {model_dir}; choose another directory")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; choose a directory")
        if any(out_dir.iterdir()) and not (out_dir / LAYER_MAP).is_file():
            raise UserError(f"--out {out_dir} exists and is not an earlier prune output; choose a new directory")
    return out_dir


def inspect_model_dir(model_dir: Path, options: RunOptions | None = None) -> tuple[str, Any]:
    """(architecture, loaded config) of a prunable model directory, or a UserError saying why not."""
    options = options or RunOptions()
    model_dir = modelio.check_model_dir(model_dir, options)
    arch = architecture(modelio.read_config(model_dir))
    modelio.check_causal_lm(model_dir)
    return arch, _load_config(model_dir, options)


def prune_dir(
    model_dir: Path,
    out_dir: Path,
    remove: Sequence[int],
    *,
    metric: str | None = None,
    scores: dict[str, list[float]] | None = None,
    options: RunOptions | None = None,
    **extra: Any,
) -> Path:
    """Write ``model_dir`` without layers ``remove`` to ``out_dir``, atomically; return ``out_dir``.

    Weights are streamed shard by shard (see the module docstring); tokenizer, chat template,
    generation config and licence files are copied; ``layer_map.json`` records the mapping,
    ``metric``, ``scores`` and any ``extra`` keys. Checkpoints with only pickle weights
    (``--allow-pickle``) are loaded, pruned in memory and saved as safetensors.
    """
    options = options or RunOptions()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    arch, config = inspect_model_dir(model_dir, options)
    num_layers = config.num_hidden_layers
    removed = _check_layers(list(remove), num_layers, set())
    kept = [i for i in range(num_layers) if i not in set(removed)]
    files = modelio.weight_files(model_dir)
    if files:
        files = check_layer_tensors(model_dir, num_layers, arch)
    matches = gguf_attention_pattern_matches(arch, getattr(config, "layer_types", None), kept)
    if matches is not None:
        extra.setdefault("gguf_attention_pattern_matches", matches)
    mapping = layer_map(removed, num_layers, arch, metric, scores, **extra)
    with atomic_path(out_dir, is_dir=True) as tmp:
        if files:
            _write_weights(model_dir, tmp, files, kept)
            _write_config(model_dir, tmp, config, kept)
            _copy_extra_files(model_dir, tmp)
        else:
            model = prune_model(modelio.load_model(model_dir, options), removed)
            modelio.save_model(model, None, tmp, model_dir)
        write_json(tmp / LAYER_MAP, mapping)
    return out_dir


def save_pruned_model(model, model_dir: Path, out_dir: Path, mapping: dict[str, Any]) -> Path:
    """Save an in-memory pruned (and perhaps healed) model with its side files and layer map."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        modelio.save_model(model, None, tmp, model_dir)
        for name in KEEP_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, tmp / name)
        write_json(tmp / LAYER_MAP, mapping)
    return out_dir


# ---------------------------------------------------------------- scoring
def check_metric(metric: str) -> None:
    """NotAvailable (exit 2) listing the known metrics when ``metric`` is not registered."""
    from ollama_compress.plugins import capability

    capability("importance_metrics", metric)


BatchesFn = Callable[[Any], list]


def _batches_fn(model_dir: Path, calibration, options: RunOptions, ctx: StageContext | None) -> BatchesFn:
    """Calibration batches for ``calibration`` (None: the shipped corpus), tokenized like ``model_dir``."""
    from ollama_compress.hooks.data import batches_provider
    from ollama_compress.recipe import TextSource

    spec = calibration if calibration is not None else TextSource()
    return batches_provider(spec, modelio.load_tokenizer(model_dir, options), ctx)


def score(model, batches, metric: str, *, block_size: int | None = None
          ) -> tuple[list[float], list[float] | None]:
    """Scores of ``metric`` per layer; with ``block_size`` and the angular metric, also the
    angular distance across a block of that size for every start (Gromov et al.)."""
    from ollama_compress.hooks import importance

    scores = importance.score_model(model, batches, [metric])[metric]
    distances = None
    if block_size and metric == "angular":
        distances = [float(d) for d in importance.block_distances(model, batches, block_size)]
    return [float(s) for s in scores], distances


# ---------------------------------------------------------------- iterative pruning
BetweenSteps = Callable[[Any, int, list[int]], None]


def prune_iteratively(
    model_dir: Path,
    out_dir: Path,
    n_remove: int,
    metric: str,
    batches_fn: BatchesFn,
    *,
    protect: Iterable[str | int] = DEFAULT_PROTECT,
    options: RunOptions | None = None,
    dtype: str = "float32",
    between_steps: BetweenSteps | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Remove ``n_remove`` layers one at a time, rescoring the pruned model after each removal.

    ``batches_fn(model)`` gives the calibration batches (called once, see ``data.batches_provider``).
    ``between_steps(model, step, student_to_teacher)`` runs after each removal (a heal, later);
    without it the result is cut from the original weights (exact), else the in-memory model is
    saved. ``layer_map.json`` gets ``steps``: each step's scores and the layer it removed.
    """
    options = options or RunOptions()
    arch, config = inspect_model_dir(model_dir, options)
    num_layers = config.num_hidden_layers
    protect = list(protect)
    protected = resolve_protect(protect, num_layers)
    select_layers([0.0] * num_layers, num_layers, remove=n_remove, protect=protect)  # bad input first
    model = modelio.load_model(model_dir, options, dtype=dtype, device=options.resolved_device())
    batches = batches_fn(model)
    teacher_of = list(range(num_layers))
    steps: list[dict[str, Any]] = []
    for step in range(n_remove):
        scores, _ = score(model, batches, metric)
        current_protect = [teacher_of.index(t) for t in sorted(protected)]
        (victim,) = select_layers(scores, len(teacher_of), remove=1, protect=current_protect)
        steps.append({"scores": scores, "removed": teacher_of[victim], "removed_student_index": victim})
        log(f"step {step + 1}/{n_remove}: removed layer {teacher_of[victim]} (index {victim} of {len(teacher_of)})")
        prune_model(model, [victim])
        del teacher_of[victim]
        if between_steps is not None:
            between_steps(model, step, list(teacher_of))
    removed = sorted(set(range(num_layers)) - set(teacher_of))
    first = {metric: steps[0]["scores"]} if steps else None
    if between_steps is None:
        del model
        return prune_dir(model_dir, out_dir, removed, metric=metric, scores=first, options=options,
                         iterative=True, steps=steps)
    mapping = layer_map(removed, num_layers, arch, metric, first, iterative=True, steps=steps)
    return save_pruned_model(model.to("cpu"), model_dir, out_dir, mapping)


# ---------------------------------------------------------------- one call for the CLI and the stage
def plan_and_prune(
    model_dir: Path,
    out_dir: Path,
    *,
    metric: str = "block_influence",
    remove: int | None = None,
    keep: int | None = None,
    layers: Sequence[int] | None = None,
    block: bool = False,
    protect: Iterable[str | int] = DEFAULT_PROTECT,
    iterative: bool = False,
    calibration=None,
    scores: dict[str, list[float]] | None = None,
    options: RunOptions | None = None,
    dtype: str = "float32",
    ctx: StageContext | None = None,
    log: Callable[[str], None] = lambda message: None,
    between_steps: BetweenSteps | None = None,
) -> dict[str, Any]:
    """Check everything, score if needed, choose the layers and write the pruned model.

    ``calibration`` is a recipe ``TextSource`` (None: the built-in text). ``scores`` computed
    earlier (by the importance stage) are used instead of scoring again. ``between_steps`` runs
    after each removal of an iterative prune (a short heal, see ``hooks.heal.iterative_healer``).
    Returns the layer map
    plus ``out`` and ``description``. Bad input is reported before any model is loaded and
    before anything is written.
    """
    options = options or RunOptions()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    protect = list(protect)
    arch, config = inspect_model_dir(model_dir, options)
    num_layers = config.num_hidden_layers
    if modelio.weight_files(model_dir):
        check_layer_tensors(model_dir, num_layers, arch)
    if iterative and (layers is not None or block):
        raise UserError("iterative removes the lowest-scoring layer each step; don't combine it with layers or block")
    # The selection with placeholder scores: every count, index and protect error before real work.
    planned = select_layers([0.0] * num_layers, num_layers, remove=remove, keep=keep, layers=layers,
                            block=block, protect=protect)
    needs_scores = layers is None and len(planned) > 0
    have_scores = bool(scores) and metric in scores and not (block and metric == "angular")
    if needs_scores:
        check_metric(metric)
    needs_batches = needs_scores and (iterative or not have_scores)
    batches_fn = _batches_fn(model_dir, calibration, options, ctx) if needs_batches else None

    if needs_scores and iterative:
        prune_iteratively(model_dir, out_dir, len(planned), metric, batches_fn, protect=protect,
                          options=options, dtype=dtype, between_steps=between_steps, log=log)
    else:
        block_scores = None
        if batches_fn is not None:
            log(f"scoring {num_layers} layers with {metric}")
            model = modelio.load_model(model_dir, options, dtype=dtype, device=options.resolved_device())
            metric_scores, block_scores = score(model, batches_fn(model), metric,
                                                block_size=len(planned) if block else None)
            scores = {**(scores or {}), metric: metric_scores}
            del model
        removed = select_layers((scores or {}).get(metric, []), num_layers, remove=remove, keep=keep,
                                layers=layers, block=block, block_scores=block_scores, protect=protect)
        extra = {"block_scores": block_scores} if block_scores is not None else {}
        prune_dir(model_dir, out_dir, removed, metric=metric if needs_scores else None,
                  scores=scores if needs_scores else None, options=options, **extra)
    mapping = json.loads((out_dir / LAYER_MAP).read_text())
    description = describe_selection(mapping["removed"], num_layers)
    if mapping.get("gguf_attention_pattern_matches") is False:
        log(f"warning: in a GGUF (llama.cpp, Ollama) some kept {arch} layers will switch between local and "
            "global attention, because llama.cpp fixes the pattern by layer index; see layer_map.json")
    return {"out": str(out_dir), "description": description, **mapping}


# ---------------------------------------------------------------- stage hook
@hookimpl(trylast=True)
def prune_layers(ctx: StageContext, model_dir: Path, scores: dict[str, list[float]]) -> Path | None:
    """Prune per the recipe's ``prune`` section into ``ctx.out_dir / "model"`` and return that.

    The model goes in a ``model`` subdirectory so the stage directory can also hold other files
    (logs, plots) next to it; ``layer_map.json`` is inside the model directory.
    """
    settings = ctx.settings
    if settings is None:
        return None
    out = Path(ctx.out_dir) / "model"
    data = getattr(ctx.recipe, "data", None)
    source = getattr(ctx.recipe, "source", None)
    heal_settings = getattr(ctx.recipe, "heal", None)
    between_steps = None
    if settings.iterative and heal_settings is not None and heal_settings.iterative_steps > 0:
        from ollama_compress.hooks.heal import iterative_healer, resolve_model

        teacher = resolve_model(heal_settings.teacher, ctx.options) if heal_settings.teacher else Path(model_dir)
        between_steps = iterative_healer(teacher, heal_settings, data, options=ctx.options, ctx=ctx, log=ctx.log)
    result = plan_and_prune(
        Path(model_dir), out, metric=settings.metric, remove=settings.remove, keep=settings.keep,
        layers=settings.layers, block=settings.block, protect=settings.protect,
        iterative=settings.iterative, calibration=data.calibration if data else None,
        scores=scores or None, options=ctx.options, dtype=getattr(source, "dtype", "float32"),
        ctx=ctx, log=ctx.log, between_steps=between_steps,
    )
    ctx.log(result["description"])
    ctx.metrics.update(
        removed_layers=result["removed"],
        num_layers_before=result["num_layers_before"],
        num_layers_after=result["num_layers_after"],
        kept_slices=result["kept_slices"],
        prune_description=result["description"],
    )
    return out


# ---------------------------------------------------------------- command line
def parse_layers(text: str) -> list[int]:
    """``"3,7,9"`` -> ``[3, 7, 9]``; UserError for anything else."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise UserError(f"--layers '{text}' is not a comma-separated list of layer numbers (e.g. 3,7,9)")
    return [int(p) for p in parts]


def parse_protect(text: str) -> list[str | int]:
    """``"first,last"``, ``"none"`` or ``"0,5"`` (mixed allowed) -> protect entries."""
    if text.strip().lower() in ("none", ""):
        return []
    items: list[str | int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in ("first", "last"):
            items.append(part)
        elif part.lstrip("-").isdigit():
            items.append(int(part))
        else:
            raise UserError(f"--protect '{part}' is not first, last, none or a layer number")
    return items


@hookimpl
def register_commands(cli: click.Group) -> None:
    from ollama_compress.cli import echo_json, make_options, run_options

    if "prune" in cli.commands:
        return

    @cli.command("prune")
    @click.argument("model")
    @click.option("--remove", type=int, help="How many layers to remove.")
    @click.option("--keep", type=int, help="Or: how many layers to keep.")
    @click.option("--layers", help="Or: exactly these 0-based layers, e.g. 3,7,9.")
    @click.option("--metric", default="block_influence", show_default=True, help="Importance metric that chooses.")
    @click.option("--block", is_flag=True, help="Remove one contiguous block of layers.")
    @click.option("--protect", default="first,last", show_default=True, help="Never remove: first,last | none | 0,5.")
    @click.option("--iterative", is_flag=True, help="Remove one layer, rescore, repeat.")
    @click.option("--calibration", type=click.Path(path_type=Path),
                  help="Calibration .txt or .jsonl (default: built-in text).")
    @click.option("--samples", type=int, default=32, show_default=True, help="Calibration sequences.")
    @click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
    @click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the pruned model.")
    @click.option("--json", "as_json", is_flag=True, help="Print the layer map as JSON.")
    @run_options
    def prune_command(model, remove, keep, layers, metric, block, protect, iterative, calibration,
                      samples, seq_len, out, as_json, **run_kwargs):
        """Remove the least important layers of MODEL and write the smaller model to --out.

        MODEL is an HF directory, a .gguf file (imported once), embedded:NAME or a cached hub id.
        """
        from ollama_compress.hooks.source import resolve_model_dir

        options = make_options(**run_kwargs)
        if sum(x is not None for x in (remove, keep, layers)) != 1:
            raise UserError("give exactly one of --remove N, --keep N or --layers 3,7,9")
        chosen = parse_layers(layers) if layers is not None else None
        protect_items = parse_protect(protect)
        from ollama_compress.hooks.data import text_source_from_options

        spec = text_source_from_options(calibration, samples, seq_len)
        model_dir = Path(model) if Path(model).is_dir() else resolve_model_dir(model, options)
        check_out_dir(out, model_dir)
        result = plan_and_prune(
            model_dir, out, metric=metric, remove=remove, keep=keep, layers=chosen, block=block,
            protect=protect_items, iterative=iterative, calibration=spec, options=options,
            log=lambda message: click.echo(message, err=True),
        )
        if as_json:
            echo_json(result)
        else:
            click.echo(f"layers removed: {result['removed']}")
            click.echo(result["description"])
            click.echo(f"wrote {out} ({result['num_layers_before']} -> {result['num_layers_after']} layers)")
