"""Datasets by name: :func:`load_dataset` for training code, :func:`prepare` and
:func:`install` (a local copy of the raw files) for the CLI."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from cetnet.data.bars import load_bars
from cetnet.data.csvio import shorten, shorten_list
from cetnet.data.dataset import CTRDataset
from cetnet.data.movielens import install_raw, load_movielens
from cetnet.data.options import ConfigError
from cetnet.data.synthetic import make_synthetic
from cetnet.messages import plugin_hint

__all__ = ["DATASETS", "INSTALLERS", "load_dataset", "prepare", "install"]


@functools.wraps(load_bars)  # its signature: the options checked below
def _bars(**options: Any) -> CTRDataset:
    return load_bars(options.pop("config"), **options)


@functools.wraps(load_movielens)
def _movielens(**options: Any) -> CTRDataset:
    options.setdefault("verbose", False)
    return load_movielens(**options)


DATASETS: dict[str, Callable[..., CTRDataset]] = {
    "movielens-100k": _movielens,
    "synthetic": make_synthetic,
    "bars": _bars,
}

#: Datasets whose raw files can come from a local copy instead of a download
#: (``cetnet data prepare NAME --from PATH``): ``installer(path, root=None) -> folder``.
INSTALLERS: dict[str, Callable[..., Any]] = {"movielens-100k": install_raw}


def _check_options(name: str, loader: Callable[..., Any], options: dict[str, Any]) -> None:
    """Every option is one the loader takes and the required ones are there (a loader taking
    ``**kwargs`` is not checked)."""
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # a builtin or other callable without a signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = [p.name for p in named]
    unknown = [k for k in options if k not in takes]
    if unknown:
        them = "option " + shorten(unknown[0]) if len(unknown) == 1 else (
            "options " + ", ".join(map(shorten, unknown)))
        raise ConfigError(
            f"dataset {name!r}: unknown {them}; it takes {', '.join(takes) or 'no options'}. "
            f"(Switching datasets with --set data.name=... keeps the old dataset's options in "
            f"the data section: give the whole section instead, e.g. --set "
            f"'data={{name: {name}}}'.)")
    missing = [p.name for p in named if p.default is p.empty and p.name not in options]
    if missing:
        raise ConfigError(f"dataset {name!r} needs " + ", ".join(f"{m}=..." for m in missing)
                          + (" (the dataset YAML)" if missing == ["config"] else ""))


def load_dataset(name: str = "movielens-100k", **options: Any) -> CTRDataset:
    """The dataset ``name`` with its options.

    - ``"movielens-100k"`` (default): ``root`` (cache dir), ``max_seq_len=50``, ``min_count=1``,
      ``genre_pooling="mean"``, ``refresh``, ``verbose`` — see
      :func:`cetnet.data.movielens.load_movielens`.
    - ``"synthetic"``: ``num_rows``, ``seed``, sizes — see
      :func:`cetnet.data.synthetic.make_synthetic`.
    - ``"bars"``: ``config`` (dataset YAML), ``dataset_id``, ``chunk_size``, ``min_count``,
      ``seq_order``, ``max_rows``, ``cache_dir`` — see :func:`cetnet.data.bars.load_bars`.

    Raises:
        ConfigError: an unknown dataset, an option it does not take, a missing required one,
            or a bad value (naming it).
    """
    loader = DATASETS.get(name) if isinstance(name, str) else None
    if loader is None:
        raise ConfigError(f"unknown dataset {shorten(name)}; choose one of "
                          f"{shorten_list(sorted(DATASETS))} {plugin_hint('a dataset')}")
    _check_options(name, loader, options)
    return loader(**options)


def prepare(name: str = "movielens-100k", **options: Any) -> CTRDataset:
    """Fetches / encodes / caches the dataset (with progress messages) and returns it;
    ``cetnet data prepare NAME`` prints its summary."""
    if name in ("movielens-100k", "bars"):
        options.setdefault("verbose", True)
    return load_dataset(name, **options)


def install(name: str, source: Any, **options: Any) -> Any:
    """Installs the local copy ``source`` of dataset ``name``'s raw files into its cache (the
    ``root`` option, if given, says where; the other options are the loader's and are not used
    here); returns the folder.

    Raises:
        ConfigError: ``name`` takes no local copy.
        FileNotFoundError, DataFormatError: ``source`` is missing or no copy of the dataset.
    """
    installer = INSTALLERS.get(name) if isinstance(name, str) else None
    if installer is None:
        raise ConfigError(f"--from: dataset {shorten(name)} has no raw files to install (only "
                          f"{', '.join(INSTALLERS)} has; bars reads the files its dataset YAML "
                          f"names, synthetic makes its rows)")
    return installer(source, root=options.get("root"))
