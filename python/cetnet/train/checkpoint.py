"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and primitive containers (no pickled classes), so loading one
cannot run code. :func:`save_checkpoint` writes a temporary file in the same directory and
``os.replace``-s it over the target: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cetnet.atomic import atomic_write

__all__ = ["BEST", "LAST", "save_checkpoint", "load_checkpoint"]

BEST = "best.pt"   # the model at the epoch with the best validation fused AUC
LAST = "last.pt"   # everything needed to resume, written after every epoch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint with ``weights_only=True`` (tensors and primitive containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)
