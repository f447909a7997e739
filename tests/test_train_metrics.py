"""gAUC (cetnet.metrics.gauc) against a brute-force loop over groups."""

from __future__ import annotations

import math

import pytest
import torch

from cetnet.metrics import auc, gauc


def gauc_loop(scores, labels, groups) -> float:
    """The definition: per-group AUC, weighted by group rows, single-class groups skipped."""
    total = weight = 0.0
    for g in torch.unique(groups):
        m = groups == g
        a = auc(scores[m], labels[m])
        if not math.isnan(a):
            total += a * int(m.sum())
            weight += int(m.sum())
    return total / weight if weight else float("nan")


@pytest.mark.parametrize("seed", range(6))
def test_gauc_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=g))
    groups = torch.randint(0, 30, (n,), generator=g) * 7 - 50  # sparse, negative ids
    labels = (torch.rand(n, generator=g) < 0.3).float()
    scores = torch.rand(n, generator=g)
    if seed % 2:  # many ties, within and across groups
        scores = (scores * 4).round() / 4
    expected = gauc_loop(scores, labels, groups)
    got = gauc(scores, labels, groups)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_gauc_single_group_is_auc_and_degenerate_cases():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.8])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    assert gauc(s, y, torch.zeros(5, dtype=torch.long)) == pytest.approx(auc(s, y))
    assert math.isnan(gauc(s, torch.ones(5), torch.arange(5)))  # every group one class
    assert math.isnan(gauc(s[:0], y[:0], torch.zeros(0, dtype=torch.long)))
    # a single-class group is skipped: its rows do not dilute the weighted mean
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    s2, y2 = torch.cat([s, torch.tensor([0.9, 0.1])]), torch.cat([y, torch.tensor([1.0, 1.0])])
    assert gauc(s2, y2, groups) == pytest.approx(auc(s, y))
    with pytest.raises(ValueError, match="same number"):
        gauc(s, y, groups)
