"""Table-batched embeddings for M-member ensembles: every member's lookups of every feature in
one kernel launch.

:class:`MultiTableEmbedding` keeps all M x F tables in one flat parameter (FBGEMM TBE layout,
member-major: table (m, f) is a row-major ``[num_embeddings_f, D_m]`` block), so one forward
launch gathers single ids, padded sequences and pooled bags for all members, and one backward
launch either produces the dense gradient of the flat parameter (``optimizer=None``) or applies
SGD / row-wise Adagrad to the touched rows in place (``optimizer="sgd"`` /
``"rowwise_adagrad"``; no gradient tensor is materialized).

The module calls the registered ``cetnet::multi_embedding*`` ops; their fake kernels, autograd
and per-backend table are in :mod:`cetnet_kernels.embedding_ops`, the shared argument bundle in
:mod:`cetnet_kernels.embedding_args`, the flat layout in :mod:`cetnet_kernels.layout`. Inputs may
also be a torchrec ``KeyedJaggedTensor`` (:mod:`cetnet_kernels.embedding_kjt`).
"""

from __future__ import annotations

import ctypes
import math
import operator
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from cetnet_kernels._extension import HAS_C
from cetnet_kernels._host import acc_dtype, check_count
from cetnet_kernels.backends import BACKENDS, resolve_backend
from cetnet_kernels.codes import BOUNDS_CHECK_CODES, OPTIMIZER_CODES, InputMode
from cetnet_kernels.embedding_args import (ID_DTYPES, EmbeddingArgs, OptimizerArgs,
                                           check_bag_values, check_batch_size, first_bad_id,
                                           id_columns, invalid_ids, offsets_valid,
                                           report_bad_id, warned_features)
from cetnet_kernels.embedding_kjt import is_kjt, kjt_to_ids
from cetnet_kernels.embedding_ops import ops_for
from cetnet_kernels.embedding_reference import multi_table_embedding_reference
from cetnet_kernels.layout import TableLayout, table_layout

__all__ = ["BOUNDS_CHECKS", "EmbeddingFeature", "MultiTableEmbedding", "OPTIMIZERS", "POOLINGS"]

POOLINGS = ("sum", "mean")
BOUNDS_CHECKS = tuple(BOUNDS_CHECK_CODES)  # "error", "warn", "off"
OPTIMIZERS = tuple(OPTIMIZER_CODES)  # None, "sgd", "rowwise_adagrad"
_WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

IdsInput = Union[Tensor, tuple]


@dataclass(frozen=True)
class EmbeddingFeature:
    """One categorical feature: every member gets its own ``[num_embeddings, D_m]`` table.

    Args:
        name: the key of this feature in ``forward``'s ``ids`` mapping.
        num_embeddings: vocabulary size; valid ids are ``0 .. num_embeddings - 1``.
        pooling: ``"sum"`` or ``"mean"``, applied when the feature is given as a bag.
    """

    name: str
    num_embeddings: int
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "\n" in self.name:
            raise ValueError(f"EmbeddingFeature: name must be a non-empty string without "
                             f"newlines, got {self.name!r}")
        check_count(self.num_embeddings, "num_embeddings", f"EmbeddingFeature {self.name!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EmbeddingFeature {self.name!r}: pooling must be 'sum' or 'mean', "
                             f"got {self.pooling!r}")


_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _dim_list(dims: Any, num_models: int, op: str) -> list:
    """``dims`` as a list of one entry per member: one integer (a Python, NumPy or 0-dim
    tensor integer) repeated, or a sequence of them (entries that are integers of another
    type made ints; anything else left for check_count to name)."""
    def as_int(d: Any) -> Any:
        if isinstance(d, bool) or getattr(d, "ndim", 0) != 0:  # a 1-element array is a list
            return d
        try:
            return operator.index(d)
        except TypeError:
            return d

    one = as_int(dims)
    if isinstance(one, int) and not isinstance(one, bool):
        return [one] * num_models
    if isinstance(dims, (str, bytes)):
        raise TypeError(f"{op}: dims must be one int or {num_models} ints (one per member), "
                        f"got {dims!r}")
    try:
        return [as_int(d) for d in dims]
    except TypeError:
        raise TypeError(f"{op}: dims must be one int or {num_models} ints (one per member), "
                        f"got {dims!r}") from None


