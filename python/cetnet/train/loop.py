"""``fit``: the training loop (Adam + lr schedule, early stopping on validation fused AUC,
checkpoints every epoch, exact resume) and the run directory it writes.

Non-finite numbers never pass silently: a non-finite training loss stops the run with a
:class:`TrainingError` naming the epoch and step before anything of that epoch is saved (so
``last.pt`` keeps the last good epoch), and an epoch whose validation AUC is NaN is never the
best one.
"""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, NamedTuple, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from cetnet import distributed
from cetnet.config import ConfigError, check_device, dump_config, validate_config
from cetnet.metrics import auc
from cetnet.train.checkpoint import (BEST, LAST, CheckpointError, check_model_config,
                                     data_digest, first_line, load_checkpoint, load_last,
                                     model_config, save_checkpoint, save_last)
from cetnet.train import sharded
from cetnet.train.builders import EnsembleModel
from cetnet.train.evaluate import evaluate
from cetnet.train.plots import plot_run
from cetnet.train.report import format_metrics_table
from cetnet.train.rng import rng_state, seed_everything, set_rng_state, shuffle_seed
from cetnet.train.rundir import CONFIG_FILE, METRICS_FILE, write_json
from cetnet.train.runlog import RunLog, environment
from cetnet.train.schedule import LRSchedule

__all__ = ["fit", "EpochRunner", "EpochResult", "LoopState", "resume_state", "resolve_device",
           "data_parallel", "losses_over_ranks", "leave_data_parallel", "shard_batches", "print_warnings",
           "split_warnings", "EpochCallback", "TrainingError", "check_backend", "check_splits",
           "VALID_IS_TEST_WARNING", "SCORED_ON_TRAIN_WARNING", "warmup_warning"]

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


def warmup_warning(train: Mapping[str, Any], steps_per_epoch: int) -> str | None:
    """The warning of a ``train.warmup_steps`` at least the run's optimizer steps (``epochs``
    times ``steps_per_epoch``): its learning rate rises until training ends, and a cosine
    never decays. None when the warm-up ends in time (or there is none)."""
    total = train["epochs"] * steps_per_epoch
    if not train["warmup_steps"] or train["warmup_steps"] < total:
        return None
    return (f"train.warmup_steps={train['warmup_steps']} is at least the run's {total} "
            f"optimizer steps ({train['epochs']} epoch(s) x {steps_per_epoch}): the learning "
            f"rate is still warming up when training ends (it reaches train.lr at the last "
            f"step at best)"
            + (" (no cosine decay)" if train["lr_schedule"] == "cosine" else "")
            + "; lower train.warmup_steps")


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


def check_mean_loss(config: dict, world_size: int) -> None:
    """ConfigError for a CETNet sum loss in a data-parallel run: the ranks' gradients are
    averaged, the gradient of a mean loss only (a sum would train with 1/world_size of its
    gradient)."""
    fusion = config["model"].get("fusion") or {}
    if world_size > 1 and isinstance(fusion, dict) and fusion.get("reduction") == "sum" \
            and config["model"].get("ensemble", "cetnet") == "cetnet":  # (its loss only)
        raise ConfigError("config: model.fusion.reduction: sum is not supported in a "
                          "data-parallel run (the ranks' gradients are averaged: a sum loss "
                          "would train with 1/world_size of its gradient); use mean")


