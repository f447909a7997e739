"""Runs from a config: build the dataset and the model, then train (:func:`run_training`) or
score a finished run's checkpoint (:func:`evaluate_run`).

A run is checked whole before its directory is touched (:func:`check_run`): the config, the
device, the dataset, the model (built on the meta device: no memory, whatever its size), the
directory (not in use by another process, holding no other run unless resuming or
overwriting) and, to resume, ``last.pt`` against the model and ``config.yaml``. Only then is
the directory created and locked (see :mod:`cetnet.train.rundir`); a resumed run's
``config.yaml`` is rewritten only after its checkpoint has been loaded.

Under torchrun (``$WORLD_SIZE`` > 1) :func:`run_training` trains data-parallel (see
docs/DISTRIBUTED.md): every rank checks the run, rank 0 alone claims and writes the directory.
When torchrun restarts the group after a failure (``$TORCHELASTIC_RESTART_COUNT`` > 0), the
run resumes from the run directory's last complete checkpoint (:func:`restart_plan`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from cetnet import distributed
from cetnet.atomic import remove_stale_temps
from cetnet.config import ConfigError, read_yaml, validate_config
from cetnet.data.cache import user_path
from cetnet.messages import shorten
from cetnet.train.builders import build_model, load_dataset
from cetnet.train.checkpoint import (BEST, LAST, LAST_KEYS, LAST_PREV, CheckpointError,
                                     check_data_digest, check_model_config, first_line,
                                     has_last, load_checkpoint, load_last)
from cetnet.train.evaluate import evaluate
from cetnet.train.loop import (EpochCallback, TrainingError, check_backend, check_batch_rows,
                               check_mean_loss, check_splits, fit, resolve_device,
                               split_warnings)
from cetnet.train.rng import seed_everything
from cetnet.train.sharded import check_model_checkpoint, load_model_state
from cetnet.train.rundir import (CONFIG_FILE, LOCK_FILE, METRICS_FILE, RunDirBusy,
                                 RunDirChanged, RunDirError, RunLock,
                                 check_run_dir, clear_run, foreign_files, make_run_dir, read_json,
                                 run_files, write_json)

__all__ = ["RunPlan", "build_run", "check_run", "run_training", "restart_plan", "finished_run",
           "train_or_reuse", "evaluate_run",
           "load_run_config", "checkpoint_path", "evaluation_path"]

#: The sections a resumed run must keep: they define what ``last.pt`` holds and what
#: ``cetnet evaluate`` rebuilds from ``config.yaml``.
FROZEN_ON_RESUME = ("data", "model")


@dataclass
class RunPlan:
    """What :func:`check_run` found: the validated config, the loaded dataset, the run
    directory (None: a new default one), ``last.pt`` of a resumed run, the model's parameter
    count, and the settings a resume changes (``"train.lr: 0.001 -> 0.0005"``)."""

    config: dict
    dataset: Any
    run_dir: Path | None
    checkpoint: dict | None = None
    num_parameters: int = 0
    changes: list[str] = field(default_factory=list)
    # (size, mtime) of config.yaml and last.pt when checked: a resume refuses to start if
    # another process changed them in between
    _stamps: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def take_checkpoint(self) -> dict | None:
        """The checkpoint, no longer held here (fit drops it once loaded: a run does not keep
        a second copy of the model and optimizer in memory)."""
        checkpoint, self.checkpoint = self.checkpoint, None
        return checkpoint


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


#: The files whose stamps tell whether another process wrote a run directory: what
#: ``--overwrite`` would delete (and a job decided on), and what a resume reads.
_OVERWRITE_STAMPED = (CONFIG_FILE, METRICS_FILE, LAST, LAST_PREV)
_RESUME_STAMPED = (CONFIG_FILE, LAST, LAST_PREV)


def _run_stamps(run_dir: Path, names: Sequence[str] = _OVERWRITE_STAMPED
                ) -> dict[str, tuple[int, int] | None]:
    return {n: _stamp(run_dir / n) for n in names}


def _load_dataset(config: dict) -> Any:
    data = dict(config["data"])
    return load_dataset(data.pop("name"), **data)


def _build(config: dict, schema: Any) -> Any:
    """The model, seeded with ``train.seed`` right before it is built (its initial weights
    depend on the seed only); an allocation that fails is a one-line ConfigError."""
    seed_everything(config["train"]["seed"])
    try:
        return _with_embedding(build_model(config["model"], schema, backend=config["backend"]),
                               config)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        text = str(e)
        raise ConfigError(f"config: model: its parameters do not fit in memory "
                          f"({shorten(text.strip().splitlines()[-1] if text else '', 100)})"
                          ) from e


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: a MemoryError, or torch's RuntimeError
    saying it cannot allocate / is out of memory (a run's build makes it a one-line
    ConfigError; a search trial fails on it, not the search)."""
    text = str(error)
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("allocate" in text or "out of memory" in text))


