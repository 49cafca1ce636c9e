"""The built-in stage runner: turns each pipeline stage into calls of the stage hooks.

A plugin can replace a whole stage by implementing ``run_stage`` and returning a result for it,
or wrap every stage with a ``wrapper=True`` implementation (as ``time_stage`` here does).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ollama_compress.context import StageContext
from ollama_compress.errors import StageFailed
from ollama_compress.hookspecs import hookimpl
from ollama_compress.plugins import call_first


def _source(ctx: StageContext) -> dict[str, Any]:
    model_dir = call_first("load_source", ctx=ctx)
    return {"model_dir": str(model_dir), "teacher_dir": str(model_dir)}


def _importance(ctx: StageContext) -> dict[str, Any]:
    scores = call_first("score_layers", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]))
    path = ctx.out_dir / "scores.json"
    if not path.exists():
        path.write_text(json.dumps(scores, indent=2))
    return {"scores_file": str(path)}


def _prune(ctx: StageContext) -> dict[str, Any]:
    scores = {}
    if "scores_file" in ctx.inputs:
        raw = json.loads(Path(ctx.inputs["scores_file"]).read_text())
        scores = {k: v for k, v in raw.items() if isinstance(v, list)}
    model_dir = call_first("prune_layers", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]), scores=scores)
    return {"model_dir": str(model_dir), "pruned_dir": str(model_dir)}


def _heal(ctx: StageContext) -> dict[str, Any]:
    teacher = Path(ctx.settings.teacher or ctx.inputs["teacher_dir"])
    model_dir = call_first("heal", ctx=ctx, student_dir=Path(ctx.inputs["model_dir"]), teacher_dir=teacher)
    return {"model_dir": str(model_dir)}


def _export(ctx: StageContext) -> dict[str, Any]:
    settings = ctx.settings
    base = call_first("export_gguf", ctx=ctx, model_dir=Path(ctx.inputs["model_dir"]), outtype=settings.outtype)
    ggufs = {settings.outtype: str(base)}
    for quant in settings.quants:
        if quant != settings.outtype:
            ggufs[quant] = str(call_first("quantize_gguf", ctx=ctx, gguf_path=Path(base), quant=quant))
    _measure(ctx, Path(base), {q: Path(p) for q, p in ggufs.items() if q != settings.outtype})
    return {"gguf": ggufs}


def _measure(ctx: StageContext, reference: Path, quants: dict[str, Path]) -> None:
    """Per-quant size, bits per weight, perplexity and KL to the unquantized GGUF (llama.cpp logits)."""
    from ollama_compress.hooks import quantize
    from ollama_compress.hooks.data import load_texts

    heldout = ctx.recipe.data.heldout
    texts = load_texts(heldout, ctx=ctx)
    n_ctx = max(8, min(heldout.seq_len, 2048))
    rows = quantize.measure_quants(reference, quants, texts, n_ctx=n_ctx, max_tokens=heldout.samples * heldout.seq_len)
    quantize.write_quants_report(rows, ctx.out_dir)
    ctx.metrics["quants"] = rows


def _ollama(ctx: StageContext) -> dict[str, Any]:
    settings = ctx.settings
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
        registered = _register_all(ctx, name, modelfiles)
    return {"modelfiles": modelfiles, "ollama_models": registered}


def _register_all(ctx: StageContext, name: str, modelfiles: dict[str, str]) -> dict[str, str]:
    from ollama_compress.ollama_server import ensure_server

    with ensure_server(ctx.settings.host) as server:
        if server.started:
            ctx.log(f"no Ollama server was running: started one at {server.host} for this run")
        ctx.inputs["ollama_host"] = server.host
        return {
            quant: call_first("create_ollama_model", ctx=ctx, modelfile=Path(path), name=name)
            for quant, path in modelfiles.items()
        }


DISPATCH = {
    "source": _source,
    "importance": _importance,
    "prune": _prune,
    "heal": _heal,
    "export": _export,
    "ollama": _ollama,
}


@hookimpl(trylast=True)
def run_stage(ctx: StageContext) -> dict[str, Any] | None:
    step = DISPATCH.get(ctx.stage)
    return step(ctx) if step else None


@hookimpl(specname="run_stage", wrapper=True)
def time_stage(ctx: StageContext):
    started = time.perf_counter()
    result = yield
    ctx.metrics.setdefault("seconds", round(time.perf_counter() - started, 2))
    return result