def _ordinary_inputs(args: EmbeddingArgs) -> EmbeddingArgs:
    """``args`` with ids, offsets and per-sample weights made under ``torch.inference_mode``
    (an evaluation loop's batches) copied: autograd cannot save an inference tensor for the
    backward of a lookup that records one (the reference's ``F.embedding`` takes them; so do
    the kernels, now)."""
    # (ids, and the offsets and weights of bags: the empty ones are the module's buffers)
    if torch.is_inference_mode_enabled() or not any(
            x.is_inference() or (mode != InputMode.IDS
                                 and (o.is_inference() or p.is_inference()))
            for x, o, p, mode in zip(args.ids, args.offsets, args.per_sample_weights,
                                     args.modes)):
        return args

    def ordinary(ts: Sequence[Tensor]) -> list[Tensor]:
        return [t.clone() if t.is_inference() else t for t in ts]
    return args._replace(ids=ordinary(args.ids), offsets=ordinary(args.offsets),
                         per_sample_weights=ordinary(args.per_sample_weights))


def _advise_hugepages(t: Tensor) -> bool:
    """Asks Linux to back the 2 MiB-aligned part of ``t``'s (not yet touched) memory with
    transparent huge pages. Row reads of a large flat table are random: with 4 KiB pages nearly
    every one also misses the TLB. Best effort; CETNET_EMBEDDING_HUGEPAGES=0 turns it off."""
    if (not sys.platform.startswith("linux") or t.device.type != "cpu"
            or os.environ.get("CETNET_EMBEDDING_HUGEPAGES", "1") == "0"):
        return False
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                            _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def _as_feature(f: object, i: int) -> EmbeddingFeature:
    if isinstance(f, EmbeddingFeature):
        return f
    if isinstance(f, (tuple, list)) and len(f) in (2, 3):
        return EmbeddingFeature(*f)
    raise TypeError(f"MultiTableEmbedding: features[{i}] must be an EmbeddingFeature or a "
                    f"(name, num_embeddings[, pooling]) tuple, got {f!r}")


