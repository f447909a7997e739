"""cetnet search's outputs for a user who acts on them: best_config.yaml (a train config of the
best trial), the progress line with its ETA, and ``--compare`` (best-so-far curves at equal
budget, the proxies over every distinct trial, the winner retrained over seeds beside a
baseline, paired by seed). Tiny runs on synthetic data, as in test_search.py."""

from __future__ import annotations

import csv
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

    # trials whose runs were reused (a resumed or seeded-alike study) do not set the rate
    class _Trial:
        def __init__(self, reused):
            self.user_attrs = {"reused": reused}

    class _Growing:
        n = 0

        def get_trials(self, deepcopy, states):
            return [object()] * self.n

    clock = iter([0.0, 2.0, 4.0, 64.0])
    study, said = _Growing(), []
    progress = Progress(10, 0, said.append, clock=lambda: next(clock))
    for reused in (True, True, False):
        study.n += 1
        progress(study, _Trial(reused))
    assert said[1] == "progress: 2/10 trials finished, 4 s so far"  # no rate yet
    assert said[2] == "progress: 3/10 trials finished, 64 s so far, about 7 min left"


def _trials_csv(folder: Path, rows, objective=None) -> Path:
    """A trials.csv of (number, state, valid_auc[, flops]) rows; ``objective(auc)`` fills the
    objective column (a --cost-weight study's), else it is the AUC."""
    folder.mkdir(parents=True)
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "objective", "valid_auc", "test_auc", "flops",
                    "proxy_auc", "run_dir"])
        for number, state, auc, *flops in rows:
            value = "" if auc == "" else (objective(float(auc)) if objective else auc)
            w.writerow([number, state, value, auc, auc, (flops or ["1000"])[0], auc,
                        f"runs/{folder.name}-{number}"])
    return folder


def test_best_so_far_is_a_running_maximum_and_pruned_trials_use_budget(tmp_path):
    folder = _trials_csv(tmp_path / "s", [("0", "COMPLETE", "0.70"), ("1", "PRUNED", ""),
                                          ("2", "FAIL", ""), ("3", "COMPLETE", "0.68"),
                                          ("4", "COMPLETE", "nan"), ("5", "COMPLETE", "0.75")])
    curve = best_so_far(read_trials(folder))  # FAIL is not a finished trial; NaN never best
    assert [v for v, _ in curve] == [0.70, 0.70, 0.70, 0.70, 0.75]
    assert [r["number"] for _, r in curve] == [0, 0, 0, 0, 5]


def test_compare_is_on_the_auc_at_equal_budget_and_its_winner_is_the_best_of_all(tmp_path):
    # a: 6 trials, its best (0.80) after the equal budget of 3; b: a --cost-weight study
    # whose objective is far below its AUCs, best AUC 0.78; a NaN trial is nowhere
    a = _trials_csv(tmp_path / "a", [("0", "COMPLETE", "0.70", "100"),
                                     ("1", "COMPLETE", "0.72", "300"),
                                     ("2", "COMPLETE", "nan", "50"),
                                     ("3", "COMPLETE", "0.71", "10"),
                                     ("4", "FAIL", ""), ("5", "COMPLETE", "0.80", "900")])
    b = _trials_csv(tmp_path / "b", [("0", "COMPLETE", "0.78", "200"),
                                     ("1", "PRUNED", ""), ("2", "COMPLETE", "0.74", "20")],
                    objective=lambda auc: auc - 0.5)
    result = compare_studies(CompareOptions(studies=[a, b], out=tmp_path / "out",
                                            say=lambda text: None))
    assert result["budget"] == 3
    report = (tmp_path / "out" / "COMPARE.md").read_text()
    assert "| a | 0.7000 | 0.7200 | 1 | 0.7200 |" in report  # n = 1, n = 3, at trial 1
    assert "| b | 0.7800 | 0.7800 | 0 | 0.7800 |" in report  # the AUC, not the objective
    assert result["winner"]["study"] == "a" and result["winner"]["number"] == 5
    assert "Study a, trial 5: validation AUC 0.8000" in report
    assert result["correlation"]["proxy_auc"]["n"] == 6  # 4 of a (no NaN), 2 of b
    # trials.csv files of before the code column: the report says it was not recorded
    assert "Trials trained by code a: unrecorded; b: unrecorded." in report
    front = report.split("## Pareto front")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in front.splitlines() if line.startswith("| a")
            or line.startswith("| b")] == ["| a #3", "| b #2", "| b #0", "| a #5"]


