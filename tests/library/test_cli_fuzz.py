"""Hypothesis over ``cetnet train`` config overrides: random dotted keys (from the real config
tree and made up) with random values (numbers huge, tiny, NaN, inf; bools; null; strings;
lists; mappings). Every outcome is a config that passes validation or one line
``cetnet train: error: ...`` with exit status 2, never another exception.

Fast: ``--dry-run`` checks the config, the dataset and the model (built on the meta device)
and writes nothing; a config that passes is then built for real (when small) and one batch is
run through the model, so that what validation accepts also works. The ``data`` section is
left to the dataset's own checks (tests/library/test_data_*.py): its options reach the loaders.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cetnet.cli import main, parse_args, train_config  # noqa: E402
from cetnet.config import TRAIN_DEFAULTS, ConfigError, dump_config, load_config  # noqa: E402
from cetnet.models.build import (_FUSION_SKIP, _MEMBER_SKIP, _MULTI_SKIP, DEFAULTS,  # noqa: E402
                                 MEMBERS, MultiEmbedding, NaiveEnsemble, build_model)
from cetnet.train import load_dataset  # noqa: E402
from cetnet_kernels import CETNetFusion  # noqa: E402

DATA = {"name": "synthetic", "num_rows": 300, "num_users": 12, "num_items": 20,
        "num_clusters": 3, "cross_size": 4, "num_tags": 5, "max_seq_len": 4, "seed": 0}
BASE = {
    "name": "fuzz",
    "data": DATA,
    "model": {"ensemble": "cetnet", "members": ["dnn", "dcnv2"], "embedding_dim": 4,
              "embedding_optimizer": None, "dnn": {"hidden": [8]},
              "dcnv2": {"cross_layers": 1, "hidden": [8]}, "fusion": {"temperature": 1.0}},
    "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 1},
    "backend": "reference",
    "device": "cpu",
}
SECTIONS = {**{k: (cls, _MEMBER_SKIP) for k, cls in MEMBERS.items()},
            "fusion": (CETNetFusion.__init__, _FUSION_SKIP),
            "naive": (NaiveEnsemble.__init__, ("self", "front", "members")),
            "multi_embedding": (MultiEmbedding.build, _MULTI_SKIP)}
REAL_KEYS = (["name", "backend", "device", "train", "model"]
             + [f"train.{k}" for k in TRAIN_DEFAULTS]
             + [f"model.{k}" for k in DEFAULTS] + [f"model.{k}" for k in SECTIONS]
             + [f"model.{section}.{name}" for section, (fn, skip) in SECTIONS.items()
                for name in inspect.signature(fn).parameters if name not in skip])
WORDS = ["dnn", "dcnv2", "dhen", "interformer", "relu", "swish", "gelu", "mean", "sum", "none",
         "prob", "logit", "cetnet", "naive", "kdef", "multi_embedding", "cpu", "cuda", "cuda:0",
         "auto", "reference", "triton", "concat", "stacked", "parallel", "dot", "dcn", "self",
         "sigmoid", "masknet", "rowwise_adagrad", "sgd", "cosine", "step", "plateau", "constant"]

identifier = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
made_up_key = st.tuples(st.sampled_from(["", "train.", "model.", "model.dnn.", "model.fusion.",
                                         "name.", "device."]),
                        st.lists(identifier, min_size=1, max_size=3)).map(
    lambda t: t[0] + ".".join(t[1]))
key = st.one_of(st.sampled_from(REAL_KEYS), st.sampled_from(REAL_KEYS), made_up_key)

number = st.one_of(
    st.integers(-3, 70).map(str),  # often valid: the real build runs
    st.integers(-10**30, 10**30).map(str),
    st.integers(2**62, 2**66).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 1).map(repr),
    st.sampled_from(["1e-400", "-1e-400", "1e400", "1e308", "5e-324", "1e-320", "9" * 40,
                     ".nan", ".inf", "-.inf", "-0.0", "0", "1e-30", "1e4", "2.5", "1_000"]),
)
scalar = st.one_of(number, st.sampled_from(WORDS),
                   st.sampled_from(["true", "false", "yes", "no", "on", "null", "~", ""]),
                   st.text(max_size=10))
flow_list = st.lists(st.one_of(number, st.sampled_from(WORDS)), max_size=4).map(
    lambda xs: "[" + ", ".join(xs) + "]")
flow_map = st.dictionaries(identifier, st.one_of(number, st.sampled_from(WORDS)),
                           max_size=3).map(
    lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")
value = st.one_of(scalar, scalar, flow_list, flow_map)
override = st.tuples(key, value).map(lambda kv: f"{kv[0]}={kv[1]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "tiny.yaml"
    dump_config(BASE, path)
    data = dict(DATA)
    return path, root / "run", load_dataset(data.pop("name"), **data)


def _run_a_batch(config: dict, dataset) -> None:
    """A config validation accepted builds and runs (forward + loss + backward) for real."""
    with torch.device("meta"):
        meta = build_model(config["model"], dataset.schema, backend=config["backend"])
    if sum(p.numel() for p in meta.parameters()) > 2_000_000:
        return  # a big model: the meta build is the check
    model = build_model(config["model"], dataset.schema, backend=config["backend"])
    batch = next(iter(dataset.splits["train"].batches(16)))
    model.train()
    loss, _ = model.loss(batch)
    assert loss.dim() == 0
    loss.backward()
    model.eval()
    with torch.no_grad():
        prob = model(batch).prob
    assert prob.shape == (16,)


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(override, min_size=1, max_size=4))
def test_any_override_validates_or_is_one_line_error(setup, overrides):
    path, run_dir, dataset = setup
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "--config", str(path), "--out", str(run_dir), "--dry-run",
                     *overrides])
    assert not run_dir.exists()  # a dry run writes nothing
    if code == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cetnet train: error: "), err.getvalue()
        assert len(lines[0]) < 600, lines[0]
        return
    assert code == 0, (code, err.getvalue())
    assert "dry run: " in out.getvalue()
    config, _, _ = train_config(parse_args(["train", "--config", str(path), *overrides]))
    for key in ("lr", "weight_decay", "gamma", "min_lr_ratio", "plateau_factor"):
        assert math.isfinite(config["train"][key])
    _run_a_batch(config, dataset)


def test_the_key_pool_reaches_every_section():
    sections = {k.split(".")[1] for k in REAL_KEYS if k.startswith("model.") and k.count(".") == 2}
    assert sections == set(SECTIONS)
    assert "model.fusion.temperature" in REAL_KEYS and "train.grad_clip" in REAL_KEYS


def test_a_bug_is_not_dressed_as_an_input_error(setup, monkeypatch):
    """Only the input's errors become one line: a TypeError out of the code keeps its
    traceback."""
    path, run_dir, _ = setup

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr("cetnet.train.runner._meta_model", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["train", "--config", str(path), "--out", str(run_dir), "--dry-run"])
    with pytest.raises(ConfigError):  # and an input error out of the same place is one line
        load_config(path, ["train.lr=.nan"])
