"""Datasets by name: :func:`load_dataset` for training code, :func:`prepare` for the CLI."""

from __future__ import annotations

from typing import Any, Callable

from cetnet.data.bars import load_bars
from cetnet.data.dataset import CTRDataset
from cetnet.data.movielens import load_movielens
from cetnet.data.synthetic import make_synthetic

__all__ = ["DATASETS", "load_dataset", "prepare"]


def _bars(**options: Any) -> CTRDataset:
    if "config" not in options:
        raise ValueError("load_dataset('bars') needs config=<dataset yaml path>")
    return load_bars(options.pop("config"), **options)


def _movielens(**options: Any) -> CTRDataset:
    options.setdefault("verbose", False)
    return load_movielens(**options)


DATASETS: dict[str, Callable[..., CTRDataset]] = {
    "movielens-100k": _movielens,
    "synthetic": make_synthetic,
    "bars": _bars,
}


def load_dataset(name: str = "movielens-100k", **options: Any) -> CTRDataset:
    """The dataset ``name`` with its options.

    - ``"movielens-100k"`` (default): ``root`` (cache dir), ``max_seq_len=50``, ``min_count=1``,
      ``genre_pooling="mean"``, ``refresh``, ``verbose`` — see
      :func:`cetnet.data.movielens.load_movielens`.
    - ``"synthetic"``: ``num_rows``, ``seed``, sizes — see
      :func:`cetnet.data.synthetic.make_synthetic`.
    - ``"bars"``: ``config`` (dataset YAML), ``dataset_id``, ``chunk_size``, ``min_count``,
      ``seq_order``, ``max_rows`` — see :func:`cetnet.data.bars.load_bars`.
    """
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    return loader(**options)


def prepare(name: str = "movielens-100k", **options: Any) -> CTRDataset:
    """Fetches / encodes / caches the dataset (with progress messages) and returns it;
    ``cetnet data prepare NAME`` prints its summary."""
    if name in ("movielens-100k", "bars"):
        options.setdefault("verbose", True)
    return load_dataset(name, **options)
