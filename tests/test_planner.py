"""Size and memory planning from headers alone: parameter counts, size targets, the dry-run estimate."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import assert_clean_error
from ollama_compress.errors import UserError
from ollama_compress.planner import gguf_size, layers_to_remove, model_shape, parse_count


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


def run_cli(*args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "ollama_compress", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_prints_sizes_and_resolves_a_target(tmp_path, smollm2_gguf):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
recipe_version: 1
name: planned
source: {{model: {smollm2_gguf}}}
prune: {{target: {{size_mb: 70, quant: Q4_K_M}}}}
heal: {{steps: 10}}
export: {{quants: [Q4_K_M, Q8_0]}}
""")
    shape = model_shape(smollm2_gguf)
    removed = layers_to_remove(shape, size_mb=70, quant="Q4_K_M")
    proc = run_cli("run", recipe, "--out", tmp_path / "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"layers 30 -> {30 - removed}" in proc.stdout
    assert f"Q4_K_M {gguf_size(shape, 'Q4_K_M', removed) / 2**20:.1f} MiB" in proc.stdout
    assert "heal memory (estimated peak):" in proc.stdout
    assert not (tmp_path / "run").exists()

    recipe.write_text(recipe.read_text().replace("size_mb: 70", "size_mb: 5"))
    assert_clean_error(run_cli("run", recipe, "--out", tmp_path / "run", "--dry-run"),
                       "no model of this source fits 5 MB at Q4_K_M")
