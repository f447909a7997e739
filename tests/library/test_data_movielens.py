"""MovieLens-100k on the real files (from the recbole wheel, fetched once per test session).

Set ``CETNET_TEST_CACHE`` to a folder to keep the download between sessions.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from cetnet.data import DataFormatError, OOV_ID, load_dataset
from cetnet.data import movielens as ml
from cetnet.data.movielens import build_movielens, fetch_raw, load_movielens, read_raw


@pytest.fixture(scope="session")
def ml_root(tmp_path_factory):
    keep = os.environ.get("CETNET_TEST_CACHE")
    return keep if keep else tmp_path_factory.mktemp("cetnet-cache")


@pytest.fixture(scope="session")
def raw(ml_root):
    return read_raw(fetch_raw(ml_root, verbose=False, timeout=2.0))


@pytest.fixture(scope="session")
def ds(ml_root, raw):  # raw first: the download happens once
    return load_movielens(ml_root, verbose=False)


@pytest.fixture(scope="session")
def by_time(raw):
    """The raw interactions in the dataset's row order (sorted by time, stable)."""
    order = np.argsort(raw.timestamp, kind="stable")
    return {k: getattr(raw, k)[order] for k in ("user", "item", "rating", "timestamp")}


def test_raw_tables(raw):
    assert len(raw.user) == 100_000
    assert len(raw.users) == 943 and len(raw.items) == 1682
    assert raw.items[1] == ("1995", ["Animation", "Children's", "Comedy"])
    assert raw.users[1] == ("24", "M", "technician", "85711")


def test_rows_split_by_time_80_10_10(ds):
    s = ds.splits
    assert [len(s[k]) for k in ("train", "valid", "test")] == [80_000, 10_000, 10_000]
    ts = {k: s[k].extras["timestamp"] for k in s}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
    assert all(bool((t[1:] >= t[:-1]).all()) for t in ts.values())


def test_labels_are_rating_at_least_4(ds, by_time):
    y = torch.cat([ds.splits[k].label for k in ("train", "valid", "test")]).numpy()
    assert np.array_equal(y, (by_time["rating"] >= 4).astype(np.float32))
    assert 0.55 < y.mean() < 0.56  # 55,375 ratings of 4 or 5
    assert torch.equal(ds.splits["test"].group, torch.as_tensor(by_time["user"][90_000:]))


def test_vocabularies_come_from_train_only(ds, by_time, raw):
    train_users = set(by_time["user"][:80_000].tolist())
    train_items = set(by_time["item"][:80_000].tolist())
    sizes = {f.name: f.vocab_size for f in ds.schema.categorical}
    assert sizes["user"] == len(train_users) + 2
    assert sizes["item"] == len(train_items) + 2 == sizes["hist_item"]
    assert sizes["gender"] == 4 and sizes["occupation"] == 21 + 2
    assert sizes["genres"] == 19 + 2 and sizes["age_bucket"] == 7 + 2
    assert ds.schema.by_name("hist_item").source == "item"
    assert ds.schema.by_name("genres").kind == "multihot"
    assert ds.schema.group == "user" and [f.name for f in ds.schema.dense] == ["age"]
    # OOV ids = rows whose user / item never occurs in train
    for k, sl in (("valid", slice(80_000, 90_000)), ("test", slice(90_000, None))):
        st = ds.splits[k].stats
        assert st.oov["user"] == sum(u not in train_users for u in by_time["user"][sl].tolist())
        assert st.oov["item"] == sum(i not in train_items for i in by_time["item"][sl].tolist())
        assert int((ds.splits[k].sparse["user"] == OOV_ID).sum()) == st.oov["user"]
    assert ds.splits["train"].stats.oov["user"] == 0
    # items with an unreadable release year are missing -> OOV, and counted
    bad_year = {i for i, (y, _) in raw.items.items() if not y.isdigit()}
    assert ds.splits["train"].stats.oov["release_year"] == sum(
        i in bad_year for i in by_time["item"][:80_000].tolist()) > 0


