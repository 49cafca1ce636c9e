"""Size and memory planning from headers alone: parameter counts, size targets, the dry-run estimate."""
from __future__ import annotations

import pytest

from helpers import assert_clean_error, cli
from ollama_compress.errors import UserError
from ollama_compress.planner import gguf_size, layers_to_remove, model_shape
from ollama_compress.recipe import parse_count


def test_hf_shape_counts_every_parameter_from_the_headers(tiny_model_dir):
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("qwen3", 6)
    shape = model_shape(model_dir)
    tensors = {}
    for file in model_dir.glob("*.safetensors"):
        tensors.update(load_file(file))
    assert shape.params() == sum(t.numel() for t in tensors.values())
    assert shape.num_layers == 6 and len(set(shape.layer_params)) == 1
    assert shape.other_params == sum(t.numel() for n, t in tensors.items() if ".layers." not in n)


def test_gguf_shape_of_the_embedded_smollm2(smollm2_gguf):
    shape = model_shape(smollm2_gguf)
    assert shape.num_layers == 30 and shape.hidden_size == 576 and shape.vocab_size == 49152
    assert 134_000_000 < shape.params() < 135_000_000  # SmolLM2-135M, tied embeddings


def test_a_size_target_removes_the_fewest_layers_that_fit(smollm2_gguf):
    shape = model_shape(smollm2_gguf)
    removed = layers_to_remove(shape, size_mb=70, quant="Q4_K_M")
    assert gguf_size(shape, "Q4_K_M", removed) <= 70 * 2**20
    assert gguf_size(shape, "Q4_K_M", removed - 1) > 70 * 2**20
    assert layers_to_remove(shape, params=parse_count("100M")) == removed_for_params(shape, 100_000_000)
    with pytest.raises(UserError, match="no model of this source fits 10 MB at Q4_K_M"):
        layers_to_remove(shape, size_mb=10, quant="Q4_K_M")


def removed_for_params(shape, limit: int) -> int:
    return next(n for n in range(shape.num_layers) if shape.params(n) <= limit)


@pytest.mark.parametrize("text, value", [("100M", 100_000_000), ("1.5B", 1_500_000_000), ("250k", 250_000),
                                         ("1234", 1234)])
def test_parameter_counts_parse(text, value):
    assert parse_count(text) == value


