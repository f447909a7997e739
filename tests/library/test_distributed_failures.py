"""Failures in data-parallel runs (docs/DISTRIBUTED.md, "Failures"), with real torchrun jobs of
2 gloo processes on the CPU.

- A rank SIGKILLed mid-epoch: torchrun (``--max-restarts 1``) restarts the group, the restart
  resumes from the last complete checkpoint and ends with exactly the metrics of an
  uninterrupted 2-rank run.
- A truncated ``last.pt``: a resume warns, naming it, and continues from ``last.prev.pt`` to
  the metrics of a straight run; without any usable checkpoint, one error. (The 2-rank case:
  test_distributed's resume starts from a truncated ``last.pt``.)
- A rank that hangs: the other rank's collective fails after ``$CETNET_DIST_TIMEOUT`` seconds
  with a clear message and the job exits non-zero instead of hanging.

- A rank SIGKILLed before rank 0 claimed the directory of an ``--overwrite``: the restart
  replaces the finished run that was there (it returned it as its own).

The faults come from the test hook ``$CETNET_TEST_FAULT`` (``kill|hang:RANK:EPOCH:STEP``, on
torchrun's first attempt only; epoch 0, step 0: before the run directory is claimed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cetnet import distributed
from cetnet.config import dump_config
from cetnet.train import runner
from cetnet.train.checkpoint import LAST, LAST_PREV, CheckpointError, load_last, save_last
from cetnet.train.rundir import read_json

from test_distributed import _config, _free_port, _run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

JOB_TIMEOUT_S = 150  # a job that runs longer hangs: the test fails instead of waiting forever


def _torchrun(tmp_path: Path, out: Path, *, restarts: int = 0, fault: str | None = None,
              timeout_s: float | None = None, epochs: int = 3,
              args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m cetnet train --config ... --out out`` as a subprocess."""
    cfg = _config()
    cfg["train"]["epochs"] = epochs
    config = tmp_path / f"{out.name}.yaml"
    dump_config(cfg, config)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CETNET_TEST_FAULT", "CETNET_DIST_TIMEOUT", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault is not None:
        env["CETNET_TEST_FAULT"] = fault
    if timeout_s is not None:
        env["CETNET_DIST_TIMEOUT"] = str(timeout_s)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cetnet", "train", "--config", str(config),
           "--out", str(out), "--quiet", "--no-plots", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def _same_results(a: dict, b: dict) -> None:
    """The history (train loss, lr, validation metrics of every epoch) and the test metrics of
    two runs, exactly."""
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        assert (ha["train_loss"], ha["lr"], ha["valid"]) == (hb["train_loss"], hb["lr"],
                                                            hb["valid"]), ha["epoch"]
    assert a["fused"] == b["fused"] and a["members"] == b["members"]
    assert a["best_epoch"] == b["best_epoch"] and a["train_samples"] == b["train_samples"]


def test_a_killed_rank_restarts_from_the_last_checkpoint(tmp_path):
    straight = _torchrun(tmp_path, tmp_path / "straight", epochs=2)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # rank 1 SIGKILLs itself before step 5 of epoch 2 (first attempt only); torchrun restarts
    killed = _torchrun(tmp_path, tmp_path / "killed", restarts=1, fault="kill:1:2:5",
                       epochs=2)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "torchrun restart 1: resuming" in killed.stderr, killed.stderr[-3000:]
    a, b = read_json(tmp_path / "killed" / "metrics.json"), \
        read_json(tmp_path / "straight" / "metrics.json")
    assert a["world_size"] == 2 and a["epochs_completed"] == 2
    _same_results(a, b)
    assert (tmp_path / "killed" / LAST_PREV).is_file()


def test_a_rank_lost_before_the_claim_does_not_return_the_run_overwrite_replaces(tmp_path):
    # the restart took the finished run of before (same config) for its own and returned its
    # metrics, training nothing, though --overwrite asked for a new run
    out = tmp_path / "run"
    first = _torchrun(tmp_path, out, epochs=1)
    assert first.returncode == 0, first.stderr[-3000:]
    old = read_json(out / "metrics.json")
    stamp = (out / "metrics.json").stat().st_mtime_ns
    # rank 1 SIGKILLs itself before rank 0 claims (and clears) the directory
    again = _torchrun(tmp_path, out, restarts=1, fault="kill:1:0:0", epochs=1,
                      args=("--overwrite",))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" not in again.stderr and "resuming" not in again.stderr, \
        again.stderr[-3000:]
    assert (out / "metrics.json").stat().st_mtime_ns != stamp  # trained and written anew
    _same_results(read_json(out / "metrics.json"), old)


def test_a_hanging_rank_fails_the_job_within_the_timeout(tmp_path):
    start = time.monotonic()
    job = _torchrun(tmp_path, tmp_path / "hang", fault="hang:1:1:3", timeout_s=10, epochs=1)
    elapsed = time.monotonic() - start
    assert job.returncode != 0
    assert "rank 0: waited $CETNET_DIST_TIMEOUT = 10 s for another rank at a collective: a " \
        "rank hangs" in job.stderr, \
        job.stderr[-3000:]
    assert elapsed < JOB_TIMEOUT_S


