"""BARS / FuxiCTR csv datasets, described by a FuxiCTR-style dataset YAML.

The YAML is what FuxiCTR reads (a ``dataset_config.yaml`` mapping ``dataset_id -> config``, a
BARS tuner config with a ``dataset_config:`` section, or the config mapping itself)::

    train_data: AmazonElectronics_x1/train.csv
    valid_data: AmazonElectronics_x1/test.csv
    test_data: AmazonElectronics_x1/test.csv
    min_categr_count: 1
    feature_cols:
      - {name: user_id, type: meta, remap: False}          # the gAUC group (first meta column)
      - {name: [item_id, cate_id], type: categorical}      # a list names several columns
      - {name: price, type: numeric}
      - {name: item_history, type: sequence, splitter: ^, max_len: 100,
         share_embedding: item_id}                           # ids from item_id's vocabulary
    label_col: {name: label, dtype: float}

Honoured keys: ``name`` (str or list), ``type`` (categorical, numeric, sequence, meta),
``active``, ``splitter``, ``max_len``, ``share_embedding`` (the ids of the named feature's
vocabulary; the embedding table is the feature's own), ``min_categr_count``, ``preprocess:
copy_from(col)``, ``fill_na`` (numeric: the number an empty cell reads as, counted in its
statistics; without it the train mean; categorical or sequence: FuxiCTR's missing-value token,
read as out of vocabulary (padding in a sequence) like an empty cell), ``normalizer`` (numeric: ``StandardScaler``,
the default, or ``MinMaxScaler``), ``group_id`` (in the dataset config or a tuner config's
``tuner_space``: the meta or categorical column gAUC groups by, default the first meta column;
without one gAUC is not reported), and our own ``order: oldest_first | newest_first`` for
sequences. Columns with ``pretrained_emb`` are skipped (no h5 reader here) and listed in the
dataset's notes; FuxiCTR's model keys (``embedding_dim``, ``feature_encoder``, ...) are ignored
and named in the notes; ``category_processor`` is refused, and so is any key FuxiCTR does not
know either (a typo). Sequence cells in the BARS x1 files list
the oldest behaviour first (FuxiCTR pads and truncates at the front); they are reversed so column 0
is the most recent, and the ``max_len`` most recent are kept. :mod:`cetnet.data.bars_config`
parses and checks the YAML (:func:`read_config`); this module reads the csv files it names.

Files are read in chunks of ``chunk_size`` rows with the csv module: text is never held whole;
the encoded ids are (int32). Train is read once: tokens get provisional codes while counted, then
one table lookup turns them into vocabulary ids.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, cast

import numpy as np

# the config types and parser live in bars_config; re-exported: they are part of this API
from cetnet.data.bars_config import BarsColumn, BarsConfig, read_config
from cetnet.data.cache import cache_file, cached, file_stamp, open_cache_dir
from cetnet.data.csvio import DataFormatError, check_data_file, parse_float, read_chunks, shorten
from cetnet.data.dataset import CTRDataset, Split, SplitStats
from cetnet.data.normalize import DenseStats
from cetnet.data.options import ConfigError, check_bool, check_int
from cetnet.data.schema import OOV_ID, FeatureSpec, Schema
from cetnet.data.vocab import TokenCounter, Vocabulary

__all__ = ["BarsColumn", "BarsConfig", "read_config", "load_bars"]

# Bump when the encoding changes: cached encodings of older code are then not reused.
_CACHE_VERSION = 3
# The key of the gAUC group array among a split's raw arrays (no csv column is named so).
_GROUP = "\x00group"

# tokens -> their codes (train) or ids (the other splits)
Lookup = Callable[[list[str]], list[int] | np.ndarray]
Log = Callable[[str], None]
Raw = dict[str, np.ndarray]  # a split as read: feature name / label / _GROUP -> its array


def _root(cfg: BarsConfig, name: str) -> BarsColumn:
    """The feature whose vocabulary ``name`` uses (following share_embedding; read_config has
    checked the chain ends at a categorical or sequence feature without a cycle)."""
    col = next(c for c in cfg.columns if c.name == name and c.type != "meta")
    return col if col.share is None else _root(cfg, col.share)


class _SplitReader:
    """Reads one csv into id / float / label / group arrays, a chunk at a time."""

    def __init__(self, cfg: BarsConfig, lookups: Mapping[str, Lookup], groups: dict[str, int],
                 chunk_size: int, max_rows: int | None, *, label_optional: bool = False) -> None:
        self.cfg, self.lookups, self.groups = cfg, lookups, groups
        self.chunk_size, self.max_rows = chunk_size, max_rows
        #: new rows to score may come without the label column (then all 0, :attr:`labelled`
        #: False); a split's file must have it
        self.label_optional = label_optional
        self.labelled = True

    def read(self, path: Path) -> Raw:
        """Feature name / label / ``_GROUP`` -> the file's array."""
        parts = list(self.chunks(path))  # read_chunks: >= 1 row
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def chunks(self, path: Path) -> Iterator[Raw]:
        """Feature name / label / ``_GROUP`` -> the array of ``chunk_size`` rows of the file at
        a time (the last: the rest)."""
        cfg = self.cfg
        feats = [c for c in cfg.columns if c.type != "meta"]  # metas only matter as the group
        wanted = sorted({c.column for c in feats} | (
            set() if self.label_optional else {cfg.label}) | (
            {cfg.group_column} if cfg.group_column else set()))
        optional = [cfg.label] if self.label_optional and cfg.label not in wanted else []
        rows = 0
        for lines, chunk in read_chunks(path, wanted, chunk_size=self.chunk_size,
                                        optional=optional):
            if self.max_rows is not None:
                keep = self.max_rows - rows
                if keep <= 0:
                    break
                lines, chunk = lines[:keep], {k: v[:keep] for k, v in chunk.items()}
            rows += len(lines)
            self.labelled = cfg.label in chunk
            part = {c.name: self._column(c, chunk[c.column], path, lines) for c in feats}
            part[cfg.label] = self._label(chunk[cfg.label], path, lines) if self.labelled \
                else np.zeros(len(lines))
            part[_GROUP] = self._groups(chunk[cfg.group_column]) if cfg.group_column \
                else np.zeros(len(lines), np.int64)
            yield part

    def _groups(self, values) -> np.ndarray:
        # By raw value, with ids shared across splits: a user unseen in train (OOV as a feature)
        # still gets a gAUC group of its own.
        g = self.groups
        return np.fromiter((g.setdefault(v, len(g)) for v in values), np.int64, len(values))

    def _label(self, values, path: Path, lines: list[int]) -> np.ndarray:
        y = np.asarray(parse_float(values, path, lines, self.cfg.label))
        bad = np.flatnonzero(~np.isin(y, (0.0, 1.0)))
        if len(bad):
            raise DataFormatError(path, lines[bad[0]], self.cfg.label,
                                  f"label must be 0 or 1, got {shorten(values[bad[0]])}")
        return y

    def _column(self, c: BarsColumn, values, path: Path, lines: list[int]) -> np.ndarray:
        if c.type == "numeric":
            return np.asarray(parse_float(values, path, lines, c.column))
        lookup = self.lookups[c.name]
        na = c.fill_na  # FuxiCTR's na value: never a vocabulary entry, read as a missing value
        if na is not None:
            values = ["" if v == na else v for v in values]
        if c.type == "categorical":
            return np.asarray(lookup(list(values)), dtype=np.int32)
        seqs = [v.split(c.splitter) if v else [] for v in values]
        if na is not None:  # (FuxiCTR pads it)
            seqs = [[t for t in s if t != na] for s in seqs]
        if not c.newest_first:
            seqs = [s[::-1] for s in seqs]
        seqs = [s[:c.max_len] for s in seqs]
        lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
        out = np.zeros((len(seqs), c.max_len), np.int32)
        # row-major masking fills each row's cells left to right, in one vectorized write
        out[np.arange(c.max_len) < lens[:, None]] = lookup(list(itertools.chain(*seqs)))
        return out


