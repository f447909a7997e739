"""The pieces of ``fit`` on their own: the loop state (best tracking, early stopping, what
``last.pt`` holds), the end of an epoch (checkpoints, log line) and resuming, with a one-layer
model and scripted validation AUCs instead of a training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cetnet.config import ConfigError, validate_config
from cetnet.train import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from cetnet.train import loop
from cetnet.train.checkpoint import LAST_KEYS
from cetnet.train.loop import EpochResult, EpochRunner, LoopState, resume_state

from run_support import small_run_config


class Tiny(nn.Linear):
    """The one thing EpochRunner asks of a model besides nn.Module: its dense parameters."""

    def __init__(self) -> None:
        super().__init__(3, 1)

    def dense_parameters(self):
        return self.parameters()


def _train_section(**overrides: object) -> dict:
    return validate_config(small_run_config(**overrides))["train"]


def _runner(out_dir: Path, **overrides: object) -> EpochRunner:
    return EpochRunner(Tiny(), _train_section(**overrides), torch.device("cpu"), out_dir,
                       steps_per_epoch=4, quiet=True)


def _record(state: LoopState, aucs: list[float], patience: int | None) -> list[bool]:
    return [state.record({"epoch": state.epoch + 1}, a, patience) for a in aucs]


def test_loop_state_fields_are_the_loop_keys_of_last_pt():
    assert list(LoopState().state_dict()) == list(LAST_KEYS[LAST_KEYS.index("epoch"):])


def test_patience_bad_epochs_in_a_row_stop_the_run():
    state = LoopState()
    assert _record(state, [0.6, 0.7, 0.65], patience=2) == [True, True, False]
    assert (state.best_epoch, state.best_metric, state.bad_epochs) == (2, 0.7, 1)
    assert not state.stopped and state.next_epoch(10) == 4
    assert _record(state, [0.7], patience=2) == [False]  # equal is not better
    assert state.stopped and state.bad_epochs == 2 and state.next_epoch(10) is None
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4] and state.epoch == 4


def test_a_better_epoch_resets_the_bad_epoch_count():
    state = LoopState()
    _record(state, [0.6, 0.5, 0.7, 0.6], patience=2)
    assert (state.best_epoch, state.bad_epochs, state.stopped) == (3, 1, False)


def test_without_patience_the_run_never_stops_early():
    state = LoopState()
    _record(state, [0.6] + [0.5] * 20, patience=None)
    assert not state.stopped and state.bad_epochs == 20 and state.next_epoch(30) == 22


def test_a_non_finite_validation_auc_is_never_the_best():
    state = LoopState()
    assert _record(state, [math.nan, 0.55, math.nan, math.inf], patience=None) == [
        False, True, False, False]
    assert state.best_epoch == 2 and state.best_metric == 0.55


def test_next_epoch_stops_at_the_configured_epochs():
    state = LoopState()
    assert state.next_epoch(2) == 1
    _record(state, [0.6, 0.7], patience=None)
    assert state.next_epoch(2) is None and state.next_epoch(3) == 3


def _scripted_evaluate(aucs: list[float]):
    """An ``evaluate`` whose fused validation AUC is the next of ``aucs``."""
    it = iter(aucs)

    def evaluate(model, split, *, batch_size, device):
        return {"fused": {"auc": next(it), "gauc": 0.5, "logloss": 0.69}}
    return evaluate


def test_end_of_epoch_writes_best_only_for_the_best_and_stops_at_patience(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(loop, "evaluate", _scripted_evaluate([0.6, 0.7, 0.65, 0.66]))
    runner = _runner(tmp_path, patience=2, epochs=10)
    lines: list[str] = []
    monkeypatch.setattr(runner, "say", lines.append)
    state = LoopState()
    best_weights = None
    while (epoch := state.next_epoch(10)) is not None:
        with torch.no_grad():  # another model every epoch: best.pt must keep epoch 2's
            runner.model.weight.fill_(epoch)
        if epoch == 2:
            best_weights = runner.model.state_dict()["weight"].clone()
        entry = runner.end(epoch, EpochResult(train_loss=0.5, lr=1e-3), None, state)
        assert entry == state.history[-1] and entry["train_loss"] == 0.5
        assert load_checkpoint(tmp_path / LAST)["epoch"] == epoch
    assert state.epoch == 4 and state.stopped and state.best_epoch == 2
    best = load_checkpoint(tmp_path / BEST)
    assert best["epoch"] == 2 and torch.equal(best["model"]["weight"], best_weights)
    last = load_checkpoint(tmp_path / LAST)
    assert list(last) == ["model", "optimizer", "schedule", "rng", *LoopState().state_dict()]
    assert LoopState.from_checkpoint(last) == state
    assert [" | best" in line for line in lines] == [True, True, False, False]
    assert lines[-1].endswith("| early stop (patience 2)")


def _trained_runner(out_dir: Path) -> EpochRunner:
    """A runner whose optimizer and schedule have taken a step (so they have state)."""
    runner = _runner(out_dir, epochs=5)
    runner.schedule.step()
    runner.model(torch.ones(2, 3)).sum().backward()
    runner.optimizer.step()
    return runner


def test_resume_restores_model_optimizer_schedule_rng_and_loop_state(tmp_path):
    runner = _trained_runner(tmp_path)
    state = LoopState()
    _record(state, [0.6, 0.5], patience=3)
    state.train_seconds, state.train_samples = 1.5, 256
    torch.manual_seed(123)
    save_checkpoint(runner.last_checkpoint(state), tmp_path / LAST)
    expected_draw = torch.rand(3)

    torch.manual_seed(7)  # a fresh process: other weights, other RNG state
    fresh = _runner(tmp_path, epochs=5)
    restored = resume_state(fresh, tmp_path)
    assert restored == state
    assert torch.equal(torch.rand(3), expected_draw)
    a, b = runner.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.schedule.state_dict() == runner.schedule.state_dict()
    sa, sb = runner.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert restored.next_epoch(5) == 3


def test_resume_takes_an_already_loaded_checkpoint(tmp_path):
    runner = _trained_runner(tmp_path)
    state = LoopState()
    _record(state, [0.6], patience=None)
    ckpt = runner.last_checkpoint(state)
    assert resume_state(_runner(tmp_path, epochs=5), tmp_path, ckpt) == state
    assert not (tmp_path / LAST).exists()  # nothing was read from the directory


def test_resume_without_last_pt_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        resume_state(_runner(tmp_path), tmp_path)


def test_resume_refuses_fewer_epochs_than_completed(tmp_path):
    runner = _trained_runner(tmp_path)
    state = LoopState()
    _record(state, [0.6, 0.6, 0.6], patience=None)
    save_checkpoint(runner.last_checkpoint(state), tmp_path / LAST)
    with pytest.raises(ConfigError, match=r"train.epochs=2 is below the 3 epochs"):
        resume_state(_runner(tmp_path, epochs=2), tmp_path)


def test_a_checkpoint_lacking_loop_state_is_a_checkpoint_error(tmp_path):
    runner = _trained_runner(tmp_path)
    ckpt = runner.last_checkpoint(LoopState())
    del ckpt["bad_epochs"]
    with pytest.raises(CheckpointError, match=r"cannot resume from it \(KeyError"):
        resume_state(_runner(tmp_path), tmp_path, ckpt)
