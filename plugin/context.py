"""The small objects handed to every hook, so new fields never break a plugin's signature."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import RunOptions

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from .recipe import Recipe


@dataclass
class StageContext:
    """What a stage hook gets: the recipe, where to write, and what earlier stages produced.

    ``out_dir`` is a fresh temporary directory; the pipeline renames it to its final place
    (``run_dir/NN-stage``) only when the stage returns without error, and rewrites paths inside
    it in the stage's result and ``metrics``.

    ``inputs`` holds only the keys this stage reads (``pipeline.STAGES``), as JSON values:

    * ``model_dir``: the newest HF model directory (source, then pruned, then healed);
    * ``teacher_dir``: the unpruned source model as an HF directory;
    * ``scores_file``: ``scores.json`` of the importance stage (``{metric: [score per layer]}``);
    * ``pruned_dir`` / ``healed_dir``: the pruned and the healed HF directories;
    * ``gguf``: ``{quant or outtype: GGUF path}`` of the export stage;
    * ``modelfiles`` / ``ollama_models``: ``{quant: path}`` and ``{quant: Ollama name}``.

    Put JSON-able figures into ``metrics``: they end up in ``run.json``.
    """

    stage: str
    recipe: "Recipe"
    run_dir: Path
    out_dir: Path
    work_dir: Path | None = None  # scratch space kept across failed attempts (checkpoints), removed on success
    options: RunOptions = field(default_factory=RunOptions)
    inputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    console: "Console | None" = None
    section: str | None = None  # recipe section when it differs from the stage name

    @property
    def settings(self) -> Any:
        """This stage's section of the recipe (``recipe.prune`` for the prune stage, ...)."""
        return getattr(self.recipe, self.section or self.stage, None)

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    @property
    def device(self) -> str:
        return self.options.resolved_device()
