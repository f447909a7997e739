"""``cetnet --version``, ``cetnet models`` (with the ensembles plugins register), ``cetnet data
list``, what ``cetnet data prepare`` prepares by default, ``cetnet evaluate --checkpoint
last.pt`` (or a path) writing its own file, and the ``--plugin`` hint of an unknown
ensemble."""

from __future__ import annotations

import pytest

from cetnet.cli import main
from cetnet.config import dump_config, load_config
from cetnet.models.build import ENSEMBLES, MEMBERS
from cetnet.train.rundir import read_json
from cetnet.train.runner import evaluation_path


def test_version_names_cetnet_torch_and_the_kernels(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("cetnet ") and "torch " in out and "kernels: " in out


def test_version_names_the_gpu_and_an_arch_the_kernels_lack(monkeypatch):
    """On a GPU, --version names it, its arch and the backends that run there, and says when
    the CUDA kernels were compiled for other archs (the "no kernel image" pitfall)."""
    import torch

    from cetnet.catalog import gpu_text

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    built_for_hopper = {"cuda": True, "cuda_archs": [900]}
    assert gpu_text(built_for_hopper).startswith("\ngpu: NVIDIA H200 (sm_90), backends: ")
    assert "note" not in gpu_text(built_for_hopper)
    note = gpu_text({"cuda": True, "cuda_archs": [800, 860]})
    assert "compiled for sm_80, sm_86, not this GPU's sm_90" in note
    assert "TORCH_CUDA_ARCH_LIST=9.0" in note
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # an L4
    assert "note" not in gpu_text({"cuda": True, "cuda_archs": [800]})  # sm_80 runs on sm_89
    assert "note" in gpu_text({"cuda": True, "cuda_archs": [900]})
    assert "note" not in gpu_text({"cuda": False, "cuda_archs": []})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_text(built_for_hopper) == ""


def test_models_lists_every_ensemble_and_member_with_defaults(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in (*ENSEMBLES, *MEMBERS):
        assert f"  {name} " in out, name
    assert "hidden=[256, 128]" in out and "temperature=1.0" in out


def test_models_lists_only_options_a_config_may_set(capsys):
    # every listed option builds; validate was listed and refused as an unknown key
    import inspect
    import re

    from cetnet.models.build import build_model
    from cetnet_kernels import CETNetFusion
    from models_support import tiny_schema

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    fusion = out.split("model.fusion (cetnet only):\n", 1)[1].split("\n", 1)[0]
    names = re.findall(r"(?:^\s*|, )(\w+)=", fusion)
    assert "validate" not in names and {"temperature", "temperature_range"} <= set(names)
    defaults = inspect.signature(CETNetFusion).parameters
    for name in names:
        build_model({"fusion": {name: defaults[name].default}}, tiny_schema())


def test_data_list_names_the_datasets_and_their_options(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "movielens-100k" in out and "synthetic" in out and "bars" in out
    assert "config=<required>" in out and "max_seq_len=" in out


def test_data_prepare_uses_the_default_configs_options(monkeypatch, capsys):
    seen = {}

    def prepare(name, **options):
        seen.update(name=name, **options)
        return "prepared"

    monkeypatch.setattr("cetnet.train.prepare_dataset", prepare)
    default = load_config(None)["data"]
    assert main(["data", "prepare", default["name"]]) == 0
    assert seen["max_seq_len"] == default["max_seq_len"]  # not the loader's own default
    assert main(["data", "prepare", default["name"], "max_seq_len=7"]) == 0
    assert seen["max_seq_len"] == 7  # a given option wins


def test_evaluate_last_checkpoint_keeps_the_best_ones_file(train_config, tmp_path, capsys,
                                                          monkeypatch):
    config = tmp_path / "c.yaml"
    dump_config(train_config(epochs=2), config)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet",
                 "--no-plots", "--set", "train.max_steps_per_epoch=3"]) == 0
    assert main(["evaluate", str(run_dir)]) == 0
    assert main(["evaluate", str(run_dir), "--checkpoint", "last.pt"]) == 0
    out = capsys.readouterr().out
    best, last = evaluation_path(run_dir, "test"), evaluation_path(run_dir, "test", "last.pt")
    assert best.name == "eval_test.json" and last.name == "eval_test_last.json"
    assert f"written: {last}" in out
    assert read_json(best)["checkpoint"] == "best.pt"
    assert read_json(last)["checkpoint"] == "last.pt"
    # a checkpoint kept elsewhere, given as a path as predict and export take it (it was
    # refused: "takes the name of a checkpoint in the run directory"), at another batch size:
    # a file of its own, never the run's eval_test.json although it is named best.pt
    import shutil

    from cetnet.train import runner

    kept = tmp_path / "kept" / "best.pt"
    kept.parent.mkdir()
    shutil.copy(run_dir / "best.pt", kept)
    sizes = []
    evaluate = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: sizes.append(kw["batch_size"])
                        or evaluate(*a, **kw))
    assert main(["evaluate", str(run_dir), "--checkpoint", str(kept), "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    kept_eval = evaluation_path(run_dir, "test", str(kept))
    assert kept_eval.parent == run_dir and kept_eval.name.startswith("eval_test_best-")
    assert f"written: {kept_eval}" in out and sizes == [7]
    assert read_json(kept_eval)["checkpoint"] == str(kept.resolve())
    assert read_json(kept_eval)["fused"]["auc"] == pytest.approx(read_json(best)["fused"]["auc"],
                                                                 abs=1e-6)
    assert read_json(best)["checkpoint"] == "best.pt"  # untouched
    assert evaluation_path(run_dir, "test", str(run_dir / "best.pt")) == best  # its own, by path
    assert main(["evaluate", str(run_dir)]) == 0 and sizes[-1] == 512  # train.eval_batch_size
    # --overwrite knows them all as the run's files
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--overwrite",
                 "--quiet", "--no-plots", "--set", "train.max_steps_per_epoch=3"]) == 0
    assert not last.exists() and not kept_eval.exists()


