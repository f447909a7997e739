"""Bad input gets a clear Python exception naming the argument — never a crash or wrong answer."""

from __future__ import annotations

import pytest
import torch

import cetnet_kernels as ck
from cetnet_kernels import CETNetFusion, collaborative_loss, confidence_fusion

from helpers import all_backend_params

BACKENDS = all_backend_params("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logits, exc, match",
    [
        (torch.randn(8), ValueError, "logits must be 2-D"),
        (torch.randn(2, 3, 4), ValueError, "logits must be 2-D"),
        (torch.randn(8, 0), ValueError, "K >= 1"),
        (torch.randint(0, 3, (8, 2)), TypeError, "logits must be float16"),
        (torch.randn(8, 2, dtype=torch.complex64), TypeError, "logits must be float16"),
        ([[0.1, 0.2]], TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_logits(backend, logits, exc, match):
    with pytest.raises(exc, match=match):
        confidence_fusion(logits, backend=backend)
    with pytest.raises(exc, match=match):
        collaborative_loss(logits, torch.rand(8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (torch.rand(7), ValueError, r"labels must have shape \[8\]"),
        (torch.rand(8, 2), ValueError, r"labels must have shape \[8\]"),
        (torch.tensor([0.5] * 7 + [1.5]), ValueError, r"labels must lie in \[0, 1\]; labels\[7\] = 1.5"),
        (torch.tensor([-0.1] + [0.5] * 7), ValueError, r"labels\[0\] = -0.1"),
        (torch.tensor([0.5] * 3 + [float("nan")] + [0.5] * 4), ValueError, r"labels\[3\] = nan"),
        ([0.0] * 8, TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_bad_labels(backend, labels, exc, match):
    with pytest.raises(exc, match=match):
        collaborative_loss(torch.randn(8, 3), labels, backend=backend)


def test_bad_label_found_in_a_large_batch():
    y = torch.rand(100_000)
    y[77_777] = 2.0
    with pytest.raises(ValueError, match=r"labels\[77777\] = 2"):
        collaborative_loss(torch.randn(100_000, 4), y)


def test_integer_and_column_labels_are_accepted():
    z = torch.randn(8, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    ref = collaborative_loss(z, y.float())[0]
    torch.testing.assert_close(collaborative_loss(z, y)[0], ref)
    torch.testing.assert_close(collaborative_loss(z, y.bool())[0], ref)
    torch.testing.assert_close(collaborative_loss(z, y.float()[:, None])[0], ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "temperature, exc, match",
    [
        (0.0, ValueError, "temperature must be finite and > 0"),
        (-1.0, ValueError, "temperature must be finite and > 0"),
        (float("nan"), ValueError, "temperature must be finite and > 0"),
        (float("inf"), ValueError, "temperature must be finite and > 0"),
        (torch.tensor(0.0), ValueError, "temperature must be finite and > 0"),
        (torch.tensor(float("nan")), ValueError, "temperature must be finite and > 0"),
        (torch.tensor([1.0, 2.0]), ValueError, "temperature must hold one value"),
        (torch.tensor(1), TypeError, "temperature must be a float or a floating-point tensor"),
        ("1.0", TypeError, "temperature must be a float or a tensor"),
    ],
)
def test_bad_temperature(backend, temperature, exc, match):
    with pytest.raises(exc, match=match):
        confidence_fusion(torch.randn(4, 2), temperature, backend=backend)
    with pytest.raises(exc, match=match):
        collaborative_loss(torch.randn(4, 2), torch.rand(4), temperature, backend=backend)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(reduction="avg"), ValueError, "reduction must be 'mean', 'sum' or 'none'"),
        (dict(fusion_space="log"), ValueError, "fusion_space must be 'prob' or 'logit'"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), ValueError, "backend 'cuda' needs CUDA tensors"),
        (dict(member_weight=-1.0), ValueError, "member_weight must be finite and >= 0"),
        (dict(distill_weight=float("nan")), ValueError, "distill_weight must be finite"),
        (dict(ensemble_weight="1"), TypeError, "ensemble_weight must be a float"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        collaborative_loss(torch.randn(4, 2), torch.rand(4), **kwargs)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("CETNET_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        confidence_fusion(torch.randn(4, 2))
    monkeypatch.setenv("CETNET_BACKEND", "reference")
    z = torch.randn(4, 2, requires_grad=True)
    p, _ = confidence_fusion(z)
    assert "cetnet" not in type(p.grad_fn).__name__.lower()  # autograd of plain torch ops
    # an explicit backend wins over the environment
    torch.testing.assert_close(confidence_fusion(torch.ones(3, 2), backend="reference")[0],
                               torch.sigmoid(torch.ones(3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_tensors_required_message():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        confidence_fusion(torch.randn(4, 2), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_devices_must_match():
    z = torch.randn(4, 2, device="cuda")
    with pytest.raises(ValueError, match="labels are on cpu but logits on cuda"):
        collaborative_loss(z, torch.rand(4))
    with pytest.raises(ValueError, match="temperature is on cuda"):
        confidence_fusion(torch.randn(4, 2), torch.tensor(1.0, device="cuda"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        collaborative_loss(z, torch.full((4,), 3.0, device="cuda"))


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
def test_direct_op_calls_are_checked_in_cpp():
    """torch.ops.cetnet.* called without the Python layer still refuse bad shapes (ValueError
    from TORCH_CHECK_VALUE) instead of reading out of bounds."""
    ops = torch.ops.cetnet
    t = torch.tensor(1.0)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.confidence_fusion(torch.randn(3), t, False, False)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.collaborative_loss(torch.randn(3, 2), torch.rand(4), t, 1., 1., 0., 0., False, False,
                               1, True, False)
    with pytest.raises(ValueError, match="reduction must be"):
        ops.collaborative_loss(torch.randn(3, 2), torch.rand(3), t, 1., 1., 0., 0., False, False,
                               7, True, False)
    with pytest.raises(ValueError, match="temperature must be finite"):
        ops.confidence_fusion(torch.randn(3, 2), torch.tensor(-1.0), False, False)
    with pytest.raises(ValueError, match="grad_weights must have shape"):
        ops.confidence_fusion_backward(None, torch.randn(3, 3), torch.randn(3, 2), None, t, False,
                                       False, True)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.confidence_fusion_backward(torch.randn(3), None, torch.randn(3, 2), torch.rand(3, 3), t,
                                       False, False, True)
    with pytest.raises(TypeError, match="weights must have the logits' dtype"):
        ops.confidence_fusion_backward(torch.randn(3), None, torch.randn(3, 2),
                                       torch.rand(3, 2, dtype=torch.float64), t, False, False, True)


def test_module_arguments():
    with pytest.raises(ValueError, match="num_models must be an int >= 1"):
        CETNetFusion(0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        CETNetFusion(2, temperature=0.0)
    m = CETNetFusion(3)
    with pytest.raises(ValueError, match=r"expected logits of 3 members"):
        m(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"member 1 output must be \[B\] or \[B, 1\]"):
        m([torch.randn(5), torch.randn(5, 2), torch.randn(5)])
