"""Plain-PyTorch reference of the fused ensemble head: the oracle every backend is tested against.

Written for clarity, not speed: each formula of MATH.md §1-2 is one line of torch ops, and the
gradients come from autograd (with ``detach`` where the math says stop-gradient). Computation is in
float32 for fp32/fp16/bf16 inputs and in float64 for float64 inputs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cetnet_kernels._host import acc_dtype

__all__ = ["confidence_fusion_reference", "collaborative_loss_reference", "kdef_loss_reference",
           "kdef_loss_terms_reference"]


def _as_tensor(temperature: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(temperature, Tensor):
        return temperature.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(temperature), dtype=like.dtype, device=like.device)


def _softplus(z: Tensor) -> Tensor:
    """log(1 + e^z) without F.softplus's linear cut-off above z = 20 (off by e^-z there: the
    whole confidence of a sure member, and 1e-9 relative in float64 weights)."""
    return -F.logsigmoid(-z)


class _DivideByTemperatureTraced(torch.autograd.Function):
    """``x / tau`` whose backward takes ``0 * inf = 0``: at a tiny tau the losing members' x/tau
    is -inf with an upstream gradient of exactly 0, and autograd's ``-g * (x / tau) / tau``
    would make the temperature's gradient NaN where its true limit is 0. Without a forward-mode
    rule: what torch.compile traces (dynamo refuses a custom jvp)."""

    generate_vmap_rule = True  # torch.func.vmap (and grad of it) work on the reference

    @staticmethod
    def forward(x: Tensor, tau: Tensor) -> Tensor:
        return x / tau

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        tau, out = ctx.saved_tensors
        grad_x = grad / tau if ctx.needs_input_grad[0] else None
        grad_tau = None
        if ctx.needs_input_grad[1]:
            terms = torch.where(grad == 0, torch.zeros_like(grad), grad * out)
            grad_tau = -(terms / tau).sum_to_size(tau.shape)  # tau may broadcast
        return grad_x, grad_tau


class _DivideByTemperature(_DivideByTemperatureTraced):
    """The same, with its forward-mode rule (torch.func.jvp, dual tensors): eager mode."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], output)
        ctx.save_for_forward(inputs[1], output)

    @staticmethod
    def jvp(ctx, grad_x, grad_tau):
        """Forward mode: d(x / tau) = dx / tau - (x / tau) * dtau / tau."""
        tau, out = ctx.saved_tensors
        tangent = grad_x / tau if grad_x is not None else torch.zeros_like(out)
        if grad_tau is not None:
            tangent = tangent - torch.where(grad_tau == 0, torch.zeros_like(out),
                                            out * grad_tau) / tau
        return tangent


def _log_weights(z: Tensor, tau: Tensor, detach_weights: bool) -> Tensor:
    """log w = log_softmax_k(c_k / tau): finite where softmax would underflow to 0 (so that
    log w and its gradient stay exact), -inf only where the exponent itself is -inf."""
    # -H(sigmoid(z)) as two terms of one sign: z sigmoid(z) - softplus(z), the same value,
    # cancels to a few digits in float32 for a large |z| (small temperatures magnify that)
    a = z.abs()
    confidence = -(_softplus(-a) + a * torch.sigmoid(-a))
    # Subtract the row max before dividing (the softmax is invariant to it, so it is detached):
    # the winner's exponent is exactly 0 at any tau > 0, where c/tau alone overflows to -inf.
    centred = confidence - confidence.amax(dim=1, keepdim=True).detach()
    divide = (_DivideByTemperatureTraced if torch.compiler.is_compiling()
              else _DivideByTemperature)
    log_w = torch.log_softmax(divide.apply(centred, tau), dim=1)
    return log_w.detach() if detach_weights else log_w


