"""`cetnet search`: what is checked before and around a trial. A candidate too large to
allocate fails its trial, not the search; the space's values are checked when it is read; a
run whose every trial failed exits non-zero; attention's FLOPs are counted; the warm-up loss
term is the fused prediction's log loss; the warm-up keeps the config's step cap; a space's
base cannot move the data; --set in another order resumes; a --set the space overrides is
named in a warning."""

from __future__ import annotations

import csv

import math
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from cetnet.config import validate_config  # noqa: E402
from cetnet.search.cost import COST_VERSION, model_cost  # noqa: E402
from cetnet.search.engine import (AllTrialsFailed, SearchError, SearchOptions,  # noqa: E402
                                  check_candidate, run_search, setup_changes, warmup_config)
from cetnet.search.space import SpaceError, check_values, load_space  # noqa: E402

DATA = ["data.num_rows=1000", "data.num_users=40", "data.num_items=80", "data.num_clusters=4",
        "data.cross_size=6", "data.num_tags=8", "data.max_seq_len=4"]
SPACE = """\
ensemble: [naive]
members: {count: 1, kinds: [dnn]}
embedding_dim: [4, 8]
member: {dnn: {hidden: {width: [8, 16], depth: 1}}}
train: {lr: [0.01], batch_size: [128]}
base:
  backend: reference
  device: cpu
  model: {embedding_optimizer: null}
  train: {epochs: 1, eval_batch_size: 1024, warmup_steps: 0, log_every: 1000}
"""
#: What torch's CPU allocator says when it cannot allocate (a tensor of 4 TiB).
ALLOCATOR_ERROR = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                   "memory: you tried to allocate 4398046511104 bytes.")


@pytest.fixture(scope="module")
def tiny_dataset():
    from cetnet.search.engine import _base, _load_dataset

    base = _base(SearchOptions(out=Path("."), dataset="synthetic", overrides=DATA))
    return base, _load_dataset(base)


def _options(tmp_path: Path, space: str = SPACE, **kw) -> SearchOptions:
    path = tmp_path / "space.yaml"
    path.write_text(space)
    kw.setdefault("trials", 3)
    kw.setdefault("sampler", "random")
    kw.setdefault("warmup_fraction", 0.0)
    kw.setdefault("pruner", "none")
    return SearchOptions(out=tmp_path / "out", dataset="synthetic", space=str(path),
                         overrides=DATA, say=lambda text: None, **kw)


