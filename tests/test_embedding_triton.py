"""MultiTableEmbedding(backend="triton") against the float64 reference: every input kind,
pooling, mixed/odd/dim-1 dims, dense gradient, fused SGD and row-wise Adagrad over several steps
with repeated and hot ids, determinism and bad input. Without a GPU the kernels run in the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from cetnet_kernels import MultiTableEmbedding, available_backends
from helpers import requires_expecttest
from embedding_support import (FEATURES, adagrad_matches_hand_written, batches,
                               compile_matches_eager, loss_of, make_ids, reference_outputs,
                               sgd_matches_torch_optim, to_device, with_bad_id)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = "triton" in available_backends(DEVICE)
if HAVE_TRITON:
    import triton
    import triton.language as tl

    from cetnet_kernels.triton.embedding import _state_index

pytestmark = pytest.mark.skipif(not HAVE_TRITON,
                                reason=f"the triton backend cannot run on {DEVICE} here")


def _to(ids, device=DEVICE):
    return to_device(ids, device)


def _cpu(ids):
    return _to(ids, "cpu")


def _module(M, dims, **kw):
    return MultiTableEmbedding(M, FEATURES, dims, backend="triton", device=DEVICE, **kw)


def _reference(mod, ids, w64=None):
    """The float64 reference on CPU copies."""
    if w64 is None:
        w64 = mod.weight.detach().double().cpu()
    return reference_outputs(mod, _cpu(ids), w64)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6),
                                       (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_forward_every_input_kind(dtype, tol):
    mod = _module(3, [1, 10, 16], weights_dtype=dtype)
    ids = _to(make_ids())
    outs = mod(ids)
    for m, (o, r) in enumerate(zip(outs, _reference(mod, ids))):
        assert o.shape == (6, 10, [1, 10, 16][m]) and o.is_contiguous()
        assert o.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        torch.testing.assert_close(o.double().cpu(), r, rtol=tol, atol=tol)
    for o in outs:  # padding and the empty bag give zeros
        assert torch.all(o[0, 5:7] == 0) and torch.all(o[2, 2] == 0) and torch.all(o[1, 7] == 0)


def test_single_and_odd_dims_int32_no_padding():
    for dims, pad in (([1], -1), ([7, 1, 33], None)):
        mod = MultiTableEmbedding(len(dims), [("a", 100), ("b", 3, "mean")], dims,
                                  weights_dtype=torch.float64, backend="triton", device=DEVICE,
                                  padding_idx=pad)
        ids = {"a": torch.randint(0, 100, (37,), dtype=torch.int32, device=DEVICE),
               "b": (torch.randint(0, 3, (50,), device=DEVICE),
                     torch.tensor([0] + sorted(np.random.default_rng(0).integers(0, 50, 36)
                                               .tolist()) + [50], device=DEVICE))}
        for o, r in zip(mod(ids), _reference(mod, ids)):
            torch.testing.assert_close(o.cpu(), r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dense_gradient(dtype, tol):
    mod = _module(2, [3, 10], weights_dtype=dtype)
    ids = _to(make_ids(B=7))
    outs = mod(ids)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss_of(outs, [g.to(DEVICE) for g in grads]).backward()
    w64 = mod.weight.detach().double().cpu().requires_grad_()
    loss_of(_reference(mod, ids, w64), grads).backward()
    torch.testing.assert_close(mod.weight.grad.double().cpu(), w64.grad, rtol=tol, atol=tol)
    # one member without gradient
    mod.weight.grad = None
    mod(ids)[1].sum().backward()
    w64.grad = None
    _reference(mod, ids, w64)[1].sum().backward()
    torch.testing.assert_close(mod.weight.grad.double().cpu(), w64.grad, rtol=tol, atol=tol)


def test_fused_sgd_matches_torch_optim():
    mod = _module(2, [1, 10], optimizer="sgd", lr=0.3, weights_dtype=torch.float64)
    sgd_matches_torch_optim(mod, 2, 6, np.random.default_rng(0), 0.3)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_fused_rowwise_adagrad_matches_hand_written(wd):
    mod = _module(2, [3, 10], optimizer="rowwise_adagrad", lr=0.2, eps=1e-8, weight_decay=wd,
                  weights_dtype=torch.float64)
    adagrad_matches_hand_written(mod, 2, 6, np.random.default_rng(1))
    assert mod.row_state(0, "item")[3] > 0


def test_bounds_check_costs_the_same_for_any_number_of_features():
    """The id / offsets check of a call is a fixed handful of kernels (one concatenation of
    every feature's ids, one stack of every bag's offsets, one synchronizing copy), not kernels
    per feature: counted through a dispatch mode (views, which launch nothing, left out), 4 and
    40 features cost the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cetnet_kernels.embedding_args import EmbeddingArgs
    from cetnet_kernels.triton.embedding import _Plan

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    def ops_of_check(F):
        B = 16
        ids = [torch.randint(0, 9, (B, 2) if f % 2 else (B,)) for f in range(F)]
        ids += [torch.randint(-1, 5, (3 * B,)), torch.randint(0, 5, (2 * B,))]
        offs = [torch.zeros(0, dtype=torch.int64)] * F + [torch.arange(0, 3 * B + 1, 3),
                                                          torch.arange(0, 2 * B + 1, 2)]
        vocab, dims = [9] * F + [5, 5], [3, 4]
        weight = torch.zeros(sum(vocab) * sum(dims))
        P = _Plan("op", EmbeddingArgs(weight, ids, offs, [torch.zeros(0)] * (F + 2),
                                      [0] * F + [1, 2], dims, vocab, -1))
        with Count() as c:
            P.check("op")
        return c.n

    assert ops_of_check(4) == ops_of_check(40)