def confidence_fusion_reference(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    fusion_space: str = "prob",
    detach_weights: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`cetnet_kernels.confidence_fusion`: returns ``(prob [B], weights [B, K])``."""
    z = logits.to(acc_dtype(logits.dtype))
    tau = _as_tensor(temperature, z)
    w = torch.exp(_log_weights(z, tau, detach_weights))
    if fusion_space == "prob":
        p = (w * torch.sigmoid(z)).sum(dim=1)
    elif fusion_space == "logit":
        p = torch.sigmoid((w * z).sum(dim=1))
    else:
        raise ValueError(f"fusion_space must be 'prob' or 'logit', got {fusion_space!r}")
    return p.to(logits.dtype), w.to(logits.dtype)


def _log_fused(z: Tensor, log_w: Tensor, fusion_space: str) -> tuple[Tensor, Tensor]:
    """log p and log(1 - p) of the fused prediction, in stable form."""
    if fusion_space == "logit":
        zf = (torch.exp(log_w) * z).sum(dim=1)
        return F.logsigmoid(zf), F.logsigmoid(-zf)
    return (
        torch.logsumexp(log_w + F.logsigmoid(z), dim=1),
        torch.logsumexp(log_w + F.logsigmoid(-z), dim=1),
    )


def _kl(q: Tensor, log_q: Tensor, log_1mq: Tensor, z: Tensor) -> Tensor:
    """KL(Bernoulli(q) || Bernoulli(sigmoid(z))) with q's logs given (q is a target)."""
    return q * (log_q + _softplus(-z)) + (1 - q) * (log_1mq + _softplus(z))


def collaborative_loss_reference(
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
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`cetnet_kernels.collaborative_loss`: returns ``(loss, prob [B])``.

    Per row: beta*BCE(p, y) + alpha*sum_k BCE(p_k, y) + gamma*sum_k KL(sg(p) || p_k)
    + delta*sum_k mean_{j != k} KL(sg(p_j) || p_k). ``mean`` of an empty batch is 0.
    """
    cdt = acc_dtype(logits.dtype)
    z = logits.to(cdt)
    y = labels.detach().to(cdt)  # labels are data: no gradient, as on every other backend
    tau = _as_tensor(temperature, z)
    B, K = z.shape
    log_p, log_1mp = _log_fused(z, _log_weights(z, tau, detach_weights), fusion_space)
    p = torch.exp(log_p)

    row = (z * 0).sum(dim=1)  # zeros that stay connected to z (a zero-weight loss has grad 0)
    if ensemble_weight != 0:
        row = row - ensemble_weight * (y * log_p + (1 - y) * log_1mp)
    if member_weight != 0:
        bce = _softplus(z) - y[:, None] * z
        row = row + member_weight * bce.sum(dim=1)
    if distill_weight != 0:
        q, lq, l1q = p.detach()[:, None], log_p.detach()[:, None], log_1mp.detach()[:, None]
        row = row + distill_weight * _kl(q, lq, l1q, z).sum(dim=1)
    if mutual_weight != 0 and K > 1:
        # sum_k sum_{j != k} KL(sg(p_j) || p_k), summed over j in closed form (O(B K) memory; the
        # B x K x K pair tensor would need 17 GB at K = 65,537 even for B = 0):
        #   sum_{j != k} [p_j log p_j + q_j log q_j] - (sum_{j != k} p_j) log p_k
        #                                            - (sum_{j != k} q_j) log q_k
        zd = z.detach()
        pj, qj = torch.sigmoid(zd), torch.sigmoid(-zd)
        neg_entropy = pj * F.logsigmoid(zd) + qj * F.logsigmoid(-zd)
        others = lambda v: v.sum(dim=1, keepdim=True) - v  # noqa: E731 - sum over j != k
        pair_sum = (others(neg_entropy) - others(pj) * F.logsigmoid(z)
                    - others(qj) * F.logsigmoid(-z))
        row = row + mutual_weight * pair_sum.sum(dim=1) / (K - 1)

    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    elif reduction == "mean":
        loss = row.sum() / B if B > 0 else row.sum()
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss, p.to(logits.dtype)


def kdef_loss_terms_reference(logits: Tensor, labels: Tensor,
                              sum_over: Callable[[Tensor], Tensor] | None = None
                              ) -> dict[str, Tensor]:
    """The KDEF loss of :func:`cetnet_kernels.kdef_loss` term by term: ``label``, ``t2s``,
    ``s2s`` (0-dim) and ``teacher`` (``[B]``, logits dtype).

    ``p = sigmoid(z)``, teacher ``p_T = sigmoid(mean_k z_k)`` (detached in the loss), exam scores
    ``s_k = mean_b (1 - |y_b - p_bk|)`` (not detached)::

        label = mean_{b,k} BCE(p_bk, y_b)
        t2s   = sum_k a_k mean_b (p_bk - sg(p_T,b))^2,                        a = softmax(-s)
        s2s   = (1/K) sum_i sum_{j != i} b_ij mean_b (p_bi - sg(p_bj))^2,
                b_ij = exp(s_j) / sum_{l != i} exp(s_l)

    Every batch mean is a sum over the rows divided by their count: ``sum_over`` (e.g. a
    differentiable all-reduce) maps this batch's sums ``[1 + 2K + K^2 + 1]`` (the BCE, the
    scores, the two squared distances, the row count) to those of a larger batch it is part
    of, whose terms are then returned. An empty batch has every term 0. Labels get no gradient.
    Memory: ``B x K x K`` (the pairs).
    """
    cdt = acc_dtype(logits.dtype)
    z = logits.to(cdt)
    y = labels.detach().to(cdt).reshape(-1, 1)
    B, K = z.shape
    p = torch.sigmoid(z)
    teacher = torch.sigmoid(z.mean(dim=1))
    sums = torch.cat([(_softplus(z) - y * z).sum().reshape(1),
                      (1 - (y - p).abs()).sum(dim=0),
                      (p - teacher.detach()[:, None]).pow(2).sum(dim=0),
                      (p[:, :, None] - p.detach()[:, None, :]).pow(2).sum(dim=0).reshape(-1),
                      z.new_full((1,), float(B))])  # the count: no gradient
    if sum_over is not None:
        sums = sum_over(sums)
    rows = sums[-1].detach().clamp_min(1)  # an empty batch: every sum is 0, every term too
    scores, m = sums[1:1 + K] / rows, sums[1 + K:1 + 2 * K] / rows
    terms = {"label": sums[0] / (rows * K), "teacher": teacher.to(logits.dtype)}
    a = torch.softmax(-scores, dim=0)
    terms["t2s"] = (a * m).sum()
    terms["s2s"] = (z * 0).sum()  # connected to z: a zero term has gradient 0
    if K > 1:
        off = ~torch.eye(K, dtype=torch.bool, device=z.device)
        b = torch.softmax(scores.expand(K, K).masked_fill(~off, float("-inf")), dim=1)
        n = sums[1 + 2 * K:1 + 2 * K + K * K].reshape(K, K) / rows  # n[i, j]
        terms["s2s"] = (b * n).masked_fill(~off, 0.0).sum() / K
    return terms


def kdef_loss_reference(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of :func:`cetnet_kernels.kdef_loss`: ``(label + t2s + s2s, teacher_prob [B])``
    of :func:`kdef_loss_terms_reference`."""
    t = kdef_loss_terms_reference(logits, labels)
    return t["label"] + t["t2s"] + t["s2s"], t["teacher"]
