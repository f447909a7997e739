"""The fused ensemble head: confidence fusion and the collaborative loss (MATH.md §1-2).

Public functions validate their arguments, pick a backend and call one registered op:
``torch.ops.cetnet.*`` (C++ CPU / CUDA kernels, csrc/) or ``torch.ops.cetnet.*_triton``
(cetnet_kernels/triton/). Autograd and fake (meta) kernels of those ops are registered here, so
they work under ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.

``collaborative_loss`` computes the loss and its gradient in one forward launch; backward only
scales the stored gradient (plus a fusion VJP if the returned ``prob`` also receives a gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cetnet_kernels import reference
from cetnet_kernels._host import acc_dtype as _acc_dtype
from cetnet_kernels._host import constant_tensor, shape_only
from cetnet_kernels.backends import (EagerOp, OpTable, first_order, refuse_unsupported_ad,
                                     resolve_backend)
from cetnet_kernels.codes import REDUCTION_CODES, Reduction

__all__ = ["confidence_fusion", "collaborative_loss", "REDUCTIONS", "FUSION_SPACES"]

REDUCTIONS = REDUCTION_CODES  # the public name of the reduction codes
FUSION_SPACES = ("prob", "logit")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# Registered ops of one backend family, and their autograd / fake kernels.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _OpSet:
    fusion: Callable
    fusion_backward: Callable
    loss: Callable


def _fusion_fake(logits, temperature, logit_space, detach_weights):
    B, K = logits.shape
    return logits.new_empty((B,)), logits.new_empty((B, K))


def _fusion_backward_fake(grad_prob, grad_weights, logits, weights, temperature, logit_space,
                          detach_weights, compute_temperature_grad):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), logits.new_empty(
        (), dtype=_acc_dtype(logits.dtype))


def _loss_fake(logits, labels, temperature, ensemble_weight, member_weight, distill_weight,
               mutual_weight, logit_space, detach_weights, reduction, compute_grad,
               compute_temperature_grad):
    B, K = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = logits.new_empty((B,) if reduction == Reduction.NONE else (), dtype=acc)
    grad = logits.new_empty((B, K) if compute_grad else (0,))
    per_row_t = reduction == Reduction.NONE and compute_grad and compute_temperature_grad
    grad_t = logits.new_empty((B,) if per_row_t else (), dtype=acc)
    return loss, logits.new_empty((B,)), grad, grad_t


def _autograd_formulas(ops: _OpSet) -> tuple[Callable, Callable, Callable, Callable]:
    """``(fusion setup_context, fusion backward, loss setup_context, loss backward)``: the
    autograd of the Triton ops, whose backward calls ``ops.fusion_backward``."""

    def fusion_setup(ctx, inputs, output):
        logits, temperature, logit_space, detach_weights = inputs
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work
        ctx.save_for_backward(logits, temperature)
        ctx.logit_space = logit_space
        ctx.detach_weights = detach_weights

    def fusion_backward(ctx, grad_prob, grad_weights):
        logits, temperature = ctx.saved_tensors
        want_t = ctx.needs_input_grad[1] and not ctx.detach_weights
        if ctx.detach_weights:
            grad_weights = None  # the weights are constants: no gradient flows through them
        grad_z, grad_t = ops.fusion_backward(grad_prob, grad_weights, logits, temperature,
                                             ctx.logit_space, ctx.detach_weights, want_t)
        return (grad_z if ctx.needs_input_grad[0] else None,
                grad_t.to(temperature.dtype) if want_t else None, None, None)

    def loss_setup(ctx, inputs, output):
        (logits, _labels, temperature, _ew, _mw, _dw, _uw, logit_space, detach_weights,
         reduction, compute_grad, _ct) = inputs
        _loss, _prob, grad_logits, grad_t = output
        ctx.set_materialize_grads(False)  # prob usually gets no gradient: skip its VJP then
        ctx.save_for_backward(logits, temperature, grad_logits, grad_t)
        ctx.logit_space = logit_space
        ctx.detach_weights = detach_weights
        ctx.reduction = reduction
        ctx.compute_grad = compute_grad

    def loss_backward(ctx, grad_loss, grad_prob, _g_grad, _g_t):
        logits, temperature, grad_logits, grad_t = ctx.saved_tensors
        # detached weights: the temperature reaches nothing differentiable, so no gradient
        # (None, as autograd gives the reference), not a zero
        need_z = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[2] and not ctx.detach_weights
        grad_z = gt = None
        if (need_z or need_t) and grad_loss is not None:
            if not ctx.compute_grad:
                raise RuntimeError(
                    "collaborative_loss was called with compute_grad=False; its gradient was not "
                    "computed in the forward pass")
            # only what is asked for, as csrc/autograd.cpp
            if ctx.reduction == Reduction.NONE:
                if need_z:
                    grad_z = grad_logits * grad_loss[:, None]
                if need_t and grad_t.dim() == 1:
                    gt = (grad_t * grad_loss).sum()
            else:
                B = logits.shape[0]
                scale = grad_loss * (1.0 / B) if ctx.reduction == Reduction.MEAN and B > 0 else grad_loss
                if need_z:
                    grad_z = grad_logits * scale  # bf16/fp16 * fp32 0-dim: computed in fp32
                if need_t:
                    gt = grad_t * scale
            if grad_z is not None:
                grad_z = grad_z.to(logits.dtype)
        if grad_prob is not None and (need_z or need_t):
            gz2, gt2 = ops.fusion_backward(grad_prob, None, logits, temperature, ctx.logit_space,
                                           ctx.detach_weights, need_t)
            grad_z = gz2 if grad_z is None else grad_z + gz2
            gt = gt2 if gt is None else gt + gt2
        if need_t and gt is None:
            gt = torch.zeros((), dtype=temperature.dtype, device=temperature.device)
        return (grad_z if need_z else None, None,
                gt.to(temperature.dtype) if need_t else None,
                None, None, None, None, None, None, None, None, None)

    return fusion_setup, fusion_backward, loss_setup, loss_backward


def _register_autograd(ops: _OpSet, names: tuple[str, str]) -> None:
    """Registers :func:`_autograd_formulas` as the autograd of the ops named ``names``
    (fusion, loss)."""
    fusion_setup, fusion_backward, loss_setup, loss_backward = _autograd_formulas(ops)
    torch.library.register_autograd(names[0], first_order(fusion_backward, names[0]),
                                    setup_context=fusion_setup)
    torch.library.register_autograd(names[1], first_order(loss_backward, names[1]),
                                    setup_context=loss_setup)


def _compiled_ops() -> _OpSet:
    cet = torch.ops.cetnet
    torch.library.register_fake("cetnet::confidence_fusion")(_fusion_fake)
    torch.library.register_fake("cetnet::confidence_fusion_backward")(_fusion_backward_fake)
    torch.library.register_fake("cetnet::collaborative_loss")(_loss_fake)
    # Their autograd is registered in C++ (csrc/autograd.cpp): a Python one costs more per call
    # than the kernels at CTR batch sizes.
    return _OpSet(cet.confidence_fusion.default, cet.confidence_fusion_backward.default,
                  cet.collaborative_loss.default)


def _load_triton() -> _OpSet:
    from cetnet_kernels.triton import fusion as tf  # defines the *_triton ops

    t = torch.ops.cetnet
    names = ("confidence_fusion_triton", "confidence_fusion_backward_triton",
             "collaborative_loss_triton")
    registered = _OpSet(*(getattr(t, n).default for n in names))
    _register_autograd(registered, (f"cetnet::{names[0]}", f"cetnet::{names[2]}"))
    # Eager calls run the implementations below torch.library, with the same formulas.
    # (Their backward calls the backward op as an EagerOp too: compiled autograd traces it.)
    direct = _OpSet(*(tf.IMPLEMENTATIONS[n] for n in names))
    backward = EagerOp(registered.fusion_backward, direct.fusion_backward)
    fusion_setup, fusion_backward, loss_setup, loss_backward = _autograd_formulas(
        _OpSet(direct.fusion, backward, direct.loss))
    return _OpSet(EagerOp(registered.fusion, direct.fusion, fusion_setup, fusion_backward),
                  backward, EagerOp(registered.loss, direct.loss, loss_setup, loss_backward))


_ops_for = OpTable(_compiled_ops, _load_triton)
_TRITON = _ops_for.triton  # why the Triton ops did not load (bench/bench_fusion.py reads it)


# ------------------------------------------------------------------------------------------------
# Argument checks: clear Python exceptions naming the argument.
# ------------------------------------------------------------------------------------------------
_MAX_MEMBERS = 2**31 - 1  # the kernels count members in int


def _check_logits(logits: object, op: str) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: logits must be float16, bfloat16, float32 or float64, "
                        f"got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [batch, members], got shape "
                         f"{tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must have at least one member (K >= 1), got K = 0")
    if logits.shape[1] > _MAX_MEMBERS:  # e.g. a stride-0 view: refused, never truncated
        raise ValueError(f"{op}: at most {_MAX_MEMBERS} members (K), got {logits.shape[1]}")
    return logits


def _check_labels(labels: object, logits: Tensor, op: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: labels must have shape [{logits.shape[0]}] to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.is_complex():
        raise TypeError(f"{op}: labels must be real, got {labels.dtype}")
    if not labels.is_floating_point():  # 0/1 integer or bool labels are fine
        labels = labels.to(_acc_dtype(logits.dtype))
    return labels


def _all_values(t: Tensor) -> Tensor:
    """``t``, or under ``torch.func.vmap`` the tensor of all its vmapped values (a batched
    tensor's values cannot be read one call at a time: a data-dependent branch on it raises)."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _check_label_values(labels: Tensor, op: str) -> None:
    if shape_only(labels):  # meta / fake tensors hold no values to check
        return
    values = _all_values(labels)
    bad = ~((values >= 0) & (values <= 1))  # NaN is bad too
    if bool(bad.any()):
        if values is not labels:
            raise ValueError(f"{op}: labels must lie in [0, 1]; one of the vmapped labels is "
                             f"{values[bad][0].item()}")
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: labels must lie in [0, 1]; labels[{i}] = {labels[i].item()}")


def _check_weight(value: object, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (0 <= value < math.inf):  # NaN fails too (plain compares: dynamo-friendly)
        raise ValueError(f"{op}: {name} must be finite and >= 0, got {value}")
    return value


_F32_TO_ZERO = 2.0 ** -150  # (ties to even: 0)
_F32_TO_INF = (2.0 - 2.0 ** -24) * 2.0 ** 127


def _check_representable(t: float, logits: Tensor, op: str) -> torch.dtype:
    """The compute dtype of ``logits``, after checking that ``t`` is finite and > 0 in it."""
    dtype = _acc_dtype(logits.dtype)
    # float32 rounds t (> 0) to 0 at or below half its least subnormal and to inf at or above
    # its largest value plus half an ulp (plain compares: a float torch.compile made dynamic
    # is a symbol, which struct cannot pack)
    if dtype == torch.float32 and (t <= _F32_TO_ZERO or t >= _F32_TO_INF):
        what = "underflows to 0" if t <= _F32_TO_ZERO else "overflows to inf"
        raise ValueError(f"{op}: temperature {t!r} {what} in {dtype}, the compute dtype of "
                         f"{logits.dtype} logits; use float64 logits or another temperature")
    return dtype


def _temperature(temperature: object, logits: Tensor, op: str, validate: bool,
                 backend: str) -> Tensor:
    """The temperature as a 0-dim tensor on the logits' device (float: checked and cached)."""
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{op}: temperature must be a float or a floating-point tensor, "
                            f"got {temperature.dtype}")
        if temperature.numel() != 1:
            raise ValueError(f"{op}: temperature must hold one value, got shape "
                             f"{tuple(temperature.shape)}")
        if temperature.device != logits.device:
            if temperature.device.type != "cpu":
                raise ValueError(f"{op}: temperature is on {temperature.device} but logits on "
                                 f"{logits.device}")
            temperature = temperature.to(logits.device)
        temperature = temperature.reshape(())
        # The CPU kernel checks the value itself; elsewhere it costs a host sync.
        if validate and backend != "cpu" and not torch.compiler.is_compiling() \
                and not shape_only(temperature):  # (meta / fake: no value to check)
            for t in _all_values(temperature.detach()).reshape(-1).tolist():
                if not (0 < t < math.inf):
                    raise ValueError(f"{op}: temperature must be finite and > 0, got {t}")
                _check_representable(t, logits, op)
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a float or a tensor, got "
                        f"{type(temperature).__name__}")
    t = float(temperature)
    if not (0 < t < math.inf):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {t}")
    dtype = _check_representable(t, logits, op)
    if torch.compiler.is_compiling():
        return torch.full((), t, dtype=dtype, device=logits.device)
    return constant_tensor(t, dtype, logits.device)