# ------------------------------------------------------------- checkpoint rotation / fallback
def _single(config: dict, out: Path, **kw) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, out, **kw)
    finally:
        torch.set_num_threads(threads)


def test_a_truncated_last_pt_resumes_from_the_previous_one(tmp_path, capsys, monkeypatch):
    cfg = _config()
    straight = _single(cfg, tmp_path / "straight")
    # a torchrun restart of a run that had finished (a rank failed after metrics.json was
    # written): its metrics, nothing trained, nothing written
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "straight").iterdir()}
    capsys.readouterr()
    run_dir, again = runner.run_training(cfg, tmp_path / "straight", quiet=True, plots=False)
    assert "has finished (metrics.json): nothing to train" in capsys.readouterr().err
    assert run_dir == tmp_path / "straight" and again == read_json(run_dir / "metrics.json")
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")

    _single(cfg, tmp_path / "run", stop_after=2)  # interrupted after epoch 2
    last, prev = tmp_path / "run" / LAST, tmp_path / "run" / LAST_PREV
    assert torch.load(prev, weights_only=True)["epoch"] == 1
    data = last.read_bytes()
    last.write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    resumed = _single(cfg, tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert f"warning: {last}: not a readable checkpoint" in err, err
    assert f"resuming from {prev} (epoch 1) instead" in err, err
    _same_results(resumed, straight)



def test_without_a_usable_checkpoint_a_resume_is_one_error(tmp_path):
    for name in (LAST, LAST_PREV):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint in .*{LAST}.*{LAST_PREV}"):
        load_last(tmp_path)
    (tmp_path / LAST).unlink()
    (tmp_path / LAST_PREV).unlink()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_last(tmp_path)


def test_save_last_keeps_the_previous_checkpoint(tmp_path):
    for epoch in (1, 2, 3):
        save_last({"model": {}, "epoch": epoch}, tmp_path)
    assert torch.load(tmp_path / LAST, weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / LAST_PREV, weights_only=True)["epoch"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {LAST, LAST_PREV}


# ------------------------------------------------------------------------ settings, test hook
def test_the_timeout_setting(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_seconds() == 2.5
    for bad in ("0", "-3", "ten", "nan", "1e15"):  # 1e15: past what timedelta holds
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(distributed.DistributedError, match=r"\$CETNET_DIST_TIMEOUT must be"):
            distributed.timeout_seconds()


@pytest.mark.parametrize("text, timed_out", [
    ("[../gloo/transport/tcp/pair.cc:446] Timed out waiting 10000ms for recv", True),
    ("[../gloo/transport/tcp/unbound_buffer.cc:81] Application timeout caused pair closure",
     True),
    ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234", False),
])
def test_gloo_failures_are_named_as_such(monkeypatch, text, timed_out):
    # the ways gloo words a timeout or a dead peer (all seen in these tests' runs)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "10")
    e = RuntimeError(text)
    assert distributed.collective_failure(e)
    line = runner._collective_failure_text(e)
    assert ("waited $CETNET_DIST_TIMEOUT = 10 s for another rank" in line) == timed_out, line
    assert not distributed.collective_failure(RuntimeError("CUDA out of memory"))


def test_the_fault_hook_fires_on_the_first_attempt_only(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv(distributed.FAULT_ENV, raising=False)
    assert distributed.InjectedFault.parse(1) is None
    monkeypatch.setenv(distributed.FAULT_ENV, "kill:1:2:5")
    assert distributed.InjectedFault.parse(0) is None
    fault = distributed.InjectedFault.parse(1)
    assert (fault.action, fault.epoch, fault.step) == ("kill", 2, 5)
    fault.at(2, 4)  # not its step: nothing happens
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.InjectedFault.parse(1) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv(distributed.FAULT_ENV, "explode:1:2")
    with pytest.raises(distributed.DistributedError, match="kill|hang:RANK:EPOCH:STEP"):
        distributed.InjectedFault.parse(1)


def test_a_restart_resumes_a_run_with_a_checkpoint(monkeypatch, tmp_path):
    cfg = _config()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    run = tmp_path / "run"
    # nothing there: the command as given
    assert runner.restart_plan(cfg, run, False, False) == (False, False)
    run.mkdir()
    dump_config(cfg, run / "config.yaml")  # a failed attempt before its first epoch ended
    assert runner.restart_plan(cfg, run, False, False) == (False, True)
    other = dict(cfg, train=dict(cfg["train"], lr=0.5))  # another run's directory: refused
    assert runner.restart_plan(other, run, False, False) == (False, False)
    save_last({"model": {}, "epoch": 1}, run)
    assert runner.restart_plan(cfg, run, False, True) == (True, False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first attempt
    assert runner.restart_plan(cfg, run, False, False) == (False, False)