def _states(study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


# --- 1. a candidate too large to allocate -------------------------------------------------------

def test_a_candidate_too_large_to_allocate_fails_its_trial_not_the_search(
        tmp_path, monkeypatch, one_thread):
    import cetnet.train
    import cetnet.train.builders
    import cetnet.train.runner
    from cetnet.search import engine

    real = cetnet.train.builders.build_model
    calls = {"real": 0}

    def builder(*args, **kwargs):  # the first real build (trial 0's cost) cannot allocate
        if torch.empty(0).device.type != "meta":
            calls["real"] += 1
            if calls["real"] == 1:
                raise RuntimeError(ALLOCATOR_ERROR)
        return real(*args, **kwargs)

    for module in (cetnet.train, cetnet.train.builders, cetnet.train.runner):
        monkeypatch.setattr(module, "build_model", builder)
    trained = engine.train_or_reuse
    runs = {"n": 0}

    def train(config, run_dir):  # the second trial's training runs out of memory
        runs["n"] += 1
        if runs["n"] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return trained(config, run_dir)

    monkeypatch.setattr(engine, "train_or_reuse", train)
    said: list[str] = []
    options = _options(tmp_path)
    options.say = said.append
    study = run_search(options)
    assert _states(study) == ["FAIL", "FAIL", "COMPLETE"]
    errors = [t.user_attrs.get("error", "") for t in study.get_trials()]
    assert "its parameters do not fit in memory" in errors[0], errors
    assert "out of memory" in errors[1], errors
    rows = (options.out / "trials.csv").read_text()
    assert "do not fit in memory" in rows and (options.out / "SEARCH.md").is_file()
    assert any(line.startswith("trial 0: invalid config: ") for line in said), said


def test_a_run_whose_every_trial_failed_says_so_and_exits_non_zero(tmp_path, monkeypatch,
                                                                   capsys):
    import cetnet.train
    import cetnet.train.builders
    import cetnet.train.runner
    from cetnet.cli import main

    real = cetnet.train.builders.build_model

    def builder(*args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise RuntimeError(ALLOCATOR_ERROR)
        return real(*args, **kwargs)

    for module in (cetnet.train, cetnet.train.builders, cetnet.train.runner):
        monkeypatch.setattr(module, "build_model", builder)
    options = _options(tmp_path, trials=2)
    with pytest.raises(AllTrialsFailed, match="all 2 trial"):
        run_search(options)
    assert (options.out / "trials.csv").is_file() and (options.out / "SEARCH.md").is_file()
    capsys.readouterr()
    status = main(["search", "--dataset", "synthetic", "--space", str(options.space),
                   "--out", str(tmp_path / "cli"), "--trials", "2", "--sampler", "random",
                   "--warmup-fraction", "0", "--set", *DATA])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert status == 1 and len(err) == 1, captured
    assert err[0].startswith("cetnet search: error: all 2 trial(s) of this run failed: see the "
                             "error column of ") and "trials.csv" in err[0], err
    assert "wrote" not in captured.out and "Traceback" not in captured.out + captured.err


# --- 2. the space's values, checked when it is read ---------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("embedding_dim: [4, -8]\n", "embedding_dim: -8 makes an invalid trial config: "),
    ("fusion: {fusion_space: [prob, banana]}\n", "fusion.fusion_space: 'banana' makes"),
    ("model: {embedding_optimizer: [adagradd]}\n", "model.embedding_optimizer: 'adagradd'"),
    ("train: {batch_size: [-1, 0]}\n", "train.batch_size: -1 makes"),
    ("member: {dnn: {dropout: {low: 0.5, high: 1.5}}}\n", "member.dnn.dropout: 1.5 makes"),
    ("train: {epochs: {low: 1.0, high: 3.0}}\n", "train.epochs: 1.764 (inside the range"),
])
def test_the_space_values_are_checked_when_it_is_read(text, message, tmp_path, tiny_dataset):
    base, dataset = tiny_dataset
    path = tmp_path / "s.yaml"
    path.write_text("ensemble: [cetnet, naive]\nmembers: {count: 2, kinds: [dnn, dcnv2]}\n"
                    "base: {backend: reference, model: {embedding_optimizer: null}}\n" + text)
    with pytest.raises(SpaceError, match=f"^search space {path}: ") as raised:
        check_values(load_space(path), base, lambda c: check_candidate(c, dataset.schema),
                     str(path))
    assert message in str(raised.value) and "\n" not in str(raised.value), raised.value


def _check_text(text, tmp_path, tiny_dataset):
    base, dataset = tiny_dataset
    path = tmp_path / "s.yaml"
    path.write_text("base: {backend: reference, model: {embedding_optimizer: null}}\n" + text)
    check_values(load_space(path), base, lambda c: check_candidate(c, dataset.schema),
                 str(path))


@pytest.mark.parametrize("text", [
    # 8 heads fail at dim 8 only: the trials that draw both fail, as any invalid trial
    "ensemble: [cetnet]\nmembers: {count: 2, kinds: [dnn, interformer]}\n"
    "embedding_dim: [8, 16, 32]\nmember: {interformer: {num_heads: [2, 8]}}\n",
    # a shared embedding fails with multi_embedding only, whichever comes first
    "ensemble: [multi_embedding, cetnet]\nmembers: {count: 2, kinds: [dnn]}\n"
    "embedding_dim: [8]\nmodel: {shared_embedding: [true, false]}\n",
    "ensemble: [cetnet, multi_embedding]\nmembers: {count: 2, kinds: [dnn]}\n"
    "embedding_dim: [8]\nmodel: {shared_embedding: [false, true]}\n",
])
def test_a_value_only_some_combinations_refuse_is_left_to_the_trials(text, tmp_path,
                                                                       tiny_dataset):
    _check_text(text, tmp_path, tiny_dataset)  # no error


