"""cetnet search's outputs for a user who acts on them: best_config.yaml (a train config of the
best trial), the progress line with its ETA, and ``--compare`` (best-so-far curves at equal
budget, the proxies over every distinct trial, the winner retrained over seeds beside a
baseline, paired by seed). Tiny runs on synthetic data, as in test_search.py."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from cetnet.cli import main  # noqa: E402
from cetnet.config import dump_config, load_config, read_yaml, validate_config  # noqa: E402
from cetnet.search.compare import (CompareError, CompareOptions, best_so_far,  # noqa: E402
                                   compare_studies, read_trials)
from cetnet.search.engine import (Progress, SearchOptions, progress_line,  # noqa: E402
                                  run_search)

DATA = ["data.num_rows=1000", "data.num_users=40", "data.num_items=80", "data.num_clusters=4",
        "data.cross_size=6", "data.num_tags=8", "data.max_seq_len=4"]
SPACE = """\
ensemble: [cetnet, naive]
members: {count: {low: 1, high: 2}, kinds: [dnn, dcnv2]}
embedding_dim: [4, 8]
member:
  dnn: {hidden: {width: [8, 16], depth: 1}}
  dcnv2: {cross_layers: 1, hidden: {width: [8, 16], depth: 1}}
train: {lr: {low: 1.0e-3, high: 3.0e-2, log: true}, batch_size: [128, 256]}
base:
  backend: reference
  device: cpu
  model: {embedding_optimizer: null}
  train: {epochs: 1, eval_batch_size: 1024, warmup_steps: 0, log_every: 1000}
