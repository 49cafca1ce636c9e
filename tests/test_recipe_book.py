"""The shipped recipe book: every recipe validates, says how to run it, and names a supported architecture."""
from __future__ import annotations

import re

import pytest

from helpers import assert_clean_error, cli
from ollama_compress.recipe import load_recipe, shipped_recipes

BOOK = sorted(shipped_recipes())
# The architecture of each family the book draws from, written down here (not derived from the code).
FAMILIES = {"embedded:smollm2": "llama", "HuggingFaceTB/SmolLM2": "llama", "meta-llama/Llama-3": "llama",
            "Qwen/Qwen2.5": "qwen2", "Qwen/Qwen3": "qwen3", "microsoft/Phi-4-mini": "phi3",
            "google/gemma-3": "gemma3"}


def test_the_book_has_the_promised_models():
    wanted = {"smollm2-135m-demo", "qwen2.5-3b-36to28", "smollm2-360m-32to26", "smollm2-1.7b-24to20",
              "llama-3.2-1b-16to12", "llama-3.2-3b-28to22", "qwen2.5-0.5b-24to20", "qwen2.5-1.5b-28to22",
              "qwen3-1.7b-28to22", "qwen3-4b-36to28", "phi-4-mini-32to26", "gemma-3-1b-26to22"}
    assert wanted <= set(BOOK)


@pytest.mark.parametrize("name", BOOK)
def test_each_recipe_validates_and_its_header_says_how_to_run_it(name):
    from ollama_compress.hooks.prune import SUPPORTED_ARCHITECTURES

    path = shipped_recipes()[name]
    recipe = load_recipe(str(path))
    lines = path.read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    text = "\n".join(header)  # the comment block the recipe starts with
    assert re.search(rf"# Run: ollama-compress run {re.escape(name)}\b", text), text
    assert "# Needs: " in text
    arch = re.search(r"# Architecture: (\w+)", text).group(1)
    assert arch in set(SUPPORTED_ARCHITECTURES.values())
    family = next(a for prefix, a in FAMILIES.items() if recipe.source.model.startswith(prefix))
    assert arch == family, f"{name}: its source {recipe.source.model} is {family}, not {arch}"
    layers = re.search(r"(\d+)to(\d+)$", name)
    if layers:  # the name promises the cut: 26to22 removes 4 layers
        assert recipe.prune.remove == int(layers.group(1)) - int(layers.group(2))
    assert recipe.prune is not None and recipe.export is not None and recipe.heal is not None


def test_recipes_copy_writes_an_editable_copy(tmp_path):
    proc = cli("recipes", "copy", "smollm2-135m-demo", tmp_path)
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "smollm2-135m-demo.yaml"
    assert copy.read_text() == shipped_recipes()["smollm2-135m-demo"].read_text()
    assert_clean_error(cli("recipes", "copy", "smollm2-135m-demo", tmp_path), "exists")
    assert_clean_error(cli("recipes", "copy", "no-such-recipe", tmp_path), "no shipped recipe named")
