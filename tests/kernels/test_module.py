"""CETNetFusion as a drop-in layer over other people's models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cetnet_kernels import (CETNetFusion, collaborative_loss, confidence_fusion,
                            confidence_fusion_reference)

from conftest import backend_device_params
from helpers import synchronizing_ops

# (backend, device) pairs: "cpu-cpu", "reference-cuda", "cuda-cuda", "triton-cuda", ...
CASES = backend_device_params()


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **tol)


class TinyCTR(nn.Module):
    """Someone else's CTR model: embeddings + MLP, returns a [B, 1] logit."""

    def __init__(self, vocab: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids).flatten(1))


@pytest.mark.parametrize("backend, device", CASES)
def test_list_and_tensor_inputs_agree(backend, device):
    fusion = CETNetFusion(3, temperature=0.5, distill_weight=0.1, backend=backend)
    outs = [t.to(device) for t in (torch.randn(10), torch.randn(10, 1), torch.randn(10))]
    stacked = torch.stack([outs[0], outs[1][:, 0], outs[2]], dim=1)
    y = torch.randint(0, 2, (10,)).to(device)
    a, b = fusion(outs, y), fusion(stacked, y)
    assert a.loss.device.type == a.prob.device.type == device
    _close(a.loss, b.loss)
    _close(a.prob, b.prob)
    ref_loss, ref_prob = collaborative_loss(stacked, y, 0.5, distill_weight=0.1, backend=backend)
    _close(a.loss, ref_loss)
    # weights are produced lazily with labels, eagerly without; both match the op
    _close(a.weights, confidence_fusion(stacked, 0.5, backend=backend)[1])
    no_labels = fusion(outs)
    assert no_labels.loss is None
    _close(no_labels.prob, ref_prob)
    _close(no_labels.member_probs, torch.sigmoid(stacked))
    # and the module agrees with the float64 reference on CPU (float32 rule)
    ref64, _ = collaborative_loss(stacked.double().cpu(), y.cpu(), 0.5, distill_weight=0.1,
                                  backend="reference")
    _close(a.loss.double(), ref64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bounds", [(0.5, 4.0), None], ids=["bounded", "unbounded"])
@pytest.mark.parametrize("backend, device", CASES)
def test_learnable_temperature_gets_gradient_and_stays_positive(backend, device, bounds):
    fusion = CETNetFusion(2, temperature=2.0, learnable_temperature=True, backend=backend,
                          temperature_range=bounds)
    fusion = fusion.to(device)
    param = fusion.temperature_logit if bounds else fusion.log_temperature
    assert [n for n, _ in fusion.named_parameters()] == (
        ["temperature_logit"] if bounds else ["log_temperature"])
    assert param.device.type == device
    assert abs(float(fusion.temperature.detach()) - 2.0) < 1e-6
    opt = torch.optim.SGD(fusion.parameters(), lr=5.0)
    z = torch.randn(256, 2) * 3
    y = (torch.rand(256) < torch.sigmoid(z[:, 0])).float()  # member 0 is the informative one
    z, y = z.to(device), y.to(device)
    for _ in range(20):
        opt.zero_grad()
        out = fusion(z, y)
        out.loss.backward()
        assert param.grad is not None
        opt.step()
    assert float(fusion.temperature.detach()) > 0
    assert float(fusion.temperature.detach()) != 2.0
    state = fusion.state_dict()
    clone = CETNetFusion(2, learnable_temperature=True, temperature_range=bounds)
    clone.load_state_dict(state)  # a CUDA state dict loads into a CPU module too
    clone_param = clone.temperature_logit if bounds else clone.log_temperature
    assert torch.equal(clone_param.detach(), param.detach().cpu())
    assert abs(float(clone.temperature.detach()) - float(fusion.temperature.detach())) <= (
        1e-6 * float(clone.temperature.detach()))  # exp on CPU vs on the device: an ulp or two


def test_a_bounded_temperature_stays_in_its_range():
    for sign in (1.0, -1.0):  # push it far down / far up
        fusion = CETNetFusion(2, learnable_temperature=True)  # the default range (0.5, 4)
        assert fusion.temperature_range == (0.5, 4.0)
        assert "learnable in (0.5, 4.0)" in repr(fusion)
        opt = torch.optim.SGD(fusion.parameters(), lr=100.0)
        for _ in range(50):
            opt.zero_grad()
            (sign * fusion.temperature).backward()
            opt.step()
        t = float(fusion.temperature.detach())
        assert 0.5 <= t <= 4.0 and abs(t - (0.5 if sign > 0 else 4.0)) < 1e-3


def test_temperature_range_is_checked_and_state_dicts_do_not_mix():
    for bad in [(1.0, 4.0), (0.5, 1.0), (0.0, 4.0), (0.5, math.inf), (2.0, 0.5), (0.5,),
                "0.5,4", (True, 4.0)]:
        with pytest.raises(ValueError, match="temperature_range"):
            CETNetFusion(2, learnable_temperature=True, temperature_range=bad)
    fixed = CETNetFusion(2, temperature=0.1, temperature_range=(0.5, 4.0))  # ignored when fixed
    assert fixed.temperature == 0.1 and not list(fixed.parameters())
    unbounded = CETNetFusion(2, learnable_temperature=True, temperature_range=None)
    with pytest.raises(RuntimeError, match="temperature_logit|log_temperature"):
        CETNetFusion(2, learnable_temperature=True).load_state_dict(unbounded.state_dict())


def test_a_learned_temperature_keeps_its_bounds_in_the_state():
    """temperature_logit is a temperature only within its range: a state loaded into a module
    of another range would change the learned temperature silently (0.501 -> 0.100), so the
    state keeps the bounds and another range is refused, in half precision too; a state saved
    before it kept them still loads."""
    trained = CETNetFusion(2, learnable_temperature=True)
    with torch.no_grad():
        trained.temperature_logit.fill_(-3.0)
    state = trained.state_dict()
    assert state["temperature_bounds"].tolist() == [0.5, 4.0]
    same = CETNetFusion(2, learnable_temperature=True)
    same.load_state_dict(state)
    assert float(same.temperature) == float(trained.temperature)
    other = CETNetFusion(2, learnable_temperature=True, temperature_range=(0.1, 10.0))
    with pytest.raises(RuntimeError, match=r"temperature_range \(0.5, 4.0\), but this module's "
                                           r"range is \(0.1, 10.0\).*temperature_range="
                                           r"\(0.5, 4.0\)"):
        other.load_state_dict(state)
    half = CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 7.0)).half()
    CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 7.0)).half() \
        .load_state_dict(half.state_dict())  # its bounds rounded to half precision: the same
    with pytest.raises(RuntimeError, match="temperature_range"):
        CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 7.05)).half() \
            .load_state_dict(half.state_dict())
    before = {k: v for k, v in state.items() if k != "temperature_bounds"}
    same.load_state_dict(before)  # strict: the bounds are not a missing key
    # a state that went through a cast (rounded bounds) loads, and the module keeps its own
    # bounds: its state loads into the next module of that range (it did not: the rounded
    # copy, compared in float64, was "another range")
    for cast in (torch.float16, torch.bfloat16, torch.float64):
        first = CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 3.0))
        second = CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 3.0))
        second.load_state_dict(first.to(cast).state_dict())
        assert second.temperature_bounds.tolist() == torch.tensor([0.3, 3.0]).tolist()
        CETNetFusion(2, learnable_temperature=True, temperature_range=(0.3, 3.0)) \
            .load_state_dict(second.state_dict())


