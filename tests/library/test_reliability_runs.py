"""A run is never lost or mixed, and training never goes on through NaN.

- a non-finite training loss stops the run naming the epoch and step; last.pt keeps the last
  good epoch and resumes; a NaN validation AUC is never the best;
- nothing is written before the whole run is checked; a failed --resume leaves config.yaml as
  it was; a finished run is not silently re-run;
- one directory, one run: a non-empty --out is refused unless --resume / --overwrite, and a lock
  makes a second concurrent run (a real second process) fail at once;
- stale temporaries are swept, every file of a run gets the same permissions;
- unreadable checkpoints and missing ones (by name in the run directory, or by path, as
  predict takes them) are one-line errors.

Dataset and model come from the ``train_config`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cetnet.cli import main
from cetnet.config import ConfigError, dump_config, read_yaml
from cetnet.train import (BEST, LAST, CheckpointError, RunDirError, TrainingError, check_run,
                          evaluate_run, load_checkpoint, run_training)
from cetnet.train import loop as loop_module
from cetnet.train.rundir import LOCK_FILE, RunLock, make_run_dir, read_json

from helpers import flip_a_stored_byte

TIMING_KEYS = ("train_seconds", "train_samples_per_s")


def _quick(train_config, **train):
    return train_config(**{"epochs": 2, "max_steps_per_epoch": 4, "patience": None, **train})


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def _one_error_line(err: str, command: str = "train") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cetnet {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- training through NaN -------------------------------------------------------------------------

def _poison(epoch_to_poison: int):
    """An epoch-end callback that puts a NaN into the model's weights after that epoch (after
    its checkpoints are written): the next epoch's first loss is NaN."""
    def callback(epoch: int, entry: dict) -> None:
        if epoch == epoch_to_poison:
            model = callback.model
            with torch.no_grad():
                next(iter(model.dense_parameters())).fill_(float("nan"))
    return callback


