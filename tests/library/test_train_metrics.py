"""cetnet.metrics: gAUC against a brute-force loop over groups; the contract on NaN, infinite
and mismatched inputs (NaN when undefined, in every row order)."""

from __future__ import annotations

import math

import pytest
import torch

from cetnet.metrics import auc, gauc, logloss


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


NAN, INF = float("nan"), float("inf")


def _permutations(n: int, count: int = 8):
    g = torch.Generator().manual_seed(n)
    yield torch.arange(n)
    yield torch.arange(n).flip(0)
    for _ in range(count):
        yield torch.randperm(n, generator=g)


def test_auc_of_nan_scores_is_nan_in_every_row_order():
    # Before: NaN sorted as the largest score and was ranked, the result depended on the order
    scores = torch.tensor([0.1, NAN, 0.8, 0.3, NAN, 0.6, 0.2])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    for perm in _permutations(len(scores)):
        assert math.isnan(auc(scores[perm], labels[perm]))
        assert math.isnan(gauc(scores[perm], labels[perm], groups[perm]))
        assert math.isnan(logloss(scores[perm], labels[perm]))


def test_nan_labels_or_groups_give_nan():
    s = torch.tensor([0.1, 0.7, 0.8, 0.3])
    y = torch.tensor([0.0, NAN, 1.0, 0.0])
    assert math.isnan(auc(s, y)) and math.isnan(logloss(s, y))
    assert math.isnan(gauc(s, y, torch.zeros(4, dtype=torch.long)))
    y_ok = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert math.isnan(gauc(s, y_ok, torch.tensor([0.0, NAN, 0.0, 1.0])))


def test_infinite_scores_are_ranked_not_nan():
    s = torch.tensor([-INF, 0.2, INF, 0.4, INF, -INF])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    finite = torch.tensor([-1e9, 0.2, 1e9, 0.4, 1e9, -1e9])  # the same order and ties
    expected = auc(finite, y)
    assert not math.isnan(expected)
    for perm in _permutations(len(s)):
        assert auc(s[perm], y[perm]) == pytest.approx(expected, abs=1e-15)
        assert gauc(s[perm], y[perm], torch.zeros(6, dtype=torch.long)) == \
            pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("bad", [INF, -INF, 1.5, -0.01, NAN])
def test_logloss_of_an_out_of_range_probability_is_nan(bad):
    # Before: clamp() turned an infinite "probability" into 1 - eps and gave a finite loss
    p = torch.tensor([0.2, bad, 0.7])
    y = torch.tensor([0.0, 1.0, 1.0])
    assert math.isnan(logloss(p, y))
    assert math.isnan(logloss(torch.tensor([0.2, 0.5]), torch.tensor([0.0, 2.0])))
    assert math.isnan(logloss(p[:0], y[:0]))
    assert logloss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])) == pytest.approx(
        -math.log(1 - 1e-7))


def test_length_mismatch_is_an_error_in_every_metric():
    s, y = torch.rand(5), torch.tensor([0.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="auc: the inputs must have the same number"):
        auc(s, y)
    with pytest.raises(ValueError, match="logloss: the inputs must have the same number"):
        logloss(s, y)  # before: [5] vs [1] broadcast silently
    with pytest.raises(ValueError, match="logloss: eps"):
        logloss(s[:4], y, eps=float("nan"))


def test_member_metrics_rank_logits_a_float32_sigmoid_would_tie():
    """Logits 18 and 20 both round to 1.0 through a float32 sigmoid (an AUC of 0.5 from the
    tie); the member's AUC ranks the logits themselves, its logloss takes a float64 sigmoid."""
    from cetnet.train.evaluate import Predictions, score

    logits = torch.tensor([[18.0], [20.0], [-3.0], [22.0]])
    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 1, 1])
    assert torch.sigmoid(logits[0]) == torch.sigmoid(logits[1])  # the tie this avoids
    pred = Predictions(torch.sigmoid(logits[:, 0]), logits, None, label, group)
    member = score(pred, ["m"])["members"]["m"]
    assert member["auc"] == 1.0 and member["gauc"] == 1.0
    assert member["logloss"] == pytest.approx(logloss(torch.sigmoid(logits[:, 0].double()),
                                                      label), rel=1e-12)