def load_bars(config: str | Path | Mapping[str, Any], *, dataset_id: str | None = None,
              chunk_size: int = 100_000, min_count: int | None = None,
              seq_order: str = "oldest_first", max_rows: int | None = None,
              cache_dir: str | Path | None = None, verbose: bool = False) -> CTRDataset:
    """Reads a BARS / FuxiCTR csv dataset into a :class:`CTRDataset`.

    Vocabularies (``min_categr_count`` or ``min_count``) and dense statistics come from the train
    file only. Empty categorical cells are OOV; empty numeric cells are imputed with the train
    mean; both are counted in the summary.

    Args:
        config: the dataset YAML (path or mapping), see the module docstring.
        dataset_id: which dataset of a multi-dataset YAML.
        chunk_size: rows parsed at a time.
        min_count: overrides the YAML's ``min_categr_count``.
        seq_order: default order of ids in sequence cells (see :func:`read_config`).
        max_rows: read at most this many rows of each file (quick looks at big files).
        cache_dir: if given, the encoded dataset is saved there and reloaded while the config,
            the options and the csv files (size, modification and status-change times,
            inode: see :func:`~cetnet.data.cache.file_stamp`) are unchanged.
        verbose: report progress on stderr.

    Raises:
        ConfigError: a bad option or dataset config (naming the file, key and feature).
        FileNotFoundError: the YAML or a csv file does not exist.
        DataFormatError: a csv file that is not readable text, has no data rows, lacks a
            column, has a line with the wrong column count, a non-numeric value or a non-0/1
            label, a quote never closed (naming file, line and column); or a cache file that
            cannot be written (:class:`~cetnet.data.dataset.CacheError`). An unreadable cache
            file is rebuilt.
    """
    cfg = read_config(config, dataset_id=dataset_id, min_count=min_count, seq_order=seq_order)
    chunk_size = check_int(chunk_size, "chunk_size", "bars", minimum=1)
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows", "bars", minimum=1)
    verbose = check_bool(verbose, "verbose", "bars")
    _check_files(cfg)  # all of them before reading any: a missing test file fails at once
    path, stamps = None, []
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, Path)):
            raise ConfigError(f"bars: cache_dir: expected a directory path, got "
                              f"{shorten(cache_dir)}")
        stamps = sorted({file_stamp(p) for p in cfg.files.values()})
        settings = [c.settings() for c in cfg.columns if c.settings()]
        path = cache_file(open_cache_dir(cache_dir), cfg.dataset_id,
                          (_CACHE_VERSION, cfg, stamps, max_rows, *([settings] if settings
                                                                    else [])))
    dataset = cached(path, lambda: _encode(cfg, chunk_size, max_rows, verbose), verbose=verbose,
                     sources=stamps, loader=("bars", _CACHE_VERSION))
    dataset.row_encoder = functools.partial(_encode_rows, cfg, dataset, chunk_size)
    newest = sorted(c.name for c in cfg.columns if c.type == "sequence" and c.newest_first)
    dataset.encoding_options = {"newest_first": newest} if newest else {}
    return dataset


