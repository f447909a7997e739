"""Members: shapes, empty sequences, gradient isolation between members' tables, overfitting."""

from __future__ import annotations

import pytest
import torch

from cetnet.models import MEMBERS, EmbeddingFront, build_member
from models_support import one_thread, random_batch, table_grad, tiny_schema  # noqa: F401

# (kind, hyperparameters): every member with its defaults plus the main variants.
VARIANTS = [
    ("dnn", {}),
    ("dnn", {"batch_norm": True, "dropout": 0.1}),
    ("dcnv2", {}),
    ("dcnv2", {"rank": 4, "structure": "parallel"}),
    ("dhen", {}),
    ("dhen", {"ensemble": "sum", "slots": 5, "dcn_rank": 4, "num_layers": 3}),
    ("interformer", {}),
    ("interformer", {"seq_merge": "masknet", "interaction": "dot", "gate": "sigmoid",
                     "num_layers": 1}),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)]
DIM = 8


def _member_setup(kind, hp, K=1, schema=None):
    schema = schema or tiny_schema()
    front = EmbeddingFront(schema, DIM, K, optimizer=None)
    members = [build_member(kind, schema, DIM, **hp) for _ in range(K)]
    return schema, front, members


@pytest.mark.parametrize("kind,hp", VARIANTS, ids=IDS)
def test_shape_finite_and_empty_sequences(kind, hp):
    schema, front, (member,) = _member_setup(kind, hp)
    batch = random_batch(schema, B=12, empty_rows=3)
    z = member(front(batch)[0])
    assert z.shape == (12,)
    assert torch.isfinite(z).all()
    z.sum().backward()
    assert torch.isfinite(front.embedding.weight.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in member.parameters() if p.grad is not None)
    # every row without any sequence item, and sequences shorter than the schema's T
    member.eval()
    empty = random_batch(schema, B=5, empty_rows=5)
    assert torch.isfinite(member(front(empty)[0])).all()


def test_one_sequence_and_no_dense():
    schema = tiny_schema(n_dense=0, two_sequences=False)
    batch = random_batch(schema, B=8)
    for kind in MEMBERS:
        _, front, (member,) = _member_setup(kind, {}, schema=schema)
        z = member(front(batch)[0])
        assert z.shape == (8,) and torch.isfinite(z).all()


@pytest.mark.parametrize("kind", list(MEMBERS))
def test_gradient_reaches_only_own_tables(kind):
    schema, front, members = _member_setup(kind, {}, K=2)
    batch = random_batch(schema, B=16)
    views = front(batch)
    members[0](views[0]).sum().backward()
    emb = front.embedding
    for f in schema.categorical:
        assert table_grad(emb, 0, f.name).abs().sum() > 0, f"{kind}: no gradient on {f.name}"
        assert table_grad(emb, 1, f.name).abs().sum() == 0, f"{kind}: leaked into member 1"
        assert table_grad(emb, 0, f.name)[0].abs().sum() == 0  # padding row
    assert all(p.grad is None for p in members[1].parameters())


@pytest.mark.parametrize("kind", list(MEMBERS))
def test_overfits_tiny_batch(kind):
    schema, front, (member,) = _member_setup(kind, {})
    batch = random_batch(schema, B=32, seed=1)
    params = list(front.parameters()) + list(member.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    losses = []
    for _ in range(100):
        loss = bce(member(front(batch)[0]), batch.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (kind, losses[0], losses[-1])


def test_embedding_front_refuses_a_bool_dim():
    with pytest.raises(TypeError, match="dims must be an int or a sequence of ints, got True"):
        EmbeddingFront(tiny_schema(), True, 2, optimizer=None)
