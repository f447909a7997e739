"""confidence_fusion and collaborative_loss on every backend, on every device, against the float64
reference (computed on CPU; results are compared on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cetnet_kernels as ck
from cetnet_kernels import collaborative_loss, confidence_fusion, confidence_fusion_reference

from conftest import DEVICES, backend_device_params
from helpers import (TERMS, compiled_autograd, lowp_tolerance_ok, make_logits,
                     reference_loss_grads, requires_expecttest)

# (backend, device) for every backend that runs on each device: "cpu-cpu", "triton-cpu" (the
# interpreter), "reference-cuda", "cuda-cuda", "triton-cuda", ...
CASES = backend_device_params()
SPACES = ["prob", "logit"]


def _interpreted(backend, device):
    """The Triton interpreter (triton on CPU tensors) is slow: such tests use small shapes."""
    return backend == "triton" and device == "cpu"


def _shapes(backend, device):
    # The compiled backends (and triton on the GPU) see large K too.
    if _interpreted(backend, device):
        return [(1, 1), (3, 2), (37, 7)]
    return [(1, 1), (3, 2), (37, 7), (1031, 3), (130, 16), (65, 64)]


def _tol64(device, grad=False):
    """float64 tolerances: CPU exact to a few ulp (the kernels and the reference share the math);
    CUDA's float64 exp/log are accurate to an ulp or two, rows and reductions run in another
    order: the rule of test_triton_fusion.py."""
    if device == "cpu":
        return dict(rtol=1e-10, atol=1e-12) if grad else dict(rtol=1e-12, atol=1e-14)
    return dict(rtol=1e-9, atol=1e-11) if grad else dict(rtol=1e-10, atol=1e-12)


def _close(actual, expected, **tol):
    """assert_close on CPU (both sides detached; dtypes must still match)."""
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **tol)


def _leaf(t, device):
    """A fresh leaf copy of ``t`` on ``device`` that requires grad."""
    return t.detach().to(device, copy=True).requires_grad_()


def _tau(value, device, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)


# ------------------------------------------------------------------------------------------------
# Forward and gradients vs the float64 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_fusion_forward_and_vjp_float64(backend, device, space):
    for B, K in _shapes(backend, device):
        z = make_logits(B, K)
        z[0, 0] = 100.0 if B > 1 else z[0, 0]
        tau = 0.7
        zr = z.clone().requires_grad_()
        tr = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        p_ref, w_ref = confidence_fusion_reference(zr, tr, fusion_space=space)
        gp, gw = torch.randn(B, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
        gz_ref, gt_ref = torch.autograd.grad((p_ref * gp).sum() + (w_ref * gw).sum(), [zr, tr])

        zo, to = _leaf(z, device), _tau(tau, device)
        p, w = confidence_fusion(zo, to, fusion_space=space, backend=backend)
        assert p.shape == (B,) and w.shape == (B, K) and p.dtype == w.dtype == torch.float64
        assert p.device.type == w.device.type == device
        _close(p, p_ref, **_tol64(device))
        _close(w, w_ref, **_tol64(device))
        gz, gt = torch.autograd.grad(
            (p * gp.to(device)).sum() + (w * gw.to(device)).sum(), [zo, to])
        _close(gz, gz_ref, **_tol64(device, grad=True))
        _close(gt, gt_ref, **_tol64(device, grad=True))


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_fusion_detached_weights(backend, device, space):
    z = make_logits(37, 5)
    zr = z.clone().requires_grad_()
    p_ref, _ = confidence_fusion_reference(zr, 0.5, fusion_space=space, detach_weights=True)
    (g_ref,) = torch.autograd.grad(p_ref.sum(), zr)
    zo, to = _leaf(z, device), _tau(0.5, device)
    p, w = confidence_fusion(zo, to, fusion_space=space, detach_weights=True, backend=backend)
    gz, gt = torch.autograd.grad(p.sum() + w.sum(), [zo, to], allow_unused=True)
    _close(gz, g_ref, **_tol64(device, grad=True))
    # no gradient reaches tau through constant weights: None on every backend, as autograd
    # gives the reference (a zero would still be decayed by AdamW, moving tau)
    assert gt is None
    y = torch.rand(37, dtype=torch.float64, device=device)
    loss, prob = collaborative_loss(zo, y, to, mutual_weight=0.3, fusion_space=space,
                                    detach_weights=True, backend=backend)
    assert torch.autograd.grad(loss + prob.sum(), [zo, to], allow_unused=True)[1] is None


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_float64(backend, device, space, detach, terms, reduction):
    shapes = ([(37, 5), (1, 1)] if _interpreted(backend, device)
              else [(37, 5), (1, 1), (1031, 3), (65, 16)])
    for B, K in shapes:
        z = make_logits(B, K)
        y = torch.rand(B, dtype=torch.float64)
        y[: B // 2] = y[: B // 2].round()  # hard and soft labels
        kw = dict(fusion_space=space, detach_weights=detach, **TERMS[terms])
        g_loss = torch.rand(B, dtype=torch.float64) if reduction == "none" else None
        l_ref, p_ref, gz_ref, gt_ref = reference_loss_grads(z, y, 0.8, reduction=reduction, **kw)
        if g_loss is not None:  # a non-trivial upstream gradient for per-row losses
            z64 = z.clone().requires_grad_()
            t64 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
            lr, _ = ck.collaborative_loss_reference(z64, y, t64, reduction="none", **kw)
            gz_ref, gt_ref = torch.autograd.grad((lr * g_loss).sum(), [z64, t64], allow_unused=True)
            gt_ref = torch.zeros((), dtype=torch.float64) if gt_ref is None else gt_ref

        zo, to = _leaf(z, device), _tau(0.8, device)
        loss, prob = collaborative_loss(zo, y.to(device), to, reduction=reduction,
                                        backend=backend, **kw)
        assert loss.dtype == torch.float64 and loss.shape == ((B,) if reduction == "none" else ())
        assert loss.device.type == prob.device.type == device
        loss_tol = dict(rtol=1e-12, atol=1e-12) if device == "cpu" else _tol64(device)
        _close(loss, l_ref, **loss_tol)
        _close(prob, p_ref, **_tol64(device))
        upstream = loss.sum() if g_loss is None else (loss * g_loss.to(device)).sum()
        gz, gt = torch.autograd.grad(upstream, [zo, to], allow_unused=True)
        gt = torch.zeros((), dtype=torch.float64) if gt is None else gt
        _close(gz, gz_ref, **_tol64(device, grad=True))
        _close(gt, gt_ref, **_tol64(device, grad=True))


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_loss_gradient_through_prob_too(backend, device, space):
    """A gradient on the returned prob (e.g. an extra loss on the fused output) is exact too."""
    z, y = make_logits(64, 4), torch.rand(64, dtype=torch.float64)
    g_prob = torch.randn(64, dtype=torch.float64)
    kw = dict(fusion_space=space, **TERMS["all"])
    _, _, gz_ref, gt_ref = reference_loss_grads(z, y, 1.3, grad_prob=g_prob, **kw)
    zo, to = _leaf(z, device), _tau(1.3, device)
    loss, prob = collaborative_loss(zo, y.to(device), to, backend=backend, **kw)
    gz, gt = torch.autograd.grad(loss + (prob * g_prob.to(device)).sum(), [zo, to])
    _close(gz, gz_ref, **_tol64(device, grad=True))
    _close(gt, gt_ref, **_tol64(device, grad=True))


@pytest.mark.parametrize("backend, device", backend_device_params(skip_triton_interpreter=True))
def test_gradcheck(backend, device):
    """Finite differences in float64. The distill/mutual 'gradients' use stop-gradient targets by
    definition (not derivatives of the loss), so gradcheck covers the ensemble and member terms;
    the others are checked against autograd of the reference above. (The kernels' reductions are
    deterministic, so gradcheck's reentrancy check holds on CUDA too.)"""
    z = _leaf(make_logits(6, 3, scale=2.0), device)
    y = torch.rand(6, dtype=torch.float64).to(device)
    tau = _tau(0.9, device)
    for space in SPACES:
        assert torch.autograd.gradcheck(
            lambda z, t: confidence_fusion(z, t, fusion_space=space, backend=backend), (z, tau))
        for red in ["mean", "sum", "none"]:
            assert torch.autograd.gradcheck(
                lambda z, t: collaborative_loss(z, y, t, ensemble_weight=0.6, member_weight=0.3,
                                                fusion_space=space, reduction=red,
                                                backend=backend), (z, tau))


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
@requires_expecttest
@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.cetnet
    z = make_logits(13, 4, dtype=torch.float32, device=device).requires_grad_()
    y = torch.rand(13, device=device)
    t = torch.tensor(0.6, device=device)
    tg = torch.tensor(0.6, device=device, requires_grad=True)
    for space in (False, True):
        torch.library.opcheck(ops.confidence_fusion.default, (z, t, space, False))
        torch.library.opcheck(ops.confidence_fusion.default, (z, tg, space, True))
        torch.library.opcheck(
            ops.confidence_fusion_backward.default,
            (torch.randn(13, device=device), torch.randn(13, 4, device=device), z.detach(), None,
             t, space, False, True))
        torch.library.opcheck(ops.confidence_fusion_backward.default,
                              (None, None, z.detach(), None, t, space, False, False))
        w = ops.confidence_fusion(z.detach(), t, space, False)[1]
        torch.library.opcheck(
            ops.confidence_fusion_backward.default,
            (torch.randn(13, device=device), torch.randn(13, 4, device=device), z.detach(), w, t,
             space, False, True))
        for red in (0, 1, 2):
            torch.library.opcheck(ops.collaborative_loss.default,
                                  (z, y, tg, 1.0, 0.5, 0.3, 0.2, space, False, red, True, True))
            torch.library.opcheck(ops.collaborative_loss.default,
                                  (z.detach(), y, t, 1.0, 1.0, 0.0, 0.0, space, True, red, False,
                                   False))


@pytest.mark.parametrize("backend, device", CASES)
def test_torch_compile_fullgraph_dynamic(backend, device):
    # (the reference too: "auto" picks it without the extension; its temperature division's
    # forward-mode rule made dynamo refuse it, "Unsupported custom jvp")
    def f(z, y, t):
        loss, prob = collaborative_loss(z, y, t, distill_weight=0.2, mutual_weight=0.1,
                                        backend=backend)
        p2, w = confidence_fusion(z, t, fusion_space="logit", backend=backend)
        return loss + 0.1 * (prob * p2).sum() + w[:, 0].mean()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for B in (16, 33, 70):  # new sizes reuse the dynamic graph
        z = make_logits(B, 3, dtype=torch.float32)
        y = torch.rand(B).to(device)
        zc, ze = _leaf(z, device), _leaf(z, device)
        tc, te = _tau(0.8, device, torch.float32), _tau(0.8, device, torch.float32)
        out_c, out_e = cf(zc, y, tc), f(ze, y, te)
        assert out_c.device.type == device
        _close(out_c, out_e)
        out_c.backward()
        out_e.backward()
        _close(zc.grad, ze.grad)
        _close(tc.grad, te.grad)


@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("reference",)))
def test_torch_compile_with_a_float_temperature_that_changes(backend, device):
    """A Python float temperature (annealed by the caller) that dynamo makes a symbol, at its
    second value or with dynamic=True: it compiled to a RecursionError in struct.pack's
    polyfill (the float32 range check); a float32-unrepresentable value still raises, naming
    itself."""
    z, y = make_logits(8, 3, dtype=torch.float32).to(device), torch.rand(8).to(device)

    def f(z, y, t):
        loss, prob = collaborative_loss(z, y, t, backend=backend)
        return loss + confidence_fusion(z, t, backend=backend)[0].sum() + prob.sum()

    for dynamic in (None, True):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
        for t in (0.5, 0.7, 1.3):
            _close(cf(z, y, t), f(z, y, t))
        with pytest.raises(Exception, match="temperature 1e-46 underflows to 0 in torch.float32"):
            cf(z, y, 1e-46)
    module = ck.CETNetFusion(3, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda z, y: module(z, y).loss, fullgraph=True, dynamic=True)
    _close(compiled(z, y), module(z, y).loss)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("op", ["fusion", "loss", "kdef"])
