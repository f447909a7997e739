"""The KDEF training loss (docs/MATH.md §3), as in the authors' released code, in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kdef_loss", "kdef_loss_terms"]


def kdef_loss_terms(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The three terms of the KDEF loss of ``logits [B, K]`` and 0/1 ``labels [B]``.

    - ``label``: ``(1/K) Σ_k mean_b BCE(p_{b,k}, y_b)``;
    - ``t2s``: ``Σ_k a_k mean_b (p_{b,k} - sg(p_T))²`` with ``a = softmax(-s)``, teacher
      ``p_T = σ(mean_k z_k)``;
    - ``s2s``: ``(1/K) Σ_i Σ_{j≠i} b_ij mean_b (p_i - sg(p_j))²``,
      ``b_ij = exp(s_j) / Σ_{l≠i} exp(s_l)``;

    with exam scores ``s_k = mean_b (1 - |y_b - p_{b,k}|)`` that are *not* detached (gradient
    flows through a and b, as in the released code). With K = 1 both transfer terms are 0.
    """
    if logits.dim() != 2:
        raise ValueError(f"kdef_loss: logits must be [B, K], got shape {tuple(logits.shape)}")
    z = logits
    K = z.shape[1]
    y = labels.to(z.dtype).reshape(-1, 1)
    p = torch.sigmoid(z)
    teacher = torch.sigmoid(z.mean(1, keepdim=True)).detach()
    label = F.binary_cross_entropy_with_logits(z, y.expand_as(z))
    scores = (1.0 - (y - p).abs()).mean(0)
    a = torch.softmax(-scores, dim=0)
    t2s = (a * (p - teacher).pow(2).mean(0)).sum()
    if K == 1:
        s2s = z.new_zeros(())
    else:
        eye = torch.eye(K, dtype=torch.bool, device=z.device)
        b = torch.softmax(scores.expand(K, K).masked_fill(eye, float("-inf")), dim=1)
        n = (p.unsqueeze(2) - p.detach().unsqueeze(1)).pow(2).mean(0)  # n[i, j]
        s2s = (b * n).masked_fill(eye, 0.0).sum() / K
    return {"label": label, "t2s": t2s, "s2s": s2s}


def kdef_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``L = L_label + L_T2S + L_S2S`` (docs/MATH.md §3), a scalar; see :func:`kdef_loss_terms`.
    No tuned loss weights."""
    t = kdef_loss_terms(logits, labels)
    return t["label"] + t["t2s"] + t["s2s"]
