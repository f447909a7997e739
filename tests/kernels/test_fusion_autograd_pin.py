"""The backward formulas of confidence_fusion and collaborative_loss live twice: in C++
(csrc/autograd.cpp, the autograd of the compiled "cpu"/"cuda" ops) and in Python
(cetnet_kernels/fusion.py ``_register_autograd``, the autograd of the "triton" ops). This file pins
the two against each other on the same forward kernels: the compiled ops are registered once more
under a test namespace, with the Python autograd, and every gradient (logits, temperature; through
the loss, the fused prob and the weights; every reduction, term, fusion space, detach_weights,
with and without a learnable temperature) matches the one through the C++ autograd."""

from __future__ import annotations

import pytest
import torch

from cetnet_kernels import fusion as ck_fusion
from cetnet_kernels.codes import REDUCTION_CODES
from conftest import backend_device_params
from helpers import TERMS, make_logits, sample_inputs

CASES = backend_device_params(backends=("cpu", "cuda"))
NS = "cetnet_autograd_pin"
WEIGHT_NAMES = ("ensemble_weight", "member_weight", "distill_weight", "mutual_weight")
_LIB: list = []  # the test library, kept alive once defined


def _python_autograd_ops():
    """torch.ops.cetnet_autograd_pin.{confidence_fusion, collaborative_loss}: the compiled ops
    (same schema, same kernels) with the Python autograd of cetnet_kernels.fusion."""
    if not _LIB:
        cet = torch.ops.cetnet
        lib = torch.library.Library(NS, "DEF")
        for name in ("confidence_fusion", "collaborative_loss"):
            op = getattr(cet, name).default
            lib.define(str(op._schema).split("::", 1)[1])
            lib.impl(name, (lambda op: lambda *args: op(*args))(op), "CompositeExplicitAutograd")
        pin = torch.ops.cetnet_autograd_pin

        def fusion_backward(grad_prob, grad_weights, logits, temperature, logit_space,
                            detach_weights, want_t):  # the triton schema: no saved weights
            return cet.confidence_fusion_backward.default(grad_prob, grad_weights, logits, None,
                                                          temperature, logit_space,
                                                          detach_weights, want_t)

        ck_fusion._register_autograd(
            ck_fusion._OpSet(pin.confidence_fusion.default, fusion_backward,
                             pin.collaborative_loss.default),
            (f"{NS}::confidence_fusion", f"{NS}::collaborative_loss"))
        _LIB.append(lib)
    return torch.ops.cetnet_autograd_pin


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("detach", [False, True])
def test_collaborative_loss_cpp_and_python_autograd_agree(backend, device, dtype, reduction,
                                                          space, detach):
    ops = (torch.ops.cetnet.collaborative_loss, _python_autograd_ops().collaborative_loss)
    z, y, tau = sample_inputs(device, dtype=dtype)
    code = int(REDUCTION_CODES[reduction])
    g_loss = torch.randn(z.shape[0] if reduction == "none" else (), dtype=torch.float64)
    g_prob = torch.randn(z.shape[0], dtype=torch.float64)
    for terms in TERMS.values():
        w = [float(terms.get(n, 0.0)) for n in WEIGHT_NAMES]
        for learn_t in (False, True):
            for through_prob in (False, True):
                grads = []
                for op in ops:
                    zl = z.clone().requires_grad_()
                    t = tau.clone().requires_grad_(learn_t)
                    loss, prob, _, _ = op(zl, y, t, *w, space == "logit", detach, code, True,
                                          learn_t)
                    total = (loss * g_loss.to(loss)).sum()
                    if through_prob:
                        total = total + (prob * g_prob.to(prob)).sum()
                    inputs = [zl, t] if learn_t else [zl]
                    # (detached weights: the temperature gets no gradient, None)
                    grads.append(torch.autograd.grad(total, inputs, allow_unused=True))
                if learn_t:
                    assert (grads[0][1] is None) == (grads[1][1] is None) == detach
                for cpp, py in zip(*grads):
                    if cpp is not None:
                        torch.testing.assert_close(py, cpp, **_tol(dtype))


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("which", ["prob", "weights", "both"])
def test_confidence_fusion_cpp_and_python_autograd_agree(backend, device, dtype, space, detach,
                                                         which):
    ops = (torch.ops.cetnet.confidence_fusion, _python_autograd_ops().confidence_fusion)
    z, _y, tau = sample_inputs(device, dtype=dtype)
    g_prob = torch.randn(z.shape[0], dtype=torch.float64)
    g_w = torch.randn(z.shape, dtype=torch.float64)
    for learn_t in (False, True):
        grads = []
        for op in ops:
            zl = z.clone().requires_grad_()
            t = tau.clone().requires_grad_(learn_t)
            prob, weights = op(zl, t, space == "logit", detach)
            total = 0
            if which in ("prob", "both"):
                total = total + (prob * g_prob.to(prob)).sum()
            if which in ("weights", "both"):
                total = total + (weights * g_w.to(weights)).sum()
            inputs = [zl, t] if learn_t else [zl]
            grads.append(torch.autograd.grad(total, inputs, allow_unused=True))
        for cpp, py in zip(*grads):
            if cpp is None or py is None:  # detached weights: no gradient through them
                assert cpp is None or float(cpp.abs().sum()) == 0
                assert py is None or float(py.abs().sum()) == 0
                continue
            torch.testing.assert_close(py, cpp, **_tol(dtype))


def test_pin_covers_a_reference_value():
    """Both autograds also match the float64 reference (so agreeing is not agreeing on a wrong
    formula): one case, the loss with every term and a learnable temperature, on CPU."""
    from helpers import reference_loss_grads

    if "cpu" not in [p.values[0] for p in CASES if not p.marks]:
        pytest.skip("cetnet_kernels was built without the cpu kernels")
    z = make_logits(9, 4)
    y = (torch.rand(9, dtype=torch.float64) > 0.5).double()
    w = [TERMS["all"][n] for n in WEIGHT_NAMES]
    _loss, _prob, gz_ref, gt_ref = reference_loss_grads(z, y, 0.7, **TERMS["all"])
    for op in (torch.ops.cetnet.collaborative_loss, _python_autograd_ops().collaborative_loss):
        zl = z.clone().requires_grad_()
        t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        loss, _p, _, _ = op(zl, y, t, *w, False, False, int(REDUCTION_CODES["mean"]), True, True)
        gz, gt = torch.autograd.grad(loss, [zl, t])
        torch.testing.assert_close(gz, gz_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gt, gt_ref, rtol=1e-10, atol=1e-12)