def min_batch_rows(model: nn.Module) -> int:
    """Rows a training batch (a rank's share of one) needs: 2 when the model has BatchNorm,
    whose batch statistics are undefined on one row, else 1."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for m in model.modules()) else 1


def check_batch_rows(model: nn.Module, batch_size: int, world_size: int = 1,
                     train_rows: int | None = None) -> None:
    """Refuses a first training batch that gives a rank fewer rows than the model needs
    (:func:`min_batch_rows`): ConfigError when ``train.batch_size`` is too small, TrainingError
    when the train split (``train_rows``) is. A BatchNorm model would fail at its first step
    (later ones are skipped, and skipping every one would train on nothing)."""
    need, world = min_batch_rows(model), max(world_size, 1)
    if batch_size // world < need:
        per_rank = f" per rank ({world} ranks)" if world > 1 else ""
        raise ConfigError(f"config: train.batch_size = {batch_size} gives {batch_size // world}"
                          f" row(s){per_rank}, and the model has BatchNorm (e.g. "
                          f"batch_norm: true), which needs at least {need} rows a batch to "
                          f"train: use train.batch_size >= {need * world}")
    if train_rows is not None and train_rows // world < need:
        ranks = f" on each of the {world} ranks" if world > 1 else ""
        raise TrainingError(f"the train split has {train_rows} row(s), too few for a model with "
                            f"BatchNorm (e.g. batch_norm: true), which needs at least {need} "
                            f"rows a batch{ranks}")


def check_splits(splits: dict, world_size: int = 1) -> None:
    """TrainingError unless the train, valid and test splits have rows (in a data-parallel run
    of ``world_size`` ranks, at least one per rank: each rank trains on and scores its share)
    and the valid split has both classes (with one, its AUC is NaN every epoch and nothing can
    be selected)."""
    for name in ("train", "valid", "test"):
        if len(splits[name]) == 0:
            raise TrainingError(f"the dataset's {name} split has no rows")
        if len(splits[name]) < world_size:
            raise TrainingError(f"the dataset's {name} split has {len(splits[name])} rows, "
                                f"fewer than the {world_size} ranks of this data-parallel run "
                                f"(each rank needs a share): use fewer ranks or more data")
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


def _first_bad_step(bad_step: torch.Tensor, bad_loss: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: the first step (and its loss) of any rank with a non-finite loss (-1: none),
    so that every rank stops at the same check."""
    mine = torch.stack([bad_step.double(), bad_loss.double()])[None]
    every = distributed.all_gather_rows(mine.to(distributed.comm_device())).cpu()
    bad = every[every[:, 0] >= 0]
    if not len(bad):
        return torch.tensor(-1), torch.tensor(0.0)
    first = bad[int(bad[:, 0].argmin())]
    return first[0].long(), first[1]


def _stop_if_diverged(bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int, steps: int,
                      state: LoopState, out_dir: Path) -> None:
    """TrainingError when a step of this epoch had a non-finite loss (one host sync; in a
    data-parallel run a collective: every rank stops)."""
    if distributed.active():
        bad_step, bad_loss = _first_bad_step(bad_step, bad_loss)
    step = int(bad_step)
    if step >= 0:
        raise TrainingError(f"epoch {epoch}, step {step + 1}/{steps}: the training loss is "
                            f"{float(bad_loss)}; the run stopped before saving this epoch; "
                            f"{_saved(state, out_dir)}")


class _LossOf(nn.Module):
    """``model.loss`` as ``forward``: what DistributedDataParallel (or TorchRec's DMP, for
    sharded tables) wraps (its bookkeeping runs around ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return cast(EnsembleModel, self.model).loss(batch)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.loss`` under DistributedDataParallel (dense gradients averaged over the ranks)
    and its fused embeddings' updates shared by the ranks
    (:meth:`~cetnet_kernels.MultiTableEmbedding.set_process_group`). A fused embedding's
    weight and optimizer state are left out of DDP (DDP has no gradient of them to reduce and
    would broadcast the whole tables every step): the ranks build them identically and update
    them identically."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cetnet_kernels import MultiTableEmbedding

    wrapper = _LossOf(model)
    own: set[int] = set()
    for m in model.modules():
        if isinstance(m, MultiTableEmbedding) and m.optimizer is not None:
            m.set_process_group(dist.group.WORLD)
            own |= {id(t) for t in (m.weight, m.optimizer_state, m._placeholder)
                    if t is not None}
    ignore = [n for n, t in (*wrapper.named_parameters(), *wrapper.named_buffers())
              if id(t) in own]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignore)
    # buffers (BatchNorm's running statistics) are rank 0's on every rank: DDP's default sync
    return DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None)


def losses_over_ranks(model: nn.Module) -> None:
    """A KDEF's exam scores and batch means taken over the ranks' shares of each batch
    (:meth:`cetnet.models.KDEF.set_process_group`), whichever embedding the data-parallel run
    has: its loss is no row mean, and DDP's average of per-share losses would not be the
    whole batch's."""
    import torch.distributed as dist

    from cetnet.models import KDEF

    for m in model.modules():
        if isinstance(m, KDEF):
            m.set_process_group(dist.group.WORLD)


def leave_data_parallel(model: nn.Module) -> None:
    """Undoes the process groups of :func:`data_parallel` (the fused embeddings) and
    :func:`losses_over_ranks` (KDEF losses): the model is local again, usable without the
    group."""
    from cetnet.models import KDEF
    from cetnet_kernels import MultiTableEmbedding

    for m in model.modules():
        if isinstance(m, (MultiTableEmbedding, KDEF)):
            m.set_process_group(None)