def _with_embedding(model: Any, config: dict) -> Any:
    """``model`` with the tables the config's ``embedding`` names (TorchRec's: its front
    replaced, :func:`cetnet.train.sharded.use_torchrec`)."""
    if config.get("embedding", "cetnet") == "torchrec":
        from cetnet.train.sharded import use_torchrec

        return use_torchrec(model)
    return model


def _meta_model(config: dict, schema: Any) -> Any:
    """The model built on the meta device (shapes, no memory): the config is checked whatever
    the model's size. A registered factory that cannot build there is built for real."""
    try:
        with torch.device("meta"):
            return _with_embedding(build_model(config["model"], schema,
                                               backend=config["backend"]), config)
    except (NotImplementedError, RuntimeError):
        return _build(config, schema)


def build_run(config: dict) -> tuple[Any, Any]:
    """``(dataset, model)`` of a validated config; the model is built right after seeding with
    ``train.seed``, so its initial weights depend on the seed only."""
    dataset = _load_dataset(config)
    return dataset, _build(config, dataset.schema)


def _diff(old: Any, new: Any, key: str) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two configs (or config sections); 1 and
    1.0 are the same value, True and 1 are not."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in _diff(old.get(k, "<unset>"), new.get(k, "<unset>"),
                               f"{key}.{k}" if key else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{key}[{i}]")]
    same = old == new and isinstance(old, bool) == isinstance(new, bool)
    return [] if same else [(key, old, new)]


