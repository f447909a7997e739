"""Pre-encoded splits that batch cheaply, and the dataset that groups them with its summary.

A :class:`Split` keeps each feature as one tensor over all its rows (ids as int32 to halve memory;
multi-hot bags as a 0-padded ``[N, L]`` matrix). A batch is a handful of ``index_select`` calls plus
an int64 cast, so a 2-core CPU can loop over it every epoch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from cetnet.atomic import atomic_write, zip_damage
from cetnet.data.csvio import DataFormatError, clip, shorten
from cetnet.data.normalize import DenseStats
from cetnet.data.schema import Batch, Schema
from cetnet.data.vocab import Vocabulary

__all__ = ["SplitStats", "Split", "CTRDataset", "SPLITS", "FORMAT_VERSION", "CacheError"]

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1  # of the file CTRDataset.save writes; part of every cache key


class CacheError(DataFormatError):
    """A saved dataset (cache file) that cannot be read (truncated, empty, not a dataset, from
    another format version) or written; the loaders rebuild an unreadable cache."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(path, None, None, message)


@dataclass
class SplitStats:
    """What encoding a split found: OOV ids per categorical feature (unknown, rare or missing
    values, sequence cells included; padding not), imputed values per dense feature, and how
    many id cells each categorical feature has (to turn OOV counts into rates)."""

    oov: dict[str, int] = field(default_factory=dict)
    cells: dict[str, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)
    #: whether the rows came with labels: False for new rows read without any (a csv without
    #: a label column), whose labels are 0 and mean nothing. A class default, not a field: a
    #: dataset's splits always have labels, and their saved form (pinned) stays as it was.
    labelled = True


def _ids(x: Tensor | np.ndarray) -> Tensor:
    """Id storage: int32 (every vocabulary here fits), contiguous."""
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point:
        raise TypeError(f"ids must be integers, got {t.dtype}")
    if t.numel() and int(t.max()) > torch.iinfo(torch.int32).max:
        raise ValueError("ids do not fit in int32")
    return t.to(torch.int32).contiguous()


def _labels(label: Tensor | np.ndarray) -> Tensor:
    """float32 labels, checked to lie in [0, 1] before the cast (so 1.00000001 is not first
    rounded to 1); a bad one is reported exactly (repr)."""
    t = torch.as_tensor(label)
    if t.is_complex():
        raise TypeError(f"labels must be real, got {t.dtype}")
    if t.dtype != torch.bool and t.numel():
        flat = t.reshape(-1)
        bad = (~((flat >= 0) & (flat <= 1))).nonzero()  # NaN is bad too
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(f"labels must lie in [0, 1]; label[{i}] = {flat[i].item()!r}")
    return t.to(torch.float32).contiguous()


