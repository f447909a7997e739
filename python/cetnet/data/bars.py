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
``active``, ``splitter``, ``max_len``, ``share_embedding``, ``min_categr_count``, ``preprocess:
copy_from(col)``, ``group_id`` (in the dataset config or a tuner config's ``tuner_space``: the
meta or categorical column gAUC groups by, default the first meta column), and our own ``order:
oldest_first | newest_first`` for sequences. Columns with
``pretrained_emb`` are skipped (no h5 reader here) and listed in the dataset's notes; model keys
(``embedding_dim``, ``feature_encoder``, ...) are ignored. Sequence cells in the BARS x1 files list
the oldest behaviour first (FuxiCTR pads and truncates at the front); they are reversed so column 0
is the most recent, and the ``max_len`` most recent are kept.

Files are read in chunks of ``chunk_size`` rows with the csv module: text is never held whole;
the encoded ids are (int32). Train is read once: tokens get provisional codes while counted, then
one table lookup turns them into vocabulary ids.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from cetnet.data.csvio import DataFormatError, parse_float, read_chunks
from cetnet.data.dataset import CTRDataset, Split, SplitStats
from cetnet.data.normalize import DenseStats
from cetnet.data.schema import OOV_ID, FeatureSpec, Schema
from cetnet.data.vocab import TokenCounter, Vocabulary

__all__ = ["BarsColumn", "BarsConfig", "read_config", "load_bars"]

# Bump when the encoding changes: cached encodings of older code are then not reused.
_CACHE_VERSION = 3
# The key of the gAUC group array among a split's raw arrays (no csv column is named so).
_GROUP = "\x00group"

_COPY_FROM = re.compile(r"^\s*copy_from\(\s*([^)\s]+)\s*\)\s*$")
Lookup = Callable[[list], list]


@dataclass
class BarsColumn:
    """One feature (or the meta group column) of a BARS dataset."""

    name: str
    column: str                 # the csv column read (differs with copy_from)
    type: str                   # categorical | numeric | sequence | meta
    splitter: str = "^"
    max_len: int = 0
    share: str | None = None    # share_embedding: the feature whose vocabulary it uses
    min_count: int = 1
    newest_first: bool = False  # sequence cells list the most recent behaviour first


@dataclass
class BarsConfig:
    """A parsed dataset YAML."""

    dataset_id: str
    files: dict[str, Path]      # split -> csv (valid and test may be the same file)
    columns: list[BarsColumn]
    label: str
    group: str | None           # the meta or categorical column used as gAUC key
    group_column: str | None    # the csv column it reads (differs with copy_from): raw values
    notes: list[str]


