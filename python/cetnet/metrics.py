"""CTR metrics computed with torch (no scikit-learn dependency).

Non-finite inputs: every metric returns NaN when its result is undefined, never a number that
depends on the row order. A NaN anywhere in the scores, probabilities, labels or group ids
makes the result NaN (a NaN has no rank, and the mean of a NaN term is NaN); ``logloss`` also
returns NaN for a "probability" outside ``[0, 1]`` (``±inf`` included) or a label outside
``[0, 1]``. Infinite *scores* are ranked like any other number (``+inf`` above every finite
score; equal infinities tie), so ``auc`` / ``gauc`` of finite-or-infinite scores are defined.
Inputs of different lengths raise ValueError.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["auc", "gauc", "logloss", "information_abundance"]

_NAN = float("nan")


def _flat(what: str, *tensors: Tensor) -> list[Tensor]:
    """The tensors detached and flattened; ValueError when their lengths differ."""
    flat = [t.detach().flatten() for t in tensors]
    if len({t.numel() for t in flat}) > 1:
        raise ValueError(f"{what}: the inputs must have the same number of elements, got "
                         f"{', '.join(str(t.numel()) for t in flat)}")
    return flat


def _any_nan(*tensors: Tensor) -> bool:
    """Whether a floating-point tensor among ``tensors`` holds a NaN (one host sync)."""
    flags = [torch.isnan(t).any() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).any()) if flags else False


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    ``labels`` are 0/1 (a label counts as positive when > 0.5). Returns NaN when only one class
    is present and when a score or a label is NaN (see the module doc); raises ValueError when
    ``scores`` and ``labels`` differ in length.
    """
    scores, labels = _flat("auc", scores, labels)
    if _any_nan(scores, labels):
        return _NAN
    scores = scores.double()
    labels = labels > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return _NAN
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average the ranks within runs of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                  return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def logloss(probs: Tensor, labels: Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps] as CTR papers do).

    Returns NaN for empty inputs, a NaN, or a probability or label outside ``[0, 1]`` (an
    infinite "probability" is not clipped into range: the loss of such a model is undefined);
    raises ValueError when the lengths differ or ``eps`` is not in ``(0, 0.5)``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"logloss: eps must be in (0, 0.5), got {eps!r}")
    p, y = (t.double() for t in _flat("logloss", probs, labels))
    # NaN fails every comparison, so this one test also catches NaN probabilities and labels
    in_range = (p >= 0) & (p <= 1) & (y >= 0) & (y <= 1)
    if p.numel() == 0 or not bool(in_range.all()):
        return _NAN
    p = p.clamp(eps, 1 - eps)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: the AUC within each group (e.g. user), averaged with weights = group rows.

    Groups with a single class have no AUC and are skipped (neither their AUC nor their rows
    count). Ties are ranked by their average rank, as in :func:`auc`. Vectorized: one sort for
    all groups instead of a Python loop over them. Returns NaN when no group has both classes
    and when a score, label or group id is NaN (see the module doc); raises ValueError when the
    lengths differ.
    """
    scores, labels, groups = _flat("gauc", scores, labels, groups)
    if scores.numel() == 0 or _any_nan(scores, labels, groups):
        return _NAN
    scores = scores.double()
    labels = labels > 0.5
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
        return _NAN
    u = rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2
    group_auc = u / (n_pos[valid] * n_neg[valid])
    w = group_len[valid].double()
    return float((group_auc * w).sum() / w.sum())


def information_abundance(matrix: Tensor) -> float:
    """Information abundance of an embedding table: ``sum_i s_i / max_i s_i`` over its singular
    values ``s_i`` (float64), from 1 (every row on one direction: a collapsed table) to ``min(V,
    D)`` (all directions used equally) -- the collapse diagnostic of the multi-embedding and KDEF
    papers. All-zero rows (e.g. padding) change no singular value. NaN for an empty or all-zero
    matrix, or one with a non-finite entry.

    Raises:
        ValueError: when ``matrix`` is not 2-D.
    """
    if matrix.dim() != 2:
        raise ValueError(f"information_abundance: a [rows, dim] matrix is needed, got shape "
                         f"{tuple(matrix.shape)}")
    m = matrix.detach().to(torch.float64)
    if m.numel() == 0 or not bool(torch.isfinite(m).all()):
        return _NAN
    s = torch.linalg.svdvals(m)
    top = float(s.max())
    return float(s.sum()) / top if top > 0 else _NAN
