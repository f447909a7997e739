"""The run directory: its file names, creation and JSON files.

Layout: ``config.yaml`` (the resolved config), ``metrics.json``, ``best.pt`` / ``last.pt``
(see :mod:`cetnet.train.checkpoint`), ``curves.png`` / ``members_auc.png`` (plots) and
``eval_<split>.json`` from ``cetnet evaluate``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from cetnet.atomic import write_text_atomic

__all__ = ["CONFIG_FILE", "METRICS_FILE", "default_run_dir", "make_run_dir", "write_json",
           "read_json", "json_safe"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(name: str, out: str | Path | None = None) -> Path:
    """Creates (if needed) and returns the run directory: ``out``, or the default for ``name``
    (suffixed ``-2``, ``-3`` ... if that already exists)."""
    if out is not None:
        path = Path(out)
    else:
        base = path = default_run_dir(name)
        n = 2
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None (JSON has no NaN) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    """Writes ``obj`` as indented JSON, atomically (temp file + ``os.replace``)."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
