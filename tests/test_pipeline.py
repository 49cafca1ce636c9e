"""The run pipeline on a tiny model: stage dirs, run.json lock, cache, not-available stages, dry run."""
from __future__ import annotations

import json

import pytest

from helpers import TINY_DATA, cli, write_recipe


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tiny_model_dir):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", tiny_model_dir("llama", 6), "tiny-run",
                        data=TINY_DATA, prune={"layers": [2, 3]}, heal={"steps": 1},
                        export={"outtype": "F32", "quants": ["Q8_0"]})


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    proc = cli("run", tiny_recipe, "--out", out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for stage in ("source", "prune", "heal", "export", "ollama"):
        assert stage in proc.stdout
    assert "will run" in proc.stdout and "cached" not in proc.stdout
    assert not out.exists()


def test_run_writes_stage_dirs_and_lock_then_reuses_the_cache(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    first = cli("run", tiny_recipe, "--out", out)
    assert first.returncode == 0, first.stderr
    lock = json.loads((out / "run.json").read_text())
    stages = lock["stages"]
    assert [stages[s]["status"] for s in ("source", "prune", "heal", "export")] == ["done"] * 4
    assert stages["importance"]["status"] == "skipped"  # layers were given: nothing to score
    assert lock["inputs"]["source"]["sha256"]
    assert lock["versions"]["torch"] and lock["versions"]["gguf"]
    layer_map = json.loads((out / "20-pruned" / "model" / "layer_map.json").read_text())
    assert layer_map["removed"] == [2, 3]
    ggufs = stages["export"]["outputs"]["gguf"]
    assert set(ggufs) == {"F32", "Q8_0"}
    for path in ggufs.values():
        assert path.startswith(str(out / "40-gguf")) and open(path, "rb").read(4) == b"GGUF"
    assert not [p for p in out.rglob(".*tmp-*")]
    for written in out.rglob("*"):  # no file names the temporary directory its stage ran in
        if written.is_file() and written.suffix in (".json", ".jsonl", ".md", "") and written.stat().st_size < 2**20:
            assert ".tmp-" not in written.read_text(errors="replace"), written

    second = cli("run", tiny_recipe, "--out", out)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("cached, skipped") == 4  # source, prune, heal, export

    third = cli("run", tiny_recipe, "--out", out, "--set", "prune.layers=[1]")
    assert third.returncode == 0, third.stderr
    assert "source: cached" in third.stderr
    assert "prune: done" in third.stderr and "heal: done" in third.stderr and "export: done" in third.stderr
    lock = json.loads((out / "run.json").read_text())
    assert lock["recipe"]["prune"]["layers"] == [1]


# ---------------------------------------------------------------- prune.target.size_mb: the measured size plan
@pytest.fixture(scope="module")
def scaled_model(tmp_path_factory, smollm2_tokenizer):
    """Factory: a tiny llama with scaled embeddings and matrices (see ``save_scaled_tiny_model``)."""
    from tiny_models import save_scaled_tiny_model

    def make(embed_scale: float, matrix_scale: float):
        out = tmp_path_factory.mktemp(f"scaled-{embed_scale}-{matrix_scale}")
        return save_scaled_tiny_model("llama", out, smollm2_tokenizer, embed_scale, matrix_scale)

    return make


def size_plan_recipe(path, model, target: dict, quants: list[str]):
    return write_recipe(path, model, "sized", data=TINY_DATA, prune={"target": target}, heal={"steps": 1},
                        export={"outtype": "F32", "quants": quants, "imatrix": None})


def test_quantize_only_wins_skips_prune_and_heal_and_exports_the_chosen_quant(tmp_path, scaled_model):
    """Quantization costs this model little and a cut much: the teacher's Q5_K_S beats cutting a
    layer for Q5_K_M (or Q4_K_M), and the run makes that file with no layer removed."""
    recipe = size_plan_recipe(tmp_path / "r.yaml", scaled_model(5, 8), {"size_mb": 5.24, "quant": "Q5_K_S"}, ["Q8_0"])
    out = tmp_path / "run"
    first = cli("run", recipe, "--out", out)
    assert first.returncode == 0, first.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert [c["label"] for c in plan["candidates"]] == ["teacher Q5_K_S", "teacher Q4_K_M", "1 layer cut + Q5_K_M"]
    assert plan["choice"]["label"] == "teacher Q5_K_S" and plan["choice"]["kind"] == "quantize only"
    cut = plan["candidates"][2]
    assert cut["before_heal"] and cut["kl"] > plan["choice"]["kl"] > 0 and len(cut["removed"]) == 1
    assert plan["calibration_windows"] == 2  # data.calibration's samples, never the held-out text
    assert " ".join(plan["sentence"].split()) in " ".join(first.stderr.split())
    assert plan["sentence"].startswith("quantize only: teacher Q5_K_S")

    lock = json.loads((out / "run.json").read_text())
    assert [lock["stages"][s]["status"] for s in ("importance", "prune", "heal")] == ["skipped"] * 3
    assert "prune" not in lock["recipe"] and "heal" not in lock["recipe"]
    assert lock["recipe"]["export"]["quants"] == ["Q5_K_S", "Q8_0"]  # target.quant was not listed: added
    assert lock["target"]["plan"] == "quantize only" and lock["plan"]["choice"]["quant"] == "Q5_K_S"
    ggufs = lock["stages"]["export"]["outputs"]["gguf"]
    assert set(ggufs) == {"F32", "Q5_K_S", "Q8_0"}
    teacher_files = json.loads(next((out / "cache" / "teacher-gguf").glob("*/files.json")).read_text())
    assert {"F32", "Q5_K_S", "Q4_K_M"} <= set(teacher_files)  # evaluate's cache, reused there
    assert not (out / ".plan.work").exists()

    again = cli("run", recipe, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "size plan: cached" in again.stderr and "making" not in again.stderr
    assert "export: cached" in again.stderr
    dry = cli("run", recipe, "--out", out, "--dry-run")
    assert "cached: teacher Q5_K_S" in dry.stdout
    report = cli("report", out)
    assert report.returncode == 0, report.stderr
    text = (out / "60-evaluate" / "report.md").read_text()
    assert "## Size plan" in text and "| **teacher Q5_K_S** | quantize only | Q5_K_S | 0 |" in text


def test_a_cut_that_wins_is_pruned_healed_and_exported_at_its_quant(tmp_path, scaled_model):
    """Quantizing this model's large embeddings costs much: one layer cut at Q5_K_S (more bits than
    the target's Q4_K_M) beats every teacher quant that fits."""
    recipe = size_plan_recipe(tmp_path / "r.yaml", scaled_model(25, 5), {"size_mb": 5.21, "quant": "Q4_K_M"},
                              ["Q4_K_M", "Q8_0"])
    out = tmp_path / "run"
    proc = cli("run", recipe, "--out", out)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["choice"]["label"] == "1 layer cut + Q5_K_S"
    assert min(c["kl"] for c in plan["candidates"] if c["kind"] == "quantize only") > plan["choice"]["kl"]
    assert "size plan: cut + quant: 1 layer cut + Q5_K_S" in " ".join(proc.stderr.split())
    lock = json.loads((out / "run.json").read_text())
    assert [lock["stages"][s]["status"] for s in ("prune", "heal", "export")] == ["done"] * 3
    chosen = next(c for c in plan["candidates"] if c["label"] == plan["choice"]["label"])
    assert lock["recipe"]["prune"]["layers"] == chosen["removed"] == plan["choice"]["removed"]
    assert lock["recipe"]["export"]["quants"] == ["Q5_K_S", "Q8_0"]
    # the prune stage cuts what the plan measured, without choosing again
    assert json.loads((out / "20-pruned" / "model" / "layer_map.json").read_text())["removed"] == chosen["removed"]
    assert proc.stderr.count("select: measured, scoring") == 1
    assert set(lock["stages"]["export"]["outputs"]["gguf"]) == {"F32", "Q5_K_S", "Q8_0"}
