"""PNG plots of a run: training curves and per-member vs fused validation AUC.

matplotlib is optional: it is imported here only (Agg backend, no display needed) and the
plots are skipped with a warning when it is missing. Like every file of a run, a plot is written
atomically (:mod:`cetnet.atomic`: the permissions of the run's other files, never half a PNG).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

from cetnet.atomic import atomic_write

__all__ = ["CURVES_PNG", "MEMBERS_PNG", "plot_run"]

CURVES_PNG = "curves.png"
MEMBERS_PNG = "members_auc.png"


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def plot_run(history: Sequence[dict], out_dir: str | Path,
             test: dict | None = None) -> list[Path]:
    """Writes :data:`CURVES_PNG` (train loss, validation logloss and AUC per epoch) and
    :data:`MEMBERS_PNG` (validation AUC of each member and of the fused prediction per epoch,
    plus the test AUCs) into ``out_dir``; returns the written paths ([] without matplotlib or
    history)."""
    if not history:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the run's plots", stacklevel=2)
        return []
    out_dir = Path(out_dir)
    epochs = [h["epoch"] for h in history]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-")
    axes[0].set_title("train loss")
    axes[1].plot(epochs, [_nan(h["valid"]["fused"]["logloss"]) for h in history], "o-")
    axes[1].set_title("validation logloss (fused)")
    axes[2].plot(epochs, [_nan(h["valid"]["fused"]["auc"]) for h in history], "o-", label="AUC")
    axes[2].plot(epochs, [_nan(h["valid"]["fused"]["gauc"]) for h in history], "s--",
                 label="gAUC")
    axes[2].set_title("validation (fused)")
    axes[2].legend()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out_dir / CURVES_PNG))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2 if test else 1, figsize=(11 if test else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    members = list(history[0]["valid"]["members"])
    for name in members:
        ax.plot(epochs, [_nan(h["valid"]["members"][name]["auc"]) for h in history], "o-",
                label=name, alpha=0.8)
    ax.plot(epochs, [_nan(h["valid"]["fused"]["auc"]) for h in history], "k*-", lw=2,
            label="fused")
    ax.set_title("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    if test:
        ax = axes[0][1]
        names = [*members, "fused"]
        values = [_nan(test["members"][n]["auc"]) for n in members] + \
            [_nan(test["fused"]["auc"])]
        ax.bar(names, values, color=["C0"] * len(members) + ["k"])
        finite = [v for v in values if v == v]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.02), min(1.0, max(finite) + 0.01))
        ax.set_title("test AUC")
    fig.tight_layout()
    written.append(_save(fig, out_dir / MEMBERS_PNG))
    plt.close(fig)
    return written
