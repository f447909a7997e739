"""MultiTableEmbedding (cetnet_kernels/embedding.py) against the float64 loop-of-F.embedding
reference: every input kind, pooling, mixed/odd dims, dense gradient, the fused SGD and row-wise
Adagrad updates, determinism, opcheck, torch.compile, shape fuzzing and bad input."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cetnet_kernels import EmbeddingFeature, MultiTableEmbedding, available_backends
from embedding_support import (DIMS, FEATURES, adagrad_matches_hand_written, batches,
                               compile_matches_eager, loss_of, make_ids, reference_outputs,
                               sgd_matches_torch_optim, to_device, with_bad_id)
from conftest import backend_device_params

HAS_CPU = "cpu" in available_backends("cpu")
BACKENDS = ["cpu", "reference"] if HAS_CPU else ["reference"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cetnet_kernels._C is not built")

# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6),
                                       (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_forward_every_input_kind(backend, dtype, tol):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, weights_dtype=dtype, backend=backend)
    ids = make_ids()
    outs = mod(ids)
    refs = reference_outputs(mod, ids)
    assert len(outs) == 3
    for m, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == (6, 1 + 1 + 5 + 3, DIMS[m])
        assert o.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol)
    # padding entries and the empty bag give zero vectors
    assert mod.columns("history") == slice(2, 7) and mod.columns("tags") == slice(7, 8)
    for o in outs:
        assert torch.all(o[0, 2 + 3:2 + 5] == 0) and torch.all(o[2, 2] == 0)
        assert torch.all(o[1, 7] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_dims_and_int32(backend):
    for dims in ([1], [10], [7, 1, 33]):
        mod = MultiTableEmbedding(len(dims), [("a", 100), ("b", 3)], dims,
                                  weights_dtype=torch.float64, backend=backend)
        ids = {"a": torch.randint(0, 100, (257,), dtype=torch.int32),
               "b": torch.randint(0, 3, (257,))}
        for o, r in zip(mod(ids), reference_outputs(mod, ids)):
            torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_padding_idx_none_and_nonnegative():
    mod = MultiTableEmbedding(1, [("a", 5)], 4, padding_idx=0, weights_dtype=torch.float64)
    out = mod({"a": torch.tensor([[0, 1, 2]])})[0]
    assert torch.all(out[0, 0] == 0)
    torch.testing.assert_close(out[0, 1], mod.table(0, "a")[1].detach())
    mod = MultiTableEmbedding(1, [("a", 5)], 4, padding_idx=None)
    with pytest.raises(IndexError):
        mod({"a": torch.tensor([-1])})


def test_columns_and_tables():
    mod = MultiTableEmbedding(2, FEATURES, [3, 5])
    ids = make_ids()
    assert mod.columns("scores", ids) == slice(9, 10)
    t = mod.table(1, "item")
    assert t.shape == (31, 5) and t.data_ptr() >= mod.weight.data_ptr()
    with torch.no_grad():
        t[4] = 7.0
    out = mod({**ids, "item": torch.full((6,), 4, dtype=torch.int32)})
    assert torch.all(out[1][:, mod.columns("item")] == 7.0)
    with pytest.raises(ValueError, match="unknown feature"):
        mod.columns("nope")


@needs_cpu
def test_columns_follow_compiled_calls():
    # The column counts of a torch.compile'd forward are recorded as in eager mode: columns()
    # describes the latest call, not the latest eager one.
    torch._dynamo.reset()
    mod = MultiTableEmbedding(2, FEATURES, [3, 5])
    fn = torch.compile(lambda m, ids: m(ids), fullgraph=True)
    ids = make_ids()
    fn(mod, ids)
    assert mod.columns("history") == slice(2, 7) and mod.columns("tags") == slice(7, 8)
    fn(mod, {**ids, "history": ids["history"][:, :2].contiguous()})
    assert mod.columns("history") == slice(2, 4) and mod.columns("scores") == slice(6, 7)


def test_init_options_and_from_tables():
    mod = MultiTableEmbedding(2, [("a", 10000), ("b", 4)], 8)
    s = 1 / math.sqrt(10000)
    assert mod.table(0, "a").abs().max() <= s and mod.table(0, "a").std() > s / 3
    mod = MultiTableEmbedding(1, [("a", 10000)], 8, init="normal", init_scale=0.5)
    assert abs(mod.table(0, "a").std().item() - 0.5) < 0.02
    tables = [[torch.randn(10, 3), torch.randn(4, 3)], [torch.randn(10, 2), torch.randn(4, 2)]]
    mod = MultiTableEmbedding.from_tables(tables, [("a", 10), ("b", 4, "mean")],
                                          optimizer="sgd")
    assert mod.dims == (3, 2) and mod.features[1].pooling == "mean"
    for m in range(2):
        torch.testing.assert_close(mod.table(m, "b"), tables[m][1], rtol=0, atol=0)
    with pytest.raises(ValueError):
        MultiTableEmbedding.from_tables([[torch.randn(9, 3), torch.randn(4, 3)]],
                                        [("a", 10), ("b", 4)])


@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_state_dict_round_trip(optimizer):
    feats = [("a", 50), ("b", 20)]
    src = MultiTableEmbedding(2, feats, [4, 3], optimizer=optimizer, lr=0.1)
    ids = {"a": torch.randint(0, 50, (32,)), "b": torch.randint(0, 20, (32, 3))}
    if optimizer is not None:
        sum(o.sum() for o in src(ids)).backward()
    sd = src.state_dict()
    assert set(sd) == ({"weight", "optimizer_state"} if optimizer == "rowwise_adagrad"
                       else {"weight"})
    dst = MultiTableEmbedding(2, feats, [4, 3], optimizer=optimizer, lr=0.1)
    dst.load_state_dict(sd)
    for a, b in zip(src(ids), dst(ids)):
        assert torch.equal(a, b)
    if optimizer is not None:  # the next update continues from the same state
        sum(o.sum() for o in src(ids)).backward()
        sum(o.sum() for o in dst(ids)).backward()
        assert torch.equal(src.weight, dst.weight)


# ------------------------------------------------------------------------------------------------
# Dense gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_gradient(backend, dtype):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, weights_dtype=dtype, backend=backend)
    ids = make_ids(B=9)
    outs = mod(ids)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss_of(outs, grads).backward()
    w64 = mod.weight.detach().double().requires_grad_()
    loss_of(reference_outputs(mod, ids, w64), grads).backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mod.weight.grad.double(), w64.grad, rtol=tol, atol=tol)


@needs_cpu
def test_dense_gradient_one_member_unused():
    mod = MultiTableEmbedding(2, FEATURES, [3, 4], weights_dtype=torch.float64)
    ids = make_ids()
    outs = mod(ids)
    outs[1].sum().backward()  # member 0's output gets no gradient
    w64 = mod.weight.detach().clone().requires_grad_()
    reference_outputs(mod, ids, w64)[1].sum().backward()
    torch.testing.assert_close(mod.weight.grad, w64.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Fused optimizers vs a dense reference
# ------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_fused_sgd_matches_torch_optim(dtype, tol):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, optimizer="sgd", lr=0.3, weights_dtype=dtype)
    sgd_matches_torch_optim(mod, 4, 16, np.random.default_rng(0), 0.3, tol)


@needs_cpu
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_fused_rowwise_adagrad_matches_hand_written(wd):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, optimizer="rowwise_adagrad", lr=0.2, eps=1e-8,
                              weight_decay=wd, weights_dtype=torch.float64)
    adagrad_matches_hand_written(mod, 4, 16, np.random.default_rng(1))
    assert mod.row_state(0, "item")[3] > 0


@needs_cpu
def test_fused_sgd_weight_decay_touches_only_batch_rows():
    mod = MultiTableEmbedding(1, [("a", 10)], 3, optimizer="sgd", lr=0.5, weight_decay=0.1,
                              weights_dtype=torch.float64)
    w0 = mod.weight.detach().clone().view(10, 3)
    out = mod({"a": torch.tensor([2, 2, 5])})[0]
    out.sum().backward()
    w = mod.weight.detach().view(10, 3)
    expect = w0.clone()
    expect[2] -= 0.5 * (2.0 + 0.1 * w0[2])
    expect[5] -= 0.5 * (1.0 + 0.1 * w0[5])
    torch.testing.assert_close(w, expect, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend, device",
                         backend_device_params(backends=("cpu", "cuda", "triton")))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_no_update_without_grad_and_two_lookups_one_backward(backend, device, optimizer):
    """No update without grad; two lookups sharing one backward apply one update each (the
    second lookup's saved tensors are not the state the first update bumps), also through
    retain_graph."""
    mod = MultiTableEmbedding(1, [("a", 10)], 2, optimizer=optimizer, lr=1.0,
                              weights_dtype=torch.float64, backend=backend, device=device)
    w0 = mod.weight.detach().clone()
    with torch.no_grad():
        mod({"a": torch.tensor([1], device=device)})
    assert torch.equal(mod.weight, w0)
    o1 = mod({"a": torch.tensor([1], device=device)})[0]
    o2 = mod({"a": torch.tensor([1, 4], device=device)})[0]
    (o1.sum() + o2.sum()).backward()  # two updates, one per lookup
    if optimizer == "sgd":
        expect = w0.clone().view(10, 2)
        expect[1] -= 2.0
        expect[4] -= 1.0
        torch.testing.assert_close(mod.weight.view(10, 2), expect, rtol=0, atol=1e-15)
    touched = (mod.weight.view(10, 2) != w0.view(10, 2)).any(1).nonzero().flatten().tolist()
    assert touched == [1, 4]
    loss = mod({"a": torch.tensor([2], device=device)})[0].sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert (mod.weight.view(10, 2)[2] != w0.view(10, 2)[2]).all()


@pytest.mark.parametrize("backend, device",
                         backend_device_params(backends=("cpu", "cuda", "triton")))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_module_survives_conversions(backend, device, optimizer):
    """nn.Module conversions keep the fused update working: a module built on the meta device
    then ``to_empty`` + ``reset_parameters`` (lazy init) trains; ``.half()`` keeps row-wise
    Adagrad's state float32 (its values too); ``.double()`` then deepcopy works."""
    ids = {"a": torch.tensor([1, 3], device=device)}
    lazy = MultiTableEmbedding(1, [("a", 10)], 4, optimizer=optimizer, lr=0.5, backend=backend,
                               device="meta")
    lazy.to_empty(device=device)
    lazy.reset_parameters()
    w0 = lazy.weight.detach().clone()
    lazy(ids)[0].sum().backward()
    assert (lazy.weight.view(10, 4)[[1, 3]] != w0.view(10, 4)[[1, 3]]).all()

    mod = MultiTableEmbedding(1, [("a", 10)], 4, optimizer=optimizer, lr=0.5, backend=backend,
                              device=device)
    mod(ids)[0].sum().backward()
    state = None if mod.optimizer_state is None else mod.optimizer_state.clone()
    mod.half()
    assert mod.weight.dtype == torch.float16
    if state is not None:
        assert torch.equal(mod.optimizer_state, state)  # float32, its values kept
    w1 = mod.weight.detach().clone()
    mod(ids)[0].sum().backward()
    assert (mod.weight.view(10, 4)[[1, 3]] != w1.view(10, 4)[[1, 3]]).all()
    twin = copy.deepcopy(mod.double())
    assert twin.weight.dtype == torch.float64 and twin._placeholder.is_leaf
    w2 = twin.weight.detach().clone()
    twin(ids)[0].sum().backward()
    assert (twin.weight != w2).any() and torch.equal(mod.weight, w2)


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("optimizer", [None, "sgd"])
def test_ids_made_in_inference_mode_train(backend, device, optimizer):
    """A batch made under torch.inference_mode (an evaluation loop's) trains like any other:
    the lookup copies such ids rather than fail to save them for backward."""
    if backend == "reference" and optimizer is not None:
        pytest.skip("the reference backend has no fused optimizer")
    mod = MultiTableEmbedding(len(DIMS), FEATURES, DIMS, backend=backend, device=device,
                              optimizer=optimizer)
    for mixed in (False, True):  # all of the batch, or only a bag's offsets
        batch = to_device(make_ids(5), device)
        with torch.inference_mode():
            made = to_device(make_ids(5), device)
        ids = made if not mixed else {
            k: (v if not isinstance(v, tuple) else (v[0].clone(), *made[k][1:]))
            for k, v in batch.items()}
        w0 = mod.weight.detach().clone()
        mod.weight.grad = None
        outs = mod(ids)
        sum(o.sum() for o in outs).backward()
        changed = mod.weight.grad if optimizer is None else mod.weight.detach() - w0
        assert changed.abs().sum() > 0


def test_reference_lookup_traces_its_padding():
    """torch.compile(fullgraph) and torch.export of the reference lookup keep the padding and
    the bad-id replacement (fake tensors are traced like real ones; only meta tensors skip
    the value checks)."""
    mod = MultiTableEmbedding(1, [("a", 10), ("c", 10)], 4, backend="reference", padding_idx=0,
                              bounds_check="off")

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = mod

        def forward(self, a, c):
            return self.emb({"a": a, "c": c})[0]

    a, c = torch.tensor([0, 3, 0, 12]), torch.tensor([[1, 0], [0, 0], [2, 11], [4, 5]])
    with torch.no_grad():
        eager = Wrap()(a, c)
        assert (eager[0, 0] == 0).all() and (eager[1, 1:] == 0).all()
        torch._dynamo.reset()
        compiled = torch.compile(Wrap(), fullgraph=True)(a, c)
        exported = torch.export.export(Wrap(), (a, c)).module()(a, c)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(exported, eager, rtol=0, atol=0)


@pytest.mark.parametrize("bounds_check", ["error", "warn", "off"])
def test_reference_lookup_compiles_with_every_bounds_check_and_bags(bounds_check):
    """torch.compile(fullgraph=True) of the reference module (what "auto" picks without the
    extension) in every bounds-check mode and with bags: its host checks failed to trace
    ("Could not guard on data-dependent expression"; "warn": a skipped function). Compiled,
    "error" and bad offsets are asserts in the graph (one error naming the feature), "warn"
    pads like "off" without its warning."""
    mod = MultiTableEmbedding(1, [("a", 10), ("b", 10)], 4, backend="reference",
                              bounds_check=bounds_check)
    ids, bag = torch.tensor([1, 2, 3]), (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 1, 4]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: mod({"a": a, "b": b})[0], fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, bag), mod({"a": ids, "b": bag})[0],
                                   rtol=1e-6, atol=1e-7)
        bad = torch.tensor([1, 12, 3])
        if bounds_check == "error":
            with pytest.raises(RuntimeError, match=r"feature 'a': an id outside \[0, 10\)"):
                compiled(bad, bag)
        else:
            torch.testing.assert_close(compiled(bad, bag), mod({"a": bad, "b": bag})[0],
                                       rtol=1e-6, atol=1e-7)
        with pytest.raises(RuntimeError, match="feature 'b': offsets must start at 0"):
            compiled(ids, (bag[0], torch.tensor([0, 3, 1, 4])))


