"""Runs from a config: build the dataset and the model, then train (:func:`run_training`) or
score a finished run's checkpoint (:func:`evaluate_run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cetnet.config import read_yaml, validate_config
from cetnet.train.builders import build_model, load_dataset
from cetnet.train.checkpoint import BEST, LAST, load_checkpoint
from cetnet.train.evaluate import evaluate
from cetnet.train.loop import EpochCallback, fit, resolve_device, split_warnings
from cetnet.train.rng import seed_everything
from cetnet.train.rundir import CONFIG_FILE, make_run_dir, write_json

__all__ = ["build_run", "run_training", "evaluate_run", "load_run_config"]


def build_run(config: dict) -> tuple[Any, Any]:
    """``(dataset, model)`` of a validated config; the model is built right after seeding with
    ``train.seed``, so its initial weights depend on the seed only."""
    data = dict(config["data"])
    dataset = load_dataset(data.pop("name"), **data)
    seed_everything(config["train"]["seed"])
    model = build_model(config["model"], dataset.schema, backend=config["backend"])
    return dataset, model


def run_training(config: dict, out: str | Path | None = None, *, resume: bool = False,
                 quiet: bool = False, plots: bool = True,
                 on_epoch_end: EpochCallback | None = None) -> tuple[Path, dict]:
    """Trains the run a config describes; returns ``(run_dir, metrics)``.

    ``out`` is the run directory (default ``runs/<name>-<timestamp>``); with ``resume`` it
    must be the directory of the interrupted run.
    """
    config = validate_config(config)
    if resume and out is None:
        raise ValueError("resume: give the run directory to resume")
    if resume and not (Path(out) / LAST).exists():
        raise FileNotFoundError(f"resume: no {LAST} in {out} (nothing to resume)")
    run_dir = make_run_dir(config["name"], out)
    dataset, model = build_run(config)
    try:
        metrics = fit(model, dataset, config, run_dir, resume=resume, quiet=quiet, plots=plots,
                      on_epoch_end=on_epoch_end)
    except KeyboardInterrupt as exc:
        exc.run_dir = run_dir  # the CLI names it in its --resume hint
        raise
    return run_dir, metrics


def load_run_config(run_dir: str | Path) -> dict:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; is it a cetnet run directory?")
    return validate_config(read_yaml(path))


def evaluate_run(run_dir: str | Path, split: str = "test", *, checkpoint: str = BEST,
                 device: str | None = None, write: bool = True) -> dict:
    """Rebuilds a run's dataset and model from its ``config.yaml``, loads ``checkpoint`` and
    scores ``split``; writes ``eval_<split>.json`` into the run directory when ``write``."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    dataset, model = build_run(config)
    if split not in dataset.splits:
        raise ValueError(f"evaluate: no split {split!r}; the dataset has "
                         f"{', '.join(dataset.splits)}")
    dev = resolve_device(device or config["device"])
    state = load_checkpoint(run_dir / checkpoint, map_location=dev)
    model.load_state_dict(state["model"])
    model.to(dev)
    # The same flag as the run's metrics.json: scores of a valid split that is the test split
    # are test scores the checkpoint was selected on.
    metrics = {"split": split, "checkpoint": checkpoint, "epoch": state.get("epoch"),
               "valid_is_test": dataset.splits["valid"] is dataset.splits["test"],
               "warnings": split_warnings(dataset.splits),
               **evaluate(model, dataset.splits[split],
                          batch_size=config["train"]["eval_batch_size"], device=dev)}
    if write:
        write_json(metrics, run_dir / f"eval_{split}.json")
    return metrics
