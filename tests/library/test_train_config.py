"""cetnet.config: YAML + dotted overrides, types, unknown keys, finite values in range, bools
that are no numbers, float literals beyond float64, one-line errors."""

from __future__ import annotations

import re

import pytest

from cetnet.config import (_TRAIN_SPECS, SEED_RANGE, TRAIN_DEFAULTS, ConfigError, apply_overrides,
                           default_config_path, dump_config, load_config, parse_value, read_yaml,
                           validate_config)


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
    assert base["model"]["members"] == ["dnn", "dcnv2", "dnn"]
    assert base["data"]["name"] == "movielens-100k"
    assert set(base["train"]) == set(TRAIN_DEFAULTS)
    cfg = load_config(overrides=["train.epochs=3", "model.fusion.temperature=0.5",
                                 "train.lr=1e-2", "train.grad_clip=null", "train.patience=~",
                                 "model.members=[dnn]", "model.embedding_dim=16",
                                 "model.dnn.hidden=[32, 16]",
                                 "model.fusion.learnable_temperature=true", "device=cpu"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.01
    assert cfg["train"]["grad_clip"] is None and cfg["train"]["patience"] is None
    assert cfg["model"]["fusion"]["temperature"] == 0.5
    assert cfg["model"]["fusion"]["learnable_temperature"] is True
    assert cfg["model"]["members"] == ["dnn"] and cfg["model"]["dnn"]["hidden"] == [32, 16]
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


# --- values: finite, in range, of the right type (bool is no number) ----------------------------

FLOAT_KEYS = [k for k, s in _TRAIN_SPECS.items() if s.kind is float]
INT_KEYS = [k for k, s in _TRAIN_SPECS.items() if s.kind is int]


def test_every_float_key_is_covered():
    assert set(FLOAT_KEYS) == {"lr", "weight_decay", "min_lr_ratio", "gamma", "plateau_factor",
                               "grad_clip"}


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_non_finite_floats_are_rejected_naming_the_key(key, value):
    # Before: train.lr=.inf, grad_clip=.nan, min_lr_ratio=.nan, gamma=.inf ... were accepted
    with pytest.raises(ConfigError, match=rf"^config: train\.{key} must be finite, got "):
        load_config(overrides=[f"train.{key}={value}"])


@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_bool_is_not_a_number(key, value):
    with pytest.raises(ConfigError, match=rf"^config: train\.{key} must be .*(an int|a float), "
                                          rf"got (True|False)$"):
        load_config(overrides=[f"train.{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("train.min_lr_ratio=1.5", r"train.min_lr_ratio must be in \[0, 1\], got 1.5"),
    ("train.plateau_factor=2", r"train.plateau_factor must be in \[0, 1\], got 2.0"),
    ("train.grad_clip=0", r"train.grad_clip must be null or > 0, got 0.0"),
    ("train.lr=-1e-3", r"train.lr must be >= 0, got -0.001"),
    (f"train.seed={2**64}", rf"train.seed must be in \[{SEED_RANGE[0]}, {SEED_RANGE[1]}\]"),
    (f"train.seed={-2**63 - 1}", r"train.seed must be in \["),
    (f"train.batch_size={2**63}", r"train.batch_size must be <= 9223372036854775807 \(int64\)"),
    (f"train.lr={10**400}", r"train.lr must be a finite float, got an integer of 401 digits"),
    ("train.epochs=1e300", r"train.epochs must be <= 9223372036854775807 \(int64\), got 1000"),
    ("train.lr=1e-400", r"override 'train.lr=1e-400': '1e-400' is too small for a float64 "
                        r"\(it would read as 0.0\)"),
    ("train.weight_decay=-2.5e-999", r"'-2.5e-999' is too small for a float64"),
    ("train.lr=1e400", r"'1e400' is too large for a float64 \(it would read as inf"),
    ("train.lr=" + "9" * 5000, r"not a readable number: Exceeds the limit"),
    ("backend=bogus", r"backend must be one of auto, reference, cpu, cuda, triton, got 'bogus'"),
    ("backend=true", r"backend must be a str, got True"),
    ("device=[cuda]", r"device must be auto, cpu, cuda or cuda:N, got \['cuda'\]"),
    ("name=a/b", r"name must be a non-empty string without '/'"),
])
def test_out_of_range_values_raise_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=[override])
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_seed_range_is_what_torch_accepts():
    import torch

    for seed in SEED_RANGE:
        assert load_config(overrides=[f"train.seed={seed}"])["train"]["seed"] == seed
        torch.manual_seed(seed)
    for seed in (SEED_RANGE[0] - 1, SEED_RANGE[1] + 1):
        with pytest.raises((RuntimeError, ValueError)):
            torch.manual_seed(seed)
    # a data-parallel rank seeds with seed + rank: past the range it wraps, as torch does
    # for negative seeds, instead of failing on rank >= 1
    from cetnet.train.rng import seed_everything

    seed_everything(SEED_RANGE[1] + 1)
    assert torch.initial_seed() == 0
    seed_everything(-1)
    assert torch.initial_seed() == 2**64 - 1


def test_backends_match_the_kernels():
    from cetnet_kernels import BACKENDS

    for backend in BACKENDS:
        assert load_config(overrides=[f"backend={backend}"])["backend"] == backend


def test_float_literals_beyond_float64_in_a_file_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\nmodel:\n  fusion:\n    temperature: 1e-400\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: line 4, column 18: '1e-400' "
                                          r"is too small for a float64 \(it would read as 0.0\)"):
        load_config(path)
    path.write_text("name: mine\ntrain: {lr: .inf, gamma: 0.0e0, weight_decay: 0.0}\n")
    with pytest.raises(ConfigError, match="train.lr must be finite"):  # .inf is a literal inf
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed\n", r"not valid YAML: line 2, column 1: expected ',' or ']'"),
    ("train: [1, 2]\n", r"c.yaml: train must be a mapping, got \[1, 2\]"),
    ("train: []\n", r"c.yaml: train must be a mapping, got \[\]"),
    ("train: 0\n", r"c.yaml: train must be a mapping, got 0"),
    ("train: {lr: 0.1, lr: 0.001}\n", r"not valid YAML: line 1, column 18: the key 'lr' is given "
                                      r"twice in one mapping \(first on line 1\); YAML would "
                                      r"silently keep the last"),
    ("train: {lr: 0.1}\nmodel: {}\ntrain: {epochs: 2}\n",
     r"line 3, column 1: the key 'train' is given twice in one mapping \(first on line 1\)"),
    ("train:\n  1: 2\n", r"unknown train key\(s\) \[1\]"),
])
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_a_binary_file_is_no_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x80\x81\xff\x00name: x")
    with pytest.raises(ConfigError, match=r"c.yaml: not a YAML file \(not UTF-8 text\)"):
        load_config(path)


