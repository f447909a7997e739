"""PNG plots of a run: training curves and per-member vs fused validation AUC.

Each figure is titled with the run's name. The curves mark the best epoch (the one whose
``best.pt`` is scored on test) and, when ``train.patience`` stopped the run, the early stop; the
train-loss axis names what the loss is made of (:func:`~cetnet.train.report.describe_loss`).
The test-AUC bars carry their values and their axis starts at 0.5, the AUC of a random
ranking (at 0 when an AUC is below it), so that a gain of 0.005 looks as small as it is.

matplotlib is optional: it is imported here only (Agg backend, no display needed) and the
plots are skipped with a warning when it is missing. Like every file of a run, a plot is written
atomically (:mod:`cetnet.atomic`: the permissions of the run's other files, never half a PNG).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cetnet.atomic import atomic_write
from cetnet.train.report import describe_loss

__all__ = ["CURVES_PNG", "MEMBERS_PNG", "CHANCE_AUC", "RunLabels", "plot_run", "curves_figure",
           "members_figure", "best_epoch_of"]

CURVES_PNG = "curves.png"
MEMBERS_PNG = "members_auc.png"
#: The AUC of a random ranking: where the test-AUC bar axis starts.
CHANCE_AUC = 0.5

_BEST_STYLE = {"color": "tab:green", "ls": "--", "lw": 1.2}
_STOP_STYLE = {"color": "tab:red", "ls": ":", "lw": 1.5}


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def best_epoch_of(history: Sequence[dict]) -> int | None:
    """The epoch the training loop keeps as best: the first with the highest finite validation
    fused AUC (None when no epoch has one)."""
    best, best_auc = None, -math.inf
    for h in history:
        auc = _nan(h["valid"]["fused"]["auc"])
        if math.isfinite(auc) and auc > best_auc:
            best, best_auc = h["epoch"], auc
    return best


def _mark_epochs(ax: Any, best: int | None, stop: int | None, patience: Any) -> None:
    """Vertical lines at the best epoch and at the early stop (labelled for the legend)."""
    if best is not None:
        ax.axvline(best, label=f"best epoch ({best})", **_BEST_STYLE)
    if stop is not None:
        why = f", patience {patience}" if patience is not None else ""
        ax.axvline(stop, label=f"early stop (epoch {stop}{why})", **_STOP_STYLE)


def _auc_bars(ax: Any, names: list[str], values: list[float], n_members: int) -> None:
    """Test AUC bars labelled with their values, on an axis from 0.5 (chance) to 1 (or from 0
    when an AUC is below chance), said in the axis label."""
    bars = ax.bar(names, values, color=["C0"] * n_members + ["k"])
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=8, padding=2)
    finite = [v for v in values if math.isfinite(v)]
    low = CHANCE_AUC if all(v >= CHANCE_AUC for v in finite) else 0.0
    ax.set_ylim(low, 1.0)
    for x, v in enumerate(values):  # bar_label leaves a NaN bar's label empty
        if not math.isfinite(v):
            ax.text(x, low, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"test AUC (axis from {low:g}" + (" = chance)" if low else ")"))
    ax.tick_params(axis="x", labelrotation=20)


@dataclass(frozen=True)
class RunLabels:
    """What the figures say about the run besides its numbers."""

    name: str                   # titles the figures
    best_epoch: int | None      # marked on the curves; its model is the one scored on test
    stop_epoch: int | None      # the epoch after which train.patience stopped the run
    patience: int | None
    loss: str                   # what the train loss is made of

    @classmethod
    def of(cls, history: Sequence[dict], config: Mapping[str, Any] | None = None,
           best_epoch: int | None = None, stopped_early: bool = False) -> "RunLabels":
        """The labels of a run from its history and config (see :func:`plot_run`)."""
        config = config or {}
        return cls(name=str(config.get("name") or "run"),
                   best_epoch=best_epoch if best_epoch else best_epoch_of(history),
                   stop_epoch=history[-1]["epoch"] if stopped_early and history else None,
                   patience=(config.get("train") or {}).get("patience"),
                   loss="loss = " + describe_loss(config.get("model")))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax: Any, labels: RunLabels) -> None:
    """The best-epoch and early-stop lines, integer epochs, grid and legend of a curve."""
    from matplotlib.ticker import MaxNLocator

    _mark_epochs(ax, labels.best_epoch, labels.stop_epoch, labels.patience)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def curves_figure(history: Sequence[dict], labels: RunLabels) -> Any:
    """The figure of :data:`CURVES_PNG`: train loss (its terms on the y axis), validation
    logloss, validation AUC and gAUC of the fused prediction per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    fig.suptitle(f"{labels.name}: training curves")
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    axes[0].set_title("train loss")
    axes[0].set_ylabel("\n".join(textwrap.wrap(labels.loss, 48)), fontsize=7)
    axes[1].plot(epochs, [_nan(h["valid"]["fused"]["logloss"]) for h in history], "o-",
                 label="logloss")
    axes[1].set_title("validation logloss (fused)")
    axes[2].plot(epochs, [_nan(h["valid"]["fused"]["auc"]) for h in history], "o-", label="AUC")
    axes[2].plot(epochs, [_nan(h["valid"]["fused"]["gauc"]) for h in history], "s--",
                 label="gAUC")
    axes[2].set_title("validation (fused)")
    for ax in axes:
        _epoch_axis(ax, labels)
    fig.tight_layout()
    return fig


