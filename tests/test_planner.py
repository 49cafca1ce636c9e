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
    for quant in ("Q4_K_M", "Q8_0", "Q6_K", "Q3_K_M", "Q5_K_M"):
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
    pruned = cli("prune", smollm2_hf, "--layers", "12,13,14,15,16,17", "--out", student)
    assert pruned.returncode == 0, pruned.stderr
    code, out, peak = peak_rss_of([
        "heal", student, "--teacher", smollm2_hf, "--out", tmp_path / "healed", "--steps", "2", "--json",
        "--set", "heal.batch_size=4", "--set", "heal.seq_len=256", "--set", "heal.train=all",
        "--set", "data.heldout={from: default, split: heldout, samples: 2, seq_len: 256}"])
    assert code == 0
    estimate = json.loads(out)["memory_estimate_bytes"]
    assert abs(estimate / peak - 1) <= 0.20, (estimate / 2**30, peak / 2**30)
