"""CTR metrics computed with torch (no scikit-learn dependency)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["auc", "logloss"]


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Returns NaN when only one class is present.
    """
    scores = scores.detach().double().flatten()
    labels = labels.detach().flatten() > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks within runs of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                  return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def logloss(probs: Tensor, labels: Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps] as CTR papers do)."""
    p = probs.detach().double().flatten().clamp(eps, 1 - eps)
    y = labels.detach().double().flatten()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
