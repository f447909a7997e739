"""``cetnet search --system``: measured throughput of system settings, the predictor's
proposals, the report and the best settings as a config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from cetnet.config import load_config  # noqa: E402
from cetnet.search.engine import SearchError, SearchOptions, _base, _load_dataset  # noqa: E402
from cetnet.search.system import (batch_sizes, measure_throughput,  # noqa: E402
                                  run_system_search, sample_system)

DATA = ["data.num_rows=3000", "data.num_users=60", "data.num_items=120", "data.max_seq_len=6"]


def _options(tmp_path: Path, **kw) -> SearchOptions:
    kw.setdefault("trials", 4)
    kw.setdefault("sampler", "predictor")
    return SearchOptions(out=tmp_path / "out", dataset="synthetic", overrides=DATA,
                         say=lambda text: None, **kw)


def test_measured_throughput_is_positive_and_threads_are_restored(tmp_path):
    base = _base(_options(tmp_path))
    dataset = _load_dataset(base)
    trial = optuna.trial.FixedTrial({"train.batch_size": 256, "threads": 1, "backend": "auto",
                                     "model.embedding_optimizer": "sgd"})
    config, threads = sample_system(trial, base, len(dataset.splits["train"]), max_threads=2)
    assert config["train"]["batch_size"] == 256 and config["backend"] == "auto"
    assert config["model"]["embedding_optimizer"] == "sgd" and threads == 1
    before = torch.get_num_threads()
    speed = measure_throughput(config, dataset, threads, steps=2, warmup=1)
    assert speed > 0 and math.isfinite(speed) and torch.get_num_threads() == before
    # the reference backend has no fused optimizer: not sampled, null
    ref, _ = sample_system(optuna.trial.FixedTrial({"train.batch_size": 256, "threads": 1,
                                                     "backend": "reference"}), base, 2400)
    assert ref["model"]["embedding_optimizer"] is None
    assert batch_sizes(300) == [256] and batch_sizes(100) == []


def test_a_system_study_measures_proposes_and_reports(tmp_path):
    options = _options(tmp_path, command="cetnet search --system --dataset synthetic")
    study = run_system_search(options)
    out = options.out
    for name in ("SYSTEM.md", "system.csv", "best_system.yaml", "system.db"):
        assert (out / name).is_file(), name
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    # 2 random startup trials, then the throughput predictor proposes (its prediction kept)
    assert [("predicted_value" in t.user_attrs) for t in trials] == [False, False, True, True]
    for t in trials:
        assert t.value == pytest.approx(math.log(t.user_attrs["samples_per_s"]))
    best = max(trials, key=lambda t: t.value)
    config = load_config(out / "best_system.yaml")
    assert config["train"]["batch_size"] == best.params["train.batch_size"]
    assert config["backend"] == best.params["backend"]
    report = (out / "SYSTEM.md").read_text()
    assert f"Fastest: trial {best.number}," in report and "Kendall tau" in report
    with pytest.raises(SearchError, match="already exists"):
        run_system_search(_options(tmp_path))
    assert len(run_system_search(_options(tmp_path, resume=True)).trials) == 4  # nothing added


def test_a_split_smaller_than_every_batch_size_is_one_error(tmp_path):
    options = SearchOptions(out=tmp_path / "o", dataset="synthetic",
                            overrides=["data.num_rows=200"], say=lambda t: None)
    with pytest.raises(SearchError, match="fewer than the smallest batch size 256"):
        run_system_search(options)


def test_a_resume_with_other_data_and_search_flags_are_one_line_errors(tmp_path, capsys):
    run_system_search(_options(tmp_path, trials=1))
    other = SearchOptions(out=tmp_path / "out", dataset="synthetic", resume=True, trials=2,
                          overrides=[*DATA[1:], "data.num_rows=9000"], say=lambda t: None)
    with pytest.raises(SearchError, match="was started with another overrides, batch_sizes") \
            as refused:
        run_system_search(other)
    # what differs, so that the user can give the study's own options
    text = str(refused.value)
    assert "the study's overrides ['data.num_rows=3000'" in text, text
    assert "'data.num_rows=9000']" in text, text
    from cetnet.cli import main

    status = main(["search", "--system", "--dataset", "synthetic", "--out", str(tmp_path / "x"),
                   "--objective", "auc,cost", "--max-cost", "1e6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "--system measures one model's settings: --objective, --max-cost" in err[0]
