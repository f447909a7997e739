"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and primitive containers (no pickled classes), so loading one
cannot run code. :func:`save_checkpoint` writes a temporary file in the same directory and
``os.replace``-s it over the target: a crash mid-write leaves the previous checkpoint intact.
:func:`save_last` keeps the ``last.pt`` it replaces as ``last.prev.pt``, and :func:`load_last`
falls back to it (with a warning naming the bad file) when ``last.pt`` is unreadable.
:func:`load_checkpoint` turns a file torch cannot read (empty, truncated, not a checkpoint)
into a :class:`CheckpointError` naming it; :func:`check_model_state` says, before
``load_state_dict``, how a checkpoint and a model differ.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from cetnet.atomic import TEMP_SUFFIX, atomic_write, zip_damage

__all__ = ["BEST", "LAST", "LAST_PREV", "LAST_KEYS", "CheckpointError", "DATA_DIGEST",
           "check_data_digest", "data_digest", "MODEL_CONFIG", "model_config",
           "check_model_config", "save_checkpoint",
           "load_checkpoint", "save_last", "load_last", "has_last", "check_model_state",
           "optional_state_keys",
           "first_line"]

BEST = "best.pt"   # the model at the epoch with the best validation fused AUC
LAST = "last.pt"   # everything needed to resume, written after every epoch
LAST_PREV = "last.prev.pt"  # the last.pt before it: what a resume falls back to
#: The file torch.distributed.checkpoint writes last in a folder: without it the folder (the
#: TorchRec tables a checkpoint names, cetnet.train.sharded) is incomplete.
DCP_METADATA = ".metadata"
#: What ``last.pt`` holds besides ``model`` (see cetnet.train.loop.fit).
LAST_KEYS = ("optimizer", "schedule", "rng", "epoch", "best_metric", "best_epoch", "bad_epochs",
             "stopped", "history", "train_seconds", "train_samples")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (the message names it)."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_last(state: dict[str, Any], run_dir: str | Path) -> None:
    """Writes ``run_dir/last.pt`` atomically, keeping the ``last.pt`` it replaces as
    ``last.prev.pt``: the old file is hard-linked to a temporary name that is renamed over
    ``last.prev.pt`` (atomic), so ``last.pt`` exists at every moment; on a filesystem without
    hard links the old file is renamed to ``last.prev.pt`` before the new one is written."""
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / LAST_PREV
    if last.exists():
        tmp = run_dir / f".{LAST_PREV}.link{TEMP_SUFFIX}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
            os.replace(tmp, prev)
        except OSError:
            tmp.unlink(missing_ok=True)
            os.replace(last, prev)
    save_checkpoint(state, last)