@pytest.mark.parametrize("bounds_check", ["error", "warn", "off"])
def test_meta_tensors_give_shapes(bounds_check):
    """On the meta device (shape inference, lazy init) the reference lookup gives the shapes
    of a real one and checks no values (there are none)."""
    feats = [("a", 10), ("b", 5, "mean"), ("c", 7)]
    ids = {"a": torch.zeros(3, dtype=torch.long), "c": torch.zeros(3, 2, dtype=torch.long),
           "b": (torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 4]))}
    real = MultiTableEmbedding(2, feats, [4, 3], backend="reference", bounds_check=bounds_check)
    meta = MultiTableEmbedding(2, feats, [4, 3], backend="reference", bounds_check=bounds_check,
                               device="meta")
    on_meta = {k: (tuple(t.to("meta") for t in v) if isinstance(v, tuple) else v.to("meta"))
               for k, v in ids.items()}
    assert [o.shape for o in meta(on_meta)] == [o.shape for o in real(ids)]


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_deterministic_across_runs_and_thread_counts(optimizer):
    def run(threads: int):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            rng = np.random.default_rng(2)
            mod = MultiTableEmbedding(2, FEATURES, [16, 10], optimizer=optimizer, lr=0.1)
            for ids in batches(3, 2048, rng):
                outs = mod(ids)
                loss = sum((o * o).sum() for o in outs)
                loss.backward()
            return mod.weight.detach().clone() if optimizer else mod.weight.grad.clone()
        finally:
            torch.set_num_threads(prev)

    a, b, c = run(2), run(2), run(1)
    assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
