"""``fit``: the training loop (Adam + lr schedule, early stopping on validation fused AUC,
checkpoints every epoch, exact resume) and the run directory it writes.

Non-finite numbers never pass silently: a non-finite training loss stops the run with a
:class:`TrainingError` naming the epoch and step before anything of that epoch is saved (so
``last.pt`` keeps the last good epoch), and an epoch whose validation AUC is NaN is never the
best one.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from cetnet.config import ConfigError, check_device, dump_config, validate_config
from cetnet.metrics import auc
from cetnet.train.checkpoint import (BEST, LAST, LAST_KEYS, CheckpointError, check_model_state,
                                     first_line, load_checkpoint, save_checkpoint)
from cetnet.train.evaluate import evaluate
from cetnet.train.plots import plot_run
from cetnet.train.report import format_metrics_table
from cetnet.train.rng import rng_state, seed_everything, set_rng_state, shuffle_seed
from cetnet.train.rundir import CONFIG_FILE, METRICS_FILE, write_json
from cetnet.train.runlog import RunLog, environment
from cetnet.train.schedule import LRSchedule

__all__ = ["fit", "EpochRunner", "EpochResult", "LoopState", "resume_state", "resolve_device",
           "print_warnings", "split_warnings", "EpochCallback", "TrainingError", "check_backend",
           "check_splits", "VALID_IS_TEST_WARNING", "SCORED_ON_TRAIN_WARNING"]

#: ``callback(epoch, history_entry)``, called after each epoch's checkpoints are written.
EpochCallback = Callable[[int, dict], None]

_LIVE_WINDOW = 50  # batches in the progress bar's running train AUC

#: In ``metrics.json["warnings"]`` (and printed) when the dataset's valid split is its test split.
VALID_IS_TEST_WARNING = ("the dataset has no separate validation data: its valid split is the "
                         "test split, so early stopping and the best checkpoint were selected on "
                         "the test set and the test metrics are optimistic")
SCORED_ON_TRAIN_WARNING = ("the dataset's {split} split is its train split: {split} metrics are "
                           "measured on training data")


class TrainingError(RuntimeError):
    """A run that cannot go on: a non-finite training loss, a valid split with one class, no
    epoch with a finite validation AUC. The message names the epoch and what ``last.pt``
    holds."""


def split_warnings(splits: dict) -> list[str]:
    """The warnings a run's metrics carry about its dataset's splits: a valid split that is the
    test split (selection on test), a valid or test split that is the train split (scores on
    training data). Splits are compared by identity: datasets share one Split object when two
    names read the same data (BARS: the same csv file)."""
    warnings = [VALID_IS_TEST_WARNING] if splits["valid"] is splits["test"] else []
    warnings += [SCORED_ON_TRAIN_WARNING.format(split=s) for s in ("valid", "test")
                 if splits[s] is splits["train"]]
    return warnings


def dense_optimizer(params: list[nn.Parameter], lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam for the dense parameters: torch's fused (single-kernel) Adam where this torch and
    these parameters support it (CPU since torch 2.4, CUDA), the per-tensor loop otherwise. Same
    math; on the default CETNet model it takes ~5 % off a CPU training step (125 tensors)."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def print_warnings(messages: list[str]) -> None:
    """Prints a run's warnings (``metrics.json["warnings"]``) on stderr."""
    for m in messages:
        print(f"warning: {m}", file=sys.stderr)


