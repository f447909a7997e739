"""Where downloaded and processed datasets are kept."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_root", "write_atomic"]


def default_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$CETNET_DATA``, else ``~/.cache/cetnet``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("CETNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cetnet"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes through a temporary file, so an interrupted fetch never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