def _op_args(mod: MultiTableEmbedding, ids):
    _w, vals, offs, psws, modes, *_ = mod._normalize(ids)[0]
    return vals, offs, psws, modes, list(mod.dims), list(mod._vocab)


@needs_cpu
@pytest.mark.parametrize("bounds_check", [0, 1, 2])
def test_opcheck(bounds_check):
    mod = MultiTableEmbedding(2, FEATURES, [3, 4])
    vals, offs, psws, modes, dims, vocab = _op_args(mod, make_ids())
    w = mod.weight.detach().clone().requires_grad_()
    names = "\n".join(f.name for f in FEATURES)
    torch.library.opcheck(torch.ops.cetnet.multi_embedding.default,
                          (w, vals, offs, psws, modes, dims, vocab, -1, bounds_check, names))
    outs = torch.ops.cetnet.multi_embedding(w.detach(), vals, offs, psws, modes, dims, vocab, -1,
                                            bounds_check, names)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_backward.default,
                          (grads, w.detach(), vals, offs, psws, modes, dims, vocab, -1,
                           bounds_check))
    state = torch.zeros(2 * sum(mod._vocab))
    placeholder = torch.zeros(0, requires_grad=True)
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_fused.default,
                          (w.detach(), state, placeholder, vals, offs, psws, modes, dims, vocab,
                           -1, bounds_check, names, 2, 0.1, 1e-8, 0.0),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.cetnet.multi_embedding_update.default,
                          (grads, w.detach().clone(), state.clone(), vals, offs, psws, modes,
                           dims, vocab, -1, bounds_check, 2, 0.1, 1e-8, 0.0))


