"""The run pipeline: fixed stage order, one run directory, a stage cache, and the lock (run.json).

Order: source -> importance -> prune -> heal -> export (GGUF + quants) -> ollama (Modelfiles,
register). Quantization comes last, after healing: quantizing before the fine-tune loses quality.
Each stage writes ``run_dir/NN-stage`` through a temporary directory renamed when it completes.
A stage's cache key hashes its settings with the key of the stage before it (the source stage
hashes the source itself), so a rerun skips finished stages and an edited setting reruns its stage
and everything after it.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from .context import RunOptions, StageContext
from .errors import CompressError, NotAvailable, UserError
from .fsutil import atomic_path, settings_hash, tree_sha256, write_json
from .plugins import get_plugin_manager
from .recipe import Recipe, load_recipe

STAGE_FILE = ".stage.json"
PACKAGES = ("ollama-compress", "torch", "transformers", "safetensors", "gguf", "llama-cpp-python",
            "ollama", "pluggy", "pydantic", "accelerate")


@dataclass(frozen=True)
class Stage:
    name: str
    dirname: str
    section: str  # recipe section that turns the stage on
    hooks: tuple[str, ...]  # stage hooks it needs

    def enabled(self, recipe: Recipe) -> bool:
        if self.name == "importance":
            return recipe.prune is not None and recipe.prune.layers is None
        return getattr(recipe, self.section) is not None


STAGES = (
    Stage("source", "00-source", "source", ("load_source",)),
    Stage("importance", "10-importance", "prune", ("score_layers",)),
    Stage("prune", "20-pruned", "prune", ("prune_layers",)),
    Stage("heal", "30-healed", "heal", ("heal",)),
    Stage("export", "40-gguf", "export", ("export_gguf", "quantize_gguf")),
    Stage("ollama", "50-ollama", "ollama", ("write_modelfile",)),
)


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

    def __init__(self, recipe: Recipe, run_dir: Path, options: RunOptions, console: Console):
        self.recipe, self.run_dir, self.options, self.console = recipe, Path(run_dir), options, console
        self.inputs: dict[str, Any] = {}
        self.lock: dict[str, Any] = {
            "recipe": recipe.model_dump(mode="json", by_alias=True, exclude_none=True),
            "versions": package_versions(),
            "inputs": {},
            "stages": {},
        }

    # ------------------------------------------------------------ keys
    def source_hash(self) -> str:
        from ollama_compress.hooks.source import check_gguf, resolve_source
        from ollama_compress.modelio import check_causal_lm, check_model_dir

        source = self.recipe.source
        path = resolve_source(source.model, self.options, source.revision)
        if path.is_dir() and source.gguf_file:
            path = path / source.gguf_file
        if path.is_file():
            check_gguf(path)
        else:
            check_causal_lm(check_model_dir(path, self.options))
        digest = tree_sha256(path)
        self.lock["inputs"]["source"] = {"path": str(path), "sha256": digest}
        return digest

    def stage_key(self, stage: Stage, previous_key: str) -> str:
        section = getattr(self.recipe, stage.section)
        settings = section.model_dump(mode="json", by_alias=True) if section is not None else None
        data = self.recipe.data.model_dump(mode="json", by_alias=True)
        return settings_hash(stage.name, settings, data, self.recipe.name, previous_key)

    def cached(self, stage: Stage, key: str) -> dict[str, Any] | None:
        marker = self.run_dir / stage.dirname / STAGE_FILE
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("key") == key else None

    # ------------------------------------------------------------ running
    def plan(self) -> list[dict[str, str]]:
        """What each stage would do, without loading any weights."""
        rows, key = [], self.source_hash()
        for stage in STAGES:
            if not stage.enabled(self.recipe):
                rows.append({"stage": stage.name, "status": "skipped (no recipe section)"})
                continue
            key = self.stage_key(stage, key)
            missing = missing_hooks(stage)
            if missing:
                status = f"not available (no installed plugin implements {', '.join(missing)})"
            elif self.cached(stage, key):
                status = "cached"
            else:
                status = "will run"
            rows.append({"stage": stage.name, "dir": str(self.run_dir / stage.dirname), "status": status})
        return rows

    def execute(self) -> dict[str, Any]:
        key = self.source_hash()  # bad sources fail here, before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        enabled = [s for s in STAGES if s.enabled(self.recipe)]
        for number, stage in enumerate(STAGES, 1):
            if stage not in enabled:
                self.lock["stages"][stage.name] = {"status": "skipped", "reason": "no recipe section"}
                continue
            key = self.stage_key(stage, key)
            label = f"[{enabled.index(stage) + 1}/{len(enabled)}] {stage.name}"
            self._run_stage(stage, key, label)
            self._write_lock()
        self.lock["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_lock()
        return self.lock

    def _run_stage(self, stage: Stage, key: str, label: str) -> None:
        record = self.cached(stage, key)
        if record is not None:
            self.console.print(f"{label}: cached, skipped (finished earlier in {record.get('seconds', 0):.1f}s)")
            self.inputs.update(record.get("outputs", {}))
            self.lock["stages"][stage.name] = {**record, "status": "cached"}
            return
        missing = missing_hooks(stage)
        if missing:
            self._not_available(stage, label, f"no installed plugin implements {', '.join(missing)}")
            return
        final = self.run_dir / stage.dirname
        started = time.perf_counter()
        try:
            with atomic_path(final, is_dir=True) as tmp:
                ctx = StageContext(stage=stage.name, recipe=self.recipe, run_dir=self.run_dir, out_dir=tmp,
                                   options=self.options, inputs=dict(self.inputs), console=self.console,
                                   section=stage.section)
                with self.console.status(f"{label} ..."):
                    outputs = get_plugin_manager().hook.run_stage(ctx=ctx) or {}
                outputs = _relocate(outputs, tmp, final)
                metrics = _relocate(ctx.metrics, tmp, final)
                record = {"key": key, "status": "done", "seconds": round(time.perf_counter() - started, 2),
                          "outputs": outputs, "metrics": metrics}
                write_json(tmp / STAGE_FILE, record)
        except NotAvailable as exc:
            self._not_available(stage, label, str(exc))
            return
        except CompressError as exc:
            self.lock["stages"][stage.name] = {"status": "failed", "error": str(exc)}
            self._write_lock()
            raise
        self.console.print(f"{label}: done in {record['seconds']:.1f}s")
        self.inputs.update(record["outputs"])
        self.lock["stages"][stage.name] = record

    def _not_available(self, stage: Stage, label: str, reason: str) -> None:
        self.console.print(f"[yellow]{label}: not available ({reason}); continuing without it[/yellow]")
        self.lock["stages"][stage.name] = {"status": "not available", "reason": reason}

    def _write_lock(self) -> None:
        write_json(self.run_dir / "run.json", self.lock)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def run(recipe: Recipe | str, *, overrides: list[str] = (), out: str | Path | None = None,
        options: RunOptions | None = None, dry_run: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run a recipe. Returns the lock (run.json contents), or the plan with ``dry_run``."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        raise UserError("overrides apply to recipe files; edit the Recipe object instead")
    console = console or Console(stderr=True)
    run_dir = Path(out) if out else default_run_dir(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file; choose another --out directory")
    this = Run(recipe, run_dir, options or RunOptions(), console)
    if dry_run:
        return {"run_dir": str(run_dir), "plan": this.plan()}
    return this.execute()