def test_compiled_autograd(backend, device, op):
    """Compiled autograd (dynamo tracing the backward, fullgraph) gives eager's gradients: the
    C++ autograd Functions are traceable (no graph break, no refused mark_non_differentiable)
    and the Python ones call registered ops in their backward."""
    z = make_logits(9, 3, dtype=torch.float32, device=device).requires_grad_()
    y = torch.rand(9, device=device)
    tau = torch.tensor(0.7, device=device, requires_grad=True)

    def total():
        if op == "fusion":
            prob, w = confidence_fusion(z, tau, backend=backend)
            return prob.sum() + w[:, 1].sum()
        if op == "loss":  # the returned prob's gradient adds the fusion backward
            loss, prob = collaborative_loss(z, y, tau, mutual_weight=0.2, backend=backend)
            return loss + prob.sum()
        return ck.kdef_loss(z, y, backend=backend)[0]

    inputs = (z,) if op == "kdef" else (z, tau)
    expected = torch.autograd.grad(total(), inputs)
    with compiled_autograd():
        total().backward()
    for got, want in zip((z.grad, tau.grad), expected):
        _close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend, device", CASES)
def test_inference_mode_call_then_training(backend, device):
    """A call under torch.inference_mode (an evaluation loop's) with a float temperature, then
    a training call at the same temperature: the cached temperature tensor is an ordinary one
    (an inference tensor cannot be saved for backward)."""
    z = make_logits(9, 3, dtype=torch.float32, device=device)
    y = torch.rand(9, device=device)
    with torch.inference_mode():
        confidence_fusion(z, 0.55, backend=backend)
        collaborative_loss(z, y, 0.55, backend=backend)
        ck.kdef_loss(z, y, backend=backend)
    zt = _leaf(z, device)
    loss, prob = collaborative_loss(zt, y, 0.55, backend=backend)
    (loss + confidence_fusion(zt, 0.55, backend=backend)[0].sum()
     + ck.kdef_loss(zt, y, backend=backend)[0]).backward()
    assert torch.isfinite(zt.grad).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_vmap_over_labels_and_temperatures_too(backend, device):
    """The label and temperature checks read values: under vmap over them too (not only the
    logits) they read every vmapped value at once instead of raising vmap's data-dependent
    control flow error, and a bad one is still refused."""
    z = torch.stack([make_logits(9, 3, device=device), make_logits(9, 3, device=device).flip(0)])
    y = torch.rand(2, 9, device=device)
    t = torch.tensor([0.5, 1.5], device=device)
    calls = [lambda z, y, t: collaborative_loss(z, y, t, mutual_weight=0.2, backend=backend)[0],
             lambda z, y, t: ck.kdef_loss(z, y, backend=backend)[0],
             lambda z, y, t: confidence_fusion(z, t, backend=backend)[0].sum()]
    for call in calls:
        got = torch.func.vmap(call)(z, y, t)
        _close(got, torch.stack([call(z[i], y[i], t[i]) for i in range(2)]), rtol=0, atol=0)
    bad = y.clone()
    bad[1, 4] = 1.5
    for call in calls[:2]:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
            torch.func.vmap(call)(z, bad, t)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("op", ["fusion", "loss", "kdef"])
