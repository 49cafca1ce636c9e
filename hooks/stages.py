"""The built-in stage runner: turns each pipeline stage into calls of the stage hooks.

One function per stage of ``ollama_compress.pipeline.STAGES``; each reads the ``ctx.inputs`` keys
its stage declares and returns the keys it writes. A plugin can replace a whole stage by
implementing ``run_stage`` and returning a result for it, or wrap every stage with a
``wrapper=True`` implementation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ollama_compress.context import StageContext
from ollama_compress.errors import StageFailed
from ollama_compress.evaluation import evaluate_run
from ollama_compress.hooks import quantize
from ollama_compress.hooks.data import HEAL_PLANNED_KEY
from ollama_compress.hooks.source import resolve_model_dir
from ollama_compress.hookspecs import hookimpl
from ollama_compress.ollama_server import ensure_server
from ollama_compress.pipeline import STAGE_NAMES
from ollama_compress.plugins import call_first
from ollama_compress.recipe import Export, Heal, Ollama
from ollama_compress.safe_read import read_json

STEPS: dict[str, Any] = {}


def step(name: str):
    """Register the built-in runner of stage ``name`` (a name of the stage table)."""
    assert name in STAGE_NAMES, name

    def add(fn):
        STEPS[name] = fn
        return fn

    return add


@step("source")
def _source(ctx: StageContext) -> dict[str, Any]:
    model_dir = call_first("load_source", ctx=ctx)
    return {"model_dir": str(model_dir), "teacher_dir": str(model_dir)}


@step("importance")
def _importance(ctx: StageContext) -> dict[str, Any]:
    scores = call_first("score_layers", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]))
    path = ctx.out_dir / "scores.json"
    if not path.exists():
        path.write_text(json.dumps(scores, indent=2))
    return {"scores_file": str(path)}


@step("prune")
def _prune(ctx: StageContext) -> dict[str, Any]:
    scores = {}
    if "scores_file" in ctx.inputs:
        raw = read_json(ctx.inputs["scores_file"], "scores", expect=dict)
        scores = {k: v for k, v in raw.items() if isinstance(v, list)}
    model_dir = call_first("prune_layers", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]), scores=scores)
    return {"model_dir": str(model_dir), "pruned_dir": str(model_dir)}


@step("heal")
def _heal(ctx: StageContext) -> dict[str, Any]:
    teacher = ctx.section_as(Heal).teacher
    teacher_dir = resolve_model_dir(teacher, ctx.options) if teacher else Path(ctx.inputs["teacher_dir"])
    model_dir = call_first("heal", ctx=ctx, student_dir=Path(ctx.inputs["model_dir"]), teacher_dir=teacher_dir)
    planned = {HEAL_PLANNED_KEY: ctx.metrics["planned_tokens"]} if "planned_tokens" in ctx.metrics else {}
    return {"model_dir": str(model_dir), "healed_dir": str(model_dir), **planned}


@step("export")
def _export(ctx: StageContext) -> dict[str, Any]:
    settings = ctx.section_as(Export)
    base = call_first("export_gguf", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]), outtype=settings.outtype)
    ggufs = {settings.outtype: str(base)}
    for quant in settings.quants:
        if quant != settings.outtype:
            ggufs[quant] = str(call_first("quantize_gguf", ctx=ctx, gguf_path=Path(base), quant=quant))
    _measure(ctx, Path(base), {q: Path(p) for q, p in ggufs.items() if q != settings.outtype})
    return {"gguf": ggufs}


def _measure(ctx: StageContext, reference: Path, quants: dict[str, Path]) -> None:
    """Per-quant size, bits per weight, and perplexity, KL and top-1 agreement against the run's
    teacher reference (llama.cpp logits), for the unquantized GGUF and each quant."""
    ctx.metrics["quants"] = quantize.measure_heldout_quants(ctx, reference, quants, ctx.out_dir)


@step("ollama")
def _ollama(ctx: StageContext) -> dict[str, Any]:
    settings = ctx.section_as(Ollama)
    name = settings.name or ctx.recipe.name
    ggufs = ctx.inputs.get("gguf")
    if not ggufs:
        raise StageFailed("the ollama stage needs GGUF files; add an 'export' section to the recipe")
    modelfiles = {
        quant: str(call_first("write_modelfile", ctx=ctx, gguf_path=Path(path), quant=quant,
                              model_dir=Path(ctx.inputs["model_dir"])))
        for quant, path in ggufs.items()
    }
    registered = {}
    if settings.register_:
        registered = _register_all(ctx, settings.host, name, modelfiles)
    return {"modelfiles": modelfiles, "ollama_models": registered}


def _register_all(ctx: StageContext, host: str | None, name: str, modelfiles: dict[str, str]) -> dict[str, str]:
    with ensure_server(host, log=ctx.log) as server:
        return {
            quant: call_first("create_ollama_model", ctx=ctx, modelfile=Path(path), name=name, host=server.host)
            for quant, path in modelfiles.items()
        }


@step("evaluate")
def _evaluate(ctx: StageContext) -> dict[str, Any]:
    return evaluate_run(ctx)


@hookimpl(trylast=True)
def run_stage(ctx: StageContext) -> dict[str, Any] | None:
    runner = STEPS.get(ctx.stage)
    return runner(ctx) if runner else None

