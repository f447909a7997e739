"""Shared inputs and references of the MultiTableEmbedding tests (every backend, every device):
one input of every kind, batches with hot ids, the float64 reference outputs, hand-written
optimizer steps, and the torch.compile check. Test files import from here, never from each
other."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cetnet_kernels import EmbeddingFeature, MultiTableEmbedding, multi_table_embedding_reference

FEATURES = [
    EmbeddingFeature("user", 40),                  # single id, int64
    EmbeddingFeature("item", 31),                  # single id, int32
    EmbeddingFeature("history", 25),               # padded sequence [B, T]
    EmbeddingFeature("tags", 17, pooling="sum"),   # bag (with an empty bag)
    EmbeddingFeature("genres", 9, pooling="mean"),  # bag (mean)
    EmbeddingFeature("scores", 12),                # weighted bag
]
DIMS = [1, 10, 16]  # wide part, odd dim, SIMD-width dim


def make_ids(B: int = 6, *, pad: int | None = -1, gen: torch.Generator | None = None):
    """One input of every kind (B >= 3), with padding entries and an empty bag."""
    g = gen or torch.Generator().manual_seed(1)
    ids = {
        "user": torch.randint(0, 40, (B,), generator=g),
        "item": torch.randint(0, 31, (B,), generator=g, dtype=torch.int32),
        "history": torch.randint(0, 25, (B, 5), generator=g),
    }
    if pad is not None:
        ids["history"][0, 3:] = pad
        ids["history"][2, 0] = pad
    lens = torch.randint(0, 5, (B,), generator=g)
    lens[1] = 0  # an empty bag
    for name, V in (("tags", 17), ("genres", 9), ("scores", 12)):
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        values = torch.randint(0, V, (int(lens.sum()),), generator=g)
        if pad is not None and values.numel() > 2:
            values[1] = pad
        ids[name] = (values, offsets)
        lens = lens.roll(1)
    v, o = ids["scores"]
    ids["scores"] = (v.int(), o.int(), torch.rand(v.shape, generator=g))
    return ids


def reference_outputs(mod: MultiTableEmbedding, ids, weight64: torch.Tensor | None = None):
    """The float64 reference on (a float64 copy of) the module's tables; with ``weight64`` (a
    flat float64 leaf) the tables are its views, so gradients land in ``weight64.grad``."""
    if weight64 is None:
        weight64 = mod.weight.detach().double()
    tables = []
    for m, d in enumerate(mod.dims):
        row = []
        for f, feat in enumerate(mod.features):
            off = mod.layout.table_offsets[m * len(mod.features) + f]
            row.append(weight64[off:off + feat.num_embeddings * d].view(feat.num_embeddings, d))
        tables.append(row)
    inputs = []
    for feat in mod.features:
        x = ids[feat.name]
        if isinstance(x, torch.Tensor):
            inputs.append(x)
        else:
            psw = x[2].double() if len(x) == 3 else None
            inputs.append((x[0], x[1], psw))
    return multi_table_embedding_reference(tables, inputs, [f.pooling for f in mod.features],
                                           mod.padding_idx)


def with_bad_id(base, name: str, bad: int):
    """A copy of the ids ``base`` whose feature ``name`` has ``bad`` as its last id."""
    ids = dict(base)
    x = ids[name]
    if isinstance(x, torch.Tensor):
        x = x.clone()
        x.view(-1)[-1] = bad
        ids[name] = x
    else:
        v = x[0].clone()
        v[-1] = bad
        ids[name] = (v, *x[1:])
    return ids


def zipf_ids(n: int, vocab: int, rng: np.random.Generator, a: float = 1.05) -> torch.Tensor:
    return torch.from_numpy((rng.zipf(a, n) - 1) % vocab)


def loss_of(outs, grads):
    return sum((o.double() * g).sum() for o, g in zip(outs, grads))


def to_device(ids, device):
    """A copy of the ids mapping (tensors and bag tuples) on ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v))
            for k, v in ids.items()}


def sample_inputs(device, B: int = 6, **kw):
    """The shared input of the embedding op family: one input of every kind (:func:`make_ids`,
    with padding entries and an empty bag) on ``device``, for a module of :data:`FEATURES`."""
    return to_device(make_ids(B, **kw), device)


def batches(steps: int, B: int, rng: np.random.Generator):
    """Batches with repeated ids, hot Zipf ids, sequences with padding and bags."""
    out = []
    for _ in range(steps):
        hist = zipf_ids(B * 4, 25, rng).view(B, 4)
        hist[0, 2:] = -1
        lens = torch.from_numpy(rng.integers(0, 4, B))
        out.append({
            "user": zipf_ids(B, 40, rng),
            "item": torch.full((B,), 3, dtype=torch.int32),  # every row the same id
            "history": hist,
            "tags": (zipf_ids(int(lens.sum()), 17, rng),
                     torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])),
            "genres": (zipf_ids(int(lens.sum()), 9, rng),
                       torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])),
            "scores": (zipf_ids(int(lens.sum()), 12, rng),
                       torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
                       torch.from_numpy(rng.random(int(lens.sum()))).float()),
        })
    return out


