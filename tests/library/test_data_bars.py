"""BARS / FuxiCTR csv datasets: small generated files with the exact column layouts and dataset
configs of AmazonElectronics_x1, TaobaoAd_x1, KuaiVideo_x1, Criteo_x1 and Avazu_x1."""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cetnet.cli import main
from cetnet.config import dump_config
from cetnet.data import DataFormatError, load_bars, load_dataset
from cetnet.train import evaluate_run, run_training
from cetnet.train.loop import SCORED_ON_TRAIN_WARNING, VALID_IS_TEST_WARNING
from cetnet.train.rundir import read_json

TAOBAO_CATS = ["userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level",
               "pvalue_level", "shopping_level", "occupation", "new_user_class_level",
               "adgroup_id", "cate_id", "campaign_id", "customer", "brand", "pid", "btag"]
CRITEO_I = [f"I{k}" for k in range(1, 14)]
CRITEO_C = [f"C{k}" for k in range(1, 27)]
AVAZU = [f"feat_{k}" for k in range(1, 23)]

# Dataset configs as BARS publishes them (paths point at the generated files).
CONFIGS = {
    "amazonelectronics_x1": """
amazonelectronics_x1:
    data_root: ../data/Amazon/
    data_format: csv
    train_data: train.csv
    valid_data: test.csv
    test_data: test.csv
    min_categr_count: 1
    feature_cols:
        - {name: user_id, active: True, dtype: int, type: meta, remap: False}
        - {name: item_id, active: True, dtype: str, type: categorical}
        - {name: cate_id, active: True, dtype: str, type: categorical}
        - {name: item_history, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 100, share_embedding: item_id, feature_encoder: layers.MaskedAveragePooling()}
        - {name: cate_history, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 100, share_embedding: cate_id, feature_encoder: layers.MaskedAveragePooling()}
    label_col: {name: label, dtype: float}
""",
    "taobaoad_x1": """
base_config: ../model_zoo/DCNv2/config/
base_expid: DCNv2_default
dataset_id: taobaoad_x1
dataset_config:
    taobaoad_x1:
        data_root: ../data/Taobao/
        data_format: csv
        train_data: train.csv
        valid_data: test.csv
        test_data: test.csv
        min_categr_count: 10
        feature_cols:
            - {name: "group_id", active: True, dtype: int, type: meta,
               preprocess: "copy_from(userid)", remap: False}
            - {name: ["userid","cms_segid","cms_group_id","final_gender_code","age_level",
                      "pvalue_level","shopping_level","occupation","new_user_class_level",
                      "adgroup_id","cate_id","campaign_id","customer","brand","pid","btag"],
                      active: True, dtype: str, type: categorical}
            - {name: price, active: True, dtype: float, type: numeric}
            - {name: cate_his, active: True, dtype: str, splitter: ^, type: sequence,
               max_len: 50, padding: pre, share_embedding: cate_id}
            - {name: brand_his, active: True, dtype: str, splitter: ^, type: sequence,
               max_len: 50, padding: pre, share_embedding: brand}
            - {name: btag_his, active: True, dtype: str, splitter: ^, type: sequence,
               max_len: 50, padding: pre, share_embedding: btag}
        label_col: {name: clk, dtype: float}
tuner_space:
    embedding_dim: 32
    group_id: group_id
""",
    "kuaivideo_x1": """
kuaivideo_x1:
    data_root: ../data/KuaiShou/
    data_format: csv
    train_data: train.csv
    valid_data: test.csv # no validation data split in original paper
    test_data: test.csv
    min_categr_count: 10
    feature_cols:
        - {name: group_id, active: True, dtype: int, type: meta,
           preprocess: "copy_from(user_id)", remap: False}
        - {name: user_id, active: True, dtype: str, type: categorical}
        - {name: item_id, active: True, dtype: str, type: categorical}
        - {name: item_emb, active: True, dtype: str, type: categorical, embedding_dim: 64,
           preprocess: "copy_from(item_id)", pretrained_emb: "item_visual_emb_dim64.h5",
           min_categr_count: 1}
        - {name: pos_items, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 100, padding: pre, share_embedding: item_id}
        - {name: neg_items, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 100, padding: pre, share_embedding: item_id}
        - {name: pos_items_emb, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 100, embedding_dim: 64, padding: pre,
           pretrained_emb: "item_visual_emb_dim64.h5", min_categr_count: 1,
           share_embedding: item_emb, preprocess: "copy_from(pos_items)"}
    label_col: {name: is_click, dtype: float}
""",
    "criteo_x1": """
criteo_x1:
    data_format: csv
    train_data: train.csv
    valid_data: valid.csv
    test_data: test.csv
    min_categr_count: 1
    feature_cols:
        - {active: True, dtype: float, name: [I1, I2, I3, I4, I5, I6, I7, I8, I9, I10, I11,
           I12, I13], type: numeric}
        - {active: True, dtype: float, name: [C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11,
           C12, C13, C14, C15, C16, C17, C18, C19, C20, C21, C22, C23, C24, C25, C26],
           type: categorical}
    label_col: {name: label, dtype: float}
""",
    "avazu_x1": """
avazu_x1:
    data_format: csv
    train_data: train.csv
    valid_data: valid.csv
    test_data: test.csv
    min_categr_count: 1
    feature_cols:
        - {active: True, dtype: float, name: [feat_1, feat_2, feat_3, feat_4, feat_5, feat_6,
           feat_7, feat_8, feat_9, feat_10, feat_11, feat_12, feat_13, feat_14, feat_15, feat_16,
           feat_17, feat_18, feat_19, feat_20, feat_21, feat_22], type: categorical}
    label_col: {name: label, dtype: float}
""",
}

