"""Bad input gets a clear Python exception naming the argument — never a crash or wrong answer."""

from __future__ import annotations

import pytest
import torch

import cetnet_kernels as ck
from cetnet_kernels import CETNetFusion, collaborative_loss, confidence_fusion

from conftest import DEVICES, backend_device_params

# (backend, device) pairs: the Python checks must give the same message on CUDA tensors.
CASES = backend_device_params()


def _on(x, device):
    """``x`` moved to ``device`` if it is a tensor (non-tensors test the type checks)."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("backend, device", CASES)
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
def test_bad_logits(backend, device, logits, exc, match):
    logits = _on(logits, device)
    with pytest.raises(exc, match=match):
        confidence_fusion(logits, backend=backend)
    with pytest.raises(exc, match=match):
        collaborative_loss(logits, torch.rand(8, device=device), backend=backend)


@pytest.mark.parametrize("backend, device", CASES)
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
def test_bad_labels(backend, device, labels, exc, match):
    with pytest.raises(exc, match=match):
        collaborative_loss(torch.randn(8, 3, device=device), _on(labels, device), backend=backend)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_found_in_a_large_batch(device):
    y = torch.rand(100_000)
    y[77_777] = 2.0
    with pytest.raises(ValueError, match=r"labels\[77777\] = 2"):
        collaborative_loss(torch.randn(100_000, 4, device=device), y.to(device))


@pytest.mark.parametrize("backend, device", CASES)
def test_integer_and_column_labels_are_accepted(backend, device):
    z = torch.randn(8, 3, device=device)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], device=device)
    ref = collaborative_loss(z, y.float(), backend=backend)[0]
    for labels in (y, y.bool(), y.float()[:, None]):
        torch.testing.assert_close(collaborative_loss(z, labels, backend=backend)[0].cpu(),
                                   ref.cpu())


@pytest.mark.parametrize("backend, device", CASES)
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
def test_bad_temperature(backend, device, temperature, exc, match):
    # a tensor temperature on the logits' device (a CUDA one is checked by the Python layer)
    temperature = _on(temperature, device)
    with pytest.raises(exc, match=match):
        confidence_fusion(torch.randn(4, 2, device=device), temperature, backend=backend)
    with pytest.raises(exc, match=match):
        collaborative_loss(torch.randn(4, 2, device=device), torch.rand(4, device=device),
                           temperature, backend=backend)


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
def test_cuda_devices_must_match():  # "cuda" in the name: selected by `pytest -m gpu`
    z = torch.randn(4, 2, device="cuda")
    with pytest.raises(ValueError, match="labels are on cpu but logits on cuda"):
        collaborative_loss(z, torch.rand(4))
    with pytest.raises(ValueError, match=r"labels are on cuda(:\d+)? but logits on cpu"):
        collaborative_loss(torch.randn(4, 2), torch.rand(4, device="cuda"))
    with pytest.raises(ValueError, match="temperature is on cuda"):
        confidence_fusion(torch.randn(4, 2), torch.tensor(1.0, device="cuda"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        collaborative_loss(z, torch.full((4,), 3.0, device="cuda"))
    # a CPU temperature tensor goes to the logits' device (a learnable one keeps its gradient)
    t = torch.tensor(0.7, requires_grad=True)
    confidence_fusion(z, t)[0].sum().backward()
    assert t.grad is not None and t.grad.device.type == "cpu"
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        confidence_fusion(z, backend="cpu")


@pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_calls_are_checked_in_cpp(device):
    """torch.ops.cetnet.* called without the Python layer still refuse bad shapes (ValueError
    from TORCH_CHECK_VALUE) instead of reading out of bounds; the CUDA kernels share the checks
    (csrc/checks.h), except the temperature's value, which only the CPU kernel reads (on a GPU
    it would cost a host sync: the Python layer checks it)."""
    if device == "cuda" and not ck.build_info()["cuda"]:
        pytest.skip("extension built without CUDA")
    ops = torch.ops.cetnet

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device)

    t = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.confidence_fusion(r(3), t, False, False)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.collaborative_loss(r(3, 2), r(4).sigmoid(), t, 1., 1., 0., 0., False, False,
                               1, True, False)
    with pytest.raises(ValueError, match="reduction must be"):
        ops.collaborative_loss(r(3, 2), r(3).sigmoid(), t, 1., 1., 0., 0., False, False,
                               7, True, False)
    if device == "cpu":
        with pytest.raises(ValueError, match="temperature must be finite"):
            ops.confidence_fusion(r(3, 2), torch.tensor(-1.0), False, False)
    with pytest.raises(ValueError, match="grad_weights must have shape"):
        ops.confidence_fusion_backward(None, r(3, 3), r(3, 2), None, t, False, False, True)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.confidence_fusion_backward(r(3), None, r(3, 2), r(3, 3).sigmoid(), t,
                                       False, False, True)
    with pytest.raises(TypeError, match="weights must have the logits' dtype"):
        ops.confidence_fusion_backward(r(3), None, r(3, 2), r(3, 2, dtype=torch.float64).sigmoid(),
                                       t, False, False, True)


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
    with pytest.raises(ValueError, match=r"member 2 output has 6 rows, member 0's 5: the "
                                         r"members must score the same batch"):
        m([torch.randn(5), torch.randn(5, 1), torch.randn(6)])
