"""build_model: defaults, names, per-member dims, and clear errors for bad configs."""

from __future__ import annotations

import pytest

from cetnet.models import CETNet, DHEN, InterFormer, NaiveEnsemble, build_model
from models_support import one_thread, tiny_schema  # noqa: F401


def test_defaults():
    model = build_model({}, tiny_schema())
    assert isinstance(model, CETNet)
    assert model.member_names == ["dhen", "interformer"]
    assert isinstance(model.members["dhen"], DHEN)
    assert isinstance(model.members["interformer"], InterFormer)
    emb = model.embedding
    assert emb.num_models == 2 and emb.dims == (16, 16) and emb.optimizer == "rowwise_adagrad"
    assert emb.lr == 0.05 and emb.padding_idx == 0
    assert build_model(None, tiny_schema()).member_names == ["dhen", "interformer"]


def test_names_dims_and_sections():
    cfg = {"ensemble": "naive", "members": ["dnn", "dnn", "dcnv2", "dnn"],
           "embedding_dim": [8, 4, 6, 2], "embedding_optimizer": None,
           "dnn": {"hidden": [16]}, "dcnv2": {"rank": 3}, "naive": {"average": "logit"},
           "fusion": {"temperature": 2.0}}
    model = build_model(cfg, tiny_schema())
    assert isinstance(model, NaiveEnsemble) and model.average == "logit"
    assert model.member_names == ["dnn", "dnn_1", "dcnv2", "dnn_2"]
    assert model.embedding.dims == (8, 4, 6, 2)
    assert model.members["dnn_1"].mlp[0].out_features == 16
    cet = build_model({"members": "dnn", "fusion": {"temperature": 2.0,
                                                    "learnable_temperature": True}},
                      tiny_schema())
    assert cet.member_names == ["dnn"] and cet.fusion.learnable_temperature


@pytest.mark.parametrize("cfg,match", [
    ({"ensembel": "cetnet"}, r"unknown key\(s\) \['ensembel'\] in model"),
    ({"ensemble": "bagging"}, "unknown ensemble 'bagging'"),
    ({"members": ["dhen", "xgboost"]}, r"unknown member\(s\) \['xgboost'\]"),
    ({"members": []}, "at least one member"),
    ({"dhen": {"layers": 3}}, r"unknown key\(s\) \['layers'\] in model.dhen"),
    ({"fusion": {"temp": 1.0}}, r"unknown key\(s\) \['temp'\] in model.fusion"),
    ({"naive": {"mean": "prob"}, "ensemble": "naive"}, r"\['mean'\] in model.naive"),
    ({"ensemble": "multi_embedding", "multi_embedding": {"sets": 2}},
     r"\['sets'\] in model.multi_embedding"),
    ({"ensemble": "multi_embedding", "shared_embedding": True}, "separate embedding sets"),
    ({"embedding_dim": [8, 8, 8]}, "3 entries for 2 members"),
    ({"shared_embedding": True, "embedding_dim": [8, 4]}, "one dim for all members"),
    ({"embedding_optimizer": "adam"}, "embedding_optimizer must be"),
    ({"dhen": [1, 2]}, "model.dhen must be a mapping"),
    ({"embedding_bounds_check": "ignore"}, "model.embedding_bounds_check"),
    # a dropout of 1 trains a constant model whose tables get no gradient
    ({"dnn": {"dropout": 1.0}}, r"model.dnn.dropout must be in \[0, 1\), got 1"),
    ({"interformer": {"dropout": 1}, "members": ["interformer"]},
     r"model.interformer.dropout must be in \[0, 1\)"),
    # unused by a fixed temperature, but a typo all the same
    ({"fusion": {"temperature_range": "abc"}}, "temperature_range must be"),
    ({"fusion": {"temperature_range": [4.0, 0.5]}}, "0 < low < high"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg, tiny_schema())


def test_reference_backend_needs_dense_embedding_gradients():
    with pytest.raises(ValueError, match="embedding_optimizer: null"):
        build_model({}, tiny_schema(), backend="reference")
    model = build_model({"embedding_optimizer": None}, tiny_schema(), backend="reference")
    assert model.embedding.backend == "reference" and model.fusion.backend == "reference"



@pytest.mark.parametrize("section,value", [
    ("fusion", {"bogus": 1}), ("naive", {"averag": "logit"}), ("dhen", {"typo_key": 3})])
def test_sections_the_ensemble_does_not_read_are_still_checked(section, value):
    cfg = {"ensemble": "kdef", "members": ["dnn"], "embedding_optimizer": None, section: value}
    with pytest.raises(ValueError, match=f"in model.{section}"):
        build_model(cfg, tiny_schema())


@pytest.mark.parametrize("ensemble", ["cetnet", "multi_embedding"])
def test_embedding_bounds_check_reaches_the_embedding(ensemble):
    """model.embedding_bounds_check is optional (configs without it resolve as before) and
    sets the fused embedding's bounds_check."""
    assert build_model({"ensemble": ensemble}, tiny_schema()).front.embedding.bounds_check \
        == "error"
    for mode in ("off", "warn"):
        model = build_model({"ensemble": ensemble, "embedding_bounds_check": mode}, tiny_schema())
        assert model.front.embedding.bounds_check == mode


def test_a_fixed_temperature_takes_any_valid_range():
    model = build_model({"fusion": {"temperature": 8.0, "temperature_range": [0.5, 4.0]}},
                        tiny_schema())
    assert model.fusion.temperature == 8.0 and not model.fusion.learnable_temperature


def test_a_dcnv2_rank_at_or_above_its_input_width_warns():
    with pytest.warns(UserWarning, match=r"DCNv2: rank 100000 >= the cross input width"):
        build_model({"members": ["dcnv2"], "dcnv2": {"rank": 100000, "cross_layers": 1}},
                    tiny_schema())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model({"members": ["dcnv2"], "dcnv2": {"rank": 4, "cross_layers": 1}},
                    tiny_schema())