def test_compare_says_when_studies_were_trained_by_different_code(tmp_path):
    import csv

    def with_code(folder, *codes):  # one code for every trial, or one per trial
        path = folder / "trials.csv"
        with path.open() as f:
            rows = list(csv.DictReader(f))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*rows[0], "code"])
            writer.writeheader()
            writer.writerows({**r, "code": code}
                             for r, code in zip(rows, codes * len(rows) if len(codes) == 1
                                                else codes))
        return folder

    a = with_code(_trials_csv(tmp_path / "a", [("0", "COMPLETE", "0.70")]), "aaaa")
    b = with_code(_trials_csv(tmp_path / "b", [("0", "COMPLETE", "0.71")]), "aaaa")
    compare_studies(CompareOptions(studies=[a, b], out=tmp_path / "out", say=lambda text: None))
    report = (tmp_path / "out" / "COMPARE.md").read_text()
    assert "Trials trained by code a: aaaa; b: aaaa." in report
    with_code(b, "bbbb")
    compare_studies(CompareOptions(studies=[a, b], out=tmp_path / "out", say=lambda text: None))
    report = (tmp_path / "out" / "COMPARE.md").read_text()
    assert "a: aaaa; b: bbbb (**studies of different code**" in report
    # two studies each of the same two codes (each continued with --reuse-other-code): the
    # sets agree, the trials of each still mix codes
    a, b = tmp_path / "a2", tmp_path / "b2"
    for folder in (a, b):
        with_code(_trials_csv(folder, [("0", "COMPLETE", "0.70"), ("1", "COMPLETE", "0.71")]),
                  "aaaa", "bbbb")
    compare_studies(CompareOptions(studies=[a, b], out=tmp_path / "out", say=lambda text: None))
    report = (tmp_path / "out" / "COMPARE.md").read_text()
    assert ("Trials trained by code a2: aaaa, bbbb; b2: aaaa, bbbb (**a2, b2: trials of "
            "several codes**, continued with --reuse-other-code") in report
    assert "studies of different code" not in report


def test_retrained_runs_are_kept_per_code(tmp_path, monkeypatch):
    """A finished retrain run of an earlier build is not reused: the pairs would mix codes."""
    import cetnet.search.compare as compare
    import cetnet.train.runner as runner
    from cetnet import code_identity as ci

    runs = []

    def fake(config, run_dir):
        runs.append(Path(run_dir))
        return {"fused": {"auc": 0.8}}, False

    monkeypatch.setattr(runner, "train_or_reuse", fake)
    config = load_config(None)
    compare._train_seeds(config, 2, tmp_path, lambda text: None, "x")
    mine = ci.code_identity("auto")
    assert [r.relative_to(tmp_path).parts[:2] for r in runs] == \
        [("retrain", ci.code_tag(mine))] * 2
    monkeypatch.setattr(ci, "code_identity", lambda device: {**mine, "digest": "0123456789abcdef"})
    compare._train_seeds(config, 1, tmp_path, lambda text: None, "x")
    assert runs[2].relative_to(tmp_path).parts[1].startswith("0123456789abcdef-torch")
    assert runs[2].parts[-2:] == runs[0].parts[-2:]  # the same config key and seed