def test_torch_func(backend, device, op):
    """torch.func: vmap works on every backend (the kernels through torch's per-sample
    fallback); grad works on the reference and is refused by name on the kernel backends,
    whose autograd functorch cannot run; a refused call leaves nothing behind (the
    temperature's cache holds no transform's tensors)."""
    y = torch.rand(9, device=device)
    call = {"fusion": lambda z: confidence_fusion(z, 0.6, backend=backend)[0].sum(),
            "loss": lambda z: collaborative_loss(z, y, 0.6, mutual_weight=0.2,
                                                 backend=backend)[0],
            "kdef": lambda z: ck.kdef_loss(z, y, backend=backend)[0]}[op]
    z = make_logits(9, 3, device=device)
    batched = torch.stack([z, z.flip(0)])
    got = torch.func.vmap(call)(batched)
    _close(got, torch.stack([call(batched[0]), call(batched[1])]), rtol=0, atol=0)
    if backend == "reference":
        zr = _leaf(z, device)
        call(zr).backward()
        _close(torch.func.grad(call)(z), zr.grad, rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError, match=f"{'kdef_loss' if op == 'kdef' else ''}.*"
                                               f"backend '{backend}' does not support torch.func"):
            torch.func.grad(call)(z)
    zr = _leaf(z, device)  # an ordinary call after the transforms
    call(zr).backward()
    assert torch.isfinite(zr.grad).all()


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("op", ["fusion", "loss", "kdef"])
def test_forward_mode_ad(backend, device, op):
    """Forward mode (torch.func.jvp, dual tensors): the reference's tangent is the Jacobian
    times the direction (its temperature division has a jvp); the kernel backends refuse by
    name rather than drop the tangent (torch.library's Python ops would return none)."""
    import torch.autograd.forward_ad as fwAD

    y = torch.rand(7, dtype=torch.float64, device=device)
    call = {"fusion": lambda z, t: confidence_fusion(z, t, backend=backend)[0],
            "loss": lambda z, t: collaborative_loss(z, y, t, distill_weight=0.2,
                                                    mutual_weight=0.3, backend=backend)[0],
            "kdef": lambda z, t: ck.kdef_loss(z, y, backend=backend)[0]}[op]
    z = make_logits(7, 3, device=device)
    tau = torch.tensor(0.7, dtype=torch.float64, device=device)
    dz, dtau = torch.randn_like(z), torch.tensor(0.3, dtype=torch.float64, device=device)
    if backend != "reference":
        with pytest.raises(RuntimeError, match="does not support torch.func's differentiation"):
            torch.func.jvp(call, (z, tau), (dz, dtau))
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
            call(fwAD.make_dual(z, dz), tau)
        return
    _, tangent = torch.func.jvp(call, (z, tau), (dz, dtau))
    jz, jt = torch.autograd.functional.jacobian(call, (z, tau))
    expected = (jz * dz).sum(dim=(-2, -1)) + jt * dtau
    _close(tangent, expected, rtol=1e-10, atol=1e-12)


