"""The run pipeline: fixed stage order, one run directory, a stage cache, and the lock (run.json).

Order: source -> importance -> prune -> heal -> export (GGUF + quants) -> ollama (Modelfiles,
register). Quantization comes last, after healing: quantizing before the fine-tune loses quality.
``STAGES`` is the one stage table: each stage's directory, recipe section, hooks, the values it
reads from earlier stages and writes for later ones, and the recipe fields it uses. Each stage
writes ``run_dir/NN-stage`` through a temporary directory renamed when it completes. Its cache key
hashes the recipe fields it uses with the keys of the stages that produced its inputs (the source
stage hashes the source itself), so a rerun skips finished stages, and an edited setting reruns
only the stages that read it and those downstream of them.
"""
from __future__ import annotations

import json
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from .context import StageContext
from .embedded import cache_dir
from .errors import CompressError, NotAvailable, StageFailed, UserError
from .fsutil import (Fingerprints, atomic_path, check_output_dir, claim_output_dir, clean_journal, remove_made,
                     settings_hash, write_json)
from .hookspecs import LOCATE_SOURCE
from .options import RunOptions, launcher_world
from .planner import (CUT_AND_QUANT, QUANTIZE_ONLY, SizeCandidate, gguf_size, heal_memory_bytes, layers_to_remove,
                      measured_select_cost, model_shape, size_candidates, size_plan_cost)
from .plugins import call_first, get_plugin_manager
from .recipe import SUPPORTED_RECIPE_VERSIONS, Export, Recipe, apply_override, load_recipe, parse_count, validate
from .size_plan import PLAN_FILE, cached_plan, measure_size_plan, plan_key, write_plan

STAGE_FILE = ".stage.json"
PACKAGES = ("ollama-compress", "torch", "transformers", "safetensors", "gguf", "llama-cpp-python",
            "ollama", "pluggy", "pydantic", "accelerate")


def _scoring_settings(recipe: Recipe) -> dict[str, Any]:
    """What importance scoring reads: the metrics, and the block size when scoring blocks."""
    prune = recipe.prune
    block = {"remove": prune.remove, "keep": prune.keep} if prune.block else {}
    return {"metrics": [prune.metric, *prune.report_metrics], "block": prune.block, **block,
            "calibration": _dump(recipe.data.calibration), "dtype": recipe.source.dtype}


def _prune_settings(recipe: Recipe) -> dict[str, Any]:
    settings = {"prune": _dump(recipe.prune), "dtype": recipe.source.dtype}
    if recipe.prune.iterative:  # rescoring between steps, with a short heal when there is one
        settings.update(calibration=_dump(recipe.data.calibration), heal=_dump(recipe.heal),
                        heal_data=_dump(getattr(recipe.data, "heal", None)))
    if recipe.prune.repair != "none" or recipe.prune.select != "metric":  # fitted/measured on calibration text
        settings["calibration"] = _dump(recipe.data.calibration)
    return settings


