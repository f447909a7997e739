"""Training and evaluation of CTR ensembles (see docs/MODEL_LIBRARY.md, ``cetnet.train``).

- :func:`fit` trains a built model on a dataset and writes the run directory;
  :func:`run_training` does it from a config (building the dataset and model first, after
  :func:`check_run` has checked all of it without writing anything).
- :func:`evaluate` scores a model on a split (fused and per-member AUC, gAUC, logloss);
  :func:`evaluate_run` scores a finished run's checkpoint.
- Started by ``torchrun`` (``WORLD_SIZE`` > 1), :func:`run_training` trains data-parallel on
  ``torch.distributed`` (docs/DISTRIBUTED.md, :mod:`cetnet.distributed`).
- :func:`register_dataset` / :func:`register_model`: the extension point that lets configs name
  datasets and ensembles from outside ``cetnet.data`` / ``cetnet.models``.
"""

from cetnet.train.builders import (build_model, load_dataset, load_plugins, prepare_dataset,
                                   register_dataset, register_model, unregister_dataset,
                                   unregister_model)
from cetnet.train.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from cetnet.train.evaluate import Predictions, evaluate, predict, score
from cetnet.train.loop import TrainingError, fit, resolve_device
from cetnet.train.report import format_metrics_table
from cetnet.train.rundir import RunDirError
from cetnet.train.runner import (build_run, check_run, evaluate_run, load_run_config,
                                 run_training)
from cetnet.train.schedule import LRSchedule

__all__ = ["BEST", "LAST", "CheckpointError", "LRSchedule", "Predictions", "RunDirError",
           "TrainingError", "build_model", "build_run", "check_run", "evaluate", "evaluate_run",
           "fit", "format_metrics_table", "load_checkpoint", "load_dataset", "load_plugins",
           "load_run_config", "predict", "prepare_dataset", "register_dataset", "register_model",
           "resolve_device", "run_training", "save_checkpoint", "score", "unregister_dataset",
           "unregister_model"]
