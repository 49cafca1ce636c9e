"""``prune.target: {size_mb, quant}`` measured: "cut layers + quant" against "no cut, fewer bits".

``planner.size_candidates`` lists the candidates from the source's shape. Here each is made as a
real GGUF at its quant: the teacher's quants through ``evaluation.TeacherQuants`` (cached in
``RUN_DIR/cache/teacher-gguf``, where evaluate finds them later); a cut as the prune stage would
choose it (``hooks.prune.plan_and_prune``: the recipe's metric, ``select`` and ``repair``; an
iterative prune without heals between removals), exported and quantized through the
``export_gguf`` / ``quantize_gguf`` hooks. A file over ``size_mb`` is dropped. Each one's KL(teacher || file) is measured on ``planner.PLAN_WINDOWS`` calibration windows
(never the held-out text) against the teacher reference (``reference.teacher_reference``, summed by
``QualityMeter`` in ``quantize.measure_against_teacher``). A cut is measured before any heal, so its
KL is an upper bound. The lowest KL wins; ``plan.json`` in the run directory keeps every figure
and one sentence saying why.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .context import StageContext
from .errors import UserError
from .evaluation import TeacherQuants
from .fsutil import claim_output_dir, make_dir, remove_made, settings_hash, write_json
from .hooks.data import load_texts, text_windows
from .hooks.prune import plan_and_prune
from .hooks.quantize import measure_against_teacher, quantize_through_hook
from .modelio import load_tokenizer
from .planner import CUT_AND_QUANT, PLAN_WINDOWS, QUANTIZE_ONLY, SizeCandidate
from .plugins import call_first
from .recipe import Export, Recipe
from .reference import teacher_reference

PLAN_FILE = "plan.json"  # in the run directory
WORK_DIR = ".plan.work"  # the cuts' models and files while they are measured, removed after


def plan_key(recipe: Recipe, source_key: str | None) -> str | None:
    """What the plan reads: the prune section with its target, the calibration text, how GGUFs are
    made (outtype, imatrix), the dtype, and the source; None when the source is not hashed yet."""
    if source_key is None:
        return None
    export = recipe.export or Export()
    return settings_hash("size-plan", {"prune": recipe.prune.model_dump(mode="json"),
                                       "calibration": recipe.data.calibration.model_dump(mode="json", by_alias=True),
                                       "outtype": export.outtype, "imatrix": export.imatrix,
                                       "dtype": recipe.source.dtype}, source_key)


def cached_plan(run_dir: Path, key: str | None) -> dict[str, Any] | None:
    """``plan.json`` of ``run_dir`` when it was measured for ``key``."""
    try:
        plan = json.loads((Path(run_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return plan if key is not None and isinstance(plan, dict) and plan.get("key") == key else None


def calibration_windows(ctx: StageContext, teacher_dir: Path) -> list[list[int]]:
    """The first ``PLAN_WINDOWS`` windows of ``data.calibration`` (the windows the calibration itself
    starts with, BOS in front), tokenized by the teacher."""
    spec = ctx.recipe.data.calibration
    tokenizer = load_tokenizer(teacher_dir, ctx.options)
    texts = load_texts(spec, tokenizer, ctx, teacher_dir)
    return text_windows(texts, tokenizer, min(PLAN_WINDOWS, spec.samples), spec.seq_len, spec.seed)


def cut_export(ctx: StageContext, teacher_dir: Path, removed: int, work: Path, outtype: str) -> StageContext:
    """``removed`` layers cut as the prune stage would choose them (``plan_and_prune``: the recipe's
    metric, select and repair), exported to an unquantized GGUF through ``export_gguf``; returns the
    export context its quants are made in, with the GGUF's path in ``inputs["gguf"]`` and the layers
    removed (teacher indices) in ``inputs["removed"]``."""
    prune = ctx.recipe.prune.model_copy(update={"remove": removed, "target": None})
    folder = make_dir(work / f"cut-{removed}")
    ctx.log(f"size plan: choosing {removed} layers to cut as the prune stage would")
    pruned = plan_and_prune(teacher_dir, folder / "model", prune, calibration=ctx.recipe.data.calibration,
                            options=ctx.options, dtype=ctx.recipe.source.dtype, ctx=ctx, log=ctx.log)
    ctx.log(f"size plan: the cut of {removed} layers removes {pruned['removed']}")
    export = (ctx.recipe.export or Export()).model_copy(update={"outtype": outtype, "quants": []})
    cut_ctx = StageContext(stage="export", recipe=ctx.recipe.model_copy(update={"export": export}), run_dir=ctx.run_dir,
                           out_dir=make_dir(folder / "gguf"), options=ctx.options, console=ctx.console,
                           section="export", inputs={"model_dir": pruned["out"], "pruned_dir": pruned["out"],
                                                     "teacher_dir": str(teacher_dir), "removed": pruned["removed"]})
    cut_ctx.inputs["gguf"] = str(call_first("export_gguf", ctx=cut_ctx, model_dir=Path(pruned["out"]), outtype=outtype))
    return cut_ctx


def measure_size_plan(ctx: StageContext, teacher_dir: Path, candidates: list[SizeCandidate],
                      size_mb: float) -> dict[str, Any]:
    """Every candidate made and measured (see the module docstring), and the choice: plan.json's
    contents without its key."""
    teacher_dir = Path(teacher_dir)
    reference = teacher_reference(teacher_dir, calibration_windows(ctx, teacher_dir), options=ctx.options,
                                  run_dir=ctx.run_dir, log=ctx.log, text="calibration")
    outtype = (ctx.recipe.export or Export()).outtype
    teacher = TeacherQuants(ctx, teacher_dir, outtype)
    remove_made(Path(ctx.run_dir) / WORK_DIR)  # what an interrupted plan left
    work = claim_output_dir(Path(ctx.run_dir) / WORK_DIR, "the size plan's work folder")
    records, cuts = [], {}
    for candidate in candidates:
        ctx.log(f"size plan: making {candidate.label}")
        if candidate.kind == QUANTIZE_ONLY:
            path = teacher.make([candidate.quant], set())[0].path
        else:
            if candidate.removed not in cuts:
                cuts[candidate.removed] = cut_export(ctx, teacher_dir, candidate.removed, work, outtype)
            cut_ctx = cuts[candidate.removed]
            path = quantize_through_hook(cut_ctx, Path(cut_ctx.inputs["gguf"]), candidate.quant)
        records.append(candidate_record(candidate, path, reference, size_mb))
        if candidate.kind == CUT_AND_QUANT:
            records[-1]["removed"] = cut_ctx.inputs["removed"]
        ctx.log(f"size plan: {candidate.label}: {records[-1]['real_mib']} MiB, KL {records[-1]['kl']:.4g}")
    remove_made(work)
    choice = choose_plan(records)
    return {"target": {"size_mb": size_mb}, "calibration_windows": len(reference.windows),
            "calibration_tokens": reference.tokens, "teacher_reference": reference.key,
            "candidates": records, "choice": choice, "sentence": plan_sentence(choice, records)}


def candidate_record(candidate: SizeCandidate, path: Path, reference, size_mb: float) -> dict[str, Any]:
    """plan.json's row of one candidate: what it is, its estimated and real size, its KL to the
    teacher on the calibration windows; ``dropped`` says why when its file is over ``size_mb``."""
    (row,) = measure_against_teacher(reference, {candidate.label: Path(path)}, speed=False)
    record = {"kind": candidate.kind, "quant": candidate.quant, "layers_removed": candidate.removed,
              "label": candidate.label, "estimated_mib": round(candidate.estimated_bytes / 2**20, 1),
              "real_mib": round(row["size_bytes"] / 2**20, 1), "real_bytes": row["size_bytes"], "kl": row["mean_kl"],
              "top1_agreement": row["top1_agreement"]}
    if candidate.kind == CUT_AND_QUANT:
        record["before_heal"] = True  # the heal lowers it: an upper bound
    else:
        record["file"] = str(path)  # kept in the teacher-gguf cache (the cuts' files are removed)
    if row["size_bytes"] > size_mb * 2**20:
        record["dropped"] = f"the real file is {row['size_bytes'] / 2**20:.1f} MiB, over the {size_mb:g} MiB target"
    return record


def choose_plan(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest KL among those not dropped (fewer layers cut on a tie), with the
    layers a cut removes (``removed``, applied by the prune stage as they are); UserError when every
    one was dropped."""
    kept = [r for r in records if not r.get("dropped")]
    if not kept:
        raise UserError("prune.target: no candidate fits when made (" + "; ".join(
            f"{r['label']}: {r['dropped']}" for r in records) + "); choose a larger size_mb")
    best = min(kept, key=lambda r: (r["kl"], r["layers_removed"]))
    return {k: best[k] for k in ("kind", "quant", "layers_removed", "removed", "label", "real_mib", "kl") if k in best}


