"""The dataset YAML of a BARS / FuxiCTR csv dataset: the types describing it
(:class:`BarsConfig`, one :class:`BarsColumn` per feature) and :func:`read_config`, which parses
and checks it. The accepted layouts and the honoured keys are listed in :mod:`cetnet.data.bars`,
which reads the csv files a config names.
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from cetnet.data.cache import user_path
from cetnet.data.csvio import DataFormatError, check_data_file, clip, shorten, shorten_list
from cetnet.data.options import (MAX_SEQ_LEN, ConfigError, check_bool, check_choice,
                                 check_float, check_int, check_str)

__all__ = ["BarsColumn", "BarsConfig", "read_config"]

_COPY_FROM = re.compile(r"^\s*copy_from\(\s*([^)\s]+)\s*\)\s*$")


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
    # Set only by YAMLs that name fill_na / normalizer; kept out of the repr (a cache key), so
    # the caches of every other YAML keep their keys: load_bars adds these to the key itself.
    #: numeric: what an empty cell reads as (None: the train mean); categorical, sequence: a
    #: token read as missing (OOV, padding in a sequence), as FuxiCTR reads its na value
    fill_na: float | str | None = field(default=None, repr=False)
    #: numeric only: "minmax" (FuxiCTR's MinMaxScaler) or None (standardized, the default)
    scaler: str | None = field(default=None, repr=False)

    def settings(self) -> tuple:
        """The settings kept out of the repr, when set: ``()`` by default."""
        return () if self.fill_na is None and self.scaler is None else (
            self.name, self.fill_na, self.scaler)


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
    #: notes naming the FuxiCTR model keys the YAML sets, which cetnet ignores: kept out of the
    #: repr (the cache key), as they change nothing in the encoding
    ignored: list[str] = field(default_factory=list, repr=False, compare=False)


_TYPES = ("categorical", "numeric", "sequence", "meta")
# A feature's keys: those read here, FuxiCTR's that only its models use (noted as ignored), and
# FuxiCTR's that need nothing here (silent). Any other key is a typo: an error.
_READ_KEYS = ("name", "type", "active", "splitter", "max_len", "share_embedding",
              "min_categr_count", "preprocess", "order", "pretrained_emb", "fill_na",
              "normalizer", "category_processor")
_MODEL_KEYS = ("embedding_dim", "feature_encoder", "embedding_callback", "encoder",
               "emb_output_dim", "vocab_size")
_SILENT_KEYS = ("dtype", "remap", "padding", "source", "freeze_emb", "pretrain_dim",
                "pretrain_usage", "num_buckets")
_NORMALIZERS = {"StandardScaler": None, "MinMaxScaler": "minmax"}
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
             notes: list[str], ignored: list[str]) -> list[BarsColumn]:
    """The columns of ``feature_cols[k]`` (none when inactive or skipped)."""
    at = f"{where}: feature_cols[{k}]"
    if not isinstance(col, Mapping):
        raise ConfigError(f"{at}: expected a mapping like {{name: x, type: categorical}}, got "
                          f"{shorten(col)}")
    if "name" not in col:
        raise ConfigError(f"{at}: 'name' is missing (every feature names its column)")
    names = _names(col["name"], at)
    at += f" {shorten(names[0] if len(names) == 1 else names)}"
    known = _READ_KEYS + _MODEL_KEYS + _SILENT_KEYS
    for key in col:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, 1, 0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{at}: unknown key {shorten(key)}{hint} (the keys read are "
                              f"{', '.join(_READ_KEYS)}; FuxiCTR's model keys are ignored)")
    kind = col.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"{at}: type: unsupported type {shorten(kind)}; one of "
                          f"{', '.join(_TYPES)}")
    if not check_bool(col.get("active", True), "active", at):
        return []
    if col.get("category_processor") is not None:
        raise ConfigError(f"{at}: category_processor {shorten(col['category_processor'])} is "
                          f"not supported (bucketize the column before, or leave the key out)")
    model_keys = [k for k in _MODEL_KEYS if col.get(k) is not None]
    if model_keys:
        ignored.append(f"ignored {', '.join(model_keys)} of {', '.join(names)}: FuxiCTR model "
                       f"settings (cetnet's come from the train config)")
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
    fill_na = _fill_na(col.get("fill_na"), kind, at)
    scaler = None
    if col.get("normalizer") is not None:
        if kind != "numeric":
            raise ConfigError(f"{at}: normalizer: only a numeric feature is normalized")
        scaler = _NORMALIZERS[check_choice(col["normalizer"], "normalizer", at,
                                           tuple(_NORMALIZERS))]
    return [BarsColumn(name, source or name, kind, splitter, max_len if kind == "sequence"
                       else 0, share, min_count, order == "newest_first", fill_na, scaler)
            for name in names]


def _fill_na(value: Any, kind: str, at: str) -> float | str | None:
    """``fill_na``: a number for a numeric feature (what an empty cell reads as); for a
    categorical or sequence one FuxiCTR's missing-value token (a string, or a number read as
    one), which is never a vocabulary entry; a meta column ignores it."""
    if value is None or kind == "meta":
        return None
    if kind == "numeric":
        return check_float(value, "fill_na", at)
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ConfigError(f"{at}: fill_na: expected a token (a string or a number), got "
                          f"{shorten(value)}")
    return value if isinstance(value, str) else str(value)


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
    columns: list[BarsColumn] = []
    positions: list[int] = []
    notes: list[str] = []
    ignored: list[str] = []
    for k, col in enumerate(feature_cols):
        cols = _feature(col, k, where, default_min, seq_order, notes, ignored)
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
                      where, keys, ignored)


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
