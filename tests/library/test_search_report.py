"""SEARCH.md, trials.csv and pareto.csv of a study, from trials made by hand (no training): the
objective a --cost-weight study maximizes, correlations over finite values of distinct
configs, one front row per config, and why a trial has no SiGeo statistics."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

from cetnet.search.report import write_outputs  # noqa: E402

COMPLETE = optuna.trial.TrialState.COMPLETE
LR = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)


def _study(trials: list[dict[str, Any]], setup: dict | None = None) -> Any:
    """An in-memory single-objective study of completed trials whose user attributes are
    ``trials`` (each with an ``lr`` parameter and its value, the objective)."""
    study = optuna.create_study(direction="maximize", study_name="hand")
    if setup is not None:
        study.set_user_attr("setup", setup)
    for i, attrs in enumerate(trials):
        attrs = {"proxy_auc": 0.6, "flops": 1000.0, "params": 100,
                 "run_dir": f"/runs/{i}", **attrs}
        value = attrs.get("objective", attrs["valid_auc"])
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-3 * (i + 1)}, distributions={"lr": LR}, value=value,
            user_attrs=attrs, state=COMPLETE))
    return study


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _objective(auc: float, flops: float, weight: float) -> float:
    return auc - weight * math.log10(flops)


def test_a_cost_weight_study_reports_the_objective_it_maximizes(tmp_path):
    # trial 0 has the higher AUC, trial 1 the better objective (100x fewer FLOPs)
    trials = [{"valid_auc": 0.80, "flops": 1e6, "objective": _objective(0.80, 1e6, 0.05)},
              {"valid_auc": 0.75, "flops": 1e4, "objective": _objective(0.75, 1e4, 0.05)}]
    for weight in (None, 0.05):  # read from the study's recorded setup, or given
        out = tmp_path / str(weight)
        out.mkdir()
        given = {} if weight is None else {"cost_weight": weight}
        result = write_outputs(_study(trials, setup={"cost_weight": 0.05}), out, ["auc"],
                               "cetnet search --cost-weight 0.05", **given)
        report = (out / "SEARCH.md").read_text()
        assert result["best"]["number"] == 1
        assert "Objective: auc - 0.05 * log10(FLOPs per sample)" in report, report
        assert "Trial 1: objective 0.5500, validation AUC 0.7500" in report, report
    # without a cost weight, the AUC alone, as before
    out = tmp_path / "plain"
    out.mkdir()
    write_outputs(_study([{"valid_auc": 0.8}]), out, ["auc"], "cetnet search")
    report = (out / "SEARCH.md").read_text()
    assert "Objective: auc (maximize validation AUC)." in report
    assert "Trial 0: validation AUC 0.8000" in report


def _ranked(n: int = 5) -> list[dict[str, Any]]:
    """``n`` trials whose proxies, FLOPs and parameters all rank as their AUC does."""
    return [{"valid_auc": a, "proxy_auc": a - 0.1, "sigeo": 10 * a, "flops": 1000.0 * (i + 1),
             "params": 100 * (i + 1), "run_dir": f"/runs/{i}"}
            for i, a in enumerate(0.70 + 0.02 * i for i in range(n))]


def test_correlations_skip_non_finite_values(tmp_path):
    trials = _ranked()
    trials[2]["sigeo"] = math.nan  # one trial's statistics diverged: that row only loses it
    trials[4]["zico"] = math.inf
    corr = write_outputs(_study(trials), tmp_path, ["auc"], "cetnet search")["correlation"]
    assert corr["proxy_auc"]["n"] == 5 and corr["proxy_auc"]["kendall_tau"] == pytest.approx(1)
    assert corr["sigeo"]["n"] == 4 and corr["sigeo"]["kendall_tau"] == pytest.approx(1)
    assert corr["zico"]["n"] == 0
    report = (tmp_path / "SEARCH.md").read_text()
    assert "| SiGeo-style score (zico + fisher_rao - warm-up loss) | 4 | 1.000 | 1.000 |" \
        in report, report


def test_a_config_drawn_again_counts_once_on_the_front_and_in_correlations(tmp_path):
    # trials 5 and 6 drew trial 4's config again: its run, reused, the same numbers
    trials = _ranked()
    trials += [dict(trials[4]), dict(trials[4])]
    corr = write_outputs(_study(trials), tmp_path, ["auc"], "cetnet search")["correlation"]
    assert corr["proxy_auc"]["n"] == 5 and corr["flops"]["n"] == 5
    # the front: every config once (here all five: more FLOPs, more AUC), the repeats named
    assert [r["number"] for r in _rows(tmp_path / "pareto.csv")] == ["0", "1", "2", "3", "4"]
    report = (tmp_path / "SEARCH.md").read_text()
    assert "| 4 (= 5, 6) | 0.7800 |" in report, report
    assert len(_rows(tmp_path / "trials.csv")) == 7  # trials.csv keeps every trial


def test_trials_csv_says_why_a_trial_has_no_sigeo_statistics(tmp_path):
    write_outputs(_study([{"valid_auc": 0.7, "proxy_error": "too few batches: 1"},
                          {"valid_auc": 0.8, "sigeo": 1.0}]), tmp_path, ["auc"], "x")
    rows = _rows(tmp_path / "trials.csv")
    assert [r["proxy_error"] for r in rows] == ["too few batches: 1", ""]