def test_age_normalized_with_train_statistics(ds, raw, by_time):
    age = np.array([float(raw.users[u][0]) for u in by_time["user"].tolist()])
    mean, std = age[:80_000].mean(), age[:80_000].std()
    assert np.isclose(ds.dense_stats.mean[0], mean) and np.isclose(ds.dense_stats.std[0], std)
    got = ds.splits["test"].dense[:, 0].numpy()
    assert np.allclose(got, (age[90_000:] - mean) / std, atol=1e-5)
    assert all(s.stats.imputed == {"age": 0} for s in ds.splits.values())


def test_no_history_item_at_or_after_the_rows_timestamp(ds, by_time):
    """Every history item was rated strictly before the row (no future, no same-second ties),
    and the history runs from the most recent back."""
    users, items, stamps = by_time["user"], by_time["item"], by_time["timestamp"]
    ts_of = np.full((users.max() + 1, items.max() + 1), -1, dtype=np.int64)
    ts_of[users, items] = stamps
    assert (ts_of >= 0).sum() == 100_000  # (user, item) is unique, so it names one rating
    raw_item = np.array([-1, -1] + [int(t) for t in ds.vocabs["item"].tokens])  # id -> item
    checked = 0
    for split in ds.splits.values():
        hist = split.sequence["hist_item"].numpy()
        row_ts = split.extras["timestamp"].numpy()[:, None]
        known = hist >= 2  # padding (0) and OOV (1) name no item
        t = np.where(known, ts_of[split.group.numpy()[:, None], np.maximum(raw_item[hist], 0)],
                     -1)
        assert (t[known] >= 0).all()  # the user did rate that item
        assert (t[known] < np.broadcast_to(row_ts, t.shape)[known]).all()
        seq_t = np.where(known, t, np.iinfo(np.int64).max)  # OOV cells never break the order
        run = np.minimum.accumulate(seq_t, axis=1)
        assert (seq_t[known] == run[known]).all()  # non-increasing timestamps: newest first
        checked += int(known.sum())
    assert checked > 1_000_000


def test_history_matches_a_brute_force_reference(ds, by_time):
    n, T = 100_000, ds.schema.by_name("hist_item").max_len
    rows_of = defaultdict(list)
    for r, u in enumerate(by_time["user"].tolist()):
        rows_of[u].append(r)
    item_id = ds.vocabs["item"].id
    genre = ds.vocabs["hist_genre"].id
    all_hist = torch.cat([ds.splits[k].sequence["hist_item"] for k in ds.splits]).numpy()
    all_genre = torch.cat([ds.splits[k].sequence["hist_genre"] for k in ds.splits]).numpy()
    rng = np.random.default_rng(0)
    for r in rng.choice(n, 3000, replace=False).tolist():
        u, t = by_time["user"][r], by_time["timestamp"][r]
        earlier = [q for q in rows_of[u] if by_time["timestamp"][q] < t]
        earlier.sort(key=lambda q: (by_time["timestamp"][q], q), reverse=True)
        want = [item_id(str(by_time["item"][q])) for q in earlier[:T]]
        assert all_hist[r].tolist() == want + [0] * (T - len(want))
        assert (all_genre[r][:len(want)] >= 2).all() and (all_genre[r][len(want):] == 0).all()
    assert genre("Drama") >= 2


def test_second_load_is_cached_and_offline(ml_root, ds):
    t0 = time.perf_counter()
    again = load_movielens(ml_root, verbose=False, sources=())  # no source: cache only
    assert time.perf_counter() - t0 < 10.0  # generous: the 2 cores are shared
    assert again.summary() == ds.summary()
    assert load_dataset("movielens-100k", root=ml_root).schema == ds.schema


def test_min_count_maps_rare_values_to_oov(raw, by_time):
    ds5 = build_movielens(raw, min_count=5, max_seq_len=10)
    counts = Counter(by_time["item"][:80_000].tolist())
    assert ds5.schema.by_name("item").vocab_size == sum(c >= 5 for c in counts.values()) + 2
    rare = sum(c for c in counts.values() if c < 5)
    assert ds5.splits["train"].stats.oov["item"] == rare > 0
    assert ds5.schema.by_name("hist_item").max_len == 10


