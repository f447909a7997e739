"""Registration of the ``cetnet::multi_embedding*`` ops: fake kernels, autograd, op table.

Schemas (csrc/registration.cpp), with ``ARGS`` the shared tail of :class:`EmbeddingArgs`
(weight, ids, offsets, per_sample_weights, modes, dims, vocab, padding_idx, bounds_check,
feature_names)::

    multi_embedding(ARGS) -> Tensor[]                                   (M outputs [B, N, D_m])
    multi_embedding_fused(weight, state, placeholder, ARGS[1:], optimizer, lr, eps, weight_decay)
    multi_embedding_backward(grads, ARGS[:9]) -> grad_weight
    multi_embedding_update(grads, weight, state, ARGS[1:9], optimizer, lr, eps, weight_decay)

The C++ ops (CPU and CUDA) have no suffix; the Triton ones (cetnet_kernels/triton/embedding.py)
end in ``_triton``. The fake kernels and autograd formulas registered here make the lookups work
under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.

Data parallelism (:meth:`EmbeddingOps.fused_data_parallel`): the fused update has no gradient
for DistributedDataParallel to all-reduce, so the lookup's backward all-gathers every rank's
inputs and output gradients (``torch.distributed`` collectives) and applies the update of the
whole global batch on every rank, the gradients divided by the world size as DDP averages them:
every rank's tables receive the same update and stay identical.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cetnet_kernels._host import acc_dtype
from cetnet_kernels.backends import EagerOp, OpTable, traced
from cetnet_kernels.codes import BoundsCheck, InputMode
from cetnet_kernels.embedding_args import EmbeddingArgs, OptimizerArgs

__all__ = ["EmbeddingOps", "all_gather_rows", "ops_for"]


def _split_fused(inputs: Sequence[Any]) -> tuple[EmbeddingArgs, Tensor, Tensor, OptimizerArgs]:
    """The fused lookup's inputs as (args, state, placeholder, optimizer arguments)."""
    weight, state, placeholder, *rest = inputs
    return EmbeddingArgs(weight, *rest[:9]), state, placeholder, OptimizerArgs(*rest[9:])


# ------------------------------------------------------------------------------------------------
# Fake kernels
# ------------------------------------------------------------------------------------------------
def _batch_and_columns(a: EmbeddingArgs) -> tuple[Any, Any]:
    # Shapes only (ints or SymInts): the kernels check the inputs.
    first_ids = a.modes[0] == InputMode.IDS
    B = a.ids[0].shape[0] if first_ids else a.offsets[0].shape[0] - 1
    N = 0
    for x, mode in zip(a.ids, a.modes):
        N = N + (x.shape[1] if mode == InputMode.IDS and x.dim() == 2 else 1)
    return B, N


def _forward_fake(*inputs: Any) -> list[Tensor]:
    a = EmbeddingArgs(*inputs)
    B, N = _batch_and_columns(a)
    return [a.weight.new_empty((B, N, d), dtype=acc_dtype(a.weight.dtype)) for d in a.dims]


def _fused_fake(*inputs: Any) -> list[Tensor]:
    return _forward_fake(*_split_fused(inputs)[0])


def _backward_fake(grads: list[Tensor], weight: Tensor, *_args: Any) -> Tensor:
    return torch.empty_like(weight)


def _update_fake(*_inputs: Any) -> None:
    return None


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
def _grads_or_empty(grads: Sequence[Tensor | None], like: Tensor) -> list[Tensor]:
    # An absent gradient is a zero gradient; the kernels skip empty tensors.
    return [g if g is not None else like.new_empty((0,), dtype=acc_dtype(like.dtype))
            for g in grads]


# The formulas are written once and used twice: registered with torch.library for the ops
# (what torch.compile traces and opcheck checks), and in the eager autograd.Functions below.
def _save_dense(ctx: Any, a: EmbeddingArgs) -> None:
    ctx.save_for_backward(a.weight, *a.input_tensors())
    ctx.args = a.without_tensors()
    ctx.input_versions = _versions(a)


def _versions(a: EmbeddingArgs) -> tuple[int, ...] | None:
    """The version counters of the lookup's input tensors, for :func:`_backward_args`; None
    with bounds checking off (nothing to trust: the backward does not check either)."""
    if a.bounds_check == BoundsCheck.OFF:
        return None
    return tuple(t._version for t in a.input_tensors())


