"""The built-in evaluator: the ``evaluate`` hook, and the ``evaluate`` and ``report`` commands.

The evaluate stage and ``ollama-compress evaluate`` both run ``ollama_compress.evaluation.evaluate_run``;
``ollama-compress report RUN_DIR`` rebuilds ``report.md`` from ``run.json`` and the stage files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console

from ollama_compress.cli import echo_json, make_options, run_options
from ollama_compress.context import StageContext
from ollama_compress.embedded import cache_dir
from ollama_compress.hooks.source import resolve_model_dir
from ollama_compress.options import RunOptions
from ollama_compress.errors import UserError
from ollama_compress.evaluation import evaluate_run, measure_model
from ollama_compress.fsutil import atomic_path, claim_output_dir
from ollama_compress.hookspecs import hookimpl
from ollama_compress.recipe import Data, Evaluate, Recipe, Source, TextSource, validate
from ollama_compress.report import read_json, read_run, run_plan, write_report

EVALUATE_DIR = "60-evaluate"


@hookimpl(trylast=True)
def evaluate(ctx: StageContext, model_path: Path) -> dict[str, Any]:
    return measure_model(ctx, Path(model_path))


# ---------------------------------------------------------------- the commands' inputs
def _run_context(run_dir: Path, out_dir: Path, options: RunOptions, console) -> StageContext:
    lock, inputs = read_run(run_dir)
    recipe = validate(lock["recipe"], str(run_dir / "run.json"))
    if "teacher_dir" not in inputs:
        raise UserError(f"{run_dir}: the run has no source model yet; run its recipe first")
    return StageContext(stage="evaluate", recipe=recipe, run_dir=run_dir, out_dir=out_dir, options=options,
                        console=console, section="evaluate", inputs=inputs)


def _models_context(teacher: str, heldout: Path | None, settings: Evaluate, out_dir: Path,
                    options: RunOptions, console) -> StageContext:
    held = TextSource.model_validate({"from": "text", "path": str(heldout), "split": "heldout", "samples": 16}
                                     if heldout else {"split": "heldout", "samples": 16})
    recipe = Recipe(recipe_version=1, name="evaluate", source=Source(model=teacher),
                    data=Data(heldout=held), evaluate=settings)
    teacher_dir = resolve_model_dir(teacher, options)

    return StageContext(stage="evaluate", recipe=recipe, run_dir=cache_dir() / "evaluate", out_dir=out_dir, options=options,
                        console=console, section="evaluate", inputs={"teacher_dir": str(teacher_dir)})


def _model_paths(models: tuple[str, ...], options: RunOptions) -> dict[str, Path]:
    """Row name -> GGUF file or HF directory for each MODEL argument."""
    out: dict[str, Path] = {}
    for spec in models:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserError(f"{spec} does not exist; give a .gguf file, an HF directory or a run directory")
            resolved = path
        else:
            resolved = resolve_model_dir(spec, options)
        name = path.stem if path.exists() else spec
        while name in out:
            name += "'"
        out[name] = resolved
    return out


def _command_settings(base: Evaluate, no_knowledge: bool, no_speed: bool, teacher_quants: tuple[str, ...]) -> Evaluate:
    fields = {**base.model_dump(by_alias=True), "knowledge": base.knowledge and not no_knowledge,
              "speed": base.speed and not no_speed,
              "teacher_quants": list(dict.fromkeys([*base.teacher_quants, *teacher_quants]))}
    try:
        return Evaluate.model_validate(fields)
    except ValidationError as exc:
        raise UserError(f"--teacher-quant: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command("evaluate")
    @click.argument("targets", nargs=-1, required=True)
    @click.option("--teacher", help="The original model to measure against (needed unless TARGET is a run directory).")
    @click.option("--heldout", type=click.Path(path_type=Path), help="UTF-8 text file to measure on (default: the shipped held-out text).")
    @click.option("--teacher-quant", "teacher_quants", multiple=True, help="Also quantize the teacher to this (repeatable); auto: the quants nearest each compressed file's size.")
    @click.option("--no-knowledge", is_flag=True, help="Skip the multiple-choice knowledge check.")
    @click.option("--no-speed", is_flag=True, help="Skip the llama.cpp tokens/s measurement.")
    @click.option("--threads", type=int, help="llama.cpp threads (default: half the cores).")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path),
                  help="Where evaluation.json and report.md go (default: RUN_DIR/60-evaluate, or ./evaluation).")
    @click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
    @run_options
    def evaluate_command(targets, teacher, heldout, teacher_quants, no_knowledge, no_speed, threads, out_dir,
                         as_json, **flags):
        """Measure RUN_DIR's stages and quants, or MODELs, against the teacher: perplexity, KL,
        top-1 agreement, knowledge check, greedy answers, size and llama.cpp tokens/s."""
        options = make_options(**flags)
        console = Console(stderr=True)
        run_dir = Path(targets[0])
        is_run = (run_dir / "run.json").is_file()
        if is_run and len(targets) > 1:
            raise UserError("give one run directory, or model paths with --teacher; not both")
        if not is_run and not teacher:
            raise UserError(f"{targets[0]} is not a run directory; to evaluate models, name the original with "
                            "--teacher MODEL")
        if heldout is not None and not heldout.is_file():
            raise UserError(f"--heldout {heldout} is not a file; give a UTF-8 text file")
        final = out_dir or (run_dir / EVALUATE_DIR if is_run else Path("evaluation"))
        if final.exists() or final.is_symlink():
            claim_output_dir(final, "--out")  # empty, or an earlier evaluation: replaced when done
        models = None if is_run else _model_paths(targets, options)
        with atomic_path(final, is_dir=True) as tmp:
            if is_run:
                ctx = _run_context(run_dir, tmp, options, console)
                if heldout is not None:
                    ctx.recipe.data.heldout = TextSource.model_validate(
                        {**ctx.recipe.data.heldout.model_dump(by_alias=True), "from": "text", "path": str(heldout)})
                base = ctx.recipe.evaluate or Evaluate()
            else:
                base = Evaluate()
                ctx = _models_context(teacher, heldout, base, tmp, options, console)
            ctx.recipe.evaluate = _command_settings(base, no_knowledge, no_speed, teacher_quants)
            evaluate_run(ctx, models=models, threads=threads)
            evaluation = ctx.metrics["evaluation"]
        if as_json:
            echo_json(evaluation)  # the table went to stderr
        else:
            click.echo(f"report: {final / 'report.md'}")

    @cli.command("report")
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for report.md (default: RUN_DIR/60-evaluate).")
    def report_command(run_dir: Path, out_dir: Path | None) -> None:
        """Rebuild report.md and its PNGs from RUN_DIR's run.json and stage files."""
        lock, inputs = read_run(run_dir)
        target = claim_output_dir(out_dir or run_dir / EVALUATE_DIR, "--out")
        evaluation = read_json(target / "evaluation.json") or read_json(run_dir / EVALUATE_DIR / "evaluation.json") \
            or ((lock["stages"].get("evaluate") or {}).get("metrics") or {}).get("evaluation")
        path, _ = write_report(target, lock["recipe"].get("name", run_dir.name), evaluation, inputs, run_plan(run_dir))
        click.echo(f"report: {path}")