@pytest.mark.parametrize("text, message", [
    # 8 heads at the one dim offered: no config holds it validly
    ("ensemble: [cetnet]\nmembers: {count: 2, kinds: [dnn, interformer]}\n"
     "embedding_dim: [8]\nmember: {interformer: {num_heads: [2, 8]}}\n",
     "member.interformer.num_heads: 8 makes"),
    # a fixed bad value is named by its key, not by a parameter that avoids it
    ("ensemble: [cetnet, multi_embedding]\nmembers: {count: 2, kinds: [dnn, dcnv2]}\n"
     "member: {dnn: {dropout: 1.5}}\n", "member.dnn.dropout: 1.5 makes"),
    ("ensemble: [cetnet, naive]\nmembers: {count: 2, kinds: [dnn, dcnv2]}\n"
     "member: {dnn: {hidden: {width: [0], depth: 1}}}\n", "member.dnn.hidden"),
])
def test_a_value_no_config_can_hold_is_refused_by_its_key(text, message, tmp_path,
                                                         tiny_dataset):
    with pytest.raises(SpaceError, match="makes an invalid trial config") as raised:
        _check_text(text, tmp_path, tiny_dataset)
    assert message in str(raised.value), raised.value


def test_a_space_is_checked_before_a_study_exists(tmp_path, capsys):
    from cetnet.cli import main

    options = _options(tmp_path, SPACE.replace("embedding_dim: [4, 8]", "embedding_dim: [4, -8]"))
    with pytest.raises(SpaceError, match="embedding_dim: -8 makes an invalid trial config"):
        run_search(options)
    assert not (options.out / "study.db").exists()
    status = main(["search", "--dataset", "synthetic", "--space", str(options.space), "--out",
                   str(tmp_path / "cli"), "--trials", "1", "--set", *DATA])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "embedding_dim: -8" in err[0], err


@pytest.mark.parametrize("text, key, message", [
    # a list is a choice of one value: 64 or 128, neither a layer list
    ("member: {dnn: {hidden: [64, 128]}}\n", "member.dnn.hidden",
     "a list here is a choice of one width, but hidden is a list of layer widths: give "
     "{width: [64, 128], depth: <layers>}"),
    ("member: {dcnv2: {cross_layers: {width: [64], depth: 1}}}\n", "member.dcnv2.cross_layers",
     "{width, depth} makes a list of layer widths, which cross_layers is not"),
    ("multi_embedding: {cross_layers: {width: [2], depth: 1}}\n",
     "multi_embedding.cross_layers", "which cross_layers is not"),
    ("base: {data: {name: synthetic, num_rows: 1000}}\n", "base.data",
     "not in a space: the trials' data is --dataset with --set data.<key>=..."),
    ("base: {name: mine}\n", "base.name", "the search names each trial's run"),
])
def test_mistakes_of_the_space_file_name_the_key(text, key, message, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=f"^search space {path}: {key}: ") as raised:
        load_space(path)
    assert message in str(raised.value), raised.value


def test_an_empty_space_file_is_refused(tmp_path):
    # it became a space of the checks' defaults (not even the packaged one), silently
    for text in ("", "# nothing yet\n", "{}\n"):
        path = tmp_path / "s.yaml"
        path.write_text(text)
        with pytest.raises(SpaceError, match=f"search space {path}: the file is empty"):
            load_space(path)


def test_the_packaged_space_passes_its_value_checks(tiny_dataset):
    base, dataset = tiny_dataset
    checked: list[dict] = []

    def check(config: dict) -> None:
        checked.append(config)
        check_candidate(config, dataset.schema)

    check_values(load_space("default"), base, check, "default")
    # every choice was in a checked config: each member kind, each ensemble
    models = [c["model"] for c in checked]
    assert {m["ensemble"] for m in models} == {"cetnet", "naive", "kdef", "multi_embedding"}
    assert {k for m in models for k in m.get("members", [])} == \
        {"dnn", "dcnv2", "dhen", "interformer"}


# --- 3. attention's FLOPs, and the measurements a study records --------------------------------