def _backward_args(ctx: Any, weight: Tensor, saved: Sequence[Tensor]) -> EmbeddingArgs:
    """The lookup's arguments for its backward. When the saved ids, offsets and weights are
    unchanged since the lookup (their version counters), the lookup has checked them, so the
    backward runs with bounds checking off (:meth:`EmbeddingArgs.trusted`: no second
    synchronization on CUDA). Autograd refuses a saved tensor changed in place, except under a
    saved-tensor hook that hands back the same tensor: then the versions differ and the
    backward checks again, with the lookup's mode. (Under torch.compile the compiled backward
    trusts the lookup: the comparison runs once, when the backward is traced, on the traced
    tensors, or not at all when compiled autograd traces it, whose version counters are
    symbolic. A bad id then reads as padding, never out of range.)"""
    a = ctx.args.with_tensors(weight, saved)
    if torch.compiler.is_compiling() or _versions(a) == ctx.input_versions:
        return a.trusted()
    return a


def _dense_grad_weight(ctx: Any, backward_op: Any, grads: Sequence[Tensor | None]
                       ) -> tuple[Tensor | None, EmbeddingArgs]:
    """(the weight's gradient, or None when the weight needs none; the lookup's arguments)."""
    weight, *saved = ctx.saved_tensors
    a = _backward_args(ctx, weight, saved)
    grad_weight = None
    if ctx.needs_input_grad[0]:  # the weight is input 0 of the op and of _EagerLookup
        grad_weight = backward_op(_grads_or_empty(grads, weight), weight, *a.update_args())
    return grad_weight, a


def _setup_dense(ctx: Any, inputs: Sequence[Any], output: Any) -> None:
    _save_dense(ctx, EmbeddingArgs(*inputs))


def _make_backward_dense(backward_op: Any) -> Any:
    """The autograd formula of a lookup op whose dense backward is ``backward_op``."""

    def _backward_dense(ctx: Any, grads: Sequence[Tensor | None]) -> tuple:
        grad_weight, a = _dense_grad_weight(ctx, backward_op, grads)
        return (grad_weight,) + a.no_grads()[1:]

    return _backward_dense


def _save_fused(ctx: Any, a: EmbeddingArgs, state: Tensor, opt: OptimizerArgs) -> None:
    # weight and state are updated in place by backward: they are kept as attributes, not saved
    # tensors, so that two lookups sharing one backward pass do not trip the version check.
    ctx.weight, ctx.state, ctx.opt = a.weight, state, opt
    ctx.save_for_backward(*a.input_tensors())
    ctx.args = a.without_tensors()
    ctx.input_versions = _versions(a)


def _apply_fused_update(ctx: Any, update_op: Any, grads: Sequence[Tensor | None],
                        group: Any = None) -> EmbeddingArgs:
    """Applies the fused update of this lookup's batch in place, or with a ``torch.distributed``
    ``group`` that of the whole global batch (:func:`_gather_global_batch`)."""
    a = _backward_args(ctx, ctx.weight, ctx.saved_tensors)
    if group is None:
        full = _grads_or_empty(grads, ctx.weight)
    else:
        a, full = _gather_global_batch(a, grads, group)
    update_op(full, ctx.weight, ctx.state, *a.update_args(), *ctx.opt)
    return a


def _setup_fused(ctx: Any, inputs: Sequence[Any], output: Any) -> None:
    a, state, _placeholder, opt = _split_fused(inputs)
    _save_fused(ctx, a, state, opt)


def _make_backward_fused(update_op: Any) -> Any:
    """The autograd formula of a fused lookup op: applies ``update_op`` in place."""

    def _backward_fused(ctx: Any, grads: Sequence[Tensor | None]) -> tuple:
        a = _apply_fused_update(ctx, update_op, grads)
        # weight, state, placeholder, then the other nine of EmbeddingArgs and the optimizer's
        return (None, None) + a.no_grads() + (None,) * len(OptimizerArgs._fields)

    return _backward_fused


