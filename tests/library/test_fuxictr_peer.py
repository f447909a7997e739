"""The FuxiCTR peer (cetnet.reproduce.peers): FuxiCTR's DNN / DCNv2 trained by FuxiCTR's own
``BaseModel.fit`` on cetnet's data. Skipped when fuxictr (with polars, h5py, scikit-learn) is
not installed; ``make venv`` installs it."""

from __future__ import annotations

import math
import os

import pytest
import torch

from cetnet.config import ConfigError
from cetnet.data import load_dataset
from cetnet.reproduce import peers
from cetnet.reproduce.experiment import base_config
from cetnet.train.rng import shuffle_seed

needs_fuxictr = pytest.mark.skipif(
    not peers.fuxictr_available(),
    reason=f"fuxictr is not installed (install: {peers.INSTALL_HINT})")

TINY = ["data.num_rows=1200", "train.epochs=1", "train.batch_size=64",
        "train.eval_batch_size=256", "model.embedding_dim=4", "device=cpu"]


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", num_rows=1200)


def test_missing_fuxictr_is_a_config_error_naming_the_install(monkeypatch):
    def missing():
        raise ImportError("No module named 'fuxictr'")

    monkeypatch.setattr(peers, "_import_fuxictr", missing)
    assert not peers.fuxictr_available()
    with pytest.raises(ConfigError, match="pip install --no-deps fuxictr=="):
        peers.require_fuxictr()


def test_bad_kind_and_hidden_are_config_errors():
    cfg = {"model": {"dnn": {"hidden": "wide"}}}
    with pytest.raises(ConfigError, match="kind"):
        peers.model_params(cfg, "dhen")
    with pytest.raises(ConfigError, match="model.dnn.hidden"):
        peers.model_params(cfg, "dnn")
    assert peers.model_params({"model": {}}, "dnn")["hidden_units"] == [500, 500, 500]
    got = peers.model_params({"model": {"dcnv2": {"hidden": [8, 4]}}}, "dcnv2")
    assert got["parallel_dnn_hidden_units"] == got["stacked_dnn_hidden_units"] == [8, 4]


@needs_fuxictr
def test_feature_map_covers_the_schema(synthetic):
    schema = synthetic.schema
    fmap = peers.build_feature_map(schema, embedding_dim=4)
    assert list(fmap.features) == [f.name for f in schema.features]
    assert fmap.labels == [schema.label]
    kinds = {"sparse": "categorical", "multihot": "sequence", "sequence": "sequence",
             "dense": "numeric"}
    for f in schema.features:
        spec = fmap.features[f.name]
        assert spec["type"] == kinds[f.kind], f.name
        if f.kind == "dense":
            assert "vocab_size" not in spec
            continue
        assert spec["vocab_size"] == f.vocab_size and spec["padding_idx"] == 0, f.name
        if f.kind != "sparse":
            assert spec["max_len"] == max(f.max_len, 1)
            assert spec["feature_encoder"] == "layers.MaskedAveragePooling()"  # mean pooling
    assert fmap.sum_emb_out_dim() == 4 * len(schema.features)


@needs_fuxictr
def test_batches_carry_the_split_rows_in_order(synthetic):
    schema, split = synthetic.schema, synthetic.splits["train"]
    # unshuffled: the split's rows in order
    gen = peers.SplitGenerator(split, schema, 100)
    got = list(gen)
    assert len(got) == len(gen) == math.ceil(len(split) / 100)
    assert torch.equal(torch.cat([b[schema.label] for b in got]), split.label)
    # shuffled: epoch e is cetnet's epoch e (same seed, same order), a new order each epoch
    gen = peers.SplitGenerator(split, schema, 64, shuffle=True, seed=7)
    for epoch in (1, 2):
        mine = list(gen)
        cetnet = list(split.batches(64, shuffle=True, seed=shuffle_seed(7, epoch)))
        assert len(mine) == len(cetnet)
        for a, b in zip(mine, cetnet):
            assert torch.equal(a[schema.label], b.label)
            for f in schema.sparse:
                assert torch.equal(a[f.name], b.sparse[f.name])
            for f in schema.sequence:
                assert torch.equal(a[f.name], b.sequence[f.name])
            for j, f in enumerate(schema.dense):
                assert torch.equal(a[f.name], b.dense[:, j])
            for f in schema.multihot:  # padded rows hold each bag, left-aligned, in order
                values, offsets = b.multihot[f.name]
                padded = a[f.name]
                for r in range(len(b)):
                    bag = values[offsets[r]:offsets[r + 1]]
                    assert torch.equal(padded[r, :bag.numel()], bag)
                    assert not padded[r, bag.numel():].any()
    capped = peers.SplitGenerator(split, schema, 64, shuffle=True, max_steps=3)
    assert len(capped) == 3 and len(list(capped)) == 3


@needs_fuxictr
@pytest.mark.parametrize("kind", peers.KINDS)
def test_train_fuxictr_tiny_run(kind, tmp_path, monkeypatch):
    cfg = base_config("synthetic", overrides=[*TINY, f"model.{kind}.hidden=[16, 8]"])
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    m = peers.train_fuxictr(cfg, kind, tmp_path / "run")
    # FuxiCTR's seed_everything set these for the whole process (the cetnet rows trained
    # after a peer in one reproduce process ran under them)
    assert torch.backends.cudnn.deterministic is False and "PYTHONHASHSEED" not in os.environ
    for key in ("fused", "members", "valid", "best_epoch", "epochs_completed", "stopped_early",
                "train_seconds", "train_samples", "history"):
        assert key in m, key
    name = f"fuxictr_{kind}"
    assert list(m["members"]) == [name] and m["members"][name] == m["fused"]
    for scores in (m["fused"], m["valid"]["fused"]):
        assert set(scores) == {"auc", "gauc", "logloss"}
        assert all(math.isfinite(v) for v in scores.values()), scores
    assert m["best_epoch"] == 1 and m["epochs_completed"] == 1 and not m["stopped_early"]
    assert m["train_samples"] == 960 and m["train_seconds"] > 0  # the synthetic train split
    (h,) = m["history"]
    assert h["epoch"] == 1 and math.isfinite(h["train_loss"])
    assert h["valid"]["fused"]["auc"] == pytest.approx(m["valid"]["fused"]["auc"], abs=1e-6)
    assert m["peer"]["params"][peers._HIDDEN_KEYS[kind][0]] == [16, 8]
    # FuxiCTR's checkpoint lies under the run directory
    assert (tmp_path / "run" / "synthetic" / f"{m['peer']['model']}.model").is_file()