def test_the_retrained_comparison_pairs_every_config_by_seed_on_valid_and_test(tmp_path,
                                                                                 monkeypatch):
    import cetnet.search.compare as compare

    study = _trials_csv(tmp_path / "s", [("0", "COMPLETE", "0.75")])
    run = tmp_path / "s" / "runs" / "s-0" / "full"  # found under the study's runs/ folder
    run.mkdir(parents=True)
    config = load_config(None)
    dump_config(config, run / "config.yaml")
    baseline = tmp_path / "base.yaml"
    dump_config({**config, "name": "base"}, baseline)
    other = tmp_path / "other.yaml"
    dump_config({**config, "data": {"name": "synthetic"}}, other)

    def fake(config, seeds, out, say, label):  # best: AUC +0.01 and logloss -0.02 per seed
        shift = 0.0 if label == "best trial" else 1.0
        # validation: the paper's pair 0.002 below the others, seed 1 noisier
        def valid(s):
            return 0.79 - (0.002 if label.startswith("paper") else 0.0) + 0.001 * (s == 1)

        return {s: {"fused": {"auc": 0.80 + 0.001 * s - 0.01 * shift, "gauc": 0.7 + 0.001 * s,
                              "logloss": 0.50 + 0.003 * s + 0.02 * shift},
                    "valid": {"fused": {"auc": valid(s)}}} for s in range(seeds)}

    monkeypatch.setattr(compare, "_train_seeds", fake)
    compare_studies(CompareOptions(studies=[study], out=tmp_path / "out", retrain_seeds=3,
                                   baselines=[str(baseline), "default", "paper"],
                                   say=lambda text: None))
    report = (tmp_path / "out" / "COMPARE.md").read_text()
    paper = "paper's CETNet (DHEN + InterFormer)"
    assert "| best trial | base.yaml | AUC | +0.0100 | [0.0100, 0.0100] | better |" in report
    assert "| best trial | default config | AUC | +0.0100 |" in report
    assert f"| best trial | {paper} | AUC | +0.0100 |" in report
    assert f"| {paper} (cetnet) | dhen, interformer |" in report
    assert "| best trial | base.yaml | gAUC | +0.0000 |" in report
    assert "| best trial | base.yaml | logloss | -0.0200 | [-0.0200, -0.0200] | better |" in report
    # every pair, in the order given; validation first (what configs are chosen on)
    assert "| base.yaml | default config | AUC | +0.0000 |" in report
    assert (f"| default config | {paper} | valid AUC | +0.0020 | [0.0020, 0.0020] | better |"
            in report)
    assert "| best trial | base.yaml | valid AUC | +0.0000 | [0.0000, 0.0000] |" in report
    retrained = report.split("## The best trial retrained")[1]
    assert len([line for line in retrained.splitlines()
                if " | valid AUC | " in line]) == 6  # 4 configs: 6 pairs
    # per seed, validation / test of each config
    assert f"| seed | best trial | base.yaml | default config | {paper} |" in report
    assert "| 1 | 0.7910 / 0.8010 | 0.7910 / 0.7910 | 0.7910 / 0.7910 | 0.7890 / 0.7910 |" \
        in report
    with pytest.raises(CompareError, match="other.yaml: its data section"):
        compare_studies(CompareOptions(studies=[study], out=tmp_path / "out", retrain_seeds=1,
                                       baselines=[str(other)], say=lambda text: None))


def test_a_study_without_a_finished_trial_is_refused(tmp_path):
    a = _trials_csv(tmp_path / "a", [("0", "COMPLETE", "0.70")])
    b = _trials_csv(tmp_path / "b", [("0", "FAIL", "")])
    with pytest.raises(CompareError, match="b: the study has no finished trial"):
        compare_studies(CompareOptions(studies=[a, b], out=tmp_path / "out"))


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