def test_a_nan_loss_stops_the_run_keeping_the_last_good_epoch(train_config, tmp_path,
                                                              monkeypatch):
    cfg = _quick(train_config, epochs=3)
    straight, _ = run_training(cfg, tmp_path / "straight", quiet=True, plots=False)

    poison = _poison(1)
    real_fit = loop_module.fit

    def fit_with_handle(model, *args, **kwargs):
        poison.model = model
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr("cetnet.train.runner.fit", fit_with_handle)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        run_training(cfg, run_dir, quiet=True, plots=False, on_epoch_end=poison)
    message = str(info.value)
    # Before: the run trained on through NaN and wrote NaN checkpoints as 'last'
    assert message.startswith("epoch 2, step 1/4: the training loss is nan; the run stopped "
                              "before saving this epoch; last.pt keeps epoch 1")
    assert f"cetnet train --resume {run_dir}" in message
    assert load_checkpoint(run_dir / LAST)["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()
    monkeypatch.undo()

    # last.pt of epoch 1 resumes into exactly the uninterrupted run
    resumed, _ = run_training(cfg, run_dir, resume=True, quiet=True, plots=False)
    a, b = read_json(straight / "metrics.json"), read_json(resumed / "metrics.json")
    assert _without_timing(a) == _without_timing(b)


def test_a_loss_that_overflows_on_the_first_epoch_leaves_nothing_to_resume(train_config,
                                                                           tmp_path, capsys):
    cfg = _quick(train_config, epochs=1, lr=1e30, lr_schedule="constant", warmup_steps=0,
                 log_every=1)
    config = tmp_path / "c.yaml"
    dump_config(cfg, config)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet",
                 "--no-plots"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "epoch 1, step " in line and "the training loss is" in line
    assert "no epoch had finished, so there is nothing to resume" in line
    assert not (tmp_path / "run" / LAST).exists()


def test_a_nan_validation_auc_is_never_the_best(train_config, tmp_path, monkeypatch):
    real_evaluate = loop_module.evaluate
    calls = []

    def evaluate_nan_first(model, split, **kwargs):
        out = real_evaluate(model, split, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the first validation: as if the predictions were NaN
            out["fused"] = {k: float("nan") for k in out["fused"]}
        return out

    monkeypatch.setattr(loop_module, "evaluate", evaluate_nan_first)
    _, metrics = run_training(_quick(train_config), tmp_path / "run", quiet=True, plots=False)
    # Before: epoch 1 was 'best' because nothing was best yet, NaN and all
    assert metrics["best_epoch"] == 2
    assert load_checkpoint(tmp_path / "run" / BEST)["epoch"] == 2
    assert math.isnan(metrics["history"][0]["valid"]["fused"]["auc"]) or \
        metrics["history"][0]["valid"]["fused"]["auc"] is None


def test_no_finite_validation_auc_at_all_is_an_error_not_a_nan_best(train_config, tmp_path,
                                                                     monkeypatch):
    real_evaluate = loop_module.evaluate

    def evaluate_nan(model, split, **kwargs):
        out = real_evaluate(model, split, **kwargs)
        out["fused"] = {k: float("nan") for k in out["fused"]}
        return out

    monkeypatch.setattr(loop_module, "evaluate", evaluate_nan)
    with pytest.raises(TrainingError, match=r"none of the 2 epochs had a finite validation AUC"
                                            r".*last.pt keeps epoch 2"):
        run_training(_quick(train_config), tmp_path / "run", quiet=True, plots=False)
    assert not (tmp_path / "run" / BEST).exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_single_class_valid_split_is_refused_before_training(train_config, tmp_path,
                                                               monkeypatch):
    from cetnet.train import builders

    real = builders.load_dataset

    def one_class(name, **options):
        ds = real(name, **options)
        ds.splits["valid"].label.zero_()
        return ds

    monkeypatch.setattr("cetnet.train.runner.load_dataset", one_class)
    with pytest.raises(TrainingError, match=r"the valid split has only negative labels \(300 "
                                            r"rows\): its AUC is undefined"):
        run_training(_quick(train_config), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


# --- nothing written before the run is checked ---------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"train": {"lr": float("inf")}}, "train.lr must be finite"),
    ({"train": {"seed": 2**64}}, "train.seed must be in"),
    ({"model": {"dnn": {"hidden": [-1]}}}, r"model.dnn.hidden\[0\] must be in \[1, "),
    ({"model": {"fusion": {"temperature": True}}}, "model.fusion.temperature must be a float"),
    ({"data": {"name": "no-such-dataset"}}, "no-such-dataset"),
])
def test_no_run_directory_before_the_config_is_checked(train_config, tmp_path, overrides,
                                                       message):
    cfg = _quick(train_config)
    for section, values in overrides.items():
        cfg[section] = {**cfg[section], **values}
    with pytest.raises(ConfigError, match=message):
        run_training(cfg, tmp_path / "deep" / "run", quiet=True)
    assert not (tmp_path / "deep").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_clear_error(train_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    dump_config(_quick(train_config), config)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--device", "cuda"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config: device is 'cuda' but CUDA is not available" in line
    assert not (tmp_path / "run").exists()


def test_dry_run_checks_everything_and_writes_nothing(train_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    dump_config(_quick(train_config), config)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--dry-run", "model.dnn.hidden=[4096, 4096]"]) == 0
    out = capsys.readouterr().out
    assert "dry run: " in out and "parameters" in out and "no run was written" in out
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", str(config), "--dry-run", "model.dnn.hidden=[0]"]) == 2
    assert "model.dnn.hidden[0] must be in [1, " in _one_error_line(capsys.readouterr().err)


# --- resume: validate first, write config.yaml last ----------------------------------------------

def _is_event_file(name: str) -> bool:
    """TensorBoard's event file (written when tensorboard is installed)."""
    return name.startswith("events.out.tfevents.")


def _finished_run(train_config, tmp_path, **train) -> tuple[Path, Path]:
    config = tmp_path / "c.yaml"
    dump_config(_quick(train_config, **train), config)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet",
                 "--no-plots"]) == 0
    return config, run_dir


def test_a_failed_resume_changes_nothing(train_config, tmp_path, capsys):
    _, run_dir = _finished_run(train_config, tmp_path)
    (run_dir / "metrics.json").unlink()  # as if interrupted after its last checkpoint
    before = _snapshot(run_dir)
    capsys.readouterr()
    # an override that changes the architecture: before, config.yaml was rewritten first and
    # then loading last.pt failed, leaving a run neither evaluate nor --resume could use
    assert main(["train", "--resume", str(run_dir), "model.dnn.hidden=[64]"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "resume: model.dnn.hidden[0]: 32 -> 64: a resumed run keeps the data and the model" \
        in line
    assert _snapshot(run_dir) == before
    assert main(["evaluate", str(run_dir), "--checkpoint", LAST]) == 0
    assert main(["train", "--resume", str(run_dir), "--quiet", "--no-plots"]) == 0
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 2


def test_a_checkpoint_of_another_architecture_is_refused_before_writing(train_config,
                                                                        tmp_path, capsys):
    config, run_dir = _finished_run(train_config, tmp_path, epochs=1)
    (run_dir / "config.yaml").unlink()  # nothing to compare the config with: last.pt decides
    other = tmp_path / "other.yaml"
    cfg = _quick(train_config, epochs=2)
    cfg["model"]["dnn"]["hidden"] = [64]
    dump_config(cfg, other)
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--config", str(other)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run_dir / LAST} does not fit the model of the config" in line
    assert "other shapes (checkpoint vs model): members.dnn.mlp.0.weight (32, " in line
    assert _snapshot(run_dir) == before  # no config.yaml written


def test_a_run_saved_before_the_temperature_bounds_were_kept_still_loads(train_config,
                                                                         tmp_path):
    """A learned temperature's state now keeps its bounds (CETNetFusion's
    temperature_bounds): checkpoints saved without them still fit, evaluate and resume (a run
    is never lost to a new state key)."""
    cfg = _quick(train_config, epochs=1)
    cfg["model"]["fusion"]["learnable_temperature"] = True
    config = tmp_path / "c.yaml"
    dump_config(cfg, config)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet",
                 "--no-plots"]) == 0
    scored = evaluate_run(run_dir, "test", write=False)
    for name in (BEST, LAST):
        state = load_checkpoint(run_dir / name)
        assert "fusion.temperature_bounds" in state["model"]
        del state["model"]["fusion.temperature_bounds"]
        torch.save(state, run_dir / name)
    assert evaluate_run(run_dir, "test", write=False)["fused"] == scored["fused"]
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet",
                 "--no-plots"]) == 0