@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_padding_only_batch_touches_nothing(optimizer):
    """Padding entries keep a sentinel key past every row in the backward's sort (no boolean
    indexing): a batch of padding alone changes no weight, state or gradient row."""
    feats = [("seq", 7), ("bag", 5, "sum")]
    mod = MultiTableEmbedding(2, feats, [3, 4], backend="triton", device=DEVICE,
                              optimizer=optimizer, lr=0.5, weight_decay=0.1)
    w0 = mod.weight.detach().clone()
    ids = {"seq": torch.full((4, 3), -1, device=DEVICE),
           "bag": (torch.full((5,), -1, device=DEVICE),
                   torch.tensor([0, 2, 2, 4, 5], device=DEVICE))}
    outs = mod(ids)
    assert all(float(o.abs().sum()) == 0.0 for o in outs)
    loss_of(outs, [torch.randn(o.shape, device=DEVICE) for o in outs]).backward()
    assert torch.equal(mod.weight.detach(), w0)
    if optimizer is None:
        assert float(mod.weight.grad.abs().sum()) == 0.0
    if optimizer == "rowwise_adagrad":
        assert float(mod.optimizer_state.abs().sum()) == 0.0


@pytest.mark.parametrize("optimizer", [None, "rowwise_adagrad"])
def test_deterministic(optimizer):
    def run():
        torch.manual_seed(0)
        mod = _module(2, [16, 3], optimizer=optimizer, lr=0.1)
        for ids in batches(1, 6, np.random.default_rng(2)):
            outs = mod(_to(ids))
            sum((o * o).sum() for o in outs).backward()
        return mod.weight.detach().clone() if optimizer else mod.weight.grad.clone()

    assert torch.equal(run(), run())


def test_bad_ids_and_offsets():
    mod = _module(2, [3, 4], optimizer="sgd")
    w0 = mod.weight.detach().clone()
    base = _to(make_ids())
    for name, bad in (("user", 40), ("history", -2), ("tags", 17)):
        ids = with_bad_id(base, name, bad)
        with pytest.raises(IndexError, match=rf"'{name}'.*id {bad}\b.*size "
                                             rf"{mod._vocab[mod._index[name]]}"):
            mod(ids)
    v, o = base["tags"]
    dec = o.clone()
    dec[2], dec[3] = o[3] + 1, o[2]
    for bad_o in (dec, torch.cat([o[:-1], o[-1:] + 1])):
        with pytest.raises(ValueError, match="'tags'.*offsets"):
            mod({**base, "tags": (v, bad_o)})
    assert torch.equal(mod.weight, w0)
    # the update op checks the ids before writing anything
    w = mod.weight.detach().clone()
    with pytest.raises(IndexError, match="id 9"):
        torch.ops.cetnet.multi_embedding_update_triton(
            [torch.ones(1, 6, 3, device=DEVICE), torch.ones(1, 6, 4, device=DEVICE)], w,
            torch.zeros(0, device=DEVICE), [torch.tensor([9], device=DEVICE)] * 6,
            [torch.zeros(0, dtype=torch.int64, device=DEVICE)] * 6,
            [torch.zeros(0, device=DEVICE)] * 6, [0] * 6, [3, 4], list(mod._vocab), None, 1,
            0.1, 0.0, 0.0)
    assert torch.equal(w, mod.weight)


@requires_expecttest
def test_opcheck_forward():
    mod = _module(2, [3, 4])
    _w, vals, offs, psws, modes, *_ = mod._normalize(_to(make_ids(B=3)))[0]
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_triton.default,
                          (mod.weight.detach().clone().requires_grad_(), vals, offs, psws, modes,
                           [3, 4], list(mod._vocab), -1, mod._joined_names),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@requires_expecttest
