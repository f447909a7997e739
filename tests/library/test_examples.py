"""Every example in examples/ runs, at tiny sizes (docs/EXTENDING.md), and cetnet.serve does
what they rely on: a registered member and dataset train through the trainer, a run's
predictions of a csv match those of its own split, and an exported run loads and runs in a
fresh process (examples/export_run.py starts one) with any batch size."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # examples/ is a package at the repository root
    sys.path.insert(0, str(ROOT))

from cetnet import serve  # noqa: E402
from cetnet.train import predict, unregister_dataset, unregister_model  # noqa: E402

from examples import (custom_dataset, custom_member, export_run, fusion_dropin,  # noqa: E402
                      predict_run)


@pytest.fixture(scope="module", autouse=True)
def _registrations():
    """The examples register a dataset and a model on import; leave the registry clean."""
    yield
    unregister_dataset(custom_dataset.DATASET)
    unregister_model(custom_member.ENSEMBLE)


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    return custom_dataset.write_clicks_csv(tmp_path_factory.mktemp("data") / "clicks.csv", 800,
                                           users=40, ads=30)


@pytest.fixture(scope="module")
def dataset_run(clicks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "custom-dataset"
    assert custom_dataset.main(["--csv", str(clicks), "--epochs", "1", "--dim", "4",
                                "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def member_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "custom-member"
    assert custom_member.main(["--rows", "600", "--users", "30", "--items", "40", "--seq-len",
                               "4", "--dim", "4", "--hidden", "16", "--epochs", "1",
                               "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_custom_member_trains_in_cetnet_through_the_cli_plugin(member_run):
    metrics = _metrics(member_run)
    assert list(metrics["members"]) == ["fm", "dnn"]
    assert set(metrics["fusion_weights"]) == {"fm", "dnn"}
    state = torch.load(member_run / "best.pt", weights_only=True)["model"]
    assert any(k.startswith("members.fm.") for k in state)


def test_custom_member_rejects_an_option_it_does_not_take(tmp_path):
    from cetnet.config import ConfigError
    from cetnet.data import make_synthetic

    schema = make_synthetic(30, num_users=5, num_items=20, max_seq_len=3).schema
    with pytest.raises(ConfigError, match="model.fm"):
        custom_member.build_cetnet_fm({"fm": {"width": 3}}, schema)


def test_custom_dataset_is_read_and_trained(dataset_run, clicks):
    metrics = _metrics(dataset_run)
    assert set(metrics["members"]) == {"dnn", "dcnv2"}
    ds = custom_dataset.load_clicks_csv(str(clicks))
    assert [len(s) for s in ds.splits.values()] == [640, 80, 80]
    assert ds.schema.by_name("recent_ads").source == "ad"


def test_fusion_dropin_runs(capsys):
    assert fusion_dropin.main(["--rows", "3000", "--epochs", "1", "--finetune-epochs", "1",
                               "--batch", "512"]) == 0
    out = capsys.readouterr().out
    for row in ("confidence fusion (T = 1)", "CETNet fine-tuned: fused", "KDEF fine-tuned"):
        assert row in out


def test_predict_run_scores_a_split_and_a_csv(dataset_run, clicks, tmp_path, capsys):
    out = tmp_path / "test.csv"
    assert predict_run.main([str(dataset_run), "--plugin", "examples.custom_dataset",
                             "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80
    assert list(rows[0]) == ["row", "prob", "label", "prob_dnn", "prob_dcnv2", "weight_dnn",
                             "weight_dcnv2"]
    # new rows (new users and ads are OOV), without a label column
    fresh = custom_dataset.write_clicks_csv(tmp_path / "new.csv", 12, users=60, ads=40, seed=3)
    with open(fresh, newline="") as f:
        table = [{k: v for k, v in r.items() if k != "label"} for r in csv.DictReader(f)]
    unlabelled = tmp_path / "unlabelled.csv"
    with open(unlabelled, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    assert predict_run.main([str(dataset_run), "--csv", str(unlabelled), "--plugin",
                             "examples.custom_dataset", "--out", str(tmp_path / "p.csv")]) == 0
    assert "OOV values per feature" in capsys.readouterr().out
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 13
    with open(tmp_path / "p.csv", newline="") as f:  # no label: empty cells, not 0
        assert {r["label"] for r in csv.DictReader(f)} == {""}


def test_a_csv_is_encoded_as_the_dataset_encodes_its_own_rows(dataset_run, clicks):
    run = serve.load_run(dataset_run, plugins=["examples.custom_dataset"])
    encoded = serve.encode_csv(run.dataset, clicks)  # train + valid + test rows, in order
    test = run.dataset.splits["test"]
    mine = predict(run.model, encoded).prob[-len(test):]
    assert torch.equal(mine, predict(run.model, test).prob)
    path, scores = serve.predict_run(dataset_run, dataset_run / "p.csv", csv_path=clicks,
                                     plugins=["examples.custom_dataset"])
    assert scores is not None and 0 <= scores["fused"]["auc"] <= 1


def test_a_run_on_data_that_changed_since_training_is_refused(tmp_path, capsys):
    """The csv a run was trained on replaced by other rows: its vocabularies refit to other
    id orders, so the checkpoint's embeddings would be looked up by other tokens' ids.
    evaluate, predict and --resume refuse it, naming the checkpoint (before: evaluate scored
    the mismatched model and overwrote eval_test.json, exit 0)."""
    from cetnet.cli import main
    from cetnet.train import CheckpointError

    data = custom_dataset.write_clicks_csv(tmp_path / "clicks.csv", 400, users=30, ads=20)
    run = tmp_path / "run"
    assert custom_dataset.main(["--csv", str(data), "--epochs", "1", "--dim", "4",
                                "--batch-size", "256", "--out", str(run), "--quiet"]) == 0
    plugin = ["examples.custom_dataset"]
    serve.load_run(run, plugins=plugin)  # unchanged data: fine
    custom_dataset.write_clicks_csv(data, 400, users=30, ads=20, seed=7)
    with pytest.raises(CheckpointError, match="now encodes rows differently"):
        serve.load_run(run, plugins=plugin)
    capsys.readouterr()
    for argv in (["evaluate", str(run)], ["train", "--resume", str(run), "train.epochs=2"]):
        assert main(["--plugin", plugin[0], *argv]) == 2
        err = capsys.readouterr().err
        assert "now encodes rows differently" in err and err.count("\n") == 1, err
    assert not (run / "eval_test.json").exists()


def test_exported_run_matches_eager_in_a_fresh_process(member_run, capfd):
    program = member_run / "model.pt2"
    # the fresh process imports torch and cetnet_kernels only: not the plugin, not cetnet
    assert export_run.main([str(member_run), "--plugin", "examples.custom_member", "--rows",
                            "50", "--out", str(program)]) == 0
    out = capfd.readouterr().out
    assert "the exported program matches" in out and "cetnet imported: False" in out
    exported = serve.load_exported(program)
    assert exported.member_names == ["fm", "dnn"]
    run = serve.load_run(member_run, plugins=["examples.custom_member"])
    module = exported.module()
    test = run.dataset.splits["test"]
    for rows in (1, 3, len(test)):  # any batch size, including 1
        batch = test.take(torch.arange(rows))
        with torch.no_grad():
            eager = run.model(batch)
            served = module(*serve.batch_inputs(batch))
        torch.testing.assert_close(served["prob"], eager.prob, rtol=0, atol=1e-6)
        torch.testing.assert_close(served["weights"], eager.weights, rtol=0, atol=1e-6)
    # every bag empty (no values at all)
    batch = test.take(torch.arange(4))
    batch.multihot = {k: (v[:0], torch.zeros_like(o)) for k, (v, o) in batch.multihot.items()}
    with torch.no_grad():
        torch.testing.assert_close(module(*serve.batch_inputs(batch))["prob"],
                                   run.model(batch).prob, rtol=0, atol=1e-6)


def test_library_members_and_an_ensemble_without_weights_export(tmp_path):
    from cetnet.data import make_synthetic
    from cetnet.models import build_model

    ds = make_synthetic(60, num_users=8, num_items=20, num_clusters=4, max_seq_len=3)
    model = build_model({"ensemble": "kdef", "members": ["dcnv2", "interformer"],
                         "embedding_dim": 4}, ds.schema)
    program = serve.export_model(model, ds.schema)
    batch = ds.splits["test"].take(torch.arange(5))
    with torch.no_grad():
        served = program.module()(*serve.batch_inputs(batch))
        eager = model.eval()(batch)
    assert set(served) == {"prob", "logits"}  # KDEF has no fusion weights
    torch.testing.assert_close(served["prob"], eager.prob, rtol=0, atol=1e-6)
    assert [n.target for n in program.graph.nodes if "cetnet" in str(n.target)] == \
        [torch.ops.cetnet.multi_embedding.default]  # the lookup, not the training op


@pytest.mark.parametrize("name", ["ml100k_search_winner.yaml", "ml100k_results_best_row.yaml"])
def test_the_search_examples_configs_are_valid_train_configs(name):
    from cetnet.config import load_config

    config = load_config(ROOT / "examples" / "search" / name)
    assert config["data"]["name"] == "movielens-100k" and config["train"]["epochs"] == 6


def test_the_search_examples_space_loads_and_limits_the_members():
    pytest.importorskip("optuna")
    from cetnet.search.space import load_space

    space = load_space(ROOT / "examples" / "search" / "ml100k_dnn_dcnv2_space.yaml")
    assert space["members"]["kinds"] == ["dnn", "dcnv2"]
