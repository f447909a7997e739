"""What a run records besides its checkpoints: the log lines (printed and in ``train.log``), the
per-epoch metrics as CSV (``history.csv``), TensorBoard scalars when ``tensorboard`` is
installed (PyTorch's own ``SummaryWriter``; event files in the run directory), and the
environment the run ran in (for ``metrics.json``)."""

from __future__ import annotations

import csv
import io
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from cetnet.atomic import write_text_atomic

__all__ = ["RunLog", "LOG_FILE", "HISTORY_FILE", "history_rows", "environment",
           "tensorboard_available"]

LOG_FILE = "train.log"
HISTORY_FILE = "history.csv"
_SPLIT_METRICS = ("auc", "gauc", "logloss")


def history_rows(history: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    """``(header, rows)`` of the per-epoch history: epoch, train loss, lr, the validation fused
    metrics, then each member's validation AUC and mean fusion weight when present."""
    members = list(history[0]["valid"].get("members", {})) if history else []
    weights = list(history[0]["valid"].get("fusion_weights", {}) or {}) if history else []
    header = (["epoch", "train_loss", "lr"] + [f"valid_{m}" for m in _SPLIT_METRICS]
              + [f"valid_auc_{m}" for m in members] + [f"fusion_weight_{m}" for m in weights])
    rows = []
    for h in history:
        v = h["valid"]
        rows.append([h["epoch"], h["train_loss"], h.get("lr")]
                    + [v["fused"].get(m) for m in _SPLIT_METRICS]
                    + [v["members"][m]["auc"] for m in members]
                    + [(v.get("fusion_weights") or {}).get(m) for m in weights])
    return header, rows


def _git_commit() -> str | None:
    """The commit of the cetnet checkout this code runs from (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """What the run ran on: versions (cetnet and its git commit, torch, Python), the compiled
    kernels' CPU capability, the device, torch's thread count and the world size."""
    from cetnet_kernels import build_info

    try:
        version = metadata.version("cetnet")
    except metadata.PackageNotFoundError:
        version = None
    info = build_info()
    return {"cetnet_version": version, "git_commit": _git_commit(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "cpu_capability": info.get("cpu_capability"), "cuda_kernels": bool(info.get("cuda")),
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "world_size": world_size, "hostname": platform.node()}


class RunLog:
    """The run's log: :meth:`line` prints a line (flushed at once, also when stdout is a file)
    unless ``quiet`` and appends it to ``train.log``; :meth:`epoch` rewrites ``history.csv``
    (atomically, from the whole history: a resumed run's file matches its ``last.pt``) and
    writes the epoch's TensorBoard scalars.

    Args:
        out_dir: the run directory.
        quiet: print nothing (the files are still written).
        tensorboard: write TensorBoard event files when ``tensorboard`` is importable.
        first_epoch: the epoch the run starts at (a resumed run's events start after what
            ``last.pt`` holds; later events of an interrupted attempt are purged).
    """

    def __init__(self, out_dir: Path, *, quiet: bool = False, tensorboard: bool = True,
                 first_epoch: int = 1) -> None:
        self.out_dir, self.quiet = Path(out_dir), quiet
        self._file: io.TextIOBase | None = None
        self.writer = None
        if tensorboard and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir), purge_step=first_epoch)

    def line(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
        if self._file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_dir / LOG_FILE, "a", encoding="utf-8", buffering=1)
        self._file.write(msg + "\n")

    def epoch(self, history: Sequence[dict]) -> None:
        header, rows = history_rows(history)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        write_text_atomic(self.out_dir / HISTORY_FILE, buf.getvalue())
        if self.writer is not None and history:
            last = history[-1]
            step = last["epoch"]
            for name, value in zip(header[1:], rows[-1][1:]):
                if value is not None:
                    self.writer.add_scalar(name.replace("valid_", "valid/", 1)
                                           .replace("fusion_weight_", "fusion_weight/", 1),
                                           float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensorboard_available() -> bool:
    """Whether TensorBoard's writer imports (the ``tensorboard`` package is installed)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