def test_meta_tensors_give_shapes_with_validation_on():
    """Meta tensors (shape inference) with validate=True: the value checks (temperature,
    labels) are skipped, there being no values, instead of failing on .item()."""
    z = torch.empty(5, 3, device="meta")
    y, tau = torch.empty(5, device="meta"), torch.tensor(0.5, device="meta")
    prob, w = confidence_fusion(z, tau)
    loss, p2 = collaborative_loss(z, y, tau)
    kloss, teacher = ck.kdef_loss(z, y)
    assert (prob.shape, w.shape, loss.shape, p2.shape, kloss.shape, teacher.shape) == (
        (5,), (5, 3), (), (5,), (), (5,))


# ------------------------------------------------------------------------------------------------
# Precision, shapes and layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("reference",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("space", SPACES)
def test_dtype_matrix(backend, device, dtype, space):
    """Low precision: the flash-attention rule (helpers.lowp_tolerance_ok) against the CPU
    reference run in the same dtype. On CUDA, float32 gets an absolute slack of 1e-5 (the
    float32 rule ~1e-5 relative on these O(1) values), low precision keeps 1e-4."""
    B, K = (67, 4) if _interpreted(backend, device) else (1031, 4)
    z64 = make_logits(B, K, scale=2.5)
    y = torch.rand(B)
    z = z64.to(dtype)
    zq = z.double()  # the inputs as the low-precision kernel sees them
    kw = dict(fusion_space=space, **TERMS["all"])
    l64, p64, g64, _ = reference_loss_grads(zq, y, 0.8, reduction="sum", **kw)
    zl = z.clone().requires_grad_()
    l_low, p_low = ck.collaborative_loss_reference(zl, y, 0.8, reduction="sum", **kw)
    (g_low,) = torch.autograd.grad(l_low, zl)
    zo = _leaf(z, device)
    loss, prob = collaborative_loss(zo, y.to(device), 0.8, reduction="sum", backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, zo)
    assert prob.dtype == dtype and g.dtype == dtype and loss.dtype == torch.float32
    assert prob.device.type == g.device.type == device
    prob, g, loss = prob.detach().cpu(), g.cpu(), loss.detach().cpu()
    if dtype == torch.float32:
        atol = 1e-6 if device == "cpu" else 1e-5
    else:
        atol = 1e-4
    for name, ours, low, ref in (("prob", prob, p_low, p64), ("grad", g, g_low, g64)):
        ok, err, base = lowp_tolerance_ok(ours, low, ref, atol)
        assert ok, f"{name}: error {err:.3g} > 2 x reference's {base:.3g}"
    # The loss is float32 in both; compare relative to its size.
    rel = 1e-6 if device == "cpu" else 1e-5
    assert (abs(loss.double() - l64).item()
            <= 2 * abs(l_low.double() - l64).item() + rel * abs(l64).item() + 1e-5)
    p, w = confidence_fusion(z.to(device), 0.8, fusion_space=space, backend=backend)
    p_ref64, w_ref64 = confidence_fusion_reference(zq, 0.8, fusion_space=space)
    p_lo, w_lo = confidence_fusion_reference(z, 0.8, fusion_space=space)
    assert p.dtype == w.dtype == dtype and p.device.type == device
    for name, ours, low, ref in (("fusion prob", p, p_lo, p_ref64),
                                 ("fusion weights", w, w_lo, w_ref64)):
        ok, err, base = lowp_tolerance_ok(ours.cpu(), low, ref, atol)
        assert ok, f"{name}: error {err:.3g} > 2 x reference's {base:.3g}"


