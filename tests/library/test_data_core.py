"""cetnet.data building blocks: vocabularies, dense normalization, the chunked csv reader,
batching, the synthetic generator, caching and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cetnet.data import (DataFormatError, DenseStats, FeatureSpec, Schema, Split, TokenCounter,
                         Vocabulary, load_dataset, make_synthetic, prepare)
from cetnet.data.csvio import parse_float, read_chunks
from cetnet.data.dataset import CTRDataset
from cetnet.data.vocab import MISSING, encode_with_train_vocab, factorize


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Rank AUC (ties averaged)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = label == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ------------------------------------------------------------------------------ vocabularies

def test_vocabulary_ids_counts_and_min_count():
    v = Vocabulary.from_counts({"a": 5, "b": 7, "c": 1, "d": 5, MISSING: 9}, min_count=2)
    assert v.tokens == ["b", "a", "d"]  # by count, ties by token; missing and rare dropped
    assert v.size == 5
    assert [v.id(t) for t in ["b", "a", "d", "c", "zzz", MISSING]] == [2, 3, 4, 1, 1, 1]
    assert v.encode(["d", "c"]).tolist() == [4, 1]
    assert Vocabulary.from_dict(v.to_dict()).tokens == v.tokens
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.from_counts({"a": 1}, min_count=0)


def test_token_counter_table_maps_provisional_codes():
    c = TokenCounter()
    codes = c.add(["x", "y", "x", "z", "x", "y"])
    assert min(codes) >= 1  # 0 stays the padding code
    vocab, table = c.finalize(min_count=2)
    assert vocab.tokens == ["x", "y"]
    assert table[0] == 0
    assert table[np.array(codes)].tolist() == [2, 3, 2, 1, 2, 3]


def test_vocabulary_built_on_train_only():
    categories, codes = factorize(["a", "a", "b", "c", "c", "d", "e", "a"])
    assert categories == ["a", "b", "c", "d", "e"] and codes.tolist() == [0, 0, 1, 2, 2, 3, 4, 0]
    vocab, ids = encode_with_train_vocab(categories, codes, slice(0, 5), min_count=1)
    assert sorted(vocab.tokens) == ["a", "b", "c"]  # d, e only occur after train
    assert ids[5:].tolist() == [1, 1, vocab.id("a")]
    vocab2, ids2 = encode_with_train_vocab(categories, codes, slice(0, 5), min_count=2)
    assert vocab2.tokens == ["a", "c"] and ids2[2] == 1  # 'b' seen once in train -> OOV
    bags = np.array([[0, 1], [2, -1], [3, -1]])  # -1 pads a bag
    _, bag_ids = encode_with_train_vocab(categories, bags, slice(0, 2))
    assert bag_ids[1, 1] == 0 and bag_ids[2, 0] == 1  # padding 0, unseen 'd' OOV


# ------------------------------------------------------------------------- dense features

def test_dense_normalized_with_train_stats_and_imputed():
    train = np.array([[1.0, 5.0], [3.0, 5.0], [np.nan, 5.0], [5.0, 5.0]])
    st = DenseStats.fit(train)
    assert st.mean.tolist() == [3.0, 5.0]
    assert math.isclose(st.std[0], math.sqrt(8 / 3))
    assert st.std[1] == 1.0  # constant column: no division by zero
    z, imputed = st.transform(np.array([[3.0, 6.0], [np.nan, np.nan], [7.0, 5.0]]))
    assert z.dtype == np.float32
    assert imputed.tolist() == [1, 1]
    assert z[1].tolist() == [0.0, 0.0]  # imputed with the train mean
    assert math.isclose(z[2, 0], 4 / math.sqrt(8 / 3), rel_tol=1e-6)
    z_train, _ = st.transform(train)
    assert abs(float(np.mean(z_train[[0, 1, 3], 0]))) < 1e-6


def test_dense_stats_near_the_float64_limit_stay_finite():
    """Finite values up to 1e308 (the csv readers accept them) give finite statistics and
    normalized values (the sums and squares are taken on power-of-two scaled columns, which
    leaves ordinary data's statistics bitwise as they were); a normalized value beyond
    float32's range saturates; an empty matrix has the statistics of no data."""
    with np.errstate(all="raise"):
        st = DenseStats.fit(np.array([[1e308], [1e308], [1.0], [np.nan]]))
        assert np.isfinite(st.mean).all() and np.isfinite(st.std).all()
        z, _ = st.transform(np.array([[1e308], [1.0], [-1e308]]))
        assert np.isfinite(z).all() and z[0, 0] > 0 > z[1, 0] > z[2, 0]
        outlier = DenseStats.fit(np.array([[1e200], [1.0], [2.0]]))
        assert math.isclose(outlier.mean[0], 1e200 / 3)
        unit = DenseStats.fit(np.array([[1.0], [2.0], [4.0]]))
        far, _ = unit.transform(np.array([[1e300], [-1e300]]))
        limit = float(np.finfo(np.float32).max)
        assert far[:, 0].tolist() == [limit, -limit]
    rng = np.random.default_rng(0)
    data = rng.normal(1e3, 7.0, (999, 3))
    data[5, 1] = np.nan
    st = DenseStats.fit(data)
    present = ~np.isnan(data)
    n = present.sum(0)
    mean = np.where(present, data, 0.0).sum(0) / n
    std = np.sqrt((np.where(present, data - mean, 0.0) ** 2).sum(0) / n)
    assert st.mean.tolist() == mean.tolist() and st.std.tolist() == std.tolist()
    empty = DenseStats.fit(np.zeros((0, 2)))
    assert empty.mean.tolist() == [0.0, 0.0] and empty.transform(np.zeros((0, 2)))[0].shape == (0, 2)


# ------------------------------------------------------------------------------ csv reader

def _write(path, text):
    path.write_text(text)
    return path


def test_chunked_reader_matches_whole_file(tmp_path):
    rows = [f"{i},{i % 3},tok{i}" for i in range(23)]
    p = _write(tmp_path / "a.csv", "x,y,z\n" + "\n".join(rows) + "\n")
    chunks = list(read_chunks(p, ["z", "x"], chunk_size=5))
    assert [len(lines) for lines, _ in chunks] == [5, 5, 5, 5, 3]
    assert sum((list(c["x"]) for _, c in chunks), []) == [str(i) for i in range(23)]
    assert sum((lines for lines, _ in chunks), []) == list(range(2, 25))
    assert "y" not in chunks[0][1]  # only the requested columns come back
    (_, whole), = read_chunks(p, ["z", "x"], chunk_size=1000)
    assert list(whole["z"]) == [f"tok{i}" for i in range(23)]


def test_reader_errors_name_file_line_and_column(tmp_path):
    p = _write(tmp_path / "bad.csv", "x,y\n1,2\n3\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv, line 1, column 'z': column is missing"):
        list(read_chunks(p, ["x", "z"]))
    with pytest.raises(DataFormatError,
                       match=r"bad\.csv, line 3, column 'y': expected 2 columns, got 1") as e:
        list(read_chunks(p, ["x"], chunk_size=1))
    assert (e.value.line, e.value.column) == (3, "y")
    p = _write(tmp_path / "long.csv", "x,y\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"line 2, column '<extra #3>'"):
        list(read_chunks(p, ["x"]))
    with pytest.raises(DataFormatError, match=r"f\.csv, line 8, column 'price': not a finite"):
        parse_float(["1.5", "abc"], "f.csv", [7, 8], "price")
    assert math.isnan(parse_float([""], "f.csv", [1], "price")[0])


# --------------------------------------------------------------------------------- batching

def _tiny_split(n: int = 10) -> Split:
    schema = Schema([FeatureSpec("user", "sparse", n + 2), FeatureSpec("d", "dense"),
                     FeatureSpec("bag", "multihot", 6, max_len=3),
                     FeatureSpec("seq", "sequence", 6, max_len=4, source=None)])
    g = torch.Generator().manual_seed(1)
    bag = torch.randint(1, 6, (n, 3), generator=g)
    bag[torch.arange(3) >= torch.randint(0, 4, (n, 1), generator=g)] = 0  # 0..3 real ids
    return Split(schema, sparse={"user": torch.arange(n) + 2}, dense=torch.randn(n, 1),
                 multihot={"bag": bag}, sequence={"seq": torch.randint(0, 6, (n, 4))},
                 label=torch.randint(0, 2, (n,)), group=torch.arange(n))


def test_batch_shapes_and_dtypes_follow_the_contract():
    split = _tiny_split()
    b = next(split.batches(4))
    assert len(b) == 4
    assert b.sparse["user"].dtype == torch.int64 and b.sparse["user"].shape == (4,)
    assert b.dense.dtype == torch.float32 and b.dense.shape == (4, 1)
    values, offsets = b.multihot["bag"]
    assert values.dtype == offsets.dtype == torch.int64 and offsets.shape == (5,)
    assert (values != 0).all() and offsets[0] == 0 and offsets[-1] == len(values)
    bags = split.multihot["bag"][:4]
    for r in range(4):
        assert values[offsets[r]:offsets[r + 1]].tolist() == [x for x in bags[r].tolist() if x]
    assert b.sequence["seq"].dtype == torch.int64 and b.sequence["seq"].shape == (4, 4)
    assert b.label.dtype == torch.float32 and b.group.dtype == torch.int64
    assert [len(x) for x in split.batches(4)] == [4, 4, 2]
    assert [len(x) for x in split.batches(4, drop_last=True)] == [4, 4]


def test_shuffle_is_deterministic_by_seed_and_covers_every_row():
    split = _tiny_split(50)

    def users(seed):
        return torch.cat([b.sparse["user"] for b in split.batches(8, shuffle=True, seed=seed)])

    assert torch.equal(users(3), users(3))
    assert not torch.equal(users(3), users(4))
    assert sorted(users(3).tolist()) == list(range(2, 52))
    plain = torch.cat([b.sparse["user"] for b in split.batches(8)])
    assert plain.tolist() == list(range(2, 52))


def test_split_rejects_ids_outside_the_vocabulary():
    schema = Schema([FeatureSpec("user", "sparse", 3)])
    with pytest.raises(ValueError, match="outside"):
        Split(schema, sparse={"user": torch.tensor([2, 3])}, dense=torch.zeros(2, 0),
              multihot={}, sequence={}, label=torch.zeros(2), group=torch.zeros(2))


# -------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed():
    a = make_synthetic(3000, seed=7)
    b = make_synthetic(3000, seed=7)
    c = make_synthetic(3000, seed=8)
    for name in ("train", "test"):
        sa, sb, sc = a.splits[name], b.splits[name], c.splits[name]
        assert torch.equal(sa.label, sb.label) and torch.equal(sa.dense, sb.dense)
        assert all(torch.equal(sa.sequence[k], sb.sequence[k]) for k in sa.sequence)
        assert not torch.equal(sa.sparse["item"], sc.sparse["item"])
    assert [len(s) for s in a.splits.values()] == [2400, 300, 300]
    kinds = {f.kind for f in a.schema.features}
    assert kinds == {"sparse", "dense", "multihot", "sequence"}
    assert a.schema.by_name("hist_item").source == "item"


def test_synthetic_planted_signal_is_learnable():
    ds = make_synthetic(20_000, seed=0)
    test = ds.splits["test"]
    y = test.label.numpy()
    assert 0.2 < y.mean() < 0.8
    assert auc(test.extras["planted_logit"].numpy(), y) > 0.75
    # the sequence part alone carries signal: share of history in the target's cluster
    items, hist = test.sparse["item"].numpy() - 2, test.sequence["hist_item"].numpy() - 2
    same = ((hist % 20) == (items % 20)[:, None]) & (hist >= 0)
    share = same.sum(1) / np.maximum((hist >= 0).sum(1), 1)
    assert auc(share, y) > 0.55
    no_signal = make_synthetic(20_000, seed=0, signal=0.0).splits["test"]
    assert abs(auc(no_signal.extras["planted_logit"].numpy() + items, no_signal.label.numpy())
               - 0.5) < 0.03


def test_synthetic_batches_carry_the_planted_logit():
    b = next(make_synthetic(500, seed=1).splits["train"].batches(64, shuffle=True))
    assert b.extras["planted_logit"].shape == (64,)
    assert b.multihot["tags"][1].shape == (65,)


# ---------------------------------------------------------------------- caching and registry

def test_save_and_load_round_trip(tmp_path):
    ds = make_synthetic(600, seed=2)
    ds.save(tmp_path / "ds.pt")
    back = CTRDataset.load(tmp_path / "ds.pt")
    assert back.schema == ds.schema and back.summary() == ds.summary()
    ba = next(ds.splits["valid"].batches(50))
    bb = next(back.splits["valid"].batches(50))
    assert all(torch.equal(x, y) for x, y in zip(ba.tensors(), bb.tensors()))


def test_registry():
    ds = prepare("synthetic", num_rows=300, seed=0)
    assert "dataset synthetic" in ds.summary()
    assert load_dataset("synthetic", num_rows=300, seed=0).summary() == ds.summary()
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="config"):
        load_dataset("bars")


def test_batch_to_device_on_the_cpu_is_to():
    from models_support import random_batch, tiny_schema

    batch = random_batch(tiny_schema(), B=8)
    moved = batch.to_device("cpu")
    assert all(torch.equal(a, b) for a, b in zip(batch.tensors(), moved.tensors()))
    assert len(list(moved.tensors())) == len(list(batch.tensors()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_to_cuda_device_never_waits():
    """Batch.to_device copies to a CUDA device through pinned memory without blocking (a copy
    from pageable memory waits for everything queued on the device): nothing synchronizes
    under CUDA's sync debug mode, and the copies (extras too) equal the batch; a batch already
    on the device is passed through. (Sync debug mode does not flag a non-blocking copy from
    pageable memory either: this checks the result and the absence of a synchronizing call,
    not the pinning itself.)"""
    from models_support import random_batch, tiny_schema

    batch = random_batch(tiny_schema(), B=64)
    batch.extras["planted"] = torch.randn(64)
    batch.to_device("cuda")  # (first call: the pinned allocator's blocks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = batch.to_device("cuda")
        again = on_gpu.to_device("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    pairs = [*zip(batch.tensors(), on_gpu.tensors()),
             (batch.extras["planted"], on_gpu.extras["planted"])]
    assert all(b.is_cuda and torch.equal(a, b.cpu()) for a, b in pairs)
    assert all(a is b for a, b in zip(on_gpu.tensors(), again.tensors()))