def test_studies_on_other_data_are_not_pooled(two_studies, tmp_path):
    """A study on other data is refused (its curve, proxies and front were pooled with the
    others' and a best trial of all named); a baseline on other data is refused before
    COMPARE.md says the retraining is in progress."""
    import torch

    root, *_ = two_studies
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        space = tmp_path / "space.yaml"
        space.write_text(SPACE)
        run_search(SearchOptions(out=tmp_path / "other", dataset="synthetic",
                                 space=str(space), overrides=[*DATA, "data.seed=7"], trials=1,
                                 sampler="random", pruner="none", warmup_fraction=0,
                                 say=lambda text: None))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(CompareError, match="ran on different data"):
        compare_studies(CompareOptions(studies=[root / "random", tmp_path / "other"],
                                       out=tmp_path / "out"))
    with pytest.raises(CompareError, match="--baseline paper: its data section"):
        compare_studies(CompareOptions(studies=[root / "random"], out=tmp_path / "out2",
                                       retrain_seeds=1, baselines=["paper"]))
    assert not (tmp_path / "out2" / "COMPARE.md").exists()


def test_sigeo_weights_are_fitted_to_the_ranking_and_parsed():
    import numpy as np

    from cetnet.search.proxies import fit_sigeo_weights, parse_sigeo_weights, sigeo_score

    rng = np.random.default_rng(0)
    terms = rng.normal(size=(60, 3)) * [100.0, 2.0, 0.1]  # zico, fisher_rao, -loss scales
    auc = 0.003 * terms[:, 0] + 10.0 * terms[:, 2] + 0.01 * rng.normal(size=60)
    weights, tau = fit_sigeo_weights(terms, auc)
    assert tau > 0.9 and max(abs(w) for w in weights) == pytest.approx(1.0)
    assert weights[2] == pytest.approx(1.0) and weights[0] == pytest.approx(3e-4, rel=0.2)
    assert abs(weights[1]) < 0.05
    # the weights are sigeo_score's: its loss term is minus the loss
    stats = {"zico": 200.0, "fisher_rao": 1.0, "loss": 0.5}
    assert sigeo_score(stats, weights) == pytest.approx(
        200.0 * weights[0] + weights[1] - 0.5 * weights[2])
    assert parse_sigeo_weights("1, 0.5,-2") == (1.0, 0.5, -2.0)
    for bad in ("1,2", "a,b,c", "0,0,0", "1,nan,1"):
        with pytest.raises(ValueError, match="--sigeo-weights"):
            parse_sigeo_weights(bad)


def test_the_sigeo_score_follows_the_weights_given(tmp_path, capsys, one_thread):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    status = main(["search", "--dataset", "synthetic", "--space", str(space), "--trials", "1",
                   "--pruner", "none", "--proxy", "sigeo", "--sigeo-weights", "0,0,1",
                   "--warmup-fraction", "0.5", "--out", str(tmp_path / "z"), "--set", *DATA])
    assert status == 0, capsys.readouterr().err
    with (tmp_path / "z" / "trials.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["sigeo"]) == pytest.approx(float(row["neg_warmup_loss"]))
    status = main(["search", "--dataset", "synthetic", "--sigeo-weights", "1,2",
                   "--out", str(tmp_path / "q"), "--set", *DATA])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--sigeo-weights" in err[0], err


def test_studies_measured_two_ways_are_not_pooled(tmp_path):
    """A study of before cost version 2 (no cost_version column: attention without FLOPs, the
    warm-up loss of the training objective) is not compared with one of version 2."""
    old = _trials_csv(tmp_path / "old", [("0", "COMPLETE", "0.70")])
    new = _trials_csv(tmp_path / "new", [("0", "COMPLETE", "0.71")])
    text = (new / "trials.csv").read_text().splitlines()
    (new / "trials.csv").write_text("\n".join([text[0] + ",cost_version"]
                                              + [line + ",2" for line in text[1:]]) + "\n")
    with pytest.raises(CompareError, match="studies old and new measured FLOPs and the warm-up "
                                           "proxies differently .cost version 1 vs 2"):
        compare_studies(CompareOptions(studies=[old, new], out=tmp_path / "out"))
    compare_studies(CompareOptions(studies=[new], out=tmp_path / "out"))  # one version: fine