def test_dry_run_prints_sizes_and_resolves_a_target(tmp_path, smollm2_gguf, recipe_file):
    recipe = recipe_file(smollm2_gguf, "planned", prune={"target": {"size_mb": 70, "quant": "Q4_K_M"}},
                         heal={"steps": 10}, export={"quants": ["Q4_K_M", "Q8_0"]})
    shape = model_shape(smollm2_gguf)
    removed = layers_to_remove(shape, size_mb=70, quant="Q4_K_M")
    proc = cli("run", recipe, "--out", tmp_path / "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"layers 30 -> {30 - removed}" in proc.stdout
    assert f"Q4_K_M {gguf_size(shape, 'Q4_K_M', removed) / 2**20:.1f} MiB" in proc.stdout
    assert "heal memory (estimated peak):" in proc.stdout
    from ollama_compress.planner import size_candidates, size_plan_cost

    candidates = size_candidates(shape, 70, "Q4_K_M", imatrix=True)
    assert candidates[0].removed == removed  # the stages assume the cut at target.quant until measured
    for c in candidates:
        assert f"{c.kind}: {c.label} {c.estimated_bytes / 2**20:.1f} MiB" in proc.stdout
    cost = size_plan_cost(candidates, 32, 256)
    assert (f"size plan cost: {cost['gguf_exports']} GGUF exports, {cost['quantizations']} quantizations, "
            f"{cost['forward_passes']} forward passes") in proc.stdout
    assert "will measure 2 candidates" in proc.stdout
    assert not (tmp_path / "run").exists()

    recipe.write_text(recipe.read_text().replace("size_mb: 70", "size_mb: 5"))
    assert "size_mb: 5" in recipe.read_text()
    assert_clean_error(cli("run", recipe, "--out", tmp_path / "run", "--dry-run"),
                       "no model of this source fits 5 MB at Q4_K_M")


# ---------------------------------------------------------------- the size estimate against real files
SHIPPED_QUANTS = ("Q4_K_M", "Q8_0")  # what the recipe book exports


def shipped_quants() -> list[str]:
    from ollama_compress.recipe import load_recipe, shipped_recipes

    found = {q for path in shipped_recipes().values() for q in (load_recipe(str(path)).export.quants or [])}
    assert found == set(SHIPPED_QUANTS), found  # a recipe ships another quant: test it here too
    return sorted(found)


def real_sizes(model_dir, folder) -> dict[str, int]:
    """Bytes of the F16 export of ``model_dir`` and of each shipped quant made from it."""
    from ollama_compress.gguf import export_gguf
    from ollama_compress.hooks.quantize import quant_file_name, quantize_file

    f16 = export_gguf(model_dir, folder / "model-F16.gguf", "F16")
    sizes = {"F16": f16.stat().st_size}
    for quant in shipped_quants():
        sizes[quant] = quantize_file(f16, quant, folder / quant_file_name(f16, quant)).stat().st_size
    return sizes


def assert_within(estimates: dict[str, int], real: dict[str, int], tolerance: float) -> None:
    off = {q: round(estimates[q] / real[q] - 1, 4) for q in real}
    assert all(abs(v) <= tolerance for v in off.values()), off


def test_the_size_estimate_matches_real_files_of_a_tiny_model(tiny_model_dir, tmp_path):
    """Rows of 64: llama.cpp's K-quants fall back to Q5_0 / Q8_0 on every matrix, and the
    vocabulary is most of the file."""
    model_dir = tiny_model_dir("llama", 6)
    real = real_sizes(model_dir, tmp_path)
    from_hf = model_shape(model_dir)
    assert_within({q: gguf_size(from_hf, q) for q in real}, real, 0.05)
    from_gguf = model_shape(tmp_path / "model-F16.gguf")
    assert_within({q: gguf_size(from_gguf, q) for q in real}, real, 0.05)

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    real_pruned = real_sizes(tiny_model_dir("llama", 4), pruned)  # the same shapes, two layers fewer
    assert_within({q: gguf_size(from_hf, q, removed=2) for q in real_pruned}, real_pruned, 0.05)


def test_the_size_estimate_follows_llama_cpp_type_choices(tmp_path, smollm2_gguf):
    """Rows of 256: Q4_K on most matrices, Q6_K on the output and on attn_v/ffn_down of the
    layers llama.cpp gives more bits; the estimate's types are the file's types."""
    from gguf_samples import write_tiny_llama_gguf
    from ollama_compress.gguf_verify import verify_gguf
    from ollama_compress.hooks.quantize import quantize_file
    from ollama_compress.planner import tensor_type

    f16 = write_tiny_llama_gguf(tmp_path / "tiny-F16.gguf", smollm2_gguf, layers=8)
    shape = model_shape(f16)
    for quant in ("Q4_K_M", "Q8_0", "Q6_K", "Q3_K_M", "Q5_K_M", "Q4_1", "Q5_0"):  # legacy types: output at Q8_0
        real = verify_gguf(quantize_file(f16, quant, tmp_path / f"tiny-{quant}.gguf"))
        tied = not any(t.name == "output.weight" for t in real.tensors)
        guessed = {t.name: tensor_type(quant, t, shape.num_layers, tied) for t in shape.tensors}
        assert guessed == {t.name: t.type for t in real.tensors}, quant
        assert abs(gguf_size(shape, quant) / real.size - 1) < 0.02, quant


@pytest.mark.slow
def test_the_size_estimate_matches_real_files_of_smollm2(smollm2_hf, tmp_path):
    real = real_sizes(smollm2_hf, tmp_path)
    assert_within({q: gguf_size(model_shape(smollm2_hf), q) for q in real}, real, 0.05)


# ---------------------------------------------------------------- the heal-memory estimate against a real heal
def peak_rss_of(args: list) -> tuple[int, str, int]:
    """Run the CLI; (exit code, stdout, peak resident set of that process alone in bytes)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "ollama_compress", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out, usage.ru_maxrss * 1024


@pytest.mark.slow
def test_the_heal_memory_estimate_is_within_20_percent_of_the_peak(smollm2_hf, tmp_path):
    """The demo's heal (batch 4 x 256 tokens, every layer trained, 30 -> 24 layers), two steps."""
    import json

    student = tmp_path / "student"
    pruned = cli("prune", smollm2_hf, "--layers", "12,13,14,15,16,17", "--repair", "none", "--out", student)
    assert pruned.returncode == 0, pruned.stderr
    code, out, peak = peak_rss_of([
        "heal", student, "--teacher", smollm2_hf, "--out", tmp_path / "healed", "--steps", "2", "--json",
        "--set", "heal.batch_size=4", "--set", "heal.seq_len=256", "--set", "heal.train=all",
        "--set", "data.heldout={from: default, split: heldout, samples: 2, seq_len: 256}"])
    assert code == 0
    estimate = json.loads(out)["memory_estimate_bytes"]
    assert abs(estimate / peak - 1) <= 0.20, (estimate / 2**30, peak / 2**30)


# ---------------------------------------------------------------- prune.target.size_mb: cut + quant or quantize only
def labels(candidates) -> list[str]:
    return [c.label for c in candidates]


def test_size_candidates_of_smollm2_from_its_shape(smollm2_gguf):
    from ollama_compress.planner import size_candidates

    shape = model_shape(smollm2_gguf)
    assert labels(size_candidates(shape, 90, "Q4_K_M", imatrix=True)) == [
        "teacher Q3_K_M", "teacher IQ4_NL", "5 layers cut + Q4_K_M", "6 layers cut + Q5_K_S"]  # not Q4_0: legacy
    assert labels(size_candidates(shape, 100, "Q4_K_M", imatrix=True)) == [
        "teacher Q4_K_S", "teacher Q3_K_L", "1 layer cut + Q4_K_M", "2 layers cut + Q5_K_S"]  # not Q4_1
    # Q5_K_S would have to cut more than half the layers, and no teacher quant fits
    assert labels(size_candidates(shape, 60, "Q4_K_M", imatrix=True)) == ["18 layers cut + Q4_K_M"]
    # the target quant fits uncut: it is a quantize-only candidate, and the next quant fits uncut too
    assert labels(size_candidates(shape, 200, "Q8_0", imatrix=True)) == ["teacher Q8_0", "teacher Q6_K"]


def test_size_candidates_follow_the_rule_on_a_tiny_shape(tiny_model_dir):
    from ollama_compress.planner import CUT_AND_QUANT, QUANTIZE_ONLY, size_candidates
    from ollama_compress.quant_names import LEGACY_QUANTS, NEEDS_IMATRIX, quantizable

    shape = model_shape(tiny_model_dir("llama", 6))
    limit = gguf_size(shape, "Q5_K_M", 1)  # Q5_K_M fits with one layer cut
    candidates = size_candidates(shape, limit / 2**20, "Q5_K_M", imatrix=False)
    assert len(candidates) <= 4
    whole = {q: gguf_size(shape, q) for q in quantizable(False) if q not in LEGACY_QUANTS}
    fitting = sorted((q for q in whole if whole[q] <= limit), key=lambda q: -whole[q])
    only = [c for c in candidates if c.kind == QUANTIZE_ONLY]
    assert [c.quant for c in only] == fitting[:2] and not set(fitting[:2]) & set(NEEDS_IMATRIX)
    assert all(c.removed == 0 and c.estimated_bytes == whole[c.quant] for c in only)
    cuts = [c for c in candidates if c.kind == CUT_AND_QUANT]
    assert cuts[0].quant == "Q5_K_M" and cuts[0].removed == 1 and gguf_size(shape, "Q5_K_M") > limit
    assert len(cuts) == 2  # the next quant with more bits, with its own fewest cut, keeping half the layers
    nxt = cuts[1]
    assert whole[nxt.quant] == min(w for w in whole.values() if w > whole["Q5_K_M"])
    assert gguf_size(shape, nxt.quant, nxt.removed) <= limit < gguf_size(shape, nxt.quant, nxt.removed - 1)
    assert nxt.removed <= shape.num_layers // 2


def record(label: str, kind: str, quant: str, removed: int, mib: float, kl: float, dropped: str | None = None):
    row = {"label": label, "kind": kind, "quant": quant, "layers_removed": removed, "estimated_mib": mib,
           "real_mib": mib, "kl": kl}
    if kind == "cut + quant":
        row["before_heal"] = True
    if dropped:
        row["dropped"] = dropped
    return row


def test_the_lowest_kl_wins_and_the_sentence_says_why():
    from ollama_compress.size_plan import choose_plan, plan_sentence

    only = record("teacher IQ4_XS", "quantize only", "IQ4_XS", 0, 86.7, 0.122)
    cut = record("6 layers cut + Q4_K_M", "cut + quant", "Q4_K_M", 6, 86.7, 0.54)
    choice = choose_plan([cut, only])
    assert choice["kind"] == "quantize only" and choice["quant"] == "IQ4_XS" and choice["layers_removed"] == 0
    assert plan_sentence(choice, [cut, only]) == (
        "quantize only: teacher IQ4_XS (86.7 MiB) has KL 0.122 on calibration text, against 0.54 for "
        "6 layers cut + Q4_K_M (86.7 MiB, before the heal)")

    better_cut = {**cut, "kl": 0.1}
    choice = choose_plan([only, better_cut])
    assert choice["kind"] == "cut + quant" and choice["layers_removed"] == 6
    assert plan_sentence(choice, [only, better_cut]).startswith(
        "cut + quant: 6 layers cut + Q4_K_M (86.7 MiB, before the heal) has KL 0.1 on calibration text, "
        "against 0.122 for teacher IQ4_XS")


def test_a_dropped_candidate_never_wins_and_none_left_is_an_error():
    from ollama_compress.size_plan import choose_plan, plan_sentence

    over = record("teacher Q5_K_S", "quantize only", "Q5_K_S", 0, 91.0, 0.01, dropped="the real file is 91.0 MiB")
    cut = record("6 layers cut + Q4_K_M", "cut + quant", "Q4_K_M", 6, 86.7, 0.54)
    choice = choose_plan([over, cut])
    assert choice["label"] == "6 layers cut + Q4_K_M"
    assert "dropped: teacher Q5_K_S (the real file is 91.0 MiB)" in plan_sentence(choice, [over, cut])
    with pytest.raises(UserError, match="no candidate fits when made"):
        choose_plan([over])


def test_a_candidate_whose_real_file_is_over_the_size_is_dropped(tiny_model_dir, tmp_path):
    from ollama_compress.hooks.data import text_windows
    from ollama_compress.hooks.quantize import shipped_heldout_text
    from ollama_compress.modelio import load_tokenizer
    from ollama_compress.planner import QUANTIZE_ONLY, SizeCandidate
    from ollama_compress.reference import teacher_reference
    from ollama_compress.size_plan import candidate_record

    model_dir = tiny_model_dir("llama", 6)
    real = real_sizes(model_dir, tmp_path)  # F16 and the shipped quants, made by llama.cpp
    tokenizer = load_tokenizer(model_dir)
    windows = text_windows(shipped_heldout_text(), tokenizer, 2, 32, 0)
    reference = teacher_reference(model_dir, windows, run_dir=tmp_path)
    candidate = SizeCandidate(QUANTIZE_ONLY, "Q8_0", 0, gguf_size(model_shape(model_dir), "Q8_0"))
    path = tmp_path / "model-Q8_0.gguf"
    fits = candidate_record(candidate, path, reference, size_mb=(real["Q8_0"] + 1) / 2**20)
    over = candidate_record(candidate, path, reference, size_mb=(real["Q8_0"] - 1) / 2**20)
    assert "dropped" not in fits and fits["real_bytes"] == real["Q8_0"]
    assert over["dropped"].startswith(f"the real file is {real['Q8_0'] / 2**20:.1f} MiB, over the")
    assert 0 < over["kl"] == fits["kl"] < 0.1  # Q8_0 of the teacher against the teacher


def test_the_choice_rewrites_the_recipe_as_the_run_needs_it(tmp_path, smollm2_gguf, recipe_file):
    from rich.console import Console

    from ollama_compress.options import RunOptions
    from ollama_compress.pipeline import Run
    from ollama_compress.recipe import load_recipe

    recipe = recipe_file(smollm2_gguf, "planned", prune={"target": {"size_mb": 90, "quant": "Q4_K_M"}},
                         heal={"steps": 10}, export={"quants": ["Q4_K_M", "Q8_0"]})
    run = Run(load_recipe(str(recipe)), tmp_path / "run", RunOptions(), Console(quiet=True))
    run.resolve_target()
    assert run.recipe.prune.remove == 5 and run.recipe.prune.target is None  # until measured: the cut at Q4_K_M
    run.apply_size_choice("quantize only", "Q3_K_M", 0)
    assert run.recipe.prune is None and run.recipe.heal is None
    assert run.recipe.export.quants == ["Q3_K_M", "Q8_0"]  # in place of target.quant
    assert run.lock["recipe"]["export"]["quants"] == ["Q3_K_M", "Q8_0"] and "prune" not in run.lock["recipe"]
    run.apply_size_choice("cut + quant", "Q5_K_S", 6)
    assert run.recipe.prune.remove == 6 and run.recipe.heal.steps == 10
    assert run.recipe.export.quants == ["Q5_K_S", "Q8_0"] and run.lock["target"]["remove"] == 6
    run.apply_size_choice("cut + quant", "Q5_K_S", 6, [12, 13, 14, 15, 16, 17])  # the plan's measured cut
    assert run.recipe.prune.layers == [12, 13, 14, 15, 16, 17] and run.recipe.prune.remove is None
    assert run.lock["recipe"]["prune"]["layers"] == [12, 13, 14, 15, 16, 17]
