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

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click

from ollama_compress.cli import (add_command, calibration_from_options, calibration_options, echo_json, json_option,
                                 make_options, option_values, run_options, section_from_options, section_options)
from ollama_compress.context import StageContext
from ollama_compress.hooks import importance
from ollama_compress.hooks.data import batches_provider
from ollama_compress.hooks.heal import resolve_model
from ollama_compress.hooks.source import resolve_model_dir
from ollama_compress.options import RunOptions
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space, check_output_dir, claim_output_dir, write_json
from ollama_compress.gguf.arch import ARCHS
from ollama_compress.hookspecs import hookimpl
from ollama_compress import modelio
from ollama_compress.planner import (FINALISTS, MEASURED_AUTO_FLOPS, MEASURE_WINDOWS, SCREEN_WINDOWS,
    contiguous_starts, index_runs, measured_select_cost, model_shape, screened)
from ollama_compress.plugins import capability, get_plugin_manager
from ollama_compress.recipe import Prune, TextSource, exactly_one
from ollama_compress.safe_read import read_json

# model_type in config.json -> what prune calls it: every architecture the GGUF writer knows
SUPPORTED_ARCHITECTURES = {model_type: model_type.removesuffix("_text") for model_type in ARCHS}
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)", re.DOTALL)
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
    starts = contiguous_starts(num_layers, n, protected)
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
    if problem := exactly_one(remove=remove, keep=keep, layers=layers):
        raise UserError(problem)
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
    return index_runs(i for i in range(num_layers) if i not in gone)


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
        found.update(int(m.group(1)) for k in _tensor_names(path) if (m := LAYER_TENSOR.fullmatch(k)))
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


def _copy_shard(src: Path, dst: Path, new_index: dict[int, int], replace: dict | None = None) -> dict[str, int]:
    """Write ``src`` to ``dst`` without removed layers, renumbered; return {name: nbytes}.

    ``replace`` maps teacher tensor names to new values (the linear repair), cast to the stored dtype.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        for key in f.keys():
            m = LAYER_TENSOR.fullmatch(key)
            if m is None:
                tensors[key] = f.get_tensor(key)
            elif int(m.group(1)) in new_index:
                tensor = f.get_tensor(key)
                if replace and key in replace:
                    tensor = replace[key].to(device="cpu", dtype=tensor.dtype).contiguous()
                tensors[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    modelio.check_finite(tensors.items(), str(src))
    if tensors:
        save_file(tensors, str(dst), metadata=metadata)
    return {k: t.numel() * t.element_size() for k, t in tensors.items()}


def _write_weights(model_dir: Path, out: Path, files: list[Path], kept: Sequence[int],
                   replace: dict | None = None) -> None:
    check_free_space(out, sum(f.stat().st_size for f in files), "the pruned model's weights")
    new_index = {teacher: student for student, teacher in enumerate(kept)}
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path in files:
        name = path.name
        written = _copy_shard(path, out / name, new_index, replace)
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
        raise UserError(f"--out {out_dir} overlaps the model directory {model_dir}; choose an empty or new folder")
    check_output_dir(out_dir, "--out")
    if out_dir.exists():
        claim_output_dir(out_dir, "--out")  # empty, or an earlier output of this tool: replaced when done
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
    replace: dict | None = None,
    **extra: Any,
) -> Path:
    """Write ``model_dir`` without layers ``remove`` to ``out_dir``, atomically; return ``out_dir``.

    Weights are streamed shard by shard (see the module docstring); tokenizer, chat template,
    generation config and licence files are copied; ``layer_map.json`` records the mapping,
    ``metric``, ``scores`` and any ``extra`` keys. Checkpoints with only pickle weights
    (``--allow-pickle``) are loaded, pruned in memory and saved as safetensors. ``replace``:
    ``{teacher tensor name: new value}`` written instead of the stored tensor (the linear repair).
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
            _write_weights(model_dir, tmp, files, kept, replace)
            _write_config(model_dir, tmp, config, kept)
            _copy_extra_files(model_dir, tmp)
        else:
            model = modelio.load_model(model_dir, options)
            if replace:
                from ollama_compress.repair import apply_tensors

                apply_tensors(model, replace)
            model = prune_model(model, removed)
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
    capability("importance_metrics", metric)