def test_evaluate_help_describes_it(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Rebuild a run's dataset and model from RUN_DIR" in text
    assert "--batch-size N rows per forward pass" in text
    assert "the path of a checkpoint file" in text  # --checkpoint as predict's and export's


PLUGIN = '''\
from cetnet.models import build_model
from cetnet.train import register_model


def build_cetnet_lr(config, schema, *, backend):
    """CETNet under another name (what a plugin's ensemble looks like to the CLI)."""
    return build_model({**config, "ensemble": "cetnet"}, schema, backend=backend)


register_model("cetnet_lr", build_cetnet_lr)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module ``cetnet_lr_plugin`` on the path registering the ensemble cetnet_lr;
    unregistered and forgotten afterwards."""
    import sys

    from cetnet.train import unregister_model

    (tmp_path / "cetnet_lr_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cetnet_lr_plugin"
    unregister_model("cetnet_lr")
    sys.modules.pop("cetnet_lr_plugin", None)


def test_models_lists_the_ensembles_a_plugin_registers(plugin, capsys):
    # `data list` named the plugins' datasets, `models` left their ensembles out
    assert main(["models"]) == 0
    assert "cetnet_lr" not in capsys.readouterr().out
    assert main(["--plugin", plugin, "models"]) == 0
    out = capsys.readouterr().out
    head = out.split("\nCommon keys of model", 1)[0]  # in the ensembles' part
    # (other plugins an earlier test of this process loaded are listed too: cetnet_fm)
    line = next((ln for ln in head.splitlines() if ln.startswith("Registered by plugins: ")), "")
    assert "cetnet_lr" in line.removeprefix("Registered by plugins: ").split(", "), out


def test_a_plugin_ensemble_without_its_plugin_gets_the_datasets_hint(plugin, train_config,
                                                                       tmp_path, capsys):
    """`cetnet evaluate RUN` of a run trained with a plugin's ensemble, without --plugin: the
    unknown-ensemble error says how to load it, in the unknown-dataset error's words."""
    from cetnet.messages import plugin_hint

    config = train_config(epochs=1, batch_size=600)
    config["model"]["ensemble"] = "cetnet_lr"
    dump_config(config, tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    assert main(["--plugin", plugin, "train", "--config", str(tmp_path / "c.yaml"), "--out",
                 str(run_dir), "--quiet", "--no-plots"]) == 0
    capsys.readouterr()
    import sys

    from cetnet.train import unregister_model

    unregister_model("cetnet_lr")  # as in a new process, without the plugin
    sys.modules.pop(plugin)
    assert main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cetnet evaluate: error: "), err
    assert "unknown ensemble 'cetnet_lr'" in err
    assert err.endswith(plugin_hint("an ensemble")), err
    # one wording: the unknown dataset's hint is the same helper's
    from cetnet.config import ConfigError
    from cetnet.data import load_dataset

    with pytest.raises(ConfigError) as unknown:
        load_dataset("nope")
    assert str(unknown.value).endswith(plugin_hint("a dataset"))
    assert main(["--plugin", plugin, "evaluate", str(run_dir)]) == 0
