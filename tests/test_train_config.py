"""cetnet.config: YAML + dotted overrides, types, unknown keys."""

from __future__ import annotations

import pytest

from cetnet.config import (TRAIN_DEFAULTS, ConfigError, apply_overrides, default_config_path,
                           dump_config, load_config, parse_value, read_yaml, validate_config)


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("2.5E+2", 250.0), ("true", True),
    ("False", False), ("null", None), ("~", None), ("[1, 2.5, a]", [1, 2.5, "a"]),
    ("[dhen, interformer]", ["dhen", "interformer"]), ("{a: 1}", {"a": 1}), ("prob", "prob"),
    ("cuda:0", "cuda:0"), ("", ""), ("[unclosed", "[unclosed"),
])
def test_parse_value_types(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_default_config_loads_and_overrides_apply():
    base = load_config()
    assert base["model"]["ensemble"] == "cetnet"
    assert base["model"]["members"] == ["dhen", "interformer"]
    assert base["data"]["name"] == "movielens-100k"
    assert set(base["train"]) == set(TRAIN_DEFAULTS)
    cfg = load_config(overrides=["train.epochs=3", "model.fusion.temperature=0.5",
                                 "train.lr=1e-2", "train.grad_clip=null", "train.patience=~",
                                 "model.members=[dnn]", "model.dnn.hidden=[32, 16]",
                                 "model.fusion.learnable_temperature=true", "device=cpu"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.01
    assert cfg["train"]["grad_clip"] is None and cfg["train"]["patience"] is None
    assert cfg["model"]["fusion"]["temperature"] == 0.5
    assert cfg["model"]["fusion"]["learnable_temperature"] is True
    assert cfg["model"]["members"] == ["dnn"] and cfg["model"]["dnn"] == {"hidden": [32, 16]}
    assert cfg["device"] == "cpu"
    assert base["train"]["epochs"] != 3  # overrides copy, never mutate


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch'"),
    ("trian.epochs=3", "unknown top-level key 'trian'"),
    ("train.epochs=three", "train.epochs must be an int"),
    ("train.epochs=true", "train.epochs must be an int"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.lr=null", "train.lr must not be null"),
    ("train.lr_schedule=linear", "lr_schedule must be one of"),
    ("train.epochs.x=1", "'train.epochs' is a int, not a mapping"),
    ("device=tpu", "device must be"),
    ("epochs", "expected KEY=VALUE"),
    ("train..lr=1", "empty component"),
])
def test_bad_overrides_raise_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(overrides=[override])


def test_numbers_are_coerced():
    cfg = apply_overrides(load_config(), ["train.lr=1", "train.max_steps_per_epoch=1e3"])
    cfg = validate_config(cfg)
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["max_steps_per_epoch"] == 1000
    assert isinstance(cfg["train"]["max_steps_per_epoch"], int)


def test_user_file_is_completed_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\ntrain:\n  epochs: 2\n  lr: 3e-4\n")
    cfg = load_config(path)
    assert cfg["name"] == "mine" and cfg["train"]["lr"] == 3e-4
    assert cfg["train"]["batch_size"] == TRAIN_DEFAULTS["batch_size"]
    assert cfg["model"] == read_yaml(default_config_path())["model"]
    path.write_text("name: mine\ntrain:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"unknown train key\(s\) \['epochz'\]"):
        load_config(path)
    path.write_text("name: mine\nmodle: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level key"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(overrides=["train.lr=1e-4", "model.fusion.temperature=0.25"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