def _encode_rows(cfg: BarsConfig, dataset: CTRDataset, chunk_size: int, path: str | Path,
                 chunk_rows: int | None = None) -> Iterator[tuple[Split, bool]]:
    """New rows in the format of the dataset's own csv files (its config's columns, sequence
    separators and order, ``copy_from`` features), encoded with its train vocabularies and
    dense statistics: ``(split, labelled)`` of ``chunk_rows`` data lines at a time (None: one
    of the whole file). The label column is optional (without it the rows are unlabelled);
    gAUC groups are the rows' raw group values, numbered across the chunks."""
    feats = [c for c in cfg.columns if c.type != "meta"]
    numeric = [c.name for c in feats if c.type == "numeric"]
    lookups = {c.name: dataset.vocabs[c.name].encode for c in feats if c.type != "numeric"}
    reader = _SplitReader(cfg, lookups, {}, chunk_rows or chunk_size, None, label_optional=True)
    assert dataset.dense_stats is not None  # a BARS dataset always has them (maybe empty)
    raws = reader.chunks(Path(path)) if chunk_rows else iter([reader.read(Path(path))])
    for raw in raws:
        yield (_split(raw, dataset.schema, dataset.dense_stats, numeric, cfg.group is not None),
               reader.labelled)


def _check_files(cfg: BarsConfig) -> None:
    """Every split's csv exists and is a readable regular file (naming the YAML key)."""
    for split, p in cfg.files.items():
        key = cfg.file_keys.get(split, f"{split}_data")
        try:
            check_data_file(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"{cfg.where}: {key}: no such file {p}") from None
        except DataFormatError as e:
            raise DataFormatError(p, e.line, e.column,
                                  f"{e.reason} ({key} of {cfg.where})") from None


