"""The KDEF loss (knowledge-driven ensemble, as in the authors' released code) as one fused op.

With ``p = sigmoid(z)`` for logits ``z [B, K]``, labels ``y [B]`` in ``[0, 1]`` and the teacher
``p_T = sigmoid(mean_k z_k)`` (the ensemble's prediction)::

    s_k  = mean_b (1 - |y_b - p_bk|)                 exam score of member k (not detached)
    a    = softmax(-s)                               weaker members learn more from the teacher
    b_ij = exp(s_j) / sum_{l != i} exp(s_l), j != i  better peers teach more
    L = mean_{b,k} BCE(p_bk, y_b)
        + sum_k a_k mean_b (p_bk - sg(p_T,b))^2                       teacher to students
        + (1/K) sum_i sum_{j != i} b_ij mean_b (p_bi - sg(p_bj))^2    students to students

No tuned loss weights. The gradient flows through the exam scores too. With ``M_k``, ``N_ij`` the
two batch means above, ``R_i = sum_{j != i} b_ij N_ij`` and ``pq = p (1 - p)``::

    dL/dz_bk = (p_bk - y_b) / (K B)
             + (2/B) pq [a_k (p_bk - p_T,b) + (1/K) sum_{j != k} b_kj (p_bk - p_bj)]
             + (1/B) pq sign(y_b - p_bk) G_k
    G_k = -a_k (M_k - sum_l a_l M_l) + (1/K) sum_{i != k} b_ik (N_ik - R_i)

The kernels make two passes over ``[B, K]``: the batch statistics (s, M, N, the BCE sum) and the
teacher, then the gradient, which the forward computes when autograd will need it (backward is a
scaling). ``K = 1`` is plain BCE with logits; an empty batch has loss 0. Because the loss couples
the rows through batch statistics, a NaN or inf logit makes the whole loss non-finite (NaN, or
+inf for a -inf logit with label 1; not an error).

Registered op (schema in csrc/registration.cpp): ``cetnet::kdef_loss(logits, labels,
compute_grad) -> (loss, teacher_prob, grad_logits)``, and ``cetnet::kdef_loss_triton``
(cetnet_kernels/triton/kdef.py) with the same contract; their fake kernels and autograd are here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cetnet_kernels import reference
from cetnet_kernels._host import acc_dtype as _acc_dtype
from cetnet_kernels.backends import (EagerOp, OpTable, first_order, refuse_unsupported_ad,
                                     resolve_backend)
from cetnet_kernels.fusion import _check_label_values, _check_labels, _check_logits

__all__ = ["kdef_loss"]


def _kdef_fake(logits, labels, compute_grad):
    B, K = logits.shape
    grad = logits.new_empty((B, K) if compute_grad else (0,))
    return logits.new_empty((), dtype=_acc_dtype(logits.dtype)), logits.new_empty((B,)), grad


def _setup(ctx, inputs, output):
    logits, _labels, compute_grad = inputs
    _loss, teacher, grad_logits = output
    ctx.set_materialize_grads(False)  # the teacher usually gets no gradient: no work then
    ctx.save_for_backward(teacher, grad_logits)
    ctx.compute_grad = compute_grad
    ctx.K = logits.shape[1]
    ctx.dtype = logits.dtype


def _backward(ctx, grad_loss, grad_teacher, _grad_grad):
    teacher, grad_logits = ctx.saved_tensors
    grad_z = None
    if grad_loss is not None:
        if not ctx.compute_grad:
            raise RuntimeError("kdef_loss was called with compute_grad=False; its gradient was "
                               "not computed in the forward pass")
        grad_z = grad_logits * grad_loss  # bf16/fp16 * fp32 0-dim: computed in fp32
    if grad_teacher is not None:  # teacher = sigmoid(mean_k z_k): each member gets 1/K of it
        t = teacher.to(_acc_dtype(ctx.dtype))
        g = (grad_teacher * t * (1 - t) / ctx.K)[:, None].expand(teacher.shape[0], ctx.K)
        grad_z = g if grad_z is None else grad_z + g
    return (grad_z.to(ctx.dtype) if grad_z is not None else None), None, None


def _compiled_op() -> Callable:
    torch.library.register_fake("cetnet::kdef_loss")(_kdef_fake)
    torch.library.register_autograd("cetnet::kdef_loss", first_order(_backward, "cetnet::kdef_loss"),
                                    setup_context=_setup)
    return torch.ops.cetnet.kdef_loss.default


def _load_triton() -> Callable:
    from cetnet_kernels.triton import kdef  # noqa: F401  (defines cetnet::kdef_loss_triton)
    from cetnet_kernels.triton.fusion import IMPLEMENTATIONS

    torch.library.register_autograd("cetnet::kdef_loss_triton",
                                    first_order(_backward, "cetnet::kdef_loss_triton"),
                                    setup_context=_setup)
    # Eager calls run the implementation below torch.library, with the same formulas.
    return EagerOp(torch.ops.cetnet.kdef_loss_triton.default,
                   IMPLEMENTATIONS["kdef_loss_triton"], _setup, _backward)


_op_for = OpTable(_compiled_op, _load_triton)
_TRITON = _op_for.triton


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` whose gradient is all-reduced too: a loss every rank computes from the
    sum passes each rank's share of the gradient to every rank's addends."""

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def kdef_loss(logits: Tensor, labels: Tensor, *, backend: str = "auto",
              validate: bool = True, process_group: object = None) -> tuple[Tensor, Tensor]:
    """The KDEF training loss of K member logits and the teacher prediction, fused.

    Args:
        logits: ``[B, K]`` member logits (K >= 1; float16/bfloat16/float32/float64, any strides).
        labels: ``[B]`` (or ``[B, 1]``) targets in ``[0, 1]``; soft labels allowed; bool/int ok.
            Labels get no gradient.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        validate: check label values on non-CPU backends (a host sync; the CPU kernel always
            checks, in its first pass). Under ``torch.compile`` the reference and Triton
            backends skip the check.
        process_group: for data-parallel training (DDP), the ``torch.distributed`` group whose
            ranks each hold a share of the batch: the exam scores and every batch mean are then
            the whole batch's (one all-reduce of ``K^2 + 2K + 3`` numbers in the forward and
            one in the backward), so that DDP's average of the ranks' gradients is the
            gradient of one process on the whole batch, shares of unequal size included (when
            each rank's loss is weighted by its rows' share, as for any mean loss). Every rank
            gets the whole batch's loss. Computed by the plain-PyTorch formulas (``backend``
            is not used; tested in eager mode, as cetnet's trainer runs it); with one rank, or
            ``None``, the fused kernel on this batch.

    Returns:
        ``(loss, teacher_prob)``: the scalar loss in float32 (float64 for float64 logits; 0 for
        an empty batch) and ``sigmoid(mean_k z_k) [B]`` in the dtype of ``logits`` (the
        ensemble's prediction; differentiable too).
    """
    op = "kdef_loss"
    _check_logits(logits, op)
    labels = _check_labels(labels, logits, op)
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"{op}: process_group is given but torch.distributed is not "
                             "initialized")
        if dist.get_world_size(process_group) > 1:  # type: ignore[arg-type]
            def over_ranks(sums: Tensor) -> Tensor:
                # the label check rides on the all-reduce: every rank raises, none waits for
                # one that did
                bad = (~((labels >= 0) & (labels <= 1))).sum() if validate else labels.new_zeros(())
                total = _SumOverRanks.apply(torch.cat([sums, bad.to(sums).reshape(1)]),
                                            process_group)
                if validate and bool(total[-1] > 0):
                    _check_label_values(labels, op)  # this rank's bad label, named
                    raise ValueError(f"{op}: labels must lie in [0, 1]; another rank of the "
                                     "process group has one outside")
                return total[:-1]

            terms = reference.kdef_loss_terms_reference(logits, labels, over_ranks)
            return terms["label"] + terms["t2s"] + terms["s2s"], terms["teacher"]
    be = resolve_backend(backend, logits.device)
    if be != "cpu" and validate and not torch.compiler.is_compiling():
        _check_label_values(labels, op)  # the CPU kernel checks labels in its own pass
    if be == "reference":
        return reference.kdef_loss_reference(logits, labels)
    refuse_unsupported_ad(op, be, logits)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, teacher, _ = _op_for(be)(logits, labels, compute_grad)
    return loss, teacher