def has_last(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``last.pt`` or a ``last.prev.pt`` to resume from."""
    return any((Path(run_dir) / n).is_file() for n in (LAST, LAST_PREV))


def load_last(run_dir: str | Path, keys: Iterable[str] = ("model", *LAST_KEYS),
              warn: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """``(checkpoint, path)``: ``run_dir/last.pt`` read on the CPU, or ``last.prev.pt`` when
    ``last.pt`` is missing or unreadable (truncated, corrupt, incomplete: ``warn`` gets a line
    naming it and the file used instead).

    Raises:
        FileNotFoundError: neither file exists (nothing to resume).
        CheckpointError: no file is usable (the message names each and why).
    """
    run_dir = Path(run_dir)
    keys = tuple(keys)
    errors: list[CheckpointError] = []
    for path in (run_dir / LAST, run_dir / LAST_PREV):
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path, keys=keys)
            tables = state.get("tables")  # embedding: torchrec: the DCP folder it names
            if tables is not None and not (run_dir / str(tables) / DCP_METADATA).is_file():
                raise CheckpointError(f"{path}: its tables folder {run_dir / str(tables)} is "
                                      f"missing or incomplete")
        except CheckpointError as e:
            errors.append(e)
            continue
        if errors and warn is not None:
            for err in errors:
                warn(f"{err}; resuming from {path} (epoch {state.get('epoch')}) instead")
        return state, path
    if errors:
        raise CheckpointError(f"resume: no usable checkpoint in {run_dir}: "
                              + "; ".join(str(e) for e in errors))
    raise FileNotFoundError(f"resume: no {LAST} in {run_dir} (nothing to resume)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    keys: Iterable[str] = ()) -> dict:
    """Reads a checkpoint with ``weights_only=True`` (tensors and primitive containers only);
    ``keys`` are the entries it must have (``("model",)`` for a model to load).

    Raises:
        OSError: the file cannot be opened (FileNotFoundError when it is missing).
        CheckpointError: the file is empty, truncated or corrupt, holds objects that
            ``weights_only`` does not load, is not a mapping or lacks one of ``keys``.
    """
    path = Path(path)
    with open(path, "rb") as f:  # an OSError here: the file cannot be opened
        size = os.fstat(f.fileno()).st_size
        damage = zip_damage(f)
        if damage is not None:
            raise CheckpointError(f"{path}: not a readable checkpoint ({damage})")
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = first_line(e)
            if "Weights only load failed" in detail:
                detail = "it holds objects other than tensors and primitive containers"
            raise CheckpointError(f"{path}: not a cetnet checkpoint ({detail})") from e
        except Exception as e:  # noqa: BLE001 - torch.load of bad bytes raises anything
            if size == 0:
                raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint") from e
            raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes, truncated "
                                  f"or corrupt: {first_line(e)})") from e
    return _check_state(state, path, keys)


#: The checkpoint entry holding the dataset's :meth:`~cetnet.data.CTRDataset.encoding_digest`.
DATA_DIGEST = "data_digest"
#: The entry holding :meth:`~cetnet.data.CTRDataset.options_digest` (how the loader arranged
#: values the schema does not say, e.g. a sequence's order); checkpoints of before lack it.
DATA_OPTIONS = "data_options"


def data_digest(dataset: Any) -> dict[str, str]:
    """``{DATA_DIGEST: digest}`` for a checkpoint of a model trained on ``dataset`` ({} for a
    dataset object without :meth:`~cetnet.data.CTRDataset.encoding_digest`, e.g. a
    plugin's)."""
    digest = getattr(dataset, "encoding_digest", None)
    options = getattr(dataset, "options_digest", None)
    return {**({DATA_DIGEST: digest()} if callable(digest) else {}),
            **({DATA_OPTIONS: options()} if callable(options) else {})}


def check_data_digest(state: dict, dataset: Any, path: str | Path) -> None:
    """CheckpointError when the checkpoint ``state`` (read from ``path``) was trained on data
    that encoded differently from ``dataset`` now: its embedding rows would be looked up by
    other tokens' ids, a silently wrong model. Checkpoints from before digests (none
    recorded) are taken as they are."""
    now = data_digest(dataset)
    if all(state.get(k) is None or now.get(k) is None or state[k] == now[k]
           for k in (DATA_DIGEST, DATA_OPTIONS)):
        return
    raise CheckpointError(
        f"{path}: the run's dataset now encodes rows differently from the data this "
        f"checkpoint was trained on (its vocabularies, dense statistics, features or a "
        f"sequence's order changed: "
        f"were the data files replaced, or prepared with other options?); its embeddings "
        f"would be looked up by other tokens' ids. Restore the data the run was trained on, "
        f"or train a new run")


#: The checkpoint entry holding the ``model`` section of the config it was trained with.
MODEL_CONFIG = "model_config"


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{MODEL_CONFIG: config["model"]}`` for a checkpoint (see :func:`check_model_config`)."""
    return {MODEL_CONFIG: config["model"]}


def check_model_config(state: dict, config: Mapping[str, Any], path: str | Path,
                       config_path: str | Path | None = None) -> None:
    """CheckpointError when the checkpoint ``state`` (read from ``path``) was trained with
    another ``model`` section than ``config`` (a run's ``config.yaml``) has: a run overwritten
    while it was read (its new ``config.yaml`` with the old ``best.pt``), or another run's
    checkpoint, whose weights fit the shapes but not a setting such as the fusion temperature
    (silently other predictions). Compared as JSON (a tuple in memory is a list once in
    ``config.yaml``, NaN equals NaN); checkpoints of before (no section recorded) are taken as
    they are. ``config_path`` names ``config``'s file in the message (default: the
    ``config.yaml`` beside the checkpoint; another run's checkpoint is beside another one)."""
    saved = state.get(MODEL_CONFIG)
    if saved is None or _canonical(saved) == _canonical(config["model"]):
        return
    where = config_path if config_path is not None else Path(path).parent / "config.yaml"
    raise CheckpointError(
        f"{path}: trained with another model config than {where}"
        " says (was the run overwritten while this read it, or is the checkpoint another "
        "run's?); read the run again, or give the run's own checkpoint")


def _canonical(section: Any) -> str:
    return json.dumps(section, sort_keys=True, default=str)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 120 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [""])[0][:120] or type(e).__name__


def _check_state(state: Any, path: Path, keys: Iterable[str]) -> dict:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a cetnet checkpoint (it holds a "
                              f"{type(state).__name__}, not a mapping)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a complete cetnet checkpoint (no {', '.join(missing)})")
    if "model" in state and not isinstance(state["model"], Mapping):
        raise CheckpointError(f"{path}: not a cetnet checkpoint (its 'model' is no state dict)")
    return state


def _shape(x: Any) -> tuple[int, ...] | str:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _names(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit
                                      else "")


def optional_state_keys(model: torch.nn.Module) -> set[str]:
    """The state keys of ``model`` that its modules added after states were saved without them
    (a module's ``OPTIONAL_STATE_KEYS``, e.g. a learned temperature's bounds): a checkpoint
    without them still fits (the module loads it as before)."""
    return {f"{name}.{key}" if name else key for name, module in model.named_modules()
            for key in getattr(module, "OPTIONAL_STATE_KEYS", ())}


def check_model_state(state: Mapping[str, Any], model: torch.nn.Module | None,
                      path: str | Path, expected: Mapping[str, Any] | None = None) -> None:
    """CheckpointError naming ``path`` when the state dict ``state`` does not fit ``model``
    (or the state dict ``expected``): missing or unexpected entries, or a tensor of another
    shape. Shapes are compared without touching values, so ``model`` may live on the meta
    device."""
    if expected is None:
        if model is None:
            raise ValueError("check_model_state: give model or expected")
        expected = model.state_dict()
    optional = optional_state_keys(model) if model is not None else set()
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {_shape(state[k])} vs {_shape(v)}" for k, v in expected.items()
              if k in state and _shape(state[k]) != _shape(v)]
    if not (missing or unexpected or shapes):
        return
    parts = ([f"missing {_names(missing)}"] if missing else []) + \
        ([f"unexpected {_names(unexpected)}"] if unexpected else []) + \
        ([f"other shapes (checkpoint vs model): {_names(shapes, 2)}"] if shapes else [])
    raise CheckpointError(f"{path} does not fit the model of the config (another "
                          f"architecture?): {'; '.join(parts)}")