def _encode(cfg: BarsConfig, chunk_size: int, max_rows: int | None,
            verbose: bool) -> CTRDataset:
    """Encodes the dataset ``cfg`` describes, in the phases of FuxiCTR's feature processor:
    read train, fit the vocabularies and dense statistics on it, transform every split with
    them, assemble schema, splits and notes. Train is read once: its tokens get provisional
    codes while they are counted, which one table lookup per feature then turns into ids."""

    def log(msg: str) -> None:
        if verbose:
            print(f"[cetnet.data] {cfg.dataset_id}: {msg}", file=sys.stderr)

    feats = [c for c in cfg.columns if c.type != "meta"]  # metas only matter as the group
    roots = {c.name: _root(cfg, c.name) for c in feats if c.type != "numeric"}
    numeric = [c.name for c in feats if c.type == "numeric"]
    groups: dict[str, int] = {}  # raw group value -> gAUC group id, shared by all splits

    def reader(lookups: Mapping[str, Lookup]) -> _SplitReader:
        return _SplitReader(cfg, lookups, groups, chunk_size, max_rows)

    # read train, counting tokens
    counters = {r.name: TokenCounter() for r in roots.values()}
    train = _read_split(reader({n: counters[r.name].add for n, r in roots.items()}), cfg,
                        "train", log)
    # fit on train (and turn its provisional codes into ids)
    vocabs = _fit_vocabularies(counters, roots, train)
    by_name = {c.name: c for c in feats}
    dense_stats = DenseStats.fit(
        _dense_matrix(train, numeric, cfg.label),
        fill=[cast(float | None, by_name[n].fill_na) for n in numeric],
        scalers=[by_name[n].scaler or "standard" for n in numeric])
    # transform: the other splits are read through the train vocabularies
    raw = _read_eval_splits(cfg, train, reader({n: vocabs[r.name].encode
                                                for n, r in roots.items()}), log)
    # assemble
    schema = _schema(cfg, feats, roots, vocabs)
    splits = _assemble_splits(raw, schema, dense_stats, numeric, cfg.group is not None)
    feature_vocabs = {c.name: vocabs[roots[c.name].name] for c in feats if c.name in roots}
    return CTRDataset(cfg.dataset_id, schema, splits, feature_vocabs, dense_stats, cfg.group,
                      _notes(cfg, splits))


def _read_split(reader: _SplitReader, cfg: BarsConfig, split: str, log: Log) -> Raw:
    """The arrays of ``split``'s csv file, read with ``reader``."""
    data = reader.read(cfg.files[split])
    log(f"read {len(data[cfg.label]):,} {split} rows from {cfg.files[split]}")
    return data


def _fit_vocabularies(counters: Mapping[str, TokenCounter], roots: Mapping[str, BarsColumn],
                      train: Raw) -> dict[str, Vocabulary]:
    """Each vocabulary root's vocabulary (its ``min_count`` over what train counted); the
    provisional codes in ``train`` of every feature using it become ids, in place."""
    vocabs: dict[str, Vocabulary] = {}
    for root in {r.name: r for r in roots.values()}.values():
        vocab, table = counters[root.name].finalize(root.min_count)
        vocabs[root.name] = vocab
        for n, r in roots.items():
            if r.name == root.name:
                train[n] = table[train[n]]
    return vocabs


