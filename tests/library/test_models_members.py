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


@pytest.mark.parametrize("kind", list(MEMBERS))
def test_every_member_runs_in_float64_with_dense_features(kind):
    # the front cast the dense values to float32, which DHEN's and InterFormer's dense
    # projection refused beside float64 weights
    schema, front, (member,) = _member_setup(kind, {})
    front.double()
    member.double()
    view = front(random_batch(schema, B=8))[0]
    assert view.dense.dtype == view.fields.dtype == torch.float64
    z = member(view)
    assert z.dtype == torch.float64 and torch.isfinite(z).all()


@pytest.mark.parametrize("interaction", ["dhen", "dot"])
def test_interformer_with_one_non_sequence_token(interaction):
    # an item and its history: one token, which DHEN's concat could not split between DOT
    # and DCN
    from cetnet.data.schema import FeatureSpec, Schema

    schema = Schema([FeatureSpec("item", "sparse", 40),
                     FeatureSpec("hist_item", "sequence", 40, max_len=5, source="item")],
                    group=None)
    _, front, (member,) = _member_setup("interformer", {"interaction": interaction,
                                                        "num_layers": 1}, schema=schema)
    z = member(front(random_batch(schema, B=6))[0])
    assert z.shape == (6,) and torch.isfinite(z).all()
    z.sum().backward()


@pytest.mark.parametrize("kind", list(MEMBERS))
def test_an_out_of_range_sequence_id_is_padding_under_bounds_check_off(kind):
    # the lookup reads a bad id as a zero vector; the mask must count it as padding too (a
    # real item changed mean pools and added an attended token)
    schema = tiny_schema()
    front = EmbeddingFront(schema, DIM, 1, optimizer=None, bounds_check="off")
    member = build_member(kind, schema, DIM)
    member.eval()
    batch = random_batch(schema, B=8, empty_rows=0)
    seq = batch.sequence["hist_item"]
    padded = seq == 0
    assert padded.any()
    bad = seq.clone()
    bad[padded] = torch.where(torch.arange(int(padded.sum())) % 2 == 0, 10**6, -3)
    clean = member(front(batch)[0])
    batch.sequence["hist_item"] = bad
    view = front(batch)[0]
    assert torch.equal(view.seq_mask["hist_item"], ~padded)
    torch.testing.assert_close(member(view), clean, rtol=0, atol=0)


@pytest.mark.parametrize("two, hp", [(False, {}), (True, {}), (True, {"seq_merge": "masknet"})])
def test_interformer_ignores_what_padding_positions_hold(two, hp):
    """MemberInputs promises zero padding; a user's front that breaks it (row 0 trained, say)
    must not move InterFormer's predictions: they changed by up to 0.046 with 5.0 there."""
    from cetnet.models.front import MemberInputs

    schema = tiny_schema(T=6, two_sequences=two)
    torch.manual_seed(0)
    front = EmbeddingFront(schema, 8, 1)
    member = build_member("interformer", schema, 8, **hp).eval()
    batch = random_batch(schema, B=12, empty_rows=2)
    with torch.no_grad():
        v = front(batch)[0]
        assert any((~m).any() for m in v.seq_mask.values())  # the batch has padding
        for junk in (5.0, float("nan")):
            noisy = {n: torch.where(v.seq_mask[n].unsqueeze(-1), s, junk)
                     for n, s in v.sequences.items()}
            assert torch.equal(member(MemberInputs(v.fields, v.dense, noisy, v.seq_mask)),
                               member(v))
