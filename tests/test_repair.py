"""Linear repair of a cut (ollama_compress.repair) and prune.select: measured (hooks/prune.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from helpers import assert_clean_error, cli, recipe_dict, write_recipe
from ollama_compress import modelio, repair, trainer
from ollama_compress.errors import UserError
from ollama_compress.hooks import prune
from ollama_compress.recipe import Prune
from tiny_models import tiny_model

def _batches(n: int, seed: int, length: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 5000, (n, length), generator=gen).split(1))


def _mlp_output(model, layer: int, batch: torch.Tensor) -> torch.Tensor:
    """What the anchor adds to the residual stream: its MLP output (or, for Gemma, the post-MLP norm's)."""
    module, _ = repair._anchor_module(model.model.layers[layer])
    with modelio.capture_outputs({"x": module}) as out, torch.no_grad():
        model(input_ids=batch, use_cache=False)
    return out["x"].reshape(-1, out["x"].shape[-1]).double()


def _heldout_kl(student, teacher, seed: int = 99) -> float:
    windows = torch.cat(_batches(8, seed))
    vocab = teacher.get_output_embeddings().weight.shape[0]
    return trainer.heldout_metrics(student, teacher, windows, "cpu", vocab)["kl"]


def _pruned(teacher, removed: list[int], tensors: dict | None = None):
    student = copy.deepcopy(teacher)
    if tensors:
        repair.apply_tensors(student, tensors)
    return prune.prune_model(student, removed)


def _loud_span(model, layers: list[int], scale: float = 4.0):
    """Make ``layers`` matter: their attention and MLP outputs scaled up, so a plain cut of them hurts."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


# ---------------------------------------------------------------- the math
def test_the_fused_weights_reproduce_the_fitted_map_on_the_calibration_activations():
    model = tiny_model("llama", 6).double()
    batches = _batches(6, 0)
    tensors, fits = repair.repair(model, batches, [2, 3])
    (fit,) = fits
    assert (fit.start, fit.end, fit.anchor, fit.mode) == (2, 4, 1, "dense")
    assert fit.error_fit < fit.error_plain
    fused = copy.deepcopy(model)
    repair.apply_tensors(fused, tensors)
    assert set(tensors) == {"model.layers.1.mlp.down_proj.weight"}
    for batch in batches:
        x = _mlp_output(model, 1, batch)
        assert torch.allclose(_mlp_output(fused, 1, batch), x @ fit.map, rtol=1e-9, atol=1e-12)


def test_the_fit_solves_the_ridge_normal_equations():
    model = tiny_model("qwen2", 5).double()
    batches = _batches(4, 1)
    stats = repair.collect(model, batches, [(2, 4)])[(2, 4)]
    t = repair.solve(stats, "dense")
    lam = repair.RIDGE * float(torch.diagonal(stats.xtx).mean())
    eye = torch.eye(t.shape[0], dtype=torch.float64)
    assert torch.allclose((stats.xtx + lam * eye) @ t, stats.xty + lam * eye, atol=1e-8)
    # X and Y recomputed by hand from the layer outputs: Y = h_after_span - h_anchor + X
    xs, ys = [], []
    for batch in batches:
        with trainer.capture_layers(model, [1, 3]) as h, torch.no_grad():
            model(input_ids=batch, use_cache=False)
            hidden = dict(h)
        x = _mlp_output(model, 1, batch)
        xs.append(x)
        ys.append((hidden[3] - hidden[1]).reshape(x.shape).double() + x)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.allclose(stats.xtx, x.T @ x, atol=1e-8) and torch.allclose(stats.xty, x.T @ y, atol=1e-8)


def test_repair_lowers_held_out_kl_against_the_plain_cut():
    teacher = _loud_span(tiny_model("llama", 8, seed=3), [3, 4])
    tensors, fits = repair.repair(teacher, _batches(48, 0), [3, 4])
    assert fits[0].error_fit < 0.8 * fits[0].error_plain
    plain = _heldout_kl(_pruned(teacher, [3, 4]), teacher)
    repaired = _heldout_kl(_pruned(teacher, [3, 4], tensors), teacher)
    assert repaired < 0.9 * plain, (plain, repaired)


def test_gemma_post_norm_gets_a_diagonal_map_in_the_norm_scale():
    model = tiny_model("gemma2", 6).double()
    batches = _batches(6, 2)
    tensors, (fit,) = repair.repair(model, batches, [2, 3])
    assert fit.mode == "diagonal" and fit.map.shape == (64,)
    assert set(tensors) == {"model.layers.1.post_feedforward_layernorm.weight"}  # down_proj untouched
    fused = copy.deepcopy(model)
    repair.apply_tensors(fused, tensors)
    for batch in batches:
        x = _mlp_output(model, 1, batch)
        assert torch.allclose(_mlp_output(fused, 1, batch), x * fit.map, rtol=1e-5, atol=1e-6)  # gemma norms run in fp32
    assert "post_feedforward_layernorm" in repair.describe(fit)


def test_a_span_at_layer_0_stays_a_plain_cut_and_says_so():
    model = tiny_model("llama", 6)
    messages: list[str] = []
    tensors, (fit,) = repair.repair(model, _batches(2, 0), [0, 1], log=messages.append)
    assert tensors == {} and fit.skipped
    assert messages == ["repair of layers 0-1: skipped, starts at layer 0: no kept layer before it to carry the "
                        "map; left as a plain cut"]


# ---------------------------------------------------------------- on disk
def _text_source(path: Path):
    from ollama_compress.recipe import TextSource

    return TextSource.model_validate({"from": "text", "path": str(path), "samples": 8, "seq_len": 32})


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_repair_none_writes_todays_weights_bit_for_bit(tiny_model_dir, tmp_path, calibration_file):
    source = tiny_model_dir("llama", 6)
    spec = _text_source(calibration_file)
    prune.plan_and_prune(source, tmp_path / "none", Prune(layers=[2, 3], repair="none"), calibration=spec)
    prune.prune_dir(source, tmp_path / "plain", [2, 3])
    prune.plan_and_prune(source, tmp_path / "linear", Prune(layers=[2, 3], repair="linear"), calibration=spec)
    assert (tmp_path / "none" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    none, linear = _tensors(tmp_path / "none"), _tensors(tmp_path / "linear")
    changed = sorted(k for k in none if not torch.equal(none[k], linear[k]))
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_the_repaired_model_loads_in_stock_transformers_and_matches_the_fit(tiny_model_dir, tmp_path, calibration_file):
    from transformers import AutoModelForCausalLM

    from ollama_compress import modelio
    from ollama_compress.hooks.data import calibration_batches

    source = tiny_model_dir("llama", 6)
    spec = _text_source(calibration_file)
    out = tmp_path / "repaired"
    result = prune.plan_and_prune(source, out, Prune(layers=[2, 3], repair="linear"), calibration=spec)
    assert result["repair"]["method"] == "linear" and result["repair"]["spans"][0]["span"] == [2, 4]
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.num_hidden_layers == 4
    teacher = modelio.load_model(source)
    tensors, _ = repair.repair(teacher, calibration_batches(spec, modelio.load_tokenizer(source)), [2, 3])
    expected = _pruned(teacher, [2, 3], tensors)
    ids = _batches(1, 5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_replayed_prefix_skips_its_layers_and_gives_what_they_computed(arch):
    teacher = tiny_model(arch, 6)
    windows = _batches(3, 7)
    with modelio.recorded_outputs({2: teacher.model.layers[2]}) as recorded, torch.no_grad():
        expected = [teacher(input_ids=w, use_cache=False).logits for w in windows]
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in student.model.layers[:3]:  # were they run, the logits would change
            for weight in layer.parameters():
                weight.zero_()
    modelio.replay_prefix(student, 3, recorded[2])
    with torch.no_grad():
        for window, logits in zip(windows, expected):
            assert torch.equal(student(input_ids=window, use_cache=False).logits, logits)


@pytest.mark.parametrize("repaired", [True, False])
def test_measured_cuts_score_each_cut_as_a_whole_pruned_model_would(repaired):
    """The cuts after the first start from the teacher's recorded layers: each KL must be the one
    of the pruned (and repaired) model run whole."""
    teacher = _loud_span(tiny_model("llama", 8), [3, 4])
    batches = _batches(10, 3)
    cuts = {(1, 2): "span", (4, 5): "span", (2, 6): "pick", (5, 6): "span"}
    stats = repair.collect(teacher, batches, [s for cut in cuts for s in repair.spans_of(cut)]) if repaired else None
    windows = torch.cat(batches)[:prune.MEASURE_WINDOWS]
    measured = prune.measure_cuts(teacher, windows, cuts, stats, lambda message: None)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    for result in measured:
        removed = result["removed"]
        tensors = repair.fused_tensors(teacher, repair.fit_spans(teacher, stats, removed)) if repaired else None
        whole = trainer.heldout_metrics(_pruned(teacher, removed, tensors), teacher, windows, "cpu", vocab)["kl"]
        assert result["kl"] == pytest.approx(whole, rel=1e-5, abs=1e-7), removed
    assert len({round(r["kl"], 6) for r in measured}) == len(cuts)  # the cuts differ, so must their KLs


def test_measured_select_keeps_the_lowest_kl_cut_when_the_metric_picks_a_worse_one(tiny_model_dir, tmp_path,
                                                                                  calibration_file):
    from ollama_compress import modelio

    source = tmp_path / "loud"
    source.mkdir()
    model = _loud_span(modelio.load_model(tiny_model_dir("llama", 8, seed=4)), [3, 4], scale=6.0)
    modelio.save_model(model, modelio.load_tokenizer(tiny_model_dir("llama", 8, seed=4)), source)
    scores = {"block_influence": [1.0, 0.9, 0.8, 0.1, 0.1, 0.9, 0.9, 1.0]}  # the metric points at the loud pair
    messages: list[str] = []
    result = prune.plan_and_prune(source, tmp_path / "out", Prune(remove=2, select="measured", repair="linear"),
                                  scores=scores, calibration=_text_source(calibration_file), log=messages.append)
    select = result["select"]
    assert select["metric_pick"] == [3, 4]
    candidates = {tuple(c["removed"]): c for c in select["candidates"]}
    assert set(candidates) == {(s, s + 1) for s in range(1, 6)}  # every span avoiding layers 0 and 7
    assert "block_influence" in candidates[(3, 4)]["by"]
    # five candidates: all screened, the FINALISTS lowest scored on every window
    by_screen = sorted(candidates.values(), key=lambda c: c["screen_kl"])
    assert [("kl" in c) for c in by_screen] == [True] * prune.FINALISTS + [False] * (5 - prune.FINALISTS)
    best = min((c for c in candidates.values() if "kl" in c), key=lambda c: c["kl"])
    assert result["removed"] == best["removed"] == select["chosen"] != [3, 4]
    assert best["screen_kl"] < candidates[(3, 4)]["screen_kl"]
    assert sum(m.startswith("candidate ") for m in messages) == 5 + prune.FINALISTS


@pytest.mark.parametrize("count", [3, 6])
def test_screened_cuts_keep_the_finalists_kl_on_every_window(count):
    """With more cuts than FINALISTS, each is screened on SCREEN_WINDOWS windows and the lowest are
    scored again on all of them; with fewer, every cut is scored on all windows at once."""
    teacher = _loud_span(tiny_model("llama", 8), [3, 4])
    batches = _batches(10, 3)
    cuts = dict(list({(1, 2): "span", (2, 3): "span", (3, 4): "span", (4, 5): "span", (5, 6): "span",
                      (2, 6): "pick"}.items())[:count])
    stats = repair.collect(teacher, batches, [s for cut in cuts for s in repair.spans_of(cut)])
    scored = prune.score_cuts(teacher, batches, cuts, stats, lambda message: None)
    windows = torch.cat(batches)[:prune.MEASURE_WINDOWS]
    whole = {tuple(c["removed"]): c["kl"] for c in prune.measure_cuts(teacher, windows, cuts, stats, lambda m: None)}
    assert [tuple(c["removed"]) for c in scored] == list(cuts)
    if count <= prune.FINALISTS:
        assert all("screen_kl" not in c for c in scored)
        assert {tuple(c["removed"]): c["kl"] for c in scored} == pytest.approx(whole, rel=1e-6)
        return
    screen = {tuple(c["removed"]): c["kl"] for c in prune.measure_cuts(
        teacher, windows[:prune.SCREEN_WINDOWS], cuts, stats, lambda m: None)}
    assert {tuple(c["removed"]): c["screen_kl"] for c in scored} == pytest.approx(screen, rel=1e-6)
    finalists = sorted(screen, key=screen.get)[:prune.FINALISTS]
    assert {tuple(c["removed"]): c["kl"] for c in scored if "kl" in c} == pytest.approx(
        {cut: whole[cut] for cut in finalists}, rel=1e-6)


def test_auto_measures_small_models_and_refuses_measured_with_explicit_layers(tiny_model_dir):
    source = tiny_model_dir("llama", 6)
    assert prune.resolve_select("auto", source, 6, 2, {0, 5}, 1, None, explicit=False, iterative=False) == "measured"
    assert prune.resolve_select("auto", source, 6, 2, {0, 5}, 1, None, explicit=True, iterative=False) == "metric"
    with pytest.raises(UserError, match="select: measured chooses the layers itself"):
        prune.resolve_select("measured", source, 6, 2, {0, 5}, 1, None, explicit=True, iterative=False)


# ---------------------------------------------------------------- bad settings
def test_bad_repair_and_select_settings_are_one_line_exit_2(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama", 6)
    proc = cli("prune", source, "--remove", "2", "--repair", "cubic", "--out", tmp_path / "a")
    assert_clean_error(proc, "--repair: Input should be 'linear' or 'none'")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("prune", source, "--layers", "2,3", "--select", "measured", "--out", tmp_path / "b")
    assert_clean_error(proc, "select: measured chooses the layers itself")
    proc = cli("validate", write_recipe(tmp_path / "r.yaml", source, "t", prune={"remove": 2, "repair": "cubic"}))
    assert proc.returncode == 2 and "prune.repair" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- dry run and report
def test_dry_run_estimates_the_measured_select_cost(tiny_model_dir):
    from ollama_compress import pipeline
    from ollama_compress.planner import FINALISTS, MEASURE_WINDOWS, SCREEN_WINDOWS, model_shape
    from ollama_compress.recipe import validate

    source = tiny_model_dir("llama", 6)
    recipe = validate(recipe_dict(source, "t", data={"calibration": {"samples": 16, "seq_len": 64}},
                                  prune={"remove": 2, "report_metrics": ["angular"]}))
    cost = pipeline.run(recipe, dry_run=True)["estimate"]["select_measured"]
    assert cost["candidates"] == 3 + 2  # spans starting at 1, 2, 3 plus block_influence's and angular's picks
    # five candidates: each on the SCREEN_WINDOWS, the FINALISTS again on all MEASURE_WINDOWS; the
    # teacher on both sets of windows
    teacher_windows = SCREEN_WINDOWS + MEASURE_WINDOWS
    assert cost["forward_passes"] == 16 + teacher_windows + 5 * SCREEN_WINDOWS + FINALISTS * MEASURE_WINDOWS
    shape = model_shape(source)
    scored = shape.params(2) + shape.params(3) + shape.params(4) + 2 * shape.params(2)  # spans replay 0, 1, 2 layers
    assert cost["flops"] == pytest.approx(2 * shape.params() * (16 + teacher_windows) * 64
                                          + 2 * scored * (SCREEN_WINDOWS + FINALISTS / 5 * MEASURE_WINDOWS) * 64)
    layers_given = validate(recipe_dict(source, "t", prune={"layers": [2, 3]}))
    assert "select_measured" not in pipeline.run(layers_given, dry_run=True)["estimate"]


def test_the_report_lists_the_measured_candidates_lowest_kl_first():
    from ollama_compress.report import candidate_lines

    layer_map = {"select": {"repair": "linear", "chosen": [2, 3], "candidates": [
        {"removed": [1, 2], "by": "span, block_influence", "kl": 0.5},
        {"removed": [2, 3], "by": "span", "kl": 0.25}]}}
    assert candidate_lines(layer_map) == [
        "Cut chosen by measured KL to the teacher on calibration text (repair: linear):", "",
        "| removed | candidate of | KL |", "|---|---|---:|",
        "| **[2, 3]** | span | 0.2500 |", "| [1, 2] | span, block_influence | 0.5000 |", ""]
    assert candidate_lines({"removed": [2, 3]}) == []
    layer_map["select"]["candidates"] = [{**c, "screen_kl": c["kl"] + 0.1} for c in layer_map["select"]["candidates"]]
    layer_map["select"]["candidates"].append({"removed": [3, 4], "by": "span", "screen_kl": 0.05})
    assert candidate_lines(layer_map)[2:7] == [
        "| removed | candidate of | KL | screen KL |", "|---|---|---:|---:|",
        "| **[2, 3]** | span | 0.2500 | 0.3500 |", "| [1, 2] | span, block_influence | 0.5000 | 0.6000 |",
        "| [3, 4] | span | - | 0.0500 |"]