def test_resuming_a_finished_run_does_not_rewrite_its_config(train_config, tmp_path, capsys):
    _, run_dir = _finished_run(train_config, tmp_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    # Before: --epochs 1 on a finished 2-epoch run rewrote config.yaml to 1 epoch and the
    # test scores again
    assert main(["train", "--resume", str(run_dir), "--epochs", "1"]) == 2
    assert "train.epochs=1 is below the 2 epochs the run in" in \
        _one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "has finished its 2 epochs: nothing to resume; give train.epochs > 2" in \
        _one_error_line(capsys.readouterr().err)
    assert _snapshot(run_dir) == before
    # training on is said, not silent
    assert main(["train", "--resume", str(run_dir), "--epochs", "3", "train.log_every=7",
                 "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "resume: train.epochs: 2 -> 3 (config.yaml is updated)" in err
    assert "resume: train.log_every: 20 -> 7" in err
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 3


def test_an_early_stopped_run_is_finished(train_config, tmp_path, capsys):
    _, run_dir = _finished_run(train_config, tmp_path, epochs=5, lr=0.0, patience=1)
    assert read_json(run_dir / "metrics.json")["stopped_early"] is True
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--epochs", "9"]) == 2
    assert "stopped early at epoch 2 (1 epochs without a better validation AUC) and has " \
           "finished" in _one_error_line(capsys.readouterr().err)


# --- one directory, one run --------------------------------------------------------------------

def test_a_used_out_directory_is_refused_without_resume_or_overwrite(train_config, tmp_path,
                                                                     capsys):
    config, run_dir = _finished_run(train_config, tmp_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    # Before: a second `cetnet train --out run` silently overwrote the finished run
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--seed", "5"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run_dir} already holds a run (best.pt, config.yaml, " in line
    assert f"continue it with --resume {run_dir}, replace it with --overwrite" in line
    assert _snapshot(run_dir) == before
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--overwrite",
                 "--resume", str(run_dir)]) == 2
    assert "give one" in _one_error_line(capsys.readouterr().err)
    # a run stopped before its first checkpoint: --resume is not offered (it has nothing)
    for name in (LAST, "last.prev.pt", BEST):
        (run_dir / name).unlink(missing_ok=True)
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "without a checkpoint" in line and "--resume" not in line and "--overwrite" in line


def test_overwrite_clears_the_old_run_first(train_config, tmp_path, capsys):
    config, run_dir = _finished_run(train_config, tmp_path)
    assert main(["evaluate", str(run_dir)]) == 0
    stale = run_dir / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--overwrite",
                 "--epochs", "1", "--quiet", "--no-plots"]) == 0
    names = sorted(p.name for p in run_dir.iterdir() if not _is_event_file(p.name))
    # the old run's eval_test.json (of another checkpoint) and temporaries are gone
    assert names == [LOCK_FILE, BEST, "config.yaml", "history.csv", LAST, "metrics.json",
                     "train.log"]
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 1
    assert "epochs: 1" in (run_dir / "config.yaml").read_text()

    (run_dir / "notes.txt").write_text("mine")
    before = _snapshot(run_dir)
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--overwrite"]) == 2
    assert "holds files that are not a cetnet run's (notes.txt); refusing to delete them" in \
        _one_error_line(capsys.readouterr().err)
    assert _snapshot(run_dir) == before
    # without --overwrite: --overwrite is not suggested when it would refuse
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--overwrite" not in line
    only_mine = tmp_path / "mine"
    only_mine.mkdir()
    (only_mine / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(config), "--out", str(only_mine)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds files that are not a cetnet run's (notes.txt): give another --out" in line
    assert "--overwrite" not in line


def test_overwrite_replaces_a_run_with_its_export_and_predictions_beside_it(train_config,
                                                                             tmp_path):
    # the README's export (RUN_DIR/model.pt2) and the examples' default outputs were foreign
    # files: --overwrite refused the directory
    config = tmp_path / "c.yaml"
    dump_config(train_config(epochs=1), config)
    run_dir = tmp_path / "run"
    argv = ["train", "--config", str(config), "--out", str(run_dir), "--quiet", "--no-plots"]
    assert main(argv) == 0
    for name in ("model.pt2", "model.check.pt", "predictions_test.csv", "predictions_new.csv"):
        (run_dir / name).write_text("derived from the old run")
    assert main([*argv, "--overwrite"]) == 0
    assert not any((run_dir / n).exists() for n in ("model.pt2", "predictions_test.csv"))


def test_train_or_reuse_reuses_only_a_finished_run_of_the_same_config(train_config,
                                                                      tmp_path, capsys):
    """The job runner of reproduce and search: a finished run of this config is reused, an
    interrupted one resumed, one of another config or with a damaged checkpoint trained again;
    never a result of another config."""
    from cetnet.train.runner import train_or_reuse

    config, run_dir = _quick(train_config, epochs=1), tmp_path / "run"
    first, reused = train_or_reuse(config, run_dir)
    assert not reused and first["epochs_completed"] == 1
    again, reused = train_or_reuse(config, run_dir)
    assert reused and again == first

    # interrupted after epoch 1 of 2 (no metrics.json): resumed, not started over
    longer = _quick(train_config, epochs=2)
    (run_dir / "metrics.json").unlink()
    resumed, reused = train_or_reuse(longer, run_dir)
    assert not reused and resumed["epochs_completed"] == 2
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]

    # a finished run of another model: neither reused nor resumed; trained again in its place
    other = _quick(train_config, epochs=1)
    other["model"]["dnn"]["hidden"] = [8]
    capsys.readouterr()
    fresh, reused = train_or_reuse(other, run_dir)
    assert not reused and fresh["epochs_completed"] == 1
    assert read_yaml(run_dir / "config.yaml")["model"]["dnn"]["hidden"] == [8]

    # a damaged checkpoint of an interrupted run: said on one line, then trained again
    (run_dir / "metrics.json").unlink()
    for name in (LAST, "last.prev.pt"):
        if (run_dir / name).exists():
            (run_dir / name).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    other["train"]["epochs"] = 2
    _, reused = train_or_reuse(other, run_dir)
    assert not reused
    assert f"cannot resume {run_dir} (CheckpointError: " in capsys.readouterr().err
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 2


