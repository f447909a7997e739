"""CTR metrics computed with torch (no scikit-learn dependency)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["auc", "gauc", "logloss"]


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


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: the AUC within each group (e.g. user), averaged with weights = group rows.

    Groups with a single class have no AUC and are skipped (neither their AUC nor their rows
    count). Ties are ranked by their average rank, as in :func:`auc`. Vectorized: one sort for
    all groups instead of a Python loop over them. Returns NaN when no group has both classes.
    """
    scores = scores.detach().double().flatten()
    labels = labels.detach().flatten() > 0.5
    groups = groups.detach().flatten()
    if not (scores.numel() == labels.numel() == groups.numel()):
        raise ValueError(f"gauc: scores, labels and groups must have the same number of elements, "
                         f"got {scores.numel()}, {labels.numel()} and {groups.numel()}")
    if scores.numel() == 0:
        return float("nan")
    _, gid = torch.unique(groups, return_inverse=True)  # compact group ids 0..G-1
    # Sort by (group, score): stable sort by score, then stable sort by group keeps score order.
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]
    g, s, y = gid[order], scores[order], labels[order]
    n = g.numel()
    pos = torch.arange(n, device=g.device)
    # A tie run is a maximal stretch of equal (group, score); each gets its average rank.
    new_run = torch.ones(n, dtype=torch.bool, device=g.device)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run = torch.cumsum(new_run.long(), 0) - 1
    run_start = pos[new_run]
    run_len = torch.bincount(run)
    num_groups = int(g[-1]) + 1
    group_len = torch.bincount(g, minlength=num_groups)
    group_start = torch.cumsum(group_len, 0) - group_len
    # 1-based rank within the group, averaged over the tie run
    rank = (run_start - group_start[g[run_start]]).double() + (run_len.double() + 1) / 2
    rank = rank[run]
    n_pos = torch.zeros(num_groups, dtype=torch.float64, device=g.device).index_add_(
        0, g, y.double())
    rank_pos = torch.zeros(num_groups, dtype=torch.float64, device=g.device).index_add_(
        0, g, torch.where(y, rank, torch.zeros_like(rank)))
    n_neg = group_len.double() - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return float("nan")
    u = rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2
    group_auc = u / (n_pos[valid] * n_neg[valid])
    w = group_len[valid].double()
    return float((group_auc * w).sum() / w.sum())
