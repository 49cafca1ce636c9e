"""Evaluate: every row against the teacher on the same held-out tokens, the hook merge, the
held-out overlap check, the command, and the optional lm-eval plugin (tiny models)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from helpers import assert_clean_error, cli, recipe_dict
from ollama_compress.context import StageContext
from ollama_compress.errors import UserError
from ollama_compress.evaluation import evaluate_run, knowledge_questions
from ollama_compress.recipe import validate

ROWS = ["teacher", "pruned", "healed", "healed F32", "healed Q8_0", "teacher Q8_0"]


def make_ctx(root: Path, teacher: Path, inputs: dict, evaluate: dict, data: dict | None = None) -> StageContext:
    recipe = validate(recipe_dict(teacher, "tiny-eval", evaluate=evaluate,
                                  data=data or {"calibration": {"samples": 2, "seq_len": 32},
                                                "heldout": {"split": "heldout", "samples": 2, "seq_len": 48}}))
    out = root / "60-evaluate"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage="evaluate", recipe=recipe, run_dir=root, out_dir=out, section="evaluate",
                        console=Console(stderr=True), inputs={"teacher_dir": str(teacher), **inputs})


def healed_stand_in(tiny_model_dir, pruned: Path, root: Path) -> Path:
    """A 4-layer tiny model standing in for the heal stage's output: weights, layer map, train log."""
    healed = root / "healed"
    shutil.copytree(tiny_model_dir("llama", 4, seed=1), healed)
    shutil.copy2(pruned / "layer_map.json", healed / "layer_map.json")
    log = [{"step": s, "loss": 2.0 / s, "kl": 1.5 / s, "hidden_mse": 0.5 / s} for s in range(1, 11)]
    (healed / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (healed / "heal.json").write_text(json.dumps({"kl_before": 0.9, "kl_after": 0.3, "steps": 10}))
    return healed


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    from ollama_compress.gguf import export_gguf
    from ollama_compress.hooks.prune import prune_dir
    from ollama_compress.hooks.quantize import measure_heldout_quants, quantize_file

    root = tmp_path_factory.mktemp("evaluate")
    teacher = tiny_model_dir("llama", 6)
    pruned = prune_dir(teacher, root / "pruned", [2, 3], metric="block_influence",
                       scores={"block_influence": [0.9, 0.8, 0.1, 0.2, 0.7, 0.95]})
    healed = healed_stand_in(tiny_model_dir, pruned, root)
    f32 = export_gguf(healed, root / "gguf" / "healed-F32.gguf", "F32")
    q8 = quantize_file(f32, "Q8_0", root / "gguf" / "healed-Q8_0.gguf")
    ctx = make_ctx(root, teacher, {"pruned_dir": str(pruned), "healed_dir": str(healed),
                                   "gguf": {"F32": str(f32), "Q8_0": str(q8)},
                                   "ollama_models": {"Q8_0": "tiny-eval:Q8_0"}},
                   {"max_new_tokens": 6, "teacher_quants": ["Q8_0"], "prompts": ["Name a colour.", "Count to three."]})
    measure_heldout_quants(ctx, f32, {"Q8_0": q8}, root / "gguf")  # the export stage's quants.json
    outputs = evaluate_run(ctx)
    rows = {r["name"]: r for r in ctx.metrics["evaluation"]["rows"]}
    return ctx, outputs, rows


def test_one_row_per_stage_and_quant_with_the_teacher_first(evaluated):
    ctx, outputs, rows = evaluated
    assert list(rows) == ROWS
    assert json.loads(Path(outputs["evaluation"]).read_text())["rows"][0]["name"] == "teacher"
    teacher = rows["teacher"]
    assert (teacher["kl"], teacher["top1_agreement"]) == (0.0, 1.0)
    assert teacher["quality_retained"] == pytest.approx(100.0)
    for name in ROWS[1:]:
        assert rows[name]["kl"] > 0, name
        assert rows[name]["quality_retained"] == pytest.approx(
            100 * teacher["perplexity"] / rows[name]["perplexity"])


def test_pytorch_and_llama_cpp_rows_measure_the_same_tokens(evaluated):
    _, _, rows = evaluated
    hf, gguf = rows["healed"], rows["healed F32"]  # the same weights in PyTorch and in llama.cpp
    assert gguf["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-3)
    assert gguf["kl"] == pytest.approx(hf["kl"], rel=1e-2, abs=1e-5)
    assert gguf["top1_agreement"] == pytest.approx(hf["top1_agreement"], abs=0.02)
    assert gguf["knowledge_accuracy"] == hf["knowledge_accuracy"]
    assert gguf["answers"][0] == hf["answers"][0]
    # the teacher's own Q8_0 is far closer to the teacher than a different model is
    assert rows["teacher Q8_0"]["kl"] < rows["healed Q8_0"]["kl"] / 10


def test_gguf_rows_have_llama_cpp_speed_and_sizes_are_the_files(evaluated):
    _, _, rows = evaluated
    for name in ("healed F32", "healed Q8_0", "teacher Q8_0"):
        assert rows[name]["prompt_tokens_per_s"] > 0 and rows[name]["gen_tokens_per_s"] > 0
        assert rows[name]["size_bytes"] == Path(rows[name]["path"]).stat().st_size
    assert "gen_tokens_per_s" not in rows["pruned"]
    assert rows["healed Q8_0"]["size_bytes"] < rows["healed F32"]["size_bytes"] / 2
    assert all(len(rows[n]["answers"]) == 2 for n in ROWS)


def test_the_same_file_gets_the_same_speed_and_kl_in_quants_json_and_evaluation_json(evaluated):
    _, outputs, _ = evaluated
    rows = {r["name"]: r for r in json.loads(Path(outputs["evaluation"]).read_text())["rows"]}
    for name in ("healed F32", "healed Q8_0", "teacher Q8_0"):  # the export's files and the teacher's own
        path = Path(rows[name]["path"])
        stored = {r["file"]: r for r in json.loads((path.parent / "quants.json").read_text())["quants"]}[path.name]
        for key in ("prompt_tokens_per_s", "gen_tokens_per_s", "load_average", "decode_seconds"):
            assert rows[name][key] == stored[key], (name, key)
        assert (rows[name]["kl"], rows[name]["perplexity"]) == (stored["mean_kl"], stored["perplexity"]), name
    assert 0 < rows["teacher Q8_0"]["kl"] < rows["healed F32"]["kl"]  # against the teacher, not the F32 file
    teacher_table = json.loads(Path(rows["teacher Q8_0"]["path"]).with_name("quants.json").read_text())["quants"]
    teacher_quants = {r["quant"] for r in rows.values() if r["model"] == "teacher" and r["kind"] == "gguf"}
    assert {r["name"] for r in teacher_table} == teacher_quants  # the teacher's own F16/F32 is no row: not measured


def test_the_quant_table_measures_against_evaluates_teacher_reference(evaluated):
    from ollama_compress.evaluation import LlamaModel, heldout_quality
    from ollama_compress.reference import heldout_reference

    ctx, _, rows = evaluated
    reference = heldout_reference(ctx)
    stored = {r["file"]: r for r in json.loads(Path(rows["healed Q8_0"]["path"]).with_name("quants.json")
                                               .read_text())["quants"]}
    assert {r["teacher_reference"] for r in stored.values()} == {reference.key}
    for name in ("healed F32", "healed Q8_0"):  # measured again here, not read from quants.json
        path = Path(rows[name]["path"])
        backend = LlamaModel(path, n_ctx=max(map(len, reference.windows)))
        try:
            quality = heldout_quality(backend, reference.windows, reference.logprobs())
        finally:
            backend.close()
        assert quality["kl"] == pytest.approx(stored[path.name]["mean_kl"], rel=1e-5, abs=1e-7), name


def test_a_compressed_quant_gets_a_verdict_against_the_teacher_quant_at_its_size(evaluated):
    ctx, outputs, rows = evaluated
    (verdict,) = ctx.metrics["evaluation"]["verdicts"]
    assert (verdict["name"], verdict["teacher_quant"]) == ("healed Q8_0", "Q8_0")
    assert (verdict["kl"], verdict["teacher_kl"]) == (rows["healed Q8_0"]["kl"], rows["teacher Q8_0"]["kl"])
    assert verdict["quality_paid"] is False  # a different random model loses to the teacher's own Q8_0
    assert verdict["decode_ratio"] > 0 and verdict["speed_paid"] == (verdict["decode_ratio"] > 1)
    assert verdict["sentence"].startswith(f"At {rows['healed Q8_0']['size_bytes'] / 2**20:.1f} MiB (healed Q8_0), "
                                          "pruning did not pay in quality: teacher Q8_0")
    assert f"- {verdict['sentence']}" in Path(outputs["report"]).read_text()


def test_the_numbers_go_to_run_json_metrics_and_the_report(evaluated):
    ctx, outputs, rows = evaluated
    assert ctx.metrics["evaluation"]["rows"][2]["name"] == "healed"
    figures = ctx.metrics["figures"]
    assert figures["heal_curve"]["train"]["loss"][0] == [1, 2.0]
    assert figures["heal_curve"]["heldout_kl"] == [[0, 0.9], [10, 0.3]]
    assert figures["importance"]["removed"] == [2, 3]
    report = Path(outputs["report"]).read_text()
    assert "| healed Q8_0 |" in report and "ollama run tiny-eval:Q8_0" in report
    for png in ("quality_vs_size.png", "speed_vs_size.png", "heal_curve.png", "importance_block_influence.png"):
        assert f"]({png})" in report
        assert (Path(outputs["report"]).parent / png).read_bytes()[:4] == b"\x89PNG"


def test_the_knowledge_set_ships_with_the_package():
    questions = knowledge_questions()
    assert 35 <= len(questions) <= 50
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        assert len(q["choices"]) == 4 and 0 <= q["answer"] < 4 and len(set(q["choices"])) == 4


def test_knowledge_sequences_take_outside_questions_in_the_shipped_format(tiny_model_dir):
    """bench/fact_check.py scores a set the project does not ship through the same function."""
    from ollama_compress import modelio
    from ollama_compress.evaluation import knowledge_sequences

    tokenizer = modelio.load_tokenizer(tiny_model_dir("llama", 2))
    outside = {"question": "Which metal is liquid at room temperature?", "choices": ["iron", "mercury"], "answer": 1}
    (context, choices, answer), = knowledge_sequences(tokenizer, [outside])
    assert tokenizer.decode(context).endswith("Question: Which metal is liquid at room temperature?\nAnswer:")
    assert [tokenizer.decode(c) for c in choices] == [" iron", " mercury"] and answer == 1
    assert len(knowledge_sequences(tokenizer)) == len(knowledge_questions())


OUTSIDE_TEXT = " ".join(f"Crate {i} left the dock at {i % 12 + 1} o'clock with {i * 7 % 13} sacks of grain." for i in range(400))


def fact_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fact_check", Path(__file__).parents[1] / "bench" / "fact_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outside_heldout_text_is_measured_against_the_teacher_and_shipped_text_is_refused(tmp_path, tiny_model_dir):
    """bench/fact_check.py's held-out text the project does not ship: the teacher's own weights
    under another name score KL 0, another model does not, and a shipped text is refused."""
    from ollama_compress import modelio
    from ollama_compress.hooks.data import default_texts
    from ollama_compress.recipe import TextSource

    fact_check = fact_check_module()
    teacher = tiny_model_dir("llama", 2)
    copy = shutil.copytree(teacher, tmp_path / "teacher-copy")
    figures = fact_check.heldout_figures(teacher, {"teacher": teacher, "copy": copy, "other": tiny_model_dir("llama", 3)},
                                         {"outside": OUTSIDE_TEXT}, tmp_path / "run")
    rows = figures["outside"]["models"]
    assert set(rows) == {"copy", "other"} and figures["outside"]["tokens"] == 16 * 255
    assert rows["copy"]["kl"] == pytest.approx(0, abs=1e-4) and rows["copy"]["perplexity_ratio"] == pytest.approx(1, abs=1e-3)
    assert rows["other"]["kl"] > 0.01 and rows["other"]["top1"] < 1
    tokenizer = modelio.load_tokenizer(teacher)
    with pytest.raises(UserError, match="shares text with the shipped heldout text"):
        fact_check.outside_windows(default_texts(TextSource(split="heldout"))[0], tokenizer,
                                   fact_check.shipped_streams(tokenizer))


def test_heldout_text_that_was_calibration_text_is_refused(tmp_path, tiny_model_dir):
    text = tmp_path / "same.txt"
    from ollama_compress.hooks.data import default_texts
    from ollama_compress.recipe import TextSource

    text.write_text(default_texts(TextSource())[0])
    ctx = make_ctx(tmp_path, tiny_model_dir("llama", 6), {}, {},
                   data={"calibration": {"from": "text", "path": str(text), "samples": 2, "seq_len": 32},
                         "heldout": {"from": "text", "path": str(text), "samples": 2, "seq_len": 32}})
    with pytest.raises(UserError, match="data.heldout shares text with data.calibration"):
        evaluate_run(ctx)
    assert not (tmp_path / "60-evaluate" / "evaluation.json").exists()


def test_every_plugins_result_is_merged_and_a_plugin_wins_on_a_shared_key(tmp_path, tiny_model_dir):
    from ollama_compress.hookspecs import hookimpl
    from ollama_compress.plugins import get_plugin_manager, register_plugin

    class Extra:
        @hookimpl
        def evaluate(self, ctx, model_path):
            return {"custom_metric": 1.5, "size_bytes": 7,
                    "seen_reference": Path(ctx.inputs["heldout_reference"]["teacher_logprobs"]).is_file()}

    teacher = tiny_model_dir("llama", 6)
    ctx = make_ctx(tmp_path, teacher, {}, {"knowledge": False, "speed": False, "max_new_tokens": 1,
                                           "prompts": ["Hi."]})
    register_plugin(Extra(), "extra-evaluator")
    try:
        evaluate_run(ctx)
    finally:
        get_plugin_manager().unregister(name="extra-evaluator")
    (row,) = ctx.metrics["evaluation"]["rows"]
    assert (row["custom_metric"], row["size_bytes"], row["seen_reference"]) == (1.5, 7, True)
    assert row["perplexity"] > 1 and row["kl"] == 0.0  # the built-in columns are still there


def test_the_command_measures_models_against_a_teacher(tmp_path, tiny_model_dir):
    teacher, other = tiny_model_dir("llama", 6), tiny_model_dir("llama", 4, seed=1)
    proc = cli("evaluate", other, "--teacher", teacher, "--no-knowledge", "--out", tmp_path / "ev", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    evaluation = json.loads(proc.stdout)
    assert [r["model"] for r in evaluation["rows"]] == ["teacher", other.name]
    assert evaluation["rows"][1]["kl"] > 0 and "knowledge_accuracy" not in evaluation["rows"][1]
    assert (tmp_path / "ev" / "report.md").is_file()


def test_the_command_refuses_bad_input_in_one_line(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama", 6)
    assert_clean_error(cli("evaluate", model), "--teacher")
    assert_clean_error(cli("evaluate", model, "--teacher", model, "--teacher-quant", "Q9"), "unknown quant 'Q9'")
    assert_clean_error(cli("evaluate", tmp_path / "missing.gguf", "--teacher", model), "does not exist")
    shipped = Path(__file__).parents[1] / "plugin" / "data" / "calibration.txt"
    assert_clean_error(cli("evaluate", model, "--teacher", model, "--heldout", shipped, "--out", tmp_path / "o"),
                       "shares text with data.calibration")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- lm-eval (optional extra)
LM_TASK = """\
task: oc_knowledge_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_a_local_jsonl_task_on_the_hf_rows(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    knowledge = Path(__file__).parents[1] / "plugin" / "data" / "knowledge.jsonl"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "knowledge.yaml").write_text(LM_TASK.format(path=knowledge))
    ctx = make_ctx(tmp_path, tiny_model_dir("llama", 6), {}, {
        "speed": False, "max_new_tokens": 1, "prompts": ["Hi."],
        "lm_eval": {"tasks": ["oc_knowledge_local"], "include_path": str(tasks)}})
    evaluate_run(ctx)
    (row,) = ctx.metrics["evaluation"]["rows"]
    # the same questions, the same prompt format, scored by lm-eval and by the built-in check
    assert row["lm_eval"]["oc_knowledge_local"]["acc"] == pytest.approx(row["knowledge_accuracy"])


def test_without_lm_eval_a_recipe_that_asks_for_it_gets_one_clear_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees
    ctx = make_ctx(tmp_path, tiny_model_dir("llama", 6), {}, {
        "knowledge": False, "speed": False, "max_new_tokens": 1, "prompts": ["Hi."],
        "lm_eval": {"tasks": ["arc_easy"]}})
    with pytest.raises(UserError) as err:
        evaluate_run(ctx)
    assert str(err.value).count("\n") == 0
    assert "lm-eval is not installed: pip install 'ollama-compress[lm-eval]'" in str(err.value)


# ---------------------------------------------------------------- worth it at equal size
def test_auto_picks_the_same_quant_and_the_teacher_quants_nearest_in_size(tiny_model_dir):
    from ollama_compress.evaluation import auto_teacher_quants
    from ollama_compress.planner import gguf_size, model_shape
    from ollama_compress.quant_names import NEEDS_IMATRIX, QUANT_TYPES, UNQUANTIZED

    teacher = model_shape(tiny_model_dir("llama", 6))

    def assert_nearest(picks: list[str], size: int, imatrix: bool) -> None:
        usable = [q for q in QUANT_TYPES if q not in UNQUANTIZED and (imatrix or q not in NEEDS_IMATRIX)]
        gap = {q: abs(gguf_size(teacher, q) - size) for q in usable}
        assert picks[0] == "Q4_K_M" and len(picks[1:]) == 3  # like for like, then the 3 nearest in size
        assert max(gap[q] for q in picks[1:]) <= min(gap[q] for q in usable if q not in picks[1:])

    # a compressed file exactly the size of the teacher's Q3_K_M estimate: Q3_K_M comes first
    size = gguf_size(teacher, "Q3_K_M")
    picks = auto_teacher_quants(teacher, {"pruned Q4_K_M": ("Q4_K_M", size)}, imatrix=False)
    assert list(picks) == ["pruned Q4_K_M"] and picks["pruned Q4_K_M"][:2] == ["Q4_K_M", "Q3_K_M"]
    assert_nearest(picks["pruned Q4_K_M"], size, imatrix=False)
    # at the size of the teacher's IQ2_XXS, the quants that need an importance matrix count only with one
    low = gguf_size(teacher, "IQ2_XXS")
    with_matrix = auto_teacher_quants(teacher, {"pruned Q4_K_M": ("Q4_K_M", low)}, imatrix=True)["pruned Q4_K_M"]
    without = auto_teacher_quants(teacher, {"pruned Q4_K_M": ("Q4_K_M", low)}, imatrix=False)["pruned Q4_K_M"]
    assert_nearest(with_matrix, low, imatrix=True)
    assert_nearest(without, low, imatrix=False)
    assert with_matrix[1] in NEEDS_IMATRIX and not set(without) & set(NEEDS_IMATRIX)


def test_auto_adds_smaller_teacher_quants_until_one_is_no_larger(tmp_path, tiny_model_dir, monkeypatch):
    from ollama_compress.evaluation import Candidate, TeacherQuants
    from ollama_compress.planner import gguf_size, model_shape
    from ollama_compress.quant_names import NEEDS_IMATRIX

    def gguf(name: str, size: int) -> Path:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"\0" * size)
        return path

    ctx = make_ctx(tmp_path, tiny_model_dir("llama", 6), {}, {"teacher_quants": "auto"})
    teacher_quants = TeacherQuants(ctx, tiny_model_dir("llama", 6), "F16")
    sizes = iter([1050, 990, 980])  # what llama.cpp writes for the next smaller types, in turn
    monkeypatch.setattr(teacher_quants, "make", lambda quants, taken: [
        Candidate(f"teacher {q}", gguf(q, next(sizes)), "teacher", q) for q in quants])
    rows = [Candidate("pruned Q4_K_M", gguf("pruned", 1000), "pruned", "Q4_K_M"),
            Candidate("teacher Q3_K_M", gguf("Q3_K_M", 1100), "teacher", "Q3_K_M")]
    added = teacher_quants.match_below(rows, imatrix=False)
    # smaller types of the table, one after the other, until one is no larger than the pruned file
    shape = model_shape(tiny_model_dir("llama", 6))
    estimates = [gguf_size(shape, q) for q in ("Q3_K_M", *(c.quant for c in added))]
    assert len(added) == 2 and estimates == sorted(estimates, reverse=True) and len(set(estimates)) == 3
    assert not {c.quant for c in added} & set(NEEDS_IMATRIX)
    assert teacher_quants.match_below([*rows, *added], imatrix=False) == []


def _gguf_row(name: str, mib: float, kl: float, gen: float | None = None) -> dict:
    model = "teacher" if name.startswith("teacher") else "pruned"
    return {"name": name, "model": model, "quant": name.split()[-1], "kind": "gguf", "path": f"/{name}.gguf",
            "size_bytes": int(mib * 2**20), "kl": kl, "gen_tokens_per_s": gen,
            "quality_retained": 100 - 100 * kl}


def test_the_frontier_runs_across_teacher_quants_and_compressed_quants():
    from ollama_compress.report import frontier

    rows = [_gguf_row("teacher Q2_K", 84.1, 0.403, 40.0), _gguf_row("teacher IQ3_XXS", 84.5, 0.312, 35.0),
            _gguf_row("pruned Q4_K_M", 86.7, 0.466, 48.0), _gguf_row("teacher Q3_K_M", 89.2, 0.121, 39.0),
            _gguf_row("teacher Q4_K_M", 100.6, 0.08, 38.8),
            {"name": "teacher", "model": "teacher", "kind": "hf", "size_bytes": 500 * 2**20, "quality_retained": 100.0}]
    assert frontier(rows, "quality_retained") == ["teacher Q2_K", "teacher IQ3_XXS", "teacher Q3_K_M", "teacher Q4_K_M"]
    assert frontier(rows, "gen_tokens_per_s") == ["teacher Q2_K", "pruned Q4_K_M"]


def test_the_verdict_says_whether_pruning_paid_in_quality_and_in_speed():
    from ollama_compress.evaluation import equal_size_verdicts, verdict_sentence

    rows = [_gguf_row("teacher Q2_K", 84.1, 0.403), _gguf_row("teacher IQ3_XXS", 84.5, 0.312),
            _gguf_row("teacher Q3_K_M", 89.2, 0.121), _gguf_row("pruned Q4_K_M", 86.7, 0.466),
            _gguf_row("pruned Q2_K", 60.0, 0.30)]
    lost, won = equal_size_verdicts(rows, tokens=None)
    # the best teacher quant no larger than the pruned file: IQ3_XXS, not the larger Q3_K_M
    assert (lost["teacher_quant"], lost["quality_paid"]) == ("IQ3_XXS", False)
    assert lost["sentence"] == ("At 86.7 MiB (pruned Q4_K_M), pruning did not pay in quality: teacher IQ3_XXS "
                                "(84.5 MiB) has KL 0.312 vs 0.466; decode speed was not measured.")
    # smaller than every teacher quant: judged against the nearest in size
    assert (won["teacher_quant"], won["quality_paid"]) == ("Q2_K", True)
    assert won["sentence"].startswith("At 60.0 MiB (pruned Q2_K), pruning paid in quality: teacher Q2_K (84.1 MiB) "
                                      "has KL 0.403 vs 0.3;")
    faster = {**lost, "decode_ratio": 1.21, "speed_paid": True, "load_average": [1.9, 2.1]}
    assert verdict_sentence(faster).endswith("; it paid in speed: 1.21x the teacher quant's decode tokens/s "
                                             "(interleaved runs, load average 1.9).")
    slower = {**lost, "decode_ratio": 0.8, "speed_paid": False, "load_average": [0.5, 0.6]}
    assert "; it did not pay in speed: 0.80x" in verdict_sentence(slower)


def test_the_speed_ratio_compares_two_files_round_by_round():
    from ollama_compress.hooks.quantize import speed_ratio

    # a busy second round slows both files alike; the per-round ratio stays 1.25
    pruned = {"decode_seconds": [0.8, 1.6, 0.8]}
    teacher = {"decode_seconds": [1.0, 2.0, 1.0]}
    assert speed_ratio(pruned, teacher) == pytest.approx(1.25)
    assert speed_ratio(teacher, pruned) == pytest.approx(0.8)


def test_llama_cpp_scores_each_knowledge_choice_as_a_fresh_evaluation_does(tmp_path, tiny_model_dir):
    """The context is evaluated once and each choice continues from its cache: the same
    log-likelihoods as evaluating context + choice from scratch."""
    from ollama_compress.evaluation import LlamaModel, _choice_sum, knowledge_sequences
    from ollama_compress.gguf import export_gguf
    from ollama_compress.modelio import load_tokenizer

    teacher = tiny_model_dir("llama", 6)
    gguf = export_gguf(teacher, tmp_path / "tiny-F32.gguf", "F32")
    model = LlamaModel(gguf, n_ctx=128)
    try:
        for context, choices, _ in knowledge_sequences(load_tokenizer(teacher))[:6]:
            fresh = [_choice_sum(model.log_probs(context + c), len(context) - 1, c) for c in choices]
            assert model.choice_log_likelihoods(context, choices) == pytest.approx(fresh, rel=1e-4, abs=1e-4)
    finally:
        model.close()


def test_pytorch_scores_each_knowledge_choice_as_a_fresh_evaluation_does(tiny_model_dir, arch):
    """PyTorch too runs the context once and the choices from its cache, in one batch: the same
    log-likelihoods as running context + choice from scratch, on every architecture."""
    from ollama_compress.evaluation import _choice_sum, knowledge_sequences
    from ollama_compress.modelio import load_tokenizer
    from ollama_compress.options import RunOptions
    from ollama_compress.reference import HFModel

    teacher = tiny_model_dir(arch, 4)
    model = HFModel(teacher, RunOptions())
    for context, choices, _ in knowledge_sequences(load_tokenizer(teacher))[:4]:
        assert len({len(c) for c in choices}) > 1 or len(choices) > 1
        fresh = [_choice_sum(model.log_probs(context + c), len(context) - 1, c) for c in choices]
        assert model.choice_log_likelihoods(context, choices) == pytest.approx(fresh, rel=1e-4, abs=1e-4)


def test_pytorch_greedy_answers_in_one_batch_equal_one_at_a_time(tiny_model_dir):
    """Prompts of different lengths, left-padded into one batch, get the answers each gets alone."""
    from ollama_compress.options import RunOptions
    from ollama_compress.reference import HFModel

    model = HFModel(tiny_model_dir("llama", 4), RunOptions())
    prompts = [[1, 500, 600, 700, 800, 900], [1, 42], [1, 7000, 7001, 7002]]
    alone = [model.greedy_many([p], 12, {0})[0] for p in prompts]
    assert [len(a) for a in alone] == [12, 12, 12]
    assert model.greedy_many(prompts, 12, {0}) == alone
    stop = {alone[1][3]}  # an answer ends before its stop token
    assert model.greedy_many(prompts, 12, stop)[1] == alone[1][:alone[1].index(alone[1][3])]


def test_llama_cpp_log_probabilities_do_not_depend_on_the_thread_count(tmp_path, tiny_model_dir):
    """Quality passes use every free core (``LlamaScorer``'s default); the figures stay the same."""
    import numpy as np

    from ollama_compress.gguf import export_gguf
    from ollama_compress.hooks.quantize import LlamaScorer, quantize_file

    f32 = export_gguf(tiny_model_dir("llama", 6), tmp_path / "tiny-F32.gguf", "F32")
    window = list(range(1000, 1096))
    for path in (f32, quantize_file(f32, "Q4_K_M", tmp_path / "tiny-Q4_K_M.gguf")):
        one, two = (LlamaScorer(path, 96, threads=n) for n in (1, 2))
        try:
            assert np.array_equal(one.log_probs(window), two.log_probs(window))
        finally:
            one.close(), two.close()
