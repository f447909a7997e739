"""Triton backend (cetnet_kernels.triton.fusion) against the plain-PyTorch reference.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be
set before the kernels are defined, hence before the import below).
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = triton.language

from cetnet_kernels._host import acc_dtype  # noqa: E402
from cetnet_kernels.codes import REDUCTION_CODES  # noqa: E402
from cetnet_kernels.reference import (  # noqa: E402
    collaborative_loss_reference,
    confidence_fusion_reference,
)
from cetnet_kernels.triton import fusion  # noqa: E402
from cetnet_kernels.triton.fusion import _row_col_offsets, _tile_offsets  # noqa: E402
from helpers import dispatched_ops, requires_expecttest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not fusion.INTERPRETED:
    pytest.skip(
        "no GPU, and cetnet_kernels.triton.fusion was imported before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# Results of different kernel specializations (other strides / layouts, other constexpr flags)
# are bitwise equal under the interpreter (numpy, one code path), but not on a GPU: stride-1
# specialization changes vector widths and reduction trees, and float32 exp is approximate. On a
# GPU such comparisons use the tolerance rule of check() instead (see same_values).
BITWISE_ACROSS_SPECIALIZATIONS = fusion.INTERPRETED and DEVICE == "cpu"
SPACES = ("prob", "logit")
REDUCTIONS = REDUCTION_CODES  # reduction name -> the op's code
# (ensemble, member, distill, mutual): each term alone and all together.
TERMS = {
    "ensemble": (1.0, 0.0, 0.0, 0.0),
    "member": (0.0, 0.7, 0.0, 0.0),
    "distill": (0.0, 0.0, 0.3, 0.0),
    "mutual": (0.0, 0.0, 0.0, 0.45),
    "all": (1.0, 0.7, 0.3, 0.45),
}

fusion_fwd = torch.ops.cetnet.confidence_fusion_triton
fusion_bwd = torch.ops.cetnet.confidence_fusion_backward_triton
closs = torch.ops.cetnet.collaborative_loss_triton


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_logits(B, K, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    return z.to(dtype).to(DEVICE)


def make_labels(B, dtype=F32, soft=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, generator=g, dtype=torch.float64) if soft else torch.randint(0, 2, (B,), generator=g).double()
    return y.to(dtype).to(DEVICE)


def extreme_logits(B, K, dtype, seed=2):
    """Mix of |z| up to 100, exact zeros, and moderate values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=torch.float64) * 4
    pick = torch.rand(B, K, generator=g)
    big = (torch.rand(B, K, generator=g, dtype=torch.float64) * 70 + 30) * torch.sign(torch.randn(B, K, generator=g))
    z = torch.where(pick < 0.4, big, z)
    z[0, :] = 100.0
    if B > 1:
        z[1, :] = -100.0
    if B > 2:
        z[2, 0] = 100.0
        z[2, 1:] = -100.0
    if B > 3:
        z[3, :] = 0.0
    return z.to(dtype).to(DEVICE)


def tau_t(value, dtype=F64):
    return torch.tensor(value, dtype=dtype, device=DEVICE)


