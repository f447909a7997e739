"""Where downloaded and processed datasets are kept."""

from __future__ import annotations

import os
from pathlib import Path

from cetnet.atomic import write_bytes_atomic

__all__ = ["default_root", "write_atomic"]


def default_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$CETNET_DATA``, else ``~/.cache/cetnet``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("CETNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cetnet"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes through a unique temporary file, so an interrupted fetch never leaves a partial
    file and two concurrent fetches never share a temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
