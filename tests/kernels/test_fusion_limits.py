"""The fused ensemble ops at the edges of their domain, on every backend and device: tiny and
huge temperatures, member counts that do not fit the kernels' counters, and the reference's
contracts (labels get no gradient; memory linear in B x K)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cetnet_kernels as ck
from cetnet_kernels import collaborative_loss, collaborative_loss_reference, confidence_fusion

from conftest import backend_device_params
from helpers import lowp_tolerance_ok

CASES = backend_device_params()
# The Triton interpreter runs the kernels in numpy, which warns when x / tau overflows to -inf
# (the intended value of a losing member's exponent at tiny tau).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
SPACES = ["prob", "logit"]
ALL_TERMS = dict(ensemble_weight=0.7, member_weight=0.4, distill_weight=0.3, mutual_weight=0.2)

# Each row has one most confident member (smallest entropy: largest |z|), index 1.
LOGITS = [[0.3, -1.2, 0.7], [0.1, -9.0, 0.2]]
WINNERS = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def _taus(dtype):
    # float32 reaches its subnormals (1/tau overflows below ~2.9e-39); float64 goes further.
    base = [1e-10, 1e-20, 1e-30, 1e-38, 1e-44]
    return base + ([1e-100, 1e-300, 5e-324] if dtype == torch.float64 else [])


def _run(backend, device, z, y, tau, space):
    """(prob, weights, d(prob + w[:, 0])/dz, its dtau, loss, dloss/dz, dloss/dtau) in float64."""
    zf = z.detach().to(device).requires_grad_()
    tf = torch.tensor(tau, dtype=torch.float64, device=device, requires_grad=True)
    p, w = confidence_fusion(zf, tf, fusion_space=space, backend=backend)
    (p.sum() + w[:, 0].sum()).backward()
    zl = z.detach().to(device).requires_grad_()
    tl = torch.tensor(tau, dtype=torch.float64, device=device, requires_grad=True)
    loss, _ = collaborative_loss(zl, y.to(device), tl, fusion_space=space, backend=backend,
                                 **ALL_TERMS)
    loss.backward()
    return [t.detach().double().cpu() for t in (p, w, zf.grad, tf.grad, loss, zl.grad, tl.grad)]


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("space", SPACES)
def test_tiny_temperature_is_exact(backend, device, dtype, space):
    """At any tau > 0 the winner's softmax exponent is exactly 0: one-hot weights (ties split
    evenly), the winner's prediction, finite gradients, dloss/dtau = 0; no NaN or inf from
    c/tau overflowing (it did on the CPU backend from tau = 1e-10 in float32)."""
    z = torch.tensor(LOGITS, dtype=dtype)
    y = torch.tensor([1.0, 0.0], dtype=dtype)
    expected_w = torch.tensor(WINNERS, dtype=torch.float64)
    sig = torch.sigmoid(z.double())
    if space == "prob":
        expected_p = (expected_w * sig).sum(1)
    else:
        expected_p = torch.sigmoid((expected_w * z.double()).sum(1))
    for tau in _taus(dtype):
        p, w, gz, gt, loss, lgz, lgt = _run(backend, device, z, y, tau, space)
        for name, t in (("prob", p), ("weights", w), ("grad", gz), ("loss", loss),
                        ("loss grad", lgz)):
            assert torch.isfinite(t).all(), (tau, name, t)
        assert torch.equal(w, expected_w), (tau, w)
        rtol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(p, expected_p, rtol=rtol, atol=0, msg=f"tau={tau}")
        assert gt.item() == 0.0 and lgt.item() == 0.0, (tau, gt, lgt)
        # The limit tau -> 0: gradients of a hard argmax fusion (the weights are constant).
        _, _, gz_lim, _, loss_lim, lgz_lim, _ = _run(backend, device, z, y, 1e-30, space)
        torch.testing.assert_close(lgz, lgz_lim, rtol=rtol, atol=1e-12, msg=f"tau={tau}")
        torch.testing.assert_close(gz, gz_lim, rtol=rtol, atol=1e-12, msg=f"tau={tau}")


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperature_splits_ties_evenly(backend, device, dtype):
    """Two equally confident members share the weight at any tau (their exponents are both
    exactly 0). The gradient there is genuinely of order 1/tau: not checked."""
    z = torch.tensor([[2.0, 2.0, -0.5], [0.5, -0.1, 0.5]], dtype=dtype, device=device)
    for tau in _taus(dtype):
        _, w = confidence_fusion(z, tau, backend=backend)
        assert torch.equal(w.cpu().double(), torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]],
                                                          dtype=torch.float64)), (tau, w)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_small_temperature_matches_float64_reference(backend, device, space):
    """Moderately small temperatures (weights far from one-hot in some rows): every backend in
    float32 against the float64 reference, the temperature's gradient included."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64) * 0.05  # close confidences
    y = torch.rand(40, generator=g, dtype=torch.float64)
    for tau in (1e-2, 1e-3):
        ours = _run(backend, device, z.float(), y.float(), tau, space)
        ref32 = _run("reference", "cpu", z.float(), y.float(), tau, space)
        ref64 = _run("reference", "cpu", z, y, tau, space)
        names = ("prob", "weights", "grad", "grad tau", "loss", "loss grad", "loss grad tau")
        for a, b32, b64, name in zip(ours, ref32, ref64, names):
            # At small tau the confidences' float32 rounding is amplified by 1/tau (1/tau^2 in
            # dtau): the rule is "no worse than twice the float32 reference's own error".
            ok, err, base = lowp_tolerance_ok(a, b32, b64, atol=1e-6 * (b64.abs().max() + 1))
            assert ok, (name, tau, err, base)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("tau, what", [(1e-300, "underflows to 0"), (1e39, "overflows to inf")])
