"""The run's plots say what they show: the run's name in the titles, the best epoch and the early
stop marked on the curves, the train loss's terms on its axis, test-AUC bars labelled with their
values on an axis from 0.5 (chance). Checked on the matplotlib objects, not on pixels."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

from cetnet.train import run_training  # noqa: E402
from cetnet.train import loop  # noqa: E402
from cetnet.train.plots import (CURVES_PNG, MEMBERS_PNG, RunLabels, best_epoch_of,  # noqa: E402
                                curves_figure, members_figure, plot_run)
from cetnet.train.report import describe_loss  # noqa: E402

VALID_AUC = [0.70, 0.74, 0.73, 0.72]  # best at epoch 2, then two bad epochs: patience 2 stops


def _metrics(auc: float) -> dict:
    return {"auc": auc, "gauc": auc - 0.02, "logloss": 0.6 - auc / 10}


def _history(aucs=VALID_AUC) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3,
             "valid": {"fused": _metrics(a),
                       "members": {"dnn": _metrics(a - 0.01), "dcnv2": _metrics(a - 0.005)}}}
            for e, a in enumerate(aucs, start=1)]


TEST = {"fused": _metrics(0.7512), "members": {"dnn": _metrics(0.7462),
                                               "dcnv2": _metrics(0.7490)}}
CONFIG = {"name": "my_run", "train": {"patience": 2},
          "model": {"ensemble": "cetnet", "members": ["dnn", "dcnv2"],
                    "fusion": {"mutual_weight": 0.5}}}


@pytest.fixture
def figures():
    made = []
    yield made
    for fig in made:
        plt.close(fig)


def _vlines(ax) -> dict[str, float]:
    """label -> x of the vertical lines (axvline) of an axis."""
    out = {}
    for line in ax.get_lines():
        x = list(line.get_xdata())
        if len(x) == 2 and x[0] == x[1] and list(line.get_ydata()) == [0, 1]:
            out[line.get_label()] = float(x[0])
    return out


def _labels(**kw) -> RunLabels:
    return RunLabels.of(_history(), CONFIG, **kw)


def test_curves_name_the_run_and_mark_the_best_epoch_and_the_early_stop(figures):
    fig = curves_figure(_history(), _labels(best_epoch=2, stopped_early=True))
    figures.append(fig)
    assert "my_run" in fig._suptitle.get_text()
    for ax in fig.axes:
        lines = _vlines(ax)
        assert lines == {"best epoch (2)": 2.0, "early stop (epoch 4, patience 2)": 4.0}, \
            ax.get_title()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "best epoch (2)" in legend and "early stop (epoch 4, patience 2)" in legend


def test_no_early_stop_line_when_the_run_was_not_stopped(figures):
    fig = curves_figure(_history(), _labels(best_epoch=2))
    figures.append(fig)
    assert all(_vlines(ax) == {"best epoch (2)": 2.0} for ax in fig.axes)


def test_the_best_epoch_defaults_to_the_first_highest_finite_validation_auc():
    assert best_epoch_of(_history()) == 2
    assert best_epoch_of(_history([float("nan"), 0.6, 0.6])) == 2
    assert best_epoch_of(_history([float("nan")])) is None
    assert RunLabels.of(_history(), CONFIG).best_epoch == 2


def test_the_train_loss_axis_names_the_loss_terms_and_weights(figures):
    fig = curves_figure(_history(), _labels())
    figures.append(fig)
    ylabel = fig.axes[0].get_ylabel().replace("\n", " ")
    assert ylabel.startswith("loss = 1 × BCE(fused) + 1 × Σ_k BCE(member k)")
    assert "0.5 × Σ_k mean_j≠k KL(member j || member k)" in ylabel
    assert "distill" not in ylabel and "KL(fused" not in ylabel  # weight 0: left out


@pytest.mark.parametrize("model, expected", [
    (None, "1 × BCE(fused) + 1 × Σ_k BCE(member k), mean over rows"),
    ({"fusion": {"distill_weight": 0.25, "ensemble_weight": 2}},
     "2 × BCE(fused) + 1 × Σ_k BCE(member k) + 0.25 × Σ_k KL(fused || member k), mean over rows"),
    ({"members": ["dnn"], "fusion": {"mutual_weight": 1.0}}, "2 × BCE(member), mean over rows"),
    ({"fusion": {"reduction": "sum"}},
     "1 × BCE(fused) + 1 × Σ_k BCE(member k), summed over the rows of a batch"),
    ({"ensemble": "naive", "members": ["dnn", "dcnv2", "dhen"]},
     "mean over rows and the 3 members of BCE(member k)"),
    ({"ensemble": "multi_embedding"}, "BCE(prediction), mean over rows"),
    ({"ensemble": "my_plugin"}, "the loss of the 'my_plugin' ensemble"),
])
def test_describe_loss(model, expected):
    assert describe_loss(model) == expected


def test_describe_loss_of_kdef_names_its_terms():
    text = describe_loss({"ensemble": "kdef"})
    assert text.startswith("KDEF: mean BCE(member k)") and "no tuned weights" in text


def _bar_axis(fig):
    (ax,) = [a for a in fig.axes if a.patches]
    return ax


def test_test_auc_bars_are_labelled_and_start_at_chance(figures):
    fig = members_figure(_history(), TEST, _labels(best_epoch=2, stopped_early=True))
    figures.append(fig)
    assert "my_run" in fig._suptitle.get_text()
    curve, bars = fig.axes
    assert _vlines(curve) == {"best epoch (2)": 2.0, "early stop (epoch 4, patience 2)": 4.0}
    assert bars is _bar_axis(fig)
    assert bars.get_ylim() == (0.5, 1.0)  # not zoomed on 0.746..0.751
    assert "0.5 = chance" in bars.get_ylabel()
    assert [t.get_text() for t in bars.texts] == ["0.7462", "0.7490", "0.7512"]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["dnn", "dcnv2", "fused"]
    assert "epoch 2" in bars.get_title()


def test_an_auc_below_chance_puts_the_axis_at_zero(figures):
    test = {"fused": _metrics(0.55), "members": {"dnn": _metrics(0.45),
                                                 "dcnv2": _metrics(float("nan"))}}
    fig = members_figure(_history(), test, _labels())
    figures.append(fig)
    ax = _bar_axis(fig)
    assert ax.get_ylim() == (0.0, 1.0)
    assert "axis from 0)" in ax.get_ylabel()
    assert [t.get_text() for t in ax.texts if t.get_text()] == ["0.4500", "0.5500", "n/a"]


def test_without_test_metrics_there_are_no_bars(figures):
    fig = members_figure(_history(), None, _labels())
    figures.append(fig)
    assert len(fig.axes) == 1 and not fig.axes[0].patches


def test_plot_run_writes_both_pngs_and_closes_its_figures(tmp_path):
    before = plt.get_fignums()
    written = plot_run(_history(), tmp_path, TEST, config=CONFIG, best_epoch=2,
                       stopped_early=True)
    assert [p.name for p in written] == [CURVES_PNG, MEMBERS_PNG]
    assert all(p.stat().st_size > 1000 for p in written)
    assert plt.get_fignums() == before
    assert plot_run([], tmp_path / "none") == []


def test_a_run_passes_its_name_best_epoch_and_early_stop_to_the_plots(train_config, tmp_path,
                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "plot_run", lambda *a, **kw: calls.append(kw))
    _, metrics = run_training(train_config(epochs=2, max_steps_per_epoch=3, patience=1),
                              tmp_path / "run", quiet=True)
    (kw,) = calls
    assert kw["config"]["name"] == "synthetic-small"
    assert kw["best_epoch"] == metrics["best_epoch"]
    assert kw["stopped_early"] == metrics["stopped_early"]
    assert math.isfinite(metrics["fused"]["auc"])
