"""kdef_loss on every backend and device against the float64 reference and the closed-form
gradient; registration (opcheck, torch.compile); dtypes, shapes, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cetnet_kernels as ck
from cetnet_kernels import kdef_loss, kdef_loss_reference
from cetnet_kernels.reference import kdef_loss_terms_reference

from conftest import DEVICES, backend_device_params
from helpers import lowp_tolerance_ok, requires_expecttest

CASES = backend_device_params()


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _data(B, K, *, seed=0, scale=2.0, soft=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    y = torch.rand(B, generator=g, dtype=torch.float64)
    y = y if soft else (y < 0.4).double()
    return z.to(dtype), y


def _run(backend, device, z, y, grad_teacher=None):
    """(loss, teacher, dL/dz) of the op, on CPU in float64."""
    zl = z.detach().to(device).requires_grad_()
    loss, teacher = kdef_loss(zl, y.to(device), backend=backend)
    total = loss if grad_teacher is None else loss + (teacher * grad_teacher.to(device)).sum()
    (grad,) = torch.autograd.grad(total, zl)
    assert loss.device.type == teacher.device.type == grad.device.type == device
    return loss.detach().double().cpu(), teacher.detach().double().cpu(), grad.double().cpu()


def closed_form_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dz written out term by term for 0/1 labels (ds_k/dz = (2y - 1) p (1 - p) / B)."""
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


# ------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_gradient_matches_closed_form(backend, device, K):
    z, y = _data(37, K, seed=K)
    _, _, grad = _run(backend, device, z, y)
    tol = dict(rtol=1e-10, atol=1e-13) if device == "cpu" else dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, closed_form_grad(z, y), **tol)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("soft", [False, True])
def test_float64_against_reference(backend, device, soft):
    shapes = [(1, 1), (3, 2), (37, 7)] if _interpreted(backend, device) else \
        [(1, 1), (3, 2), (37, 7), (1031, 3), (130, 16), (600, 33)]
    for B, K in shapes:
        z, y = _data(B, K, seed=B + K, soft=soft)
        gt = torch.randn(B, dtype=torch.float64)  # the teacher is differentiable too
        loss, teacher, grad = _run(backend, device, z, y, gt)
        zr = z.clone().requires_grad_()
        rl, rt = kdef_loss_reference(zr, y)
        (rg,) = torch.autograd.grad(rl + (rt * gt).sum(), zr)
        tol = dict(rtol=1e-12, atol=1e-14) if device == "cpu" else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, rl.detach(), **tol)
        torch.testing.assert_close(teacher, rt.detach(), **tol)
        torch.testing.assert_close(grad, rg, rtol=1e-10, atol=1e-13)


def test_terms_and_single_member_is_bce():
    z, y = _data(20, 3, seed=1)
    t = kdef_loss_terms_reference(z, y)
    bce = torch.stack([F.binary_cross_entropy_with_logits(z[:, k], y) for k in range(3)]).mean()
    torch.testing.assert_close(t["label"], bce)
    assert t["t2s"] > 0 and t["s2s"] > 0
    t1 = kdef_loss_terms_reference(z[:, :1], y)
    assert abs(t1["t2s"]) < 1e-30 and t1["s2s"] == 0  # sigmoid of [B, 1] vs of [B]: ulps


@pytest.mark.parametrize("backend, device", CASES)
def test_single_member_is_bce_with_logits(backend, device):
    z, y = _data(29, 1, seed=3)
    loss, teacher, grad = _run(backend, device, z, y)
    zr = z.clone().requires_grad_()
    expected = F.binary_cross_entropy_with_logits(zr[:, 0], y)
    (eg,) = torch.autograd.grad(expected, zr)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(teacher, torch.sigmoid(z[:, 0]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, eg, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend, device", backend_device_params(skip_triton_interpreter=True))
def test_gradcheck(backend, device):
    """Finite differences in float64 where the op's gradient is a true derivative: the teacher,
    and the loss of one member (the transfer terms use stop-gradient targets by definition:
    checked against the reference and the closed form above)."""
    z, y = _data(6, 3, seed=2, soft=True)
    zl, y = z.to(device).requires_grad_(), y.to(device)
    assert torch.autograd.gradcheck(lambda z: kdef_loss(z, y, backend=backend)[1], (zl,))
    z1 = zl[:, :1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kdef_loss(z, y, backend=backend)[0], (z1,))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
@requires_expecttest
@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    z = torch.randn(13, 4, device=device, requires_grad=True)
    y = torch.rand(13, device=device)
    for compute_grad in (True, False):
        torch.library.opcheck(torch.ops.cetnet.kdef_loss.default,
                              (z if compute_grad else z.detach(), y, compute_grad))


@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("reference",)))
def test_torch_compile_fullgraph_dynamic(backend, device):
    def f(z, y):
        loss, teacher = kdef_loss(z, y, backend=backend)
        return loss + 0.1 * teacher.mean()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for B in (16, 33, 70):
        z, y = _data(B, 3, seed=B, dtype=torch.float32)
        zc = z.to(device).requires_grad_()
        ze = z.to(device).requires_grad_()
        yc = y.float().to(device)
        out_c, out_e = cf(zc, yc), f(ze, yc)
        torch.testing.assert_close(out_c, out_e)
        out_c.backward()
        out_e.backward()
        torch.testing.assert_close(zc.grad, ze.grad)


