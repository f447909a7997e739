"""Hot rows in the MultiTableEmbedding backward: one id repeated 10^5 times, and a Zipf mix with a
few very hot rows, bags and sequences, against the float64 reference (dense gradient, fused SGD,
fused row-wise Adagrad) on every backend of every device. On CUDA these runs are longer than the
backward's long-run threshold, so they go through the block-per-run kernel
(csrc/cuda/embedding_cuda.cu, apply_long_runs_kernel); the triton interpreter gets 10^4 repeats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cetnet_kernels import MultiTableEmbedding, available_backends
from conftest import DEVICES
from embedding_support import (fused_reference_step, loss_of, reference_outputs, to_device,
                               touched_rows, zipf_ids)

OPTIMIZERS = [None, "sgd", "rowwise_adagrad"]
LR, EPS, WD = 0.01, 1e-8, 0.01


def _cases(optimizers=OPTIMIZERS):
    out = []
    for device in DEVICES:
        for backend in available_backends(device):
            for opt in optimizers:
                if backend == "reference" and opt is not None:
                    continue  # the reference backend has no fused optimizer
                out.append(pytest.param(backend, device, opt, id=f"{backend}-{device}-{opt}"))
    return out


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def _make(features, dims, backend, device, optimizer, dtype=torch.float64):
    kw = dict(optimizer=optimizer, lr=LR, eps=EPS, weight_decay=WD) if optimizer else {}
    return MultiTableEmbedding(len(dims), features, dims, weights_dtype=dtype, backend=backend,
                               device=device, **kw)


def _step_and_check(mod, ids, device, tol):
    """One forward + backward of ``mod`` on ``ids`` (CPU tensors) against the float64 reference:
    the dense gradient, or the weights (and Adagrad state) after the fused update."""
    w0 = mod.weight.detach().double().cpu().clone()
    s0 = (mod.optimizer_state.detach().double().cpu().clone()
          if mod.optimizer == "rowwise_adagrad" else None)
    mod.weight.grad = None
    outs = mod(to_device(ids, device))
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss_of(outs, [g.to(device) for g in grads]).backward()
    w64 = w0.clone().requires_grad_()
    loss_of(reference_outputs(mod, ids, w64), grads).backward()
    if mod.optimizer is None:
        torch.testing.assert_close(mod.weight.grad.double().cpu(), w64.grad, rtol=tol, atol=tol)
        return
    assert mod.weight.grad is None
    touched = touched_rows(mod, ids)
    if mod.optimizer == "sgd":
        fused_reference_step(mod, w0, w64.grad, touched, LR, WD)
    else:
        fused_reference_step(mod, w0, w64.grad, touched, LR, WD, s0, EPS)
        torch.testing.assert_close(mod.optimizer_state.double().cpu(), s0, rtol=tol, atol=tol)
    torch.testing.assert_close(mod.weight.detach().double().cpu(), w0, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend, device, optimizer", _cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_id_repeated(backend, device, optimizer, dtype):
    """One row takes every lookup (and padding follows it in the sorted order); dims: 1, odd,
    and above one 128-dim chunk of the long-run kernel."""
    interp = _interpreted(backend, device)
    n = 10_000 if interp else 100_000
    dims = [1, 33] if interp else [1, 33, 130]  # the interpreter is slow
    mod = _make([("hot", 50)], dims, backend, device, optimizer, dtype)
    ids = torch.full((n,), 7, dtype=torch.int64)
    ids[-n // 10:] = -1  # padding: sorts after the hot row's run
    # Sums of 10^5 terms: float64 agrees to ~1e-12 relative; float32 sums serially on some
    # backends (|sum| ~ 300: a few 1e-3 absolute on the gradient, lr times that on the weights).
    if dtype == torch.float64:
        tol = 1e-9
    else:
        tol = 1e-2 if optimizer is None else 1e-4
    _step_and_check(mod, {"hot": ids}, device, tol)


# Entries per run around the kernels' cuts between short and long runs (Triton: 32, CUDA: 64)
RUN_LENGTHS = [1, 2, 31, 32, 33, 63, 64, 65, 200]


def _runs_of_lengths(lengths, vocab: int, B: int, rng: np.random.Generator):
    """[B] ids where row 2 r (r = 0, 1, ...) is looked up lengths[r] times and the rest of the
    slots are padding (-1), in a shuffled order (a run's entries are spread over the batch)."""
    ids = torch.full((B,), -1, dtype=torch.int64)
    filled = torch.cat([torch.full((n,), 2 * r) for r, n in enumerate(lengths)])
    assert 2 * len(lengths) <= vocab and filled.numel() <= B
    ids[torch.from_numpy(rng.permutation(B)[:filled.numel()])] = filled
    return ids


@pytest.mark.parametrize("backend, device, optimizer", _cases())
def test_runs_around_the_long_run_cuts(backend, device, optimizer):
    """Runs of 1 to 200 entries, around the short/long cuts of the Triton and CUDA backwards
    (a row's run is summed by a tile of runs or by a program / block of its own), side by side
    in one batch, with a bag and a sequence feature; two members of different dims, two steps."""
    rng = np.random.default_rng(3)
    mod = _make([("a", 20), ("s", 20), ("bag", 20, "mean")], [16, 33], backend, device,
                optimizer)
    B = 1024
    for _ in range(2):
        a = _runs_of_lengths(RUN_LENGTHS, 20, B, rng)
        seq = _runs_of_lengths(RUN_LENGTHS[::-1], 20, 2 * B, rng).reshape(B, 2)
        vals = _runs_of_lengths(RUN_LENGTHS, 20, B, rng)
        vals = vals[vals >= 0]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64),
                             torch.sort(torch.from_numpy(rng.integers(0, vals.numel() + 1,
                                                                      B - 1))).values,
                             torch.tensor([vals.numel()])])
        _step_and_check(mod, {"a": a, "s": seq, "bag": (vals, offsets)}, device, 1e-9)