def _resume_changes(run_dir: Path, config: dict) -> list[str]:
    """How ``config`` differs from the run's ``config.yaml``: ConfigError for a change of the
    data or the model, the other changes as sentences."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return []
    saved = validate_config(read_yaml(path))
    frozen = [d for s in FROZEN_ON_RESUME for d in _diff(saved[s], config[s], s)]
    if frozen:
        shown = "; ".join(f"{k}: {shorten(a, 30)} -> {shorten(b, 30)}"
                          for k, a, b in frozen[:3])
        raise ConfigError(f"resume: {shown}{' ...' if len(frozen) > 3 else ''}: a resumed run "
                          f"keeps the data and the model of {path}; train another run "
                          "(another --out) to change them")
    rest = {k: v for k, v in saved.items() if k not in FROZEN_ON_RESUME}
    now = {k: v for k, v in config.items() if k not in FROZEN_ON_RESUME}
    return [f"{k}: {shorten(a, 30)} -> {shorten(b, 30)}" for k, a, b in _diff(rest, now, "")]


def _check_resumable(ckpt: dict, config: dict, run_dir: Path) -> None:
    """ConfigError when ``last.pt`` leaves nothing to do with this config."""
    done, epochs = ckpt["epoch"], config["train"]["epochs"]
    if done > epochs:
        raise ConfigError(f"resume: train.epochs={epochs} is below the {done} epochs the run in "
                          f"{run_dir} has completed; give train.epochs > {done} to train on")
    if _scored_epochs(run_dir) != done:
        # interrupted after its last epoch, before its test scores, or while training on
        # after a finished run (metrics.json still tells of the shorter run): finish it
        return
    if ckpt["stopped"]:
        raise ConfigError(f"resume: the run in {run_dir} stopped early at epoch {done} "
                          f"({ckpt['bad_epochs']} epochs without a better validation AUC) and "
                          "has finished: nothing to resume")
    if done == epochs:
        raise ConfigError(f"resume: the run in {run_dir} has finished its {done} epochs: nothing "
                          f"to resume; give train.epochs > {done} (--epochs) to train on")


def _scored_epochs(run_dir: Path) -> int | None:
    """``epochs_completed`` of the run's ``metrics.json`` (the checkpoint its test scores are
    of), None without a readable one."""
    try:
        metrics = read_json(run_dir / METRICS_FILE)
    except (OSError, ValueError):
        return None
    return metrics.get("epochs_completed") if isinstance(metrics, dict) else None


def _has_finished(metrics: dict | None, config: dict) -> bool:
    """Whether ``metrics`` (a run's ``metrics.json``) are those of a run that has trained all
    of ``config``'s epochs or stopped early: not the leftover of a shorter run that a resume
    is training on."""
    return metrics is not None and bool(
        metrics.get("stopped_early")
        or metrics.get("epochs_completed", 0) >= config["train"]["epochs"])


def check_run(config: dict, out: str | Path | None = None, *, resume: bool = False,
              overwrite: bool = False) -> RunPlan:
    """Checks everything a run needs and writes nothing (``cetnet train --dry-run``).

    Raises ConfigError (config, device, model, resume settings), the dataset's errors,
    RunDirError (directory in use, holding another run), FileNotFoundError (nothing to
    resume) or CheckpointError (``last.pt`` unreadable or of another model).
    """
    config = validate_config(config)
    if resume and overwrite:
        raise ConfigError("--resume continues a run, --overwrite replaces it: give one")
    if resume and out is None:
        raise ConfigError("resume: give the run directory to resume")
    run_dir = None if out is None else Path(out)
    changes: list[str] = []
    if run_dir is not None:
        if resume and not has_last(run_dir):
            raise FileNotFoundError(f"resume: no {LAST} in {run_dir} (nothing to resume)")
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        # what --overwrite will delete is what was checked, now (before the slow loads): a
        # run another process writes from here on makes _claim refuse (RunDirChanged)
        seen = _run_stamps(run_dir) if overwrite else {}
        if resume:
            changes = _resume_changes(run_dir, config)
    check_backend(config["backend"], resolve_device(config["device"]))
    try:
        distributed.check_batch_size(config["train"]["batch_size"],
                                     distributed.planned_world_size())
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    check_mean_loss(config, distributed.planned_world_size())
    dataset = _load_dataset(config)
    check_splits(dataset.splits, distributed.planned_world_size())
    model = _meta_model(config, dataset.schema)
    check_batch_rows(model, config["train"]["batch_size"], distributed.planned_world_size(),
                     len(dataset.splits["train"]))
    if config.get("embedding", "cetnet") == "torchrec":
        from cetnet.train.sharded import check_sharding

        check_sharding(model, resolve_device(config["device"]),
                       config["train"]["embedding_sharding"])
    plan = RunPlan(config, dataset, run_dir, changes=changes,
                   num_parameters=sum(p.numel() for p in model.parameters()))
    if overwrite and run_dir is not None:
        plan._stamps = seen
    if resume:
        assert run_dir is not None
        plan._stamps = _run_stamps(run_dir, _RESUME_STAMPED)
        plan.checkpoint, path = _load_last(run_dir)
        check_model_checkpoint(model, plan.checkpoint, path)
        check_data_digest(plan.checkpoint, dataset, path)
        # the shapes can fit another model section (an edited fusion temperature): a resume
        # keeps the model, as it keeps the data
        check_model_config(plan.checkpoint, config, path)
        _check_resumable(plan.checkpoint, config, run_dir)
    return plan


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _load_last(run_dir: Path) -> tuple[dict, Path]:
    """The checkpoint to resume from (on the CPU: RNG states must stay there): ``last.pt``, or
    ``last.prev.pt`` when it is unreadable (a warning names it). In a data-parallel run rank 0
    chooses (and warns) and every rank reads the file it chose."""
    found: list = []

    def choose() -> str:
        found.extend(load_last(run_dir, warn=_warn))
        return found[1].name

    name = distributed.from_main(choose)
    if found:
        return found[0], found[1]
    path = run_dir / name
    return load_checkpoint(path, keys=("model", *LAST_KEYS)), path


def _claim(plan: RunPlan, resume: bool, overwrite: bool) -> tuple[Path, RunLock, bool]:
    """Creates and locks the run directory, then checks again what :func:`check_run` saw:
    another process may have written it in between."""
    created = plan.run_dir is None or not plan.run_dir.exists()
    run_dir = make_run_dir(plan.config["name"], plan.run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        changed = any(_stamp(run_dir / n) != s for n, s in plan._stamps.items())
        if resume:
            if changed:
                raise RunDirChanged(f"{run_dir}: the run changed while this one was starting "
                                    "(another process resumed it?); start the resume again")
        elif overwrite:
            if changed:  # another process wrote (or finished) a run there after the checks:
                # never delete what was not checked
                raise RunDirChanged(f"{run_dir}: the run changed while this one was starting "
                                    "(another process wrote it?); nothing was deleted: look at "
                                    "it, then start again")
            clear_run(run_dir)
        elif run_files(run_dir):
            raise RunDirError(f"{run_dir} already holds a run: another process wrote it while "
                              "this one was starting")
        remove_stale_temps(run_dir)
    except BaseException:
        _release(run_dir, lock, created)
        raise
    return run_dir, lock, created


def _release(run_dir: Path, lock: RunLock, created: bool) -> None:
    """Unlocks; a directory this run created and left empty (but the lock) goes away."""
    if created and not run_files(run_dir):
        try:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
        except OSError:
            pass
    lock.release()


def run_training(config: dict, out: str | Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, plots: bool = True,
                 on_epoch_end: EpochCallback | None = None) -> tuple[Path, dict]:
    """Trains the run a config describes; returns ``(run_dir, metrics)``.

    ``out`` is the run directory (default ``runs/<name>-<timestamp>``). It must be empty or
    missing, unless ``resume`` (continue the interrupted run in it; its data and model
    sections must not change, other changes are printed) or ``overwrite`` (delete the run in
    it first; files that are not a run's are never deleted). Nothing is written before
    :func:`check_run` has passed and the model is built: data that cannot be loaded (e.g. not
    downloadable) or a model that cannot be built leaves no run directory behind. The
    directory is locked for the whole run, so a second run into it fails at once (RunDirError).

    Started by torchrun with ``$WORLD_SIZE`` > 1 (or with a process group already initialized)
    the run is data-parallel (docs/DISTRIBUTED.md): the process group is initialized from
    torchrun's environment (and destroyed at the end if it was initialized here), every rank
    checks the run and builds the model, rank 0 alone creates, locks and writes the run
    directory, and every rank returns the same ``(run_dir, metrics)``.

    When torchrun restarts the group after a rank failed (``$TORCHELASTIC_RESTART_COUNT`` > 0)
    the run continues from its last complete checkpoint (:func:`restart_plan`). A collective
    that fails (another rank died, or waited on longer than ``$CETNET_DIST_TIMEOUT`` seconds)
    is a TrainingError saying so.
    """
    return _run_in_group(config, out, resume=resume, overwrite=overwrite, quiet=quiet,
                         plots=plots, on_epoch_end=on_epoch_end)


def _run_in_group(config: dict, out: str | Path | None, *, seen: dict | None = None,
                  **options: Any) -> tuple[Path, dict]:
    """:func:`run_training`; ``seen``: the stamps of the run files an ``overwrite`` decided on
    (:func:`train_or_reuse`), refused by the claim if the directory changed since."""
    device = resolve_device(validate_config(config)["device"])
    try:
        with distributed.process_group(distributed.local_device(device, initialized=False)):
            return _run_training(config, out, seen=seen, **options)
    except TrainingError:
        raise
    except distributed.DistributedError as e:
        raise TrainingError(f"data-parallel run, rank {distributed.launched_rank()}: {e}") from e
    except RuntimeError as e:
        if not distributed.collective_failure(e):
            raise
        raise TrainingError(_collective_failure_text(e)) from e


def _collective_failure_text(e: BaseException) -> str:
    """One line on a failed collective: which rank, whether it timed out, what to do."""
    try:
        limit = f"{distributed.timeout_seconds():g} s"
    except distributed.DistributedError:
        limit = "its limit"
    text = first_line(e)
    head = f"data-parallel run, rank {distributed.launched_rank()}: "
    lowered = text.lower()
    if ("timed out" in lowered and "connect" not in lowered) or "application timeout" in lowered:
        return (head + f"waited ${distributed.TIMEOUT_ENV} = {limit} for another rank at a "
                "collective: a rank hangs (or is that much slower; then raise "
                f"${distributed.TIMEOUT_ENV}) (torch: {text})")
    return (head + "a collective with the other ranks failed: another rank died or left "
            f"(torch: {text})")


def restart_plan(config: dict, out: Path | None, resume: bool, overwrite: bool
                 ) -> tuple[bool, bool]:
    """``(resume, overwrite)`` for this attempt. On a torchrun restart
    (``$TORCHELASTIC_RESTART_COUNT`` > 0) of a run with a directory: resume when it holds a
    checkpoint (``last.pt`` / ``last.prev.pt``: the failed attempt's last complete epoch);
    without one, start again over what the failed attempt left (its ``config.yaml``, logs) when
    its ``config.yaml`` is this run's config. Otherwise (first attempt, no directory given, or a
    directory of another run) what the command asked. Decided by rank 0 for every rank.
    ``out`` is None too when no earlier attempt of the job claimed the directory
    (:func:`cetnet.distributed.claimed_by_this_job`): what it holds is not this job's."""
    count = distributed.restart_count()
    if count == 0 or out is None or resume:
        return resume, overwrite
    run_dir = Path(out)

    def decide() -> tuple[bool, bool]:
        say = print if distributed.is_main() else (lambda *a, **k: None)
        if has_last(run_dir):
            say(f"torchrun restart {count}: resuming {run_dir} from its last checkpoint",
                file=sys.stderr)
            return True, False
        saved = run_dir / CONFIG_FILE
        if not overwrite and saved.is_file() and not foreign_files(run_dir):
            try:
                same = validate_config(read_yaml(saved)) == validate_config(config)
            except (ConfigError, OSError):
                same = False
            if same:
                say(f"torchrun restart {count}: no epoch of {run_dir} had finished; starting it "
                    "again", file=sys.stderr)
                return False, True
        return resume, overwrite

    return distributed.from_main(decide)


def finished_run(config: dict, run_dir: Path) -> dict | None:
    """The ``metrics.json`` of the run in ``run_dir`` when it has finished with this config
    (its ``config.yaml``), else None. For a torchrun restart: a rank that failed after rank 0
    wrote ``metrics.json`` leaves nothing to train, and the restart returns the run's metrics
    instead of failing with "nothing to resume". Decided by rank 0 for every rank."""

    def read() -> dict | None:
        if not has_last(run_dir):
            return None
        metrics = _saved_metrics(run_dir, config)
        if not _has_finished(metrics, config):
            return None
        print(f"torchrun restart {distributed.restart_count()}: {run_dir} has finished "
              f"({METRICS_FILE}): nothing to train", file=sys.stderr)
        return metrics

    return distributed.from_main(read)


def _saved_metrics(run_dir: Path, config: dict, *, same_name: bool = True) -> dict | None:
    """The ``metrics.json`` of ``run_dir`` when its ``config.yaml`` is ``config`` (``name``
    aside unless ``same_name``), else None (either missing, unreadable or another config)."""

    def key(cfg: dict) -> dict:
        cfg = validate_config(cfg)
        return cfg if same_name else {k: v for k, v in cfg.items() if k != "name"}

    try:
        if key(read_yaml(run_dir / CONFIG_FILE)) != key(config):
            return None
        metrics = read_json(run_dir / METRICS_FILE)
    except (ConfigError, OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def train_or_reuse(config: dict, run_dir: str | Path) -> tuple[dict, bool]:
    """``(metrics, reused)`` for a job of an experiment (a reproduce row, a search trial):
    the ``metrics.json`` of a run in ``run_dir`` that finished with this config (its ``name``
    aside: search trials of one configuration share a run), else the run
    trained there, quietly and without plots: resumed from its last checkpoint when it was
    interrupted, or started again over what a failed attempt (or a run of another config)
    left when it cannot resume."""
    run_dir = Path(run_dir)
    for look in range(3):
        seen = _run_stamps(run_dir)  # before the look: a later write is refused, not deleted
        metrics = _saved_metrics(run_dir, config, same_name=False)
        if metrics is not None and _has_finished(metrics, config):
            return metrics, True
        try:
            if has_last(run_dir):  # last.pt, or last.prev.pt while it was being replaced
                try:
                    return run_training(config, run_dir, resume=True, quiet=True,
                                        plots=False)[1], False
                except (RunDirBusy, RunDirChanged):
                    raise  # another process trains (or just trained) it: never start again
                except (CheckpointError, ConfigError, RunDirError) as e:
                    print(f"  cannot resume {run_dir} ({type(e).__name__}: {first_line(e)}); "
                          "starting again", file=sys.stderr)
            return _run_in_group(config, run_dir, resume=False, overwrite=run_dir.exists(),
                                 quiet=True, plots=False, on_epoch_end=None, seen=seen)[1], False
        except RunDirChanged:
            # another process wrote the run after it was looked at (e.g. finished it): look
            # again rather than resume or delete what was not checked
            if look == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _run_training(config: dict, out: str | Path | None, *, resume: bool, overwrite: bool,
                  quiet: bool, plots: bool, on_epoch_end: EpochCallback | None,
                  seen: dict | None = None) -> tuple[Path, dict]:
    # a restart continues only what an earlier attempt of this job claimed: a rank lost before
    # that leaves the run of before, which --overwrite replaces (not returned, nor resumed)
    restarted = None
    if out is not None and distributed.restart_count() > 0:
        path = Path(out)
        if distributed.from_main(lambda: distributed.claimed_by_this_job(path)):
            restarted = path
            done = finished_run(config, path)
            if done is not None:
                return path, done
    resume, overwrite = restart_plan(config, restarted, resume, overwrite)
    plan = check_run(config, out, resume=resume, overwrite=overwrite)
    if overwrite and seen is not None:
        plan._stamps = seen
    if distributed.is_main():
        for change in plan.changes:
            print(f"resume: {change} (config.yaml is updated)", file=sys.stderr)
    model = _build(plan.config, plan.dataset.schema)
    fault = distributed.InjectedFault.parse(distributed.rank())
    if fault is not None:  # test hook: a rank lost before the directory is claimed
        fault.at(0, 0)
    distributed.barrier()  # every rank has checked the directory before rank 0 locks it
    claimed: list = []

    def claim() -> str:
        claimed.extend(_claim(plan, resume, overwrite))
        distributed.mark_claimed(claimed[0])
        return str(claimed[0])

    run_dir = Path(distributed.from_main(claim))
    try:
        metrics = fit(model, plan.dataset, plan.config, run_dir, resume=resume, quiet=quiet,
                      plots=plots, on_epoch_end=on_epoch_end,
                      checkpoint=plan.take_checkpoint())
    except KeyboardInterrupt as exc:
        setattr(exc, "run_dir", run_dir)  # the CLI names it in its --resume hint
        raise
    finally:
        if claimed:
            _release(*claimed)
    return run_dir, metrics


def load_run_config(run_dir: str | Path) -> dict:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; is it a cetnet run directory?")
    return validate_config(read_yaml(path))


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    """The checkpoint file ``name`` names, as ``cetnet predict`` / ``export`` read it
    (:func:`cetnet.serve.checkpoint_file`): a bare file name (``best.pt``, ``last.pt``) is a file
    of ``run_dir``, anything with a ``/`` a path (a copy kept elsewhere; it must still fit the
    run's model). ConfigError for an empty name, FileNotFoundError naming ``--checkpoint`` when
    there is no such file."""
    from cetnet.serve import checkpoint_file  # (serve is built on this module)

    return checkpoint_file(run_dir, name)


def evaluation_path(run_dir: str | Path, split: str, checkpoint: str = BEST) -> Path:
    """Where :func:`evaluate_run` writes: ``eval_<split>.json`` for the best checkpoint,
    ``eval_<split>_<checkpoint stem>.json`` for another of the run's files (``last.pt`` never
    overwrites the best checkpoint's evaluation), ``eval_<split>_<stem>-<8 hex digits>.json``
    for a checkpoint kept elsewhere (given as a path; the digits hash its absolute path, so a
    copy named ``best.pt`` neither overwrites the run's own evaluation nor another copy's)."""
    run_dir, text = Path(run_dir), str(checkpoint)
    name = Path(text).name
    if "/" in text or os.sep in text:
        path = user_path(text).resolve()
        if path.parent != run_dir.resolve():
            tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
            return run_dir / f"eval_{split}_{_file_word(path.stem)}-{tag}.json"
        name = path.name  # the run's own file, named by a path
    suffix = "" if name == BEST else f"_{_file_word(Path(name).stem)}"
    return run_dir / f"eval_{split}{suffix}.json"


def _file_word(stem: str) -> str:
    """``stem`` with what a run file's name may not hold as ``_`` (rundir's pattern: an
    evaluation named otherwise would not be known as the run's by ``--overwrite``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "_"


def evaluate_run(run_dir: str | Path, split: str = "test", *, checkpoint: str = BEST,
                 device: str | None = None, write: bool = True,
                 batch_size: int | None = None) -> dict:
    """Rebuilds a run's dataset and model from its ``config.yaml``, loads ``checkpoint`` (the
    name of a file in ``run_dir``, or a path: :func:`checkpoint_path`) and scores ``split``,
    ``batch_size`` rows per forward pass (default the run's ``train.eval_batch_size``); writes
    :func:`evaluation_path` into the run directory when ``write``, holding the directory's
    shared lock: a training run writing it is an error (RunDirError), not a mixture."""
    run_dir = Path(run_dir)
    load_run_config(run_dir)  # first: a directory that is no run is not locked (gets no .lock)
    lock = RunLock(run_dir, shared=True).acquire() if write else None
    try:
        config = load_run_config(run_dir)  # locked: an overwrite meanwhile is refused, not mixed
        path = checkpoint_path(run_dir, checkpoint)
        dev = resolve_device(device or config["device"], "evaluate: --device" if device else
                             f"{run_dir / CONFIG_FILE}: device")
        check_backend(config["backend"], dev)
        dataset, model = build_run(config)
        if split not in dataset.splits:
            raise ConfigError(f"evaluate: no split {split!r}; the dataset has "
                              f"{', '.join(dataset.splits)}")
        if len(dataset.splits[split]) == 0:
            raise TrainingError(f"evaluate: the dataset's {split} split has no rows")
        state = load_checkpoint(path, map_location=dev, keys=("model",))
        check_data_digest(state, dataset, path)
        check_model_config(state, config, path, Path(run_dir) / CONFIG_FILE)
        load_model_state(model, state, path)
        model.to(dev)
        # The same flag as the run's metrics.json: scores of a valid split that is the test
        # split are test scores the checkpoint was selected on.
        # a checkpoint kept elsewhere is recorded by its absolute path (the file name's hash)
        given = str(checkpoint)
        name = given if "/" not in given and os.sep not in given else str(path.resolve())
        metrics = {"split": split, "checkpoint": name, "epoch": state.get("epoch"),
                   "valid_is_test": dataset.splits["valid"] is dataset.splits["test"],
                   "warnings": split_warnings(dataset.splits),
                   **evaluate(model, dataset.splits[split],
                              batch_size=batch_size or config["train"]["eval_batch_size"],
                              device=dev)}
        if write:
            write_json(metrics, evaluation_path(run_dir, split, checkpoint))
    finally:
        if lock is not None:
            lock.release()
    return metrics