def test_temperature_not_representable_in_compute_dtype_is_named(backend, device, tau, what):
    z = torch.tensor(LOGITS, device=device)
    with pytest.raises(ValueError, match=re.escape(f"temperature {tau!r} {what} in torch.float32")):
        confidence_fusion(z, tau, backend=backend)
    with pytest.raises(ValueError, match=what):
        collaborative_loss(z, torch.ones(2, device=device), tau, backend=backend)
    confidence_fusion(z.double(), tau, backend=backend)  # fine in float64


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("tau, what", [(1e-300, "underflows to 0"), (1e39, "overflows to inf"),
                                       (3.5e38, "overflows to inf")])
def test_a_float64_temperature_tensor_not_representable_in_float32_is_named(backend, device, tau,
                                                                           what):
    """The same value as a float64 tensor: the CPU kernel refused only one rounding to 0, and a
    tensor of 1e39 (inf in float32) made every weight NaN, silently."""
    z = torch.tensor(LOGITS, device=device)
    t = torch.tensor(tau, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=f"temperature {re.escape(repr(tau))}.* {what}"):
        confidence_fusion(z, t, backend=backend)
    with pytest.raises(ValueError, match=what):
        collaborative_loss(z, torch.ones(2, device=device), t, backend=backend)


@pytest.mark.parametrize("backend, device", CASES)
def test_too_many_members_refused_not_truncated(backend, device):
    """A stride-0 view with K >= 2^31 members: refused by name on every backend (the CPU
    kernel narrowed K to int and computed K mod 2^32 members)."""
    y = torch.ones(1, device=device)
    for K in (2**31 + 5, 2**32 + 3):
        z = torch.zeros(1, 1, device=device).expand(1, K)
        with pytest.raises(ValueError, match=r"members \(K\)"):
            collaborative_loss(z, y, backend=backend)
        with pytest.raises(ValueError, match=r"members \(K\)"):
            confidence_fusion(z, backend=backend)


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
def test_registered_op_refuses_too_many_members():
    """The same through the registered op, past the Python checks."""
    z = torch.zeros(1, 1).expand(1, 2**32 + 3)
    with pytest.raises(ValueError, match=r"at most 2147483647 members \(K\)"):
        torch.ops.cetnet.collaborative_loss(z, torch.ones(1), torch.tensor(1.0), 1.0, 1.0, 0.0, 0.0, False,
                               False, 1, False, False)


@pytest.mark.parametrize("backend, device", CASES)
def test_labels_get_no_gradient(backend, device):
    """Labels are data on every backend: a label tensor that requires grad gets none (the
    reference used to differentiate the loss with respect to it)."""
    z = torch.tensor(LOGITS, device=device, requires_grad=True)
    y = torch.tensor([1.0, 0.5], device=device, requires_grad=True)
    loss, _ = collaborative_loss(z, y, backend=backend, **ALL_TERMS)
    loss.backward()
    assert y.grad is None and z.grad is not None


def test_reference_mutual_term_equals_pairwise_sum():
    """The reference's closed-form mutual term against the literal pairwise definition."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(9, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.rand(9, generator=g, dtype=torch.float64)
    terms = dict(ensemble_weight=0.0, member_weight=0.0, mutual_weight=1.0)
    loss, _ = collaborative_loss_reference(z, y, reduction="none", **terms)
    (gz,) = torch.autograd.grad(loss.sum(), z)

    def kl(a, zb):  # KL(Bernoulli(a) || Bernoulli(sigmoid(zb)))
        b = torch.sigmoid(zb)
        return a * (a.log() - b.log()) + (1 - a) * ((1 - a).log() - (1 - b).log())

    z2 = z.detach().clone().requires_grad_()
    K = z.shape[1]
    pairs = [kl(torch.sigmoid(z2[:, j]).detach(), z2[:, k]) for j in range(K) for k in range(K)
             if j != k]
    expected = torch.stack(pairs, 1).sum(1) / (K - 1)
    (gz2,) = torch.autograd.grad(expected.sum(), z2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, gz2, rtol=1e-10, atol=1e-12)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("B", [0, 3])
def test_reference_memory_is_linear_in_members(B):
    """The reference with the mutual term allocated K x K and B x K x K (17 GB at K = 65,537,
    even for B = 0): every intermediate is now at most B x K (or K) elements."""
    K = 65_537
    z = torch.randn(B, K, requires_grad=True)
    y = torch.rand(B)
    with _LargestOutput() as mode:
        loss, _ = collaborative_loss(z, y, backend="reference", **ALL_TERMS)
        loss.backward()
    assert mode.largest <= max(B, 1) * K, mode.largest


@pytest.mark.parametrize("backend, device", CASES)
def test_bad_label_is_printed_with_every_digit(backend, device):
    """A label just above 1 is reported as itself, not rounded to "= 1"."""
    z = torch.zeros(3, 2, device=device)
    y = torch.tensor([0.0, 1.0000001, 1.0], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"labels\[1\] = 1\.0000001"):
        collaborative_loss(z, y, backend=backend)