def test_an_interrupted_extension_is_finished_not_taken_for_the_shorter_run(train_config,
                                                                             tmp_path, capsys):
    """A finished 1-epoch run resumed to 3 epochs and interrupted after epoch 2 holds the
    1-epoch run's metrics.json beside epoch 2's last.pt: the run is not finished. A resume to
    2 epochs scores epoch 2 (before: "has finished its 2 epochs: nothing to resume", and the
    directory stayed mixed), and the job runner does not reuse the stale metrics for the
    3-epoch config (before: reused, epochs_completed 1) but trains on."""
    import shutil

    from cetnet.train.runner import train_or_reuse

    _, run_dir = _finished_run(train_config, tmp_path, epochs=1)

    def stop_after_epoch_2(epoch: int, entry: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    longer = _quick(train_config, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        run_training(longer, run_dir, resume=True, quiet=True, plots=False,
                     on_epoch_end=stop_after_epoch_2)
    assert load_checkpoint(run_dir / LAST)["epoch"] == 2
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 1
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / LOCK_FILE).unlink(missing_ok=True)

    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "train.epochs=2", "--quiet",
                 "--no-plots"]) == 0, capsys.readouterr().err
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == 2

    metrics, reused = train_or_reuse(longer, copy)
    assert not reused and metrics["epochs_completed"] == 3
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "cetnet", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _consistent_run(run_dir: Path, seed: int | None = None) -> None:
    """One run's files: its config, checkpoints and metrics agree (evaluate reproduces them)."""
    metrics = read_json(run_dir / "metrics.json")
    config = (run_dir / "config.yaml").read_text()
    if seed is not None:
        assert f"seed: {seed}" in config
    assert load_checkpoint(run_dir / LAST)["epoch"] == metrics["epochs_completed"]
    again = evaluate_run(run_dir, "test", write=False)
    assert again["fused"] == metrics["fused"] and again["members"] == metrics["members"]