def test_unknown_key_of_a_file_with_int_keys_is_a_config_error():
    # before: ", ".join() of the known keys raised TypeError on an int key
    with pytest.raises(ConfigError, match="unknown key 'train.x'"):
        apply_overrides({"train": {1: 2}}, ["train.x=1"])


# --- model options: checked by build_model against the keyword they feed -------------------------

def _option_annotations() -> list[tuple[str, str, object]]:
    """(section, option, annotation) of every option of every model section."""
    import inspect

    from cetnet.models.build import (_FUSION_SKIP, _MEMBER_SKIP, _MULTI_SKIP, MEMBERS,
                                     MultiEmbedding, NaiveEnsemble)
    from cetnet_kernels import CETNetFusion

    targets = {**{k: (cls, _MEMBER_SKIP) for k, cls in MEMBERS.items()},
               "fusion": (CETNetFusion.__init__, _FUSION_SKIP),
               "naive": (NaiveEnsemble.__init__, ("self", "front", "members")),
               "multi_embedding": (MultiEmbedding.build, _MULTI_SKIP)}
    return [(section, name, p.annotation)
            for section, (fn, skip) in targets.items()
            for name, p in inspect.signature(fn, eval_str=True).parameters.items()
            if name not in skip]


def _model_error(cfg: dict) -> str:
    from cetnet.models import build_model
    from models_support import tiny_schema

    with pytest.raises(ConfigError) as info:
        build_model({"embedding_optimizer": None, **cfg}, tiny_schema(), backend="reference")
    message = str(info.value)
    assert "\n" not in message and message.startswith("config: ")
    return message


NUMERIC_OPTIONS = [(s, n, a) for s, n, a in _option_annotations()
                   if a in (int, float) or str(a) == "int | None"]