class Split:
    """One split (train, valid or test) of a dataset, stored as pre-encoded tensors.

    Args:
        schema: the dataset's schema; every feature must be given.
        sparse: name -> ``[N]`` ids.
        dense: ``[N, n_dense]`` normalized floats (columns in the schema's dense order).
        multihot: name -> ``[N, L]`` ids, bags left-aligned and 0-padded.
        sequence: name -> ``[N, T]`` ids, column 0 the most recent, 0-padded tail.
        label: ``[N]`` clicks in {0, 1}.
        group: ``[N]`` gAUC keys.
        stats: OOV / imputed counts found while encoding.
        grouped: whether ``group`` holds real gAUC keys. False for data without a group
            column (every row in group 0): its gAUC would only repeat the AUC under another
            name, so it is reported as NaN.
        extras: name -> ``[N, ...]`` tensors carried into :attr:`Batch.extras` (e.g. the planted
            logit of the synthetic data).
    """

    def __init__(self, schema: Schema, *, sparse: Mapping[str, Tensor | np.ndarray],
                 dense: Tensor | np.ndarray, multihot: Mapping[str, Tensor | np.ndarray],
                 sequence: Mapping[str, Tensor | np.ndarray], label: Tensor | np.ndarray,
                 group: Tensor | np.ndarray, stats: SplitStats | None = None,
                 extras: Mapping[str, Tensor | np.ndarray] | None = None,
                 grouped: bool = True) -> None:
        self.schema = schema
        self.grouped = grouped
        self.label = _labels(label)
        n = self.num_rows = int(self.label.shape[0])
        self.sparse = {f.name: _ids(sparse[f.name]) for f in schema.sparse}
        self.multihot = {f.name: _ids(multihot[f.name]) for f in schema.multihot}
        self.sequence = {f.name: _ids(sequence[f.name]) for f in schema.sequence}
        self.dense = torch.as_tensor(dense).to(torch.float32).reshape(n, -1).contiguous()
        self.group = torch.as_tensor(group).to(torch.int64).contiguous()
        self.extras = {k: torch.as_tensor(v).contiguous() for k, v in (extras or {}).items()}
        self.stats = stats or SplitStats()
        self._check()

    def _check(self) -> None:
        n = self.num_rows
        if self.dense.shape[1] != len(self.schema.dense):
            raise ValueError(f"dense has {self.dense.shape[1]} columns, the schema "
                             f"{len(self.schema.dense)} dense features")
        for f in self.schema.features:
            t = {"sparse": self.sparse, "multihot": self.multihot,
                 "sequence": self.sequence}.get(f.kind, {}).get(f.name)
            if t is None:
                continue
            if t.shape[0] != n or (f.kind == "sparse") != (t.dim() == 1):
                raise ValueError(f"feature {f.name!r}: shape {tuple(t.shape)} for {n} rows")
            if f.kind == "sequence" and t.shape[1] != f.max_len:
                raise ValueError(f"feature {f.name!r}: {t.shape[1]} columns, max_len {f.max_len}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= f.vocab_size):
                raise ValueError(f"feature {f.name!r}: ids outside [0, {f.vocab_size})")
        for name, t in [("group", self.group), *self.extras.items()]:
            if t.shape[0] != n:
                raise ValueError(f"{name}: {t.shape[0]} rows, label {n}")

    def __len__(self) -> int:
        return self.num_rows

    @property
    def positive_rate(self) -> float:
        return float(self.label.mean()) if self.num_rows else float("nan")

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Yields :class:`Batch` es of ``batch_size`` rows (the last one smaller unless
        ``drop_last``); ``shuffle`` permutes rows with a generator seeded by ``seed``, so the same
        seed gives the same batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self.num_rows
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                 if shuffle else None)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            yield self.take(order[start:stop] if order is not None else slice(start, stop))

    def take(self, rows: Tensor | slice) -> Batch:
        """The batch of the given rows (an index tensor or a slice)."""
        def pick(t: Tensor) -> Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        multihot = {}
        for name, bags in self.multihot.items():
            bags = pick(bags)
            keep = bags != 0  # row-major masking keeps each row's ids together, in order
            offsets = torch.zeros(bags.shape[0] + 1, dtype=torch.int64)
            torch.cumsum(keep.sum(1), 0, out=offsets[1:])
            multihot[name] = (bags[keep].long(), offsets)
        return Batch(
            sparse={k: pick(v).long() for k, v in self.sparse.items()},
            dense=pick(self.dense),
            multihot=multihot,
            sequence={k: pick(v).long() for k, v in self.sequence.items()},
            label=pick(self.label),
            group=pick(self.group),
            extras={k: pick(v) for k, v in self.extras.items()},
        )

    def state_dict(self) -> dict:
        return {"sparse": self.sparse, "dense": self.dense, "multihot": self.multihot,
                "sequence": self.sequence, "label": self.label, "group": self.group,
                "extras": self.extras, "stats": vars(self.stats)}

    @classmethod
    def from_state_dict(cls, schema: Schema, d: Mapping) -> "Split":
        return cls(schema, sparse=d["sparse"], dense=d["dense"], multihot=d["multihot"],
                   sequence=d["sequence"], label=d["label"], group=d["group"],
                   stats=SplitStats(**d["stats"]), extras=d["extras"])


