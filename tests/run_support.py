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