@contextlib.contextmanager
def ids_checked_by_the_splits(model: nn.Module, config: dict, splits: Mapping[str, Any],
                              device: torch.device) -> Iterator[None]:
    """Runs the block with bounds checking off in the model's fused embeddings whose ids the
    splits have already checked: on a CUDA device (elsewhere the check is part of the
    lookup's pass and costs next to nothing), when the config leaves
    ``model.embedding_bounds_check`` unset, every split is a :class:`cetnet.data.Split` (which
    checks each feature's ids against its vocabulary when it is built) and an embedding checks
    with the default "error" and has the splits' vocabulary size for each of its features. The
    default check could never fire on such batches, and on a GPU it costs a synchronization
    per lookup. Anything else (an explicit setting, a registered dataset's own splits, a model
    factory's own mode or vocabulary) keeps its check; the embeddings' own setting is back
    afterwards (an exported or served model checks the ids it is given)."""
    from cetnet.data import Split
    from cetnet.models.build import BOUNDS_CHECK_KEY
    from cetnet_kernels import MultiTableEmbedding

    def checked_by_the_splits(m: MultiTableEmbedding) -> bool:
        for split in splits.values():
            vocab = {f.name: f.vocab_size for f in split.schema.features if f.categorical}
            if any(vocab.get(f.name) != f.num_embeddings for f in m.features):
                return False
        return m.bounds_check == "error"

    trusted = (device.type == "cuda" and BOUNDS_CHECK_KEY not in config["model"]
               and all(isinstance(s, Split) for s in splits.values()))
    embeddings = [m for m in model.modules()
                  if trusted and isinstance(m, MultiTableEmbedding) and checked_by_the_splits(m)]
    saved = [m.bounds_check for m in embeddings]
    for m in embeddings:
        m.bounds_check = "off"
    try:
        yield
    finally:
        for m, check in zip(embeddings, saved):
            m.bounds_check = check


