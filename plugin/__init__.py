"""ollama-compress: turn a Hugging Face causal LM into smaller, faster models that run in Ollama."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "run", "load_recipe"]


def run(recipe, **kwargs):
    """Run a recipe (a ``Recipe``, a path, or a shipped recipe name); see ``pipeline.run``."""
    from .pipeline import run as _run

    return _run(recipe, **kwargs)


def load_recipe(name_or_path: str, overrides=()):
    from .recipe import load_recipe as _load

    return _load(name_or_path, overrides)