def test_the_cost_counts_attention(tiny_dataset, monkeypatch):
    """On the CPU SDPA dispatched to a flash kernel FlopCounterMode has no formula for: an
    InterFormer's attention counted as 0 FLOPs."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import sdpa_flop_count

    base, dataset = tiny_dataset
    config = validate_config({**base, "name": "t", "model": {
        "ensemble": "cetnet", "members": ["interformer", "dnn"], "embedding_dim": 8,
        "embedding_optimizer": None, "dnn": {"hidden": [8]}}})
    real = F.scaled_dot_product_attention
    shapes: list[tuple] = []

    def recording(q, k, v, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, *args, **kwargs)

    def without(q, k, v, *args, **kwargs):  # the same shapes out, no attention computed
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    flops, _ = model_cost(config, dataset)
    monkeypatch.setattr(F, "scaled_dot_product_attention", without)
    rest, _ = model_cost(config, dataset)
    rows = min(64, len(dataset.splits["valid"]))
    by_hand = sum(sdpa_flop_count(*s) for s in shapes) / rows
    assert shapes and by_hand > 0
    assert flops - rest == pytest.approx(by_hand)


def test_a_study_measured_the_earlier_way_is_not_resumed(tmp_path, one_thread):
    options = _options(tmp_path, trials=1)
    study = run_search(options)
    assert study.user_attrs["setup"]["cost_version"] == COST_VERSION
    # trials.csv says it too, for --compare (which refuses to pool two versions)
    with (options.out / "trials.csv").open() as f:
        assert {r["cost_version"] for r in csv.DictReader(f)} == {str(COST_VERSION)}
    setup = dict(study.user_attrs["setup"])
    del setup["cost_version"]  # as cetnet recorded it before the version
    study.set_user_attr("setup", setup)
    resumed = SearchOptions(**{**vars(options), "trials": 2, "resume": True})
    with pytest.raises(SearchError, match=r"was measured by another cetnet \(cost version 1 "
                                          r"\(FLOPs without attention.*\), this one "
                                          f"{COST_VERSION}.*start a new study"):
        run_search(resumed)


def test_a_study_trained_by_other_code_is_resumed_only_when_asked(tmp_path, one_thread,
                                                                   monkeypatch):
    """A study records the code that trains it, each trial its own: an upgraded cetnet (another
    digest) refuses to rank new trials with the old ones unless --reuse-other-code, which
    continues it and records the new code, its runs kept apart; a study of an earlier cetnet
    (no code recorded) is other code."""
    from cetnet import code_identity as ci

    options = _options(tmp_path, trials=1)
    study = run_search(options)
    mine = ci.code_identity("auto")
    assert study.user_attrs["setup"]["code"] == mine
    assert [t.user_attrs["code"] for t in study.trials] == [ci.code_tag(mine)]
    upgraded = {**mine, "digest": "0123456789abcdef"}
    real = ci.code_identity
    monkeypatch.setattr(ci, "code_identity", lambda device: upgraded)
    resumed = SearchOptions(**{**vars(options), "trials": 2, "resume": True})
    with pytest.raises(SearchError, match=rf"was run by other code \(cetnet .*code "
                                          rf"{mine['digest']}.*this is .*0123456789abcdef.*"
                                          r"--reuse-other-code"):
        run_search(resumed)
    said = []
    study = run_search(SearchOptions(**{**vars(resumed), "reuse_other_code": True,
                                        "say": said.append}))
    assert any("continued by other code" in line for line in said)
    assert study.user_attrs["setup"]["code"] == upgraded
    with (options.out / "trials.csv").open() as f:
        assert [r["code"] for r in csv.DictReader(f)] == [ci.code_tag(mine),
                                                           ci.code_tag(upgraded)]
    # runs are kept per code: the new trial never reuses a run the earlier build trained
    runs = [Path(t.user_attrs["run_dir"]) for t in study.trials]
    assert [r.parent.name for r in runs] == [ci.code_tag(mine), ci.code_tag(upgraded)]
    assert study.trials[1].user_attrs["reused"] is False
    # a study of a cetnet that did not record its code is other code too
    setup = dict(study.user_attrs["setup"])
    del setup["code"]
    study.set_user_attr("setup", setup)
    with pytest.raises(SearchError, match=r"was run by other code \(unrecorded"):
        run_search(SearchOptions(**{**vars(resumed), "trials": 3}))
    study = run_search(SearchOptions(**{**vars(resumed), "trials": 3, "reuse_other_code": True}))
    assert study.user_attrs["setup"]["code"] == upgraded
    # a study trained on a GPU is other code for a CPU machine (device: auto trains on either)
    monkeypatch.setattr(ci, "code_identity", real)
    study.set_user_attr("setup", {**study.user_attrs["setup"], "code": {**mine, "device": "NVIDIA H200 (sm_90)",
                                                    "triton": "3.6.0"}})
    with pytest.raises(SearchError, match=r"was run by other code \(.*device NVIDIA H200 "
                                          r"\(sm_90\) with Triton 3\.6\.0; this is .*device cpu\)"):
        run_search(SearchOptions(**{**vars(resumed), "trials": 4}))


# --- 4. the warm-up loss term --------------------------------------------------------------------

def test_the_warmup_loss_term_is_the_fused_predictions_log_loss(tmp_path, tiny_dataset):
    """It was the training objective, which the loss weights scale: the same predictions
    scored 3x apart between a CETNet's weights."""
    from cetnet.metrics import logloss
    from cetnet.search.proxies import _dense_model, warmup_statistics
    from cetnet.train import run_training
    from cetnet.train.checkpoint import load_checkpoint

    base, dataset = tiny_dataset

    def config(member_weight: float, distill_weight: float) -> dict:
        return validate_config({
            **base, "name": "w", "backend": "reference", "device": "cpu",
            "model": {"ensemble": "cetnet", "members": ["dnn", "dcnv2"], "embedding_dim": 8,
                      "embedding_optimizer": None, "dnn": {"hidden": [16]},
                      "dcnv2": {"hidden": [16]},
                      "fusion": {"member_weight": member_weight,
                                 "distill_weight": distill_weight}},
            "train": {**base["train"], "epochs": 1, "max_steps_per_epoch": 3,
                      "batch_size": 128}})

    light, heavy = config(0.0, 0.0), config(1.0, 0.5)
    run_training(light, tmp_path / "run", quiet=True, plots=False)
    best = tmp_path / "run" / "best.pt"
    a = warmup_statistics(light, dataset, best)
    b = warmup_statistics(heavy, dataset, best)
    assert a["loss"] == pytest.approx(b["loss"])  # the same predictions: the same term
    model = _dense_model(light, dataset.schema, load_checkpoint(best, keys=("model",))["model"])
    model.train()
    torch.manual_seed(0)
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(dataset.splits["train"].batches(128, shuffle=False)):
            if i == 4:
                break
            losses.append(logloss(model(batch).prob, batch.label))
    assert a["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert math.isfinite(a["zico"]) and a["zico"] != b["zico"]  # the gradients: the objective's


# --- 5. the warm-up keeps the config's step cap -------------------------------------------------

def test_the_warmup_takes_the_smaller_step_cap():
    config = {"train": {"batch_size": 10, "epochs": 5, "patience": 2, "max_steps_per_epoch": 3}}
    assert warmup_config(config, 0.5, 1000)["train"]["max_steps_per_epoch"] == 3
    assert warmup_config(config, 1.0, 1000)["train"]["max_steps_per_epoch"] == 3
    assert warmup_config(config, 0.02, 1000)["train"]["max_steps_per_epoch"] == 2
    free = {"train": {**config["train"], "max_steps_per_epoch": None}}
    assert warmup_config(free, 0.5, 1000)["train"]["max_steps_per_epoch"] == 50
    assert warmup_config(free, 1.0, 1000)["train"]["max_steps_per_epoch"] is None
    assert warmup_config(config, 0.5, 1000)["train"]["epochs"] == 1
    assert config["train"]["max_steps_per_epoch"] == 3  # the config itself untouched


# --- 7. --set overrides in another order ---------------------------------------------------------

def test_overrides_in_another_order_are_the_same_setup():
    same = setup_changes({"overrides": ["a=1", "b.c=2"]}, {"overrides": ["b.c=2", "a=1"]})
    assert same == []
    # a repeated key, or one under another: the later wins, so the order is the setting
    for saved in (["a=1", "a=2"], ["train={lr: 1}", "train.lr=2"]):
        assert setup_changes({"overrides": saved},
                             {"overrides": saved[::-1]}) == ["overrides"]
    assert setup_changes({"overrides": ["a=1"]}, {"overrides": ["a=2"]}) == ["overrides"]


def test_a_study_resumes_with_its_overrides_in_another_order(tmp_path, one_thread):
    options = _options(tmp_path, trials=1)
    run_search(options)
    resumed = SearchOptions(**{**vars(options), "overrides": DATA[::-1], "resume": True})
    assert len(run_search(resumed).get_trials()) == 1  # nothing left to do, and not refused


def test_a_member_the_data_cannot_feed_is_refused_when_the_space_is_read(tiny_dataset):
    # an InterFormer needs a behaviour sequence: each trial that picked it failed
    import dataclasses

    base, dataset = tiny_dataset
    schema = dataclasses.replace(dataset.schema, features=[
        f for f in dataset.schema.features if f.kind != "sequence"])
    with pytest.raises(SpaceError, match="^search space default: members.kinds: 'interformer' "
                                         "makes an invalid trial config: .*no sequence"):
        check_values(load_space("default"), base, lambda c: check_candidate(c, schema),
                     "default")


# --- 8. a --set the space overrides is warned about --------------------------------------------

def test_a_set_the_space_overrides_is_named_with_both_values(tmp_path):
    """--set applies to the dataset's config, which the space's base and its sampled values
    override (docs/SEARCH.md): `--set train.epochs=1` under a base of 6 epochs trained 6
    silently. One sentence per such --set, naming the key and both values."""
    from cetnet.search.space import overridden_sets

    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace("epochs: 1,", "epochs: 6,"))
    space = load_space(path)
    found = overridden_sets(space, [*DATA, "train.epochs=1", "train.lr=0.5", "backend=auto",
                                    "train.patience=1", "model.embedding_lr=0.1",
                                    "model.dnn.hidden=[64]", "model.dnn.dropout=0.2",
                                    "train={seed: 3, batch_size: 64}"])
    assert found == [
        "--set train.epochs=1 does not reach the trials: the space's base sets train.epochs: 6 "
        "(a space's base wins over --set)",
        "--set train.lr=0.5 does not reach the trials: the space searches train.lr over [0.01]",
        "--set backend=auto does not reach the trials: the space's base sets backend: "
        "'reference' (a space's base wins over --set)",
        "--set model.dnn.hidden=[64] does not reach the trials: the trials' model is the "
        "space's (model.dnn.hidden: the space's member.dnn.hidden {'depth': 1, 'width': [8, "
        "16]}); of model, --set sets only embedding_optimizer, embedding_lr, shared_embedding",
        "--set model.dnn.dropout=0.2 does not reach the trials: the trials' model is the "
        "space's (model.dnn.dropout: its default); of model, --set sets only "
        "embedding_optimizer, embedding_lr, shared_embedding",
        "--set train={seed: 3, batch_size: 64} does not reach the trials: the space searches "
        "train.batch_size over [128]",
    ]