def shard_batches(split: Any, batch_size: int, seed: int) -> Any:
    """This rank's shares of the global batches ``split.batches(batch_size, shuffle=True,
    seed=seed)`` would give, as ``(batch, global batch rows)``: the same row order, each global
    batch cut into contiguous shares in rank order (:func:`cetnet.distributed.shard_range`)."""
    if not hasattr(split, "take"):
        raise TrainingError("data-parallel training needs a train split with take(rows) "
                            f"(cetnet.data.Split); got {type(split).__name__}")
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        lo, hi = distributed.shard_range(len(rows))
        yield split.take(rows[lo:hi]), len(rows)


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
        #: ``{DATA_DIGEST: ...}`` of the dataset, saved in every checkpoint (set by fit)
        #: what every checkpoint records of its data and model config (set by fit; see
        #: check_data_digest and check_model_config)
        self.identity: dict[str, Any] = {}
        self.show_bars = not quiet and sys.stderr.isatty()
        # the dense parameters: the same before and after the tables are sharded
        self.params = list(cast(EnsembleModel, model).dense_parameters())
        self.fault = distributed.InjectedFault.parse(distributed.rank())  # None but in tests
        #: rows each rank's share of a batch needs to train: BatchNorm needs two
        self.min_rows = min_batch_rows(model)
        self.optimizer = dense_optimizer(self.params, train["lr"], train["weight_decay"])
        self.schedule = LRSchedule(self.optimizer, train["lr_schedule"], train["lr"],
                                   total_steps=train["epochs"] * steps_per_epoch,
                                   warmup_steps=train["warmup_steps"],
                                   min_lr_ratio=train["min_lr_ratio"],
                                   step_epochs=train["step_epochs"], gamma=train["gamma"],
                                   plateau_factor=train["plateau_factor"],
                                   plateau_patience=train["plateau_patience"])
        # last, once nothing else can fail here (fit's cleanup needs the runner):
        # embedding: torchrec: the tables sharded by TorchRec's DMP, the dense rest under DDP
        # (in a single process too: one rank, the same kernels and optimizer)
        self.sharded = sharded.shard(model, device, train["embedding_sharding"]) \
            if sharded.is_torchrec(model) else None
        # data-parallel: model.loss under DDP (None in a single process: no collective at all)
        self.ddp = self.sharded if self.sharded is not None else \
            data_parallel(model, device) if distributed.active() else None
        if distributed.active():
            losses_over_ranks(model)

    def say(self, msg: str) -> None:
        """A line of the run's log: printed on stdout (below the progress bars, flushed) unless
        quiet, and appended to ``train.log`` when the runner has a :class:`RunLog`."""
        if self.log is not None:
            self.log.line(msg)
        elif not self.quiet:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def evaluate(self, split: Any) -> dict:
        """The model's metrics on ``split``; in a data-parallel run a collective (each rank
        predicts its share, rank 0 scores the gathered predictions, every rank gets them)."""
        sharded = {"sharded": True} if self.ddp is not None else {}
        return evaluate(self.model, split, batch_size=self.t["eval_batch_size"],
                        device=self.device, **sharded)

    def restore(self, ckpt: dict, path: Path) -> LoopState:
        """Loads ``last.pt`` into the model, optimizer, schedule and RNGs and returns its loop
        state; CheckpointError naming ``path`` when it does not fit."""
        try:
            # a TorchRec front's tables with their fused optimizer's state
            sharded.load_model_state(self.model, ckpt, path, self.sharded, optimizer=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            # load_state_dict restores the saved hyperparameters too; a resume may change
            # train.weight_decay (the schedule sets the lr at every step)
            for group in self.optimizer.param_groups:
                group["weight_decay"] = self.t["weight_decay"]
            self.schedule.load_state_dict(ckpt["schedule"])
            set_rng_state(ckpt["rng"])
            state = LoopState.from_checkpoint(ckpt)
            if distributed.active():
                ranks, r = ckpt.get("rng_ranks"), distributed.rank()
                if isinstance(ranks, list) and len(ranks) == distributed.world_size():
                    set_rng_state(ranks[r])
                elif r > 0:  # resumed with another world size: a fresh stream per rank
                    seed_everything(shuffle_seed(self.t["seed"] + r, state.epoch))
            return state
        except CheckpointError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: "
                                  f"{first_line(e)})") from e

    def last_checkpoint(self, state: LoopState) -> dict[str, Any]:
        """What ``last.pt`` holds: everything :meth:`restore` needs to continue exactly."""
        ckpt = {"model": self.model_state(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "rng": rng_state(),
                **state.state_dict(), **self.identity}
        if distributed.active():  # a collective: every rank's RNG states, in rank order
            ckpt["rng_ranks"] = distributed.all_gather_objects(ckpt["rng"])
        if self.sharded is not None:  # a collective: every rank writes its shards
            ckpt["tables"] = sharded.save_tables(self.sharded, self.out_dir,
                                                 f"last-e{state.epoch}", optimizer=True)
        return ckpt

    def model_state(self) -> dict[str, Any]:
        """The model's state dict as checkpoints hold it: without a TorchRec front's tables
        (they are in the checkpoint's DCP folder)."""
        return sharded.dense_state(self.model) if self.sharded is not None else \
            self.model.state_dict()

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
        seed = shuffle_seed(t["seed"], epoch)
        world = distributed.world_size() if self.ddp is not None else 1
        per_row_mean = getattr(model, "loss_reduction", "mean") == "mean"
        if self.ddp is None:
            batches = ((b, len(b)) for b in split.batches(t["batch_size"], shuffle=True,
                                                          seed=seed))
        else:  # this rank's share of each global batch
            batches = shard_batches(split, t["batch_size"], seed)
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t['epochs']}", leave=False,
                  disable=not self.show_bars, dynamic_ncols=True) as bar:
            for step, (batch, global_rows) in enumerate(batches):
                if step >= steps_per_epoch:
                    break
                if step > 0 and global_rows < self.min_rows * world:
                    # A remainder batch that leaves a rank too few rows: none (data-parallel),
                    # or one when the model has BatchNorm, which cannot train on one row.
                    # Skipping it depends only on the split size (and the world size), so
                    # runs stay reproducible.
                    continue
                if self.fault is not None:
                    self.fault.at(epoch, step + 1)
                batch = batch.to_device(device)  # (no wait for the device)
                lr = schedule.step()
                if self.ddp is None:
                    loss, out = cast(EnsembleModel, model).loss(batch)
                    objective = loss
                else:
                    loss, out = self.ddp(batch)
                    # DDP averages the ranks' gradients: a share of another size than
                    # global_rows / world (a remainder batch) is weighted by its rows, so the
                    # average is the gradient of the global batch's mean loss
                    objective = loss if len(batch) * world == global_rows else \
                        loss * (len(batch) * world / global_rows)
                first = (bad_step < 0) & ~torch.isfinite(loss.detach())
                bad_step = torch.where(first, step, bad_step)
                bad_loss = torch.where(first, loss.detach().double(), bad_loss)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()  # also applies the embedding's fused optimizer, if any
                if t["grad_clip"] is not None:
                    nn.utils.clip_grad_norm_(self.params, t["grad_clip"])
                optimizer.step()
                # the epoch's train loss is a mean per row, whatever the loss's reduction
                loss_sum += loss.detach().double() * (len(batch) if per_row_mean else 1)
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
        if self.ddp is not None:  # the global batch's loss and rows
            total, rows_total = distributed.all_sum([float(loss_sum), rows])
            loss_sum, rows = torch.tensor(total, dtype=torch.float64), int(rows_total)
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
        if distributed.active():  # every rank scores (and rank 0 saves) rank 0's statistics
            distributed.broadcast_batch_norm_stats(self.model)
        # data-parallel: every rank gets rank 0's scores of the gathered predictions, so all
        # ranks record the same best epoch and stop at the same epoch
        valid = self.evaluate(valid_split)
        metric = valid["fused"]["auc"]
        self.schedule.epoch_end(metric)
        entry = {"epoch": epoch, "train_loss": result.train_loss, "lr": result.lr,
                 "valid": valid}
        best = state.record(entry, metric, t["patience"])
        last = self.last_checkpoint(state)
        best_tables = {}
        if best and self.sharded is not None:  # a collective, before best.pt names it
            best_tables["tables"] = sharded.save_tables(self.sharded, self.out_dir,
                                                        f"best-e{epoch}", optimizer=False)
        if distributed.is_main():  # rank 0 alone writes the run directory
            # last.pt first: a crash between the two leaves best.pt of an earlier epoch, which
            # a resume rebuilds from last.pt (repair_best). In the other order a crash left the
            # best.pt of an epoch that a resume with changed settings trains again otherwise,
            # over the true best one. A TorchRec run keeps best.pt first: its best tables are
            # a folder of their own, which repair_best does not rebuild.
            if self.sharded is None:
                save_last(last, self.out_dir)  # the previous last.pt stays as last.prev.pt
            if best:
                save_checkpoint({"model": self.model_state(), "epoch": epoch,
                                 "valid": valid, **best_tables, **self.identity},
                                self.out_dir / BEST)
            if self.sharded is not None:
                save_last(last, self.out_dir)
            if self.sharded is not None:  # the folders no checkpoint names any more
                # (last.prev.pt's and best.pt's were written by this attempt or one before)
                sharded.prune_tables(self.out_dir, {last["tables"]},
                                     {f"last-e{epoch - 1}", f"best-e{state.best_epoch}"})
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
    path = out_dir / LAST
    if checkpoint is None:
        # on the CPU: RNG states must stay there; last.prev.pt when last.pt is unreadable
        checkpoint, path = load_last(out_dir, warn=lambda m: print(f"warning: {m}",
                                                                   file=sys.stderr))
    state = runner.restore(checkpoint, path)
    epochs = runner.t["epochs"]
    if state.epoch > epochs:
        raise ConfigError(f"resume: train.epochs={epochs} is below the {state.epoch} "
                          f"epochs the run in {out_dir} has completed")
    if distributed.is_main():
        repair_best(runner, out_dir, checkpoint, state)
    return state