BatchesFn = Callable[[Any], list]


def _batches_fn(model_dir: Path, calibration, options: RunOptions, ctx: StageContext | None) -> BatchesFn:
    """Calibration batches for ``calibration`` (None: the shipped corpus), tokenized like ``model_dir``."""
    spec = calibration if calibration is not None else TextSource()
    return batches_provider(spec, modelio.load_tokenizer(model_dir, options), ctx)


def score(model, batches, metric: str, *, block_size: int | None = None
          ) -> tuple[list[float], list[float] | None]:
    """Scores of ``metric`` per layer; with ``block_size`` and the angular metric, also the
    angular distance across a block of that size for every start (Gromov et al.)."""
    scores = importance.score_model(model, batches, [metric])[metric]
    distances = None
    if block_size and metric == "angular":
        distances = [float(d) for d in importance.block_distances(model, batches, block_size)]
    return [float(s) for s in scores], distances


# ---------------------------------------------------------------- repair and measured selection
SELECT_MODES = ("auto", "metric", "measured")


def resolve_select(select: str, model_dir: Path, num_layers: int, n: int, protected: set[int], metrics: int,
                   calibration, *, explicit: bool, iterative: bool) -> str:
    """"metric" or "measured" for ``prune.select``; auto measures when ``measured_select_cost`` is
    at most ``planner.MEASURED_AUTO_FLOPS``."""
    if select not in SELECT_MODES:
        raise UserError(f"select '{select}' is not one of {', '.join(SELECT_MODES)}")
    if select == "metric" or n == 0:
        return "metric"
    if explicit or iterative:
        if select == "measured":
            raise UserError("select: measured chooses the layers itself; don't combine it with layers or iterative")
        return "metric"
    if select == "measured":
        return "measured"
    if not modelio.weight_files(model_dir):
        return "metric"
    spec = calibration if calibration is not None else TextSource()
    cost = measured_select_cost(model_shape(model_dir), n, protected, metrics, spec.samples, spec.seq_len)
    return "measured" if cost["flops"] <= MEASURED_AUTO_FLOPS else "metric"


def candidate_cuts(num_layers: int, n: int, protected: set[int], picks: dict[str, list[int]]) -> dict[tuple, str]:
    """Every contiguous run of ``n`` unprotected layers plus each metric's pick: {removed: label}."""
    cuts = {tuple(range(s, s + n)): "span" for s in contiguous_starts(num_layers, n, protected)}
    for metric, removed in picks.items():
        key = tuple(removed)
        cuts[key] = f"{cuts[key]}, {metric}" if key in cuts else metric
    return cuts


def unchanged_prefix(removed: Sequence[int], repaired: bool) -> int:
    """How many leading decoder layers a cut leaves as they were: those before its first removed
    layer, less the one its linear repair changes (the anchor)."""
    first = min(removed)
    return max(0, first - 1) if repaired else first


