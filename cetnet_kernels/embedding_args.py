"""The arguments the ``cetnet::multi_embedding*`` ops share, bundled on the Python side.

Every op of the family takes the same tail (csrc/registration.cpp): the flat weight, per feature
the ids, offsets and per-sample weights, the input modes, the member dims, the vocabulary sizes,
``padding_idx``, the bounds-check mode and (lookups only) the feature names. The schemas stay
positional; :class:`EmbeddingArgs` is how Python code passes, saves and unpacks that tail.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["EmbeddingArgs", "ID_DTYPES", "OptimizerArgs", "check_bag_values", "check_batch_size",
           "id_columns", "invalid_ids", "offsets_valid"]


class EmbeddingArgs(NamedTuple):
    """The shared arguments of the multi-table embedding ops, in schema order.

    ``ids[f]`` is ``[B]`` / ``[B, T]`` (mode IDS) or a bag's ``[L]`` values; ``offsets[f]`` the
    bag's ``[B + 1]`` offsets (empty for IDS); ``per_sample_weights[f]`` float32 ``[L]`` (empty
    unless BAG_WEIGHTED_SUM); ``modes`` :class:`cetnet_kernels.codes.InputMode` codes;
    ``bounds_check`` a :class:`cetnet_kernels.codes.BoundsCheck` code; ``feature_names`` the
    names joined by newlines (for messages; "" when unknown).
    """

    weight: Tensor
    ids: Sequence[Tensor]
    offsets: Sequence[Tensor]
    per_sample_weights: Sequence[Tensor]
    modes: Sequence[int]
    dims: Sequence[int]
    vocab: Sequence[int]
    padding_idx: Optional[int]
    bounds_check: int = 0
    feature_names: str = ""

    @property
    def num_features(self) -> int:
        return len(self.ids)

    def update_args(self) -> tuple:
        """The tail of ``multi_embedding_backward`` / ``_update`` after the weight (and state):
        ids .. bounds_check (those ops take no feature names)."""
        return tuple(self[1:9])

    def input_tensors(self) -> list[Tensor]:
        """ids, offsets and per-sample weights, flat (for ``ctx.save_for_backward``)."""
        return [*self.ids, *self.offsets, *self.per_sample_weights]

    def without_tensors(self) -> "EmbeddingArgs":
        """These arguments with every tensor dropped: what an autograd ctx keeps besides the
        saved tensors (restored by :meth:`with_tensors`)."""
        return self._replace(weight=None, ids=(), offsets=(), per_sample_weights=())

    def with_tensors(self, weight: Tensor, saved: Sequence[Tensor]) -> "EmbeddingArgs":
        """These arguments with ``weight`` and the tensors of :meth:`input_tensors` (``saved``,
        three per feature) put back."""
        F = len(saved) // 3
        return self._replace(weight=weight, ids=list(saved[:F]), offsets=list(saved[F:2 * F]),
                             per_sample_weights=list(saved[2 * F:]))

    def no_grads(self) -> tuple:
        """The autograd result for these ten inputs when none of them gets a gradient."""
        none = [None] * self.num_features
        return (None, none, none, none) + (None,) * 6


class OptimizerArgs(NamedTuple):
    """The fused optimizer's arguments (code: :class:`cetnet_kernels.codes.Optimizer`)."""

    optimizer: int
    lr: float
    eps: float
    weight_decay: float


# ------------------------------------------------------------------------------------------------
# The validity rules of the inputs, one definition each (the messages are the callers')
# ------------------------------------------------------------------------------------------------
#: dtypes of ids and offsets.
ID_DTYPES = (torch.int32, torch.int64)


def invalid_ids(ids: Tensor, vocab: int | Tensor, padding_idx: Optional[int]) -> Tensor:
    """Mask of the ids outside ``[0, vocab)`` that are not ``padding_idx`` (``vocab`` may be a
    tensor broadcasting against ``ids``: one size per column or per value)."""
    bad = (ids < 0) | (ids >= vocab)
    if padding_idx is not None:
        bad &= ids != padding_idx
    return bad


def offsets_valid(offsets: Tensor, nvals: int | Tensor) -> Tensor:
    """0-dim bool: ``offsets`` (``[B + 1]``, or ``[J, B + 1]`` stacked with ``nvals`` ``[J]``)
    start at 0, do not decrease and end at the number of values."""
    ok = (offsets[..., 0] == 0).all() & (offsets[..., -1] == nvals).all()
    if offsets.shape[-1] > 1:
        ok = ok & (offsets[..., 1:] >= offsets[..., :-1]).all()
    return ok


# Shape rules of one feature's input, shared by MultiTableEmbedding and the Triton plan. ``feature``
# is the feature as the caller's messages quote it (the module: repr(name); the ops: 'name').
def id_columns(ids: Tensor, feature: str, op: str) -> tuple[int, int]:
    """(B, output columns) of ids given one per row ``[B]`` (1 column) or as ``[B, T]``."""
    if ids.dim() not in (1, 2):
        raise ValueError(f"{op}: feature {feature}: ids must be [B] or [B, T], got shape "
                         f"{tuple(ids.shape)}")
    return ids.shape[0], (ids.shape[1] if ids.dim() == 2 else 1)


def check_bag_values(values: Tensor, feature: str, op: str) -> None:
    """A bag's values are 1-D."""
    if values.dim() != 1:
        raise ValueError(f"{op}: feature {feature}: bag values must be 1-D, got shape "
                         f"{tuple(values.shape)}")


def check_batch_size(B: int, first_B: int, feature: str, first: str, op: str) -> None:
    """Every feature has the batch size of the first one."""
    if B != first_B:
        raise ValueError(f"{op}: feature {feature} has batch size {B} but feature {first} has "
                         f"{first_B}")