def check(out, ref, dtype, *, rtol=None, atol=None, what=""):
    """out (any dtype) against a float64 reference ref, at the tolerance of `dtype` (the dtype
    the output was computed in: acc outputs of low-precision inputs use the float32 rule)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    if dtype == F64:
        torch.testing.assert_close(out, ref, rtol=rtol or 1e-10, atol=atol or 1e-12, msg=what)
    elif dtype == F32:
        torch.testing.assert_close(out, ref, rtol=rtol or 1e-5, atol=atol or 1e-6, msg=what)
    else:
        # Flash-attention rule: error at most 2x that of the fp64 result rounded to `dtype`,
        # plus a small atol for the float32 arithmetic inside the kernel.
        assert torch.equal(out.isnan(), ref.isnan()), what
        ok = ~ref.isnan()
        err = (out - ref).abs()[ok]
        base = (ref.to(dtype).to(torch.float64) - ref).abs()[ok]
        bound = 2 * base + (atol if atol is not None else 1e-6)
        bad = err > bound
        assert not bad.any(), f"{what}: max excess {(err - bound).max().item():.3e}, worst err {err.max().item():.3e}"


def ref_fusion_vjp(z, tau, space, detach, gp, gw):
    """VJP of the reference fusion in float64: (grad_logits, per-row grad_temperature [B]).

    The temperature is passed as a [B, 1] tensor (it broadcasts in the softmax), so autograd
    gives each row's d/dtau; their sum is the 0-dim temperature's gradient.
    """
    B = z.shape[0]
    zr = z.detach().double().clone().requires_grad_()
    tr = tau.detach().double().reshape(1, 1).expand(B, 1).clone().requires_grad_()
    p, w = confidence_fusion_reference(zr, tr, fusion_space=space, detach_weights=detach)
    outs, grads = [], []
    if gp is not None:
        outs.append(p)
        grads.append(gp.double())
    if gw is not None and w.requires_grad:  # detached weights carry no gradient
        outs.append(w)
        grads.append(gw.double())
    if not outs:
        return torch.zeros_like(zr), torch.zeros(B, dtype=F64)
    gz, gt = torch.autograd.grad(outs, (zr, tr), grads, allow_unused=True)
    gz = torch.zeros_like(zr) if gz is None else gz
    gt = torch.zeros(B, dtype=F64) if gt is None else gt[:, 0]
    return gz, gt


def same_values(out, base, dtype, what=""):
    """out and base come from different kernel specializations on the same inputs: bitwise
    equal under the interpreter, else within the tolerance rule of check() for `dtype` (base, not
    an fp64 reference, is the baseline: for low precision, 2x the rounding of base to `dtype`
    is 0, so the bound is one ulp of `dtype` via its eps plus the usual atol)."""
    if BITWISE_ACROSS_SPECIALIZATIONS:
        assert torch.equal(out, base), what
    elif dtype in (F64, F32):
        check(out, base, dtype, what=what)
    else:
        o, b = out.double().cpu(), base.double().cpu()
        assert torch.equal(o.isnan(), b.isnan()), what
        ok = ~b.isnan()
        bound = torch.finfo(dtype).eps * b.abs()[ok] + 1e-6
        assert not ((o - b).abs()[ok] > bound).any(), what


def check_row_sum(out, rows, dtype, what="", rel=None):
    """A 0-dim sum over rows against the per-row reference: the float32/float64 rounding of the
    sum is relative to sum |row| (rows of both signs cancel), not to the result."""
    rel = rel if rel is not None else (1e-13 if dtype == F64 else 1e-6)
    atol = rel * rows.abs().sum().item()
    check(out, rows.sum(), dtype, atol=max(atol, 1e-12 if dtype == F64 else 1e-6), what=what)


def ref_loss(z, y, tau, terms, space, detach, reduction):
    """Reference loss, prob and autograd grads wrt logits and a 0-dim float64 temperature."""
    be, me, di, mu = terms
    zr = z.detach().double().clone().requires_grad_()
    tr = tau.detach().double().clone().requires_grad_()
    loss, p = collaborative_loss_reference(
        zr, y.double(), tr, ensemble_weight=be, member_weight=me, distill_weight=di,
        mutual_weight=mu, fusion_space=space, detach_weights=detach, reduction=reduction,
    )
    if z.shape[0] == 0 or not loss.requires_grad:
        return loss.detach(), p.detach(), torch.zeros_like(zr), torch.zeros((), dtype=F64)
    total = loss.sum() if reduction == "none" else loss
    gz, gt = torch.autograd.grad(total, (zr, tr), allow_unused=True)
    gz = torch.zeros_like(zr) if gz is None else gz
    gt = torch.zeros((), dtype=F64) if gt is None else gt
    return loss.detach(), p.detach(), gz, gt


def ref_row_tau_grad(z, y, tau, terms, space, detach):
    """Per-row d(row loss)/dtau: a [B, 1] temperature broadcasts one tau per row."""
    be, me, di, mu = terms
    B = z.shape[0]
    tr = tau.detach().double().reshape(1, 1).expand(B, 1).clone().requires_grad_()
    loss, _ = collaborative_loss_reference(
        z.detach().double(), y.double(), tr, ensemble_weight=be, member_weight=me,
        distill_weight=di, mutual_weight=mu, fusion_space=space, detach_weights=detach, reduction="none",
    )
    if not loss.requires_grad:
        return torch.zeros(B, dtype=F64)
    (gt,) = torch.autograd.grad(loss.sum(), (tr,), allow_unused=True)
    return torch.zeros(B, dtype=F64) if gt is None else gt[:, 0]


def run_loss(z, y, tau, terms, space, detach, reduction, compute_grad=True, tgrad=True):
    be, me, di, mu = terms
    return closs(z, y, tau, be, me, di, mu, space == "logit", detach, REDUCTIONS[reduction], compute_grad, tgrad)


def acc_of(dtype):
    return F64 if dtype == F64 else F32


# ---------------------------------------------------------------------------------------------
# (a) confidence_fusion forward
# ---------------------------------------------------------------------------------------------
SHAPES = [(0, 3), (1, 1), (3, 2), (37, 7), (130, 16), (37, 3)]


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("B,K", SHAPES)
def test_fusion_forward(dtype, space, B, K):
    z = make_logits(B, K, dtype)
    tau = tau_t(0.7)
    p, w = fusion_fwd(z, tau, space == "logit", False)
    assert p.dtype == dtype and w.dtype == dtype and p.shape == (B,) and w.shape == (B, K)
    assert w.is_contiguous()
    rp, rw = confidence_fusion_reference(z.double(), tau, fusion_space=space)
    check(p, rp, dtype, what="prob")
    check(w, rw, dtype, what="weights")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("space", SPACES)
def test_fusion_forward_extreme(dtype, space):
    z = extreme_logits(37, 7, dtype)
    tau = tau_t(0.4)
    p, w = fusion_fwd(z, tau, space == "logit", False)
    rp, rw = confidence_fusion_reference(z.double(), tau, fusion_space=space)
    assert torch.isfinite(p).all() and torch.isfinite(w).all()
    pd, wd = fusion_fwd(z, tau, space == "logit", True)  # detach_weights: same values
    assert torch.equal(p, pd) and torch.equal(w, wd)
    check(p, rp, dtype, what="prob")
    check(w, rw, dtype, what="weights")


# ---------------------------------------------------------------------------------------------
# (b) confidence_fusion backward
# ---------------------------------------------------------------------------------------------
GRAD_IN = ["both", "prob", "weights", "none"]


def _upstream(B, K, which, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    gp = torch.randn(B, generator=g, dtype=F64).to(dtype).to(DEVICE) if which in ("both", "prob") else None
    gw = torch.randn(B, K, generator=g, dtype=F64).to(dtype).to(DEVICE) if which in ("both", "weights") else None
    return gp, gw


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("which", GRAD_IN)
def test_fusion_backward(dtype, space, detach, which):
    B, K = 37, 7
    z = make_logits(B, K, dtype)
    tau = tau_t(0.7)
    gp, gw = _upstream(B, K, which, dtype)
    gz, gt = fusion_bwd(gp, gw, z, tau, space == "logit", detach, True)
    assert gz.dtype == dtype and gz.shape == (B, K) and gz.is_contiguous()
    assert gt.dtype == acc_of(dtype) and gt.shape == ()
    rgz, rgt = ref_fusion_vjp(z, tau, space, detach, gp, gw)
    check(gz, rgz, dtype, what="grad_logits")
    check_row_sum(gt, rgt, dtype, what="grad_temperature")
    if detach:
        assert gt.item() == 0.0
    _, gt_off = fusion_bwd(gp, gw, z, tau, space == "logit", detach, False)
    assert gt_off.shape == () and gt_off.item() == 0.0


@pytest.mark.parametrize("B,K", [(0, 3), (1, 1), (3, 2), (130, 16)])
@pytest.mark.parametrize("space", SPACES)
def test_fusion_backward_shapes(B, K, space):
    _check_backward(make_logits(B, K, F64), tau_t(1.3), space)


def _check_backward(z, tau, space, atol=None):
    """The fusion VJP of ``z`` (both upstream gradients) against the reference; returns it."""
    B, K = z.shape
    gp, gw = _upstream(B, K, "both", z.dtype)
    gz, gt = fusion_bwd(gp, gw, z, tau, space == "logit", False, True)
    assert gz.dtype == z.dtype and gt.dtype == acc_dtype(z.dtype)
    rgz, rgt = ref_fusion_vjp(z, tau, space, False, gp, gw)
    check(gz, rgz, z.dtype, atol=atol, what="grad_logits")
    check_row_sum(gt, rgt, gt.dtype, what="grad_temperature")
    return gz, gt


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("space", SPACES)
def test_fusion_low_precision_backward(dtype, space):
    _check_backward(make_logits(37, 7, dtype), tau_t(0.7, F32), space)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("space", SPACES)
def test_fusion_backward_extreme(dtype, space):
    gz, _ = _check_backward(extreme_logits(37, 7, dtype), tau_t(0.4), space,
                            atol=1e-11 if dtype == F64 else None)
    assert torch.isfinite(gz).all()


# ---------------------------------------------------------------------------------------------
# (c) collaborative loss
# ---------------------------------------------------------------------------------------------
def _check_loss_case(z, y, tau, terms, space, detach, reduction, dtype, atol=None, rows=None, tau_atol=None):
    """rows: the per-row reference d(row loss)/dtau, if already computed; tau_atol: atol of the
    temperature gradient (default: atol)."""
    B = z.shape[0]
    loss, p, gz, gt = run_loss(z, y, tau, terms, space, detach, reduction)
    acc = acc_of(dtype)
    rl, rp, rgz, rgt = ref_loss(z, y, tau, terms, space, detach, reduction)
    # Shapes and dtypes of the contract.
    assert loss.dtype == acc and loss.shape == ((B,) if reduction == "none" else ())
    assert p.dtype == dtype and p.shape == (B,)
    assert gz.dtype == dtype and gz.shape == (B, z.shape[1]) and gz.is_contiguous()
    assert gt.dtype == acc and gt.shape == ((B,) if reduction == "none" else ())
    check(loss, rl, acc, atol=atol, what="loss")
    check(p, rp, dtype, atol=atol if dtype in (F64, F32) else None, what="prob")
    if B == 0:
        return
    # grad_logits is the unreduced per-row gradient (the caller scales it by 1/B for mean): compare
    # it with B * autograd of the mean loss, so low-precision rounding is judged on its own values.
    scale = float(B) if reduction == "mean" else 1.0
    check(gz, rgz * scale, dtype, atol=atol if dtype in (F64, F32) else None, what="grad_logits")
    if rows is None:
        rows = ref_row_tau_grad(z, y, tau, terms, space, detach)
    check(rgt * scale, rows.sum(), F64, atol=1e-12, what="reference tau grad: 0-dim vs rows")
    if reduction == "none":
        check(gt, rows, acc, atol=tau_atol or atol, what="grad_temperature rows")
    else:
        check_row_sum(gt, rows, acc, what="grad_temperature")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("detach", [False, True])
def test_loss_terms(dtype, term, space, detach):
    z = make_logits(37, 7, dtype)
    y = make_labels(37, dtype)
    tau = tau_t(0.7)
    rows = ref_row_tau_grad(z, y, tau, TERMS[term], space, detach)
    for reduction in REDUCTIONS:
        _check_loss_case(z, y, tau, TERMS[term], space, detach, reduction, dtype, rows=rows)


@pytest.mark.parametrize("B", [0, 1, 3, 37, 130])
@pytest.mark.parametrize("K", [1, 2, 3, 7, 16])
def test_loss_shapes(B, K):
    # Alternate the space so both get every K without doubling the count.
    space = SPACES[(B + K) % 2]
    z = make_logits(B, K, F64, seed=B * 31 + K)
    y = make_labels(B, F64, soft=(K % 2 == 0), seed=B + 3)
    _check_loss_case(z, y, tau_t(0.8), TERMS["all"], space, False, "mean", F64)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("detach", [False, True])
def test_loss_low_precision(dtype, space, detach):
    z = make_logits(37, 7, dtype)
    y = make_labels(37, dtype)
    tau = tau_t(0.7, F32)
    rows = ref_row_tau_grad(z, y, tau, TERMS["all"], space, detach)
    for reduction in ("none", "mean"):
        _check_loss_case(z, y, tau, TERMS["all"], space, detach, reduction, dtype, rows=rows)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("term", ["ensemble", "all"])
def test_loss_extreme(dtype, space, term):
    z = extreme_logits(37, 7, dtype)
    y = make_labels(37, dtype, soft=False)
    y[5:10] = torch.tensor([0.3, 0.0, 1.0, 0.5, 0.99], dtype=dtype)
    tau = 0.5
    loss, p, gz, gt = run_loss(z, y, tau_t(tau), TERMS[term], space, False, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(gz).all() and torch.isfinite(gt).all()
    # d/dtau sums terms ~ z c / tau^2 that cancel: its rounding is ~ eps * max|z| / tau^2.
    atol = 1e-10 if dtype == F64 else 2e-6
    tau_atol = max(atol, torch.finfo(dtype).eps * 100 / tau**2)
    _check_loss_case(z, y, tau_t(tau), TERMS[term], space, False, "none", dtype, atol=atol, tau_atol=tau_atol)


@pytest.mark.parametrize("tau", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("tau_dtype", [F64, F32])
def test_loss_temperature(tau, tau_dtype):
    z = make_logits(37, 7, F64)
    y = make_labels(37, F64)
    for space in SPACES:
        _check_loss_case(z, y, tau_t(tau, tau_dtype), TERMS["all"], space, False, "sum", F64)


def test_loss_k1_is_bce():
    z = make_logits(37, 1, F64)
    y = make_labels(37, F64)
    for space in SPACES:
        loss, p, gz, _ = run_loss(z, y, tau_t(0.7), (0.6, 0.9, 0.3, 0.45), space, False, "none")
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y, reduction="none")
        check(loss, 1.5 * bce, F64, what="loss")
        check(gz[:, 0], 1.5 * (torch.sigmoid(z[:, 0]) - y), F64, what="grad")


def test_loss_flags_and_empty():
    z = make_logits(37, 7, F32)
    y = make_labels(37, F32)
    tau = tau_t(0.7)
    # No gradient asked: empty grad, 0-dim zero temperature grad.
    loss, p, gz, gt = run_loss(z, y, tau, TERMS["all"], "prob", False, "none", compute_grad=False)
    assert gz.shape == (0,) and gz.dtype == F32 and gt.shape == () and gt.dtype == F32 and gt.item() == 0
    loss2, p2, gz2, _ = run_loss(z, y, tau, TERMS["all"], "prob", False, "none")
    same_values(loss, loss2, F32, "loss without / with grad")  # COMPUTE_GRAD: another kernel
    same_values(p, p2, F32, "prob without / with grad")
    # Temperature grad not asked.
    for red in REDUCTIONS:
        *_, gt = run_loss(z, y, tau, TERMS["all"], "prob", False, red, tgrad=False)
        assert gt.shape == () and gt.item() == 0
    # Asked, but tau does not enter the loss (detached weights / no ensemble term): zeros.
    *_, gt = run_loss(z, y, tau, TERMS["all"], "prob", True, "none")
    assert gt.shape == (37,) and not gt.any()
    *_, gt = run_loss(z, y, tau, TERMS["member"], "logit", False, "mean")
    assert gt.shape == () and gt.item() == 0
    # Empty batch: mean is exactly 0, shapes hold.
    ze, ye = make_logits(0, 4, F64), make_labels(0, F64)
    for red, shape in (("none", (0,)), ("mean", ()), ("sum", ())):
        loss, p, gz, gt = run_loss(ze, ye, tau, TERMS["all"], "prob", False, red)
        assert loss.shape == shape and p.shape == (0,) and gz.shape == (0, 4) and gt.shape == shape
        assert not loss.any()


def test_loss_weights_float64_exact():
    # Loss weights that are not float32-representable keep float64 accuracy in float64 runs.
    z = make_logits(37, 7, F64)
    y = make_labels(37, F64)
    terms = (0.1, 1 / 3, 0.2 + 1e-9, 0.7)
    for space in SPACES:
        _check_loss_case(z, y, tau_t(0.7), terms, space, False, "mean", F64)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    B=st.integers(0, 40),
    K=st.integers(1, 9),
    weights=st.tuples(*[st.sampled_from([0.0, 0.25, 1.0, 1.7])] * 4),
    tau=st.floats(0.2, 4.0),
    space=st.sampled_from(SPACES),
    detach=st.booleans(),
    reduction=st.sampled_from(list(REDUCTIONS)),
    seed=st.integers(0, 2**16),
)
def test_loss_property(B, K, weights, tau, space, detach, reduction, seed):
    z = make_logits(B, K, F64, scale=4.0, seed=seed)
    y = make_labels(B, F64, soft=seed % 2 == 0, seed=seed + 1)
    _check_loss_case(z, y, tau_t(tau), weights, space, detach, reduction, F64)


# ---------------------------------------------------------------------------------------------
# Robustness: NaN rows, strides
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN arithmetic in the interpreter
def test_nan_row_isolated():
    B, K, bad = 37, 7, 5
    z = make_logits(B, K, F32)
    y = make_labels(B, F32)
    tau = tau_t(0.7)
    zn = z.clone()
    zn[bad, 2] = float("nan")
    keep = torch.arange(B, device=DEVICE) != bad
    for space in SPACES:
        lg = space == "logit"
        p0, w0 = fusion_fwd(z, tau, lg, False)
        p1, w1 = fusion_fwd(zn, tau, lg, False)
        assert torch.equal(p0[keep], p1[keep]) and torch.equal(w0[keep], w1[keep])
        assert p1[bad].isnan() and w1[bad].isnan().any()
        gp, gw = _upstream(B, K, "both", F32)
        g0, _ = fusion_bwd(gp, gw, z, tau, lg, False, True)
        g1, _ = fusion_bwd(gp, gw, zn, tau, lg, False, True)
        assert torch.equal(g0[keep], g1[keep]) and g1[bad].isnan().any()
        l0, q0, gz0, gt0 = run_loss(z, y, tau, TERMS["all"], space, False, "none")
        l1, q1, gz1, gt1 = run_loss(zn, y, tau, TERMS["all"], space, False, "none")
        for a, b in ((l0, l1), (q0, q1), (gz0, gz1), (gt0, gt1)):
            assert torch.equal(a[keep], b[keep])
        assert l1[bad].isnan() and q1[bad].isnan() and gz1[bad].isnan().any()


def _strided_views(z):
    """Non-contiguous copies of z [B, K]: .T of a [K, B] tensor, and a column slice."""
    B, K = z.shape
    zt = z.T.contiguous().T
    wide = torch.zeros(B, 2 * K + 3, dtype=z.dtype, device=z.device)
    wide[:, 1 : 2 * K + 1 : 2] = z
    zs = wide[:, 1 : 2 * K + 1 : 2]
    assert not zs.is_contiguous() and (K == 1 or not zt.is_contiguous())  # [B, 1].T.T is
    return zt, zs


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("K", [7, 4, 1])  # K == BLOCK_K (4, 1): contiguous rows are addressed
def test_non_contiguous(dtype, K):       # with a constant stride, strided ones are not
    B = 37
    z = make_logits(B, K, dtype)
    y2 = make_labels(2 * B, dtype)
    y = y2[::2]  # strided labels
    yc = y.contiguous()
    tau = tau_t(0.7, F32 if dtype == BF16 else F64)
    gp2, gw = _upstream(2 * B, K, "both", dtype)
    gp, gw = gp2[::2], gw[:B].T.contiguous().T
    acc = acc_of(dtype)
    for space in SPACES:
        lg = space == "logit"
        base_f = fusion_fwd(z, tau, lg, False)
        base_b = fusion_bwd(gp.contiguous(), gw.contiguous(), z, tau, lg, False, True)
        base_l = run_loss(z, yc, tau, TERMS["all"], space, False, "none")
        rp, rw = confidence_fusion_reference(z.double(), tau, fusion_space=space)
        rgz, rgt = ref_fusion_vjp(z, tau, space, False, gp, gw)
        for zv in _strided_views(z):
            # Each strided result against the float64 reference (the documented rule: holds on
            # any device), and against the contiguous result (bitwise under the interpreter).
            p, w = fusion_fwd(zv, tau, lg, False)
            check(p, rp, dtype, what="prob")
            check(w, rw, dtype, what="weights")
            for a, b, dt in zip((p, w), base_f, (dtype, dtype)):
                same_values(a, b, dt, "fusion forward")
            gz, gt = fusion_bwd(gp, gw, zv, tau, lg, False, True)
            check(gz, rgz, dtype, what="grad_logits")
            check_row_sum(gt, rgt, acc, what="grad_temperature")
            for a, b, dt in zip((gz, gt), base_b, (dtype, acc)):
                same_values(a, b, dt, "fusion backward")
            out_l = run_loss(zv, y, tau, TERMS["all"], space, False, "none")
            _check_loss_case(zv, y, tau, TERMS["all"], space, False, "none", dtype)
            for a, b, dt in zip(out_l, base_l, (acc, dtype, dtype, acc)):
                same_values(a, b, dt, "collaborative loss")


def test_packed_rows_decision():
    """Which [B, K] tensors the kernels address as contiguous rows of BLOCK_K members (a constant
    row stride): exactly the ones whose elements are there (anything else reads wrong memory)."""
    packed = fusion._packed
    z = torch.zeros(9, 4)
    assert packed(4, 4, z)
    assert not packed(4, 8, torch.zeros(9, 4)[:, :4])  # K < BLOCK_K: rows of 8 are not there
    assert not packed(4, 4, torch.zeros(9, 7)[:, 1:5])  # row stride 7
    assert not packed(4, 4, z.T.contiguous().T)  # member stride 9
    assert packed(4, 4, torch.zeros(1, 11)[:, 2:6])  # one row: its stride(0) is never used
    assert not packed(1, 1, torch.zeros(9, 3)[:, 1:2])  # a column: row stride 3
    assert packed(1, 1, torch.zeros(9, 1).T.contiguous().T)  # [9, 1]: stride(1) never used
    assert not packed(4, 4, None)
    assert fusion._packing(5, 8, torch.zeros(3, 5)) == dict(EVEN_K=False, Z_PACKED=False)


# ---------------------------------------------------------------------------------------------
# int64 index arithmetic and the launch device
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets_probe(out_ptr, stride_b, stride_k, BLOCK_B: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # The kernels' own index helpers; the offsets are stored, never dereferenced.
    rows, cols = _row_col_offsets(BLOCK_B, BLOCK_K)
    offs = _tile_offsets(rows, cols, stride_b, stride_k)
    tl.store(out_ptr + rows[:, None] * BLOCK_K + cols[None, :], offs)


def test_tile_offsets_int64():
    # Strides below 2^31 reach a kernel as int32; a column-major [B, K] view has stride(1) = B,
    # so col * stride_k (and row * stride_b) pass 2^31 long before memory runs out. Under the
    # interpreter int32 products wrap exactly as on a GPU, so this catches a narrowing of the
    # helpers the kernels use for every strided load (a real tensor that large cannot be
    # allocated here).
    BLOCK_B, BLOCK_K, programs = 4, 8, 2
    stride_b, stride_k = 2**30 + 3, 2**29 + 1
    out = torch.empty(programs * BLOCK_B, BLOCK_K, dtype=torch.int64, device=DEVICE)
    _tile_offsets_probe[(programs,)](out, stride_b, stride_k, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K)
    rows = torch.arange(programs * BLOCK_B, dtype=torch.int64)[:, None]
    cols = torch.arange(BLOCK_K, dtype=torch.int64)[None, :]
    expected = rows * stride_b + cols * stride_k
    assert expected.max() > 2**32
    assert torch.equal(out.cpu(), expected)


def test_launch_device_guard_is_noop_on_cpu(monkeypatch):
    # Interpreter launches on CPU tensors must not touch torch.cuda at all.
    def no_cuda(*a, **k):
        raise AssertionError("torch.cuda.device called for a CPU launch")

    t = torch.zeros(1)
    assert isinstance(fusion._device_guard(t), contextlib.nullcontext)
    if DEVICE == "cpu":
        monkeypatch.setattr(torch.cuda, "device", no_cuda)
        z = make_logits(5, 3, F32)
        p, w = fusion_fwd(z, tau_t(0.7), False, False)
        rp, rw = confidence_fusion_reference(z.double(), tau_t(0.7), fusion_space="prob")
        check(p, rp, F32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    # Inputs on cuda:1 while the current device is cuda:0: the launch must follow the tensors.
    z = make_logits(37, 7, F32).to("cuda:1")
    y = make_labels(37, F32).to("cuda:1")
    tau = torch.tensor(0.7, device="cuda:1")
    with torch.cuda.device(0):
        p, w = fusion_fwd(z, tau, False, False)
        gz, gt = fusion_bwd(p.new_ones(37), None, z, tau, False, False, True)
        loss, prob, g, _ = run_loss(z, y, tau, TERMS["all"], "prob", False, "none")
    torch.cuda.synchronize(1)
    rp, _ = confidence_fusion_reference(z.double().cpu(), tau.cpu(), fusion_space="prob")
    check(p, rp, F32, what="prob on cuda:1")
    check(prob, rp, F32, what="loss prob on cuda:1")
    assert torch.isfinite(gz).all() and torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------------
# Eager calls: below torch.library, the same results as the registered ops
# ---------------------------------------------------------------------------------------------
def _eager_and_registered(op):
    """(public call, the registered op with its registered autograd): each returns its outputs
    and the gradients of logits and temperature for fixed upstream gradients."""
    import cetnet_kernels as ck

    z0, y = make_logits(37, 5, F32), make_labels(37, F32)
    gp = torch.randn(37, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(call):
        z = z0.clone().requires_grad_()
        t = tau_t(0.7, F32).requires_grad_()
        outs = call(z, t)
        total = outs[0].sum() * 1.5 + (outs[1] * gp).sum()
        total.backward()
        return [o.detach() for o in outs[:2]] + [z.grad] + ([t.grad] if op != "kdef" else [])

    t_ops = torch.ops.cetnet
    if op == "fusion":
        return (lambda: run(lambda z, t: ck.confidence_fusion(z, t, backend="triton")[::-1]),
                lambda: run(lambda z, t: t_ops.confidence_fusion_triton(z, t, False, False)[::-1]))
    if op == "loss":
        w = dict(member_weight=0.7, distill_weight=0.3, mutual_weight=0.45)
        return (lambda: run(lambda z, t: ck.collaborative_loss(z, y, t, **w, backend="triton")),
                lambda: run(lambda z, t: t_ops.collaborative_loss_triton(
                    z, y, t, 1.0, 0.7, 0.3, 0.45, False, False, 1, True, True)[:2]))
    return (lambda: run(lambda z, t: ck.kdef_loss(z, y, backend="triton")),
            lambda: run(lambda z, t: t_ops.kdef_loss_triton(z, y, True)[:2]))


@pytest.mark.parametrize("op", ["fusion", "loss", "kdef"])
def test_eager_calls_skip_the_dispatcher_with_the_same_results(op):
    # Through the dispatcher a Python custom op and its Python autograd cost ~0.2 ms of host
    # time per training step; eager calls run the implementation and the same formulas below it.
    eager, registered = _eager_and_registered(op)
    name = {"fusion": "cetnet::confidence_fusion_triton",
            "loss": "cetnet::collaborative_loss_triton", "kdef": "cetnet::kdef_loss_triton"}[op]
    seen_eager, out_eager = dispatched_ops(eager)
    seen_op, out_op = dispatched_ops(registered)
    assert name in seen_op and name not in seen_eager
    assert not any(n.startswith("cetnet::") for n in seen_eager), seen_eager
    for a, b in zip(out_eager, out_op, strict=True):  # the same kernel launches and formulas
        assert torch.equal(a, b)


def test_eager_calls_without_grad_skip_the_dispatcher():
    import cetnet_kernels as ck

    z, y = make_logits(9, 3, F32), make_labels(9, F32)
    with torch.no_grad():
        seen, (loss, prob) = dispatched_ops(lambda: ck.collaborative_loss(z, y, backend="triton"))
    assert not any(n.startswith("cetnet::") for n in seen), seen
    ref, ref_p, _, _ = closs(z, y, tau_t(1.0, F32), 1.0, 1.0, 0.0, 0.0, False, False, 1, False,
                             False)
    assert torch.equal(loss, ref) and torch.equal(prob, ref_p)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@requires_expecttest
def test_opcheck():
    z = make_logits(5, 3, F32)
    y = make_labels(5, F32)
    tau = tau_t(0.8, F32)
    gp, gw = _upstream(5, 3, "both", F32)
    torch.library.opcheck(fusion_fwd.default, (z, tau, False, True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(fusion_bwd.default, (gp, gw, z, tau, True, False, True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(fusion_bwd.default, (None, gw, z, tau, False, False, True), test_utils=OPCHECK_UTILS)
    for red in (0, 2):
        torch.library.opcheck(
            closs.default, (z, y, tau, 1.0, 0.5, 0.3, 0.2, False, False, red, True, True), test_utils=OPCHECK_UTILS
        )
    torch.library.opcheck(
        closs.default, (z, y, tau, 1.0, 0.5, 0.3, 0.2, True, True, 1, False, False), test_utils=OPCHECK_UTILS
    )


def _compiled_loss_fn(z, y, tau):
    loss, p, gz, gt = torch.ops.cetnet.collaborative_loss_triton(
        z, y, tau, 1.0, 0.5, 0.3, 0.2, False, False, 1, True, True
    )
    return loss * 2.0, p + 1.0, gz / z.shape[0], gt


def _check_compiled(backend):
    torch._dynamo.reset()
    z = make_logits(37, 7, F32)
    y = make_labels(37, F32)
    tau = tau_t(0.7, F32)
    compiled = torch.compile(_compiled_loss_fn, fullgraph=True, backend=backend)
    for a, b in zip(compiled(z, y, tau), _compiled_loss_fn(z, y, tau)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph():
    # Under the interpreter the op is opaque to the graph (see fusion.py); on GPU (triton_op),
    # AOT dispatch decomposes it into the traced kernel launches.
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    # Inductor compiles the (CPU) wrapper code with a C++ compiler: ~20 s, hence `slow`.
    _check_compiled("inductor")