@needs_cpu
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_torch_compile_fullgraph(optimizer):
    compile_matches_eager(
        lambda: MultiTableEmbedding(2, FEATURES, [3, 10], optimizer=optimizer, lr=0.1),
        make_ids(), optimizer, steps=3)


# ------------------------------------------------------------------------------------------------
# Shape fuzzing
# ------------------------------------------------------------------------------------------------
@st.composite
def _configs(draw):
    M = draw(st.integers(1, 3))
    F = draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 19)) for _ in range(M)]
    B = draw(st.integers(0, 7))
    feats, kinds = [], []
    for f in range(F):
        V = draw(st.integers(1, 30))
        kind = draw(st.sampled_from(["single", "seq", "bag", "wbag"]))
        pooling = "sum" if kind == "wbag" else draw(st.sampled_from(["sum", "mean"]))
        feats.append(EmbeddingFeature(f"f{f}", V, pooling))
        kinds.append((kind, draw(st.integers(0, 4)), draw(st.integers(0, 2**31 - 1)),
                      draw(st.sampled_from([torch.int32, torch.int64]))))
    return M, feats, dims, B, kinds


@needs_cpu
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_fuzz_forward_and_gradient(cfg):
    M, feats, dims, B, kinds = cfg
    ids = {}
    for feat, (kind, T, seed, dt) in zip(feats, kinds):
        g = torch.Generator().manual_seed(seed)
        V = feat.num_embeddings
        if kind == "single":
            ids[feat.name] = torch.randint(-1, V, (B,), generator=g).to(dt)
        elif kind == "seq":
            ids[feat.name] = torch.randint(-1, V, (B, T), generator=g).to(dt)
        else:
            lens = torch.randint(0, T + 1, (B,), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(dt)
            values = torch.randint(-1, V, (int(lens.sum()),), generator=g).to(dt)
            ids[feat.name] = ((values, offsets, torch.rand(values.shape, generator=g))
                              if kind == "wbag" else (values, offsets))
    mod = MultiTableEmbedding(M, feats, dims, weights_dtype=torch.float64)
    outs = mod(ids)
    w64 = mod.weight.detach().clone().requires_grad_()
    refs = reference_outputs(mod, ids, w64)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss_of(outs, grads).backward()
    if mod.weight.grad is None:  # B == 0 or no columns: nothing reached the weight
        return
    loss_of(refs, grads).backward()
    torch.testing.assert_close(mod.weight.grad, w64.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,optimizer", [(b, o) for b in BACKENDS for o in (None, "sgd")
                                               if b != "reference" or o is None])