def _resolve(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    # relative to the YAML first (portable), else to the working directory (FuxiCTR's way)
    return base / path if (base / path).exists() or not path.exists() else path


def read_config(config: str | Path | Mapping[str, Any], *, dataset_id: str | None = None,
                min_count: int | None = None, seq_order: str = "oldest_first") -> BarsConfig:
    """Parses a FuxiCTR dataset config (a YAML path or the loaded mapping).

    Args:
        config: the YAML file or mapping (see the module docstring for the accepted layouts).
        dataset_id: which dataset of a multi-dataset YAML (default: ``dataset_id`` in the YAML,
            or its only dataset).
        min_count: overrides ``min_categr_count``.
        seq_order: ``"oldest_first"`` (BARS files) or ``"newest_first"``: the default order of
            ids in sequence cells, per column overridable with ``order:``.
    """
    base, origin = Path.cwd(), "(a mapping)"
    if not isinstance(config, Mapping):
        base, origin = Path(config).expanduser().resolve().parent, str(config)
        with open(config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    if not isinstance(config, Mapping):
        raise ValueError("dataset config: expected a mapping")
    top = config
    dataset_id = dataset_id or top.get("dataset_id")
    cfg: Mapping = top.get("dataset_config", top)
    if "train_data" not in cfg:
        ids = [k for k, v in cfg.items() if isinstance(v, Mapping) and "train_data" in v]
        if dataset_id is None and len(ids) == 1:
            dataset_id = ids[0]
        if dataset_id not in ids:
            raise ValueError(f"dataset config: choose dataset_id among {ids}")
        cfg = cfg[dataset_id]
    dataset_id = dataset_id or "bars"
    if cfg.get("data_format", "csv") != "csv":
        raise ValueError(f"dataset config: data_format {cfg['data_format']!r}; only csv is read")
    if seq_order not in ("oldest_first", "newest_first"):
        raise ValueError(f"seq_order must be 'oldest_first' or 'newest_first', got {seq_order!r}")
    for key in ("train_data", "feature_cols", "label_col"):
        if key not in cfg:
            raise ValueError(f"dataset config: {key!r} is missing")
    files = {"train": cfg["train_data"], "valid": cfg.get("valid_data") or cfg.get("test_data"),
             "test": cfg.get("test_data") or cfg.get("valid_data")}
    if files["valid"] is None:
        raise ValueError("dataset config: needs valid_data or test_data")
    files = {k: _resolve(str(v), base) for k, v in files.items()}

    default_min = int(min_count if min_count is not None else cfg.get("min_categr_count", 1))
    columns, notes = [], []
    for col in cfg["feature_cols"]:
        names = col["name"] if isinstance(col["name"], list) else [col["name"]]
        kind = col.get("type")
        if kind not in ("categorical", "numeric", "sequence", "meta"):
            raise ValueError(f"dataset config: feature {names}: unsupported type {kind!r}")
        if not col.get("active", True):
            continue
        if col.get("pretrained_emb"):
            notes.append(f"skipped {', '.join(names)}: pretrained embeddings are not read")
            continue
        source = None
        if col.get("preprocess"):
            m = _COPY_FROM.match(str(col["preprocess"]))
            if not m:
                raise ValueError(f"dataset config: feature {names}: unsupported preprocess "
                                 f"{col['preprocess']!r} (only copy_from(column))")
            source = m.group(1)
        order = col.get("order", seq_order)
        if order not in ("oldest_first", "newest_first"):
            raise ValueError(f"dataset config: feature {names}: order must be 'oldest_first' or "
                             f"'newest_first', got {order!r}")
        for name in names:
            if kind == "sequence" and int(col.get("max_len", 0)) < 1:
                raise ValueError(f"dataset config: sequence {name!r} needs max_len >= 1")
            columns.append(BarsColumn(
                name, source or name, kind, str(col.get("splitter", "^")),
                int(col.get("max_len", 0)), col.get("share_embedding"),
                int(col.get("min_categr_count", default_min)), order == "newest_first"))
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset config: duplicate feature names in {names}")
    group = _group_column(cfg, top, columns, f"dataset config {origin}, dataset {dataset_id!r}")
    label = cfg["label_col"]
    if isinstance(label, list):
        raise ValueError("dataset config: one label_col only (multi-task labels unsupported)")
    return BarsConfig(str(dataset_id), files, columns, label["name"],
                      group.name if group else None, group.column if group else None, notes)


def _group_column(cfg: Mapping, top: Mapping, columns: list[BarsColumn],
                  where: str) -> BarsColumn | None:
    """The column gAUC groups by: the one ``group_id`` names (in the dataset config, else in the
    tuner config's ``tuner_space``, as FuxiCTR takes it), else the first meta column."""
    tuner = top.get("tuner_space") or {}
    for key, section in (("group_id", cfg), ("tuner_space.group_id", tuner)):
        if section.get("group_id"):
            name = section["group_id"]
            break
    else:
        return next((c for c in columns if c.type == "meta"), None)
    if isinstance(name, list) and len(name) == 1:  # a tuner_space value may be a 1-choice list
        name = name[0]
    col = next((c for c in columns if c.name == name), None)
    if col is None or col.type not in ("meta", "categorical"):
        # Never fall back silently: gAUC over the wrong (or no) groups looks like a real number.
        usable = [c.name for c in columns if c.type in ("meta", "categorical")]
        what = "no active column" if col is None else f"a {col.type} column"
        raise ValueError(f"{where}: {key} {name!r} names {what}; gAUC groups by a meta or "
                         f"categorical column: {', '.join(usable) or 'none'}")
    return col


def _root(cfg: BarsConfig, name: str, seen: tuple = ()) -> BarsColumn:
    """The feature whose vocabulary ``name`` uses (following share_embedding)."""
    col = next((c for c in cfg.columns if c.name == name and c.type != "meta"), None)
    if col is None or col.type == "numeric":
        raise ValueError(f"dataset config: share_embedding {name!r} is not a categorical or "
                         f"sequence feature")
    if col.share is None:
        return col
    if col.name in seen:
        raise ValueError(f"dataset config: share_embedding cycle through {name!r}")
    return _root(cfg, col.share, seen + (col.name,))


class _SplitReader:
    """Reads one csv into id / float / label / group arrays, a chunk at a time."""

    def __init__(self, cfg: BarsConfig, lookups: Mapping[str, Lookup], groups: dict[str, int],
                 chunk_size: int, max_rows: int | None) -> None:
        self.cfg, self.lookups, self.groups = cfg, lookups, groups
        self.chunk_size, self.max_rows = chunk_size, max_rows

    def read(self, path: Path) -> dict[str, np.ndarray]:
        """Feature name / label / ``_GROUP`` -> the file's array."""
        cfg = self.cfg
        feats = [c for c in cfg.columns if c.type != "meta"]  # metas only matter as the group
        wanted = sorted({c.column for c in feats} | {cfg.label} | (
            {cfg.group_column} if cfg.group_column else set()))
        parts: dict[str, list[np.ndarray]] = {c.name: [] for c in feats}
        parts[cfg.label], parts[_GROUP] = [], []
        rows = 0
        for lines, chunk in read_chunks(path, wanted, chunk_size=self.chunk_size):
            if self.max_rows is not None:
                keep = self.max_rows - rows
                if keep <= 0:
                    break
                lines, chunk = lines[:keep], {k: v[:keep] for k, v in chunk.items()}
            rows += len(lines)
            parts[cfg.label].append(self._label(chunk[cfg.label], path, lines))
            for c in feats:
                parts[c.name].append(self._column(c, chunk[c.column], path, lines))
            parts[_GROUP].append(self._groups(chunk[cfg.group_column]) if cfg.group_column
                                 else np.zeros(len(lines), np.int64))
        return {k: (np.concatenate(v) if v else self._empty(k)) for k, v in parts.items()}

    def _empty(self, name: str) -> np.ndarray:
        c = next((c for c in self.cfg.columns if c.name == name), None)
        if c is not None and c.type == "sequence":
            return np.zeros((0, c.max_len), np.int32)
        numeric = name != _GROUP and (c is None or c.type == "numeric")  # the label is float
        return np.zeros(0, np.float64 if numeric else np.int64)

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
                                  f"label must be 0 or 1, got {values[bad[0]]!r}")
        return y

    def _column(self, c: BarsColumn, values, path: Path, lines: list[int]) -> np.ndarray:
        if c.type == "numeric":
            return np.asarray(parse_float(values, path, lines, c.column))
        lookup = self.lookups[c.name]
        if c.type == "categorical":
            return np.asarray(lookup(list(values)), dtype=np.int32)
        seqs = [v.split(c.splitter) if v else [] for v in values]
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
            the options and the csv files (size and modification time) are unchanged.
        verbose: report progress on stderr.

    Raises:
        DataFormatError: missing column, wrong column count, non-numeric value or non-0/1 label
            (naming file, line and column).
    """
    cfg = read_config(config, dataset_id=dataset_id, min_count=min_count, seq_order=seq_order)
    cached = None
    if cache_dir is not None:
        files = sorted({str(p.resolve()): p.stat() for p in cfg.files.values()}.items())
        key = repr((_CACHE_VERSION, cfg, [(f, st.st_size, st.st_mtime_ns) for f, st in files],
                    max_rows))
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        cached = Path(cache_dir).expanduser() / f"{cfg.dataset_id}-{digest}.pt"
        if cached.exists():
            return CTRDataset.load(cached)
    ds = _encode(cfg, chunk_size, max_rows, verbose)
    if cached is not None:
        ds.save(cached)
    return ds


def _encode(cfg: BarsConfig, chunk_size: int, max_rows: int | None,
            verbose: bool) -> CTRDataset:
    feats = [c for c in cfg.columns if c.type != "meta"]
    roots = {c.name: _root(cfg, c.name) for c in feats if c.type != "numeric"}
    counters = {r.name: TokenCounter() for r in roots.values()}
    groups: dict[str, int] = {}

    def log(msg: str) -> None:
        if verbose:
            print(f"[cetnet.data] {cfg.dataset_id}: {msg}", file=sys.stderr)

    train_lookups = {n: counters[r.name].add for n, r in roots.items()}
    raw = {"train": _SplitReader(cfg, train_lookups, groups, chunk_size, max_rows)
           .read(cfg.files["train"])}
    log(f"read {len(raw['train'][cfg.label]):,} train rows from {cfg.files['train']}")
    vocabs: dict[str, Vocabulary] = {}
    for name, counter in counters.items():
        vocab, table = counter.finalize(next(c.min_count for c in feats if c.name == name))
        vocabs[name] = vocab
        for n, r in roots.items():
            if r.name == name:
                raw["train"][n] = table[raw["train"][n]]

    def eval_lookup(vocab: Vocabulary) -> Lookup:
        return lambda tokens: vocab.encode(tokens)

    eval_lookups = {n: eval_lookup(vocabs[r.name]) for n, r in roots.items()}
    reader = _SplitReader(cfg, eval_lookups, groups, chunk_size, max_rows)
    for split in ("valid", "test"):
        same = next((k for k in raw if cfg.files[k] == cfg.files[split]), None)
        if same is not None:
            raw[split] = raw[same]
            continue
        raw[split] = reader.read(cfg.files[split])
        log(f"read {len(raw[split][cfg.label]):,} {split} rows from {cfg.files[split]}")

    numeric = [c.name for c in feats if c.type == "numeric"]
    stats_dense = DenseStats.fit(np.stack([raw["train"][n] for n in numeric], 1)
                                 if numeric else np.zeros((len(raw["train"][cfg.label]), 0)))
    schema_feats = []
    for c in feats:
        if c.type == "numeric":
            schema_feats.append(FeatureSpec(c.name, "dense"))
            continue
        root = roots[c.name]
        size = vocabs[root.name].size
        if c.type == "categorical":
            schema_feats.append(FeatureSpec(c.name, "sparse", size))
        else:
            source = root.name if root.type == "categorical" and root is not c else None
            schema_feats.append(FeatureSpec(c.name, "sequence", size, max_len=c.max_len,
                                            source=source))
    # the sparse feature gAUC groups by: the group itself, or the one a meta copies from
    sparse = {f.name for f in schema_feats if f.kind == "sparse"}
    schema_group = next((g for g in (cfg.group, cfg.group_column) if g in sparse), None)
    schema = Schema(schema_feats, label=cfg.label, group=schema_group)

    splits: dict[str, Split] = {}
    for split, data in raw.items():
        twin = next((k for k in splits if raw[k] is data), None)
        if twin is not None:
            splits[split] = splits[twin]
            continue
        n = len(data[cfg.label])
        dense, imputed = stats_dense.transform(
            np.stack([data[k] for k in numeric], 1) if numeric else np.zeros((n, 0)))
        stats = SplitStats(imputed={k: int(v) for k, v in zip(numeric, imputed)})
        ids = {f.name: data[f.name] for f in schema.categorical}
        for f in schema.categorical:
            x = ids[f.name]
            real = x != 0 if f.kind == "sequence" else np.ones(x.shape, bool)
            stats.oov[f.name] = int((x == OOV_ID).sum())
            stats.cells[f.name] = int(real.sum())
        splits[split] = Split(schema, sparse=ids, dense=dense, multihot={}, sequence=ids,
                              label=data[cfg.label], group=data[_GROUP], stats=stats)
    notes = list(cfg.notes)
    if splits["valid"] is splits["test"]:  # what fit checks to flag metrics.json valid_is_test
        notes.append(f"valid and test are the same file ({cfg.files['test'].name}): no separate "
                     f"validation data, so early stopping selects on the test set")
    for split in ("valid", "test"):
        if splits[split] is splits["train"]:
            notes.append(f"{split} and train are the same file ({cfg.files['train'].name}): "
                         f"{split} metrics are measured on training data")
    vocabs = {c.name: vocabs[roots[c.name].name] for c in feats if c.name in roots}
    return CTRDataset(cfg.dataset_id, schema, splits, vocabs, stats_dense, cfg.group, notes)
