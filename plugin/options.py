"""What only the command line decides (never a recipe), and the launcher's process layout."""
from __future__ import annotations

import os
from dataclasses import dataclass


def launcher_world() -> tuple[int, int]:
    """(rank, world size) set by ``accelerate launch``/torchrun; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RunOptions:
    """Choices that only the command line may make (never a recipe)."""

    trust_remote_code: bool = False
    allow_pickle: bool = False
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    offline: bool = True  # never reach a model hub unless the user says so

    def resolved_device(self) -> str:
        """``device``, with "auto" turned into cuda when a GPU is visible, else mps (Apple), else cpu."""
        if self.device != "auto":
            return self.device
        import torch  # deferred: the command line starts without torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
