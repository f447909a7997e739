"""What a run records besides checkpoints: train.log, history.csv, TensorBoard events (when
tensorboard is installed) and the environment in metrics.json; a resumed run's files match its
last.pt. The dataset and model come from the ``train_config`` fixture (tests/conftest.py)."""

from __future__ import annotations

import csv

import pytest
import torch

from cetnet.train import run_training
from cetnet.train.rundir import foreign_files, read_json
from cetnet.train.runlog import HISTORY_FILE, LOG_FILE, tensorboard_available


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_csv_and_environment(train_config, tmp_path, capsys):
    run_dir, metrics = run_training(train_config(epochs=2), tmp_path / "run", plots=False)
    out = capsys.readouterr().out
    log = (run_dir / LOG_FILE).read_text()
    assert "epoch 1/2: train loss" in log and "epoch 2/2" in log and "fused" in log
    assert "epoch 2/2" in out  # printed as well
    rows = _csv(run_dir / HISTORY_FILE)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, h in zip(rows, metrics["history"]):
        assert float(row["valid_auc"]) == pytest.approx(h["valid"]["fused"]["auc"])
        assert float(row["train_loss"]) == pytest.approx(h["train_loss"])
        assert float(row["valid_auc_dnn"]) == pytest.approx(h["valid"]["members"]["dnn"]["auc"])
    env = read_json(run_dir / "metrics.json")["environment"]
    assert env["torch_version"] == torch.__version__ and env["world_size"] == 1
    assert env["device"] == "cpu" and env["torch_threads"] >= 1 and env["cpu_capability"]
    assert not foreign_files(run_dir)  # --overwrite knows every file a run writes


def test_quiet_run_still_logs_to_its_file(train_config, tmp_path, capsys):
    run_dir, _ = run_training(train_config(epochs=1), tmp_path / "run", quiet=True, plots=False)
    assert "epoch 1/1" not in capsys.readouterr().out
    assert "epoch 1/1" in (run_dir / LOG_FILE).read_text()


def test_resumed_run_extends_the_csv(train_config, tmp_path):
    run_dir, _ = run_training(train_config(epochs=1), tmp_path / "run", quiet=True, plots=False)
    run_training(train_config(epochs=3), run_dir, resume=True, quiet=True, plots=False)
    assert [int(r["epoch"]) for r in _csv(run_dir / HISTORY_FILE)] == [1, 2, 3]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_scalars(train_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = run_training(train_config(epochs=2), tmp_path / "run", quiet=True,
                                    plots=False)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train_loss", "lr", "valid/auc", "valid/auc_dnn"} <= set(tags)
    auc = [e.value for e in acc.Scalars("valid/auc")]
    assert [e.step for e in acc.Scalars("valid/auc")] == [1, 2]
    assert auc == pytest.approx([h["valid"]["fused"]["auc"] for h in metrics["history"]])