def touched_rows(mod: MultiTableEmbedding, ids) -> torch.Tensor:
    """[M * sum V] bool: the table rows a batch reads (padding excluded)."""
    mask = torch.zeros(mod.num_models * sum(mod._vocab), dtype=torch.bool)
    for m in range(mod.num_models):
        for f, feat in enumerate(mod.features):
            x = ids[feat.name]
            x = (x if isinstance(x, torch.Tensor) else x[0]).reshape(-1).long()
            x = x[x != mod.padding_idx] if mod.padding_idx is not None else x
            off = mod.layout.state_offsets[m * len(mod.features) + f]
            mask[off + x] = True
    return mask


def row_view(mod: MultiTableEmbedding, flat: torch.Tensor, m: int, f: int) -> torch.Tensor:
    off = mod.layout.table_offsets[m * len(mod.features) + f]
    V, D = mod._vocab[f], mod.dims[m]
    return flat[off:off + V * D].view(V, D)


def fused_reference_step(mod: MultiTableEmbedding, ref_w: torch.Tensor, grad: torch.Tensor,
                         touched: torch.Tensor, lr: float, wd: float,
                         state: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """FBGEMM's EXACT_SGD (``state`` None) or EXACT_ROWWISE_ADAGRAD (``state``: the row-wise
    state, updated too) on the rows a batch touched, written out by hand: weight decay adds
    ``wd * w`` to the gradient of those rows only."""
    for m in range(mod.num_models):
        for f in range(len(mod.features)):
            w = row_view(mod, ref_w, m, f)
            g = row_view(mod, grad, m, f) + wd * w
            off = mod.layout.state_offsets[m * len(mod.features) + f]
            rows = touched[off:off + mod._vocab[f]]
            if state is None:
                w[rows] -= lr * g[rows]
                continue
            s = state[off:off + mod._vocab[f]]
            s[rows] += (g[rows] ** 2).mean(dim=1)
            w[rows] -= lr * g[rows] / (s[rows].sqrt() + eps)[:, None]


def sgd_matches_torch_optim(mod: MultiTableEmbedding, steps: int, B: int,
                            rng: np.random.Generator, lr: float, tol: float = 1e-12) -> None:
    """``mod`` (fused SGD at ``lr``, any device) trains on :func:`batches` as
    ``torch.optim.SGD`` does on a float64 CPU copy of its weight, step after step."""
    ref = mod.weight.detach().double().cpu().clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=lr)
    for ids in batches(steps, B, rng):
        outs = mod(to_device(ids, mod.weight.device))
        grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
        loss_of(outs, [g.to(o.device) for g, o in zip(grads, outs)]).backward()
        assert mod.weight.grad is None  # no gradient tensor: the update happened in backward
        opt.zero_grad()
        loss_of(reference_outputs(mod, ids, ref), grads).backward()
        opt.step()
        torch.testing.assert_close(mod.weight.detach().double().cpu(), ref.detach(), rtol=tol,
                                   atol=tol)


def adagrad_matches_hand_written(mod: MultiTableEmbedding, steps: int, B: int,
                                 rng: np.random.Generator) -> None:
    """``mod`` (float64, fused row-wise Adagrad, any device) trains on :func:`batches` as
    :func:`fused_reference_step` does by hand: weights and state, step after step."""
    ref_w = mod.weight.detach().cpu().clone()
    ref_s = torch.zeros(mod.optimizer_state.shape, dtype=torch.float64)
    for ids in batches(steps, B, rng):
        outs = mod(to_device(ids, mod.weight.device))
        grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
        loss_of(outs, [g.to(o.device) for g, o in zip(grads, outs)]).backward()
        w64 = ref_w.clone().requires_grad_()
        loss_of(reference_outputs(mod, ids, w64), grads).backward()
        fused_reference_step(mod, ref_w, w64.grad, touched_rows(mod, ids), mod.lr,
                             mod.weight_decay, ref_s, mod.eps)
        torch.testing.assert_close(mod.weight.detach().cpu(), ref_w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mod.optimizer_state.cpu(), ref_s, rtol=1e-12, atol=1e-12)


def compile_matches_eager(make: Callable[[], MultiTableEmbedding], ids, optimizer: str | None,
                          steps: int) -> None:
    """Two modules from ``make`` (one state), one run eagerly and one through
    ``torch.compile(fullgraph=True)``, train ``steps`` steps on ``ids`` (the dense mode with a
    hand-written SGD step) and stay equal: weights after every step, the row-wise state at
    the end."""
    torch._dynamo.reset()
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())

    def loss_fn(mod, ids):
        a, b = mod(ids)
        return (a * a).sum() + b.sum()

    cfn = torch.compile(loss_fn, fullgraph=True)
    for _ in range(steps):
        for mod, fn in ((eager, loss_fn), (compiled, cfn)):
            fn(mod, ids).backward()
            if optimizer is None:
                with torch.no_grad():
                    mod.weight -= 0.1 * mod.weight.grad
                mod.weight.grad = None
        torch.testing.assert_close(compiled.weight, eager.weight, rtol=1e-6, atol=1e-6)
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(compiled.optimizer_state, eager.optimizer_state)
