"""MultiTableEmbedding on CUDA tensors (backend "cuda", and "triton" on the GPU) against the
float64 reference on CPU: every input kind, weight dtypes, int32/int64 ids, dense gradient, fused
SGD and row-wise Adagrad over several steps with hot ids, determinism, the fused bounds check and
malformed offsets. Skipped without a GPU or without the compiled CUDA kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cetnet_kernels import MultiTableEmbedding, available_backends
from embedding_support import (DIMS, FEATURES, adagrad_matches_hand_written, batches,
                               compile_matches_eager, loss_of, make_ids, reference_outputs,
                               sgd_matches_torch_optim, to_device, with_bad_id)

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available()
                and b in available_backends("cuda")]
pytestmark = pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU and the cuda (or triton) "
                                "embedding kernels")


def _gpu(ids):
    return to_device(ids, "cuda")


def _ref(mod, ids_cpu, w64=None):
    if w64 is None:
        w64 = mod.weight.detach().double().cpu()
    return reference_outputs(mod, ids_cpu, w64)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6),
                                       (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_forward_every_input_kind(backend, dtype, tol):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, weights_dtype=dtype, backend=backend,
                              device="cuda")
    ids = make_ids(B=37)
    outs = mod(_gpu(ids))
    for m, (o, r) in enumerate(zip(outs, _ref(mod, ids))):
        assert o.is_cuda and o.shape == (37, 10, DIMS[m])
        torch.testing.assert_close(o.double().cpu(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_large_batch_mixed_dims(backend, id_dtype):
    dims = [1, 7, 64, 130]  # dim 1, odd, vector width, above one warp's lanes
    feats = [("a", 1000), ("b", 5, "mean"), ("s", 300)]
    mod = MultiTableEmbedding(4, feats, dims, weights_dtype=torch.float32, backend=backend,
                              device="cuda")
    B = 4099
    lens = torch.randint(0, 6, (B,))
    ids = {"a": torch.randint(0, 1000, (B,), dtype=id_dtype),
           "b": (torch.randint(0, 5, (int(lens.sum()),), dtype=id_dtype),
                 torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(id_dtype)),
           "s": torch.randint(-1, 300, (B, 3), dtype=id_dtype)}
    for o, r in zip(mod(_gpu(ids)), _ref(mod, ids)):
        torch.testing.assert_close(o.double().cpu(), r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dense_gradient(backend, dtype, tol):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, weights_dtype=dtype, backend=backend,
                              device="cuda")
    ids = make_ids(B=64)
    outs = mod(_gpu(ids))
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss_of(outs, [g.cuda() for g in grads]).backward()
    w64 = mod.weight.detach().double().cpu().requires_grad_()
    loss_of(_ref(mod, ids, w64), grads).backward()
    torch.testing.assert_close(mod.weight.grad.double().cpu(), w64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_sgd_matches_torch_optim(backend):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, optimizer="sgd", lr=0.3,
                              weights_dtype=torch.float64, backend=backend, device="cuda")
    sgd_matches_torch_optim(mod, 4, 256, np.random.default_rng(0), 0.3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_fused_rowwise_adagrad_matches_hand_written(backend, wd):
    mod = MultiTableEmbedding(3, FEATURES, DIMS, optimizer="rowwise_adagrad", lr=0.2, eps=1e-8,
                              weight_decay=wd, weights_dtype=torch.float64, backend=backend,
                              device="cuda")
    adagrad_matches_hand_written(mod, 4, 256, np.random.default_rng(1))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_update_16bit_storage(backend, dtype, optimizer):
    rng = np.random.default_rng(3)
    kw = dict(optimizer=optimizer, lr=0.1, backend=backend, device="cuda")
    mod = MultiTableEmbedding(2, FEATURES, [3, 16], weights_dtype=dtype, **kw)
    ref = MultiTableEmbedding(2, FEATURES, [3, 16], weights_dtype=torch.float32, **kw)
    with torch.no_grad():
        ref.weight.copy_(mod.weight.float())
    for ids in batches(2, 64, rng):
        for m in (mod, ref):
            outs = m(_gpu(ids))
            sum(o.sum() for o in outs).backward()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(mod.weight.float(), ref.weight, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_deterministic(backend, optimizer):
    def run():
        torch.manual_seed(0)
        mod = MultiTableEmbedding(2, FEATURES, [16, 10], optimizer=optimizer, lr=0.1,
                                  backend=backend, device="cuda")
        for ids in batches(3, 4096, np.random.default_rng(2)):
            outs = mod(_gpu(ids))
            sum((o * o).sum() for o in outs).backward()
        return mod.weight.detach().clone() if optimizer else mod.weight.grad.clone()

    assert torch.equal(run(), run())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("optimizer", [None, "sgd"])
def test_bounds_check_raises_index_error(backend, optimizer):
    mod = MultiTableEmbedding(2, FEATURES, [3, 4], backend=backend, optimizer=optimizer,
                              device="cuda")
    w0 = mod.weight.detach().clone()
    base = make_ids()
    for name, bad in [("user", 40), ("item", -2), ("history", 25), ("tags", 17),
                      ("genres", -5), ("scores", 10 ** 9)]:
        ids = with_bad_id(base, name, bad)
        with pytest.raises(IndexError, match=rf"'{name}'.*id {bad}\b.*size "
                                             rf"{mod._vocab[mod._index[name]]}"):
            mod(_gpu(ids))
    v, o = base["tags"]
    dec = o.clone()
    dec[2], dec[3] = o[3] + 1, o[2]
    for bad_o in (dec, torch.cat([o[:-1], o[-1:] + 1]), torch.cat([o[:1] + 1, o[1:]])):
        with pytest.raises(ValueError, match="'tags'.*offsets"):
            mod(_gpu({**base, "tags": (v, bad_o)}))
    torch.cuda.synchronize()  # no device-side fault was left behind
    assert torch.equal(mod.weight, w0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_update_op_checks_ids_before_writing(backend):
    suffix = "_triton" if backend == "triton" else ""
    update = getattr(torch.ops.cetnet, "multi_embedding_update" + suffix)
    w = torch.randn(10, device="cuda")
    w0 = w.clone()
    with pytest.raises(IndexError, match="id 9"):
        update([torch.ones(1, 1, 2, device="cuda")], w, torch.zeros(0, device="cuda"),
               [torch.tensor([9], device="cuda")], [torch.zeros(0, dtype=torch.int64,
                                                                device="cuda")],
               [torch.zeros(0, device="cuda")], [0], [2], [5], None, 1, 0.1, 0.0, 0.0)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    compile_matches_eager(
        lambda: MultiTableEmbedding(2, FEATURES, [3, 10], optimizer="sgd", lr=0.1,
                                    backend=backend, device="cuda"),
        _gpu(make_ids()), "sgd", steps=2)