def test_out_of_range_ids_raise_index_error(backend, optimizer):
    mod = MultiTableEmbedding(2, FEATURES, [3, 4], backend=backend, optimizer=optimizer)
    w0 = mod.weight.detach().clone()
    base = make_ids()
    cases = [("user", 40), ("item", -2), ("history", 25), ("tags", 17), ("genres", -5)]
    for name, bad in cases:
        ids = with_bad_id(base, name, bad)
        with pytest.raises(IndexError, match=rf"'{name}'.*id {bad}\b.*size {mod._vocab[mod._index[name]]}"):
            mod(ids)
    assert torch.equal(mod.weight, w0)


@needs_cpu
def test_backward_op_checks_ids_before_writing():
    mod = MultiTableEmbedding(1, [("a", 5)], 2, optimizer="sgd")
    w = mod.weight.detach().clone()
    with pytest.raises(IndexError, match="id 9"):
        torch.ops.cetnet.multi_embedding_update(
            [torch.ones(1, 1, 2)], w, torch.zeros(0), [torch.tensor([9])],
            [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0)], [0], [2], [5], None, 0, 1,
            0.1, 0.0, 0.0)
    assert torch.equal(w, mod.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_types_and_shapes(backend):
    mod = MultiTableEmbedding(2, FEATURES, [3, 4], backend=backend)
    base = make_ids()

    def with_(name, value):
        ids = dict(base)
        ids[name] = value
        return ids

    with pytest.raises(TypeError, match="'user'.*int32 or int64"):
        mod(with_("user", base["user"].float()))
    with pytest.raises(TypeError, match="'tags'.*bag values"):
        mod(with_("tags", (base["tags"][0].double(), base["tags"][1])))
    with pytest.raises(TypeError):
        mod(with_("user", [1, 2, 3, 4, 5, 6]))
    # two or three plain ids were read as a bag: "bag values must be a tensor, got int"
    with pytest.raises(TypeError, match=r"'user': expected an int tensor \[B\] or \[B, T\] or a "
                                        r"\(values, offsets\[, per_sample_weights\]\) bag of "
                                        r"tensors, got a list of 2 items \(int\)"):
        mod(with_("user", [1, 2]))
    with pytest.raises(TypeError):
        mod([base["user"]])
    with pytest.raises(ValueError, match="'item' has batch size 5"):
        mod(with_("item", base["item"][:5]))
    with pytest.raises(ValueError, match="batch size"):
        mod(with_("tags", (base["tags"][0], base["tags"][1][:-1])))
    with pytest.raises(ValueError, match="unknown feature.*'nope'"):
        mod({**base, "nope": base["user"]})
    missing = dict(base)
    del missing["genres"]
    with pytest.raises(ValueError, match="missing feature.*'genres'"):
        mod(missing)

    class ListKeys(Mapping):  # a Mapping whose keys() is not set-like
        def __init__(self, d):
            self._d = d

        def __getitem__(self, k):
            return self._d[k]

        def __iter__(self):
            return iter(self._d)

        def __len__(self):
            return len(self._d)

        def keys(self):
            return list(self._d)

    for a, b in zip(mod(ListKeys(base)), mod(base)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing feature.*'genres'"):
        mod(ListKeys(missing))
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        mod(with_("user", base["user"].view(6, 1, 1)))
    v, o = base["tags"]
    dec = o.clone()
    dec[2], dec[3] = o[3] + 1, o[2]
    for bad_o in (dec, torch.cat([o[:-1], o[-1:] + 1]), torch.cat([o[:1] + 1, o[1:]])):
        with pytest.raises(ValueError, match="'tags'.*offsets"):
            mod(with_("tags", (v, bad_o)))
    with pytest.raises(ValueError, match="pooling='sum'"):
        g = base["genres"]
        mod(with_("genres", (g[0], g[1], torch.ones(g[0].shape))))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unique"):
        MultiTableEmbedding(1, [("a", 3), ("a", 4)], 2)
    with pytest.raises(ValueError, match="dims"):
        MultiTableEmbedding(2, [("a", 3)], [2])
    with pytest.raises(ValueError, match="dims"):
        MultiTableEmbedding(1, [("a", 3)], 0)
    with pytest.raises(TypeError, match="dims must be one int or 2 ints.*got True"):
        MultiTableEmbedding(2, [("a", 3)], True)  # a bool is an int to Python, not a dim
    with pytest.raises(ValueError, match="num_embeddings"):
        MultiTableEmbedding(1, [("a", 0)], 2)
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingFeature("a", 3, "max")
    with pytest.raises(ValueError, match="optimizer"):
        MultiTableEmbedding(1, [("a", 3)], 2, optimizer="adam")
    with pytest.raises(ValueError, match="lr"):
        MultiTableEmbedding(1, [("a", 3)], 2, optimizer="sgd", lr=float("nan"))
    with pytest.raises(ValueError, match="reference"):
        MultiTableEmbedding(1, [("a", 3)], 2, optimizer="sgd", backend="reference")
    with pytest.raises(TypeError, match="weights_dtype"):
        MultiTableEmbedding(1, [("a", 3)], 2, weights_dtype=torch.int32)
    for dims in (3.0, "ab"):
        with pytest.raises(TypeError, match=r"dims must be one int or 2 ints"):
            MultiTableEmbedding(2, [("a", 3)], dims)
    with pytest.raises(ValueError, match=r"dims\[0\] must be an int >= 1, got 2.5"):
        MultiTableEmbedding(2, [("a", 3)], [2.5, 3])
    with pytest.raises(ValueError, match="padding_idx must fit in int64"):
        MultiTableEmbedding(1, [("a", 3)], 2, padding_idx=2**63)
    for scale in (float("nan"), -1.0, 0.0, "a"):
        with pytest.raises(ValueError, match="init_scale must be None or a finite float > 0"):
            MultiTableEmbedding(1, [("a", 3)], 2, init_scale=scale)
    # integers of other types are integers
    assert MultiTableEmbedding(2, [("a", 3)], np.int64(3)).dims == (3, 3)
    assert MultiTableEmbedding(2, [("a", 3)], torch.tensor(2)).dims == (2, 2)
    assert MultiTableEmbedding(2, [("a", 3)], [np.int32(2), 4]).dims == (2, 4)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_update_16bit_storage(dtype, optimizer):
    """16-bit tables are updated in float32 and rounded once per row update."""
    rng = np.random.default_rng(3)
    mod = MultiTableEmbedding(2, FEATURES, [3, 16], optimizer=optimizer, lr=0.1,
                              weights_dtype=dtype)
    ref = MultiTableEmbedding(2, FEATURES, [3, 16], optimizer=optimizer, lr=0.1,
                              weights_dtype=torch.float32)
    with torch.no_grad():
        ref.weight.copy_(mod.weight.float())
    for ids in batches(2, 16, rng):
        for m in (mod, ref):
            outs = m(ids)
            loss_of(outs, [torch.ones(o.shape, dtype=torch.float64) for o in outs]).backward()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(mod.weight.float(), ref.weight, rtol=4 * eps, atol=4 * eps)


def _op_suffixes() -> list[str]:
    """The registered op families runnable on CPU tensors here: C++ and Triton (interpreter)."""
    out = [""] if HAS_CPU else []
    if "triton" in available_backends("cpu"):
        from cetnet_kernels.embedding_ops import ops_for

        ops_for("triton")  # registers the *_triton ops
        out.append("_triton")
    return out


@pytest.mark.parametrize("suffix", _op_suffixes())
@pytest.mark.parametrize("dims, vocab", [
    ([4], [2**62, 4]),              # vocab x dim wraps to 16 (it used to pass and segfault)
    ([1], [2**62, 2**62]),          # the total vocabulary wraps
    ([2**61] * 4, [2, 2]),          # the weight size summed over members wraps
])
def test_direct_op_calls_refuse_sizes_that_overflow(suffix, dims, vocab):
    """Sizes computed from user values are overflow-checked in every op (forward, fused forward,
    backward, update), before any memory is touched: a wrapped product must never pass the
    weight-size check."""
    ns = torch.ops.cetnet
    E = torch.zeros(0, dtype=torch.long)
    ids = [torch.tensor([2**40]), torch.tensor([0])]
    w = torch.zeros(16)
    tail = (ids, [E, E], [torch.zeros(0)] * 2, [0, 0], dims, vocab, None, 0)
    named = (*tail, "x\ny")
    grads = [torch.zeros(1, 2, d if d < 64 else 1) for d in dims]
    calls = {
        "forward": lambda: getattr(ns, "multi_embedding" + suffix)(w, *named),
        "fused": lambda: getattr(ns, "multi_embedding_fused" + suffix)(
            w, torch.zeros(0), torch.zeros(0), *named, 1, 0.1, 0.0, 0.0),
        "backward": lambda: getattr(ns, "multi_embedding_backward" + suffix)(grads, w, *tail),
        "update": lambda: getattr(ns, "multi_embedding_update" + suffix)(
            grads, w, torch.zeros(0), *tail, 1, 0.1, 0.0, 0.0),
    }
    for name, call in calls.items():
        with pytest.raises((ValueError, RuntimeError), match=r"overflow|weight must be 1-D"):
            call()
        assert torch.equal(w, torch.zeros(16)), name


@pytest.mark.parametrize("suffix", _op_suffixes())
@pytest.mark.parametrize("mode, bounds_check, match", [
    (7, 0, r"feature '(f|#0)': unknown mode 7"),
    (-1, 0, r"feature '(f|#0)': unknown mode -1"),
    (0, 5, r"bounds_check must be 0 \(error\), 1 \(off\) or 2 \(warn\), got 5"),
])
def test_direct_op_calls_refuse_unknown_codes(suffix, mode, bounds_check, match):
    """A feature's input mode and the bounds-check code are checked by every op of every
    backend before anything is read or written (the update has no feature names: '#0')."""
    ns = torch.ops.cetnet
    E = torch.zeros(0, dtype=torch.long)
    w = torch.zeros(2 * 4)
    tail = ([torch.tensor([1])], [E], [torch.zeros(0)], [mode], [4], [2], None, bounds_check)
    with pytest.raises((ValueError, RuntimeError), match=match):
        getattr(ns, "multi_embedding" + suffix)(w, *tail, "f")
    with pytest.raises((ValueError, RuntimeError), match=match):
        getattr(ns, "multi_embedding_update" + suffix)(
            [torch.ones(1, 1, 4)], w, torch.zeros(0), *tail, 1, 0.1, 0.0, 0.0)
    assert torch.equal(w, torch.zeros(8))


# ------------------------------------------------------------------------------------------------
# Eager autograd: the module's autograd.Functions against the ops' registered autograd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device",
                         backend_device_params(backends=("cpu", "cuda", "triton")))
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_eager_functions_match_the_registered_autograd(backend, device, optimizer):
    # In eager mode the module's lookups run as autograd.Functions (the registered formulas
    # without torch.library's per-call argument flattening); the ops called directly with
    # autograd run the registered formulas. Same kernels, so the same bits: two steps each.
    from cetnet_kernels.embedding import OPTIMIZER_CODES
    from cetnet_kernels.embedding_args import OptimizerArgs

    torch.manual_seed(0)
    eager = MultiTableEmbedding(3, FEATURES, DIMS, optimizer=optimizer, lr=0.3, backend=backend,
                                device=device)
    direct = MultiTableEmbedding(3, FEATURES, DIMS, optimizer=optimizer, lr=0.3,
                                 backend=backend, device=device)
    direct.load_state_dict(eager.state_dict())
    ns, suffix = torch.ops.cetnet, "_triton" if backend == "triton" else ""
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = to_device(make_ids(5, gen=gen), device)
        outs = eager(ids)
        assert type(outs[0].grad_fn).__name__ == ("_EagerLookupBackward" if optimizer is None
                                                 else "_EagerFusedBackward")
        a, _ = direct._normalize(ids)
        if optimizer is None:
            ref = getattr(ns, "multi_embedding" + suffix).default(*a)
        else:
            state = (direct.optimizer_state if direct.optimizer_state is not None
                     else direct._no_state)
            opt = OptimizerArgs(int(OPTIMIZER_CODES[optimizer]), direct.lr, direct.eps,
                                direct.weight_decay)
            ref = getattr(ns, "multi_embedding_fused" + suffix).default(
                a.weight, state, direct._placeholder, *a[1:], *opt)
        assert all(torch.equal(o, r) for o, r in zip(outs, ref))
        grads = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
        torch.autograd.backward(outs, grads)
        torch.autograd.backward(ref, grads)
        if optimizer is None:
            assert torch.equal(eager.weight.grad, direct.weight.grad)
            eager.weight.grad = direct.weight.grad = None
        else:
            assert torch.equal(eager.weight, direct.weight)
            if eager.optimizer_state is not None:
                assert torch.equal(eager.optimizer_state, direct.optimizer_state)