"""


def _study(tmp_path: Path, name: str, sampler: str, trials: int = 4, said=None):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    options = SearchOptions(out=tmp_path / name, dataset="synthetic", space=str(space),
                            overrides=DATA, trials=trials, sampler=sampler, pruner="none",
                            warmup_fraction=0.5, study=name,
                            say=(said.append if said is not None else lambda text: None))
    return options, run_search(options)


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("studies")
        said: list[str] = []
        random_options, random_study = _study(root, "random", "random", said=said)
        _study(root, "tpe", "tpe")
        yield root, random_options, random_study, said
    finally:
        torch.set_num_threads(threads)


def test_best_config_is_the_best_trials_run_config_and_trains(two_studies, tmp_path, capsys):
    root, options, study, _ = two_studies
    best = study.best_trial
    config = read_yaml(options.out / "best_config.yaml")
    run_config = read_yaml(Path(best.user_attrs["run_dir"]) / "full" / "config.yaml")
    assert config == run_config and validate_config(config) == config
    assert "best_config.yaml" in (options.out / "SEARCH.md").read_text()
    # cetnet train takes it as it is
    status = main(["train", "--config", str(options.out / "best_config.yaml"), "--dry-run"])
    assert status == 0, capsys.readouterr().err


def test_progress_lines_count_finished_trials_with_an_eta(two_studies):
    *_, said = two_studies
    lines = [line for line in said if line.startswith("progress: ")]
    assert [line.split(",")[0] for line in lines] == [f"progress: {k}/4 trials finished"
                                                       for k in range(1, 5)]
    assert "left" in lines[0] and lines[-1].endswith(", done")
    assert progress_line(5, 20, 5, 600.0) == ("progress: 5/20 trials finished, 10 min so far, "
                                              "about 30 min left")
    assert progress_line(0, 20, 0, 5.0) == "progress: 0/20 trials finished, 5 s so far"
    # concurrent workers' trials count: 4 finished in the study (3 elsewhere) over 60 s
    clock = iter([0.0, 60.0])
    said: list[str] = []

    class _Study:
        def get_trials(self, deepcopy, states):
            return [object()] * 4

    Progress(8, 0, said.append, clock=lambda: next(clock))(_Study(), None)
    assert said == ["progress: 4/8 trials finished, 60 s so far, about 60 s left"]


def test_best_so_far_is_a_running_maximum_and_pruned_trials_use_budget(tmp_path):
    rows = [("0", "COMPLETE", "0.70"), ("1", "PRUNED", ""), ("2", "FAIL", ""),
            ("3", "COMPLETE", "0.68"), ("4", "COMPLETE", "0.75")]
    folder = tmp_path / "s"
    folder.mkdir()
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "objective", "valid_auc", "run_dir"])
        for number, state, auc in rows:
            w.writerow([number, state, auc, auc, f"r{number}"])
    curve = best_so_far(read_trials(folder))  # FAIL is not a finished trial
    assert [v for v, _ in curve] == [0.70, 0.70, 0.70, 0.75]
    assert [r["number"] for _, r in curve] == [0, 0, 0, 4]


def test_compare_writes_curves_correlations_and_the_retrained_winner(two_studies, tmp_path):
    root, options, study, _ = two_studies
    baseline = tmp_path / "baseline.yaml"
    dump_config(read_yaml(options.out / "best_config.yaml") | {"name": "baseline"}, baseline)
    config = read_yaml(baseline)
    config["model"]["embedding_dim"] = [4] * len(config["model"]["members"])
    config["train"]["lr"] = 1.0e-3
    dump_config(validate_config(config), baseline)
    out = tmp_path / "cmp"
    said: list[str] = []
    result = compare_studies(CompareOptions(studies=[root / "random", root / "tpe"], out=out,
                                            retrain_seeds=2, baselines=[str(baseline)],
                                            command="cetnet search --compare ...",
                                            say=said.append))
    assert result["budget"] == 4
    report = (out / "COMPARE.md").read_text()
    for text in ("## Best validation AUC so far, at equal budget", "| random |", "| tpe |",
                 "## Warm-up proxies over all the studies", "## Best trial of all",
                 "## Pareto front of all the studies",
                 "## The best trial retrained from scratch", "| baseline.yaml |",
                 "within seed noise"):
        assert text in report, text
    with (out / "compare.csv").open(newline="") as f:
        curves = list(csv.DictReader(f))
    assert [r["trials"] for r in curves] == ["1", "2", "3", "4"]
    for label in ("random", "tpe"):
        values = [float(r[label]) for r in curves]
        assert values == sorted(values)  # best so far never falls
    # one config trained by both studies (their seeded start-up trial) is one point
    keys = [Path(r["run_dir"]).name for s in ("random", "tpe")
            for r in read_trials(root / s).rows if r["state"] == "COMPLETE"]
    assert len(set(keys)) < len(keys)
    assert result["correlation"]["proxy_auc"]["n"] == len(set(keys))
    # the winner is the best complete trial of both studies
    best = max((read_trials(root / s) for s in ("random", "tpe")),
               key=lambda s: max(r["valid_auc"] for r in s.rows))
    assert result["winner"]["study"] == best.label
    # 2 configs x 2 seeds trained; a second compare reuses every run
    assert len([s for s in said if s.startswith("retrain ")]) == 4
    said.clear()
    compare_studies(CompareOptions(studies=[root / "random", root / "tpe"], out=out,
                                   retrain_seeds=2, baselines=[str(baseline)], say=said.append))
    assert all(s.endswith("(reused)") for s in said) and len(said) == 4
    assert (out / "COMPARE.md").read_text().split("## Warm-up")[1] == report.split("## Warm-up")[1]


@pytest.mark.parametrize("args, expected", [
    (["--compare", "NOWHERE"], "--compare NOWHERE: no trials.csv there"),
    (["--compare", "A", "A2"], "two study folders share a name"),
    (["--compare", "A", "--baseline", "default"], "--baseline is trained beside"),
    (["--compare", "A", "--retrain-seeds", "1", "--baseline", "MISSING.yaml"],
     "--baseline MISSING.yaml"),
    (["--compare", "A", "--resume"], "--compare reads finished studies: --resume"),
    (["--retrain-seeds", "2"], "--retrain-seeds and --baseline go with --compare"),
])
def test_compare_errors_are_one_line(args, expected, two_studies, tmp_path, capsys):
    root, *_ = two_studies
    (tmp_path / "A").symlink_to(root / "random")
    (tmp_path / "A2").mkdir()
    (tmp_path / "A2" / "A").symlink_to(root / "tpe")
    names = {"NOWHERE": tmp_path / "nowhere", "A": tmp_path / "A", "A2": tmp_path / "A2" / "A",
             "MISSING.yaml": tmp_path / "MISSING.yaml"}
    argv = [str(names.get(a, a)) for a in args]
    status = main(["search", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    expected = expected.replace("NOWHERE", str(tmp_path / "nowhere")).replace(
        "MISSING.yaml", str(tmp_path / "MISSING.yaml"))
    assert err[0].startswith("cetnet search: error: ") and expected in err[0], err[0]
