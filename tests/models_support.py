"""Tiny hand-made schemas and random batches for the model-library tests."""

from __future__ import annotations

import pytest
import torch

from cetnet.data.schema import Batch, FeatureSpec, Schema


def tiny_schema(T: int = 6, n_dense: int = 1, two_sequences: bool = True) -> Schema:
    """user, item, a dense value, gender, a multihot genre bag and one or two sequences."""
    feats = [FeatureSpec("user", "sparse", 30), FeatureSpec("item", "sparse", 40)]
    feats += [FeatureSpec(f"d{i}", "dense") for i in range(n_dense)]
    feats += [FeatureSpec("gender", "sparse", 4),
              FeatureSpec("genres", "multihot", 10, max_len=3, pooling="mean"),
              FeatureSpec("hist_item", "sequence", 40, max_len=T, source="item")]
    if two_sequences:
        feats.append(FeatureSpec("hist_genre", "sequence", 10, max_len=T))
    return Schema(feats)


def movielens_schema(T: int = 50) -> Schema:
    """The MovieLens-100k-like schema of the brief (vocabulary sizes of ml-100k)."""
    return Schema([
        FeatureSpec("user", "sparse", 945), FeatureSpec("item", "sparse", 1684),
        FeatureSpec("age", "dense"), FeatureSpec("gender", "sparse", 4),
        FeatureSpec("occupation", "sparse", 23), FeatureSpec("zip", "sparse", 800),
        FeatureSpec("year", "sparse", 75),
        FeatureSpec("genres", "multihot", 21, max_len=6, pooling="mean"),
        FeatureSpec("hist_item", "sequence", 1684, max_len=T, source="item"),
        FeatureSpec("hist_genre", "sequence", 21, max_len=T)])


def random_batch(schema: Schema, B: int = 16, *, seed: int = 0, empty_rows: int = 2) -> Batch:
    """Random ids >= 1; the first ``empty_rows`` rows have all-padding sequences and empty bags,
    the others random-length sequences (0-padded tails)."""
    g = torch.Generator().manual_seed(seed)
    sparse, multihot, sequence = {}, {}, {}
    for f in schema.features:
        if f.kind == "sparse":
            sparse[f.name] = torch.randint(1, f.vocab_size, (B,), generator=g)
        elif f.kind == "multihot":
            sizes = torch.randint(1, f.max_len + 1, (B,), generator=g)
            sizes[:empty_rows] = 0
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            values = torch.randint(1, f.vocab_size, (int(offsets[-1]),), generator=g)
            multihot[f.name] = (values, offsets)
        elif f.kind == "sequence":
            ids = torch.randint(1, f.vocab_size, (B, f.max_len), generator=g)
            lengths = torch.randint(1, f.max_len + 1, (B,), generator=g)
            lengths[:empty_rows] = 0
            ids[torch.arange(f.max_len)[None, :] >= lengths[:, None]] = 0
            sequence[f.name] = ids
    n_dense = len(schema.dense)
    label = (torch.rand(B, generator=g) < 0.4).float()
    return Batch(sparse, torch.randn(B, n_dense, generator=g), multihot, sequence, label,
                 sparse.get("user", torch.zeros(B, dtype=torch.long)))


def table_grad(embedding, m: int, name: str):
    """Member m's slice of ``embedding.weight.grad`` for feature ``name`` (``[V, D_m]``), found
    through the storage offset of the :meth:`table` view."""
    t = embedding.table(m, name)
    off = t.storage_offset() - embedding.weight.storage_offset()
    return embedding.weight.grad[off:off + t.numel()].view_as(t)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