@pytest.mark.parametrize("backend, device", CASES)
def test_non_contiguous_inputs(backend, device):
    cases = {  # views of tensors already on the device
        "transposed": make_logits(6, 40, device=device).T,  # [40, 6], stride (1, 40)
        "column_slice": make_logits(40, 9, device=device)[:, 1:7:2],
        "row_step": make_logits(80, 3, device=device)[::2],
        "expanded": make_logits(40, 1, device=device).expand(40, 4),  # stride 0 over members
    }
    y = torch.rand(80, dtype=torch.float64).to(device)[::2]  # strided labels too
    tol = dict(rtol=1e-13, atol=1e-14) if device == "cpu" else dict(rtol=1e-12, atol=1e-14)
    for name, z in cases.items():
        assert not z.is_contiguous() and z.device.type == device, name
        zc = z.contiguous()
        for fn in (lambda t: confidence_fusion(t, 0.7, backend=backend),
                   lambda t: collaborative_loss(t, y, 0.7, mutual_weight=0.5, reduction="none",
                                                backend=backend)):
            for x, r in zip(fn(z), fn(zc)):
                _close(x, r, **tol, msg=name)
        zs = z.detach().requires_grad_()  # a non-contiguous leaf
        zr = zc.detach().clone().requires_grad_()
        collaborative_loss(zs, y, backend=backend)[0].backward()
        collaborative_loss(zr, y, backend=backend)[0].backward()
        _close(zs.grad, zr.grad, msg=name)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_single_member_is_bce_with_logits(backend, device, space):
    z64 = make_logits(50, 1)
    y = torch.rand(50, dtype=torch.float64)
    z = _leaf(z64, device)
    loss, prob = collaborative_loss(z, y.to(device), 0.3, ensemble_weight=0.4, member_weight=0.9,
                                    distill_weight=0.7, mutual_weight=0.5, fusion_space=space,
                                    backend=backend)
    z2 = _leaf(z64, "cpu")  # the expected values: torch's own ops in float64 on CPU
    expected = 1.3 * F.binary_cross_entropy_with_logits(z2[:, 0], y)
    if device == "cpu":
        ltol, ptol, gtol = (dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-12, atol=1e-14),
                            dict(rtol=1e-10, atol=1e-13))
    else:
        ltol = ptol = _tol64(device)
        gtol = _tol64(device, grad=True)
    _close(loss, expected, **ltol)
    _close(prob, torch.sigmoid(z2[:, 0]), **ptol)
    loss.backward()
    expected.backward()
    _close(z.grad, z2.grad, **gtol)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("tau", [1e-5, 1e-3, 0.3])
def test_small_temperatures_keep_the_confidence_exact_in_float32(backend, device, tau):
    """c = -H(p) of a sure member: z p + log sigmoid(-z) cancelled to a few digits in float32
    (z = 15: -5.7e-6 for -4.9e-6), which c / tau magnifies: weights were 0.011-0.019 off at
    tau = 1e-5 and the temperature's gradient 21 % off at tau = 1e-3. Now two terms of one
    sign: within float32 rounding of the float64 values."""
    z = torch.tensor([[15., 25.], [-15., 30.], [12., -28.], [20., 21.], [0., -40.]])
    y = torch.tensor([1., 0., 1., 1., 0.])
    w64 = confidence_fusion_reference(z.double(), tau)[1]
    w = confidence_fusion(z.to(device), tau, backend=backend)[1].cpu()
    torch.testing.assert_close(w.double(), w64, rtol=0, atol=2e-7)
    for space in SPACES:
        t64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        loss64 = ck.collaborative_loss(z.double(), y, t64, fusion_space=space,
                                       backend="reference")[0]
        g64, = torch.autograd.grad(loss64, t64)
        t = torch.tensor(tau, device=device, requires_grad=True)
        loss = collaborative_loss(z.to(device), y.to(device), t, fusion_space=space,
                                  backend=backend)[0]
        g, = torch.autograd.grad(loss, t)
        assert abs(float(g) - float(g64)) / (1 + abs(float(g64))) < 2e-6, (space, float(g))