@pytest.mark.parametrize("labels", [True, False])
def test_an_outputs_weights_are_those_of_its_forward(labels):
    """FusionOutput.weights (computed on first access when the loss kernel ran) are the
    forward's: they were computed with the module's temperature at access, so reading them
    after the optimizer step (the usual place to log them) gave other weights."""
    fusion = CETNetFusion(2, learnable_temperature=True)
    opt = torch.optim.SGD(fusion.parameters(), lr=100.0)
    z, y = torch.tensor([[3.0, 0.1], [-2.0, 0.5]]), torch.tensor([1.0, 0.0])
    expected = confidence_fusion_reference(z, fusion.temperature.detach())[1]
    out = fusion(z, y if labels else None)
    (out.loss if labels else out.prob.sum()).backward()
    opt.step()
    assert abs(float(fusion.temperature) - 1.0) > 0.05  # it moved
    torch.testing.assert_close(out.weights, expected, rtol=1e-6, atol=1e-7)
    # made as before, with the module: its weights at the module's settings when read
    from cetnet_kernels import FusionOutput

    made = FusionOutput(out.prob, z, None, out.loss, fusion)
    now = confidence_fusion_reference(z, fusion.temperature.detach())[1]
    torch.testing.assert_close(made.weights, now, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"temperature": True}, ValueError, "temperature must be finite and > 0"),
    ({"ensemble_weight": -1.0}, ValueError, "ensemble_weight must be finite and >= 0"),
    ({"mutual_weight": math.nan}, ValueError, "mutual_weight must be finite and >= 0"),
    ({"member_weight": "a"}, TypeError, "member_weight must be a float"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"detach_weights": "no"}, TypeError, "detach_weights must be a bool"),
    ({"learnable_temperature": 1}, TypeError, "learnable_temperature must be a bool"),
])
def test_constructor_arguments_are_checked_when_given(kwargs, error, message):
    """Bad settings fail at construction, naming the argument (not at the first forward with
    labels, or never when the module is only used for predictions)."""
    with pytest.raises(error, match=f"CETNetFusion: {message}"):
        CETNetFusion(2, **kwargs)