def _read_eval_splits(cfg: BarsConfig, train: Raw, reader: _SplitReader,
                      log: Log) -> dict[str, Raw]:
    """Train and the arrays of valid and test; a split naming a file already read shares its
    arrays (the identity that later makes the splits one object)."""
    raw = {"train": train}
    for split in ("valid", "test"):
        same = next((k for k in raw if cfg.files[k] == cfg.files[split]), None)
        raw[split] = raw[same] if same is not None else _read_split(reader, cfg, split, log)
    return raw


def _dense_matrix(data: Raw, numeric: list[str], label: str) -> np.ndarray:
    """The numeric columns of a split as one ``[rows, n_numeric]`` matrix."""
    if not numeric:
        return np.zeros((len(data[label]), 0))
    return np.stack([data[n] for n in numeric], 1)


def _schema(cfg: BarsConfig, feats: list[BarsColumn], roots: Mapping[str, BarsColumn],
            vocabs: Mapping[str, Vocabulary]) -> Schema:
    """The features in config order (vocabulary sizes from the roots' vocabularies), the label,
    and the sparse feature gAUC groups by, if there is one."""
    specs = []
    for c in feats:
        if c.type == "numeric":
            specs.append(FeatureSpec(c.name, "dense"))
            continue
        root = roots[c.name]
        size = vocabs[root.name].size
        if c.type == "categorical":
            specs.append(FeatureSpec(c.name, "sparse", size))
        else:
            source = root.name if root.type == "categorical" and root is not c else None
            specs.append(FeatureSpec(c.name, "sequence", size, max_len=c.max_len,
                                     source=source))
    # the sparse feature gAUC groups by: the group itself, or the one a meta copies from
    sparse = {f.name for f in specs if f.kind == "sparse"}
    group = next((g for g in (cfg.group, cfg.group_column) if g in sparse), None)
    return Schema(specs, label=cfg.label, group=group)


def _assemble_splits(raw: Mapping[str, Raw], schema: Schema, dense_stats: DenseStats,
                     numeric: list[str], grouped: bool) -> dict[str, Split]:
    """One Split per name; names whose arrays are shared share one Split object."""
    splits: dict[str, Split] = {}
    for split, data in raw.items():
        twin = next((k for k in splits if raw[k] is data), None)
        splits[split] = splits[twin] if twin is not None else _split(data, schema, dense_stats,
                                                                     numeric, grouped)
    return splits


def _split(data: Raw, schema: Schema, dense_stats: DenseStats, numeric: list[str],
           grouped: bool) -> Split:
    """A split's arrays as a Split: dense columns normalized with the train statistics, OOV,
    cell and imputation counts in its stats; ``grouped``: the config names a group column."""
    dense, imputed = dense_stats.transform(_dense_matrix(data, numeric, schema.label))
    stats = SplitStats(imputed={k: int(v) for k, v in zip(numeric, imputed)})
    ids = {f.name: data[f.name] for f in schema.categorical}
    for f in schema.categorical:
        x = ids[f.name]
        real = x != 0 if f.kind == "sequence" else np.ones(x.shape, bool)
        stats.oov[f.name] = int((x == OOV_ID).sum())
        stats.cells[f.name] = int(real.sum())
    return Split(schema, sparse=ids, dense=dense, multihot={}, sequence=ids,
                 label=data[schema.label], group=data[_GROUP], stats=stats, grouped=grouped)


def _notes(cfg: BarsConfig, splits: Mapping[str, Split]) -> list[str]:
    """The config's notes, and which splits read the same file."""
    notes = list(cfg.notes) + cfg.ignored
    if splits["valid"] is splits["test"]:  # what fit checks to flag metrics.json valid_is_test
        notes.append(f"valid and test are the same file ({cfg.files['test'].name}): no separate "
                     f"validation data, so early stopping selects on the test set")
    for split in ("valid", "test"):
        if splits[split] is splits["train"]:
            notes.append(f"{split} and train are the same file ({cfg.files['train'].name}): "
                         f"{split} metrics are measured on training data")
    return notes
