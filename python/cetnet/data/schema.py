"""The feature schema and the batch type shared by datasets, models and training.

Id conventions for every categorical vocabulary (built on the train split only): ``0`` is padding
(never a real value), ``1`` is out-of-vocabulary / rare / missing, real values start at ``2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["PAD_ID", "OOV_ID", "FIRST_ID", "FEATURE_KINDS", "FeatureSpec", "Schema", "Batch"]

PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2
FEATURE_KINDS = ("sparse", "dense", "multihot", "sequence")


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    Attributes:
        name: the feature's name (unique in a schema).
        kind: ``"sparse"`` (one id per row), ``"dense"`` (one float), ``"multihot"`` (a bag of ids)
            or ``"sequence"`` (ordered ids, most recent first, 0-padded to ``max_len``).
        vocab_size: categorical kinds: ids lie in ``[0, vocab_size)`` (padding and OOV included).
        max_len: sequence: the padded length T; multihot: the largest bag seen (informational).
        pooling: multihot: ``"sum"`` or ``"mean"`` of the bag's embeddings.
        source: sequence: the sparse feature whose vocabulary its ids use (e.g. ``"item"``).
    """

    name: str
    kind: str
    vocab_size: int = 0
    max_len: int = 0
    pooling: str = "sum"
    source: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"FeatureSpec {self.name!r}: kind must be one of {FEATURE_KINDS}, "
                             f"got {self.kind!r}")
        if self.kind == "dense":
            if self.vocab_size:
                raise ValueError(f"FeatureSpec {self.name!r}: a dense feature has no vocabulary")
        elif self.vocab_size < FIRST_ID:
            raise ValueError(f"FeatureSpec {self.name!r}: vocab_size must be >= {FIRST_ID} "
                             f"(padding and OOV ids included), got {self.vocab_size}")
        if self.kind == "sequence" and self.max_len < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: a sequence needs max_len >= 1")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"FeatureSpec {self.name!r}: pooling must be 'sum' or 'mean', got "
                             f"{self.pooling!r}")

    @property
    def categorical(self) -> bool:
        return self.kind != "dense"


@dataclass
class Schema:
    """The features of a dataset, in a fixed order, plus the label and the gAUC group key."""

    features: list[FeatureSpec]
    label: str = "label"
    group: str | None = "user"

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"Schema: feature names must be unique, got {names}")
        if self.group is not None and self.group not in names:
            raise ValueError(f"Schema: group feature {self.group!r} is not a feature")

    def of_kind(self, kind: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    @property
    def sparse(self) -> list[FeatureSpec]:
        return self.of_kind("sparse")

    @property
    def dense(self) -> list[FeatureSpec]:
        return self.of_kind("dense")

    @property
    def multihot(self) -> list[FeatureSpec]:
        return self.of_kind("multihot")

    @property
    def sequence(self) -> list[FeatureSpec]:
        return self.of_kind("sequence")

    @property
    def categorical(self) -> list[FeatureSpec]:
        """Every feature with an embedding table, in schema order."""
        return [f for f in self.features if f.categorical]

    def by_name(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"Schema: no feature named {name!r}; features: "
                       f"{[f.name for f in self.features]}")

    def to_dict(self) -> dict:
        return {"features": [vars(f).copy() for f in self.features], "label": self.label,
                "group": self.group}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls([FeatureSpec(**f) for f in d["features"]], d.get("label", "label"),
                   d.get("group", "user"))


@dataclass
class Batch:
    """A mini-batch of B rows.

    Attributes:
        sparse: feature name -> ``[B]`` int64 ids.
        dense: ``[B, n_dense]`` float32, normalized with train statistics (``n_dense`` may be 0),
            columns in the schema's order of dense features.
        multihot: feature name -> ``(values [nnz] int64, offsets [B + 1] int64)``, no padding ids.
        sequence: feature name -> ``[B, T]`` int64, column 0 the most recent, 0-padded tail.
        label: ``[B]`` float32 clicks in {0, 1}.
        group: ``[B]`` int64 gAUC key (e.g. the user id).
    """

    sparse: dict[str, Tensor]
    dense: Tensor
    multihot: dict[str, tuple[Tensor, Tensor]]
    sequence: dict[str, Tensor]
    label: Tensor
    group: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        """This batch with ``fn`` applied to every tensor."""
        return Batch(
            sparse={k: fn(v) for k, v in self.sparse.items()},
            dense=fn(self.dense),
            multihot={k: (fn(v), fn(o)) for k, (v, o) in self.multihot.items()},
            sequence={k: fn(v) for k, v in self.sequence.items()},
            label=fn(self.label),
            group=fn(self.group),
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def to_device(self, device: torch.device | str) -> "Batch":
        """This batch on ``device``, for a training or evaluation step. To a CUDA device it goes
        through pinned memory, asynchronously: a copy from pageable memory makes the host wait
        for everything queued on the device, so the host could not prepare the next step while
        the GPU runs this one. (The pinned copies stay reserved until the transfer is done.)"""
        device = torch.device(device)
        if device.type != "cuda":
            return self.to(device)
        return self.map(lambda t: t.pin_memory() if t.device.type == "cpu" else t).to(
            device, non_blocking=True)

    def tensors(self) -> Iterator[Tensor]:
        yield from self.sparse.values()
        yield self.dense
        for v, o in self.multihot.values():
            yield v
            yield o
        yield from self.sequence.values()
        yield self.label
        yield self.group