def test_two_concurrent_runs_into_one_directory_one_wins(train_config, tmp_path):
    config = tmp_path / "c.yaml"
    dump_config(_quick(train_config, epochs=2, max_steps_per_epoch=6), config)
    run_dir = tmp_path / "run"
    procs = [_cli(["train", "--config", str(config), "--out", str(run_dir), "--seed",
                   str(seed), "--quiet", "--no-plots"], tmp_path) for seed in (1, 2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (winner_seed,) = [seed for seed, (code, _, _) in zip((1, 2), results) if code == 0]
    (loser_err,) = [err for code, _, err in results if code == 2]
    line = _one_error_line(loser_err)
    assert "another cetnet process is using it" in line or "already holds a run" in line
    _consistent_run(run_dir, winner_seed)


_HOLD_LOCK = """
import sys
from cetnet.train.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_a_process_holding_the_lock_turns_a_run_away_at_once(train_config, tmp_path, capsys):
    config, run_dir = _finished_run(train_config, tmp_path)
    (run_dir / "metrics.json").unlink()  # resumable: only the lock stands in the way
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run_dir)
        capsys.readouterr()
        for argv in (["train", "--resume", str(run_dir)],
                     ["train", "--config", str(config), "--out", str(run_dir), "--overwrite"],
                     ["train", "--resume", str(run_dir), "--dry-run"]):
            assert main(argv) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert f"{run_dir}: another cetnet process is using it (pid {holder.pid}) (it " \
                   f"holds {run_dir / LOCK_FILE})" in line, argv
        assert main(["evaluate", str(run_dir)]) == 2
        assert "a training run is writing it" in \
            _one_error_line(capsys.readouterr().err, "evaluate")
        assert _snapshot(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the OS released the lock with the process: the run goes on
    assert main(["train", "--resume", str(run_dir), "--quiet", "--no-plots"]) == 0
    _consistent_run(run_dir, 0)


def test_evaluate_and_training_exclude_each_other_in_one_process(train_config, tmp_path):
    run_dir, _ = run_training(_quick(train_config, epochs=1), tmp_path / "run", quiet=True,
                              plots=False)
    with RunLock(run_dir):
        with pytest.raises(RunDirError, match="a training run is writing it"):
            evaluate_run(run_dir)
        assert evaluate_run(run_dir, write=False)["split"] == "test"  # reading needs no lock
    with RunLock(run_dir, shared=True), RunLock(run_dir, shared=True):  # evaluations share
        with pytest.raises(RunDirError, match="another cetnet process is using it"):
            RunLock(run_dir).acquire()
    assert evaluate_run(run_dir)["split"] == "test"


def test_default_run_directories_are_claimed_exclusively(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = {make_run_dir("same") for _ in range(3)}  # within one second: -2, -3
    assert len(dirs) == 3 and all(d.is_dir() for d in dirs)


# --- temporaries and permissions ---------------------------------------------------------------

def test_stale_temporaries_are_swept_at_run_start(train_config, tmp_path):
    cfg = _quick(train_config, epochs=1)
    run_dir, _ = run_training(cfg, tmp_path / "run", quiet=True, plots=False)
    old, young = run_dir / ".last.pt.old123.tmp", run_dir / ".best.pt.new456.tmp"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    run_training(_quick(train_config, epochs=2), run_dir, resume=True, quiet=True, plots=False)
    assert not old.exists()
    assert young.exists()  # it may belong to a write in progress


def test_every_file_of_a_run_gets_the_same_permissions(train_config, tmp_path):
    pytest.importorskip("matplotlib")
    previous = os.umask(0o027)
    try:
        run_dir, _ = run_training(_quick(train_config, epochs=1), tmp_path / "run", quiet=True)
        evaluate_run(run_dir, "valid")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
    assert {n for n in modes if not _is_event_file(n)} == {
        LOCK_FILE, BEST, LAST, "config.yaml", "metrics.json", "curves.png", "members_auc.png",
        "eval_valid.json", "train.log", "history.csv"}
    # before: config.yaml and the plots were written by open()/savefig, not atomically
    assert set(modes.values()) == {0o640}, modes


# --- unreadable checkpoints, checkpoints outside the run ---------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", "empty file (0 bytes), not a checkpoint"),
    (lambda b: b[:len(b) // 2], "not a readable checkpoint ("),
    (lambda b: b"hello" * 20, "not a readable checkpoint (100 bytes, truncated or corrupt"),
    # one flipped bit in a weight loaded silently as another value before the CRCs were read
    (flip_a_stored_byte, "not a readable checkpoint (its part "),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(train_config, tmp_path, capsys,
                                                         damage, message):
    _, run_dir = _finished_run(train_config, tmp_path)
    # every checkpoint damaged: last.prev.pt too, else resume falls back to it (tested elsewhere)
    for name in (BEST, LAST, "last.prev.pt"):
        path = run_dir / name
        path.write_bytes(damage(path.read_bytes()))
    config_before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert f"{run_dir / BEST}: {message}" in line
    assert main(["train", "--resume", str(run_dir), "--epochs", "3"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run_dir / LAST}: {message}" in line
    assert (run_dir / "config.yaml").read_bytes() == config_before
    with pytest.raises(CheckpointError):
        load_checkpoint(run_dir / LAST)


def test_a_checkpoint_that_is_no_mapping_or_lacks_the_model(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list.pt: not a cetnet checkpoint \(it holds a "
                                              r"list, not a mapping\)"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"epoch": 1}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match=r"not a complete cetnet checkpoint \(no model\)"):
        load_checkpoint(tmp_path / "nomodel.pt", keys=("model",))


def test_evaluate_reads_a_checkpoint_by_name_or_path_as_predict_does(train_config, tmp_path,
                                                                     capsys):
    """evaluate takes --checkpoint as predict and export do (cetnet.serve.checkpoint_file): a
    bare name is a file of the run directory, anything with a '/' a path; it refused paths."""
    _, run_dir = _finished_run(train_config, tmp_path)
    outside = tmp_path / "outside.pt"
    outside.write_bytes((run_dir / BEST).read_bytes())
    (run_dir / "link.pt").symlink_to(outside)
    capsys.readouterr()
    for name, message in (("../no-such-dir/outside.pt",
                           "--checkpoint ../no-such-dir/outside.pt: no such file"),
                          ("..", f"--checkpoint: no .. in {run_dir}"),
                          ("", "--checkpoint: expected best.pt, last.pt or a path"),
                          ("nope.pt", f"no nope.pt in {run_dir}")):
        assert main(["evaluate", str(run_dir), "--checkpoint", name]) == 2
        assert message in _one_error_line(capsys.readouterr().err, "evaluate"), name
    assert not list(run_dir.glob("eval_*.json"))
    for name in (str(outside), "link.pt", LAST):
        assert main(["evaluate", str(run_dir), "--checkpoint", name]) == 0
    assert len(list(run_dir.glob("eval_test_*.json"))) == 3


def test_check_run_loads_and_checks_the_resume_checkpoint(train_config, tmp_path):
    cfg = _quick(train_config)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        check_run(cfg, tmp_path / "none", resume=True)
    run_training(_quick(train_config, epochs=1), tmp_path / "run", quiet=True, plots=False)
    plan = check_run(cfg, tmp_path / "run", resume=True)
    assert plan.checkpoint["epoch"] == 1 and plan.changes == ["train.epochs: 1 -> 2"]
    assert plan.num_parameters > 0


def test_a_job_whose_run_directory_is_busy_fails_instead_of_starting_again(train_config,
                                                                          tmp_path,
                                                                          monkeypatch):
    # a search trial or reproduce job meeting another worker's run: "cannot resume ...
    # starting again" replaced the run the other worker was finishing
    from cetnet.train.rundir import RunDirBusy
    from cetnet.train.runner import train_or_reuse

    run_dir = tmp_path / "run"
    train_or_reuse(train_config(epochs=1), run_dir)

    def files() -> dict:
        return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != LOCK_FILE}

    before = files()
    with RunLock(run_dir):  # another process training it
        with pytest.raises(RunDirBusy, match="another cetnet process is using it"):
            train_or_reuse(train_config(epochs=2), run_dir)
    assert files() == before
    # had the other process released the directory just after the refused resume, the
    # fresh start that followed would have deleted its run: no fresh start is tried at all
    from cetnet.train import runner

    calls = []

    def busy(config, out, **kw):
        calls.append(kw)
        raise RunDirBusy(f"{out}: another cetnet process is using it")

    monkeypatch.setattr(runner, "run_training", busy)
    with pytest.raises(RunDirBusy):
        train_or_reuse(train_config(epochs=2), run_dir)
    assert [c.get("resume") for c in calls] == [True]


def test_overwrite_never_deletes_a_run_written_after_its_checks(train_config, tmp_path):
    # (the stamps are taken as the directory is checked, before the data and model load)
    # between check_run and the claim of the directory another process finished a run there:
    # --overwrite (and a job starting again) deleted it unseen
    from cetnet.train import runner
    from cetnet.train.rundir import RunDirChanged

    run_dir = tmp_path / "run"
    run_training(train_config(epochs=1), run_dir, quiet=True, plots=False)
    metrics = run_dir / "metrics.json"
    load = runner._load_dataset

    def load_while_another_process_writes(config):
        metrics.write_text(metrics.read_text() + " ")  # during the slow part of the checks
        return load(config)

    runner._load_dataset = load_while_another_process_writes
    try:
        with pytest.raises(RunDirChanged, match="changed while this one was starting.*nothing "
                                                "was deleted"):
            run_training(train_config(epochs=1), run_dir, overwrite=True, quiet=True,
                         plots=False)
    finally:
        runner._load_dataset = load
    assert (run_dir / LAST).exists() and metrics.exists()
    plan = check_run(train_config(epochs=1), run_dir, overwrite=True)
    metrics.write_text(metrics.read_text() + " ")  # between the checks and the claim
    with pytest.raises(RunDirChanged):
        runner._claim(plan, False, True)
    assert (run_dir / LAST).exists() and metrics.exists()
    plan = check_run(train_config(epochs=1), run_dir, overwrite=True)  # as checked: it goes
    run_dir_, lock, _ = runner._claim(plan, False, True)
    lock.release()
    assert not (run_dir / LAST).exists()


def test_a_stop_between_last_pt_and_best_pt_is_repaired_by_the_resume(train_config, tmp_path,
                                                                       monkeypatch, capsys):
    """best.pt was written before last.pt: a stop between the two left the best.pt of an epoch
    that a resume trained again, so a resume with a changed setting ended with "best.pt holds
    epoch 2, but the run's best epoch is 1" and no metrics.json, for good. Now last.pt comes
    first, and a resume whose checkpoint is the best epoch rewrites best.pt from it."""
    config = tmp_path / "c.yaml"
    dump_config(_quick(train_config, epochs=1), config)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "whole"), "--quiet",
                 "--no-plots"]) == 0
    whole = read_json(tmp_path / "whole" / "metrics.json")

    save = loop_module.save_checkpoint

    def stop_at_best(state, path):
        if Path(path).name == BEST:
            raise KeyboardInterrupt  # the process dies here
        save(state, path)

    monkeypatch.setattr(loop_module, "save_checkpoint", stop_at_best)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        from cetnet.train import run_training

        run_training(read_yaml(config), run_dir, quiet=True, plots=False)
    assert (run_dir / LAST).exists() and not (run_dir / BEST).exists()
    monkeypatch.setattr(loop_module, "save_checkpoint", save)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--quiet", "--no-plots"]) == 0
    assert "rewritten from the checkpoint resumed" in capsys.readouterr().err
    assert _without_timing(read_json(run_dir / "metrics.json")) == _without_timing(whole)


def test_a_resume_refuses_a_config_yaml_whose_model_section_was_edited(train_config, tmp_path,
                                                                       capsys):
    """A run's config.yaml edited in its model section (the fusion temperature: the shapes
    still fit) was resumed without a word, and its old best.pt then scored under the new
    config: the metrics of neither. Refused like another architecture, nothing written."""
    _, run_dir = _finished_run(train_config, tmp_path)
    (run_dir / "metrics.json").unlink()  # as if interrupted after its last checkpoint
    config = read_yaml(run_dir / "config.yaml")
    config["model"]["fusion"]["temperature"] = 0.5
    dump_config(config, run_dir / "config.yaml")
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--epochs", "3", "--quiet",
                 "--no-plots"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run_dir / LAST}: trained with another model config than " \
           f"{run_dir / 'config.yaml'}" in line
    assert _snapshot(run_dir) == before