class MultiTableEmbedding(nn.Module):
    """Every ensemble member's embedding tables of every feature, looked up in one launch.

    Args:
        num_models: M, the number of ensemble members (each has its own table per feature).
        features: ``EmbeddingFeature(name, num_embeddings, pooling)`` or ``(name,
            num_embeddings[, pooling])`` per feature; forward's output columns follow this order.
        dims: the embedding dim of all members (int) or one per member (mixed dims); any dim >= 1.
        optimizer: ``None`` (a dense gradient on :attr:`weight`, for any torch optimizer: it
            is as large as all tables together and written in full every step, zeros except the
            touched rows, so this mode is for small vocabularies; with large tables use a fused
            optimizer, which touches only the rows a batch looked up),
            ``"sgd"`` or ``"rowwise_adagrad"``: the update of the rows a batch touched is applied
            inside backward (FBGEMM's EXACT_SGD / EXACT_ROWWISE_ADAGRAD), deterministically, with
            no gradient tensor; :attr:`weight` then does not require grad. So
            ``requires_grad_(False)`` does not freeze such tables: to freeze them, call the
            lookup under ``torch.no_grad()`` (its outputs then lead no gradient back to them).
        lr, eps, weight_decay: the fused optimizer's settings. Row-wise Adagrad keeps one state
            per table row: ``s += mean(g**2); w -= lr * g / (sqrt(s) + eps)``. ``weight_decay``
            adds ``weight_decay * w`` to the gradient of the touched rows (FBGEMM's L2 mode).
        weights_dtype: storage dtype: float32 (default), float64, float16 or bfloat16; 16-bit
            storage is read and updated in float32 and the outputs are float32. Module
            conversions (``.half()``, ``.to(dtype)``) convert the tables the same way; row-wise
            Adagrad's state keeps the tables' compute dtype. A module built on
            ``device="meta"`` trains after ``to_empty(device=...)`` and ``reset_parameters()``.
        padding_idx: ids equal to it give zero vectors and no gradient (and are left out of bag
            means); None disables padding.
        bounds_check: what an id outside ``[0, num_embeddings)`` (other than ``padding_idx``)
            does. ``"error"`` (default): IndexError naming the feature, the id, the batch row
            and the position (malformed bag offsets: ValueError), checked before anything is
            written; on CUDA this costs one small device-to-host copy, a synchronization, per
            lookup (the backward of a lookup trusts its check when the saved ids are unchanged,
            and checks again otherwise). ``"off"`` (for CUDA graphs and the last bit of
            throughput): the ``cpu``, ``cuda`` and ``triton`` backends check nothing on the host
            and the GPU ones never synchronize (Triton: after a layout's first call, which
            copies its constants to the device); such an id is treated exactly as padding (a zero
            vector, no gradient or update, not counted by a bag mean; unlike FBGEMM's IGNORE,
            which reads and updates row 0 instead), and nothing out of range is ever read. Bag
            offsets are still validated by the ``cpu`` and ``reference`` backends (the latter
            also synchronizes for it); on ``cuda`` and ``triton`` malformed offsets then give
            unspecified (but in-range) bags. Check your ids once, offline, before turning it
            off. ``"warn"`` (data with a few stray ids that should not stop a run): such an id
            is padding, as with ``"off"``, and the lookup warns (``UserWarning`` naming the
            first one, as the error would, and how many there were) instead of raising, the
            first time a feature (by name, in the process) has one
            (:func:`cetnet_kernels.reset_bad_id_warnings` re-arms them); malformed offsets
            still raise. As with ``"error"``, on CUDA a step whose ids are valid costs the
            lookup's one synchronization; a batch with bad ids a few more, to find and name
            the first.
        backend: ``"auto"``, ``"cpu"`` (C++), ``"cuda"``, ``"triton"`` or ``"reference"``
            (one ``F.embedding`` per table; dense gradient only). ``"auto"`` (or the
            ``CETNET_BACKEND`` environment variable) picks, for the tables' device at each call:
            cuda, else triton, for CUDA tensors; cpu for CPU tensors; the reference when nothing
            is compiled (as :func:`cetnet_kernels.confidence_fusion`). ``"triton"`` runs on CPU
            tensors only under ``TRITON_INTERPRET=1`` (tests).
        init: ``"uniform"`` (``U(-s, s)``, ``s = init_scale or 1/sqrt(num_embeddings)``, FBGEMM's
            default) or ``"normal"`` (``N(0, init_scale or 1)``, ``nn.Embedding``'s default). Use
            :meth:`from_tables` to start from existing tensors.
        device: where to allocate the tables.

    Data parallelism: a fused optimizer's update has no gradient for DistributedDataParallel
    to all-reduce. :meth:`set_process_group` makes every backward a collective that all-gathers
    every rank's ids and output gradients and applies the update of the whole global batch on
    every rank (gradients divided by the world size, as DDP averages), so the ranks' tables
    stay identical. With ``optimizer=None`` the dense gradient of :attr:`weight` is an ordinary
    parameter gradient that DDP all-reduces itself.

    Attributes:
        weight: the flat ``[sum_m sum_f num_embeddings_f * D_m]`` storage of all tables.
        optimizer_state: row-wise Adagrad's ``[M * sum_f num_embeddings_f]`` state (float32, or
            float64 for float64 weights); in the ``state_dict``.
    """

    # buffers (registered in __init__)
    optimizer_state: Tensor | None
    _placeholder: Tensor
    _empty_ids: Tensor
    _empty_weights: Tensor
    _no_state: Tensor

    def __init__(
        self,
        num_models: int,
        features: Sequence[EmbeddingFeature | tuple],
        dims: int | Sequence[int],
        *,
        optimizer: str | None = None,
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        weights_dtype: torch.dtype = torch.float32,
        padding_idx: int | None = -1,
        bounds_check: str = "error",
        backend: str = "auto",
        init: str = "uniform",
        init_scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        op = "MultiTableEmbedding"
        check_count(num_models, "num_models", op)
        feats = [_as_feature(f, i) for i, f in enumerate(features)]
        if not feats:
            raise ValueError(f"{op}: features must name at least one feature")
        names = [f.name for f in feats]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"{op}: feature names must be unique, repeated: {dup}")
        if isinstance(dims, bool):
            raise TypeError(f"{op}: dims must be one int or {num_models} ints (one per member), "
                            f"got {dims!r}")
        dims = _dim_list(dims, num_models, op)
        if len(dims) != num_models:
            raise ValueError(f"{op}: dims must be one int or {num_models} ints (one per member), "
                             f"got {len(dims)}")
        for m, d in enumerate(dims):
            check_count(d, f"dims[{m}]", op)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{op}: optimizer must be None, 'sgd' or 'rowwise_adagrad', got "
                             f"{optimizer!r}")
        for name, v, lo in (("lr", lr, 0.0), ("eps", eps, 0.0), ("weight_decay", weight_decay,
                                                                   0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v < math.inf):
                raise ValueError(f"{op}: {name} must be a finite float >= 0, got {v!r}")
        if weights_dtype not in _WEIGHT_DTYPES:
            raise TypeError(f"{op}: weights_dtype must be one of {_WEIGHT_DTYPES}, got "
                            f"{weights_dtype}")
        if padding_idx is not None and (isinstance(padding_idx, bool)
                                        or not isinstance(padding_idx, int)):
            raise TypeError(f"{op}: padding_idx must be an int or None, got {padding_idx!r}")
        if padding_idx is not None and not -2**63 <= padding_idx < 2**63:
            raise ValueError(f"{op}: padding_idx must fit in int64 (ids are int32 or int64), "
                             f"got {padding_idx}")
        if bounds_check not in BOUNDS_CHECKS:
            raise ValueError(f"{op}: bounds_check must be one of {BOUNDS_CHECKS}, got "
                             f"{bounds_check!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cpu" and not HAS_C:
            raise RuntimeError(f"{op}: backend 'cpu' is not available: cetnet_kernels._C is not "
                               "built")
        if backend == "reference" and optimizer is not None:
            raise ValueError(f"{op}: the reference backend computes a dense gradient only; use "
                             "optimizer=None with it (and a torch optimizer)")

        self.num_models = num_models
        self.features = tuple(feats)
        self.dims = tuple(dims)
        self.optimizer = optimizer
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.padding_idx = padding_idx
        self.bounds_check = bounds_check
        self.backend = backend
        self._names = tuple(names)
        self._index = {n: i for i, n in enumerate(names)}
        self._vocab = tuple(f.num_embeddings for f in feats)
        self._joined_names = "\n".join(names)
        #: The flat layout of the tables (one output column per feature; see :meth:`columns`).
        self.layout: TableLayout = table_layout(self.dims, self._vocab)
        storage = torch.empty(self.layout.weight_numel, dtype=weights_dtype, device=device)
        _advise_hugepages(storage)  # before reset_parameters touches the pages
        self.weight = nn.Parameter(storage, requires_grad=optimizer is None)
        if optimizer == "rowwise_adagrad":
            self.register_buffer("optimizer_state", torch.zeros(
                self.layout.state_rows, dtype=acc_dtype(weights_dtype), device=device))
        else:
            self.optimizer_state = None
        # Fused mode: autograd reaches the in-place update through this tensor (weight itself
        # does not require grad), also under torch.compile.
        self.register_buffer("_placeholder", torch.zeros(0, device=device, requires_grad=True)
                             if optimizer is not None else torch.zeros(0, device=device),
                             persistent=False)
        self.register_buffer("_empty_ids", torch.zeros(0, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("_empty_weights", torch.zeros(0, device=device), persistent=False)
        # SGD's (absent) optimizer state: its own tensor, as the update bumps its version
        # (_empty_weights, saved by every lookup, would then fail autograd's version check
        # when two lookups share one backward).
        self.register_buffer("_no_state", torch.zeros(0, device=device), persistent=False)
        # Output columns per feature of the latest forward call (eager or compiled).
        self._last_ncols: tuple[int, ...] | None = None
        #: The torch.distributed group whose ranks share each fused update (None: local).
        self.process_group: Any = None
        self.reset_parameters(init, init_scale)

    def _apply(self, fn: Any, recurse: bool = True) -> "MultiTableEmbedding":
        """nn.Module's conversions (``.to``, ``.half()``, ``.double()``, ``to_empty``), then what
        they must not change: the placeholder stays a float32 leaf that requires grad in fused
        mode (else the outputs would not reach the update in backward: the tables would
        silently stop training, and deepcopy would refuse the non-leaf), the empty buffers
        stay float32, and row-wise Adagrad's state stays in the tables' compute dtype
        (float32 for 16-bit tables, converted from its value before the call)."""
        state = self.optimizer_state
        super()._apply(fn, recurse)
        device = self.weight.device
        self._placeholder = torch.zeros(0, device=device,
                                        requires_grad=self.optimizer is not None)
        self._empty_weights = torch.zeros(0, device=device)
        self._no_state = torch.zeros(0, device=device)
        acc = acc_dtype(self.weight.dtype)
        if state is not None and self.optimizer_state is not None \
                and self.optimizer_state.dtype != acc:
            self.optimizer_state = state.to(device=device, dtype=acc)
        return self

    # -------------------------------------------------------------------------------- tables
    @classmethod
    def from_tables(cls, tables: Sequence[Sequence[Tensor]],
                    features: Sequence[EmbeddingFeature | tuple], **kwargs: Any
                    ) -> "MultiTableEmbedding":
        """Builds the module from existing tables: ``tables[m][f]`` is member m's
        ``[num_embeddings_f, D_m]`` table of feature f (copied; dims are taken from them)."""
        feats = [_as_feature(f, i) for i, f in enumerate(features)]
        if len(tables) < 1 or any(len(t) != len(feats) for t in tables):
            raise ValueError("MultiTableEmbedding.from_tables: tables must be M lists of one "
                             f"table per feature ({len(feats)})")
        dims = []
        for m, member in enumerate(tables):
            for f, (t, feat) in enumerate(zip(member, feats)):
                if t.dim() != 2 or t.shape[0] != feat.num_embeddings or \
                        t.shape[1] != member[0].shape[1]:
                    raise ValueError(
                        f"MultiTableEmbedding.from_tables: tables[{m}][{f}] must be "
                        f"[{feat.num_embeddings}, D_{m}] (feature {feat.name!r}), got "
                        f"{tuple(t.shape)}")
            dims.append(int(member[0].shape[1]))
        kwargs.setdefault("device", tables[0][0].device)
        module = cls(len(tables), feats, dims, **kwargs)
        with torch.no_grad():
            for m, member in enumerate(tables):
                for feat, t in zip(feats, member):
                    module.table(m, feat.name).copy_(t)
        return module

    @torch.no_grad()
    def reset_parameters(self, init: str = "uniform", init_scale: float | None = None) -> None:
        """Re-initializes every table (see the class docstring) and the optimizer state."""
        if init not in ("uniform", "normal"):
            raise ValueError(f"MultiTableEmbedding: init must be 'uniform' or 'normal', got "
                             f"{init!r}")
        if init_scale is not None and (isinstance(init_scale, bool)
                                       or not isinstance(init_scale, (int, float))
                                       or not 0 < init_scale < math.inf):
            raise ValueError(f"MultiTableEmbedding: init_scale must be None or a finite float "
                             f"> 0, got {init_scale!r}")
        for m in range(self.num_models):
            for feat in self.features:
                t = self.table(m, feat.name)
                if init == "uniform":
                    s = init_scale if init_scale is not None else 1.0 / math.sqrt(
                        feat.num_embeddings)
                    t.uniform_(-s, s)
                else:
                    t.normal_(0.0, init_scale if init_scale is not None else 1.0)
        if self.optimizer_state is not None:
            self.optimizer_state.zero_()

    def table(self, m: int, name: str) -> Tensor:
        """Member ``m``'s ``[num_embeddings, D_m]`` table of feature ``name``: a view of
        :attr:`weight` (writes go to the module; write under ``torch.no_grad()``)."""
        if not 0 <= m < self.num_models:
            raise IndexError(f"MultiTableEmbedding.table: member {m} out of range for "
                             f"num_models = {self.num_models}")
        f = self._feature_index(name)
        off = self.layout.table_offsets[m * len(self.features) + f]
        V, D = self._vocab[f], self.dims[m]
        return self.weight[off:off + V * D].view(V, D)

    def row_state(self, m: int, name: str) -> Tensor:
        """Row-wise Adagrad's ``[num_embeddings]`` state of member m's table ``name`` (a view)."""
        if self.optimizer_state is None:
            raise ValueError("MultiTableEmbedding.row_state: only optimizer='rowwise_adagrad' "
                             "has a row-wise state")
        f = self._feature_index(name)
        off = self.layout.state_offsets[m * len(self.features) + f]
        return self.optimizer_state[off:off + self._vocab[f]]

    def _feature_index(self, name: str) -> int:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise ValueError(f"MultiTableEmbedding: unknown feature {name!r}; features are "
                             f"{list(self._names)}") from None

    def set_process_group(self, group: Any) -> "MultiTableEmbedding":
        """Data-parallel fused updates over the ``torch.distributed`` process ``group`` (the
        default group: ``torch.distributed.group.WORLD``), or local ones again (None).

        With a group, each rank looks up its share of a global batch, and the backward of a
        fused lookup is a collective (every rank of ``group`` must run it, in the same order):
        it all-gathers the ranks' ids (bags: values, row lengths and per-sample weights) and
        output gradients in rank order, divides the gradients by the group size (the average
        DistributedDataParallel takes of the dense gradients, so the rank losses must be means
        over their rows) and applies the optimizer to the rows the whole global batch touched.
        Every rank thus applies the same deterministic update to the same tables: they stay
        identical, and equal to those of a single process trained on the global batch whose
        rows are the ranks' shares in rank order. Eager mode only (not under torch.compile).
        The dense mode (``optimizer=None``) ignores the group: DDP all-reduces its gradient.
        """
        self.process_group = group
        return self

    # ------------------------------------------------------------------------------- columns
    def columns(self, name: str, ids: Mapping[str, IdsInput] | None = None) -> slice:
        """The column slice of feature ``name`` in forward's ``[B, N, D_m]`` outputs.

        Sequence features take T columns, so the layout depends on the input: it is computed
        from ``ids`` when given, else from the column counts of the latest forward call (eager
        or under torch.compile, which records them too).
        """
        f = self._feature_index(name)
        ncols: Sequence[int]
        if ids is not None:
            ncols = self._normalize(ids)[1]
        elif self._last_ncols is not None:
            ncols = self._last_ncols
        else:
            raise ValueError("MultiTableEmbedding.columns: no forward call yet; pass ids")
        return table_layout(self.dims, self._vocab, ncols).columns(f)

    # ------------------------------------------------------------------------------- forward
    def _normalize(self, ids: Mapping[str, IdsInput]) -> tuple[EmbeddingArgs, list[int]]:
        """Checks ``ids`` and returns the ops' arguments and the column count per feature."""
        op = "MultiTableEmbedding"
        if is_kjt(ids):
            ids = kjt_to_ids(ids)
        if not isinstance(ids, Mapping):
            raise TypeError(f"{op}: ids must map feature names to tensors (or be a torchrec "
                            f"KeyedJaggedTensor), got "
                            f"{type(ids).__name__}")
        # A dict's keys compare as a set at C speed; another Mapping's keys() need not be
        # set-like (a list, a view without __eq__), so it gets the membership test.
        if type(ids) is dict:
            mismatch = ids.keys() != self._index.keys()
        else:
            mismatch = len(ids) != len(self._names) or any(k not in self._index for k in ids)
        if mismatch:
            unknown = [k for k in ids if k not in self._index]
            if unknown:
                raise ValueError(f"{op}: unknown feature name(s) {unknown}; features are "
                                 f"{list(self._names)}")
            missing = [n for n in self._names if n not in ids]
            raise ValueError(f"{op}: missing feature(s) {missing}")
        device = self.weight.device
        # buffers read once: nn.Module's attribute lookup of a buffer costs ~0.4 us a time
        empty_ids, empty_weights = self._empty_ids, self._empty_weights
        vals, offs, psws, modes, ncols = [], [], [], [], []
        B = None
        B_from = ""
        for feat in self.features:
            name = feat.name
            x = ids[name]
            if isinstance(x, Tensor):
                # The common case inline (this loop is host time on every step of every
                # feature); the helpers raise the errors.
                if x.dtype not in ID_DTYPES or x.device != device:
                    self._check_ids(x, name, "ids", device)
                nd = x.dim()
                if nd == 1:
                    Bf, nc = x.shape[0], 1
                elif nd == 2:
                    Bf, nc = x.shape
                else:
                    Bf, nc = id_columns(x, repr(name), op)
                vals.append(x)
                offs.append(empty_ids)
                psws.append(empty_weights)
                modes.append(InputMode.IDS)
                ncols.append(nc)
            elif isinstance(x, (tuple, list)) and len(x) in (2, 3) and \
                    all(isinstance(t, Tensor) for t in x[:2]):
                values, offsets = x[0], x[1]
                psw = x[2] if len(x) == 3 else None
                self._check_ids(values, name, "bag values", device)
                self._check_ids(offsets, name, "bag offsets", device)
                check_bag_values(values, repr(name), op)
                if offsets.dim() != 1 or offsets.shape[0] < 1:
                    raise ValueError(f"{op}: feature {name!r}: bag offsets must be 1-D of length "
                                     f"B + 1, got shape {tuple(offsets.shape)}")
                Bf = offsets.shape[0] - 1
                vals.append(values)
                offs.append(offsets)
                if psw is None:
                    psws.append(empty_weights)
                    modes.append(InputMode.BAG_MEAN if feat.pooling == "mean"
                                 else InputMode.BAG_SUM)
                else:
                    if not isinstance(psw, Tensor) or not psw.is_floating_point():
                        raise TypeError(f"{op}: feature {name!r}: per_sample_weights must be a "
                                        f"floating-point tensor")
                    if feat.pooling != "sum":
                        raise ValueError(f"{op}: feature {name!r}: per_sample_weights need "
                                         f"pooling='sum' (as in F.embedding_bag), the feature "
                                         f"pools by {feat.pooling!r}")
                    if psw.shape != values.shape:
                        raise ValueError(f"{op}: feature {name!r}: per_sample_weights must have "
                                         f"the shape of the values {tuple(values.shape)}, got "
                                         f"{tuple(psw.shape)}")
                    if psw.requires_grad and torch.is_grad_enabled():
                        raise ValueError(f"{op}: feature {name!r}: per_sample_weights that "
                                         "require grad are not supported (they are constants)")
                    psws.append(psw.to(torch.float32))
                    modes.append(InputMode.BAG_WEIGHTED_SUM)
                ncols.append(1)
            else:
                what = type(x).__name__ + (
                    f" of {len(x)} items ({', '.join(sorted({type(t).__name__ for t in x}))})"
                    if isinstance(x, (tuple, list)) else "")
                raise TypeError(f"{op}: feature {name!r}: expected an int tensor [B] or [B, T] "
                                f"or a (values, offsets[, per_sample_weights]) bag of "
                                f"tensors, got a {what}")
            if B is None:
                B, B_from = Bf, name
            elif Bf != B:
                check_batch_size(Bf, B, repr(name), repr(B_from), op)
        args = EmbeddingArgs(self.weight, vals, offs, psws, modes, list(self.dims),
                             list(self._vocab), self.padding_idx,
                             int(BOUNDS_CHECK_CODES[self.bounds_check]), self._joined_names)
        return args, ncols

    @staticmethod
    def _check_ids(x: object, name: str, what: str, device: torch.device) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MultiTableEmbedding: feature {name!r}: {what} must be a tensor, got "
                            f"{type(x).__name__}")
        if x.dtype not in ID_DTYPES:
            raise TypeError(f"MultiTableEmbedding: feature {name!r}: {what} must be int32 or "
                            f"int64, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"MultiTableEmbedding: feature {name!r}: {what} are on {x.device} "
                             f"but the tables on {device}")

    def _resolved_backend(self) -> str:
        be = resolve_backend(self.backend, self.weight.device)  # raises saying why not
        if be == "reference" and self.optimizer is not None:
            raise RuntimeError(
                f"MultiTableEmbedding: optimizer={self.optimizer!r} needs the cpu, cuda or "
                f"triton backend, but only the reference runs here on {self.weight.device} "
                "(build cetnet_kernels._C, or use optimizer=None with a torch optimizer)")
        return be

    def forward(self, ids: Mapping[str, IdsInput]) -> list[Tensor]:
        """Looks up every feature for every member.

        Args:
            ids: feature name -> an int32/int64 tensor ``[B]`` (one id per row; 1 column),
                ``[B, T]`` (a padded sequence; T columns; ``padding_idx`` entries give zeros), or a
                bag ``(values [L], offsets [B + 1])`` / ``(values, offsets, per_sample_weights)``
                pooled by the feature's pooling (1 column; an empty bag gives zeros). Or a
                torchrec ``KeyedJaggedTensor`` whose keys are the feature names: every key is
                a bag (with the KJT's weights as per-sample weights), one column per feature.

        Returns:
            M tensors, member m's ``[B, N, D_m]`` (contiguous), columns in the order of
            ``features`` (see :meth:`columns`). float32 for 16-bit weights.

        Raises:
            IndexError: an id outside ``[0, num_embeddings)`` other than ``padding_idx`` (the
                message names the feature, the id and the vocabulary size), unless
                ``bounds_check`` is ``"warn"`` (a UserWarning, once per feature name and
                process) or ``"off"``.
            TypeError: non-integer ids. ValueError: unknown/missing features, ragged batch
                sizes, malformed offsets.
        """
        args, ncols = self._normalize(ids)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            args = _ordinary_inputs(args)
        # ints, also when compiled: torch.compile replays this assignment after the graph
        self._last_ncols = tuple(ncols)
        be = self._resolved_backend()
        if be == "reference":
            return self._forward_reference(args)
        ops = ops_for(be)
        if self.optimizer is not None and torch.is_grad_enabled():
            state = self.optimizer_state if self.optimizer_state is not None \
                else self._no_state
            opt = OptimizerArgs(int(OPTIMIZER_CODES[self.optimizer]), self.lr, self.eps,
                                self.weight_decay)
            if self.process_group is not None:
                return ops.fused_data_parallel(args, state, self._placeholder, opt,
                                               self.process_group)
            return ops.fused(args, state, self._placeholder, opt)
        return ops.lookup(args)

    def _forward_reference(self, args: EmbeddingArgs) -> list[Tensor]:
        # The reference needs valid ids up front: offsets are validated, bad ids raise (error)
        # or become padding (warn, off; -1 stands in when there is no padding_idx: it is never
        # a valid id), as the kernels do.
        op = "MultiTableEmbedding"
        # meta tensors: shapes only, no values to check (fake ones, under torch.compile and
        # torch.export, must trace the checks and the padding like real ones)
        values = args.weight.device.type != "meta"
        # torch.compile cannot branch on a value: the checks become asserts in the graph (an
        # error without the bad row's name), and "warn" pads without its warning
        compiling = torch.compiler.is_compiling()
        for f, feat in enumerate(self.features):
            x = args.ids[f]
            if not values or args.modes[f] == InputMode.IDS:
                continue
            bad_offsets = (f"{op}: feature {feat.name!r}: offsets must start at 0, be "
                           f"non-decreasing and end at the number of values ({x.numel()})")
            ok = offsets_valid(args.offsets[f], x.numel())
            if compiling:
                torch._assert_async(ok, bad_offsets)
            elif not bool(ok):
                raise ValueError(bad_offsets)
        if values and compiling and self.bounds_check == "error":
            for f, x in enumerate(args.ids):
                torch._assert_async(
                    ~invalid_ids(x, self._vocab[f], self.padding_idx).any(),
                    f"{op}: feature {self.features[f].name!r}: an id outside [0, "
                    f"{self._vocab[f]}) (bounds_check='error'; run eagerly to see which)")
        elif values and not compiling and self.bounds_check != "off":
            bad = first_bad_id(args.ids, args.offsets, args.modes, self._vocab, self.padding_idx,
                               warned_features([f.name for f in self.features],
                                               args.bounds_check))
            if bad is not None:
                report_bad_id(op, self.features[bad.feature].name, bad,
                              self._vocab[bad.feature], self.padding_idx, args.bounds_check)
        pad = self.padding_idx
        ids = list(args.ids)
        if values and self.bounds_check != "error":
            pad = -1 if self.padding_idx is None else self.padding_idx
            ids = [torch.where(invalid_ids(x, self._vocab[f], self.padding_idx), pad, x)
                   for f, x in enumerate(ids)]
        # One split of the flat weight into its M x F tables (the flat layout is (m, f)-major and
        # gap-free): autograd then assembles the flat gradient once, where M x F slices would
        # each materialize a full-size zero gradient (O(M F) times the table bytes per step).
        F_ = len(self.features)
        sizes = [self._vocab[f] * d for d in self.dims for f in range(F_)]
        chunks = torch.split(self.weight, sizes)
        tables = [[chunks[m * F_ + f].view(self._vocab[f], self.dims[m]) for f in range(F_)]
                  for m in range(self.num_models)]
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            tables = [[t.float() for t in member] for member in tables]
        inputs = [v if mode == InputMode.IDS
                  else (v, o, p if mode == InputMode.BAG_WEIGHTED_SUM else None)
                  for v, o, p, mode in zip(ids, args.offsets, args.per_sample_weights,
                                           args.modes)]
        # (no padding on meta tensors: it would drop values by their contents, and the output
        # shapes do not depend on it)
        return multi_table_embedding_reference(tables, inputs, [f.pooling for f in self.features],
                                               pad if values else None)

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, features={len(self.features)}, dims={self.dims}, "
                f"rows={sum(self._vocab)}, optimizer={self.optimizer!r}, "
                f"weights_dtype={self.weight.dtype}, bounds_check={self.bounds_check!r}, "
                f"backend={self.backend!r}")