# ------------------------------------------------------------------------------------------------
# Data parallelism: the global batch's update on every rank
# ------------------------------------------------------------------------------------------------
def all_gather_rows(t: Tensor, group: Any = None) -> Tensor:
    """Collective of ``torch.distributed``'s ``group``: every rank's ``t`` concatenated along
    dim 0 in rank order. The row counts may differ between ranks; the other dims and the dtype
    must agree (RuntimeError on every rank otherwise)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if t.dim() > 7:
        raise ValueError(f"all_gather_rows: at most 7 dims, got {t.dim()}")
    shape = torch.tensor([t.dim(), *t.shape, *([0] * (7 - t.dim()))], dtype=torch.int64,
                         device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    dims = [tuple(int(x) for x in s[1:1 + int(s[0])]) for s in shapes]
    if any(len(d) != len(dims[0]) or d[1:] != dims[0][1:] for d in dims):
        raise RuntimeError(f"all_gather_rows: the ranks' tensors differ beyond dim 0: {dims}")
    rows = [d[0] for d in dims]
    padded = t.contiguous()
    if t.shape[0] != max(rows):
        padded = t.new_zeros((max(rows), *t.shape[1:]))
        padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, rows)])


def _gather_global_batch(a: EmbeddingArgs, grads: Sequence[Tensor | None],
                         group: Any) -> tuple[EmbeddingArgs, list[Tensor]]:
    """Every rank's inputs and output gradients concatenated in rank order (the global batch,
    rows in the order of the ranks' shares), the gradients divided by the world size."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    B, N = _batch_and_columns(a)
    ids, offsets, psws = [], [], []
    for x, off, psw, mode in zip(a.ids, a.offsets, a.per_sample_weights, a.modes):
        ids.append(all_gather_rows(x, group))
        if mode == InputMode.IDS:
            offsets.append(off)
            psws.append(psw)
            continue
        # a bag's offsets from its rows' lengths: the global offsets are their running sum, in
        # int64 (the global batch's values may pass int32). Every rank's lookup has checked
        # its share (the ranks share one configuration), so the global batch is checked too.
        lengths = all_gather_rows(off[1:] - off[:-1], group)
        offsets.append(torch.cat([lengths.new_zeros(1, dtype=torch.int64),
                                  torch.cumsum(lengths, 0, dtype=torch.int64)]))
        psws.append(all_gather_rows(psw, group) if mode == InputMode.BAG_WEIGHTED_SUM else psw)
    out_dtype = acc_dtype(a.weight.dtype)
    full = [(g if g is not None else a.weight.new_zeros((B, N, d), dtype=out_dtype))
            .contiguous().div(world) for g, d in zip(grads, a.dims)]
    return a._replace(ids=ids, offsets=offsets, per_sample_weights=psws), \
        [all_gather_rows(g, group) for g in full]


# ------------------------------------------------------------------------------------------------
# Eager autograd: the registered formulas as autograd.Functions
# ------------------------------------------------------------------------------------------------
# Called with autograd in eager mode, an op registered through torch.library flattens and
# unflattens its arguments (3 tensors per feature) in Python on every call and again in
# backward: ~0.4 ms of a 0.7 ms host step at 26 features on the CI CPU, and on a GPU host time
# that a synchronizing bounds check exposes. These Functions call the ops below autograd instead
# (same kernels, same formulas); under torch.compile the registered ops are used.
class _EagerLookup(torch.autograd.Function):
    """The lookup with a dense gradient for the weight."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ops: "EmbeddingOps", a: EmbeddingArgs
                ) -> tuple[Tensor, ...]:
        _save_dense(ctx, a)
        ctx.backward_op = ops._backward
        return tuple(ops._lookup(*a))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        return _dense_grad_weight(ctx, ctx.backward_op, grads)[0], None, None


class _EagerFused(torch.autograd.Function):
    """The fused lookup: backward applies the optimizer in place, to this batch's rows or, with
    a process ``group``, to the whole global batch's on every rank (data parallelism)."""

    @staticmethod
    def forward(ctx: Any, placeholder: Tensor, ops: "EmbeddingOps", a: EmbeddingArgs,
                state: Tensor, opt: OptimizerArgs, group: Any) -> tuple[Tensor, ...]:
        _save_fused(ctx, a, state, opt)
        ctx.update_op, ctx.group = ops._update, group
        return tuple(ops._lookup(*a))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        _apply_fused_update(ctx, ctx.update_op, grads, ctx.group)
        return (None,) * 6


# ------------------------------------------------------------------------------------------------
# Op table
# ------------------------------------------------------------------------------------------------
def _bumping_versions(update: Callable[..., Any]) -> Callable[..., Any]:
    """``update`` (an implementation writing ``weight`` and ``state`` in place) bumping their
    version counters as the registered op (``mutates_args``) does: autograd then refuses a
    graph that saved the weight before the update instead of using the updated values."""
    def call(grads: Any, weight: Tensor, state: Tensor, *rest: Any) -> None:
        update(grads, weight, state, *rest)
        torch.autograd.graph.increment_version(weight)
        torch.autograd.graph.increment_version(state)
    return call