def test_the_numeric_options_are_all_found():
    names = {f"{s}.{n}" for s, n, _ in NUMERIC_OPTIONS}
    assert {"fusion.temperature", "fusion.ensemble_weight", "fusion.mutual_weight",
            "dnn.dropout", "dhen.num_layers", "dcnv2.rank", "interformer.num_heads",
            "multi_embedding.num_sets"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("section, name, annotation", NUMERIC_OPTIONS,
                         ids=[f"{s}.{n}" for s, n, _ in NUMERIC_OPTIONS])
def test_every_numeric_model_option_rejects_bools_and_non_finite_values(section, name,
                                                                        annotation):
    # Before: fusion.temperature=True built a model (True is an int), NaN loss weights were
    # found by the loss kernel at the first step, a NaN dropout by torch
    ensemble = "multi_embedding" if section == "multi_embedding" else "cetnet"
    for bad in (True, float("nan"), float("inf"), "1", [1]):
        message = _model_error({"ensemble": ensemble, "members": ["dnn"], section: {name: bad}})
        assert message.startswith(f"config: model.{section}.{name} must be "), message
        assert message.endswith(f"got {bad!r}"), message


@pytest.mark.parametrize("cfg, message", [
    ({"dnn": {"hidden": [32, -3]}}, r"model.dnn.hidden\[1\] must be in \[1, 1048576\], got -3$"),
    ({"dnn": {"hidden": [0]}}, r"model.dnn.hidden\[0\] must be in \[1, 1048576\], got 0$"),
    ({"dcnv2": {"hidden": [16, 0]}}, r"model.dcnv2.hidden\[1\] must be in \[1, 1048576\]"),
    # a section the ensemble does not read
    ({"dhen": {"head": [-1]}}, r"model.dhen.head\[0\] must be in \[1, 1048576\]"),
    ({"interformer": {"dot_hidden": [8, -8]}}, r"model.interformer.dot_hidden\[1\] must be"),
    ({"multi_embedding": {"hidden": [-4]}},
     r"model.multi_embedding.hidden\[0\] must be in \[1, 1048576\]"),
    ({"dnn": {"hidden": "32"}}, r"model.dnn.hidden must be a list of ints, got '32'"),
    # a product of sizes beyond int64 failed in torch even on the meta device; a count like
    # 2**62 layers built modules in a loop for ever
    ({"dcnv2": {"hidden": [2**62, 2**62]}},
     r"model.dcnv2.hidden\[0\] must be in \[1, 1048576\]"),
    ({"dcnv2": {"rank": 2**62}}, r"model.dcnv2.rank must be null or in \[1, 1048576\]"),
    ({"dcnv2": {"cross_layers": 2**62}}, r"model.dcnv2.cross_layers must be in \[0, 1024\]"),
    ({"dhen": {"num_layers": 5000}}, r"model.dhen.num_layers must be in \[0, 1024\], got 5000$"),
    ({"embedding_dim": 0}, r"model.embedding_dim must be in \[1, 1048576\], got 0"),
    ({"embedding_dim": [8, -1]}, r"model.embedding_dim\[1\] must be in \[1, 1048576\], got -1"),
    ({"embedding_dim": {"a": 1}}, r"model.embedding_dim must be an int or a list of ints"),
    ({"embedding_dim": True}, r"model.embedding_dim must be an int or a list of ints, got True"),
    ({"embedding_dim": 2**64}, r"model.embedding_dim must be in \[1, 1048576\], got 1844"),
    ({"fusion": {"temperature": 0.0}}, r"model.fusion.temperature must be >= 1.17549435\d*e-38, "
                                       r"got 0.0 \(.*a smaller literal such as 1e-400 reads as "
                                       r"0.0\)$"),
    ({"fusion": {"temperature": 1e-320}}, r"model.fusion.temperature must be >= 1.1754"),
    ({"fusion": {"temperature": True}}, r"model.fusion.temperature must be a float, got True$"),
    ({"fusion": {"reduction": "none"}}, r"model.fusion.reduction must be mean or sum"),
    ({"fusion": {"detach_weights": "yes"}}, r"model.fusion.detach_weights must be a bool"),
    ({"dnn": {"dropout": 1.5}}, r"model.dnn.dropout must be in \[0, 1\), got 1.5$"),
    ({"dnn": {"activation": ["relu"]}}, r"model.dnn.activation must be a str, got \['relu'\]$"),
    ({"interformer": {"num_heads": 0}},
     r"model.interformer.num_heads must be in \[1, 1024\], got 0$"),
    ({"members": ["interformer"], "embedding_dim": 6}, r"^config: model.interformer: "
                                                       r"InterFormer: dim 6 must split"),
    ({"shared_embedding": "false"}, r"model.shared_embedding must be a bool, got 'false'$"),
    ({"members": 5}, r"model.members must be a member name or a list of them, got 5$"),
    ({"members": [["dnn"]]}, r"model.members must be a member name or a list of them"),
    ({"ensemble": ["cetnet"]}, r"model.ensemble must be a str"),
    ({"embedding_lr": float("inf")}, r"model.embedding_lr must be finite, got inf$"),
    ({"embedding_lr": "x"}, r"model.embedding_lr must be a float, got 'x'$"),
    ({"embedding_optimizer": 1}, r"model.embedding_optimizer must be null or a str, got 1$"),
    ({"ensemble": "multi_embedding", "embedding_dim": [8, 8], "multi_embedding": {"num_sets": 3}},
     r"^config: model.multi_embedding: EmbeddingFront: 2 embedding dims for 3 members$"),
])
def test_model_option_errors_name_the_key(cfg, message):
    cfg = {"members": ["dnn", "dcnv2"], **cfg}
    assert re.search(message, _model_error(cfg))


def test_valid_model_options_are_coerced():
    from cetnet.models import build_model
    from models_support import tiny_schema

    model = build_model({"members": ["dnn"], "embedding_optimizer": None, "embedding_lr": 1,
                         "dnn": {"dropout": 0, "hidden": [8.0]}, "fusion": {"temperature": 2}},
                        tiny_schema(), backend="reference")
    assert model.members["dnn"].mlp[0].out_features == 8
    assert model.fusion.temperature == 2.0