def _described(record: dict[str, Any]) -> str:
    heal = ", before the heal" if record["kind"] == CUT_AND_QUANT else ""
    return f"{record['label']} ({record['real_mib']:.1f} MiB{heal})"


def plan_sentence(choice: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """One sentence: which candidate won and against what, e.g. "quantize only: teacher IQ4_XS
    (86.7 MiB) has KL 0.122 on calibration text, against 0.54 for 6 layers cut + Q4_K_M (86.7 MiB,
    before the heal)"."""
    chosen = next(r for r in records if r["label"] == choice["label"])
    others = sorted((r for r in records if r is not chosen and not r.get("dropped")), key=lambda r: r["kl"])
    sentence = f"{choice['kind']}: {_described(chosen)} has KL {chosen['kl']:.3g} on calibration text"
    if others:
        sentence += ", against " + ", ".join(f"{r['kl']:.3g} for {_described(r)}" for r in others)
    dropped = [r for r in records if r.get("dropped")]
    if dropped:
        sentence += "; dropped: " + ", ".join(f"{r['label']} ({r['dropped']})" for r in dropped)
    return sentence


def write_plan(run_dir: Path, key: str, plan: dict[str, Any]) -> Path:
    """``plan.json`` in ``run_dir``, with the key it was measured for."""
    return write_json(Path(run_dir) / PLAN_FILE, {"key": key, **plan})
