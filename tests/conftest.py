"""Shared fixtures: the real SmolLM2 (imported once per machine and cached), tiny random models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # set before torch loads; see cli.main

from helpers import write_recipe  # noqa: E402
from tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from ollama_compress.embedded import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """SmolLM2 as a clean HF directory, imported from the GGUF once and cached across sessions."""
    from ollama_compress.hooks.source import imported_gguf_dir

    return imported_gguf_dir(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Factory: ``tiny_model_dir(arch, num_layers=6)`` -> HF directory with the SmolLM2 tokenizer."""
    made: dict[tuple, Path] = {}

    def make(arch: str, num_layers: int = 6, seed: int = 0) -> Path:
        key = (arch, num_layers, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{num_layers}")
            made[key] = save_tiny_model(arch, out, smollm2_tokenizer, num_layers, seed)
        return made[key]

    return make


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


CALIBRATION_TEXT = (
    "The river runs past the mill and under the old stone bridge. Children count the boats that pass. "
    "In winter the water freezes and the town skates from one bank to the other. Bakers open at dawn; "
    "the smell of bread drifts over the square while the clock strikes six and carts roll in from farms. "
) * 60


@pytest.fixture
def calibration_file(tmp_path) -> Path:
    """A plain-text calibration file (a few thousand tokens) in tmp_path."""
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


@pytest.fixture
def recipe_file(tmp_path):
    """Factory: ``recipe_file(model, name="test", **sections)`` -> a recipe YAML in tmp_path
    (``helpers.recipe_dict``: a section given as None is left out)."""
    count = iter(range(1000))

    def make(model="/m", name: str = "test", **sections) -> Path:
        return write_recipe(tmp_path / f"recipe-{next(count)}.yaml", model, name, **sections)

    return make


@pytest.fixture
def plugin_dir(tmp_path) -> Path:
    """An empty directory to ``helpers.install_plugin`` into; pass it to ``cli(..., plugins=)``."""
    root = tmp_path / "plugins"
    root.mkdir()
    return root
