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

import itertools
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from cetnet.data.cache import cache_file, cached, file_stamp, open_cache_dir, user_path
from cetnet.data.csvio import (DataFormatError, check_data_file, clip, parse_float,
                               read_chunks, shorten, shorten_list)
from cetnet.data.dataset import CTRDataset, Split, SplitStats
from cetnet.data.normalize import DenseStats
from cetnet.data.options import (MAX_SEQ_LEN, ConfigError, check_bool, check_choice, check_int,
                                 check_str)
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
    """A parsed dataset YAML (its repr, which names everything the encoding depends on, is part
    of the cache key)."""

    dataset_id: str
    files: dict[str, Path]      # split -> csv (valid and test may be the same file)
    columns: list[BarsColumn]
    label: str
    group: str | None           # the meta or categorical column used as gAUC key
    group_column: str | None    # the csv column it reads (differs with copy_from): raw values
    notes: list[str]
    where: str = field(default="dataset config", repr=False, compare=False)  # message prefix
    file_keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


_TYPES = ("categorical", "numeric", "sequence", "meta")
_ORDERS = ("oldest_first", "newest_first")
_MAX_CONFIG_BYTES = 16 << 20  # a dataset YAML is a few KB; anything this big is a data file


def _resolve(p: str, base: Path) -> Path:
    path = user_path(p)
    if path.is_absolute():
        return path
    # relative to the YAML first (portable), else to the working directory (FuxiCTR's way)
    try:
        return base / path if (base / path).exists() or not path.exists() else path
    except OSError:  # e.g. a name too long: the file check reports it
        return base / path


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; every way it can be unreadable is one ConfigError naming
    the file (and the line), or FileNotFoundError."""
    where = f"dataset config {path}"
    try:
        st = check_data_file(path, "a YAML file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except DataFormatError as e:
        raise ConfigError(f"{where}: {e.reason}") from None
    if st.st_size > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {st.st_size:,} bytes is too large for a dataset config "
                          f"(is it a data file?)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{where}, line {line}: not valid UTF-8 text (byte "
                          f"0x{data[e.start]:02x}); is it a YAML file?") from None
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (a control code)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise ConfigError(f"{where}, line {line}, column {column}: not valid YAML: character "
                          f"{char}: {e.reason}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None),
                                         getattr(e, "problem", None)) if x) or type(e).__name__
        raise ConfigError(f"{where}{at}: not valid YAML: {clip(what, 160)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None


def _names(value: Any, where: str) -> list[str]:
    """A feature's ``name``: a column name or a non-empty list of distinct ones."""
    what = "a column name or a list of column names"
    names = value if isinstance(value, list) else [value]
    if not names:
        raise ConfigError(f"{where}: name: expected {what}, got an empty list")
    for n in names:
        check_str(n, "name", where, what=what)
    counts = Counter(names)
    dup = next((n for n in names if counts[n] > 1), None)
    if dup is not None:
        raise ConfigError(f"{where}: name: {shorten(dup)} is listed twice")
    return names


def _feature(col: Any, k: int, where: str, default_min: int, seq_order: str,
             notes: list[str]) -> list[BarsColumn]:
    """The columns of ``feature_cols[k]`` (none when inactive or skipped)."""
    at = f"{where}: feature_cols[{k}]"
    if not isinstance(col, Mapping):
        raise ConfigError(f"{at}: expected a mapping like {{name: x, type: categorical}}, got "
                          f"{shorten(col)}")
    if "name" not in col:
        raise ConfigError(f"{at}: 'name' is missing (every feature names its column)")
    names = _names(col["name"], at)
    at += f" {shorten(names[0] if len(names) == 1 else names)}"
    kind = col.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"{at}: type: unsupported type {shorten(kind)}; one of "
                          f"{', '.join(_TYPES)}")
    if not check_bool(col.get("active", True), "active", at):
        return []
    if col.get("pretrained_emb"):
        notes.append(f"skipped {', '.join(names)}: pretrained embeddings are not read")
        return []
    source = None
    if col.get("preprocess") is not None:
        m = _COPY_FROM.match(check_str(col["preprocess"], "preprocess", at))
        if not m:
            raise ConfigError(f"{at}: preprocess: unsupported {shorten(col['preprocess'])} "
                              f"(only copy_from(column))")
        source = m.group(1)
    order = check_choice(col.get("order", seq_order), "order", at, _ORDERS)
    splitter = check_str(col.get("splitter", "^"), "splitter", at,
                         what="a non-empty separator string")
    max_len = 0
    if "max_len" in col:
        max_len = check_int(col["max_len"], "max_len", at, minimum=1, maximum=MAX_SEQ_LEN)
    elif kind == "sequence":
        raise ConfigError(f"{at}: max_len is missing (a sequence needs max_len >= 1)")
    share = col.get("share_embedding")
    if share is not None:
        share = check_str(share, "share_embedding", at, what="a feature name")
        if kind == "numeric":
            raise ConfigError(f"{at}: share_embedding: a numeric feature has no embedding "
                              f"table to share")
    min_count = check_int(col.get("min_categr_count", default_min), "min_categr_count", at,
                          minimum=1)
    return [BarsColumn(name, source or name, kind, splitter, max_len if kind == "sequence"
                       else 0, share, min_count, order == "newest_first") for name in names]