def resolve_device(name: str, key: str = "config: device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as
    ``torch.device``. ConfigError naming ``key`` for another name and for a CUDA device this
    machine does not have (one line, not torch's lazy-init traceback at the first tensor)."""
    check_device(name, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = ("a CPU-only build" if torch.version.cuda is None
               else f"built with CUDA {torch.version.cuda}, but no GPU is usable")
        raise ConfigError(f"{key} is {name!r} but CUDA is not available (torch "
                          f"{torch.__version__}: {why}); use cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key} is {name!r} but this machine has {count} CUDA device(s)")
    return device


def check_backend(backend: str, device: torch.device) -> None:
    """ConfigError when the kernel ``backend`` (other than auto) cannot run on ``device`` in
    this installation (``backend=cuda`` on a CPU run failed at the first batch)."""
    from cetnet_kernels import available_backends

    available = available_backends(device)
    if backend != "auto" and backend not in available:
        raise ConfigError(f"config: backend {backend!r} does not run on {device.type} here; "
                          f"use one of auto, {', '.join(available)}")


def _better(value: float, best: float) -> bool:
    """Whether a validation AUC beats the best so far: NaN (or inf) never does."""
    return math.isfinite(value) and value > best


def check_splits(splits: dict) -> None:
    """TrainingError unless the train, valid and test splits have rows and the valid split
    has both classes (with one, its AUC is NaN every epoch and nothing can be selected)."""
    for name in ("train", "valid", "test"):
        if len(splits[name]) == 0:
            raise TrainingError(f"the dataset's {name} split has no rows")
    labels = getattr(splits["valid"], "label", None)
    if labels is None:
        return
    positives = int((labels > 0.5).sum())
    if positives in (0, labels.numel()):
        raise TrainingError(f"the valid split has only {'positive' if positives else 'negative'}"
                            f" labels ({labels.numel()} rows): its AUC is undefined, so early "
                            "stopping and the best checkpoint cannot be selected")


@dataclass
class LoopState:
    """The training loop's progress: what ``last.pt`` holds besides the model, optimizer,
    schedule and RNG states (the fields are those :data:`LAST_KEYS`, in that order), from which
    a resumed run continues exactly.

    Attributes:
        epoch: epochs completed.
        best_metric: the best validation fused AUC so far (-inf before any finite one).
        best_epoch: its epoch (0: none yet).
        bad_epochs: epochs since the best one.
        stopped: ``train.patience`` bad epochs in a row: no epoch follows.
        history: one entry per epoch: ``epoch``, ``train_loss``, ``lr``, ``valid`` metrics.
        train_seconds: time spent in training steps (evaluation excluded).
        train_samples: rows trained on.
    """

    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples: int = 0

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "LoopState":
        """The state a ``last.pt`` holds; KeyError when it lacks a field."""
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})

    def state_dict(self) -> dict[str, Any]:
        """The fields as ``last.pt`` keys (the objects themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def next_epoch(self, epochs: int) -> int | None:
        """The epoch to train next; None when the run is over (``epochs`` done, or stopped)."""
        return None if self.stopped or self.epoch >= epochs else self.epoch + 1

    def record(self, entry: dict, metric: float, patience: int | None) -> bool:
        """Records the epoch ``entry["epoch"]`` (its history entry, with validation AUC
        ``metric``) and returns whether it is the best so far; a NaN never is. An epoch that is
        not counts as bad; ``patience`` bad epochs in a row stop the run (None: never)."""
        epoch = entry["epoch"]
        self.history.append(entry)
        self.epoch = epoch
        if _better(metric, self.best_metric):
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
            return True
        self.bad_epochs += 1
        if patience is not None and self.bad_epochs >= patience:
            self.stopped = True
        return False


class EpochResult(NamedTuple):
    """What an epoch's training steps give its end: the mean train loss per row and the lr of
    its last step."""

    train_loss: float
    lr: float


def _saved(state: LoopState, out_dir: Path) -> str:
    """What a run that stops now leaves to resume."""
    if state.epoch:
        return (f"{LAST} keeps epoch {state.epoch}: continue with `cetnet train --resume "
                f"{out_dir}` (e.g. with a lower train.lr or a train.grad_clip)")
    return ("no epoch had finished, so there is nothing to resume (start again with --out "
            f"{out_dir} --overwrite)")


def _stop_if_diverged(bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int, steps: int,
                      state: LoopState, out_dir: Path) -> None:
    """TrainingError when a step of this epoch had a non-finite loss (one host sync)."""
    step = int(bad_step)
    if step >= 0:
        raise TrainingError(f"epoch {epoch}, step {step + 1}/{steps}: the training loss is "
                            f"{float(bad_loss)}; the run stopped before saving this epoch; "
                            f"{_saved(state, out_dir)}")


class EpochRunner:
    """What stays fixed through one :func:`fit` (the model, its optimizer and lr schedule, the
    ``train`` settings, the run directory) and the two halves of an epoch: :meth:`train`, its
    steps, and :meth:`end`: evaluation, best tracking and early stopping, checkpoints, the log
    line.

    Args:
        model: the Ensemble being trained (already on ``device``).
        train: the config's ``train`` section (validated).
        device: where batches go.
        out_dir: the run directory the checkpoints are written to.
        steps_per_epoch: steps an epoch takes at most (the schedule's length is epochs times it).
        quiet: no progress bars and no per-epoch lines.
    """

    def __init__(self, model: nn.Module, train: dict, device: torch.device, out_dir: Path,
                 steps_per_epoch: int, *, quiet: bool = False,
                 log: RunLog | None = None) -> None:
        self.model, self.t, self.device, self.out_dir = model, train, device, out_dir
        self.steps_per_epoch = steps_per_epoch
        self.quiet = quiet
        self.log = log
        self.show_bars = not quiet and sys.stderr.isatty()
        self.params = list(model.dense_parameters())
        self.optimizer = dense_optimizer(self.params, train["lr"], train["weight_decay"])
        self.schedule = LRSchedule(self.optimizer, train["lr_schedule"], train["lr"],
                                   total_steps=train["epochs"] * steps_per_epoch,
                                   warmup_steps=train["warmup_steps"],
                                   min_lr_ratio=train["min_lr_ratio"],
                                   step_epochs=train["step_epochs"], gamma=train["gamma"],
                                   plateau_factor=train["plateau_factor"],
                                   plateau_patience=train["plateau_patience"])

    def say(self, msg: str) -> None:
        """A line of the run's log: printed on stdout (below the progress bars, flushed) unless
        quiet, and appended to ``train.log`` when the runner has a :class:`RunLog`."""
        if self.log is not None:
            self.log.line(msg)
        elif not self.quiet:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def restore(self, ckpt: dict, path: Path) -> LoopState:
        """Loads ``last.pt`` into the model, optimizer, schedule and RNGs and returns its loop
        state; CheckpointError naming ``path`` when it does not fit."""
        check_model_state(ckpt["model"], self.model, path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.schedule.load_state_dict(ckpt["schedule"])
            set_rng_state(ckpt["rng"])
            return LoopState.from_checkpoint(ckpt)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: "
                                  f"{first_line(e)})") from e

    def last_checkpoint(self, state: LoopState) -> dict[str, Any]:
        """What ``last.pt`` holds: everything :meth:`restore` needs to continue exactly."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "rng": rng_state(),
                **state.state_dict()}

    def train(self, epoch: int, split: Any, state: LoopState) -> EpochResult:
        """Trains epoch ``epoch`` on ``split`` (its batches shuffled by the seed and the epoch)
        and adds its time and rows to ``state``; TrainingError on a non-finite loss, before
        anything of the epoch is saved."""
        t, device, steps_per_epoch = self.t, self.device, self.steps_per_epoch
        model, optimizer, schedule = self.model, self.optimizer, self.schedule
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        # The first step of the epoch with a non-finite loss and that loss, kept on the device:
        # a check per step would synchronize every step; it is made every log_every steps and
        # before the epoch saves anything.
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        window: collections.deque = collections.deque(maxlen=_LIVE_WINDOW)
        lr = schedule.lr()
        batches = split.batches(t["batch_size"], shuffle=True,
                                seed=shuffle_seed(t["seed"], epoch))
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t['epochs']}", leave=False,
                  disable=not self.show_bars, dynamic_ncols=True) as bar:
            for step, batch in enumerate(batches):
                if step >= steps_per_epoch:
                    break
                if step > 0 and len(batch) < 2:
                    # A 1-row remainder batch: BatchNorm cannot train on one row. Skipping it
                    # depends only on the split size, so runs stay reproducible.
                    continue
                batch = batch.to(device)
                lr = schedule.step()
                loss, out = model.loss(batch)
                first = (bad_step < 0) & ~torch.isfinite(loss.detach())
                bad_step = torch.where(first, step, bad_step)
                bad_loss = torch.where(first, loss.detach().double(), bad_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # also applies the embedding's fused optimizer, if any
                if t["grad_clip"] is not None:
                    nn.utils.clip_grad_norm_(self.params, t["grad_clip"])
                optimizer.step()
                loss_sum += loss.detach().double() * len(batch)
                rows += len(batch)
                if self.show_bars:
                    window.append((out.prob.detach(), batch.label))
                if (step + 1) % t["log_every"] == 0:
                    _stop_if_diverged(bad_step, bad_loss, epoch, steps_per_epoch, state,
                                      self.out_dir)
                    if self.show_bars:
                        p, y = (torch.cat(x) for x in zip(*window))
                        bar.set_postfix(loss=f"{float(loss_sum) / rows:.4f}",
                                        auc=f"{auc(p, y):.4f}", lr=f"{lr:.2e}")
                bar.update()
        if rows == 0:
            raise TrainingError(f"epoch {epoch}: the train split gave no batches")
        _stop_if_diverged(bad_step, bad_loss, epoch, steps_per_epoch, state, self.out_dir)
        state.train_seconds += time.perf_counter() - start
        state.train_samples += rows
        return EpochResult(float(loss_sum) / rows, lr)

    def end(self, epoch: int, result: EpochResult, valid_split: Any,
            state: LoopState) -> dict:
        """Ends epoch ``epoch``: evaluates on ``valid_split``, records the epoch in ``state``
        (best tracking, early stopping), writes ``best.pt`` when it is the best and ``last.pt``
        always, and logs a line. Returns the epoch's history entry."""
        t = self.t
        valid = evaluate(self.model, valid_split, batch_size=t["eval_batch_size"],
                         device=self.device)
        metric = valid["fused"]["auc"]
        self.schedule.epoch_end(metric)
        entry = {"epoch": epoch, "train_loss": result.train_loss, "lr": result.lr,
                 "valid": valid}
        if state.record(entry, metric, t["patience"]):
            save_checkpoint({"model": self.model.state_dict(), "epoch": epoch, "valid": valid},
                            self.out_dir / BEST)
        save_checkpoint(self.last_checkpoint(state), self.out_dir / LAST)
        if self.log is not None:
            self.log.epoch(state.history)
        f = valid["fused"]
        self.say(f"epoch {epoch}/{t['epochs']}: train loss {result.train_loss:.4f} | valid AUC "
                 f"{f['auc']:.4f} gAUC {f['gauc']:.4f} logloss {f['logloss']:.4f} | lr "
                 f"{result.lr:.2e}" + (" | best" if state.best_epoch == epoch else "")
                 + (f" | early stop (patience {t['patience']})" if state.stopped else ""))
        return entry


def resume_state(runner: EpochRunner, out_dir: Path, checkpoint: dict | None = None) -> LoopState:
    """Restores the run in ``out_dir`` from its ``last.pt`` (``checkpoint``: already loaded)
    into ``runner`` and returns its loop state.

    Raises:
        FileNotFoundError: no ``last.pt`` to resume from.
        CheckpointError: it does not fit the model (or is not a ``last.pt``).
        ConfigError: it has completed more epochs than ``train.epochs``.
    """
    if checkpoint is None:
        if not (out_dir / LAST).exists():
            raise FileNotFoundError(f"resume: no {LAST} in {out_dir} (nothing to resume)")
        # on the CPU: RNG states must stay there
        checkpoint = load_checkpoint(out_dir / LAST, keys=("model", *LAST_KEYS))
    state = runner.restore(checkpoint, out_dir / LAST)
    epochs = runner.t["epochs"]
    if state.epoch > epochs:
        raise ConfigError(f"resume: train.epochs={epochs} is below the {state.epoch} "
                          f"epochs the run in {out_dir} has completed")
    return state


def fit(model: nn.Module, dataset: Any, config: dict, out_dir: str | Path, *,
        resume: bool = False, quiet: bool = False, plots: bool = True,
        on_epoch_end: EpochCallback | None = None,
        checkpoint: dict | None = None) -> dict[str, Any]:
    """Trains ``model`` on ``dataset.splits["train"]`` and writes the run directory.

    Adam (``train.lr``, ``train.weight_decay``) updates ``model.dense_parameters()``, with the
    lr of :class:`~cetnet.train.schedule.LRSchedule`; the embedding's fused optimizer, if any,
    updates its rows inside ``backward``. After every epoch the model is evaluated on
    ``"valid"``; a better fused AUC writes ``best.pt``, ``train.patience`` epochs without one
    stop the run, and ``last.pt`` (model, optimizer, schedule, RNG states, history) is written
    so that ``resume=True`` continues exactly where it stopped: the same batches, dropout
    masks and updates as an uninterrupted run, hence the same metrics. ``config.yaml`` is
    written once the checkpoint has been loaded into the model: a resume that fails changes
    nothing.

    A non-finite training loss raises :class:`TrainingError` (naming the epoch and the step)
    before that epoch writes anything; the model's weights are then undefined, ``last.pt``
    still holds the last good epoch. An epoch with a NaN validation AUC is never the best one;
    a run none of whose epochs had a finite one raises TrainingError at the end, as does a
    valid split with a single class (before training).

    ``fit`` itself takes no lock on ``out_dir`` and does not check that it is free:
    :func:`~cetnet.train.runner.run_training` does both.

    At the end the best model is loaded back (``model`` holds it after the call) and scored on
    ``"test"``. Returns what is written to ``metrics.json``: the test ``fused`` / ``members``
    (/ ``fusion_weights``) metrics, the validation ``history``, the best epoch, the train
    throughput, ``valid_is_test`` (the dataset's valid split is its test split: selection was
    on the test set) and ``warnings`` (sentences, also printed on stderr; empty when all is well).

    Args:
        model: an Ensemble (docs/MODEL_LIBRARY.md), freshly built (its weights are replaced
            from ``last.pt`` when resuming).
        dataset: a ``CTRDataset`` with ``train``, ``valid`` and ``test`` splits.
        config: the full run config (see :mod:`cetnet.config`).
        out_dir: the run directory (created if needed).
        resume: continue from ``out_dir/last.pt``.
        checkpoint: ``last.pt`` already loaded (by :func:`~cetnet.train.runner.run_training`,
            which checks it before touching the directory); read from ``out_dir`` if None.
        quiet: no progress bars and no per-epoch lines (bars are also off when stderr is not
            a terminal).
        plots: write the PNG plots.
        on_epoch_end: called as ``on_epoch_end(epoch, history_entry)`` after each epoch.
    """
    config = validate_config(config)
    t = config["train"]
    out_dir = Path(out_dir)
    device = resolve_device(config["device"])
    check_backend(config["backend"], device)
    train_split, valid_split, test_split = (dataset.splits[s] for s in ("train", "valid", "test"))
    check_splits(dataset.splits)
    model.to(device)

    # A benchmark without validation data (BARS' valid_data: test.csv, or none given) hands the
    # test split in as "valid": then early stopping selects on the test set. The run still
    # trains (that is how those benchmarks are reported) but says so, loudly and in metrics.json.
    run_warnings = split_warnings(dataset.splits)
    print_warnings(run_warnings)
    steps_per_epoch = math.ceil(len(train_split) / t["batch_size"])
    if t["max_steps_per_epoch"] is not None:
        steps_per_epoch = min(steps_per_epoch, t["max_steps_per_epoch"])
    runner = EpochRunner(model, t, device, out_dir, steps_per_epoch, quiet=quiet)
    if resume:
        state = resume_state(runner, out_dir, checkpoint)
        checkpoint = None  # its tensors are copied: do not hold a second model for the run
    else:
        seed_everything(t["seed"])
        state = LoopState()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, out_dir / CONFIG_FILE)  # last: a failed resume leaves the old one

    with RunLog(out_dir, quiet=quiet, first_epoch=state.epoch + 1) as runner.log:
        metrics = _train_and_test(runner, state, config, dataset, run_warnings, plots,
                                  on_epoch_end)
    if not quiet:  # again under the results: the start of a long run has scrolled away
        print_warnings(run_warnings)
    return metrics