HEADERS = {
    "amazonelectronics_x1": ["label", "user_id", "item_id", "cate_id", "item_history",
                             "cate_history"],
    "taobaoad_x1": ["clk", "btag_his", "cate_his", "brand_his", *TAOBAO_CATS[:-2], "price",
                    "pid", "btag"],
    "kuaivideo_x1": ["timestamp", "user_id", "item_id", "is_click", "is_like", "is_follow",
                     "pos_items", "neg_items"],
    "criteo_x1": ["label", *CRITEO_I, *CRITEO_C],
    "avazu_x1": ["label", *AVAZU],
}
MIN_COUNT = {"amazonelectronics_x1": 1, "taobaoad_x1": 10, "kuaivideo_x1": 10, "criteo_x1": 1,
             "avazu_x1": 1}
LABEL = {"amazonelectronics_x1": "label", "taobaoad_x1": "clk", "kuaivideo_x1": "is_click",
         "criteo_x1": "label", "avazu_x1": "label"}


def _cell(rng, column: str, name: str) -> str:
    """A plausible value for a column of the dataset."""
    if column == LABEL[name]:
        return str(int(rng.random() < 0.3))
    if column in ("item_history", "cate_history", "cate_his", "brand_his", "btag_his",
                  "pos_items", "neg_items"):
        n = int(rng.integers(0, 60 if name == "taobaoad_x1" else 8))
        space = 4 if column == "btag_his" else 40
        return "^".join(str(rng.integers(1, space)) for _ in range(n))
    if column in CRITEO_I or column == "price":
        return "" if rng.random() < 0.1 else f"{rng.normal(3, 2):.3f}"
    if column in ("is_like", "is_follow"):
        return str(int(rng.random() < 0.1))
    if column == "timestamp":
        return str(int(rng.integers(10**9, 2 * 10**9)))
    if column in ("user_id", "userid"):
        return str(rng.integers(0, 15))
    return "" if rng.random() < 0.02 else str(rng.integers(0, 25))


def make_bars(tmp: Path, name: str, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Writes the dataset's csv files and its YAML; returns the YAML path."""
    rows = rows or {"train": 300, "valid": 80, "test": 80}
    rng = np.random.default_rng(seed)
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg_text = CONFIGS[name]
    for split, n in rows.items():
        if f"{split}.csv" not in cfg_text:
            continue
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADERS[name])
            w.writerows([_cell(rng, c, name) for c in HEADERS[name]] for _ in range(n))
    (folder / "dataset_config.yaml").write_text(cfg_text)
    return folder / "dataset_config.yaml"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reference_vocab(train: list[dict], columns: list[tuple[str, bool, int]], min_count: int,
                    ) -> list[str]:
    """Tokens that get ids: counted in train over a feature and the sequences sharing it
    (only the ``max_len`` most recent items of a sequence are used, so only they count)."""
    counts = Counter()
    for row in train:
        for col, is_seq, max_len in columns:
            v = row[col]
            if is_seq:
                counts.update((v.split("^") if v else [])[::-1][:max_len])
            else:
                counts[v] += 1
    return sorted((t for t, c in counts.items() if c >= min_count and t != ""),
                  key=lambda t: (-counts[t], t))