@pytest.mark.parametrize("backend, device", CASES)
def test_extreme_logits_exact_in_float32(backend, device):
    """|z| up to 100 in float32: finite, and as exact as float32 allows (no clamping)."""
    vals = torch.tensor([-100.0, -60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 60.0, 100.0])
    z = torch.cartesian_prod(vals, vals, vals)  # [729, 3]
    y = (torch.arange(z.shape[0]) % 3 / 2).float()  # 0, 0.5, 1
    for space in SPACES:
        kw = dict(fusion_space=space, **TERMS["all"])
        l64, p64, g64, _ = reference_loss_grads(z.double(), y, 1.0, reduction="none", **kw)
        zo = _leaf(z, device)
        loss, prob = collaborative_loss(zo, y.to(device), 1.0, reduction="none", backend=backend,
                                        **kw)
        loss.sum().backward()
        assert loss.device.type == prob.device.type == zo.grad.device.type == device
        loss, prob, grad = loss.detach().cpu(), prob.cpu(), zo.grad.cpu()
        assert torch.isfinite(loss).all() and torch.isfinite(prob).all()
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), l64, rtol=2e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), g64, rtol=1e-4, atol=1e-5)
        # log of tiny probabilities is what matters: compare prob relatively where it is normal.
        # p = exp(log p) with |log p| up to 85: half an ulp of log p alone is 4e-6 relative; on
        # the GPU, Triton's float32 exp/log are the hardware approximations (ex2/lg2.approx, the
        # argument scaled by log2 e), which can add as much again.
        normal = p64 > 1e-37
        rtol = 1e-5 if device == "cpu" else 2e-5
        torch.testing.assert_close(prob.double()[normal], p64[normal], rtol=rtol, atol=0)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_float64_underflowing_rows_beside_ordinary_ones(backend, device, tau):
    """float64 rows whose fused p or 1 - p underflows the prob-space sums (members at -800 give
    p = 0 in float64, at -740 a subnormal p) take the log-space forms of log p, log(1 - p) and
    the ensemble-BCE ratios, in the same tile as ordinary rows, which keep the sums."""
    z = make_logits(40, 4)
    z[3] = -800.0
    z[4] = 800.0
    z[5] = torch.tensor([-740.0, -730.0, -760.0, -745.0], dtype=torch.float64)
    z[6] = torch.tensor([800.0, 2.0, -3.0, 745.0], dtype=torch.float64)
    y = torch.rand(40, dtype=torch.float64)
    for space in SPACES:
        kw = dict(fusion_space=space, **TERMS["all"])
        l_ref, p_ref, gz_ref, gt_ref = reference_loss_grads(z, y, tau, reduction="none", **kw)
        zo, to = _leaf(z, device), _tau(tau, device)
        loss, prob = collaborative_loss(zo, y.to(device), to, reduction="none", backend=backend,
                                        **kw)
        gz, gt = torch.autograd.grad(loss.sum(), [zo, to])
        _close(loss, l_ref, **_tol64(device))
        assert torch.isfinite(loss).all() and torch.isfinite(gz).all()
        # p is 0 in row 3 and subnormal in row 5 (3e-322: a few bits): relative elsewhere
        prob = prob.detach().cpu()
        normal = p_ref > 1e-300
        torch.testing.assert_close(prob[normal] / p_ref[normal],
                                   torch.ones_like(p_ref[normal]), rtol=1e-9, atol=0)
        torch.testing.assert_close(prob[~normal], p_ref[~normal], rtol=0, atol=1e-320)
        _close(gz, gz_ref, **_tol64(device, grad=True))
        _close(gt, gt_ref, **_tol64(device, grad=True))


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_row_is_isolated(backend, device, bad):
    z = make_logits(40, 4, dtype=torch.float32)
    y = torch.rand(40)
    z[7, 2] = bad
    zo = _leaf(z, device)
    loss, prob = collaborative_loss(zo, y.to(device), 0.9, reduction="none", mutual_weight=0.3,
                                    distill_weight=0.2, backend=backend)
    loss.sum().backward()
    assert loss.device.type == device
    loss, prob, grad = loss.detach().cpu(), prob.cpu(), zo.grad.cpu()
    assert torch.isnan(loss[7]) and torch.isnan(prob[7])
    others = torch.arange(40) != 7
    l_ref, p_ref, g_ref, _ = reference_loss_grads(z[others], y[others], 0.9, reduction="none",
                                                  mutual_weight=0.3, distill_weight=0.2)
    torch.testing.assert_close(loss[others].double(), l_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prob[others].double(), p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[others].double(), g_ref, rtol=1e-5, atol=1e-6)
    p, w = confidence_fusion(z.to(device), backend=backend)
    p, w = p.cpu(), w.cpu()
    assert torch.isnan(p[7]) and torch.isfinite(p[others]).all() and torch.isfinite(w[others]).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_empty_batch(backend, device):
    z = torch.empty(0, 3, device=device, requires_grad=True)
    y = torch.empty(0, device=device)
    for red, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss, prob = collaborative_loss(z, y, reduction=red, backend=backend)
        assert loss.shape == shape and prob.shape == (0,)
        if red != "none":
            assert loss.item() == 0.0  # mean of no rows is defined as 0, not NaN
        loss.sum().backward()
        assert z.grad.shape == (0, 3)
    p, w = confidence_fusion(z, backend=backend)
    assert p.shape == (0,) and w.shape == (0, 3)


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
def test_cpu_bitwise_deterministic_across_threads():
    z = make_logits(50_000, 4, dtype=torch.float32)
    y = torch.rand(50_000)
    t = torch.tensor(0.8, requires_grad=True)

    def run():
        zo = z.clone().requires_grad_()
        t.grad = None
        loss, prob = collaborative_loss(zo, y, t, distill_weight=0.1, backend="cpu")
        loss.backward()
        return loss.detach(), prob, zo.grad, t.grad.clone()

    n = torch.get_num_threads()
    try:
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(n)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# float32 at every member count: the CUDA kernels have a register-row variant per K in 2..8
# (float accumulation), the shared-memory cache for other K; each K is its own code.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_float32_every_member_count(backend, device, tau):
    """float32 forward, backward (with and without dL/dtau, upstream grads of p and w) and loss
    (all terms) against the float64 reference on the same rounded logits, for K = 1..9 in both
    spaces, contiguous and as a strided view (rows K + 3 apart, as a slice of wider logits).
    tau = 1 without dL/dtau takes the log-free paths; with it, the general ones."""
    B = 37 if _interpreted(backend, device) else 1300  # more than two 512-row tiles on CUDA
    tol, gtol = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-5)
    gen = torch.Generator().manual_seed(11)
    for K in range(1, 10):
        z = (torch.randn(B, K, generator=gen, dtype=torch.float64) * 3.0).float()
        z[0, 0] = 30.0  # one sure member: weights near one-hot
        y = torch.rand(B, generator=gen, dtype=torch.float64).float()
        gp, gw = torch.randn(B, generator=gen), torch.randn(B, K, generator=gen)
        wide = torch.zeros(B, K + 3)
        wide[:, 2:2 + K] = z
        for space, strided in [(sp, st) for sp in SPACES for st in (False, True)]:
            what = f"K={K} {space} {'strided' if strided else 'contiguous'}"

            def logits_in():  # requires grad: a leaf, or a view of one
                return _leaf(wide, device)[:, 2:2 + K] if strided else _leaf(z, device)

            zr = z.double().requires_grad_()
            tr = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
            p_ref, w_ref = confidence_fusion_reference(zr, tr, fusion_space=space)
            gz_ref, gt_ref = torch.autograd.grad(
                (p_ref * gp.double()).sum() + (w_ref * gw.double()).sum(), [zr, tr])
            for with_tau_grad in (False, True):
                zo = logits_in()
                to = torch.tensor(tau, device=device, requires_grad=with_tau_grad)
                p, w = confidence_fusion(zo, to, fusion_space=space, backend=backend)
                _close(p.double(), p_ref, msg=what, **tol)
                _close(w.double(), w_ref, msg=what, **tol)
                inputs = [zo, to] if with_tau_grad else [zo]
                grads = torch.autograd.grad(
                    (p * gp.to(device)).sum() + (w * gw.to(device)).sum(), inputs)
                _close(grads[0].double(), gz_ref, msg=what, **gtol)
                if with_tau_grad:
                    _close(grads[1].double(), gt_ref, msg=what, **gtol)
            kw = dict(fusion_space=space, **TERMS["all"])
            l_ref, pl_ref, gzl_ref, gtl_ref = reference_loss_grads(z, y, tau, reduction="sum",
                                                                    **kw)
            zo, to = logits_in(), torch.tensor(tau, device=device, requires_grad=True)
            loss, prob = collaborative_loss(zo, y.to(device), to, reduction="sum",
                                            backend=backend, **kw)
            gz, gt = torch.autograd.grad(loss, [zo, to])
            _close(loss.double(), l_ref, msg=what, rtol=1e-5, atol=1e-4)
            _close(prob.double(), pl_ref, msg=what, **tol)
            _close(gz.double(), gzl_ref, msg=what, **gtol)
            _close(gt.double(), gtl_ref, msg=what, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# float32 fast paths of the CPU kernels: the in-register tile transposes (blocks of 8 and 4
# members, any row stride, scalar for the rest and for partial tiles) and the log-free
# forward at temperature 1.
# ------------------------------------------------------------------------------------------------
_TILE_TOL = {torch.float32: (2e-6, 1e-7, 1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5, 2e-2, 1e-4),
             torch.float16: (1e-3, 1e-5, 4e-3, 1e-4)}  # prob/weights rtol, atol; grad rtol, atol


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("dtype", list(_TILE_TOL), ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 9, 12, 13, 16, 20])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_cpu_tile_layouts(K, tau, dtype):
    """The vector tile paths (float, and bfloat16 / half converted on the way) agree with the
    float64 reference and bitwise with the scalar path (a member stride that is not 1)."""
    B = 37  # four full tiles of 8 rows and a partial one
    wide = make_logits(B, K + 3, dtype=torch.float32).to(dtype)
    if dtype != torch.float32:  # sure members too: rounding of p near 1 and of tiny gradients
        wide[::5, 0] = 25.0
    layouts = {
        "contiguous": wide[:, 1:1 + K].contiguous(),
        "row_stride": wide[:, 1:1 + K],  # members contiguous, rows K + 3 apart
        "transposed": wide[:, 1:1 + K].T.contiguous().T,  # members B apart: scalar path
    }
    g = torch.rand(B).to(dtype)
    ref = confidence_fusion_reference(layouts["contiguous"].double(), tau)
    zr = layouts["contiguous"].double().requires_grad_()
    (confidence_fusion_reference(zr, tau)[0] * g.double()).sum().backward()
    rtol, atol, grtol, gatol = _TILE_TOL[dtype]
    outs = {}
    for name, z in layouts.items():
        zo = z.detach().requires_grad_()
        p, w = confidence_fusion(zo, tau, backend="cpu")
        (p * g).sum().backward()
        outs[name] = (p, w, zo.grad)
        torch.testing.assert_close(p.double(), ref[0], rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(w.double(), ref[1], rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(zo.grad.double(), zr.grad, rtol=grtol, atol=gatol, msg=name)
    for name in ("row_stride", "transposed"):  # the layout changes how values move, not them
        for a, b in zip(outs[name], outs["contiguous"]):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("space", SPACES)
def test_cpu_unit_temperature_forward(space):
    """tau = 1 takes the forward without a logarithm: it agrees with the general path (tau a hair
    away from 1) and with the float64 reference, finite for |z| up to 100."""
    vals = torch.tensor([-100.0, -60.0, -20.0, -3.0, -1e-3, 0.0, 0.5, 20.0, 60.0, 100.0])
    z = torch.cartesian_prod(vals, vals, vals, vals)  # [10^4, 4]
    for dtype in (torch.float32, torch.float64):
        zt = z.to(dtype)
        p1, w1 = confidence_fusion(zt, 1.0, fusion_space=space, backend="cpu")
        near = 1.0 + torch.finfo(dtype).eps
        pn, wn = confidence_fusion(zt, near, fusion_space=space, backend="cpu")
        pr, wr = confidence_fusion_reference(z.double(), 1.0, fusion_space=space)
        assert torch.isfinite(p1).all() and torch.isfinite(w1).all()
        tol = dict(rtol=4e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p1, pn, **tol)
        torch.testing.assert_close(w1, wn, **tol)
        torch.testing.assert_close(w1.double(), wr, **tol)
        torch.testing.assert_close(w1.sum(1), torch.ones_like(p1), **tol)


@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("triton",)))
def test_float64_weights_exact_for_sure_members(backend, device):
    """Members with |z| > 20 (where F.softplus switches to its linear cut-off) get weights exact
    to float64 rounding: checked against 50-digit arithmetic (mpmath), the oracle included
    (1e-14 relative on CPU; on CUDA the float64 exp/log libraries allow 1e-13)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    z = torch.tensor([[-2.0, 21.0, 17.7, -83.0, 101.1],
                      [25.0, 30.0, -35.0, 40.0, 0.5]], dtype=torch.float64)

    def exact_row(row):
        xs = [mp.mpf(x) for x in row]
        c = [x / (1 + mp.e ** -x) - mp.log(1 + mp.e ** x) for x in xs]  # z p - softplus(z)
        e = [mp.e ** (ci / mp.mpf("0.7")) for ci in c]
        return [float(ei / sum(e)) for ei in e]

    expected = torch.tensor([exact_row(r.tolist()) for r in z], dtype=torch.float64)
    rtol = 1e-14 if device == "cpu" else 1e-13
    for name, fn in (("kernel", lambda t: confidence_fusion(t, 0.7, backend=backend)),
                     ("reference", lambda t: confidence_fusion_reference(t, 0.7))):
        _close(fn(z.to(device))[1], expected, rtol=rtol, atol=0, msg=name)


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_low_precision_nan_row_is_isolated(dtype):
    z = make_logits(16, 4, dtype=torch.float32).to(dtype)  # two full tiles: the vector path
    z[5, 1] = float("nan")
    zo = z.clone().requires_grad_()
    p, w = confidence_fusion(zo, backend="cpu")
    p.sum().backward()
    others = torch.arange(16) != 5
    assert torch.isnan(p[5]) and torch.isnan(w[5]).all() and torch.isnan(zo.grad[5]).all()
    assert torch.isfinite(p[others]).all() and torch.isfinite(w[others]).all()
    assert torch.isfinite(zo.grad[others]).all()


@pytest.mark.parametrize("backend, device", backend_device_params(exclude=("reference",)))
@pytest.mark.parametrize("op", ["fusion", "loss", "kdef"])
def test_gradients_refuse_a_second_derivative(backend, device, op):
    """The kernels' gradients are first order: with create_graph=True they require grad (other
    terms of a gradient penalty still flow), and differentiating them raises, naming the op,
    instead of treating them as constants (the reference backend, plain torch ops, is twice
    differentiable)."""
    z = make_logits(9, 3, device=device).requires_grad_()
    y = torch.rand(9, dtype=torch.float64, device=device)
    tau = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    call = {"fusion": lambda: confidence_fusion(z, tau, backend=backend)[0].sum(),
            "loss": lambda: collaborative_loss(z, y, tau, mutual_weight=0.3, backend=backend)[0],
            "kdef": lambda: ck.kdef_loss(z, y, backend=backend)[0]}[op]
    inputs = (z,) if op == "kdef" else (z, tau)
    for second in ("backward", "grad", "backward(inputs)"):  # the whole graph, or to the inputs
        grads = torch.autograd.grad(call(), inputs, create_graph=True)
        assert all(g.requires_grad for g in grads)
        penalty = sum((g ** 2).sum() for g in grads) + (z ** 2).sum()
        with pytest.raises(RuntimeError, match="no second derivative"):
            if second == "grad":
                torch.autograd.grad(penalty, inputs)
            else:
                penalty.backward(inputs=list(inputs) if "inputs" in second else None)
    assert not any(g.requires_grad for g in torch.autograd.grad(call(), inputs))