def test_opcheck_backward_fused_update():
    mod = _module(2, [3, 4])
    _w, vals, offs, psws, modes, *_ = mod._normalize(_to(make_ids(B=3)))[0]
    dims, vocab, names = [3, 4], list(mod._vocab), mod._joined_names
    w = mod.weight.detach().clone()
    outs = torch.ops.cetnet.multi_embedding_triton(w, vals, offs, psws, modes, dims, vocab, -1,
                                                   names)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_backward_triton.default,
                          (grads, w, vals, offs, psws, modes, dims, vocab, -1),
                          test_utils=("test_schema", "test_faketensor"))
    state = torch.zeros(2 * sum(vocab), device=DEVICE)
    placeholder = torch.zeros(0, requires_grad=True, device=DEVICE)
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_fused_triton.default,
                          (w, state, placeholder, vals, offs, psws, modes, dims, vocab, -1,
                           names, 2, 0.1, 1e-8, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_update_triton.default,
                          (grads, w.clone(), state.clone(), vals, offs, psws, modes, dims, vocab,
                           -1, 2, 0.1, 1e-8, 0.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_chunked_grid(monkeypatch):
    # Grids whose first axis passes CUDA's grid.x limit are launched in chunks (pid0 = the
    # chunk's first program): with a limit of 2 programs (and one-row tiles, so that the gather
    # has many programs too) every kernel runs in several chunks and still matches the float64
    # reference (forward, dense gradient, row-wise Adagrad).
    from cetnet_kernels.triton import embedding as triton_embedding

    monkeypatch.setattr(triton_embedding, "_MAX_GRID_X", 2)
    monkeypatch.setattr(triton_embedding, "_TILE", 16)
    test_forward_every_input_kind(torch.float64, 1e-12)
    test_dense_gradient(torch.float64, 1e-12)
    test_fused_rowwise_adagrad_matches_hand_written(0.01)


if HAVE_TRITON:
    @triton.jit
    def _state_index_probe(key_ptr, out_ptr, Vtot):
        m = tl.program_id(1)  # int32, as in _runs_kernel
        tl.store(out_ptr + m, _state_index(m, Vtot, tl.load(key_ptr + m)))


def test_state_index_int64():
    # The row-wise Adagrad state index m * Vtot + key: m is a program id and Vtot an int
    # argument below 2^31, both int32 in the kernel; (M-1) * Vtot >= 2^31 must not wrap. A state
    # that large (8 GiB+) cannot be allocated here: the kernel's own helper is run on its own
    # (under the interpreter int32 products wrap exactly as on a GPU).
    M, Vtot = 4, 2**30 + 7
    keys = torch.tensor([0, 5, Vtot - 1, 123], dtype=torch.int64, device=DEVICE)
    out = torch.empty(M, dtype=torch.int64, device=DEVICE)
    _state_index_probe[(1, M)](keys, out, Vtot)
    expected = torch.arange(M, dtype=torch.int64) * Vtot + keys.cpu()
    assert expected.max() >= 2**31
    assert torch.equal(out.cpu(), expected)


def test_launch_device_guard_is_noop_on_cpu(monkeypatch):
    from cetnet_kernels.triton.fusion import _device_guard

    assert isinstance(_device_guard(torch.zeros(1)), contextlib.nullcontext)
    if DEVICE == "cpu":
        def no_cuda(*a, **k):
            raise AssertionError("torch.cuda.device called for a CPU launch")

        monkeypatch.setattr(torch.cuda, "device", no_cuda)
        test_fused_rowwise_adagrad_matches_hand_written(0.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    # Module and ids on cuda:1 while the current device is cuda:0: launches follow the tensors.
    mod = MultiTableEmbedding(2, FEATURES, [3, 10], backend="triton", device="cuda:1",
                              weights_dtype=torch.float64, optimizer="rowwise_adagrad", lr=0.1)
    ids = _to(make_ids(), "cuda:1")
    w64 = mod.weight.detach().double().cpu()
    with torch.cuda.device(0):
        outs = mod(ids)
        sum(o.sum() for o in outs).backward()
    torch.cuda.synchronize(1)
    for o, r in zip(outs, reference_outputs(mod, _cpu(ids), w64)):
        torch.testing.assert_close(o.detach().cpu(), r, rtol=1e-12, atol=1e-12)
    assert mod.optimizer_state.abs().sum() > 0


@pytest.mark.parametrize("optimizer", [None, "rowwise_adagrad"])
def test_torch_compile_fullgraph(optimizer):
    compile_matches_eager(lambda: _module(2, [3, 4], optimizer=optimizer, lr=0.1),
                          _to(make_ids(B=3)), optimizer, steps=2)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-tensor rule of the triton backend")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    mod = _module(1, [2])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mod({k: v for k, v in make_ids().items()})