_OP_NAMES = ("multi_embedding", "multi_embedding_fused", "multi_embedding_backward",
             "multi_embedding_update")


class EmbeddingOps:
    """The lookup and fused-lookup ops of one backend family, called with bundled arguments.

    Args:
        suffix: the ops' name suffix ("" for the C++ ops, "_triton").
        implementations: for Python-implemented ops (Triton), the implementation of each op by
            name. Eager calls run them below torch.library: through the dispatcher a custom op
            boxes its arguments (3 tensors per feature), ~170 us per call at 26 features on the
            CI CPU. Under torch.compile, and for fake or meta tensors, the registered ops run.
    """

    def __init__(self, suffix: str,
                 implementations: dict[str, Callable[..., Any]] | None = None) -> None:
        ns = torch.ops.cetnet
        registered: list[Callable[..., Any]] = [getattr(ns, n + suffix).default
                                                for n in _OP_NAMES]
        self._lookup_op, self._fused_op = registered[:2]
        self._lookup, self._fused, self._backward, self._update = registered
        if implementations:
            impl = [implementations[n + suffix] for n in _OP_NAMES]
            self._lookup, self._fused = impl[:2]
            # called from backward: compiled autograd traces them, and gets the registered ops
            self._backward = EagerOp(registered[2], impl[2])
            self._update = EagerOp(registered[3], _bumping_versions(impl[3]))

    @staticmethod
    def _traced(a: EmbeddingArgs) -> bool:
        return traced(a.weight)

    def lookup(self, a: EmbeddingArgs) -> list[Tensor]:
        """The lookup with a dense backward."""
        if self._traced(a):
            return self._lookup_op(*a)
        if not torch.is_grad_enabled() or not a.weight.requires_grad:
            return self._lookup(*a)
        return list(_EagerLookup.apply(a.weight, self, a))

    def fused(self, a: EmbeddingArgs, state: Tensor, placeholder: Tensor,
              opt: OptimizerArgs) -> list[Tensor]:
        """The lookup whose backward applies the optimizer ``opt`` in place."""
        if self._traced(a):
            return self._fused_op(a.weight, state, placeholder, *a[1:], *opt)
        if not torch.is_grad_enabled():
            return self._fused(a.weight, state, placeholder, *a[1:], *opt)
        return list(_EagerFused.apply(placeholder, self, a, state, opt, None))

    def fused_data_parallel(self, a: EmbeddingArgs, state: Tensor, placeholder: Tensor,
                            opt: OptimizerArgs, group: Any) -> list[Tensor]:
        """The fused lookup of this rank's share of a global batch: its backward is a
        collective of the ``torch.distributed`` process ``group`` (every rank must run it) that
        applies ``opt`` to the rows the whole global batch touched, with every rank's output
        gradients divided by the world size (DDP's average), so every rank's tables get the
        same update. Eager only (not under torch.compile)."""
        return list(_EagerFused.apply(placeholder, self, a, state, opt, group))


def _register_ops(suffix: str,
                  implementations: dict[str, Callable[..., Any]] | None = None) -> EmbeddingOps:
    """Registers the fake kernels and autograd of the ``cetnet::multi_embedding*<suffix>``
    ops (suffix "" for the C++ CPU/CUDA ops, "_triton" for the Triton ones)."""
    q = "cetnet::multi_embedding"
    ns = torch.ops.cetnet
    torch.library.register_fake(q + suffix)(_forward_fake)
    torch.library.register_fake(q + "_fused" + suffix)(_fused_fake)
    torch.library.register_fake(q + "_backward" + suffix)(_backward_fake)
    torch.library.register_fake(q + "_update" + suffix)(_update_fake)
    torch.library.register_autograd(
        q + suffix, _make_backward_dense(getattr(ns, "multi_embedding_backward" + suffix)),
        setup_context=_setup_dense)
    torch.library.register_autograd(
        q + "_fused" + suffix, _make_backward_fused(getattr(ns, "multi_embedding_update" + suffix)),
        setup_context=_setup_fused)
    return EmbeddingOps(suffix, implementations)


def _load_triton() -> EmbeddingOps:
    from cetnet_kernels.triton import embedding as te  # defines the *_triton ops

    return _register_ops("_triton", te.IMPLEMENTATIONS)


#: ``ops_for(backend)``: the :class:`EmbeddingOps` of a resolved backend ("cpu", "cuda",
#: "triton"); its ``.triton`` loader says why the Triton ops did not load.
ops_for = OpTable(lambda: _register_ops(""), _load_triton)