def repair_best(runner: EpochRunner, out_dir: Path, checkpoint: dict, state: LoopState) -> None:
    """Writes ``best.pt`` from the resumed ``checkpoint`` when its epoch is the run's best and
    ``best.pt`` holds another (or none): the run stopped after writing ``last.pt`` and before
    ``best.pt`` (the model of that epoch is in both). Not for a TorchRec run (its best tables
    are a folder of their own: its load then names the mismatch)."""
    if state.best_epoch != state.epoch or state.epoch == 0 or "tables" in checkpoint:
        return
    path = out_dir / BEST
    try:
        held = load_checkpoint(path, keys=("model",)).get("epoch") if path.exists() else None
    except CheckpointError:
        held = None  # unreadable: rebuilt too
    if held == state.epoch:
        return
    entry = next((h for h in state.history if h.get("epoch") == state.epoch), None)
    if entry is None or "valid" not in entry:  # (a loop state fit did not make)
        return
    save_checkpoint({"model": checkpoint["model"], "epoch": state.epoch, "valid": entry["valid"],
                     **runner.identity}, path)
    print(f"warning: {path} held epoch {held}, not the run's best epoch {state.epoch}; "
          f"rewritten from the checkpoint resumed (the run stopped between the two writes)",
          file=sys.stderr)


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
    A ``train.warmup_steps`` at least the run's optimizer steps is one more warning on stderr
    at the start (:func:`warmup_warning`; not for epochs that ``train.max_steps_per_epoch``
    cuts short).

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
    world, main = distributed.world_size(), distributed.is_main()
    try:
        distributed.check_batch_size(t["batch_size"], world)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    check_mean_loss(config, world)
    device = distributed.local_device(resolve_device(config["device"]))
    check_backend(config["backend"], device)
    train_split, valid_split, test_split = (dataset.splits[s] for s in ("train", "valid", "test"))
    check_splits(dataset.splits, world)
    check_batch_rows(model, t["batch_size"], world, len(train_split))
    model.to(device)

    # A benchmark without validation data (BARS' valid_data: test.csv, or none given) hands the
    # test split in as "valid": then early stopping selects on the test set. The run still
    # trains (that is how those benchmarks are reported) but says so, loudly and in metrics.json.
    run_warnings = split_warnings(dataset.splits)
    if main:
        print_warnings(run_warnings)
    steps_per_epoch = math.ceil(len(train_split) / t["batch_size"])
    capped = t["max_steps_per_epoch"] is not None and t["max_steps_per_epoch"] < steps_per_epoch
    if capped:
        steps_per_epoch = t["max_steps_per_epoch"]
    # (not for epochs cut short by the cap: a quick look, or a search's warm-up stage, which
    # trains a candidate's first steps on purpose as its full run would)
    warmup = warmup_warning(t, steps_per_epoch) if not capped else None
    if warmup is not None and main:
        print_warnings([warmup])
    runner = EpochRunner(model, t, device, out_dir, steps_per_epoch, quiet=quiet or not main)
    runner.identity = {**data_digest(dataset), **model_config(config)}
    try:
        if resume:
            state = resume_state(runner, out_dir, checkpoint)
            checkpoint = None  # its tensors are copied: do not hold a second model for the run
        else:
            # rank r's RNG stream (dropout) starts from seed + r; rank 0's is the 1-process one
            seed_everything(t["seed"] + distributed.rank())
            state = LoopState()
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, out_dir / CONFIG_FILE)  # last: a failed resume leaves the old one
        log = RunLog(out_dir, quiet=quiet, first_epoch=state.epoch + 1) if main else \
            contextlib.nullcontext()
        with log as runner.log, ids_checked_by_the_splits(model, config, dataset.splits, device):
            metrics = _train_and_test(runner, state, config, dataset, run_warnings, plots,
                                      on_epoch_end)
    finally:
        if runner.sharded is not None:
            runner.sharded.close()
        if runner.ddp is not None:
            leave_data_parallel(model)
    if not quiet and main:  # again under the results: the start of a long run has scrolled away
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

    def load_best() -> None:
        best = load_checkpoint(out_dir / BEST, map_location=device, keys=("model",))
        check_model_config(best, config, out_dir / BEST)
        if best.get("epoch") != state.best_epoch:
            # e.g. a resume from last.prev.pt whose best epoch was not chosen again
            raise TrainingError(f"{out_dir / BEST} holds epoch {best.get('epoch')}, but the "
                                f"run's best epoch is {state.best_epoch}: its test metrics "
                                f"cannot be computed; evaluate another checkpoint with "
                                f"`cetnet evaluate {out_dir} --checkpoint {LAST}`")
        sharded.load_model_state(model, best, out_dir / BEST, runner.sharded)

    if runner.sharded is not None:  # every rank reads best.pt and its shards of the tables
        distributed.barrier()  # once rank 0 has written it
        load_best()
    else:
        # rank 0 reads best.pt; its failure is every rank's (none waits for the broadcast)
        distributed.from_main(load_best)
        if distributed.active():  # the best model from rank 0's best.pt on every rank
            distributed.broadcast_state(model)
    test = runner.evaluate(test_split)
    metrics = _run_metrics(config["name"], test, state, valid_split is test_split, run_warnings)
    world = distributed.world_size()
    metrics["world_size"] = world
    if runner.sharded is not None:  # embedding: torchrec: how the planner placed each table
        metrics["embedding_plan"] = runner.sharded.describe()
    metrics["environment"] = environment(device, world)
    if not distributed.is_main():
        return metrics
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