EXPECTED_FEATURES = {
    "amazonelectronics_x1": [("item_id", "sparse"), ("cate_id", "sparse"),
                             ("item_history", "sequence"), ("cate_history", "sequence")],
    "taobaoad_x1": [(c, "sparse") for c in TAOBAO_CATS] + [
        ("price", "dense"), ("cate_his", "sequence"), ("brand_his", "sequence"),
        ("btag_his", "sequence")],
    "kuaivideo_x1": [("user_id", "sparse"), ("item_id", "sparse"), ("pos_items", "sequence"),
                     ("neg_items", "sequence")],
    "criteo_x1": [(c, "dense") for c in CRITEO_I] + [(c, "sparse") for c in CRITEO_C],
    "avazu_x1": [(c, "sparse") for c in AVAZU],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bars_schema_and_encoding(tmp_path, name):
    cfg_path = make_bars(tmp_path, name)
    ds = load_bars(cfg_path, chunk_size=64)
    assert [(f.name, f.kind) for f in ds.schema.features] == EXPECTED_FEATURES[name]
    assert ds.schema.label == LABEL[name]
    folder = cfg_path.parent
    files = {s: folder / f"{s if (folder / f'{s}.csv').exists() else 'test'}.csv"
             for s in ("train", "valid", "test")}
    rows = {s: read_rows(p) for s, p in files.items()}
    assert [len(ds.splits[s]) for s in rows] == [len(r) for r in rows.values()]
    if files["valid"] == files["test"]:
        assert ds.splits["valid"] is ds.splits["test"]
    min_count = MIN_COUNT[name]

    seqs = {f.name: f for f in ds.schema.sequence}
    for f in ds.schema.categorical:
        root = f.source or f.name
        users = [(root, root in seqs, seqs[root].max_len if root in seqs else 0)] + [
            (s.name, True, s.max_len) for s in ds.schema.sequence if s.source == root
            and s.name != root]
        tokens = reference_vocab(rows["train"], users, min_count)
        assert ds.vocabs[f.name].tokens == tokens, f.name
        assert f.vocab_size == len(tokens) + 2
        for split, split_rows in rows.items():
            ids = (ds.splits[split].sparse if f.kind == "sparse"
                   else ds.splits[split].sequence)[f.name]
            for r in (0, len(split_rows) // 2, len(split_rows) - 1):
                v = split_rows[r][f.name]
                if f.kind == "sparse":
                    assert int(ids[r]) == ds.vocabs[f.name].id(v)
                else:  # reversed to most-recent-first, truncated, 0-padded
                    toks = (v.split("^") if v else [])[::-1][:f.max_len]
                    want = [ds.vocabs[f.name].id(t) for t in toks]
                    assert ids[r].tolist() == want + [0] * (f.max_len - len(want))
            assert ds.splits[split].stats.oov[f.name] == int((ids == 1).sum())

    for f in ds.schema.dense:  # train statistics, missing cells imputed and counted
        x = np.array([float(r[f.name]) for r in rows["train"] if r[f.name]])
        i = ds.schema.dense.index(f)
        assert np.isclose(ds.dense_stats.mean[i], x.mean())
        assert np.isclose(ds.dense_stats.std[i], x.std())
        for split, split_rows in rows.items():
            assert ds.splits[split].stats.imputed[f.name] == sum(
                not r[f.name] for r in split_rows)
            col = ds.splits[split].dense[:, i].numpy()
            empty = np.array([not r[f.name] for r in split_rows])
            assert np.allclose(col[empty], 0.0)
    y = np.array([float(r[LABEL[name]]) for r in rows["test"]], dtype=np.float32)
    assert np.array_equal(ds.splits["test"].label.numpy(), y)
    b = next(ds.splits["train"].batches(32, shuffle=True, seed=1))
    assert b.dense.shape == (32, len(ds.schema.dense)) and b.label.shape == (32,)
    assert ds.summary().startswith(f"dataset {name}")


def test_bars_share_embedding_and_group(tmp_path):
    ds = load_bars(make_bars(tmp_path, "amazonelectronics_x1"))
    s = ds.schema
    assert s.by_name("item_history").source == "item_id"
    assert s.by_name("item_history").vocab_size == s.by_name("item_id").vocab_size
    assert s.by_name("item_history").max_len == 100
    assert ds.group_key == "user_id" and s.group is None  # user_id is meta, not a feature
    rows = read_rows(tmp_path / "amazonelectronics_x1" / "train.csv")
    g = ds.splits["train"].group.tolist()
    same = [(rows[i]["user_id"] == rows[j]["user_id"]) == (g[i] == g[j])
            for i in range(40) for j in range(40)]
    assert all(same)

    tb = load_bars(make_bars(tmp_path, "taobaoad_x1"))
    assert tb.group_key == "group_id" and tb.schema.group == "userid"
    assert tb.schema.by_name("brand_his").source == "brand"
    assert tb.schema.by_name("cate_his").max_len == 50
    kv = load_bars(make_bars(tmp_path, "kuaivideo_x1"))
    assert any("item_emb" in n and "pretrained" in n for n in kv.notes)
    assert kv.schema.by_name("neg_items").source == "item_id"


def _edit_config(cfg_path: Path, old: str, new: str) -> Path:
    text = cfg_path.read_text()
    assert old in text
    cfg_path.write_text(text.replace(old, new))
    return cfg_path


def test_bars_group_id_naming_a_categorical_column_groups_by_its_raw_values(tmp_path):
    cfg = _edit_config(make_bars(tmp_path, "criteo_x1"), "    min_categr_count: 1\n",
                       "    min_categr_count: 1\n    group_id: C3\n")
    ds = load_bars(cfg, min_count=13)  # rare C3 values: OOV as a feature, not as a group
    assert ds.group_key == "C3" and ds.schema.group == "C3"
    rows = {s: read_rows(cfg.parent / f"{s}.csv") for s in ("train", "valid", "test")}
    raw = [r["C3"] for s in rows for r in rows[s]]
    groups = torch.cat([ds.splits[s].group for s in rows]).tolist()
    # the same group exactly when the same raw value, across splits
    assert len(set(zip(raw, groups))) == len(set(raw)) == len(set(groups))
    ids = ds.splits["train"].sparse["C3"]
    assert int((ids == 1).sum()) > 0
    assert len(set(ds.splits["train"].group.tolist())) > len(set(ids.tolist()))

    # tuner_space.group_id (a BARS tuner config), also as a one-choice list
    for value in ("userid", "[userid]"):
        tb = load_bars(_edit_config(make_bars(tmp_path / value, "taobaoad_x1"),
                                    "    group_id: group_id\n", f"    group_id: {value}\n"))
        assert tb.group_key == "userid" and tb.schema.group == "userid"
        raw = [r["userid"] for r in read_rows(tmp_path / value / "taobaoad_x1" / "train.csv")]
        assert len(set(zip(raw, tb.splits["train"].group.tolist()))) == len(set(raw))


@pytest.mark.parametrize("name, old, new, pattern", [
    ("criteo_x1", "    min_categr_count: 1\n", "    min_categr_count: 1\n    group_id: I1\n",
     r"dataset 'criteo_x1': group_id 'I1' names a numeric column; gAUC groups by a meta or "
     r"categorical column: C1, C2"),
    ("taobaoad_x1", "    group_id: group_id\n", "    group_id: user\n",
     r"dataset 'taobaoad_x1': tuner_space.group_id 'user' names no active column; .*: group_id, "
     r"userid"),
])
def test_bars_group_id_naming_no_usable_column_is_an_error(tmp_path, name, old, new, pattern):
    cfg = _edit_config(make_bars(tmp_path, name), old, new)
    with pytest.raises(ValueError, match=re.escape(f"dataset config {cfg}, ") + pattern):
        load_bars(cfg)


def test_bars_chunked_reading_matches_one_chunk(tmp_path):
    cfg = make_bars(tmp_path, "taobaoad_x1", {"train": 250, "test": 60})
    small = load_bars(cfg, chunk_size=7)
    whole = load_bars(cfg, chunk_size=10**6)
    assert small.summary() == whole.summary()
    for k in small.splits:
        for x, y in zip(next(small.splits[k].batches(10**6)).tensors(),
                        next(whole.splits[k].batches(10**6)).tensors()):
            assert torch.equal(x, y)
    assert small.splits["train"].sequence["cate_his"].dtype == torch.int32  # compact storage


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_encoded_again(tmp_path):
    # cp -p, rsync -t or an archive unpacked over the data keep both: the cache keyed on them
    # returned the old rows (a train positive rate of 0.50 for a file of all positives)
    import os

    cfg = make_bars(tmp_path, "criteo_x1")
    before = load_bars(cfg, cache_dir=tmp_path / "cache")
    train = tmp_path / "criteo_x1" / "train.csv"
    st = train.stat()
    lines = train.read_bytes().splitlines(keepends=True)
    assert lines[0].startswith(b"label,") and all(r[:2] in (b"0,", b"1,") for r in lines[1:])
    train.write_bytes(b"".join([lines[0], *(b"1" + r[1:] for r in lines[1:])]))  # same size
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert train.stat().st_size == st.st_size and train.stat().st_mtime_ns == st.st_mtime_ns
    after = load_bars(cfg, cache_dir=tmp_path / "cache")
    assert before.splits["train"].positive_rate < 1.0 == after.splits["train"].positive_rate


def test_superseded_caches_are_listed_and_pruned(tmp_path, capsys, monkeypatch):
    """A cache whose input files changed can never be read again (its name holds their old
    stamps) but stayed on disk: each records its inputs, `cetnet data caches DIR` tells
    current from superseded and `--prune` deletes the superseded ones only. A cache written
    before the record is 'unknown' until it is read (its key matched: it gets the record)."""
    from cetnet.cli import main
    from cetnet.data import bars
    from cetnet.data.cache import cache_status, find_caches, sources_path

    cfg = make_bars(tmp_path, "criteo_x1")
    cache = tmp_path / "cache"
    load_bars(cfg, cache_dir=cache)
    (old,) = find_caches(cache)
    assert cache_status(old)[0] == "current"
    train = tmp_path / "criteo_x1" / "train.csv"
    train.write_bytes(train.read_bytes() + train.read_bytes().splitlines(keepends=True)[-1])
    assert cache_status(old) == ("superseded", f"{train.resolve()} changed since")
    load_bars(cfg, cache_dir=cache)
    new = next(p for p in find_caches(cache) if p != old)
    sources_path(new).unlink()  # as written by a cetnet of before
    assert cache_status(new)[0] == "unknown"
    capsys.readouterr()
    assert main(["data", "caches", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "superseded" in out and f"{old}" in out and "unknown" in out
    assert out.strip().endswith(f"2 cache file(s); 1 superseded "
                                f"({old.stat().st_size / 2**20:.1f} MB): --prune deletes them")
    load_bars(cfg, cache_dir=cache)  # read from the cache: its record is written
    assert cache_status(new)[0] == "current"
    assert main(["data", "caches", str(cache), "--prune"]) == 0
    assert "deleted 1 superseded cache file(s)" in capsys.readouterr().out
    assert list(find_caches(cache)) == [new] and not sources_path(old).exists()
    assert main(["data", "caches", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # an input that cannot be read now (its folder moved): kept, readable once it is back
    data = tmp_path / "criteo_x1"
    data.rename(tmp_path / "moved")
    assert cache_status(new)[0] == "missing-input"
    assert main(["data", "caches", str(cache), "--prune"]) == 0
    assert "deleted 0 superseded" in capsys.readouterr().out
    (tmp_path / "moved").rename(data)
    assert cache_status(new)[0] == "current"
    # another loader version (an upgrade): this cetnet never reads it; kept for that version
    monkeypatch.setattr(bars, "_CACHE_VERSION", bars._CACHE_VERSION + 1)
    assert cache_status(new) == ("other-version", f"bars cache version "
                                 f"{bars._CACHE_VERSION - 1}, this cetnet's "
                                 f"{bars._CACHE_VERSION}")


def test_a_checkpoint_refuses_the_data_read_in_another_sequence_order(tmp_path):
    # the order of a sequence's ids changes no vocabulary (hence no encoding digest): a run
    # evaluated on data read newest-first was accepted and scored other inputs (AUC moved)
    from cetnet.train.checkpoint import (DATA_OPTIONS, CheckpointError, check_data_digest,
                                         data_digest)

    cfg = make_bars(tmp_path, "amazonelectronics_x1")
    oldest = load_bars(cfg)
    newest = load_bars(cfg, seq_order="newest_first", cache_dir=tmp_path / "cache")
    cached = load_bars(cfg, seq_order="newest_first", cache_dir=tmp_path / "cache")
    assert oldest.encoding_digest() == newest.encoding_digest()
    assert newest.encoding_options == cached.encoding_options == {
        "newest_first": ["cate_history", "item_history"]}
    state = data_digest(oldest)
    with pytest.raises(CheckpointError, match="sequence's order"):
        check_data_digest(state, newest, "run/best.pt")
    check_data_digest(data_digest(newest), cached, "run/best.pt")  # read from its cache
    old = {k: v for k, v in state.items() if k != DATA_OPTIONS}  # a checkpoint of before
    check_data_digest(old, newest, "run/best.pt")


def test_bars_min_count_and_seq_order_options(tmp_path):
    cfg = make_bars(tmp_path, "amazonelectronics_x1")
    ds = load_dataset("bars", config=str(cfg), min_count=40, seq_order="newest_first")
    rows = read_rows(tmp_path / "amazonelectronics_x1" / "train.csv")
    shared = [("cate_id", False, 0), ("cate_history", True, 100)]  # short: order is moot
    assert ds.vocabs["cate_id"].tokens == reference_vocab(rows, shared, 40)
    assert 0 < len(reference_vocab(rows, shared, 40)) < len(reference_vocab(rows, shared, 1))
    r = next(i for i, row in enumerate(rows) if row["cate_history"].count("^") >= 2)
    first = rows[r]["cate_history"].split("^")[0]
    assert int(ds.splits["train"].sequence["cate_history"][r, 0]) == ds.vocabs["cate_id"].id(
        first)
    cached = load_bars(cfg, cache_dir=tmp_path / "cache")
    again = load_bars(cfg, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert again.summary() == cached.summary() and again.splits["valid"] is again.splits["test"]
    few = load_bars(cfg, max_rows=17)
    assert len(few.splits["train"]) == 17 and len(few.splits["test"]) == 17


def _set_cell(lines: list[str], line: int, column: int, value: str) -> list[str]:
    cells = lines[line].split(",")
    cells[column] = value
    return lines[:line] + [",".join(cells)] + lines[line + 1:]


@pytest.mark.parametrize("edit, pattern", [
    (lambda lines: [lines[0].replace(",C26", "")] + [l.rsplit(",", 1)[0] for l in lines[1:]],
     r"train\.csv, line 1, column 'C26': column is missing"),
    (lambda lines: lines[:5] + [lines[5].rsplit(",", 2)[0]] + lines[6:],
     r"train\.csv, line 6, column 'C25': expected 40 columns, got 38"),
    (lambda lines: _set_cell(lines, 7, 5, "abc"),
     r"train\.csv, line 8, column 'I5': not a finite number: 'abc'"),
    (lambda lines: lines[:3] + ["2" + lines[3][1:]] + lines[4:],
     r"train\.csv, line 4, column 'label': label must be 0 or 1"),
])
def test_bars_malformed_files_name_file_line_and_column(tmp_path, edit, pattern):
    cfg = make_bars(tmp_path, "criteo_x1")
    train = cfg.parent / "train.csv"
    train.write_text("\n".join(edit(train.read_text().splitlines())) + "\n")
    with pytest.raises(DataFormatError, match=pattern):
        load_bars(cfg, chunk_size=3)


def test_bars_config_errors(tmp_path):
    cfg = yaml.safe_load(CONFIGS["avazu_x1"])["avazu_x1"]
    with pytest.raises(ValueError, match="unsupported type"):
        load_bars({**cfg, "feature_cols": [{"name": "x", "type": "weird"}]})
    with pytest.raises(ValueError, match="only csv"):
        load_bars({**cfg, "data_format": "h5"})
    with pytest.raises(ValueError, match="choose dataset_id"):
        load_bars({"a": cfg, "b": cfg})


def test_a_run_without_valid_data_records_that_it_selected_on_test(train_config, tmp_path,
                                                                    capsys):
    cfg_path = make_bars(tmp_path, "criteo_x1")
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace("    valid_data: valid.csv\n", ""))  # valid = test.csv
    ds = load_bars(cfg_path)
    assert ds.splits["valid"] is ds.splits["test"]
    assert any("same file (test.csv)" in n and "test set" in n for n in ds.notes)

    run = train_config(epochs=2, max_steps_per_epoch=2, batch_size=64)
    run["data"] = {"name": "bars", "config": str(cfg_path)}
    dump_config(run, tmp_path / "run.yaml")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out",
                 str(tmp_path / "run"), "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {VALID_IS_TEST_WARNING}") == 2  # at the start, under the table
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["valid_is_test"] is True and metrics["warnings"] == [VALID_IS_TEST_WARNING]
    assert metrics["fused"] == metrics["valid"]["fused"]  # the selected epoch's "valid" is test
    assert main(["evaluate", str(tmp_path / "run"), "--split", "valid"]) == 0
    assert f"warning: {VALID_IS_TEST_WARNING}" in capsys.readouterr().err
    evaluated = read_json(tmp_path / "run" / "eval_valid.json")
    assert evaluated["valid_is_test"] is True and evaluated["warnings"] == [VALID_IS_TEST_WARNING]

    cfg_path.write_text(text)  # with its own valid.csv there is nothing to flag
    _, metrics = run_training(run, tmp_path / "run2", quiet=True, plots=False)
    assert metrics["valid_is_test"] is False and metrics["warnings"] == []
    evaluated = evaluate_run(tmp_path / "run2", "valid", write=False)
    assert evaluated["valid_is_test"] is False and evaluated["warnings"] == []
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "chunks"])
@pytest.mark.parametrize("name", ["taobaoad_x1", "amazonelectronics_x1"])
def test_predict_reads_new_rows_in_the_datasets_own_format(train_config, tmp_path, capsys,
                                                           monkeypatch, name, chunk):
    """``cetnet predict --csv`` of a BARS run takes rows as the dataset's files hold them
    (``^``-separated sequences in the config's order, ``copy_from`` features, the meta group
    column): the test file scores as the test split, to the bit; without its label column
    the rows are unlabelled. (Before: refused, or a sequence cell read as one OOV token.)
    The file is read a chunk of whole batches at a time, as a plain csv is (it was read
    whole): the same bits."""
    from cetnet import serve
    from cetnet.data import bars

    sizes: list[int] = []
    batch = None
    if chunk is not None:  # chunks of 7 rows, rounded up to 3 batches of 3: 9 rows
        batch = 3
        monkeypatch.setattr(serve, "CSV_CHUNK_ROWS", chunk)
        encode = bars._encode_rows

        def counted(*args, **kw):
            for split, labelled in encode(*args, **kw):
                sizes.append(len(split))
                yield split, labelled

        monkeypatch.setattr(bars, "_encode_rows", counted)

    cfg_path = make_bars(tmp_path, name)
    run = train_config(epochs=1, max_steps_per_epoch=2, batch_size=64)
    run["data"] = {"name": "bars", "config": str(cfg_path)}
    dump_config(run, tmp_path / "run.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(run_dir),
                 "--quiet", "--no-plots"]) == 0
    split_out, split_scores = serve.predict_run(run_dir, tmp_path / "s.csv", split="test",
                                                batch_size=batch)
    test_csv = cfg_path.parent / "test.csv"
    csv_out, csv_scores = serve.predict_run(run_dir, tmp_path / "c.csv", csv_path=test_csv,
                                            batch_size=batch)
    assert csv_out.read_text() == split_out.read_text()
    assert sizes == ([] if chunk is None else [9] * 8 + [8])  # 80 rows
    assert csv_scores is not None and split_scores is not None
    # the same scores (gAUC's groups are numbered in another order: equal to rounding)
    assert csv_scores["fused"] == pytest.approx(split_scores["fused"], rel=1e-12)
    assert csv_scores["members"].keys() == split_scores["members"].keys()
    for member, scores in split_scores["members"].items():
        assert csv_scores["members"][member] == pytest.approx(scores, rel=1e-12)
    label = read_rows(test_csv)[0]
    lines = test_csv.read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index(next(k for k in label if k in ("label", "clk", "is_click")))
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(",".join(c for i, c in enumerate(line.split(","))
                                             if i != drop) for line in lines) + "\n")
    out, scores = serve.predict_run(run_dir, tmp_path / "u.csv", csv_path=unlabelled,
                                    batch_size=batch)
    assert scores is None
    probs = [line.split(",")[1] for line in out.read_text().splitlines()]
    assert probs == [line.split(",")[1] for line in split_out.read_text().splitlines()]


def test_cli_reports_a_malformed_file_without_a_traceback(train_config, tmp_path, capsys):
    cfg_path = make_bars(tmp_path, "criteo_x1")
    train = cfg_path.parent / "train.csv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3] + ",extra"  # line 4: one column too many
    train.write_text("\n".join(lines) + "\n")
    run = train_config(epochs=1, max_steps_per_epoch=1, batch_size=64)
    run["data"] = {"name": "bars", "config": str(cfg_path)}
    dump_config(run, tmp_path / "run.yaml")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"),
                 "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "cetnet train: error:" in err and "train.csv, line 4" in err
    assert "Traceback" not in err


def test_a_valid_split_read_from_the_train_file_is_flagged(train_config, tmp_path):
    cfg_path = make_bars(tmp_path, "criteo_x1")
    cfg_path.write_text(cfg_path.read_text().replace("    valid_data: valid.csv\n",
                                                     "    valid_data: train.csv\n"))
    ds = load_bars(cfg_path)
    assert ds.splits["valid"] is ds.splits["train"] and ds.splits["test"] is not ds.splits["train"]
    assert any("valid and train are the same file (train.csv)" in n for n in ds.notes)
    run = train_config(epochs=1, max_steps_per_epoch=2, batch_size=64)
    run["data"] = {"name": "bars", "config": str(cfg_path)}
    _, metrics = run_training(run, tmp_path / "run", quiet=True, plots=False)
    assert metrics["valid_is_test"] is False
    assert metrics["warnings"] == [SCORED_ON_TRAIN_WARNING.format(split="valid")]
    evaluated = evaluate_run(tmp_path / "run", "valid", write=False)
    assert evaluated["warnings"] == metrics["warnings"]


def test_fill_na_and_normalizer_are_read_as_fuxictr_reads_them(tmp_path):
    """``fill_na`` (an empty cell reads as that number or token, the number counting in the
    statistics, as FuxiCTR fills before it fits) and ``normalizer: MinMaxScaler`` (train
    min / max to [0, 1]) are honoured; they were ignored (every empty numeric cell took the
    train mean, every column was standardized)."""
    cfg_path = make_bars(tmp_path, "criteo_x1")
    cfg = yaml.safe_load(cfg_path.read_text())
    cols = cfg["criteo_x1"]["feature_cols"]
    cols[:1] = [{"name": "I1", "type": "numeric", "fill_na": 0, "normalizer": "MinMaxScaler"},
                {"name": "I2", "type": "numeric", "normalizer": "StandardScaler"},
                {"name": "I3", "type": "numeric", "fill_na": -1.5},
                {"name": CRITEO_I[3:], "type": "numeric"}]
    cols[-1] = {"name": "C1", "type": "categorical", "fill_na": 7}  # FuxiCTR's na token
    cols.append({"name": CRITEO_C[1:], "type": "categorical"})
    cfg_path.write_text(yaml.safe_dump(cfg))
    ds = load_bars(cfg_path)
    plain = load_bars(make_bars(tmp_path / "plain", "criteo_x1"))
    rows = {s: read_rows(cfg_path.parent / f"{s}.csv") for s in ("train", "valid", "test")}

    def column(split, name, fill):
        return np.array([float(r[name]) if r[name] else fill for r in rows[split]])

    lo, hi = column("train", "I1", 0.0).min(), column("train", "I1", 0.0).max()
    filled = column("train", "I3", -1.5)
    for split in rows:
        dense = ds.splits[split].dense.numpy()
        want = (column(split, "I1", 0.0) - lo) / (hi - lo)
        assert np.allclose(dense[:, 0], want, atol=1e-6)
        assert np.allclose(dense[:, 2], (column(split, "I3", -1.5) - filled.mean())
                           / filled.std(), atol=1e-5)
        # StandardScaler and no key: the defaults, to the bit
        assert torch.equal(ds.splits[split].dense[:, 1:2], plain.splits[split].dense[:, 1:2])
        assert torch.equal(ds.splits[split].dense[:, 3:], plain.splits[split].dense[:, 3:])
        # empty cells are still counted
        assert ds.splits[split].stats.imputed == plain.splits[split].stats.imputed
        # C1's na token reads as an empty cell does: out of vocabulary (as FuxiCTR's Tokenizer)
        missing = [i for i, r in enumerate(rows[split]) if r["C1"] in ("", "7")]
        assert any(r["C1"] == "7" for r in rows[split])
        assert all(int(ds.splits[split].sparse["C1"][i]) == 1 for i in missing)
        assert torch.equal(ds.splits[split].sparse["C2"], plain.splits[split].sparse["C2"])
    assert "7" not in ds.vocabs["C1"].tokens and "7" in plain.vocabs["C1"].tokens
    assert "min" in ds.summary() and "fill -1.5" in ds.summary()
    # a plain-csv prediction of these rows encodes them alike (the statistics carry the fill)
    stats = type(ds.dense_stats).from_dict(ds.dense_stats.to_dict())
    raw = np.stack([column("test", c, np.nan) for c in CRITEO_I], 1)
    assert np.array_equal(stats.transform(raw)[0], ds.splits["test"].dense.numpy())
    assert ds.encoding_digest() != plain.encoding_digest()


def test_fill_na_changes_the_cache_key_and_defaults_keep_theirs(tmp_path):
    from cetnet.data import bars

    cfg_path = make_bars(tmp_path, "criteo_x1")
    text = cfg_path.read_text()
    cache = tmp_path / "cache"
    first = load_bars(cfg_path, cache_dir=cache)
    cfg_path.write_text(text.replace("type: numeric}", "type: numeric, fill_na: 7}"))
    filled = load_bars(cfg_path, cache_dir=cache)
    assert not torch.equal(first.splits["train"].dense, filled.splits["train"].dense)
    assert len(list(cache.glob("*.pt"))) == 2
    # a YAML without the new keys has the key it had before them (its cache is still read)
    cfg = bars.read_config(cfg_path.parent / "dataset_config.yaml")
    assert all(c.settings() for c in cfg.columns if c.type == "numeric")
    plain = [dataclasses.replace(c, fill_na=None, scaler=None) for c in cfg.columns]
    assert repr(cfg.columns) == repr(plain)


@pytest.mark.parametrize("feature, pattern", [
    ({"name": "I1", "type": "numeric", "spliter": "^"},
     r"feature_cols\[0\] 'I1': unknown key 'spliter'; did you mean 'splitter'\?"),
    ({"name": "I1", "type": "numeric", "normalizer": "RobustScaler"},
     r"'I1': normalizer: expected one of 'StandardScaler', 'MinMaxScaler', got 'RobustScaler'"),
    ({"name": "I1", "type": "categorical", "normalizer": "MinMaxScaler"},
     r"'I1': normalizer: only a numeric feature is normalized"),
    ({"name": "I1", "type": "numeric", "fill_na": "zero"},
     r"'I1': fill_na: expected a number, got 'zero'"),
    ({"name": "I1", "type": "categorical", "fill_na": [1]},
     r"'I1': fill_na: expected a token \(a string or a number\), got \[1\]"),
    ({"name": "I1", "type": "categorical", "category_processor": "hash_bucket"},
     r"'I1': category_processor 'hash_bucket' is not supported"),
])
def test_feature_keys_that_cannot_be_honoured_are_errors(tmp_path, feature, pattern):
    cfg = yaml.safe_load(CONFIGS["criteo_x1"])["criteo_x1"]
    cfg["feature_cols"] = [feature, {"name": "C1", "type": "categorical"}]
    with pytest.raises(ValueError, match=pattern):
        load_bars(cfg)


def test_fuxictr_model_keys_are_named_in_the_notes(tmp_path):
    ds = load_bars(make_bars(tmp_path, "amazonelectronics_x1"))
    assert any(n.startswith("ignored feature_encoder of item_history") for n in ds.notes)


def test_without_a_group_column_gauc_is_not_reported(train_config, tmp_path, capsys):
    """Criteo has no group column: every row was group 0 and "gAUC" repeated the AUC under
    another name. It is now NaN, in the run's metrics and in a prediction's scores."""
    from cetnet import serve

    ds = load_bars(make_bars(tmp_path, "criteo_x1"))
    assert ds.group_key is None and not any(s.grouped for s in ds.splits.values())
    assert "gAUC group none (no group column: gAUC is not reported)" in ds.summary()
    run = train_config(epochs=1, max_steps_per_epoch=2, batch_size=64)
    run["data"] = {"name": "bars", "config": str(tmp_path / "criteo_x1" / "dataset_config.yaml")}
    _, metrics = run_training(run, tmp_path / "run", quiet=True, plots=False)
    assert np.isnan(metrics["fused"]["gauc"]) and np.isfinite(metrics["fused"]["auc"])
    assert all(np.isnan(m["gauc"]) for m in metrics["members"].values())
    _, scores = serve.predict_run(tmp_path / "run", tmp_path / "p.csv",
                                  csv_path=tmp_path / "criteo_x1" / "test.csv")
    assert scores is not None and np.isnan(scores["fused"]["gauc"])
    # a dataset with groups still reports them
    tb = load_bars(make_bars(tmp_path, "taobaoad_x1"))
    assert all(s.grouped for s in tb.splits.values())