def _train_and_test(runner: EpochRunner, state: LoopState, config: dict, dataset: Any,
                    run_warnings: list[str], plots: bool,
                    on_epoch_end: EpochCallback | None) -> dict[str, Any]:
    """The epochs, then the best model scored on the test split and ``metrics.json``."""
    t, out_dir, model, device = config["train"], runner.out_dir, runner.model, runner.device
    train_split, valid_split, test_split = (dataset.splits[s] for s in ("train", "valid", "test"))
    while (epoch := state.next_epoch(t["epochs"])) is not None:
        entry = runner.end(epoch, runner.train(epoch, train_split, state), valid_split, state)
        if on_epoch_end is not None:
            on_epoch_end(epoch, entry)

    if not state.best_epoch:
        raise TrainingError(f"none of the {state.epoch} epochs had a finite validation AUC (the "
                            f"model's validation predictions were not finite), so there is no "
                            f"best model and no test score; {_saved(state, out_dir)}")
    model.load_state_dict(load_checkpoint(out_dir / BEST, map_location=device)["model"])
    test = evaluate(model, test_split, batch_size=t["eval_batch_size"], device=device)
    metrics = _run_metrics(config["name"], test, state, valid_split is test_split, run_warnings)
    metrics["environment"] = environment(device)
    write_json(metrics, out_dir / METRICS_FILE)
    if plots:
        plot_run(state.history, out_dir, test, config=config, best_epoch=state.best_epoch,
                 stopped_early=state.stopped)
    runner.say(format_metrics_table(test))
    return metrics


def _run_metrics(name: str, test: dict, state: LoopState, valid_is_test: bool,
                 warnings: list[str]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the test metrics of the best model, its epoch and
    validation metrics, the history, the throughput and the run's warnings."""
    best = state.history[state.best_epoch - 1]
    return {
        "name": name, "split": "test", **test,
        "best_epoch": state.best_epoch, "valid": best["valid"],
        "valid_is_test": valid_is_test, "warnings": warnings,
        "epochs_completed": state.epoch, "stopped_early": state.stopped,
        "history": state.history,
        "train_samples": state.train_samples, "train_seconds": state.train_seconds,
        "train_samples_per_s": state.train_samples / max(state.train_seconds, 1e-9),
    }
