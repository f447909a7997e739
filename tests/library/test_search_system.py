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
from cetnet.search.system import (REPEATS, batch_sizes, measure_repeats,  # noqa: E402
                                  measure_throughput, run_system_search, sample_system)

DATA = ["data.num_rows=3000", "data.num_users=60", "data.num_items=120", "data.max_seq_len=6"]


def _options(tmp_path: Path, **kw) -> SearchOptions:
    kw.setdefault("trials", 4)
    kw.setdefault("sampler", "predictor")
    kw.setdefault("overrides", DATA)
    return SearchOptions(out=tmp_path / "out", dataset="synthetic", say=lambda text: None, **kw)


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


def test_a_system_study_measures_proposes_and_reports(tmp_path, monkeypatch):
    import cetnet.search.system as system

    monkeypatch.setattr(system, "STEPS", 4)  # 3 runs of 4 steps: this CPU is shared
    options = _options(tmp_path, command="cetnet search --system --dataset synthetic")
    study = run_system_search(options)
    out = options.out
    for name in ("SYSTEM.md", "system.csv", "best_system.yaml", "system.db"):
        assert (out / name).is_file(), name
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    # 2 random startup trials, then the throughput predictor proposes (its prediction kept)
    assert [("predicted_value" in t.user_attrs) for t in trials] == [False, False, True, True]
    for t in trials:  # the median of a few runs, each recorded
        runs = t.user_attrs["samples_per_s_repeats"]
        assert len(runs) == REPEATS == 3 and t.user_attrs["samples_per_s"] == sorted(runs)[1]
        assert t.value == pytest.approx(math.log(t.user_attrs["samples_per_s"]))
    csv_rows = (out / "system.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",runs,min_samples_per_s,max_samples_per_s")
    assert all(row.split(",")[-3] == "3" for row in csv_rows[1:])
    best = max(trials, key=lambda t: t.value)
    config = load_config(out / "best_system.yaml")
    assert config["train"]["batch_size"] == best.params["train.batch_size"]
    assert config["backend"] == best.params["backend"]
    report = (out / "SYSTEM.md").read_text()
    assert f"Fastest: trial {best.number}," in report and "Kendall tau" in report
    assert "Measured on cpu: each trial's throughput is the median of 3 runs of 4" in report
    with pytest.raises(SearchError, match="already exists"):
        run_system_search(_options(tmp_path))
    assert len(run_system_search(_options(tmp_path, resume=True)).trials) == 4  # nothing added


def _setting(tmp_path: Path, **train) -> tuple[dict, object]:
    base = _base(_options(tmp_path))
    dataset = _load_dataset(base)
    trial = optuna.trial.FixedTrial({"train.batch_size": 256, "threads": 1, "backend": "auto",
                                     "model.embedding_optimizer": "sgd"})
    config, _ = sample_system(trial, base, len(dataset.splits["train"]), max_threads=1)
    config["train"].update(train)
    return config, dataset


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_measured_step_clips_gradients_as_training_does(tmp_path, monkeypatch, clip):
    config, dataset = _setting(tmp_path, grad_clip=clip)
    norms: list[float] = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def clipped(params, max_norm, *args, **kw):
        norms.append(max_norm)
        return clip_grad_norm(params, max_norm, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipped)
    speeds = measure_repeats(config, dataset, 1, steps=2, warmup=1, repeats=2)
    assert len(speeds) == 2 and all(v > 0 and math.isfinite(v) for v in speeds)
    # every step, the warm-up's too, as EpochRunner.train's (train.grad_clip: none, never)
    assert norms == ([] if clip is None else [clip] * (1 + 2 * 2))


def test_the_model_and_batches_are_measured_on_the_configs_device(tmp_path, monkeypatch):
    import cetnet.train.loop as loop
    from cetnet import code_identity
    from cetnet.data.schema import Batch

    config, dataset = _setting(tmp_path)
    config["device"] = "cuda:1"
    there = torch.device("cpu", 0)  # what this machine would train "cuda:1" on (made up)
    asked: list[str] = []
    moved: dict[str, list] = {"model": [], "batch": []}

    def resolve(name: str, key: str = "config: device") -> torch.device:
        asked.append(name)
        return there

    to, to_device = torch.nn.Module.to, Batch.to_device

    def model_to(self, *args, **kw):
        moved["model"].append(args[0] if args else kw.get("device"))
        return to(self, *args, **kw)

    def batch_to_device(self, device):
        moved["batch"].append(device)
        return to_device(self, device)

    monkeypatch.setattr(loop, "resolve_device", resolve)
    monkeypatch.setattr(torch.nn.Module, "to", model_to)
    monkeypatch.setattr(Batch, "to_device", batch_to_device)
    measure_repeats(config, dataset, 1, steps=2, warmup=1, repeats=1)
    assert asked == ["cuda:1"]
    assert moved["model"] and all(d == there for d in moved["model"]), moved["model"]
    assert moved["batch"] == [there] * 3  # every step's batch, copied there as training does
    # a device this machine lacks is one error line before anything is measured; a study
    # measured on the CPU is not continued on another device
    monkeypatch.undo()
    with pytest.raises(SearchError, match="--system: config: device is 'cuda:1'"):
        run_system_search(_options(tmp_path, overrides=[*DATA, "device=cuda:1"]))
    run_system_search(_options(tmp_path, trials=1, sampler="random"))
    monkeypatch.setattr(loop, "resolve_device", lambda name, key="": torch.device("cuda", 0))
    monkeypatch.setattr(code_identity, "device_identity",  # (what a GPU would say)
                        lambda device: {"device": "NVIDIA H200 (sm_90)", "triton": "3.6.0"})
    with pytest.raises(SearchError, match="was started with another device"):
        run_system_search(_options(tmp_path, trials=2, sampler="random", resume=True))


def test_a_split_smaller_than_every_batch_size_is_one_error(tmp_path):
    options = SearchOptions(out=tmp_path / "o", dataset="synthetic",
                            overrides=["data.num_rows=200"], say=lambda t: None)
    with pytest.raises(SearchError, match="fewer than the smallest batch size 256"):
        run_system_search(options)


def test_a_system_study_of_other_code_is_resumed_only_when_asked(tmp_path, monkeypatch):
    """Speeds measured by other code (another kernel build) do not compare with new ones."""
    from cetnet import code_identity as ci

    study = run_system_search(_options(tmp_path, trials=1))
    mine = ci.code_identity("auto")
    assert study.user_attrs["setup"]["code"] == mine
    assert study.trials[0].user_attrs["code"] == ci.code_tag(mine)
    monkeypatch.setattr(ci, "code_identity", lambda device: {**mine, "digest": "0123456789abcdef"})
    with pytest.raises(SearchError, match=r"was run by other code.*--reuse-other-code"):
        run_system_search(_options(tmp_path, trials=2, resume=True))
    study = run_system_search(_options(tmp_path, trials=2, resume=True, reuse_other_code=True))
    assert [t.user_attrs["code"] for t in study.trials] == [
        ci.code_tag(mine), ci.code_tag({**mine, "digest": "0123456789abcdef"})]


def test_a_resume_with_other_data_and_search_flags_are_one_line_errors(tmp_path, capsys):
    study = run_system_search(_options(tmp_path, trials=1))
    # a study measured the earlier way (one run, no clipping: saved without the measurement)
    # is not resumed: the predictor would fit the two measures as one
    from cetnet.search.system import MEASUREMENT

    setup = dict(study.user_attrs["setup"])
    assert setup["measurement"] == MEASUREMENT
    study.set_user_attr("setup", {k: v for k, v in setup.items() if k != "measurement"})
    with pytest.raises(SearchError, match=r"was measured by another cetnet \(measurement 1: "
                                          r"one run .* start a new study"):
        run_system_search(_options(tmp_path, trials=2, resume=True))
    study.set_user_attr("setup", setup)
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
