"""cetnet::kdef_loss_triton (cetnet_kernels/triton/kdef.py) against the float64 reference
``kdef_loss_reference`` (loss, teacher, and the autograd gradient of the reference loss).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the shapes are small; with a GPU the same tests
run on CUDA tensors (compiled kernels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cetnet_kernels import available_backends
from cetnet_kernels.reference import kdef_loss_reference
from helpers import lowp_tolerance_ok, requires_expecttest

DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if "triton" in available_backends(d)]
pytestmark = pytest.mark.skipif(not DEVICES, reason="the triton backend cannot run here")
if DEVICES:
    from cetnet_kernels.triton import kdef

    kdef_op = torch.ops.cetnet.kdef_loss_triton

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# Under the interpreter (numpy, one code path) other layouts give bitwise equal results; compiled
# kernels specialize on strides (vector widths, reduction trees).
device_param = pytest.mark.parametrize("device", DEVICES)


def make_inputs(B, K, *, dtype=F64, device="cpu", scale=3.0, soft=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=F64) * scale
    y = torch.rand(B, generator=g, dtype=F64) if soft else \
        torch.randint(0, 2, (B,), generator=g).double()
    return z.to(device=device, dtype=dtype), y.to(device)


def reference(z, y):
    """float64 loss, teacher and d loss / d z of the reference, on CPU."""
    z64 = z.detach().double().cpu().requires_grad_()
    loss, teacher = kdef_loss_reference(z64, y.detach().double().cpu())
    (grad,) = torch.autograd.grad(loss, z64)
    return loss.detach(), teacher, grad


def close(ours, ref, rtol, what):
    """|ours - ref| <= rtol * max(|ref|) elementwise (the gradient's entries span magnitudes)."""
    ours = ours.detach().double().cpu()
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-300)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def check_contract(z, loss, teacher, grad, compute_grad=True):
    B, K = z.shape
    acc = F64 if z.dtype == F64 else F32
    assert loss.shape == () and loss.dtype == acc and loss.device == z.device
    assert teacher.shape == (B,) and teacher.dtype == z.dtype and teacher.is_contiguous()
    if compute_grad:
        assert grad.shape == (B, K) and grad.dtype == z.dtype and grad.is_contiguous()
    else:
        assert grad.shape == (0,) and grad.dtype == z.dtype


def check_against_reference(z, y, rtol):
    loss, teacher, grad = kdef_op(z, y, True)
    check_contract(z, loss, teacher, grad)
    r_loss, r_teacher, r_grad = reference(z, y)
    close(loss, r_loss, rtol, "loss")
    close(teacher, r_teacher, rtol, "teacher")
    close(grad, r_grad, rtol, "grad")
    return loss, teacher, grad


