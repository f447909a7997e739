"""The ``cetnet`` command line: train (a real ``python -m cetnet`` process), evaluate, data
prepare, resume and config errors. Dataset and model come from the ``train_config``
fixture (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cetnet.cli import main, parse_args
from cetnet.config import dump_config
from cetnet.train.rundir import read_json

ROOT = Path(__file__).resolve().parents[2]


def _write_config(cfg: dict, path: Path) -> Path:
    dump_config(cfg, path)
    return path


def test_python_m_cetnet_train_then_evaluate(train_config, tmp_path, capsys):
    config = _write_config(train_config(epochs=2), tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "cetnet", "train", "--config",
         str(config), "--out", str(run_dir), "--epochs", "1", "--seed", "3", "--device", "cpu",
         "--backend", "reference", "--no-plots", "--set", "train.max_steps_per_epoch=5",
         "model.fusion.temperature=0.5"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fused" in proc.stdout and "dnn" in proc.stdout and "gAUC" in proc.stdout
    assert f"run directory: {run_dir}" in proc.stdout
    saved = read_json(run_dir / "metrics.json")
    resolved = (run_dir / "config.yaml").read_text()
    assert "seed: 3" in resolved and "temperature: 0.5" in resolved
    assert saved["epochs_completed"] == 1 and saved["train_samples"] == 5 * 128

    # evaluate rebuilds dataset + model from the run directory: the same test metrics
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "dcnv2" in out and "eval_test.json" in out
    evaluated = read_json(run_dir / "eval_test.json")
    assert evaluated["fused"] == saved["fused"] and evaluated["members"] == saved["members"]
    assert main(["evaluate", str(run_dir), "--split", "valid"]) == 0
    assert read_json(run_dir / "eval_valid.json")["fused"] == saved["valid"]["fused"]


def test_cli_resume_extends_a_run(train_config, tmp_path, capsys):
    config = _write_config(train_config(epochs=1, lr_schedule="constant"), tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet",
                 "--no-plots"]) == 0
    assert "fused" in capsys.readouterr().out  # the table, also when quiet
    # overrides before and after --resume RUN_DIR; --out may repeat the directory
    assert main(["train", "train.log_every=5", "--resume", str(run_dir), "train.epochs=2",
                 "--quiet", "--out", str(run_dir), "--no-plots", "train.weight_decay=0.25"]) == 0
    metrics = read_json(run_dir / "metrics.json")
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert "log_every: 5" in (run_dir / "config.yaml").read_text()
    # the changed weight decay is what epoch 2 trained with (not the checkpoint's 0)
    groups = torch.load(run_dir / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.25] * len(groups)


def test_cli_errors_are_clear(train_config, tmp_path, capsys):
    config = _write_config(train_config(), tmp_path / "c.yaml")
    assert main(["train", "--config", str(config), "train.epoch=2"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "nope")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_train_arguments_parse_unambiguously(capsys):
    args = parse_args(["train", "a.b=1", "--resume", "runs/x", "c.d=2", "--quiet", "e.f=3",
                       "--set", "g.h=4", "i.j=5"])
    assert args.resume == Path("runs/x") and args.out is None
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.set_ == ["g.h=4", "i.j=5"]
    args = parse_args(["train", "--set", "a.b=1", "--resume", "runs/lr=0.1"])
    assert args.resume == Path("runs/lr=0.1") and args.set_ == ["a.b=1"] and not args.overrides
    assert parse_args(["train", "--quiet", "a.b=1"]).resume is None
    # data prepare's options may follow --from PATH too
    args = parse_args(["data", "prepare", "movielens-100k", "--from", "ml.zip", "root=r", "x=1"])
    assert args.options == ["root=r", "x=1"] and args.from_ == Path("ml.zip")
    assert parse_args(["data", "prepare", "m", "root=r", "--from", "z"]).options == ["root=r"]
    # RUN_DIR is required: never the run's --out, never the next option
    for argv in (["train", "--resume"], ["train", "--resume", "--set", "a.b=1"],
                 ["train", "--out", "runs/x", "--resume"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--resume: expected one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["train", "a.b=1", "--bogus", "c.d=2"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["evaluate", "runs/x", "a.b=1"])
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err
    # a usage error is one line like every other error
    for argv, prog in ((["train", "--epochs", "x"], "cetnet train"), (["trian"], "cetnet")):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and \
            err.endswith(f"(see {prog} --help)\n"), err


def test_resume_errors_name_the_mistake(tmp_path, capsys):
    # an override where RUN_DIR belongs is not read as a directory
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "train.epochs=3"]) == 2
    assert "--resume takes the run directory first" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "b")]) == 2
    assert "name different directories" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "a").exists()


def test_data_prepare_prints_the_summary(one_thread, capsys):
    assert main(["data", "prepare", "synthetic", "num_rows=500", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "400" in out


def test_reference_backend_switches_a_fused_embedding_optimizer_off(train_config, tmp_path,
                                                                    capsys):
    # set explicitly, or left to build_model's default (rowwise_adagrad, also fused)
    for given in (True, False):
        cfg = train_config(epochs=1, max_steps_per_epoch=3)
        if given:
            cfg["model"]["embedding_optimizer"] = "rowwise_adagrad"
        else:
            cfg["model"].pop("embedding_optimizer", None)
        cfg["backend"] = "auto"
        config = _write_config(cfg, tmp_path / "c.yaml")
        run = tmp_path / f"run{given}"
        assert main(["train", "--config", str(config), "--out", str(run), "--quiet",
                     "--no-plots", "--backend", "reference"]) == 0, capsys.readouterr().err
        assert "training the embedding with Adam instead" in capsys.readouterr().err
        resolved = (run / "config.yaml").read_text()
        assert "backend: reference" in resolved and "embedding_optimizer: null" in resolved
    # a config that fails its checks is one error line, without the note first (the fuzz
    # test found "backend reference ... Adam instead" above the error); a dry run that
    # passes still says it
    for flag in ("--dry-run", "--quiet"):
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "bad"), flag,
                     "--backend", "reference", "model.ensemble=0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cetnet train: error: "), err
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "dry"), "--dry-run",
                 "--backend", "reference"]) == 0
    assert "training the embedding with Adam instead" in capsys.readouterr().err


def test_interrupt_hint_names_the_run_directory(train_config, tmp_path):
    """Ctrl-C (a KeyboardInterrupt out of the training loop) carries the run directory, and the
    hint says the exact --resume command once an epoch has written its checkpoint."""
    from cetnet.cli import interrupt_hint
    from cetnet.train import run_training

    def interrupt(epoch, entry):
        raise KeyboardInterrupt

    for after_checkpoint in (True, False):
        run_dir = tmp_path / f"run-{after_checkpoint}"
        with pytest.raises(KeyboardInterrupt) as info:
            run_training(train_config(epochs=2, max_steps_per_epoch=2), run_dir, quiet=True,
                         plots=False, on_epoch_end=interrupt)
        if not after_checkpoint:
            (run_dir / "last.pt").unlink()  # as if Ctrl-C came during the first epoch
        hint = interrupt_hint(info.value)
        if after_checkpoint:
            assert hint == f"interrupted: continue with `cetnet train --resume {run_dir}`"
        else:
            assert hint == ("interrupted before the first epoch ended: nothing to resume in "
                            f"{run_dir} (start again with --out {run_dir} --overwrite)")
    assert interrupt_hint(KeyboardInterrupt()) == "interrupted"


def test_input_errors_are_one_line_with_exit_status_2(train_config, tmp_path, capsys):
    """Every failure the input causes: `cetnet <cmd>: error: ...`, one line, status 2."""
    config = _write_config(train_config(epochs=1, max_steps_per_epoch=2), tmp_path / "c.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet",
                 "--no-plots"]) == 0
    capsys.readouterr()
    cases = [
        (["--plugin", "no_such_plugin", "train"], "train",
         "--plugin no_such_plugin: no module named 'no_such_plugin' (not on the Python path: "
         "a module of the current directory needs PYTHONPATH=. or python -m cetnet"),
        (["train", "--config", str(tmp_path)], "train", "Is a directory"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "train", "missing.yaml"),
        (["train", "--config", str(binary)], "train", "not a YAML file (not UTF-8 text)"),
        (["train", "--config", str(config), "train.lr=.nan"], "train",
         "config: train.lr must be finite, got nan"),
        (["train", "--config", str(config), "train.seed=18446744073709551616"], "train",
         "train.seed must be in [-9223372036854775808, 18446744073709551615]"),
        (["train", "--config", str(config), "model.fusion.temperature=1e-400"], "train",
         "'1e-400' is too small for a float64 (it would read as 0.0)"),
        (["train", "--config", str(config), "model.fusion.temperature=true"], "train",
         "model.fusion.temperature must be a float, got True"),
        (["train", "--config", str(config), "name=[a,\n b]"], "train", "config: name must be"),
        (["evaluate", str(run_dir), "--device", "tpu"], "evaluate",
         "evaluate: --device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ]
    for argv, command, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cetnet {command}: error: "), err
        assert message in lines[0], (argv, lines[0])


def test_data_prepare_errors_name_the_subcommand(capsys):
    assert main(["data", "prepare", "synthetic", "no_such_option=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cetnet data prepare: error:") and "no_such_option" in err, err
    assert len(err.splitlines()) == 1


def test_reproduce_is_a_subcommand(tmp_path, capsys):
    """`cetnet reproduce ...` hands every argument after it to cetnet.reproduce's own parser."""
    args = ["reproduce", "--dataset", "synthetic", "--seeds", "1", "--rows", "dnn",
            "--grid", "none", "--dry-run", "--out", str(tmp_path / "rp")]
    assert main(args) == 0
    assert "dry run" in capsys.readouterr().out
    assert main(["reproduce", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cetnet reproduce: error:") and len(err.splitlines()) == 1
    # checked before anything trains: a huge seed count (it ran out of memory), a report
    # path that is a directory or under a file (it failed after all the training)
    (tmp_path / "afile").write_text("mine")
    for extra, named in ((["--seeds", "1000000000"], "--seeds must be in [1, 1000]"),
                         (["--report", str(tmp_path)], "--report"),
                         (["--report", str(tmp_path / "afile" / "r.md")], "--report")):
        assert main([*args[:4], "2", *args[5:], *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cetnet reproduce: error:") and named in err, err
        assert len(err.splitlines()) == 1


def test_an_out_that_cannot_be_created_is_refused_up_front(train_config, tmp_path, capsys):
    """--out under a file: --dry-run says so (it said "fine"), and so does the run, before
    loading anything (it failed at mkdir, naming neither --out nor the file)."""
    config = _write_config(train_config(epochs=1), tmp_path / "c.yaml")
    (tmp_path / "afile").write_text("mine")
    for extra in (["--dry-run"], []):
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "afile" / "sub"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot create" in err and "is a file" in err, err
    assert (tmp_path / "afile").read_text() == "mine"


def test_train_prints_its_summary_from_rank_0_only(train_config, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank runs `cetnet train`: only rank 0 ($RANK) prints the summary."""
    config = _write_config(train_config(epochs=1), tmp_path / "c.yaml")
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--dry-run"]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 0
    assert "dry run:" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["--version"], ["train", "--dry-run"]])
def test_a_cpu_capability_that_cannot_be_honoured_is_one_line(command):
    env = {**os.environ, "CETNET_CPU_CAPABILITY": "avx9"}
    proc = subprocess.run([sys.executable, "-m", "cetnet", *command], capture_output=True,
                          text=True, env=env, timeout=300)
    import cetnet_kernels

    if not cetnet_kernels.build_info()["cpu"]:
        pytest.skip("cetnet_kernels._C is not built: nothing reads CETNET_CPU_CAPABILITY")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("cetnet: error: CETNET_CPU_CAPABILITY=avx9: must be one of")