def _dump(section: Any) -> Any:
    """A recipe section (or a list of them, as ``data.heal`` may be) as plain JSON data for a cache key."""
    if isinstance(section, list):
        return [_dump(item) for item in section]
    return section.model_dump(mode="json", by_alias=True) if section is not None else None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: where it writes, what turns it on, what it reads and writes.

    ``reads`` and ``writes`` are keys of the values passed between stages (``StageContext.inputs``):
    a stage sees only the keys it reads, and returns only the keys it writes. Its cache key hashes
    ``settings(recipe)`` (the recipe fields it uses, nothing more) with the keys of the stages that
    produced what it reads.
    """

    name: str
    dirname: str
    section: str  # recipe section with the stage's settings
    hooks: tuple[str, ...]  # stage hooks it calls
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    settings: Callable[[Recipe], Any]
    enabled: Callable[[Recipe], bool]


def _has(section: str) -> Callable[[Recipe], bool]:
    return lambda recipe: getattr(recipe, section) is not None


STAGES = (
    Stage("source", "00-source", "source", ("load_source",), reads=(), writes=("model_dir", "teacher_dir"),
          settings=lambda r: {"gguf_file": r.source.gguf_file, "dtype": r.source.dtype},
          enabled=lambda r: True),
    Stage("importance", "10-importance", "prune", ("score_layers",), reads=("model_dir",),
          writes=("scores_file",), settings=_scoring_settings,
          enabled=lambda r: r.prune is not None and r.prune.layers is None),
    Stage("prune", "20-pruned", "prune", ("prune_layers",), reads=("model_dir", "scores_file"),
          writes=("model_dir", "pruned_dir"), settings=_prune_settings, enabled=_has("prune")),
    Stage("heal", "30-healed", "heal", ("heal",), reads=("model_dir", "teacher_dir"),
          writes=("model_dir", "healed_dir", "heal_planned_tokens"),
          settings=lambda r: {"heal": _dump(r.heal), "heal_data": _dump(getattr(r.data, "heal", None)),
                              "heldout": _dump(r.data.heldout)},
          enabled=_has("heal")),
    Stage("export", "40-gguf", "export", ("export_gguf", "quantize_gguf"),
          reads=("model_dir", "pruned_dir", "teacher_dir"),
          writes=("gguf",),
          settings=lambda r: {"export": _dump(r.export), "name": r.name, "heldout": _dump(r.data.heldout),
                              "calibration": _dump(r.data.calibration)},
          enabled=_has("export")),
    Stage("ollama", "50-ollama", "ollama", ("write_modelfile", "create_ollama_model"),
          reads=("model_dir", "gguf"), writes=("modelfiles", "ollama_models"),
          settings=lambda r: {"ollama": _dump(r.ollama), "name": r.name}, enabled=_has("ollama")),
    Stage("evaluate", "60-evaluate", "evaluate", ("evaluate",),
          reads=("teacher_dir", "pruned_dir", "healed_dir", "heal_planned_tokens", "gguf", "scores_file",
                 "ollama_models", "modelfiles"),
          writes=("evaluation", "report"),
          settings=lambda r: {"evaluate": _dump(r.evaluate), "name": r.name, "heldout": _dump(r.data.heldout),
                              "calibration": _dump(r.data.calibration),
                              "outtype": r.export.outtype if r.export else None},
          enabled=_has("evaluate")),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def missing_hooks(stage: Stage) -> list[str]:
    """Stage hooks that no installed plugin implements."""
    pm = get_plugin_manager()
    return [h for h in stage.hooks if not getattr(pm.hook, h).get_hookimpls()]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _relocate(value: Any, tmp: Path, final: Path) -> Any:
    """Rewrite paths inside a stage's temporary directory to its final directory."""
    if isinstance(value, dict):
        return {k: _relocate(v, tmp, final) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocate(v, tmp, final) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith(str(tmp)):
        return str(final) + value[len(str(tmp)):]
    return value


class Run:
    """One run of a recipe in one run directory."""

    def __init__(self, recipe: Recipe, run_dir: Path, options: RunOptions, console: Console,
                 first: str | None = None, last: str | None = None):
        self.recipe, self.run_dir, self.options, self.console = recipe, Path(run_dir), options, console
        self.first, self.last = first, last  # --from / --until: run only these stages of the table
        self.main = launcher_world()[0] == 0  # under a launcher, only rank 0 writes the run directory
        self.inputs: dict[str, Any] = {}
        self._source_location: Path | None = None
        self.producers: dict[str, str] = {}  # input key -> cache key of the stage that wrote it
        self.size_plan: list[SizeCandidate] = []  # prune.target.size_mb: what the plan compares
        self.size_base: Recipe | None = None  # the recipe as given, before the plan's choice
        self.lock: dict[str, Any] = {
            "recipe": recipe.model_dump(mode="json", by_alias=True, exclude_none=True),
            "versions": package_versions(),
            "inputs": {},
            "stages": {},
        }

    # ------------------------------------------------------------ keys
    def source_location(self) -> Path:
        """The local file or directory of the recipe's source, from the ``load_source`` hook
        (asked only where it is: nothing is converted or written)."""
        if self._source_location is None:
            ctx = StageContext(stage="source", recipe=self.recipe, run_dir=self.run_dir, out_dir=self.run_dir,
                               options=self.options, console=self.console, inputs={LOCATE_SOURCE: True})
            self._source_location = Path(call_first("load_source", ctx=ctx))
        return self._source_location

    def source_hash(self, *, read: bool = True) -> str | None:
        """The source's sha256 (hashed once per file version); None when ``read`` is False and
        the source was never hashed in its current state."""
        path = self.source_location()
        fingerprints = Fingerprints(cache_dir() / "fingerprints.json")
        digest = fingerprints.sha256(path) if read else fingerprints.known(path)
        if digest is not None:
            self.lock["inputs"]["source"] = {"path": str(path), "sha256": digest}
        return digest

    def _protected(self, num_layers: int) -> set[int]:
        prune = (self.size_base or self.recipe).prune  # the size plan may have dropped the prune section
        return {p if isinstance(p, int) else (0 if p == "first" else num_layers - 1) for p in prune.protect}

    def resolve_target(self) -> None:
        """Turn ``prune.target`` into ``prune.remove`` from the source's shape (no weights read). A
        ``size_mb`` target lists what the size plan compares (``planner.size_candidates``) and takes,
        until it is measured, its cut at ``target.quant`` (the first candidate without one)."""
        prune = self.recipe.prune
        if prune is None or prune.target is None:
            return
        target = prune.target
        shape = model_shape(self.source_location())
        keep_at_least = max(1, len(self._protected(shape.num_layers)))
        if target.size_mb is not None:
            imatrix = (self.recipe.export or Export()).imatrix is not None
            self.size_base = self.recipe
            self.size_plan = size_candidates(shape, target.size_mb, target.quant, imatrix=imatrix,
                                             keep_at_least=keep_at_least)
            first = next((c for c in self.size_plan if c.kind == CUT_AND_QUANT), self.size_plan[0])
            self.apply_size_choice(first.kind, first.quant, first.removed)
            self.console.print("prune.target: the size plan compares " + "; ".join(c.label for c in self.size_plan))
            return
        removed = layers_to_remove(shape, params=parse_count(target.params), keep_at_least=keep_at_least)
        if removed == 0:
            raise UserError(f"prune.target: the source ({shape.params():,} parameters) already fits; "
                            "remove the prune section or choose a smaller target")
        self.lock["target"] = {**target.model_dump(exclude_none=True), "remove": removed}
        resolved = prune.model_copy(update={"remove": removed, "target": None})
        self.recipe = self.recipe.model_copy(update={"prune": resolved})
        self.lock["recipe"] = self.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
        self.console.print(f"prune.target: removing {removed} of {shape.num_layers} layers")

    def apply_size_choice(self, kind: str, quant: str, removed: int, layers: list[int] | None = None) -> None:
        """The recipe as given, with the size plan's choice: quantize only drops prune and heal, a cut
        removes ``removed`` layers (exactly ``layers``, the plan's measured cut, unless the prune is
        iterative and heals between removals); either way the export makes ``quant`` in place of
        ``target.quant``."""
        base = self.size_base
        target = base.prune.target
        cut = {"remove": removed, "target": None}
        if layers is not None and not base.prune.iterative:
            cut = {"remove": None, "target": None, "layers": list(layers), "block": False}
        update: dict[str, Any] = {"prune": None, "heal": None} if kind == QUANTIZE_ONLY else {
            "prune": base.prune.model_copy(update=cut)}
        if base.export is not None:
            quants = [quant if q == target.quant else q for q in base.export.quants]
            quants = list(dict.fromkeys(quants if quant in quants else [quant, *quants]))
            update["export"] = base.export.model_copy(update={"quants": quants})
        self.recipe = base.model_copy(update=update)
        self.lock["target"] = {**target.model_dump(exclude_none=True), "remove": removed, "plan": kind,
                               "plan_quant": quant}
        self.lock["recipe"] = self.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)

    def settle_size_plan(self, source_key: str | None) -> None:
        """The size plan's choice: ``plan.json`` when it was measured for this recipe and source, else
        every candidate made and measured now (``size_plan.measure_size_plan``); applied to the recipe."""
        key = plan_key(self.size_base, source_key)
        plan = cached_plan(self.run_dir, key)
        if plan is not None:
            self.console.print(f"size plan: cached ({self.run_dir / PLAN_FILE})")
        elif not self.main:
            raise UserError("prune.target: the size plan was not measured yet; run the stages before heal "
                            "without the launcher first")
        else:
            teacher_dir = self.inputs["teacher_dir"]
            ctx = StageContext(stage="plan", recipe=self.size_base, run_dir=self.run_dir, out_dir=self.run_dir,
                               options=self.options, console=self.console, section="prune",
                               inputs={"teacher_dir": teacher_dir, "model_dir": teacher_dir})
            self.console.print(f"size plan: measuring {len(self.size_plan)} candidates on calibration text ...")
            try:
                plan = measure_size_plan(ctx, Path(teacher_dir), self.size_plan, self.size_base.prune.target.size_mb)
            except CompressError as exc:
                self.lock["plan"] = {"status": "failed", "error": str(exc)}
                self._write_lock()
                raise
            write_plan(self.run_dir, key, plan)
        choice = plan["choice"]
        self.apply_size_choice(choice["kind"], choice["quant"], choice["layers_removed"], choice.get("removed"))
        self.lock["plan"] = {"file": PLAN_FILE, "choice": choice, "sentence": plan["sentence"]}
        self.console.print(f"size plan: {plan['sentence']}")

    def estimate(self) -> dict[str, Any]:
        """Parameters, GGUF size per quant and heal memory, from the source's shape alone."""
        shape = model_shape(self.source_location())
        prune = self.recipe.prune
        removed = 0
        if prune is not None:
            removed = len(prune.layers) if prune.layers is not None else (
                prune.remove if prune.remove is not None else shape.num_layers - prune.keep)
        params = shape.params(removed)
        result: dict[str, Any] = {"layers": [shape.num_layers, shape.num_layers - removed],
                                  "params": [shape.params(), params]}
        calibration = self.recipe.data.calibration
        if prune is not None and prune.select != "metric" and prune.layers is None and not prune.iterative and removed:
            result["select_measured"] = measured_select_cost(shape, removed, self._protected(shape.num_layers),
                                                             1 + len(prune.report_metrics),
                                                             calibration.samples, calibration.seq_len)
        if self.size_plan:
            result["size_plan"] = {
                "candidates": [{"kind": c.kind, "quant": c.quant, "layers_removed": c.removed, "label": c.label,
                                "estimated_mib": round(c.estimated_bytes / 2**20, 1)} for c in self.size_plan],
                "cost": size_plan_cost(self.size_plan, calibration.samples, calibration.seq_len)}
            base = self.size_base.prune
            if base.select != "metric" and not base.iterative:  # each cut's own measured choice of layers
                result["size_plan"]["cut_select_flops"] = sum(
                    measured_select_cost(shape, c.removed, self._protected(shape.num_layers),
                                         1 + len(base.report_metrics), calibration.samples, calibration.seq_len)["flops"]
                    for c in self.size_plan if c.kind == CUT_AND_QUANT)
        if self.recipe.export is not None:
            quants = dict.fromkeys([self.recipe.export.outtype, *self.recipe.export.quants])
            result["gguf_mib"] = {q: round(gguf_size(shape, q, removed) / 2**20, 1) for q in quants}
        heal = self.recipe.heal
        if heal is not None:
            from .trainer import autocast_dtype

            device = self.options.resolved_device()
            memory = heal_memory_bytes(shape, removed, heal, device=device,
                                       autocast=autocast_dtype(device, heal.dtype) is not None)
            result["heal_memory_gib"] = round(memory["total"] / 2**30, 2)
        return result

    def stage_key(self, stage: Stage, source_key: str | None) -> str | None:
        """Hash of what ``stage`` reads: its recipe settings and the keys of its inputs' producers."""
        if stage.name == "source":
            upstream: Any = source_key
        else:
            upstream = {key: self.producers.get(key) for key in stage.reads}
        if upstream is None or (isinstance(upstream, dict) and None in upstream.values()
                                and not any(upstream.values())):
            return None
        return settings_hash(stage.name, stage.settings(self.recipe), upstream)

    def _produced(self, stage: Stage, key: str | None) -> None:
        for name in stage.writes:
            self.producers[name] = key

    def cached(self, stage: Stage, key: str | None) -> dict[str, Any] | None:
        marker = self.run_dir / stage.dirname / STAGE_FILE
        if key is None or not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("key") == key else None

    # ------------------------------------------------------------ running
    def plan(self) -> list[dict[str, str]]:
        """What each stage would do, reading no weights (the source is hashed only if it changed)."""
        rows, source_key = [], self.source_hash(read=False)
        plan = cached_plan(self.run_dir, plan_key(self.size_base, source_key)) if self.size_plan else None
        if plan is not None:
            self.apply_size_choice(plan["choice"]["kind"], plan["choice"]["quant"], plan["choice"]["layers_removed"])
        for stage in STAGES:
            if not stage.enabled(self.recipe):
                rows.append({"stage": stage.name, "status": "skipped (no recipe section)"})
                continue
            key = self.stage_key(stage, source_key)
            self._produced(stage, key)
            missing = missing_hooks(stage)
            if missing:
                status = f"not available (no installed plugin implements {', '.join(missing)})"
            elif self.cached(stage, key):
                status = "cached"
            elif key is None and stage.name == "source":
                status = "will run (source not hashed yet)"
            else:
                status = "will run"
            rows.append({"stage": stage.name, "dir": str(self.run_dir / stage.dirname), "status": status})
        if self.size_plan:  # measured after the source stage
            assumed = "no cut" if self.recipe.prune is None else f"a cut of {self.recipe.prune.remove}"
            rows.insert(1, {"stage": "size plan", "dir": str(self.run_dir / PLAN_FILE),
                            "status": f"cached: {plan['choice']['label']}" if plan else
                            f"will measure {len(self.size_plan)} candidates (the stages below assume {assumed} "
                            "until then)"})
        return rows

    def execute(self) -> dict[str, Any]:
        source_key = self.source_hash()  # bad sources fail here, before anything is written
        if self.main:
            claim_output_dir(self.run_dir, "--out")
            clean_journal(self.run_dir)  # what killed runs left behind (only what their journal records)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            enabled = [s for s in STAGES if s.enabled(self.recipe)]  # the size plan may drop prune and heal
            if stage not in enabled:
                self.lock["stages"][stage.name] = {"status": "skipped", "reason": "no recipe section"}
                continue
            key = self.stage_key(stage, source_key)
            label = f"[{enabled.index(stage) + 1}/{len(enabled)}] {stage.name}"
            position = STAGE_NAMES.index(stage.name)
            if self.first and position < STAGE_NAMES.index(self.first):
                self._reuse(stage, key, label)
            elif self.last and position > STAGE_NAMES.index(self.last):
                self.lock["stages"][stage.name] = {"status": "skipped", "reason": f"--until {self.last}"}
                continue
            else:
                self._run_stage(stage, key, label, rerun=stage.name == self.first)
            if stage.name == "source" and self.size_plan and self.last != "source":
                self.settle_size_plan(source_key)
            self._write_lock()
        self.lock["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_lock()
        return self.lock

    def _reuse(self, stage: Stage, key: str, label: str) -> None:
        """A stage before ``--from``: its finished output must be there, with the current key."""
        record = self.cached(stage, key)
        if record is None:
            raise UserError(f"--from {self.first}: the {stage.name} stage has no finished output for this recipe "
                            f"in {self.run_dir}; run without --from first (or --from {stage.name})")
        self.console.print(f"{label}: cached, reused for --from {self.first}")
        self._accept(stage, key, {**record, "status": "cached"})

    def _run_stage(self, stage: Stage, key: str, label: str, rerun: bool = False) -> None:
        record = None if rerun else self.cached(stage, key)
        if record is not None:
            self.console.print(f"{label}: cached, skipped (finished earlier in {record.get('seconds', 0):.1f}s)")
            self._accept(stage, key, {**record, "status": "cached"})
            return
        missing = missing_hooks(stage)
        if missing:
            self._not_available(stage, label, f"no installed plugin implements {', '.join(missing)}")
            return
        if not self.main:
            self._run_stage_helping(stage)
            return
        final = self.run_dir / stage.dirname
        work = self.run_dir / f".{stage.dirname}.work"  # kept across failed attempts (checkpoints)
        self.console.print(f"{label} ...")
        started = time.perf_counter()
        try:
            with atomic_path(final, is_dir=True) as tmp:
                claim_output_dir(work, "the stage's work folder")
                ctx = StageContext(stage=stage.name, recipe=self.recipe, run_dir=self.run_dir, out_dir=tmp,
                                   work_dir=work, options=self.options, console=self.console,
                                   section=stage.section,
                                   inputs={k: self.inputs[k] for k in stage.reads if k in self.inputs})
                outputs = get_plugin_manager().hook.run_stage(ctx=ctx) or {}
                _check_writes(stage, outputs)
                record = {"key": key, "status": "done", "seconds": round(time.perf_counter() - started, 2),
                          "outputs": _relocate(outputs, tmp, final), "metrics": _relocate(ctx.metrics, tmp, final)}
                write_json(tmp / STAGE_FILE, record)
        except NotAvailable as exc:
            remove_made(work)
            self._not_available(stage, label, str(exc))
            return
        except CompressError as exc:
            self.lock["stages"][stage.name] = {"status": "failed", "error": str(exc)}
            self._write_lock()
            raise
        remove_made(work)
        self.console.print(f"{label}: done in {record['seconds']:.1f}s")
        self._accept(stage, key, record)

    def _run_stage_helping(self, stage: Stage) -> None:
        """A rank > 0 of a launcher: run the stage's hook (the heal's collectives need every process)
        with a private scratch output, and write nothing in the run directory."""
        with tempfile.TemporaryDirectory(prefix=f"ollama-compress-rank-{stage.name}-") as scratch:
            ctx = StageContext(stage=stage.name, recipe=self.recipe, run_dir=self.run_dir, out_dir=Path(scratch),
                               work_dir=Path(scratch), options=self.options, console=self.console,
                               section=stage.section,
                               inputs={k: self.inputs[k] for k in stage.reads if k in self.inputs})
            get_plugin_manager().hook.run_stage(ctx=ctx)

    def _accept(self, stage: Stage, key: str, record: dict[str, Any]) -> None:
        self.inputs.update(record.get("outputs", {}))
        self._produced(stage, key)
        self.lock["stages"][stage.name] = record

    def _not_available(self, stage: Stage, label: str, reason: str) -> None:
        self.console.print(f"[yellow]{label}: not available ({reason}); continuing without it[/yellow]")
        self.lock["stages"][stage.name] = {"status": "not available", "reason": reason}

    def _write_lock(self) -> None:
        if self.main:
            write_json(self.run_dir / "run.json", self.lock)


def _check_writes(stage: Stage, outputs: dict[str, Any]) -> None:
    unknown = sorted(set(outputs) - set(stage.writes))
    if unknown:
        raise StageFailed(f"the {stage.name} stage returned {', '.join(unknown)}, which it does not declare "
                          f"(it writes {', '.join(stage.writes)}); fix the plugin that ran it")


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def load_lock(path: Path) -> dict[str, Any]:
    """A run's ``run.json``, checked to be one."""
    try:
        lock = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the lock {path}: {exc}; give a run.json written by 'ollama-compress run'") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("recipe"), dict):
        raise UserError(f"{path} is not a run lock (no 'recipe'); give a run.json written by 'ollama-compress run'")
    return lock


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def locked_source_sha256(lock: dict[str, Any], path: Path | None = None) -> str:
    """The source model's sha256 a lock records; a UserError when it records none (it can't be reproduced)."""
    inputs = lock.get("inputs")
    source = inputs.get("source") if isinstance(inputs, dict) else None
    sha = source.get("sha256") if isinstance(source, dict) else None
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise UserError(f"{path or 'the lock'} records no sha256 of the source model, so a rerun could not be checked "
                        "against it; run the recipe file instead (ollama-compress run RECIPE.yaml)")
    return sha


def lock_differences(lock: dict[str, Any], run: "Run") -> list[str]:
    """What differs between a lock and this machine: the source's sha256 and package versions."""
    found = []
    locked_versions = lock.get("versions", {})
    for name, version in package_versions().items():
        if name in locked_versions and locked_versions[name] != version:
            found.append(f"{name} {locked_versions[name]} in the lock, {version} here")
    locked_sha = locked_source_sha256(lock)
    if run.source_hash() != locked_sha:
        found.append(f"the source model's sha256 is {run.lock['inputs']['source']['sha256'][:12]}..., "
                     f"the lock has {locked_sha[:12]}...")
    return found


def _recipe_from_lock(path: Path, overrides: list[str]) -> Recipe:
    lock = load_lock(path)
    locked_source_sha256(lock, path)  # even with --force: a lock that names no source can't be reproduced
    data = lock["recipe"]
    version = data.get("recipe_version")
    if isinstance(version, int) and version > max(SUPPORTED_RECIPE_VERSIONS):
        raise UserError(f"{path} was written for recipe version {version}; this ollama-compress reads "
                        f"{', '.join(map(str, SUPPORTED_RECIPE_VERSIONS))}: upgrade ollama-compress")
    for item in overrides:
        apply_override(data, item)
    return validate(data, str(path))


def run(recipe: Recipe | str, *, overrides: list[str] = (), out: str | Path | None = None,
        options: RunOptions | None = None, dry_run: bool = False, console: Console | None = None,
        first: str | None = None, last: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run a recipe (a Recipe, a recipe file or shipped name, or a run's ``run.json`` to reproduce).

    ``first``/``last`` run only part of the stage table (``--from``/``--until``). Returns the lock
    (run.json contents), or the plan with ``dry_run``.
    """
    for flag, stage in (("--from", first), ("--until", last)):
        if stage is not None and stage not in STAGE_NAMES:
            raise UserError(f"{flag} {stage}: no such stage; stages: {', '.join(STAGE_NAMES)}")
    if first and last and STAGE_NAMES.index(first) > STAGE_NAMES.index(last):
        raise UserError(f"--from {first} comes after --until {last}; stages run in this order: {', '.join(STAGE_NAMES)}")
    if launcher_world()[1] > 1 and not dry_run and (first, last) != ("heal", "heal"):
        raise UserError("under a multi-process launcher only the heal stage runs: add --from heal --until heal, "
                        "and run the other stages without the launcher")
    lock_path = Path(recipe) if isinstance(recipe, str) and recipe.endswith(".json") else None
    if lock_path is not None:
        recipe = _recipe_from_lock(lock_path, list(overrides))
        out = out or lock_path.parent
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        raise UserError("overrides apply to recipe files; edit the Recipe object instead")
    console = console or Console(stderr=True, quiet=launcher_world()[0] != 0)  # rank 0 speaks
    run_dir = Path(out) if out else default_run_dir(recipe)
    check_output_dir(run_dir, "--out")
    this = Run(recipe, run_dir, options or RunOptions(), console, first=first, last=last)
    this.resolve_target()
    if lock_path is not None and not force:
        differences = lock_differences(load_lock(lock_path), this)
        if differences:
            raise UserError(f"{lock_path} does not match this machine: {'; '.join(differences)}; "
                            "pass --force to run anyway")
    if dry_run:
        return {"run_dir": str(run_dir), "plan": this.plan(), "estimate": this.estimate()}
    return this.execute()