# ---------------------------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------------------------
@device_param
@pytest.mark.parametrize("K", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("B", [1, 3, 37, 130])
def test_float64_odd_shapes(device, B, K):
    z, y = make_inputs(B, K, device=device, soft=(B + K) % 2 == 0, seed=B * 100 + K)
    check_against_reference(z, y, 1e-10)


@device_param
@pytest.mark.parametrize("B,K", [(37, 7), (130, 16), (5, 1)])
def test_float32(device, B, K):
    z, y = make_inputs(B, K, dtype=F32, device=device, seed=3)
    check_against_reference(z, y, 1e-5)


@device_param
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_low_precision(device, dtype):
    z, y = make_inputs(37, 7, dtype=dtype, device=device, seed=4)
    loss, teacher, grad = check_against_reference(z, y, 1e-2)
    # flash-attention rule: at most 2x the error of the reference computed in float32 from the
    # same low-precision inputs (plus a small slack), each against float64.
    r_loss, r_teacher, r_grad = reference(z, y)
    zl = z.detach().cpu().requires_grad_()
    l_loss, l_teacher = kdef_loss_reference(zl, y.cpu())
    (l_grad,) = torch.autograd.grad(l_loss, zl)
    for what, ours, low, ref in [("loss", loss, l_loss, r_loss), ("teacher", teacher, l_teacher,
                                 r_teacher), ("grad", grad, l_grad, r_grad)]:
        ok, err, base = lowp_tolerance_ok(ours.cpu(), low.detach(), ref,
                                          atol=1e-5 * ref.abs().max().item())
        assert ok, f"{what}: error {err:.3g} > 2 x reference's {base:.3g}"


@device_param
def test_extreme_logits(device):
    # |z| up to 100 (p rounds to 0 or 1 in float32; the stable sigmoid keeps q = 1 - p exact),
    # exact zeros, and one member that is always sure.
    z, y = make_inputs(37, 5, device=device, scale=4.0, soft=False, seed=5)
    g = torch.Generator().manual_seed(6)
    big = (torch.rand(37, 5, generator=g, dtype=F64) * 70 + 30) \
        * torch.randn(37, 5, generator=g).sign()
    z = torch.where((torch.rand(37, 5, generator=g) < 0.4).to(device), big.to(device), z)
    z[:, 0] = 100.0
    z[3, :] = 0.0
    check_against_reference(z, y, 1e-10)
    check_against_reference(z.float(), y, 1e-5)


@device_param
def test_k1_is_bce_with_logits_mean(device):
    z, y = make_inputs(37, 1, device=device, seed=7)
    loss, teacher, grad = kdef_op(z, y, True)
    zz = z.detach().clone().requires_grad_()
    bce = F.binary_cross_entropy_with_logits(zz[:, 0], y)
    (g,) = torch.autograd.grad(bce, zz)
    close(loss, bce.detach().cpu(), 1e-12, "loss")
    close(teacher, torch.sigmoid(z[:, 0]).cpu(), 1e-12, "teacher")
    close(grad, g.cpu(), 1e-12, "grad")


@device_param
def test_several_member_tiles(device):
    # K = 40: BLOCK_K = 64 holds a [32, 64] accumulator, so two programs per row chunk share the
    # members i (the loaded [rows, BLOCK_I] slice path).
    z, y = make_inputs(9, 40, device=device, seed=8)
    br, bi, bk, n_tiles, *_ = kdef._reduce_plan(9, 40)
    assert bi < bk and n_tiles == 2
    check_against_reference(z, y, 1e-10)
    check_against_reference(z.float(), y, 1e-5)


@device_param
def test_several_row_tiles_per_chunk(device, monkeypatch):
    # Few programs: each chunk loops over several row tiles, the last one partly past B.
    z, y = make_inputs(130, 7, device=device, seed=9)
    ref = kdef_op(z, y, True)
    monkeypatch.setattr(kdef, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(kdef, "_MAX_BLOCK_R", 8)
    br, bi, bk, n_tiles, rows_per_chunk, n_chunks, _ = kdef._reduce_plan(130, 7)
    assert (br, n_chunks, rows_per_chunk) == (8, 1, 136)
    out = check_against_reference(z, y, 1e-10)
    for a, b in zip(out, ref):
        close(a, b.double().cpu(), 1e-13, "another chunking")


# ---------------------------------------------------------------------------------------------
# Layouts, labels, flags, edge cases
# ---------------------------------------------------------------------------------------------
@device_param
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("K", [7, 8])  # 8 = BLOCK_K: contiguous rows take a constant stride
def test_non_contiguous_logits_and_labels(device, dtype, K):
    z, y = make_inputs(37, K, dtype=dtype, device=device, seed=10)
    base = kdef_op(z, y, True)
    zt = z.t().contiguous().t()  # column-major view: stride (1, B)
    zs = torch.empty(37, 2 * K + 6, dtype=dtype, device=device)[:, 3:3 + 2 * K:2]  # (2K+6, 2)
    zs.copy_(z)
    ys = torch.empty(74, dtype=F64, device=device)[::2]
    ys.copy_(y)
    assert not zt.is_contiguous() and not zs.is_contiguous() and not ys.is_contiguous()
    bitwise = device == "cpu"  # the interpreter; compiled kernels specialize on strides
    for zz, yy in [(zt, y), (zs, ys)]:
        out = kdef_op(zz, yy, True)
        check_contract(zz, *out)
        for a, b in zip(out, base):
            if bitwise:
                assert torch.equal(a, b)
            else:
                close(a, b.double().cpu(), 1e-5 if dtype == F32 else 1e-12, "layout")


@device_param
def test_soft_hard_and_low_precision_labels(device):
    z, y = make_inputs(37, 7, device=device, soft=True, seed=11)
    check_against_reference(z, y, 1e-10)
    check_against_reference(z, y.half(), 1e-10)  # labels of another float dtype
    y = torch.where(torch.arange(37, device=device) % 3 == 0, 0.5, y.round())  # hard + 0.5
    check_against_reference(z, y, 1e-10)
    # labels equal to p exactly (sgn(0) = 0, as torch.abs's gradient)
    z = torch.zeros(5, 3, dtype=F64, device=device)
    check_against_reference(z, torch.full((5,), 0.5, dtype=F64, device=device), 1e-12)


@device_param
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_compute_grad_false(device, dtype):
    z, y = make_inputs(37, 7, dtype=dtype, device=device, seed=12)
    loss, teacher, grad = kdef_op(z, y, False)
    check_contract(z, loss, teacher, grad, compute_grad=False)
    loss2, teacher2, _ = kdef_op(z, y, True)
    assert torch.equal(loss, loss2) and torch.equal(teacher, teacher2)


@device_param
@pytest.mark.parametrize("dtype", [F64, F32, F16])
@pytest.mark.parametrize("K", [1, 5])
def test_empty_batch(device, dtype, K):
    z = torch.empty(0, K, dtype=dtype, device=device)
    y = torch.empty(0, dtype=dtype, device=device)
    for compute_grad in (True, False):
        loss, teacher, grad = kdef_op(z, y, compute_grad)
        check_contract(z, loss, teacher, grad, compute_grad)
        assert loss.item() == 0.0
    assert kdef_loss_reference(z.double(), y.double())[0].item() == 0.0


@device_param
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_deterministic(device, dtype):
    z, y = make_inputs(130, 16, dtype=dtype, device=device, seed=13)
    a = kdef_op(z, y, True)
    b = kdef_op(z, y, True)
    for x1, x2 in zip(a, b):
        assert torch.equal(x1, x2)


@device_param
def test_nan_logit_poisons_the_loss(device):
    z, y = make_inputs(9, 3, device=device, seed=14)
    z[4, 1] = float("nan")
    loss, teacher, grad = kdef_op(z, y, True)
    assert loss.isnan()
    assert teacher[4].isnan() and not teacher[torch.arange(9, device=device) != 4].isnan().any()


@device_param
def test_bad_input(device):
    z, y = make_inputs(2, 3, device=device)
    with pytest.raises(ValueError, match=r"triton backend handles at most 1024 members.*1025"):
        kdef_op(torch.zeros(2, 1025, device=device), y, True)
    with pytest.raises(ValueError, match="2-D"):
        kdef_op(z[0], y, True)
    with pytest.raises(ValueError, match="at least one member"):
        kdef_op(z[:, :0], y, True)
    with pytest.raises(ValueError, match="labels must have shape"):
        kdef_op(z, y[:1], True)
    with pytest.raises(TypeError, match="labels must be floating point"):
        kdef_op(z, y.long(), True)


@requires_expecttest
@device_param
def test_opcheck(device):
    z, y = make_inputs(5, 3, device=device, seed=15)
    torch.library.opcheck(kdef_op, (z, y, True))
    torch.library.opcheck(kdef_op, (z.float(), y.float(), False))
