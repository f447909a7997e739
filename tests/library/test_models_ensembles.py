"""Ensembles: training steps, K = 1 equivalences, reference vs fused backends, fused optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cetnet.models import CETNet, ENSEMBLES, KDEF, MultiEmbedding, build_model
from models_support import one_thread, random_batch, tiny_schema  # noqa: F401

SMALL = {"dhen": {"num_layers": 1}, "interformer": {"num_layers": 1}}


def _model(ensemble="cetnet", members=("dhen", "interformer"), backend="auto", **kw):
    cfg = {"ensemble": ensemble, "members": list(members), "embedding_dim": 8, **SMALL, **kw}
    return build_model(cfg, tiny_schema(), backend=backend)


@pytest.mark.parametrize("ensemble", ENSEMBLES)
@pytest.mark.parametrize("optimizer", [None, "rowwise_adagrad"])
def test_loss_decreases(ensemble, optimizer):
    model = _model(ensemble, embedding_optimizer=optimizer, embedding_lr=0.1)
    batch = random_batch(tiny_schema(), B=32, seed=3)
    opt = torch.optim.Adam(model.dense_parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss, out = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    K = len(model.member_names)
    assert out.logits.shape == (32, K if ensemble != "multi_embedding" else 1)
    assert out.prob.shape == (32,) and ((out.prob >= 0) & (out.prob <= 1)).all()
    assert (out.weights is not None) == (ensemble == "cetnet")
    assert loss.item() < 0.7 * first
    model.eval()
    with torch.no_grad():
        ev = model(batch)
    assert ev.prob.shape == (32,) and torch.isfinite(ev.logits).all()


def test_single_member_is_an_ensemble_of_one():
    batch = random_batch(tiny_schema(), B=16)
    fusion = {"member_weight": 0.7, "ensemble_weight": 0.5}
    outs = {}
    for ens in ("cetnet", "naive", "kdef"):
        torch.manual_seed(7)
        model = _model(ens, members=["dhen"], embedding_optimizer=None, fusion=fusion)
        outs[ens] = model.loss(batch)
    z = outs["cetnet"][1].logits
    assert z.shape == (16, 1)
    for ens in ("naive", "kdef"):  # same seed, same init -> same logit and prediction
        torch.testing.assert_close(outs[ens][1].logits, z)
        torch.testing.assert_close(outs[ens][1].prob, torch.sigmoid(z[:, 0]))
    bce = F.binary_cross_entropy_with_logits(z[:, 0], batch.label)
    torch.testing.assert_close(outs["cetnet"][0], 1.2 * bce)
    torch.testing.assert_close(outs["cetnet"][1].prob, torch.sigmoid(z[:, 0]))
    torch.testing.assert_close(outs["naive"][0], bce)
    torch.testing.assert_close(outs["kdef"][0], bce)
    # the ensemble's logit is the member's own
    model = _model("cetnet", members=["dhen"], embedding_optimizer=None)
    view = model.front(batch)[0]
    torch.testing.assert_close(model(batch).logits[:, 0], model.members["dhen"](view))


@pytest.mark.parametrize("ensemble", ["cetnet", "kdef"])
def test_reference_backend_matches_fused(ensemble):
    batch = random_batch(tiny_schema(), B=24)
    grads, losses = [], []
    for backend in ("auto", "reference"):
        torch.manual_seed(11)
        model = _model(ensemble, embedding_optimizer=None, backend=backend,
                       fusion={"distill_weight": 0.3, "mutual_weight": 0.2})
        loss, _ = model.loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and "front.embedding.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_rowwise_adagrad_updates_only_touched_rows():
    model = _model("cetnet", embedding_optimizer="rowwise_adagrad", embedding_lr=0.1)
    emb = model.embedding
    assert not emb.weight.requires_grad
    assert all(p is not emb.weight for p in model.dense_parameters())
    batch = random_batch(tiny_schema(), B=16)
    before = emb.weight.detach().clone()
    loss, _ = model.loss(batch)
    loss.backward()
    assert emb.weight.grad is None
    touched = {"user": batch.sparse["user"], "item": batch.sparse["item"],
               "genres": batch.multihot["genres"][0], "hist_item": batch.sequence["hist_item"]}
    for m in range(2):
        for name, ids in touched.items():
            rows = torch.zeros(emb.table(m, name).shape[0], dtype=torch.bool)
            rows[ids.flatten()] = True
            rows[0] = False  # padding gets no update
            off = emb.table(m, name).storage_offset()
            old = before[off:off + emb.table(m, name).numel()].view_as(emb.table(m, name))
            changed = (emb.table(m, name) != old).any(1)
            assert torch.equal(changed, rows), (m, name)
            assert torch.equal(emb.row_state(m, name) > 0, rows)


def test_dense_parameters_include_embedding_without_fused_optimizer():
    model = _model("naive", embedding_optimizer=None)
    params = model.dense_parameters()
    assert any(p is model.embedding.weight for p in params)
    assert len(params) == len(list(model.parameters()))


def test_shared_embedding_kdef():
    model = _model("kdef", members=["dnn", "dnn", "dcnv2"], shared_embedding=True,
                   embedding_optimizer=None)
    assert isinstance(model, KDEF) and model.embedding.num_models == 1
    assert model.member_names == ["dnn", "dnn_1", "dcnv2"]
    batch = random_batch(tiny_schema(), B=8)
    views = model.front(batch)
    assert views[0].fields is views[2].fields
    loss, out = model.loss(batch)
    loss.backward()
    assert out.logits.shape == (8, 3)
    torch.testing.assert_close(out.prob, torch.sigmoid(out.logits.mean(1)))


def test_multi_embedding_is_one_model():
    model = _model("multi_embedding", embedding_dim=[8, 6, 4])
    assert isinstance(model, MultiEmbedding) and model.member_names == ["multi_embedding"]
    assert model.embedding.num_models == 3 and model.embedding.dims == (8, 6, 4)
    out = model(random_batch(tiny_schema(), B=8))
    assert out.logits.shape == (8, 1) and out.weights is None


def test_cetnet_forward_weights():
    model = _model("cetnet", members=["dnn", "dcnv2", "dhen"])
    assert isinstance(model, CETNet)
    out = model(random_batch(tiny_schema(), B=8))
    assert out.weights.shape == (8, 3)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(8))
    torch.testing.assert_close(out.prob, (out.weights * torch.sigmoid(out.logits)).sum(1))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", "cuda"])
def test_the_backend_reaches_every_op_family(backend):
    """model.backend picks the embedding's kernels as well as the fusion's (the front mapped
    "triton" and "cuda" to "auto" for the embedding, so those runs mixed backends)."""
    model = _model("cetnet", embedding_optimizer=None, backend=backend)
    assert model.embedding.backend == backend
    assert model.fusion.backend == backend
    kdef = _model("kdef", embedding_optimizer=None, backend=backend)
    assert kdef.embedding.backend == kdef.backend == backend


@pytest.mark.parametrize("ensemble, members", [("cetnet", ("dhen", "interformer")),
                                               ("kdef", ("dnn", "dcnv2")),
                                               ("naive", ("dnn", "dcnv2")),
                                               ("multi_embedding", ("dnn", "dcnv2"))])
def test_a_training_step_never_waits_for_the_device(ensemble, members):
    """The models build_model makes run a training step (embedding lookup with its fused
    row-wise Adagrad update, members, fusion or KDEF loss, backward) without an op that makes a
    GPU host wait (reading a value, nonzero, unique, a Python number made a tensor), with
    bounds checking off: seen through a dispatch mode on the Triton backend (interpreted on
    CPU tensors). The fusion head and KDEF's loss leave the per-step label check out (their
    labels come from a validated Dataset). (The optimizer step is not part of it: Adam reads
    its step counters, which live on the CPU.)"""
    from cetnet_kernels import available_backends
    from helpers import synchronizing_ops

    if "triton" not in available_backends("cpu"):
        pytest.skip("needs the Triton interpreter")
    model = _model(ensemble, members, backend="triton", embedding_optimizer="rowwise_adagrad",
                   embedding_lr=0.1, embedding_bounds_check="off")
    batch = random_batch(tiny_schema(), B=16, seed=3)
    model.loss(batch)[0].backward()  # (first call: the layout's constants)
    seen = synchronizing_ops(lambda: model.loss(batch)[0].backward())
    assert seen == [], seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("ensemble, members", [("cetnet", ("dhen", "interformer")),
                                               ("kdef", ("dnn", "dcnv2"))])
def test_a_whole_training_step_is_captured_by_a_cuda_graph(backend, ensemble, members):
    """With the embedding's bounds check off, a whole training step of a build_model model
    (lookup, members, fusion loss, backward with the fused row-wise Adagrad, gradient clipping,
    fused capturable Adam) is captured by torch.cuda.graph, as PyTorch's whole-network recipe
    does it (warm-up on a side stream, gradients None before the capture), and each replay
    equals an eager step of a twin model on the same batch (docs/GPU.md)."""
    from cetnet_kernels import available_backends

    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not built / importable here")

    def make():
        torch.manual_seed(0)
        model = _model(ensemble, members, backend=backend, embedding_optimizer="rowwise_adagrad",
                       embedding_lr=0.1, embedding_bounds_check="off").cuda()
        params = list(model.dense_parameters())
        return model, params, torch.optim.Adam(params, lr=1e-2, fused=True, capturable=True)

    graphed, eager = make(), make()
    batch = random_batch(tiny_schema(), B=64, seed=3).to("cuda")

    def step(model, params, opt):
        loss, _out = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for twin in (graphed, eager):
                twin[2].zero_grad(set_to_none=True)
                step(*twin)
    torch.cuda.current_stream().wait_stream(side)
    graphed[2].zero_grad(set_to_none=True)  # backward's gradients come from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(*graphed)
    for _ in range(3):  # capturing ran nothing: both twins have had the 3 warm-up steps
        graph.replay()
        eager[2].zero_grad(set_to_none=True)
        loss = step(*eager)
        torch.testing.assert_close(static_loss, loss)
    torch.cuda.synchronize()
    for (name, p), q in zip(graphed[0].named_parameters(), eager[0].parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_an_empty_batch_has_a_zero_loss(ensemble):
    # as the fused losses give; the naive and multi-embedding BCE means were NaN
    model = _model(ensemble)
    loss, out = model.loss(random_batch(tiny_schema(), B=0, empty_rows=0))
    assert loss.item() == 0.0 and out.prob.shape == (0,)
    loss.backward()


@pytest.mark.parametrize("ensemble", ["naive", "cetnet", "kdef"])
def test_a_member_of_another_output_shape_is_named(ensemble):
    """Members (a user's) returning [B, 1] are squeezed: with every member at [B, 1] and
    B == K the naive ensemble's labels broadcast transposed, a finite, wrong loss. Any other
    shape is one error naming the member (torch.stack's said nothing of whose)."""
    batch = random_batch(tiny_schema(), B=2)
    model = _model(ensemble)  # two members: K == B
    loss, out = model.loss(batch)

    class Reshaped(torch.nn.Module):
        def __init__(self, inner, shape):
            super().__init__()
            self.inner, self.shape = inner, shape

        def forward(self, view):
            return self.inner(view).reshape(self.shape)

    plain = dict(model.members)
    for name in model.member_names:
        model.members[name] = Reshaped(plain[name], (-1, 1))
    again, out2 = model.loss(batch)
    torch.testing.assert_close(again, loss)
    torch.testing.assert_close(out2.prob, out.prob)
    name = model.member_names[-1]
    model.members[name] = Reshaped(plain[name], (1, -1))
    with pytest.raises(ValueError, match=rf"member '{name}' returned logits of shape \(1, 2\); "
                                         r"a member returns \[B\] or \[B, 1\] logits \(B = 2\)"):
        model.loss(batch)