def test_batches_from_movielens(ds):
    b = next(ds.splits["train"].batches(256, shuffle=True, seed=0))
    assert set(b.sparse) == {"user", "item", "age_bucket", "gender", "occupation",
                             "zip_prefix", "release_year"}
    assert b.dense.shape == (256, 1) and b.sequence["hist_item"].shape == (256, 50)
    values, offsets = b.multihot["genres"]
    assert offsets.shape == (257,) and (offsets[1:] > offsets[:-1]).all()  # >= 1 genre each
    text = ds.summary()
    for part in ("80,000", "positive rate", "hist_item", "OOV", "imputed"):
        assert part in text


def test_grouplens_files_convert_to_the_same_tables(tmp_path):
    u_data = b"1\t10\t5\t881250949\n2\t20\t3\t881250950\n"
    u_user = b"1|24|M|technician|85711\n2|53|F|other|T8H1N\n"
    flags = ["0"] * 19
    item10 = "|".join(["10", "Richard III (1995)", "22-Jan-1996", "", "http://x"] + flags[:7]
                      + ["1"] + flags[8:]).encode("latin-1")
    flags[1] = flags[2] = "1"
    item20 = "|".join(["20", "Angels (1995)", "01-Jan-1995", "", "http://x"]
                      + flags).encode("latin-1")
    files = ml.grouplens_to_atomic(u_data, u_user, item10 + b"\n" + item20 + b"\n")
    for part, data in files.items():
        (tmp_path / f"ml-100k.{part}").write_bytes(data)
    r = read_raw(tmp_path)
    assert r.user.tolist() == [1, 2] and r.rating.tolist() == [5.0, 3.0]
    assert r.items == {10: ("1996", ["Documentary"]), 20: ("1995", ["Action", "Adventure"])}
    assert r.users[2] == ("53", "F", "other", "T8H1N")


def test_fetch_falls_back_to_the_next_source(tmp_path, monkeypatch):
    def unreachable(timeout):
        raise OSError("no network")

    rows = {"inter": "1\t10\t5\t881250949", "user": "1\t24\tM\ttechnician\t85711",
            "item": "10\tRichard III\t1995\tDrama War"}
    fake = {p: ("\t".join(ml._HEADERS[p]) + "\n" + rows[p] + "\n").encode() for p in rows}
    monkeypatch.setattr(ml, "_from_grouplens", unreachable)
    monkeypatch.setattr(ml, "_from_recbole", lambda timeout: fake)
    monkeypatch.setattr(ml, "ROW_COUNTS", None)  # (a one-row copy)
    folder = fetch_raw(tmp_path, verbose=False)
    assert (folder / "SOURCE").read_text() == "recbole"
    assert (folder / "ml-100k.user").read_bytes() == fake["user"]
    with pytest.raises(RuntimeError, match=r"grouplens \(.*\): OSError: no network"):
        fetch_raw(tmp_path / "other", sources=("grouplens",), verbose=False)


def test_malformed_raw_file_names_file_line_and_column(tmp_path, raw):
    header = "\t".join(ml._HEADERS["inter"])
    (tmp_path / "ml-100k.inter").write_text(f"{header}\n1\t2\t3\t100\n1\t3\tfour\t101\n")
    for part in ("user", "item"):
        (tmp_path / f"ml-100k.{part}").write_text("\t".join(ml._HEADERS[part]) + "\n")
    with pytest.raises(DataFormatError, match=r"ml-100k\.inter, line 3, column 'rating:float'"):
        read_raw(tmp_path)
    (tmp_path / "ml-100k.inter").write_text(f"{header}\n1\t2\t3\n")
    with pytest.raises(DataFormatError, match=r"line 2, column 'timestamp:float': expected 4"):
        read_raw(tmp_path)


# --- split: global_time | user_time | random -----------------------------------------------------


@pytest.fixture(scope="session")
def other_splits(raw):
    return {s: build_movielens(raw, max_seq_len=10, split=s, split_seed=3)
            for s in ("user_time", "random")}