def score_cuts(model, batches: list, cuts: dict[tuple, str], stats: dict | None,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each cut's KL to the unpruned ``model`` (``measure_cuts``) on the first ``MEASURE_WINDOWS``
    calibration windows; with more than ``FINALISTS`` cuts, every cut is screened on the first
    ``SCREEN_WINDOWS`` (``screen_kl``) and only the ``FINALISTS`` lowest get ``kl``."""
    import torch

    windows = torch.cat(batches)[:MEASURE_WINDOWS]
    if not screened(len(cuts), len(windows)):
        return measure_cuts(model, windows, cuts, stats, log)
    log(f"screening {len(cuts)} cuts on {SCREEN_WINDOWS} windows; the {FINALISTS} lowest are then scored on "
        f"{len(windows)}")
    screen = measure_cuts(model, windows[:SCREEN_WINDOWS], cuts, stats, log, key="screen_kl")
    finalists = sorted(screen, key=lambda c: (c["screen_kl"], c["removed"]))[:FINALISTS]
    final = measure_cuts(model, windows, {tuple(c["removed"]): c["by"] for c in finalists}, stats, log)
    kl = {tuple(c["removed"]): c["kl"] for c in final}
    return [{**c, **({"kl": kl[tuple(c["removed"])]} if tuple(c["removed"]) in kl else {})} for c in screen]


def measure_cuts(model, windows, cuts: dict[tuple, str], stats: dict | None, log: Callable[[str], None],
                 key: str = "kl") -> list[dict[str, Any]]:
    """KL to the unpruned ``model`` of each cut (after its linear repair when ``stats`` is given), on the
    token ``windows``, stored under ``key``. The teacher's logits are computed once, and so are the
    layers a cut leaves unchanged (``unchanged_prefix``): the first cut's pass records the teacher's
    layer outputs, and each later cut starts from them (``modelio.replay_prefix``)."""
    from ollama_compress import repair, trainer

    teacher_logits: list = []
    vocab = model.get_output_embeddings().weight.shape[0]
    device = str(next(model.parameters()).device)
    _, layers = modelio.decoder_stack(model)
    prefixes = {removed: unchanged_prefix(removed, stats is not None) for removed in cuts}
    recorded: dict[int, list] = {}
    results = []
    for removed, label in cuts.items():
        student = copy.deepcopy(model)
        if stats is not None:
            repair.apply_tensors(student, repair.fused_tensors(model, repair.fit_spans(model, stats, removed)))
        prune_model(student, list(removed))
        if recorded and prefixes[removed]:
            modelio.replay_prefix(student, prefixes[removed], recorded[prefixes[removed] - 1])
        with modelio.recorded_outputs({} if recorded else {p - 1: layers[p - 1] for p in prefixes.values() if p}) \
                as outputs:
            kl = trainer.heldout_metrics(student, model, windows, device, vocab, teacher_logits)["kl"]
        recorded = recorded or outputs
        del student
        results.append({"removed": list(removed), "by": label, key: kl})
        log(f"candidate {list(removed)} ({label}): {'screen KL' if key == 'screen_kl' else 'KL'} {kl:.4f}")
    return results


def _metric_picks(scores: dict[str, list[float]], num_layers: int, n: int, block: bool, protect: list,
                  block_scores: Sequence[float] | None, metric: str) -> dict[str, list[int]]:
    return {m: select_layers(v, num_layers, remove=n, block=block, protect=protect,
                             block_scores=block_scores if m == metric else None)
            for m, v in scores.items() if isinstance(v, list) and len(v) == num_layers}


def choose_and_repair(model, batches: list, removed: list[int], *, select: str, repair_mode: str,
                      scores: dict[str, list[float]], num_layers: int, block: bool, protect: list,
                      block_scores: Sequence[float] | None, metric: str, log: Callable[[str], None]
                      ) -> tuple[list[int], dict | None, dict[str, Any]]:
    """(layers to remove, repaired tensors or None, extra layer-map keys) for the chosen cut."""
    from ollama_compress import repair

    extra: dict[str, Any] = {}
    stats = None
    if select == "measured":
        n = len(removed)
        picks = _metric_picks(scores, num_layers, n, block, protect, block_scores, metric)
        cuts = candidate_cuts(num_layers, n, resolve_protect(protect, num_layers), picks)
        spans = [span for cut in cuts for span in repair.spans_of(cut)]
        stats = repair.collect(model, batches, spans) if repair_mode == "linear" else None
        log(f"select: measured, scoring {len(cuts)} candidate cuts by KL to the teacher")
        candidates = score_cuts(model, batches, cuts, stats, log)
        best = min((c for c in candidates if "kl" in c), key=lambda c: (c["kl"], c["removed"]))
        removed = best["removed"]
        extra["select"] = {"mode": "measured", "repair": repair_mode, "candidates": candidates,
                           "chosen": removed, "metric_pick": picks.get(metric)}
        log(f"select: measured chose {removed} (KL {best['kl']:.4f})")
    tensors = None
    if repair_mode == "linear" and removed:
        stats = stats or repair.collect(model, batches, repair.spans_of(removed))
        fits = repair.fit_spans(model, stats, removed)
        for fit in fits:
            log(repair.describe(fit))
        tensors = repair.fused_tensors(model, fits)
        extra["repair"] = {"method": "linear", "ridge": repair.RIDGE, "spans": [f.summary() for f in fits]}
    return removed, tensors, extra


# ---------------------------------------------------------------- iterative pruning
BetweenSteps = Callable[[Any, int, list[int]], None]


def prune_iteratively(model_dir: Path, out_dir: Path, prune: Prune, batches_fn: BatchesFn, *,
                      between_steps: BetweenSteps | None = None, log: Callable[[str], None] = lambda message: None,
                      options: RunOptions | None = None, dtype: str = "float32") -> Path:
    """Remove ``prune.remove`` layers (or all but ``prune.keep``) one at a time, rescoring the pruned
    model with ``prune.metric`` after each removal; ``prune.protect`` layers stay.

    ``batches_fn(model)`` gives the calibration batches (called once, see ``data.batches_provider``).
    ``between_steps(model, step, student_to_teacher)`` runs after each removal (a heal, later);
    without it the result is cut from the original weights (exact), else the in-memory model is
    saved. ``layer_map.json`` gets ``steps``: each step's scores and the layer it removed.
    ``prune.repair: linear`` repairs the final cut from the original weights when nothing healed between
    steps; after a heal between steps the layers have already adapted and repair is skipped.
    """
    options = options or RunOptions()
    metric, repair, protect = prune.metric, prune.repair, list(prune.protect)
    arch, config = inspect_model_dir(model_dir, options)
    num_layers = config.num_hidden_layers
    protected = resolve_protect(protect, num_layers)
    # bad input first
    n_remove = len(select_layers([0.0] * num_layers, num_layers, remove=prune.remove, keep=prune.keep, protect=protect))
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
        tensors, extra = None, {}
        if repair == "linear" and removed:
            teacher = modelio.load_model(model_dir, options, dtype=dtype, device=options.resolved_device())
            _, tensors, extra = choose_and_repair(teacher, batches, removed, select="metric", repair_mode=repair,
                                                  scores={}, num_layers=num_layers, block=False, protect=protect,
                                                  block_scores=None, metric=metric, log=log)
            del teacher
        return prune_dir(model_dir, out_dir, removed, metric=metric, scores=first, options=options,
                         iterative=True, steps=steps, replace=tensors, **extra)
    if repair == "linear":
        log("repair: skipped, the heal between removals already adapted the layers next to each cut")
    mapping = layer_map(removed, num_layers, arch, metric, first, iterative=True, steps=steps)
    return save_pruned_model(model.to("cpu"), model_dir, out_dir, mapping)


# ---------------------------------------------------------------- one call for the CLI and the stage
def plan_and_prune(
    model_dir: Path,
    out_dir: Path,
    prune: Prune,
    *,
    calibration: TextSource | None = None,
    scores: dict[str, list[float]] | None = None,
    options: RunOptions | None = None,
    dtype: str = "float32",
    ctx: StageContext | None = None,
    log: Callable[[str], None] = lambda message: None,
    between_steps: BetweenSteps | None = None,
) -> dict[str, Any]:
    """Check everything, score if needed, choose the layers per the recipe section ``prune`` and write
    the pruned model.

    ``calibration`` is a recipe ``TextSource`` (None: the built-in text). ``scores`` computed
    earlier (by the importance stage) are used instead of scoring again. ``between_steps`` runs
    after each removal of an iterative prune (a short heal, see ``heal_through_hook``).
    ``prune.repair``: "linear" fits and fuses a linear map per cut (``ollama_compress.repair``), "none"
    cuts the weights byte for byte. ``prune.select``: "metric" (the metric's pick), "measured" (every
    contiguous span plus each metric's pick, each repaired, scored by KL to the teacher) or "auto"
    (measured when cheap, see ``resolve_select``). ``prune.target`` must have been turned into
    ``remove`` first (``pipeline.Run.resolve_target``). Returns the layer map plus ``out`` and
    ``description``. Bad input is reported before any model is loaded and before anything is written.
    """
    options = options or RunOptions()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    remove, keep, layers, block, metric, repair = (prune.remove, prune.keep, prune.layers, prune.block,
                                                   prune.metric, prune.repair)
    protect = list(prune.protect)
    arch, config = inspect_model_dir(model_dir, options)
    num_layers = config.num_hidden_layers
    if modelio.weight_files(model_dir):
        check_layer_tensors(model_dir, num_layers, arch)
    if prune.iterative and (layers is not None or block):
        raise UserError("iterative removes the lowest-scoring layer each step; don't combine it with layers or block")
    # The selection with placeholder scores: every count, index and protect error before real work.
    planned = select_layers([0.0] * num_layers, num_layers, remove=remove, keep=keep, layers=layers,
                            block=block, protect=protect)
    needs_scores = layers is None and len(planned) > 0
    have_scores = bool(scores) and metric in scores and not (block and metric == "angular")
    if needs_scores:
        check_metric(metric)
    other_metrics = len([m for m in (scores or {}) if m != metric])
    select = resolve_select(prune.select, model_dir, num_layers, len(planned), resolve_protect(protect, num_layers),
                            1 + other_metrics, calibration, explicit=layers is not None, iterative=prune.iterative)
    repairs = repair == "linear" and len(planned) > 0
    needs_batches = (needs_scores and (prune.iterative or not have_scores)) or repairs or select == "measured"
    batches_fn = _batches_fn(model_dir, calibration, options, ctx) if needs_batches else None

    if needs_scores and prune.iterative:
        prune_iteratively(model_dir, out_dir, prune, batches_fn, between_steps=between_steps, log=log,
                          options=options, dtype=dtype)
    else:
        block_scores, tensors, extra = None, None, {}
        model = batches = None
        if batches_fn is not None:
            model = modelio.load_model(model_dir, options, dtype=dtype, device=options.resolved_device())
            batches = batches_fn(model)
        if needs_scores and not have_scores:
            log(f"scoring {num_layers} layers with {metric}")
            metric_scores, block_scores = score(model, batches, metric, block_size=len(planned) if block else None)
            scores = {**(scores or {}), metric: metric_scores}
        removed = select_layers((scores or {}).get(metric, []), num_layers, remove=remove, keep=keep,
                                layers=layers, block=block, block_scores=block_scores, protect=protect)
        if model is not None and (repairs or select == "measured"):
            removed, tensors, extra = choose_and_repair(
                model, batches, removed, select=select, repair_mode=repair, scores=scores or {},
                num_layers=num_layers, block=block, protect=protect, block_scores=block_scores, metric=metric, log=log)
        del model
        if block_scores is not None:
            extra["block_scores"] = block_scores
        prune_dir(model_dir, out_dir, removed, metric=metric if needs_scores else None,
                  scores=scores if needs_scores else None, options=options, replace=tensors, **extra)
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
    settings = ctx.section_as(Prune)
    if settings is None:
        return None
    out = Path(ctx.out_dir) / "model"
    heal_settings = ctx.recipe.heal
    between_steps = None
    if settings.iterative and heal_settings is not None and heal_settings.iterative_steps > 0:
        teacher = resolve_model(heal_settings.teacher, ctx.options) if heal_settings.teacher else Path(model_dir)
        between_steps = heal_through_hook(ctx, teacher, Path(model_dir))
    result = plan_and_prune(Path(model_dir), out, settings, calibration=ctx.recipe.data.calibration,
                            scores=scores or None, options=ctx.options, dtype=ctx.recipe.source.dtype, ctx=ctx,
                            log=ctx.log, between_steps=between_steps)
    ctx.log(result["description"])
    if "select" in result:  # the measured candidates next to the metric scores
        write_json(Path(ctx.out_dir) / "scores.json", {**(result.get("scores") or {}),
                                                       "candidates": result["select"]["candidates"]})
    ctx.metrics.update(
        removed_layers=result["removed"],
        num_layers_before=result["num_layers_before"],
        num_layers_after=result["num_layers_after"],
        kept_slices=result["kept_slices"],
        prune_description=result["description"],
    )
    if "select" in result:
        ctx.metrics["select_candidates"] = result["select"]["candidates"]
    return out


def heal_through_hook(ctx: StageContext, teacher_dir: Path, source_dir: Path) -> BetweenSteps:
    """``between_steps`` for iterative pruning that heals through the ``heal`` hook, so a plugin that
    takes over ``heal`` heals here too: the in-memory student is saved (with ``layer_map.json``), the
    hook heals it with ``ctx.inputs["iterative_step"]`` set (the built-in runs ``heal.iterative_steps``
    short steps), and the healed weights are loaded back into the model."""
    from safetensors.torch import load_file

    def between_steps(model, step: int, student_to_teacher: list[int]) -> None:
        work = Path(ctx.out_dir) / f"iterative-heal-{step + 1}"
        student_dir = work / "student"
        student_dir.mkdir(parents=True, exist_ok=True)
        modelio.save_model(model, None, student_dir, source_dir)
        write_json(student_dir / LAYER_MAP, {"student_to_teacher": list(student_to_teacher)})
        step_ctx = StageContext(stage="heal", recipe=ctx.recipe, run_dir=ctx.run_dir, out_dir=work / "healed",
                                options=ctx.options, console=ctx.console,
                                inputs={"iterative_step": step + 1, "teacher_dir": str(teacher_dir)})
        step_ctx.out_dir.mkdir()
        healed = get_plugin_manager().hook.heal(ctx=step_ctx, student_dir=student_dir, teacher_dir=teacher_dir)
        if healed is None:
            raise StageFailed(f"no heal plugin healed the model after iterative step {step + 1}")
        state = {}
        for path in modelio.weight_files(Path(healed)):
            state.update(load_file(str(path)))
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise StageFailed(f"the heal after iterative step {step + 1} returned weights this model lacks "
                              f"({unexpected[0]})")
        shutil.rmtree(work)

    return between_steps


# ---------------------------------------------------------------- command line
COMMAND_SKIPS = ("target", "report_metrics")  # the prune command takes a count or layers; it scores one metric


@click.command("prune")
@click.argument("model")
@section_options(Prune, COMMAND_SKIPS)
@calibration_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the pruned model.")
@json_option
@run_options
def prune_command(model, out, as_json, **given):
    """Remove the least important layers of MODEL and write the smaller model to --out.

    MODEL is an HF directory, a .gguf file (imported once), embedded:NAME or a cached hub id.
    """
    options = make_options(**given)
    values = option_values(Prune, given, COMMAND_SKIPS)
    if not {"remove", "keep", "layers"} & values.keys():
        raise UserError("prune: give --remove N, --keep N or --layers I,J,... (how many or which layers to remove)")
    settings = section_from_options(Prune, values)
    spec = calibration_from_options(given)
    model_dir = Path(model) if Path(model).is_dir() else resolve_model_dir(model, options)
    check_out_dir(out, model_dir)
    result = plan_and_prune(model_dir, out, settings, calibration=spec, options=options,
                            log=lambda message: click.echo(message, err=True))
    if as_json:
        echo_json(result)
    else:
        click.echo(f"layers removed: {result['removed']}")
        click.echo(result["description"])
        click.echo(f"wrote {out} ({result['num_layers_before']} -> {result['num_layers_after']} layers)")


@hookimpl
def register_commands(cli: click.Group) -> None:
    add_command(cli, prune_command)