def _check_columns(columns: list[BarsColumn], positions: list[int], label: str,
                   where: str) -> None:
    """Distinct names; no feature reads the label; share_embedding names a categorical or
    sequence feature, without cycles."""
    seen: dict[str, int] = {}
    for c, k in zip(columns, positions):
        if c.name in seen:
            raise ConfigError(f"{where}: feature_cols[{k}] {shorten(c.name)}: duplicate "
                              f"feature name (also feature_cols[{seen[c.name]}])")
        seen[c.name] = k
        if label in (c.name, c.column):
            how = "is" if c.column == c.name else f"copies ({c.column})"
            raise ConfigError(f"{where}: feature_cols[{k}] {shorten(c.name)}: {how} the label "
                              f"column {shorten(label)} of label_col; a feature must not read "
                              f"the label")
    by_name = {c.name: c for c in columns}
    for c, k in zip(columns, positions):
        if c.type in ("meta", "numeric") or c.share is None:
            continue
        chain, cur = [c.name], c
        while cur.share is not None:
            target = by_name.get(cur.share)
            if target is None or target.type not in ("categorical", "sequence"):
                what = "no active feature" if target is None else f"a {target.type} column"
                raise ConfigError(f"{where}: feature_cols[{k}] {shorten(c.name)}: "
                                  f"share_embedding {shorten(cur.share)} names {what}; it must "
                                  f"name a categorical or sequence feature")
            if target.name in chain:
                raise ConfigError(f"{where}: feature_cols[{k}] {shorten(c.name)}: "
                                  f"share_embedding cycle {' -> '.join(chain + [target.name])}")
            chain.append(target.name)
            cur = target


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

    Raises:
        ConfigError: anything wrong in the config (naming the file, the key and the feature).
        FileNotFoundError: the YAML file does not exist.
    """
    base, origin = Path.cwd(), "(a mapping)"
    if not isinstance(config, Mapping):
        if not isinstance(config, (str, Path)) or not str(config) or "\x00" in str(config):
            raise ConfigError(f"dataset config: expected a YAML file path, got "
                              f"{shorten(config)}")
        path = user_path(config)
        config = _load_yaml(path)
        base, origin = path.resolve().parent, str(path)
    where = f"dataset config {origin}"
    if not isinstance(config, Mapping):
        # the file's contents are not quoted: it may be any file (a system file, a csv)
        got = "an empty file" if config is None else "YAML " + {
            str: "text", list: "a list", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(config), f"a {type(config).__name__}")
        raise ConfigError(f"{where}: expected a YAML mapping (dataset_id -> settings, or the "
                          f"settings), got {got}; is it a dataset config?")
    top = config
    if dataset_id is None:
        dataset_id = top.get("dataset_id")
    if dataset_id is not None:
        check_str(dataset_id, "dataset_id", where)
    cfg = top.get("dataset_config", top)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: dataset_config: expected a mapping, got {shorten(cfg)}")
    if "train_data" not in cfg:
        ids = [k for k, v in cfg.items() if isinstance(v, Mapping) and "train_data" in v]
        if dataset_id is None and len(ids) == 1:
            dataset_id = ids[0]
        if dataset_id not in ids:
            chosen = f"dataset_id {shorten(dataset_id)} is not one of them; " if (
                dataset_id is not None) else ""
            raise ConfigError(f"{where}: no dataset settings with train_data found" if not ids
                              else f"{where}: {chosen}choose dataset_id among "
                                   f"{shorten_list(ids)}")
        cfg = cfg[dataset_id]
    dataset_id = str(dataset_id or "bars")
    where = f"{where}, dataset {shorten(dataset_id)}"
    if cfg.get("data_format", "csv") != "csv":
        raise ConfigError(f"{where}: data_format {shorten(cfg['data_format'])}; only csv is read")
    seq_order = check_choice(seq_order, "seq_order", "bars", _ORDERS)
    for key in ("train_data", "feature_cols", "label_col"):
        if key not in cfg:
            raise ConfigError(f"{where}: {key!r} is missing")
    keys = {"train": "train_data",
            "valid": "valid_data" if cfg.get("valid_data") is not None else "test_data",
            "test": "test_data" if cfg.get("test_data") is not None else "valid_data"}
    if cfg.get(keys["valid"]) is None:
        raise ConfigError(f"{where}: needs valid_data or test_data")
    files = {split: _resolve(check_str(cfg[key], key, where, what="a file path"), base)
             for split, key in keys.items()}

    if min_count is not None:
        default_min = check_int(min_count, "min_count", "bars", minimum=1)
    else:
        default_min = check_int(cfg.get("min_categr_count", 1), "min_categr_count", where,
                                minimum=1)
    feature_cols = cfg["feature_cols"]
    if not isinstance(feature_cols, list) or not feature_cols:
        raise ConfigError(f"{where}: feature_cols: expected a list of features, got "
                          f"{shorten(feature_cols)}")
    columns, positions, notes = [], [], []
    for k, col in enumerate(feature_cols):
        cols = _feature(col, k, where, default_min, seq_order, notes)
        columns += cols
        positions += [k] * len(cols)
    label = cfg["label_col"]
    if isinstance(label, list):
        raise ConfigError(f"{where}: label_col: one label_col only (multi-task labels "
                          f"unsupported)")
    if not isinstance(label, Mapping):
        raise ConfigError(f"{where}: label_col: expected a mapping like {{name: label, dtype: "
                          f"float}}, got {shorten(label)}")
    if "name" not in label:
        raise ConfigError(f"{where}: label_col: 'name' is missing")
    label = check_str(label["name"], "label_col.name", where, what="a column name")
    if not any(c.type != "meta" for c in columns):
        raise ConfigError(f"{where}: feature_cols: no active feature (besides meta columns)")
    _check_columns(columns, positions, label, where)
    group = _group_column(cfg, top, columns, where)
    return BarsConfig(dataset_id, files, columns, label,
                      group.name if group else None, group.column if group else None, notes,
                      where, keys)


def _group_column(cfg: Mapping, top: Mapping, columns: list[BarsColumn],
                  where: str) -> BarsColumn | None:
    """The column gAUC groups by: the one ``group_id`` names (in the dataset config, else in the
    tuner config's ``tuner_space``, as FuxiCTR takes it), else the first meta column."""
    tuner = top.get("tuner_space")
    if tuner is None:
        tuner = {}
    if not isinstance(tuner, Mapping):
        raise ConfigError(f"{where}: tuner_space: expected a mapping, got {shorten(tuner)}")
    for key, section in (("group_id", cfg), ("tuner_space.group_id", tuner)):
        if section.get("group_id") is not None:
            name = section["group_id"]
            break
    else:
        return next((c for c in columns if c.type == "meta"), None)
    if isinstance(name, list) and len(name) == 1:  # a tuner_space value may be a 1-choice list
        name = name[0]
    check_str(name, key, where, what="a column name")
    col = next((c for c in columns if c.name == name), None)
    if col is None or col.type not in ("meta", "categorical"):
        # Never fall back silently: gAUC over the wrong (or no) groups looks like a real number.
        usable = [c.name for c in columns if c.type in ("meta", "categorical")]
        what = "no active column" if col is None else f"a {col.type} column"
        raise ConfigError(f"{where}: {key} {shorten(name)} names {what}; gAUC groups by a meta "
                          f"or categorical column: {', '.join(usable) or 'none'}")
    return col


def _root(cfg: BarsConfig, name: str) -> BarsColumn:
    """The feature whose vocabulary ``name`` uses (following share_embedding; read_config has
    checked the chain ends at a categorical or sequence feature without a cycle)."""
    col = next(c for c in cfg.columns if c.name == name and c.type != "meta")
    return col if col.share is None else _root(cfg, col.share)


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
        return {k: np.concatenate(v) for k, v in parts.items()}  # read_chunks: >= 1 row

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
    path = None
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, Path)):
            raise ConfigError(f"bars: cache_dir: expected a directory path, got "
                              f"{shorten(cache_dir)}")
        stamps = sorted({file_stamp(p) for p in cfg.files.values()})
        path = cache_file(open_cache_dir(cache_dir), cfg.dataset_id,
                          (_CACHE_VERSION, cfg, stamps, max_rows))
    return cached(path, lambda: _encode(cfg, chunk_size, max_rows, verbose), verbose=verbose)


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