@pytest.mark.parametrize("kind", ["user_time", "random"])
def test_other_splits_partition_the_rows(other_splits, raw, kind):
    ds = other_splits[kind]
    sizes = [len(ds.splits[k]) for k in ("train", "valid", "test")]
    assert sum(sizes) == 100_000
    assert all(abs(n - want) <= 100 for n, want in zip(sizes, (80_000, 10_000, 10_000)))
    # the rows of the three splits are the raw rows, each once
    order, (a, b) = ml.split_order(raw, kind, split_seed=3)
    assert sorted(order.tolist()) == list(range(100_000)) and (a, b) == (sizes[0], sum(sizes[:2]))
    for k, sl in (("train", order[:a]), ("valid", order[a:b]), ("test", order[b:])):
        assert np.array_equal(ds.splits[k].group.numpy(), raw.user[sl])
        t = ds.splits[k].extras["timestamp"].numpy()
        assert np.array_equal(t, raw.timestamp[sl]) and (t[1:] >= t[:-1]).all()
    assert "split " + kind in ds.notes[0]


def test_user_time_split_puts_each_users_last_rows_in_valid_then_test(raw):
    order, (a, b) = ml.split_order(raw, "user_time")
    part = np.empty(100_000, dtype=np.int64)
    part[order[:a]], part[order[a:b]], part[order[b:]] = 0, 1, 2
    for u in np.unique(raw.user)[:200].tolist():
        rows = np.flatnonzero(raw.user == u)
        rows = rows[np.lexsort((rows, raw.timestamp[rows]))]  # the user's rows by time
        p = part[rows]
        assert (np.diff(p) >= 0).all()  # train, then valid, then test, per user
        n = len(rows)
        assert (p == 2).sum() == n - round(0.9 * n) >= 1  # MovieLens users have >= 20 ratings
        assert (p == 1).sum() == round(0.9 * n) - round(0.8 * n) >= 1
        t = raw.timestamp[rows]
        assert t[p == 0].max() <= t[p >= 1].min()
    # every valid / test user is a train user (unlike global_time)
    assert set(raw.user[order[a:]].tolist()) <= set(raw.user[order[:a]].tolist())


def test_random_split_is_seeded(raw):
    o1, _ = ml.split_order(raw, "random", split_seed=3)
    o2, _ = ml.split_order(raw, "random", split_seed=3)
    o3, _ = ml.split_order(raw, "random", split_seed=4)
    assert np.array_equal(o1, o2) and not np.array_equal(o1, o3)
    g, _ = ml.split_order(raw, "global_time")
    assert np.array_equal(g, np.argsort(raw.timestamp, kind="stable"))


@pytest.mark.parametrize("kind", ["user_time", "random"])
def test_other_splits_keep_histories_causal(other_splits, raw, kind):
    ds = other_splits[kind]
    ts_of = np.full((raw.user.max() + 1, raw.item.max() + 1), -1, dtype=np.int64)
    ts_of[raw.user, raw.item] = raw.timestamp
    raw_item = np.array([-1, -1] + [int(t) for t in ds.vocabs["item"].tokens])
    for split in ds.splits.values():
        hist = split.sequence["hist_item"].numpy()
        known = hist >= 2
        t = np.where(known, ts_of[split.group.numpy()[:, None], np.maximum(raw_item[hist], 0)],
                     -1)
        row_ts = np.broadcast_to(split.extras["timestamp"].numpy()[:, None], t.shape)
        assert (t[known] >= 0).all() and (t[known] < row_ts[known]).all()
    # vocabularies come from the train rows only
    order, (a, _) = ml.split_order(raw, kind, split_seed=3)
    assert ds.schema.by_name("user").vocab_size == len(np.unique(raw.user[order[:a]])) + 2


def test_split_option_is_checked_and_keyed(ml_root, raw):
    with pytest.raises(ValueError, match="split"):
        load_movielens(ml_root, verbose=False, split="by_magic")
    with pytest.raises(ValueError, match="split"):
        build_movielens(raw, split="by_magic")
    ds = load_movielens(ml_root, verbose=False, split="user_time", max_seq_len=5)
    again = load_dataset("movielens-100k", root=ml_root, split="user_time", max_seq_len=5)
    assert again.summary() == ds.summary()
    glob = load_movielens(ml_root, verbose=False, max_seq_len=5)
    assert len(glob.splits["valid"]) == 10_000 != len(ds.splits["valid"])
    names = sorted(p.name for p in (Path(ml_root) / "movielens-100k").glob("encoded-T5-*"))
    assert any("user_time" in n for n in names) and any("user_time" not in n for n in names)