@pytest.mark.parametrize("backend, device, optimizer", _cases())
@pytest.mark.parametrize("pooling", ["mean", "sum", "weighted_sum"])
def test_bags_around_the_long_bag_cut(backend, device, optimizer, pooling):
    """Bags of 0 to 300 values (the Triton lookup sums a bag's first 32 values with its tile's
    other bags, the rest on its own), with padding inside long bags (left out of a mean's count),
    one tile holding several long bags: the lookup and the backward against the float64
    reference."""
    rng = np.random.default_rng(11)
    lengths = [0, 1, 31, 32, 33, 64, 65, 300, 2, 40, 3, 0, 100]
    B = len(lengths)
    vals = torch.from_numpy(rng.integers(0, 30, sum(lengths)))
    vals[rng.permutation(vals.numel())[:vals.numel() // 5]] = -1  # padding
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    bag = (vals, offsets) if pooling != "weighted_sum" else (
        vals, offsets, torch.from_numpy(rng.random(vals.numel())).float())
    ids = {"a": torch.from_numpy(rng.integers(0, 30, B)), "bag": bag}
    mod = _make([("a", 30), ("bag", 30, "sum" if pooling == "weighted_sum" else pooling)],
                [16, 33], backend, device, optimizer)
    outs = mod(to_device(ids, device))
    for o, r in zip(outs, reference_outputs(mod, ids, mod.weight.detach().double().cpu())):
        torch.testing.assert_close(o.double().cpu(), r, rtol=1e-12, atol=1e-12)
    _step_and_check(mod, ids, device, 1e-9)


@pytest.mark.parametrize("backend, device, optimizer",
                         [p for p in _cases() if p.values[2] is not None])
def test_member_without_gradient(backend, device, optimizer):
    """The fused update op with an empty gradient for a member (no gradient: the kernels skip
    reading it) updates that member's looked-up rows, short and long runs, bitwise as with an
    explicit zero gradient (weight decay; Adagrad's state from it), and the other member as
    usual. (Autograd hands an unused output's backward a zero tensor, so the module does not
    reach this path in eager mode: the op is called directly.)"""
    from cetnet_kernels.codes import OPTIMIZER_CODES, InputMode
    B = 1024
    ids = _runs_of_lengths(RUN_LENGTHS, 20, B, np.random.default_rng(5)).to(device)
    mod = _make([("a", 20)], [16, 33], backend, device, optimizer)
    op = getattr(torch.ops.cetnet, "multi_embedding_update" +
                 ("_triton" if backend == "triton" else ""))
    empty = torch.empty(0, dtype=torch.float64, device=device)
    g = [torch.randn(B, 1, d, dtype=torch.float64, device=device) for d in (16, 33)]

    def update(grads):
        w = mod.weight.detach().clone()
        state = (mod.optimizer_state.detach().clone() if optimizer == "rowwise_adagrad"
                 else torch.empty(0, dtype=torch.float64, device=device))
        op(grads, w, state, [ids], [torch.empty(0, dtype=torch.int64, device=device)],
           [torch.empty(0, device=device)], [int(InputMode.IDS)], [16, 33], [20], -1, 0,
           int(OPTIMIZER_CODES[optimizer]), LR, EPS, WD)
        return w, state

    for absent in (0, 1):
        given = [empty if m == absent else g[m] for m in range(2)]
        zeros = [torch.zeros_like(g[m]) if m == absent else g[m] for m in range(2)]
        (w_absent, s_absent), (w_zeros, s_zeros) = update(given), update(zeros)
        assert torch.equal(w_absent, w_zeros), absent
        assert torch.equal(s_absent, s_zeros), absent
        assert not torch.equal(w_absent, mod.weight.detach())  # something was updated
    if optimizer == "sgd":  # member 1's touched rows without a gradient: w - lr * wd * w
        w = update([g[0], empty])[0]
        second = slice(mod.layout.table_base[1], None)
        rows = mod.weight.detach()[second].reshape(20, 33).cpu()
        touched = touched_rows(mod, {"a": ids.cpu()})[20:]
        expect = torch.where(touched[:, None], rows - LR * (WD * rows), rows)
        torch.testing.assert_close(w[second].reshape(20, 33).cpu(), expect, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("backend, device, optimizer", _cases())
def test_wide_rows_hot_id(backend, device, optimizer):
    """Dims up to 1100 (several chunks, the last partial) on a run of a few thousand entries."""
    interp = _interpreted(backend, device)
    n = 200 if interp else 3000
    mod = _make([("a", 10), ("b", 4)], [300 if interp else 1100, 5], backend, device, optimizer)
    ids = {"a": torch.cat([torch.full((n,), 2), torch.arange(10)]),
           "b": torch.randint(0, 4, (n + 10, 2))}
    _step_and_check(mod, ids, device, 1e-9)


def _zipf_batch(B: int, rng: np.random.Generator, last_hot: bool):
    """Zipf ids with a few very hot rows: single ids, a padded sequence, sum / mean / weighted
    bags; the last feature's largest id (the last run of the sorted keys, followed by every
    padding entry) is hot or appears once."""
    user = zipf_ids(B, 1000, rng)
    user[rng.random(B) < 0.3] = 3          # ~30% of the lookups on one row
    hist = zipf_ids(B * 3, 200, rng).view(B, 3)
    hist[rng.random((B, 3)) < 0.2] = -1    # padding
    hist[:, 1][rng.random(B) < 0.5] = 199  # hot, and the feature's last row
    lens = torch.from_numpy(rng.integers(0, 5, B))
    nv = int(lens.sum())
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    tags = zipf_ids(nv, 50, rng)
    tags[rng.random(nv) < 0.1] = -1
    last = torch.full((B, 2), -1, dtype=torch.int64)
    last[:, 0] = zipf_ids(B, 99, rng)      # ids 0..98
    if last_hot:
        last[::2, 1] = 99
    else:
        last[B // 2, 1] = 99
    return {
        "user": user.int(),
        "hist": hist,
        "tags": (tags, offs),
        "genres": (zipf_ids(nv, 20, rng).int(), offs.int()),
        "scores": (zipf_ids(nv, 30, rng), offs,
                   torch.from_numpy(rng.random(nv)).float()),
        "last": last,
    }


ZIPF_FEATURES = [("user", 1000), ("hist", 200), ("tags", 50, "sum"), ("genres", 20, "mean"),
                 ("scores", 30), ("last", 100)]


@pytest.mark.parametrize("backend, device, optimizer",
                         [p for p in _cases() if not _interpreted(*p.values[:2])])  # too slow
@pytest.mark.parametrize("last_hot", [False, True])
def test_zipf_mix(backend, device, optimizer, last_hot):
    B = 20_000 if device == "cuda" else 10_000
    rng = np.random.default_rng(5)
    mod = _make(ZIPF_FEATURES, [4, 67], backend, device, optimizer)
    for _ in range(2):  # the second step starts from updated weights / state
        _step_and_check(mod, _zipf_batch(B, rng, last_hot), device, 1e-9)


@pytest.mark.parametrize("backend, device, optimizer",
                         [p for p in _cases() if p.values[0] in ("cuda", "triton")
                          and p.values[1] == "cuda"] or
                         [pytest.param(None, None, None, marks=pytest.mark.skip(
                             reason="needs a GPU and the cuda or triton embedding kernels"))])
def test_hot_rows_deterministic_on_gpu(backend, device, optimizer):
    """Two identical steps on hot rows give bitwise equal weights / gradients / state."""
    def run():
        torch.manual_seed(0)
        mod = _make(ZIPF_FEATURES + [("one", 3)], [16, 130], backend, device, optimizer,
                    torch.float32)
        rng = np.random.default_rng(7)
        for _ in range(2):
            ids = _zipf_batch(20_000, rng, True)
            ids["one"] = torch.full((20_000, 5), 1)  # a run of 10^5 entries
            outs = mod(to_device(ids, device))
            sum((o * o).sum() for o in outs).backward()
        state = mod.optimizer_state.clone() if optimizer == "rowwise_adagrad" else None
        return (mod.weight.detach().clone() if optimizer else mod.weight.grad.clone()), state

    (w1, s1), (w2, s2) = run(), run()
    assert torch.equal(w1, w2)
    if s1 is not None:
        assert torch.equal(s1, s2)
