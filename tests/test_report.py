"""report.md: written by the evaluate stage at the end of a run and rebuilt by `report RUN_DIR`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY_DATA, assert_clean_error, cli, write_recipe
from ollama_compress.evaluation import QUALITY_RETAINED
from ollama_compress.report import write_report


def rows():
    base = {"kind": "gguf", "answers": ["Paris.", "Sleep."], "prompt_tokens_per_s": 900.0, "gen_tokens_per_s": 90.0}
    return [
        {"name": "teacher", "model": "teacher", "quant": None, "kind": "hf", "size_bytes": 540 * 2**20,
         "perplexity": 10.0, "kl": 0.0, "top1_agreement": 1.0, "knowledge_accuracy": 0.5,
         "quality_retained": 100.0, "answers": ["Paris is the capital.", "Sleep | rest."]},
        {**base, "name": "pruned Q4_K_M", "model": "pruned", "quant": "Q4_K_M", "size_bytes": 80 * 2**20,
         "perplexity": 12.5, "kl": 0.2, "top1_agreement": 0.8, "knowledge_accuracy": 0.4, "quality_retained": 80.0,
         "lm_eval": {"arc_easy": {"acc": 0.41}}},
        {**base, "name": "teacher Q4_K_M", "model": "teacher", "quant": "Q4_K_M", "size_bytes": 100 * 2**20,
         "perplexity": 10.4, "kl": 0.03, "top1_agreement": 0.95, "knowledge_accuracy": 0.5,
         "quality_retained": 96.2, "gen_tokens_per_s": 70.0},
    ]


def test_report_has_every_section_and_marks_the_removed_layers(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"block_influence": [0.9, 0.1, 0.2, 0.8], "angular": [0.5, 0.2, 0.1, 0.6],
                                  "num_layers": 4}))
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "layer_map.json").write_text(json.dumps({"student_to_teacher": [0, 3], "removed": [1, 2],
                                                       "num_layers_before": 4, "num_layers_after": 2,
                                                       "metric": "block_influence"}))
    evaluation = {"rows": rows(), "prompts": ["Capital of France?", "Sleep tips?"], "heldout_tokens": 4080,
                  "heldout_windows": 16, "knowledge_questions": 40, "quality_retained": QUALITY_RETAINED}
    inputs = {"scores_file": str(scores), "pruned_dir": str(pruned),
              "ollama_models": {"Q4_K_M": "demo:Q4_K_M"}, "modelfiles": {"Q4_K_M": "/x/Modelfile.Q4_K_M"}}
    path, figures = write_report(tmp_path / "out", "demo", evaluation, inputs)
    report = path.read_text()
    assert "| pruned Q4_K_M | 80.0 | 12.500 | 0.2 | 80.0% | 40.0% | 80.0% | 900 | 90.0 |" in report
    assert "| teacher | 540.0 | 10.000 | 0 | 100.0% | 50.0% | 100.0% | - | - |" in report
    assert "quality retained = teacher perplexity / model perplexity" in report
    assert "| teacher | Sleep \\| rest. |" in report  # answers side by side, table-safe
    assert '"arc_easy"' in report  # a plugin's metric is shown
    assert "ollama run demo:Q4_K_M" in report and "| 1 | 3 |" in report  # Ollama names; the layer map
    assert "No heal in this run" in report
    assert figures["importance"]["removed"] == [1, 2]
    assert set(figures["importance"]["scores"]) == {"block_influence", "angular"}
    assert [p["name"] for p in figures["speed_vs_size"]["points"]] == ["pruned Q4_K_M", "teacher Q4_K_M"]
    for png in ("importance_block_influence.png", "importance_angular.png", "quality_vs_size.png",
                "speed_vs_size.png"):
        assert (path.parent / png).read_bytes()[:4] == b"\x89PNG"
    assert not (path.parent / "heal_curve.png").exists()


def test_a_run_without_evaluation_still_gets_a_report_that_says_how_to_add_one(tmp_path):
    path, figures = write_report(tmp_path, "bare", None, {})
    text = path.read_text()
    assert "No evaluation in this run" in text and "No Ollama models were registered" in text
    assert figures == {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("report-run")
    recipe = write_recipe(root / "tiny.yaml", tiny_model_dir("llama", 6), "tiny-report", data=TINY_DATA,
                          prune={"remove": 2, "report_metrics": ["angular"]},
                          export={"outtype": "F32", "quants": ["Q8_0"]},
                          evaluate={"knowledge": False, "max_new_tokens": 2, "prompts": ["Hi."]})
    proc = cli("run", recipe, "--out", root / "run")
    assert proc.returncode == 0, proc.stderr
    return root / "run", recipe


def test_a_run_ends_with_the_evaluate_stage_and_its_report(run_dir):
    out, recipe = run_dir
    lock = json.loads((out / "run.json").read_text())
    stage = lock["stages"]["evaluate"]
    assert stage["status"] == "done"
    names = [r["name"] for r in stage["metrics"]["evaluation"]["rows"]]
    assert names == ["teacher", "pruned", "pruned F32", "pruned Q8_0"]
    report = Path(stage["outputs"]["report"])
    assert report == out / "60-evaluate" / "report.md" and "| pruned Q8_0 |" in report.read_text()
    assert stage["metrics"]["figures"]["importance"]["removed"] == json.loads(
        (out / "20-pruned" / "model" / "layer_map.json").read_text())["removed"]
    again = cli("run", recipe, "--out", out)
    assert again.returncode == 0 and "evaluate: cached" in again.stderr


def test_the_report_command_rebuilds_report_md_from_the_run(run_dir):
    out, _ = run_dir
    report = out / "60-evaluate" / "report.md"
    before = report.read_text()
    report.unlink()
    (out / "60-evaluate" / "importance_angular.png").unlink()
    proc = cli("report", out)
    assert proc.returncode == 0, proc.stderr
    assert report.read_text() == before
    assert (out / "60-evaluate" / "importance_angular.png").is_file()


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    assert_clean_error(cli("report", tmp_path), "not a run directory")