@dataclass
class CTRDataset:
    """A dataset: its schema, its train/valid/test splits and how they were encoded.

    Attributes:
        name: e.g. ``"movielens-100k"``.
        schema: the features (vocab sizes from the train split).
        splits: ``"train"``, ``"valid"``, ``"test"`` -> :class:`Split` (valid may be the test
            split itself when a benchmark has no validation set).
        vocabs: categorical feature -> its :class:`Vocabulary` (sequences with a ``source`` use the
            source's); empty for generated data.
        dense_stats: the train mean/std the dense features were normalized with.
        group_key: what :attr:`Batch.group` holds (e.g. ``"user_id"``), None when it is all 0.
        notes: anything worth knowing about how the data was read (skipped columns, sources).
        encoding_options: how the loader arranged values that the schema does not say (a BARS
            sequence read newest first): checkpoints record them beside the encoding digest.
            Set by the loader from its options, like ``row_encoder``, not saved with the
            dataset (a cache of before gets them too).
        row_encoder: reads new rows in the dataset's own file format (see the field).
    """

    name: str
    schema: Schema
    splits: dict[str, Split]
    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    dense_stats: DenseStats | None = None
    group_key: str | None = None
    notes: list[str] = field(default_factory=list)
    encoding_options: dict[str, Any] = field(default_factory=dict, compare=False)
    #: ``(path, chunk_rows) -> (Split, labelled) per chunk_rows data lines`` (None: one of the
    #: whole file): new rows in the format of the dataset's own files, for a dataset whose
    #: files are not one column per feature (BARS); None: the generic csv of
    #: :func:`cetnet.serve.encode_csv`. Set by the loader, not saved with the dataset.
    row_encoder: Callable[[str | Path, int | None], Iterator[tuple[Split, bool]]] | None = \
        field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.group_key is None:  # every row in group 0: no gAUC to report
            for split in self.splits.values():
                split.grouped = False

    def encoding_digest(self) -> str:
        """A digest (sha256 hex) of how this dataset encodes rows: the schema (features, vocab
        sizes, label, group), every vocabulary's tokens in id order and the dense statistics.
        Checkpoints record it, so that a run evaluated or resumed on data that now encodes
        differently (its files changed, a vocabulary refit) is refused instead of looking
        its embeddings up by other tokens' ids. Computed once per object."""
        cached = self.__dict__.get("_encoding_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        h.update(json.dumps(self.schema.to_dict(), sort_keys=True, default=str).encode())
        for name in sorted(self.vocabs):
            vocab = self.vocabs[name]
            h.update(f"\x00{name}\x00{len(vocab.tokens)}\x00".encode())
            for token in vocab.tokens:
                h.update(str(token).encode("utf-8", "surrogatepass") + b"\x00")
        if self.dense_stats is not None:
            h.update(self.dense_stats.digest_bytes())
        digest = self.__dict__["_encoding_digest"] = h.hexdigest()
        return digest

    def options_digest(self) -> str:
        """A digest (sha256 hex) of :attr:`encoding_options` (of ``{}`` when there are none)."""
        text = json.dumps(self.encoding_options, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def content_digest(self) -> str:
        """A digest (sha256 hex) of the rows themselves: :meth:`encoding_digest` and every
        split's tensors (ids, dense values, labels, groups, extras). What a cache of results
        trained on this data (``cetnet reproduce``'s ``--out``, a search study) is checked
        against: a valid or test file, or a label, can change while the encoding stays the
        same. Computed once per object (one pass over the data, about a second per GB)."""
        cached = self.__dict__.get("_content_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256(self.encoding_digest().encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(f"\x00split\x00{name}\x00".encode())
            for group, tensors in (("sparse", split.sparse), ("multihot", split.multihot),
                                   ("sequence", split.sequence), ("extras", split.extras),
                                   ("rows", {"dense": split.dense, "label": split.label,
                                             "group": split.group})):
                for key in sorted(tensors):
                    t = tensors[key].detach().cpu().contiguous()
                    h.update(f"\x00{group}\x00{key}\x00{t.dtype}\x00{tuple(t.shape)}\x00"
                             .encode())
                    data = memoryview(t.view(-1).numpy()).cast("B")  # type: ignore[arg-type]
                    for at in range(0, len(data), 1 << 26):  # (no copy of a large tensor)
                        h.update(data[at:at + (1 << 26)])
        digest = self.__dict__["_content_digest"] = h.hexdigest()
        return digest

    def summary_dict(self) -> dict:
        """The summary as data: rows and positive rate per split, vocab sizes, OOV and imputed
        counts per feature and split."""
        splits = {k: {"rows": s.num_rows, "positive_rate": s.positive_rate,
                      "oov": dict(s.stats.oov), "cells": dict(s.stats.cells),
                      "imputed": dict(s.stats.imputed)} for k, s in self.splits.items()}
        return {"name": self.name, "splits": splits, "group_key": self.group_key,
                "vocab_sizes": {f.name: f.vocab_size for f in self.schema.categorical},
                "features": [vars(f).copy() for f in self.schema.features], "notes": self.notes}

    def summary(self) -> str:
        """A human-readable report (what ``cetnet data prepare`` prints)."""
        names = list(self.splits)
        lines = [f"dataset {self.name}: {sum(s.num_rows for s in self.splits.values()):,} rows"
                 f" over {', '.join(names)}; label {self.schema.label!r}; gAUC group "
                 + (repr(self.group_key) if self.group_key is not None
                    else "none (no group column: gAUC is not reported)")]
        for k, s in self.splits.items():
            lines.append(f"  {k:<6} {s.num_rows:>11,} rows   positive rate {s.positive_rate:.4f}")
        head = " / ".join(names)
        lines.append(f"  features (OOV ids or imputed values per split: {head}):")
        for f in self.schema.features:
            if f.kind == "dense":
                i = self.schema.dense.index(f)
                extra = self.dense_stats.describe(i) if self.dense_stats is not None else ""
                counts = " / ".join(f"{s.stats.imputed.get(f.name, 0):,}"
                                    for s in self.splits.values())
                lines.append(f"    {f.name:<22} dense                imputed {counts}  {extra}")
                continue
            counts = " / ".join(f"{s.stats.oov.get(f.name, 0):,}" for s in self.splits.values())
            kind = f.kind + (f"[{f.max_len}]" if f.kind == "sequence" else "")
            kind += f" <- {f.source}" if f.source else ""
            kind += f" ({f.pooling})" if f.kind == "multihot" else ""
            lines.append(f"    {f.name:<22} {kind:<20} vocab {f.vocab_size:>9,}  OOV {counts}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Writes everything (tensors, schema, vocabularies) to one file for :meth:`load`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        splits: dict[str, dict | str] = {}
        for k, s in self.splits.items():  # a split shared by two names (valid = test): once
            twin = next((j for j in splits if self.splits[j] is s), None)
            splits[k] = twin if twin is not None else s.state_dict()
        state = {"version": FORMAT_VERSION, "name": self.name, "schema": self.schema.to_dict(),
                 "splits": splits,
                 "vocabs": {k: v.to_dict() for k, v in self.vocabs.items()},
                 "dense_stats": self.dense_stats.to_dict() if self.dense_stats else None,
                 "group_key": self.group_key, "notes": self.notes}
        # atomic, unique temporary: a killed run never leaves half a cache file and two
        # concurrent prepares never write through the same temporary
        atomic_write(path, lambda f: torch.save(state, f))

    @classmethod
    def load(cls, path: str | Path) -> "CTRDataset":
        """Reads a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            CacheError: the file is not a readable dataset of this format version (empty,
                truncated, corrupt, another file type, an older or newer cetnet).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with open(path, "rb") as f:
                damage = zip_damage(f)
                if damage is not None:
                    raise CacheError(path, f"unreadable saved dataset: {damage}")
                state = torch.load(f, weights_only=True)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the bytes are, the file is unusable
            size = path.stat().st_size if path.exists() else 0
            what = "empty (0 bytes)" if size == 0 else f"truncated or corrupt ({size:,} bytes)"
            raise CacheError(path, f"unreadable saved dataset: {what}; "
                                   f"{type(e).__name__}: {clip(str(e), 100)}") from None
        if not isinstance(state, dict) or "version" not in state:
            raise CacheError(path, "not a saved dataset")
        if state["version"] != FORMAT_VERSION:
            raise CacheError(path, f"saved dataset of format {shorten(state['version'])}, this "
                                   f"cetnet reads format {FORMAT_VERSION}")
        try:
            schema = Schema.from_dict(state["schema"])
            ds = state["dense_stats"]
            splits: dict[str, Split] = {}
            for k, s in state["splits"].items():
                splits[k] = splits[s] if isinstance(s, str) else Split.from_state_dict(schema, s)
            return cls(state["name"], schema, splits,
                       {k: Vocabulary.from_dict(v) for k, v in state["vocabs"].items()},
                       DenseStats.from_dict(ds) if ds else None, state["group_key"],
                       state["notes"])
        except Exception as e:  # noqa: BLE001 - a missing key or bad shape: an unusable file
            raise CacheError(path, f"inconsistent saved dataset ({type(e).__name__}: "
                                   f"{clip(str(e))})") from None
