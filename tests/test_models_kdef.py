"""The KDEF loss (docs/MATH.md §3): autograd gradient vs the closed form, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cetnet.models import kdef_loss, kdef_loss_terms


def closed_form_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dz of MATH.md §3, written out term by term."""
    B, K = z.shape
    y = y[:, None]
    p = torch.sigmoid(z)
    pt = torch.sigmoid(z.mean(1, keepdim=True))
    s = (1 - (y - p).abs()).mean(0)
    a = torch.softmax(-s, 0)
    eye = torch.eye(K, dtype=torch.bool)
    b = torch.softmax(s.expand(K, K).masked_fill(eye, float("-inf")), 1)  # b[i, j]
    M = ((p - pt) ** 2).mean(0)
    N = ((p[:, :, None] - p[:, None, :]) ** 2).mean(0)  # N[i, j]
    R = (b * N).masked_fill(eye, 0).sum(1)
    dp = p * (1 - p)
    ds = (2 * y - 1) * dp / B
    g = (p - y) / (K * B) + a * (2 / B) * (p - pt) * dp
    for k in range(K):
        for j in range(K):
            if j != k:
                g[:, k] += b[k, j] / K * (2 / B) * (p[:, k] - p[:, j]) * dp[:, k]
    coef = -a * (M - (a * M).sum())
    for k in range(K):
        coef[k] += sum(b[i, k] * (N[i, k] - R[i]) for i in range(K) if i != k) / K
    return g + coef * ds


@pytest.mark.parametrize("K", [1, 2, 4])
def test_gradient_matches_closed_form(K):
    g = torch.Generator().manual_seed(K)
    z = (torch.randn(37, K, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = (torch.rand(37, generator=g) < 0.4).double()
    (grad,) = torch.autograd.grad(kdef_loss(z, y), z)
    torch.testing.assert_close(grad, closed_form_grad(z.detach(), y), rtol=1e-10, atol=1e-13)


def test_values():
    z = torch.randn(20, 3, dtype=torch.float64)
    y = (torch.rand(20) < 0.5).double()
    t = kdef_loss_terms(z, y)
    bce = torch.stack([F.binary_cross_entropy_with_logits(z[:, k], y) for k in range(3)]).mean()
    torch.testing.assert_close(t["label"], bce)
    assert t["t2s"] > 0 and t["s2s"] > 0
    # K = 1: no transfer, the loss is the member's BCE
    t1 = kdef_loss_terms(z[:, :1], y)
    assert t1["t2s"] == 0 and t1["s2s"] == 0
    torch.testing.assert_close(kdef_loss(z[:, :1], y),
                               F.binary_cross_entropy_with_logits(z[:, 0], y))