def test_search_warns_once_per_set_the_space_overrides(tmp_path, capsys, one_thread):
    from cetnet.cli import main

    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace("epochs: 1,", "epochs: 6,"))
    assert main(["search", "--dataset", "synthetic", "--space", str(path), "--out",
                 str(tmp_path / "out"), "--trials", "0", "--set", *DATA, "train.epochs=1",
                 "train.patience=1"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == ["warning: --set train.epochs=1 does not reach the trials: the space's base "
                   "sets train.epochs: 6 (a space's base wins over --set)"], err


def test_search_help_says_the_space_wins_over_set(capsys):
    from cetnet.cli import main

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the space's base and its searched values win over them" in text


def test_ctrl_c_inside_optunas_bookkeeping_is_an_interrupt_not_a_traceback(tmp_path, capsys,
                                                                           one_thread,
                                                                           monkeypatch):
    """Ctrl-C while Optuna recorded a finished trial surfaced as Optuna's own UnboundLocalError
    (raised while handling the KeyboardInterrupt): a traceback and exit 1 instead of the
    interrupt's line and 130. The study itself resumes (the trial stays failed)."""
    import optuna.study._tell as tell

    from cetnet.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tell, "_get_frozen_trial", interrupted)
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    assert main(["search", "--dataset", "synthetic", "--space", str(path), "--out",
                 str(tmp_path / "out"), "--trials", "1", "--warmup-fraction", "0", "--set",
                 *DATA]) == 130
    err = capsys.readouterr().err
    assert "interrupted: continue with the same command and --resume" in err, err
    assert "Traceback" not in err
