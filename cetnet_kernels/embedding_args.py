"""The arguments the ``cetnet::multi_embedding*`` ops share, bundled on the Python side.

Every op of the family takes the same tail (csrc/registration.cpp): the flat weight, per feature
the ids, offsets and per-sample weights, the input modes, the member dims, the vocabulary sizes,
``padding_idx``, the bounds-check mode and (lookups only) the feature names. The schemas stay
positional; :class:`EmbeddingArgs` is how Python code passes, saves and unpacks that tail.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from types import FrameType
from typing import Any, Collection, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from cetnet_kernels.codes import BoundsCheck, InputMode

__all__ = ["BadId", "EmbeddingArgs", "ID_DTYPES", "OptimizerArgs", "check_bag_values",
           "check_batch_size", "first_bad_id", "id_columns", "invalid_ids", "offsets_valid",
           "report_bad_id", "reset_bad_id_warnings", "warned_features"]


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

    def trusted(self) -> "EmbeddingArgs":
        """These arguments for the backward of the lookup that checked them: bounds check OFF,
        so the backward does not check the ids again (on CUDA, no second synchronization per
        step). Right only for the very ids the lookup saw (the autograd formulas compare the
        saved tensors' versions): the lookup has raised for a bad id (ERROR) or read it as
        padding, as OFF does (WARN, OFF)."""
        return self._replace(bounds_check=BoundsCheck.OFF)

    def input_tensors(self) -> list[Tensor]:
        """ids, offsets and per-sample weights, flat (for ``ctx.save_for_backward``)."""
        return [*self.ids, *self.offsets, *self.per_sample_weights]

    def without_tensors(self) -> "EmbeddingArgs":
        """These arguments with every tensor dropped: what an autograd ctx keeps besides the
        saved tensors (restored by :meth:`with_tensors`)."""
        # weight None: only a ctx's copy holds it, and with_tensors restores it before any use
        return self._replace(weight=None,  # type: ignore[arg-type]
                             ids=(), offsets=(), per_sample_weights=())

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


class BadId(NamedTuple):
    """The first out-of-range id of a call (smallest batch row, then feature, then position: the
    order every backend reports in) and how many there were."""

    row: int
    feature: int
    position: int
    id: int
    count: int  # type: ignore[assignment]  # shadows tuple.count (public field name)


def first_bad_id(ids: Sequence[Tensor], offsets: Sequence[Tensor], modes: Sequence[int],
                 vocab: Sequence[int], padding_idx: Optional[int],
                 skip: Collection[int] = ()) -> Optional[BadId]:
    """The call's first out-of-range id (see :class:`BadId`) outside the features ``skip``
    (:func:`warned_features`; their bad ids still count), None when there is none. For the
    error / warning path of the Python backends: synchronizes once per feature."""
    first, count = None, 0
    for f, x in enumerate(ids):
        bad = invalid_ids(x, vocab[f], padding_idx).reshape(-1)
        n = int(bad.sum())
        if n == 0:
            continue
        count += n
        if f in skip:
            continue
        i = int(bad.nonzero()[0, 0])
        if modes[f] == InputMode.IDS:  # [B] or [B, T]
            b, pos = divmod(i, x.shape[1] if x.dim() == 2 else 1)
        else:  # the bag holding value i: the last b with offsets[b] <= i
            o = offsets[f].cpu()
            b = int(torch.searchsorted(o, torch.tensor(i, dtype=o.dtype), right=True)) - 1
            b = min(max(b, 0), o.numel() - 2)
            pos = i - int(o[b])
        cand = (b, f, pos, int(x.reshape(-1)[i]))
        if first is None or cand[:3] < first[:3]:
            first = cand
    return None if first is None else BadId(*first, count)


# Features bounds_check='warn' has warned about, when the compiled extension (which holds the
# registry of its own kernels: csrc/bad_id_warnings.cpp) is not loaded.
_WARNED_FEATURES: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _compiled_registry() -> Any:
    """The compiled extension when it holds the registry (an older build does not)."""
    from cetnet_kernels._extension import _C
    return _C if _C is not None and hasattr(_C, "bad_id_warned") else None


def _first_bad_id_warning(feature: str) -> bool:
    """True the first time ``feature`` has an out-of-range id under bounds_check='warn' (since
    the start or :func:`reset_bad_id_warnings`): one registry for every backend."""
    c = _compiled_registry()
    if c is not None:
        return bool(c.first_bad_id_warning(feature))
    with _WARNED_LOCK:
        first = feature not in _WARNED_FEATURES
        _WARNED_FEATURES.add(feature)
        return first


def warned_features(names: Sequence[str], bounds_check: int) -> set[int]:
    """The features (indices into ``names``) a lookup leaves out of its bad-id report: with
    bounds_check WARN, those already warned about (their ids are still counted)."""
    if bounds_check != BoundsCheck.WARN:
        return set()
    c = _compiled_registry()
    if c is not None:
        return {f for f, nm in enumerate(names) if c.bad_id_warned(nm)}
    with _WARNED_LOCK:
        return {f for f, nm in enumerate(names) if nm in _WARNED_FEATURES}


def reset_bad_id_warnings() -> None:
    """Make ``bounds_check="warn"`` warn again about the next out-of-range id of every feature.

    The lookup warns about a feature's out-of-range ids the first time it meets one in the
    process (naming the id, its batch row and position, and the lookup's count of bad ids) and
    reads later ones as padding without a word: one warning per lookup would flood a run.
    Features are told apart by name, across modules and backends. Call this to hear about
    them again, e.g. at the start of each epoch."""
    c = _compiled_registry()
    if c is not None:
        c.reset_bad_id_warnings()
    with _WARNED_LOCK:
        _WARNED_FEATURES.clear()


def report_bad_id(op: str, name: str, bad: BadId, vocab: int, padding_idx: Optional[int],
                  bounds_check: int) -> None:
    """IndexError for ``bad`` (feature ``name``), or with ``bounds_check`` WARN a UserWarning
    the first time feature ``name`` has a bad id (:func:`reset_bad_id_warnings`): the ids were
    read as padding. The message of the compiled kernels (csrc/embedding_args.h's
    report_bad_id), word for word (torch appends "(Triggered internally at ...)" to a C++
    warning). The warning names the user's line: the first frame outside cetnet and torch."""
    if bounds_check == BoundsCheck.WARN and not _first_bad_id_warning(name):
        return
    pad = "" if padding_idx is None else f", or padding_idx = {padding_idx}"
    msg = (f"{op}: feature '{name}': id {bad.id} is out of range for its vocabulary of size "
           f"{vocab} (valid ids: 0 .. {vocab - 1}{pad}; batch row {bad.row}, position "
           f"{bad.position})")
    if bounds_check == BoundsCheck.WARN:
        warnings.warn(f"{msg}; bounds_check='warn': {bad.count} "
                      f"{'id' if bad.count == 1 else 'ids'} out of range in this lookup, read as "
                      "padding (zero vectors, no gradient or update). Warned once per feature: "
                      f"later out-of-range ids of '{name}' are read as padding without a warning "
                      "(cetnet_kernels.reset_bad_id_warnings() re-arms it)", UserWarning,
                      stacklevel=_user_stacklevel())
        return
    raise IndexError(msg)


_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.abspath(torch.__file__)))


def _user_stacklevel() -> int:
    """The stacklevel, for a warnings.warn in the caller, of the first frame outside
    cetnet_kernels and torch: the warning names the user's line (the module call), not ours."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


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