# ------------------------------------------------------------------------------------------------
# Precision, shapes, layouts, edge cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("reference",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_matrix(backend, device, dtype):
    """Low precision: the flash-attention rule against the reference run in the same dtype."""
    B, K = (67, 4) if _interpreted(backend, device) else (2053, 4)
    z64, y = _data(B, K, seed=7, soft=True)
    z = z64.to(dtype)
    loss, teacher, grad = _run(backend, device, z, y)
    r64 = _run("reference", "cpu", z.double(), y)  # the same rounded inputs, exactly
    rlow = _run("reference", "cpu", z, y)
    assert grad.dtype == torch.float64  # (converted by _run)
    for ours, low, ref, name, atol in zip((loss, teacher, grad), rlow, r64,
                                          ("loss", "teacher", "grad"), (1e-6, 1e-6, 1e-8)):
        ok, err, base = lowp_tolerance_ok(ours, low, ref, atol=atol)
        assert ok, (name, dtype, err, base)


@pytest.mark.parametrize("backend, device", CASES)
def test_non_contiguous_logits(backend, device):
    z, y = _data(5, 37, seed=4)
    zt = z.t().contiguous().t()  # column-major view of the same values
    assert not zt.is_contiguous()
    a = _run(backend, device, zt, y)
    b = _run(backend, device, z, y)
    for x1, x2 in zip(a, b):
        torch.testing.assert_close(x1, x2, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("backend, device", CASES)
def test_empty_batch(backend, device):
    z = torch.empty(0, 3, device=device, requires_grad=True)
    loss, teacher = kdef_loss(z, torch.empty(0, device=device), backend=backend)
    assert loss.shape == () and loss.item() == 0.0 and teacher.shape == (0,)
    loss.backward()
    assert z.grad.shape == (0, 3)


@pytest.mark.parametrize("backend, device", CASES)
def test_nan_logit_makes_the_batch_loss_nan(backend, device):
    """The loss couples the rows through batch statistics: a NaN logit poisons it (documented)."""
    z, y = _data(9, 3, seed=5)
    z[4, 1] = float("nan")
    loss, teacher = kdef_loss(z.to(device), y.to(device), backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(teacher[4]) and torch.isfinite(teacher.cpu()[torch.arange(9) != 4]).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_bad_input_is_named(backend, device):
    z = torch.zeros(3, 2, device=device)
    with pytest.raises(ValueError, match=r"labels\[1\] = 1\.0000001"):
        kdef_loss(z, torch.tensor([0.0, 1.0000001, 1.0], dtype=torch.float64, device=device),
                  backend=backend)
    with pytest.raises(ValueError, match="labels"):
        kdef_loss(z, torch.zeros(4, device=device), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        kdef_loss(torch.zeros(3, device=device), torch.zeros(3, device=device), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        kdef_loss(torch.zeros(3, 2, dtype=torch.long, device=device),
                  torch.zeros(3, device=device), backend=backend)


@pytest.mark.parametrize("backend, device", CASES)
def test_labels_get_no_gradient_and_bool_labels_work(backend, device):
    z, y = _data(8, 3, seed=6)
    yl = y.to(device).requires_grad_()
    loss, _ = kdef_loss(z.to(device).requires_grad_(), yl, backend=backend)
    loss.backward()
    assert yl.grad is None
    lb, _ = kdef_loss(z.to(device), y.bool().to(device), backend=backend)
    torch.testing.assert_close(lb.double().cpu(), loss.detach().double().cpu())


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
def test_cpu_bitwise_deterministic_across_threads():
    z, y = _data(50_000, 4, seed=8, dtype=torch.float32)

    def run():
        zl = z.clone().requires_grad_()
        loss, _ = kdef_loss(zl, y.float(), backend="cpu")
        loss.backward()
        return loss.detach(), zl.grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run()
        torch.set_num_threads(max(2, threads))
        b = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
def test_no_grad_skips_the_gradient_pass():
    z, y = _data(10, 3, seed=9)
    out = torch.ops.cetnet.kdef_loss(z, y, False)
    assert out[2].shape == (0,)
    with torch.no_grad():
        loss, _ = kdef_loss(z.requires_grad_(), y)
    assert not loss.requires_grad
