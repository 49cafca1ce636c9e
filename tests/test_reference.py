"""The teacher reference: heal computes the teacher's held-out log-probabilities once into the run's
cache, evaluate reads them without running the teacher again, and both give one KL for one model:
heal's, which evaluate reads instead of measuring the pruned and healed models again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ollama_compress.context import StageContext
from ollama_compress.evaluation import evaluate_run, heldout_quality
from ollama_compress.hooks.heal import heal_model
from ollama_compress.hooks.prune import prune_dir
from ollama_compress.recipe import validate
from ollama_compress.options import RunOptions
from ollama_compress.reference import REFERENCE_DIR, HFModel, QualityMeter, known_figures, store_figures

HEAL_TEXT = "The quick brown fox jumps over the lazy dog while the farmer counts seven sheep in the field. " * 2


def test_heal_computes_the_reference_once_and_evaluate_measures_its_kl_the_same(tiny_model_dir, tmp_path):
    teacher = tiny_model_dir("llama", 6)
    run = tmp_path / "run"
    run.mkdir()
    student = prune_dir(teacher, run / "20-pruned", [2, 3])
    (tmp_path / "heal.txt").write_text(HEAL_TEXT)
    recipe = validate({
        "recipe_version": 1, "name": "reference", "source": {"model": str(teacher)},
        "data": {"calibration": {"samples": 2, "seq_len": 32},
                 "heldout": {"split": "heldout", "samples": 2, "seq_len": 32},
                 "heal": {"from": "text", "path": str(tmp_path / "heal.txt")}},
        "heal": {"steps": 4, "lr": 2e-3, "batch_size": 2, "seq_len": 32, "dtype": "float32", "checkpoint_every": 0},
        "evaluate": {"knowledge": False, "speed": False, "prompts": ["Hi."], "max_new_tokens": 2}})
    heal_ctx = StageContext(stage="heal", recipe=recipe, run_dir=run, out_dir=run / "30-healed", section="heal",
                            inputs={"model_dir": str(student), "teacher_dir": str(teacher)})
    healed = run / "30-healed"
    result = heal_model(student, teacher, healed, recipe.heal, recipe.data, ctx=heal_ctx)

    [folder] = (run / "cache" / REFERENCE_DIR).iterdir()
    written = (folder / "teacher_logprobs.npy").stat()
    (run / "60-evaluate").mkdir()
    ctx = StageContext(stage="evaluate", recipe=recipe, run_dir=run, out_dir=run / "60-evaluate", section="evaluate",
                       inputs={"teacher_dir": str(teacher), "pruned_dir": str(student), "healed_dir": str(healed)})
    evaluate_run(ctx)

    assert list((run / "cache" / REFERENCE_DIR).iterdir()) == [folder]
    read = (folder / "teacher_logprobs.npy").stat()
    assert (read.st_ino, read.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # not computed again
    rows = {r["name"]: r for r in ctx.metrics["evaluation"]["rows"]}
    assert result["kl_after"] > 0
    assert rows["healed"]["kl"] == pytest.approx(result["kl_after"], abs=1e-4)
    assert rows["healed"]["top1_agreement"] == pytest.approx(result["top1_after"], abs=1e-9)
    assert rows["healed"]["perplexity"] == pytest.approx(result["ppl_after"], rel=1e-4)
    assert rows["teacher"]["perplexity"] == pytest.approx(result["ppl_teacher"], rel=1e-6)
    assert rows["pruned"]["kl"] == pytest.approx(result["kl_before"], abs=1e-4)
    assert json.loads((folder / "reference.json").read_text())["dtype"] == "float32"

    # heal's figures are those of the saved weights, measured afresh
    windows = json.loads((folder / "windows.json").read_text())
    teacher_lp = np.load(folder / "teacher_logprobs.npy")
    for model_dir in (student, healed):
        fresh = heldout_quality(HFModel(model_dir, RunOptions()), windows, teacher_lp)
        assert known_figures(folder, model_dir) == pytest.approx(fresh, rel=1e-4, abs=1e-5)

    # evaluate read them: the stored figure is what it reports, until the weights change
    store_figures(folder, healed, {"perplexity": 9.0, "kl": 1.25, "top1_agreement": 0.5})
    assert _evaluated(recipe, run, teacher, student, healed, "again")["healed"]["kl"] == 1.25
    (healed / "heal.json").write_text("{}")
    assert _evaluated(recipe, run, teacher, student, healed, "changed")["healed"]["kl"] == pytest.approx(
        rows["healed"]["kl"], abs=1e-4)


def _evaluated(recipe, run: Path, teacher: Path, student: Path, healed: Path, name: str) -> dict:
    out = run / name
    out.mkdir()
    ctx = StageContext(stage="evaluate", recipe=recipe, run_dir=run, out_dir=out, section="evaluate",
                       inputs={"teacher_dir": str(teacher), "pruned_dir": str(student), "healed_dir": str(healed)})
    evaluate_run(ctx)
    return {r["name"]: r for r in ctx.metrics["evaluation"]["rows"]}


def test_the_quality_meter_on_known_distributions():
    uniform = np.log(np.full((3, 4), 0.25, dtype=np.float32))
    peaked = np.log(np.array([[0.7, 0.1, 0.1, 0.1]] * 3, dtype=np.float32))
    meter = QualityMeter()
    meter.add(uniform, peaked, [0, 1, 2])
    figures = meter.result()
    assert figures["perplexity"] == pytest.approx(4.0, rel=1e-6)
    assert figures["kl"] == pytest.approx(0.7 * np.log(2.8) + 0.3 * np.log(0.4), rel=1e-5)  # KL(peaked || uniform)
    assert figures["top1_agreement"] == 1.0 and figures["tokens"] == 3