# 60 steps of 2048 rows: too slow for the Triton interpreter.
@pytest.mark.parametrize("backend, device", backend_device_params(skip_triton_interpreter=True))
def test_drop_in_ensemble_of_two_models_trains(backend, device):
    torch.manual_seed(0)
    n, vocab = 2048, 50
    ids = torch.randint(0, vocab, (n, 2))
    # planted interaction: click when the two ids are "compatible"
    y = (((ids[:, 0] * 7 + ids[:, 1] * 3) % 5) < 2).float()
    ids, y = ids.to(device), y.to(device)
    a, b = TinyCTR(vocab, 8, 16).to(device), TinyCTR(vocab, 4, 32).to(device)
    fusion = CETNetFusion(2, mutual_weight=0.1, backend=backend).to(device)
    params = [*a.parameters(), *b.parameters(), *fusion.parameters()]
    opt = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        out = fusion([a(ids), b(ids)], y)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # both members received gradient and the fused prediction is a probability
    assert all(p.grad is not None for p in params)
    assert out.prob.device.type == device
    assert ((out.prob >= 0) & (out.prob <= 1)).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_reduction_none_and_backend_choice(backend, device):
    fusion = CETNetFusion(2, reduction="none", backend=backend)
    out = fusion(torch.randn(7, 2).to(device), torch.rand(7).to(device))
    assert out.loss.shape == (7,) and out.loss.device.type == device
    assert "num_models=2" in repr(fusion)


@pytest.mark.parametrize("backend, device",
                         backend_device_params(backends=("triton", "reference", "cuda")))
@pytest.mark.parametrize("learnable", [False, True])
def test_validate_false_never_waits_for_the_device(backend, device, learnable):
    """CETNetFusion(validate=True) (the default) checks the labels and a learnable
    temperature's value on the non-CPU backends: a host synchronization per step on a GPU, seen
    here; validate=False (what build_model's models use: their datasets validated the labels)
    leaves both out: the loss, its backward and the fusion alone run no synchronizing op."""
    torch.manual_seed(0)
    z = torch.randn(16, 3, device=device, requires_grad=True)
    y = (torch.rand(16, device=device) < 0.5).float()
    for validate in (True, False):
        fusion = CETNetFusion(3, learnable_temperature=learnable, mutual_weight=0.1,
                              backend=backend, validate=validate).to(device)

        def step():
            fusion(z, y).loss.backward()
            fusion(z).prob.sum().backward()

        step()  # (first calls: cached constants)
        seen = synchronizing_ops(step)
        assert bool(seen) == validate, (validate, seen)
    with pytest.raises(ValueError, match="labels must lie in"):  # validate=True still checks
        CETNetFusion(3, backend=backend).to(device)(z, y + 2.0)


def test_the_synchronization_detector_sees_what_a_cpu_run_hides():
    """helpers.synchronizing_ops, on CPU tensors: reads of a value, boolean-mask indexing,
    tolist / numpy / cpu (no op is dispatched for those on the CPU) are seen; plain arithmetic,
    integer indexing and a device-side where are not; the patched methods are restored."""
    x = torch.arange(6.0)
    mask = x > 2
    assert synchronizing_ops(lambda: (x * 2 + 1, x[torch.tensor([0, 2])],
                                      torch.where(mask, x, 0.0))) == ["aten::lift_fresh"]
    assert synchronizing_ops(lambda: x[mask]) == ["aten::index (boolean mask)"]
    assert synchronizing_ops(lambda: x.clone().index_put_((mask,), torch.zeros(()))) == [
        "aten::index_put_ (boolean mask)"]
    assert synchronizing_ops(lambda: (x.tolist(), x.numpy(), x.cpu(), float(x[0]))) == [
        "Tensor.tolist", "Tensor.numpy", "Tensor.cpu", "aten::_local_scalar_dense"]
    assert "tolist" not in torch.Tensor.__dict__ and x.tolist() == [0, 1, 2, 3, 4, 5]