def members_figure(history: Sequence[dict], test: dict | None, labels: RunLabels) -> Any:
    """The figure of :data:`MEMBERS_PNG`: validation AUC of each member and of the fused
    prediction per epoch, and (with ``test``) the test AUC bars of the best model."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2 if test else 1, figsize=(12 if test else 6.5, 4.2),
                             squeeze=False)
    fig.suptitle(f"{labels.name}: members vs fused prediction")
    ax = axes[0][0]
    members = list(history[0]["valid"]["members"])
    for member in members:
        ax.plot(epochs, [_nan(h["valid"]["members"][member]["auc"]) for h in history], "o-",
                label=member, alpha=0.8)
    ax.plot(epochs, [_nan(h["valid"]["fused"]["auc"]) for h in history], "k*-", lw=2,
            label="fused")
    ax.set_title("validation AUC per epoch")
    _epoch_axis(ax, labels)
    if test:
        ax = axes[0][1]
        values = [_nan(test["members"][n]["auc"]) for n in members] + \
            [_nan(test["fused"]["auc"])]
        _auc_bars(ax, [*members, "fused"], values, len(members))
        best = labels.best_epoch
        ax.set_title("test AUC" + (f" (model of epoch {best})" if best is not None else ""))
    fig.tight_layout()
    return fig


def plot_run(history: Sequence[dict], out_dir: str | Path, test: dict | None = None, *,
             config: Mapping[str, Any] | None = None, best_epoch: int | None = None,
             stopped_early: bool = False) -> list[Path]:
    """Writes :data:`CURVES_PNG` (:func:`curves_figure`) and :data:`MEMBERS_PNG`
    (:func:`members_figure`) into ``out_dir``; returns the written paths ([] without
    matplotlib or history).

    Args:
        history: the run's per-epoch entries (``epoch``, ``train_loss``, ``valid`` metrics).
        out_dir: the run directory.
        test: the best model's test metrics (``fused``, ``members``), drawn as bars.
        config: the run's config: its ``name`` titles the figures, its ``model`` section names
            the terms of the train loss, its ``train.patience`` the early stop.
        best_epoch: the epoch marked as best (default: :func:`best_epoch_of` the history).
        stopped_early: the run was stopped by ``train.patience``: its last epoch is marked.
    """
    if not history:
        return []
    try:
        plt = _pyplot()
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the run's plots", stacklevel=2)
        return []
    labels = RunLabels.of(history, config, best_epoch, stopped_early)
    out_dir = Path(out_dir)
    written = []
    for file, draw in ((CURVES_PNG, lambda: curves_figure(history, labels)),
                       (MEMBERS_PNG, lambda: members_figure(history, test, labels))):
        fig = draw()
        try:
            written.append(_save(fig, out_dir / file))
        finally:
            plt.close(fig)
    return written
