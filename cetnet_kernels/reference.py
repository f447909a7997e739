"""Plain-PyTorch reference of the fused ensemble head: the oracle every backend is tested against.

Written for clarity, not speed: each formula of MATH.md §1-2 is one line of torch ops, and the
gradients come from autograd (with ``detach`` where the math says stop-gradient). Computation is in
float32 for fp32/fp16/bf16 inputs and in float64 for float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["confidence_fusion_reference", "collaborative_loss_reference"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_tensor(temperature: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(temperature, Tensor):
        return temperature.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(temperature), dtype=like.dtype, device=like.device)


def _softplus(z: Tensor) -> Tensor:
    """log(1 + e^z) without F.softplus's linear cut-off above z = 20 (off by e^-z there: the
    whole confidence of a sure member, and 1e-9 relative in float64 weights)."""
    return -F.logsigmoid(-z)


def _weights(z: Tensor, tau: Tensor, detach_weights: bool) -> Tensor:
    confidence = z * torch.sigmoid(z) - _softplus(z)  # -H(sigmoid(z)), logit form
    w = torch.softmax(confidence / tau, dim=1)
    return w.detach() if detach_weights else w


def confidence_fusion_reference(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    fusion_space: str = "prob",
    detach_weights: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`cetnet_kernels.confidence_fusion`: returns ``(prob [B], weights [B, K])``."""
    z = logits.to(_compute_dtype(logits.dtype))
    tau = _as_tensor(temperature, z)
    w = _weights(z, tau, detach_weights)
    if fusion_space == "prob":
        p = (w * torch.sigmoid(z)).sum(dim=1)
    elif fusion_space == "logit":
        p = torch.sigmoid((w * z).sum(dim=1))
    else:
        raise ValueError(f"fusion_space must be 'prob' or 'logit', got {fusion_space!r}")
    return p.to(logits.dtype), w.to(logits.dtype)


def _log_fused(z: Tensor, w: Tensor, fusion_space: str) -> tuple[Tensor, Tensor]:
    """log p and log(1 - p) of the fused prediction, in stable form."""
    if fusion_space == "logit":
        zf = (w * z).sum(dim=1)
        return F.logsigmoid(zf), F.logsigmoid(-zf)
    logw = torch.log(w)
    return (
        torch.logsumexp(logw + F.logsigmoid(z), dim=1),
        torch.logsumexp(logw + F.logsigmoid(-z), dim=1),
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
    cdt = _compute_dtype(logits.dtype)
    z = logits.to(cdt)
    y = labels.to(cdt)
    tau = _as_tensor(temperature, z)
    B, K = z.shape
    w = _weights(z, tau, detach_weights)
    log_p, log_1mp = _log_fused(z, w, fusion_space)
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
        zd = z.detach()
        pj, lpj, l1pj = torch.sigmoid(zd), F.logsigmoid(zd), F.logsigmoid(-zd)
        # pair[b, j, k] = KL(sg(p_j) || p_k)
        pair = _kl(pj[:, :, None], lpj[:, :, None], l1pj[:, :, None], z[:, None, :])
        off_diagonal = 1 - torch.eye(K, dtype=cdt, device=z.device)
        row = row + mutual_weight * (pair * off_diagonal).sum(dim=(1, 2)) / (K - 1)

    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    elif reduction == "mean":
        loss = row.sum() / B if B > 0 else row.sum()
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss, p.to(logits.dtype)
