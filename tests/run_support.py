"""The small complete run config of the training tests (the ``train_config`` fixture of
tests/conftest.py returns it). A module of its own, not conftest: processes that the
data-parallel tests spawn import the test modules again, and there the name ``conftest`` can
resolve to bench/conftest.py once a test has put bench/ on sys.path."""

from __future__ import annotations


def small_run_config(**train: object) -> dict:
    """A complete run config: CETNet(DNN + DCNv2) on a 3000-row synthetic dataset."""
    return {
        "name": "synthetic-small",
        "data": {"name": "synthetic", "num_rows": 3000, "num_users": 60, "num_items": 120,
                 "num_clusters": 6, "cross_size": 8, "num_tags": 12, "max_seq_len": 6,
                 "seed": 0},
        "model": {"ensemble": "cetnet", "members": ["dnn", "dcnv2"], "embedding_dim": 8,
                  "embedding_optimizer": None,
                  "dnn": {"hidden": [32], "dropout": 0.1},
                  "dcnv2": {"cross_layers": 2, "hidden": [32], "dropout": 0.1},
                  "fusion": {"temperature": 1.0, "member_weight": 1.0}},
        "train": {"epochs": 3, "batch_size": 128, "eval_batch_size": 512, "lr": 0.01,
                  "lr_schedule": "cosine", "warmup_steps": 5, "patience": 2, "seed": 0,
                  **train},
        "backend": "reference",
        "device": "cpu",
    }


class StopRun(KeyboardInterrupt):
    """Raised by :func:`train_with_epoch_hook` to interrupt a run after an epoch (as Ctrl-C
    would)."""


def train_with_epoch_hook(config: dict, out, hook, *, resume: bool = False,
                          stop_after: int | None = None) -> dict:
    """``runner.run_training`` (quiet, no plots) calling ``hook(model, epoch)`` after every
    epoch with the model it built; interrupted after epoch ``stop_after`` (then the metrics
    are ``{}``). Returns the run's metrics."""
    from cetnet.train import runner

    models = []
    build = runner._build

    def capture(cfg, schema):
        models.append(build(cfg, schema))
        return models[-1]

    def on_epoch_end(epoch: int, entry: dict) -> None:
        hook(models[0], epoch)
        if stop_after is not None and epoch == stop_after:
            raise StopRun()

    runner._build = capture
    try:
        _, metrics = runner.run_training(config, out, resume=resume, quiet=True, plots=False,
                                         on_epoch_end=on_epoch_end)
    except StopRun:
        metrics = {}
    finally:
        runner._build = build
    return metrics