def _fusion_space(fusion_space: object, op: str) -> bool:
    """Whether ``fusion_space`` (checked) is "logit"."""
    if fusion_space not in FUSION_SPACES:
        raise ValueError(f"{op}: fusion_space must be 'prob' or 'logit', got {fusion_space!r}")
    return fusion_space == "logit"


def _reduction_code(reduction: object, op: str) -> Reduction:
    """The code of the ``reduction`` name (checked)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return REDUCTIONS[reduction]


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def confidence_fusion(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    fusion_space: str = "prob",
    detach_weights: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fuses K member predictions by confidence (CETNet, MATH.md §1).

    Each member's confidence is its negated binary entropy ``c_k = -H(sigmoid(z_k))``; the weights
    are ``softmax_k(c_k / temperature)`` and the fused probability is ``sum_k w_k sigmoid(z_k)``
    (``fusion_space="prob"``) or ``sigmoid(sum_k w_k z_k)`` (``"logit"``).

    Args:
        logits: ``[B, K]`` member logits (float16/bfloat16/float32/float64, any strides).
        temperature: softmax temperature > 0, a float or a 0-dim tensor; if the tensor requires
            grad, its gradient is computed (learnable temperature). Exact at any value: the most
            confident member's exponent is exactly 0, so a temperature that drifts towards 0
            gives the argmax fusion (ties shared), never NaN; a value that rounds to 0 or inf in
            the compute dtype (float32 unless the logits are float64) is refused by name.
        fusion_space: ``"prob"`` or ``"logit"``.
        detach_weights: treat the weights as constants in backward (no gradient through them).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        validate: check a CUDA temperature tensor's value (a host sync); CPU always checks.
            Under ``torch.compile`` the reference and Triton backends skip value checks.

    Returns:
        ``(prob [B], weights [B, K])`` in the dtype of ``logits``; computed in float32 (float64
        for float64 input). A NaN/inf logit makes only its own row NaN.
    """
    op = "confidence_fusion"
    _check_logits(logits, op)
    logit_space = _fusion_space(fusion_space, op)
    be = resolve_backend(backend, logits.device)
    tau = _temperature(temperature, logits, op, validate, be)
    if be == "reference":
        return reference.confidence_fusion_reference(
            logits, tau, fusion_space=fusion_space, detach_weights=detach_weights)
    refuse_unsupported_ad(op, be, logits, tau)
    return _ops_for(be).fusion(logits, tau, logit_space, bool(detach_weights))


def collaborative_loss(
    logits: Tensor,
    labels: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    ensemble_weight: float = 1.0,
    member_weight: float = 1.0,
    distill_weight: float = 0.0,
    mutual_weight: float = 0.0,
    fusion_space: str = "prob",
    detach_weights: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """The CETNet collaborative loss and fused prediction, in one fused kernel (MATH.md §2).

    Per row, with ``p`` the confidence-fused prediction and ``p_k = sigmoid(z_k)``::

        ensemble_weight * BCE(p, y) + member_weight * sum_k BCE(p_k, y)
        + distill_weight * sum_k KL(sg(p) || p_k) + mutual_weight * sum_k mean_{j!=k} KL(sg(p_j) || p_k)

    (``sg`` = stop-gradient). Stable log-space forms throughout: finite and exact for
    ``|z| <= 100`` in float32, nothing clamped. The forward pass also computes the gradient with
    respect to the logits (and the temperature), so backward is a scaling.

    Args:
        logits: ``[B, K]`` member logits (K >= 1; float16/bfloat16/float32/float64, any strides).
        labels: ``[B]`` (or ``[B, 1]``) targets in ``[0, 1]``; soft labels allowed; bool/int ok.
            Labels get no gradient.
        temperature: fusion temperature > 0 (float or 0-dim tensor; learnable if it requires grad).
            Exact at any value (as for :func:`confidence_fusion`).
        ensemble_weight, member_weight, distill_weight, mutual_weight: the term weights
            (beta, alpha, gamma, delta in MATH.md), each finite and >= 0. With K = 1 the loss
            is ``(member_weight + ensemble_weight) * BCEWithLogits(z, y)``.
        fusion_space: ``"prob"`` or ``"logit"``.
        detach_weights: no gradient through the fusion weights.
        reduction: ``"mean"`` (of an empty batch: 0), ``"sum"`` or ``"none"`` (per row).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        validate: check label values on non-CPU backends (a host sync; the CPU kernel always
            checks, fused into its pass). Under ``torch.compile`` the reference and Triton
            backends skip value checks (labels, a temperature tensor's value).

    Returns:
        ``(loss, prob)``: the loss in float32 (float64 for float64 logits) and the fused
        prediction ``[B]`` in the dtype of ``logits``.
    """
    op = "collaborative_loss"
    _check_logits(logits, op)
    labels = _check_labels(labels, logits, op)
    logit_space = _fusion_space(fusion_space, op)
    reduction_code = _reduction_code(reduction, op)
    weights = [_check_weight(v, n, op) for v, n in (
        (ensemble_weight, "ensemble_weight"), (member_weight, "member_weight"),
        (distill_weight, "distill_weight"), (mutual_weight, "mutual_weight"))]
    be = resolve_backend(backend, logits.device)
    tau = _temperature(temperature, logits, op, validate, be)
    if be != "cpu" and validate and not torch.compiler.is_compiling():
        _check_label_values(labels, op)  # the CPU kernel checks labels in its own pass
    if be == "reference":
        return reference.collaborative_loss_reference(
            logits, labels, tau, ensemble_weight=weights[0], member_weight=weights[1],
            distill_weight=weights[2], mutual_weight=weights[3], fusion_space=fusion_space,
            detach_weights=detach_weights, reduction=reduction)
    refuse_unsupported_ad(op, be, logits, tau)
    grad_on = torch.is_grad_enabled()
    want_t = grad_on and tau.requires_grad
    compute_grad = grad_on and (logits.requires_grad or want_t)
    loss, prob, _, _ = _ops_for(be).loss(
        logits, labels, tau, *weights, logit_space, bool(detach_weights),
        int(reduction_code), compute_grad, want_t)
    return loss, prob
