"""cetnet search: the space, the study end to end (random, TPE), resume, the warm-up pruner,
FLOPs, the Pareto front, the CLI's errors and a real PostgreSQL storage with two workers.

Tiny runs: a 1000-row synthetic dataset, widths of 8-16, one epoch."""

from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from cetnet.cli import main  # noqa: E402
from cetnet.config import validate_config  # noqa: E402
from cetnet.models.build import build_model  # noqa: E402
from cetnet.processes import process_space  # noqa: E402
from cetnet.search.cost import model_cost  # noqa: E402
from cetnet.search.engine import SearchError, SearchOptions, run_search  # noqa: E402
from cetnet.search.report import kendall_tau, pareto_front, spearman  # noqa: E402
from cetnet.search.space import SpaceError, load_space, sample_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = ["data.num_rows=1000", "data.num_users=40", "data.num_items=80", "data.num_clusters=4",
        "data.cross_size=6", "data.num_tags=8", "data.max_seq_len=4"]
SPACE = """\
ensemble: [cetnet, naive, kdef, multi_embedding]
members: {count: {low: 1, high: 2}, kinds: [dnn, dcnv2]}
embedding_dim: [4, 8]
member:
  dnn: {hidden: {width: [8, 16], depth: {low: 1, high: 2}}}
  dcnv2: {cross_layers: {low: 1, high: 2}, hidden: {width: [8, 16], depth: 1}}
fusion: {temperature: {low: 0.5, high: 2.0, log: true}, member_weight: {low: 0.0, high: 1.0}}
multi_embedding: {num_sets: 2, cross_layers: 1, hidden: {width: [8, 16], depth: 1}}
train: {lr: [1.0e-6, 0.01, 0.03], batch_size: [128, 256]}
base:
  backend: reference
  device: cpu
  model: {embedding_optimizer: null}
  train: {epochs: 1, eval_batch_size: 1024, warmup_steps: 0, log_every: 1000}
"""


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def tiny_dataset():
    from cetnet.search.engine import _base, _load_dataset

    base = _base(SearchOptions(out=Path("."), dataset="synthetic", overrides=DATA))
    return base, _load_dataset(base)


def _options(tmp_path, space_file, **kw) -> SearchOptions:
    kw.setdefault("trials", 4)
    kw.setdefault("sampler", "random")
    kw.setdefault("warmup_fraction", 0.5)
    return SearchOptions(out=tmp_path / "out", dataset="synthetic", space=str(space_file),
                         overrides=DATA, say=lambda text: None, **kw)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finished(study) -> list:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(states=states)


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_every_sampled_config_validates_and_builds(which, space_file, tiny_dataset):
    base, dataset = tiny_dataset
    space = load_space("default" if which == "default" else space_file)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    kinds_seen = set()
    for _ in range(25):
        trial = study.ask()
        config = sample_config(trial, space, base)
        config["name"] = "t"
        config = validate_config(config)
        model_cfg = {**config["model"], "embedding_optimizer": None}
        with torch.device("meta"):
            build_model(model_cfg, dataset.schema, backend="reference")
        params, model = trial.params, config["model"]
        kinds_seen.add(model["ensemble"])
        # conditional parameters: a kind's options exist only when it was chosen, an
        # ensemble section's only under that ensemble
        members = [] if model["ensemble"] == "multi_embedding" else model["members"]
        for kind in ("dnn", "dcnv2", "dhen", "interformer"):
            assert any(k.startswith(f"member.{kind}.") for k in params) == (kind in members) \
                or not space["member"].get(kind)
        assert any(k.startswith("fusion.") for k in params) == (model["ensemble"] == "cetnet")
        assert any(k.startswith("multi_embedding.") for k in params) == \
            (model["ensemble"] == "multi_embedding")
        if members:
            assert len(model["embedding_dim"]) == len(members) == params["members.count"]
        study.tell(trial, 0.5)
    assert kinds_seen == {"cetnet", "naive", "kdef", "multi_embedding"}


@pytest.mark.parametrize("sampler", ["random", "tpe", "predictor"])
def test_a_study_runs_end_to_end(sampler, tmp_path, space_file, one_thread):
    options = _options(tmp_path, space_file, trials=4, sampler=sampler, pruner="none",
                       command="cetnet search --dataset synthetic")
    study = run_search(options)
    out = options.out
    for name in ("trials.csv", "pareto.csv", "SEARCH.md", "auc_vs_flops.png", "study.db"):
        assert (out / name).is_file(), name
    rows = _rows(out / "trials.csv")
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    for r in rows:
        assert 0 < float(r["proxy_auc"]) < 1 and 0 < float(r["valid_auc"]) < 1
        for name in ("sigeo", "zico", "fisher_rao", "neg_warmup_loss"):  # SiGeo-style proxies
            assert math.isfinite(float(r[name])), (name, r[name])
        assert float(r["sigeo"]) == pytest.approx(float(r["zico"]) + float(r["fisher_rao"])
                                                  + float(r["neg_warmup_loss"]))
        assert float(r["flops"]) > 0 and int(r["params"]) > 0 and float(r["seconds"]) > 0
        assert float(r["step_ms"]) > 0
        for part in ("warmup", "full"):
            run = Path(r["run_dir"]) / part
            assert (run / "metrics.json").is_file() and (run / "config.yaml").is_file()
    report = (out / "SEARCH.md").read_text()
    for text in ("## Best trial", "## Pareto front", "Kendall tau", "Spearman",
                 "| SiGeo-style score", "| parameters (baseline) |",
                 "cetnet search --dataset synthetic"):
        assert text in report
    assert len(_finished(study)) == 4
    if sampler == "predictor":  # 2 random startup trials, then the predictor's proposals
        predicted = [t.user_attrs.get("predicted_value") for t in study.trials]
        assert predicted[:2] == [None, None] and all(0 < p < 1 for p in predicted[2:])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_resume_continues_without_redoing_finished_trials(tmp_path, space_file, one_thread):
    first = run_search(_options(tmp_path, space_file, trials=3, pruner="none"))
    done = {t.number: t.user_attrs["run_dir"] for t in _finished(first)}
    stamps = {n: (Path(d) / "full" / "metrics.json").stat().st_mtime_ns for n, d in done.items()}
    with pytest.raises(SearchError, match="--resume"):
        run_search(_options(tmp_path, space_file, trials=5))
    # a trial left RUNNING by a process that died: failed and its parameters queued again
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = first.ask()
    stale.set_user_attr("host", process_space())
    stale.set_user_attr("pid", dead.pid)
    study = run_search(_options(tmp_path, space_file, trials=5, pruner="none", resume=True))
    trials = study.get_trials()
    assert trials[stale.number].state == optuna.trial.TrialState.FAIL
    assert len(_finished(study)) == 5
    assert any(t.user_attrs.get("retry_of") == stale.number for t in trials)
    for n, d in done.items():  # finished trials untouched, their runs not trained again
        assert trials[n].user_attrs["run_dir"] == d
        assert (Path(d) / "full" / "metrics.json").stat().st_mtime_ns == stamps[n]
    # nothing left to do: no trial is added
    again = run_search(_options(tmp_path, space_file, trials=5, resume=True))
    assert len(again.get_trials()) == len(trials)


def test_a_resumed_study_draws_new_parameters(tmp_path, space_file, one_thread):
    """--resume with the same --seed: the sampler is seeded with the trials the study holds,
    so the new trials are new configurations (before: the first trials' parameters again,
    each counted as a finished trial on a reused run)."""
    run_search(_options(tmp_path, space_file, trials=2, pruner="none", warmup_fraction=0))
    study = run_search(_options(tmp_path, space_file, trials=4, pruner="none",
                                warmup_fraction=0, resume=True))
    params = [tuple(sorted(t.params.items())) for t in _finished(study)]
    assert len(params) == 4 and len(set(params)) == 4
    assert not any(t.user_attrs.get("reused") for t in _finished(study)[2:])


def test_a_failed_trial_is_one_line(tmp_path, space_file):
    """A trial that fails (here: its model cannot be allocated, which the space's checks on
    the meta device cannot see) fails alone, said in one line and recorded in trials.csv;
    Optuna's traceback of it is not printed."""
    # a process of its own: Optuna's log handler holds the stderr of its import
    script = (
        "import sys, torch, cetnet.train.runner as r\n"
        "real, calls = r.build_model, []\n"
        "def build(*a, **k):\n"
        "    if torch.empty(0).device.type != 'meta':\n"
        "        calls.append(1)\n"
        "        if len(calls) == 1:\n"
        "            raise RuntimeError('DefaultCPUAllocator: not enough memory: you tried to '\n"
        "                               'allocate 4398046511104 bytes.')\n"
        "    return real(*a, **k)\n"
        "r.build_model = build\n"
        "from cetnet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run(
        [sys.executable, "-c", script, "search", "--dataset", "synthetic", "--space",
         str(space_file), "--out", str(tmp_path / "out"), "--trials", "2", "--sampler",
         "random", "--warmup-fraction", "0", "--set", *DATA], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "Traceback" not in text and "trial 0: invalid config: config: model: its " \
        "parameters do not fit in memory" in text, text
    rows = _rows(tmp_path / "out" / "trials.csv")
    assert rows[0]["state"] == "FAIL" and "do not fit in memory" in rows[0]["error"]
    assert rows[1]["state"] == "COMPLETE"


def test_a_study_is_tied_to_its_data(tmp_path, space_file, one_thread):
    """A study records its data (the resolved data section and the dataset's encoding
    digest): a resume on other data is refused, so one study never mixes two datasets; a
    dataset that fails to load leaves no study behind (a retry with it fixed starts cleanly);
    one --out holds one study; --seed and --study are checked."""
    from cetnet.data import make_synthetic
    from cetnet.train import register_dataset, unregister_dataset

    seed = {"value": 0}  # the "files" of a dataset that a user replaces between two runs
    register_dataset("replaceable", lambda **o: make_synthetic(seed=seed["value"], **o))
    try:
        data = [*DATA, "data.name=replaceable"]
        opts = dict(trials=1, pruner="none", warmup_fraction=0)
        tiny = [*data, "data.num_rows=5"]
        with pytest.raises(Exception):  # (the dataset's own error: too few rows)
            run_search(SearchOptions(out=tmp_path / "out", dataset="synthetic",
                                     space=str(space_file), overrides=tiny,
                                     say=lambda text: None, **opts))
        assert not (tmp_path / "out" / "study.db").exists()
        options = SearchOptions(out=tmp_path / "out", dataset="synthetic",
                                space=str(space_file), overrides=data, say=lambda text: None,
                                **opts)
        run_search(options)
        seed["value"] = 1
        with pytest.raises(SearchError, match="was started with another data_digest"):
            run_search(SearchOptions(**{**vars(options), "trials": 2, "resume": True}))
        seed["value"] = 0
        assert len(_finished(run_search(SearchOptions(**{**vars(options), "trials": 2,
                                                         "resume": True})))) == 2
        with pytest.raises(SearchError, match="holds study 'cetnet-search'"):
            run_search(SearchOptions(**{**vars(options), "study": "another"}))
        for key, value, message in (("seed", -1, "--seed must be an integer"),
                                    ("study", " ", "--study must be a non-empty name")):
            with pytest.raises(SearchError, match=message):
                run_search(SearchOptions(**{**vars(options), key: value}))
    finally:
        unregister_dataset("replaceable")


@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_the_pruner_prunes_under_the_warmup_proxy(pruner, tmp_path, space_file, one_thread):
    study = run_search(_options(tmp_path, space_file, trials=6, pruner=pruner,
                                warmup_fraction=0.3))
    pruned = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    for t in pruned:
        assert "proxy_auc" in t.user_attrs and "valid_auc" not in t.user_attrs
        assert not (Path(t.user_attrs["run_dir"]) / "full").exists()
        assert list(t.intermediate_values) == [1]
    rows = {int(r["number"]): r for r in _rows(tmp_path / "out" / "trials.csv")}
    assert all(rows[t.number]["state"] == "PRUNED" for t in pruned)


def test_the_pruner_can_rank_by_the_sigeo_score(tmp_path, space_file, one_thread):
    study = run_search(_options(tmp_path, space_file, trials=5, pruner="median", proxy="sigeo",
                                warmup_fraction=0.3))
    for t in study.get_trials():  # the intermediate value is the SiGeo score, not the AUC
        assert t.intermediate_values == {1: pytest.approx(t.user_attrs["sigeo"])}
    assert study.user_attrs["setup"]["proxy"] == "sigeo"
    with pytest.raises(SearchError, match="another proxy"):  # a study remembers its proxy
        run_search(_options(tmp_path, space_file, trials=5, resume=True))


def test_max_cost_skips_costlier_candidates_and_cost_weight_folds_the_cost(
        tmp_path, space_file, one_thread):
    # every candidate of the tiny space costs more than 10 FLOPs per sample: none trains
    study = run_search(_options(tmp_path / "a", space_file, trials=3, max_cost=10.0))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 3
    for t in study.trials:
        assert t.user_attrs["over_max_cost"] and t.user_attrs["flops"] > 10
        assert not Path(t.user_attrs["run_dir"]).exists()  # neither warm-up nor training
    # DistDNAS-style: one objective, the AUC less 0.01 per decade of FLOPs
    study = run_search(_options(tmp_path / "b", space_file, trials=3, pruner="none",
                                cost_weight=0.01))
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        assert t.value == pytest.approx(a["valid_auc"] - 0.01 * math.log10(a["flops"]))
        assert a["objective"] == pytest.approx(t.value)
    report = (tmp_path / "b" / "out" / "SEARCH.md").read_text()
    best = max(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
               key=lambda t: t.value)
    assert f"Trial {best.number}:" in report
    with pytest.raises(SearchError, match="--cost-weight folds the cost into one objective"):
        run_search(_options(tmp_path / "c", space_file, objective="auc,cost", cost_weight=0.1))
    with pytest.raises(SearchError, match="--max-cost must be a positive"):
        run_search(_options(tmp_path / "d", space_file, max_cost=0.0))


def test_warmup_statistics_are_deterministic_and_update_nothing(tmp_path, tiny_dataset):
    from cetnet.search.proxies import warmup_statistics
    from cetnet.train import run_training

    base, dataset = tiny_dataset
    config = validate_config({**base, "name": "w", "backend": "reference", "device": "cpu",
                              "model": {"ensemble": "cetnet", "members": ["dnn", "dcnv2"],
                                        "embedding_dim": 8, "embedding_optimizer": None,
                                        "dnn": {"hidden": [16]}, "dcnv2": {"hidden": [16]}},
                              "train": {**base["train"], "epochs": 1,
                                        "max_steps_per_epoch": 3}})
    run_training(config, tmp_path / "run", quiet=True, plots=False)
    best = tmp_path / "run" / "best.pt"
    before = best.read_bytes()
    a = warmup_statistics(config, dataset, best)
    b = warmup_statistics(config, dataset, best)
    assert a == b and all(math.isfinite(v) for v in a.values()) and a["loss"] > 0
    assert best.read_bytes() == before
    with pytest.raises(ValueError, match="at least 2 batches"):
        warmup_statistics(config, dataset, best, batches=1)


def test_flops_are_positive_and_grow_with_width(tiny_dataset):
    base, dataset = tiny_dataset
    costs = []
    for width in (8, 64):
        config = validate_config({**base, "name": "t", "backend": "reference", "model": {
            "ensemble": "cetnet", "members": ["dnn", "dcnv2"], "embedding_dim": 8,
            "embedding_optimizer": None, "dnn": {"hidden": [width, width]},
            "dcnv2": {"hidden": [width]}}})
        costs.append(model_cost(config, dataset))
    (narrow, narrow_params), (wide, wide_params) = costs
    assert 0 < narrow < wide and 0 < narrow_params < wide_params


def test_the_multi_objective_front_is_non_dominated(tmp_path, space_file, one_thread):
    study = run_search(_options(tmp_path, space_file, trials=4, objective="auc,cost",
                                warmup_fraction=0.0))
    assert len(study.directions) == 2
    out = tmp_path / "out"
    front = [(float(r["valid_auc"]), float(r["flops"]), int(r["number"]))
             for r in _rows(out / "pareto.csv")]
    assert front and {n for *_, n in front} == {t.number for t in study.best_trials}
    for a, f, n in front:
        assert not any(b >= a and g <= f and (b > a or g < f) for b, g, _ in front)
    for t in study.get_trials():
        a, f = t.values
        if t.number not in {n for *_, n in front}:  # dominated by a member of the front
            assert any(b >= a and g <= f for b, g, _ in front)


def test_pareto_and_rank_correlations_by_hand():
    assert pareto_front([(0.7, 10), (0.8, 20), (0.75, 30), (0.8, 20.5), (0.6, 5)]) == [0, 1, 4]
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert kendall_tau(x, y) == pytest.approx(0.6)
    assert spearman(x, y) == pytest.approx(0.8)
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [1, 2, 2, 3, 5, 4], [3, 1, 2, 2, 6, 5]
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


@pytest.mark.parametrize("args, expected", [
    (["--space", "BAD"], "member.dnn.hidden: a range is"),
    (["--space", "UNKNOWN"], "fusoin: unknown key"),
    (["--objective", "auc,latency"], "--objective must be auc or auc,cost, got 'auc,latency'"),
    (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
    (["--sampler", "predictor", "--objective", "auc,cost"],
     "--sampler predictor optimizes one objective"),
    (["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "u:***@127.0.0.1:1/db: cannot open"),
])
def test_cli_errors_are_one_line(args, expected, tmp_path, capsys):
    (tmp_path / "BAD").write_text("member:\n  dnn: {hidden: {low: 1}}\n")
    (tmp_path / "UNKNOWN").write_text("fusoin: {temperature: 1.0}\n")
    args = [str(tmp_path / a) if a in ("BAD", "UNKNOWN") else a for a in args]
    status = main(["search", "--dataset", "synthetic", "--out", str(tmp_path / "out"),
                   "--trials", "1", "--set", *DATA, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("cetnet search: error: ") and expected in err[0], err[0]
    assert "secret" not in err[0]


def test_space_errors_name_the_key(tmp_path):
    for text, key in [("members: {count: 0}\n", "members.count"),
                      ("ensemble: [cetnet, mixture]\n", "ensemble"),
                      ("train: {lrr: [0.1]}\n", "train.lrr"),
                      ("member: {transformer: {}}\n", "member.transformer"),
                      ("model: {embedding_lr: {low: 0, high: 1, log: true}}\n",
                       "model.embedding_lr"),
                      # option names of the sections are checked when the space is read (they
                      # failed every trial, with a traceback, and the search exited 0)
                      ("fusion: {temprature: [1.0, 2.0]}\n", "fusion.temprature"),
                      ("member: {dnn: {hiden: [16]}}\n", "member.dnn.hiden"),
                      ("naive: {foo: [1, 2]}\n", "naive.foo"),
                      ("base: {train: {lrr: 0.1}}\n", "base.train.lrr"),
                      ("base: {model: {dnn: {hiden: [8]}}}\n", "base.model.dnn.hiden"),
                      ("base: {trian: {}}\n", "base.trian"),
                      # a range must be finite (nan passed low <= high, then crashed Optuna)
                      ("train: {lr: {low: .nan, high: 0.01}}\n", "train.lr"),
                      ("train: {lr: {low: 0.001, high: .inf}}\n", "train.lr"),
                      # a count range of floats never reached its top (sampled, truncated)
                      ("members: {count: {low: 1.0, high: 3.0}, kinds: [dnn]}\n",
                       "members.count"),
                      ("multi_embedding: {num_sets: {low: 1.0, high: 4.0}}\n",
                       "multi_embedding.num_sets")]:
        path = tmp_path / "s.yaml"
        path.write_text(text)
        with pytest.raises(SpaceError, match=f"{path}: {key}: "):
            load_space(path)


# --- a real PostgreSQL storage, two workers on one study ------------------------------------

def _postgres_user() -> str | None:
    """The OS user PostgreSQL runs as: ourselves, or as root (which PostgreSQL refuses) an
    existing unprivileged account."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root, which PostgreSQL refuses, and no postgres/nobody account")


def _postgres_tool(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's packages keep it (off PATH)."""
    import glob

    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is neither on PATH nor in /usr/lib/postgresql/*/bin")
    return found


@pytest.fixture
def postgres_url():
    initdb, pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
    pytest.importorskip("psycopg2")
    user = _postgres_user()
    # not under tmp_path: pytest makes it 0700 for root, where the postgres account cannot go
    root = Path(tempfile.mkdtemp(prefix="cetnet-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir(mode=0o700)
    if user is not None:
        shutil.chown(data, user)
        shutil.chown(root, user)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(user=user, capture_output=True, text=True, timeout=60, cwd=root)
    try:
        init = subprocess.run([initdb, "-D", str(data), "-U", "cetnet", "--auth=trust",
                               "-E", "UTF8", "--no-sync"], **run)
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
        start = subprocess.run([pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w",
                                "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                                "-c fsync=off", "start"], **run)
        if start.returncode != 0:
            log = (root / "log").read_text()[-300:] if (root / "log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-200:]} {log}")
        yield f"postgresql://cetnet@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url, tmp_path, space_file):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    args = ["--dataset", "synthetic", "--space", str(space_file), "--trials", "6", "--sampler",
            "random", "--pruner", "none", "--warmup-fraction", "0.3", "--storage", postgres_url,
            "--study", "shared", "--out", str(out), "--resume", "--set", *DATA]
    # each worker imports everything, then waits for the other: both run trials at once
    barrier = ("import sys, time, pathlib; import cetnet.search.engine, cetnet.train; "
               "me, other = map(pathlib.Path, sys.argv[1:3]); me.touch(); "
               "[time.sleep(0.05) for _ in range(2400) if not other.exists()]; "
               "from cetnet.search.__main__ import main; sys.exit(main(sys.argv[3:]))")
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", barrier, str(ready[i]), str(ready[1 - i]),
                                 *args, "--seed", str(i)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [w.communicate(timeout=240) for w in workers]
    for w, (stdout, stderr) in zip(workers, results):
        assert w.returncode == 0, stderr[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url.replace(
        "postgresql://", "postgresql+psycopg2://"))
    finished = _finished(study)
    assert len(finished) >= 6  # each worker stops at 6; one more may have been in flight
    pids = {t.user_attrs["pid"] for t in finished}
    assert pids == {w.pid for w in workers}, "both workers ran trials"
    assert time.perf_counter() - started < 240


def test_an_interrupted_trial_is_queued_again_and_its_runs_reused(tmp_path, space_file,
                                                                  one_thread, monkeypatch):
    from cetnet.search import engine

    train, calls = engine.train_or_reuse, []

    def interrupt_second_full_run(config, run_dir):
        calls.append(run_dir)
        if run_dir.name == "full" and sum(c.name == "full" for c in calls) == 2:
            raise KeyboardInterrupt
        return train(config, run_dir)

    monkeypatch.setattr(engine, "train_or_reuse", interrupt_second_full_run)
    with pytest.raises(KeyboardInterrupt):
        run_search(_options(tmp_path, space_file, trials=3, pruner="none"))
    monkeypatch.setattr(engine, "train_or_reuse", train)
    study = run_search(_options(tmp_path, space_file, trials=3, pruner="none", resume=True))
    trials = study.get_trials()
    stopped = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(stopped) == 1 and stopped[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == stopped[0].number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == stopped[0].params
    assert retry[0].user_attrs["run_dir"] == stopped[0].user_attrs["run_dir"]
    assert len(_finished(study)) == 3


def _start_together(tmp_path: Path, argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Runs ``cetnet search`` once per argv in processes that import everything, then wait
    for each other before starting: ``(returncode, stdout, stderr)`` of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    barrier = ("import sys, time, pathlib; import cetnet.search.engine, cetnet.train; "
               "me, others = pathlib.Path(sys.argv[1]), sys.argv[2].split(','); me.touch(); "
               "[time.sleep(0.01) for _ in range(24000) "
               " if not all(pathlib.Path(o).exists() for o in others)]; "
               "from cetnet.search.__main__ import main; sys.exit(main(sys.argv[3:]))")
    ready = [tmp_path / f"ready{i}" for i in range(len(argvs))]
    workers = [subprocess.Popen(
        [sys.executable, "-c", barrier, str(ready[i]),
         ",".join(str(r) for r in ready if r != ready[i]), *argv], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, argv in enumerate(argvs)]
    outs = [w.communicate(timeout=300) for w in workers]
    return [(w.returncode, o, e) for w, (o, e) in zip(workers, outs)]


def _cli_args(tmp_path, space_file, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--space", str(space_file), "--sampler", "random",
            "--pruner", "none", "--warmup-fraction", "0.3", "--out", str(tmp_path / "out"),
            *extra, "--set", *DATA]


def test_two_workers_starting_one_new_study_at_once_one_is_refused(tmp_path, space_file):
    # both listed the studies before either created one, and both ran trials into it (or two
    # studies into one --out); the study is now created atomically, under --out's lock
    results = _start_together(tmp_path, [
        _cli_args(tmp_path, space_file, "--trials", "1", "--study", "s"),
        _cli_args(tmp_path, space_file, "--trials", "1", "--study", "t")])
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [e[-800:] for _, _, e in results]
    refused = next(e for code, _, e in results if code != 0)
    assert "holds study" in refused and "Traceback" not in refused
    storage = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    assert len(optuna.get_all_study_summaries(storage)) == 1


def test_two_resumers_queue_an_interrupted_trial_once(tmp_path, space_file, one_thread,
                                                      monkeypatch):
    # each resumer read the trials, saw no retry of the interrupted one and queued it: it
    # trained twice (or the second copy failed on the busy run directory)
    from cetnet.search import engine

    train, calls = engine.train_or_reuse, []

    def interrupt_first_full_run(config, run_dir):
        calls.append(run_dir)
        if run_dir.name == "full":
            raise KeyboardInterrupt
        return train(config, run_dir)

    monkeypatch.setattr(engine, "train_or_reuse", interrupt_first_full_run)
    with pytest.raises(KeyboardInterrupt):
        run_search(_options(tmp_path, space_file, trials=2, pruner="none",
                            warmup_fraction=0.3, study="r"))
    monkeypatch.setattr(engine, "train_or_reuse", train)
    args = _cli_args(tmp_path, space_file, "--trials", "2", "--study", "r", "--resume")
    results = _start_together(tmp_path, [args, args])
    assert all(code == 0 for code, _, _ in results), [e[-800:] for _, _, e in results]
    queued = sum((o + e).count("it was interrupted; queued again") for _, o, e in results)
    assert queued == 1
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    stopped = [t for t in study.get_trials() if t.user_attrs.get("interrupted")]
    assert len(stopped) == 1
    assert [t.user_attrs.get("retry_of") for t in study.get_trials()].count(
        stopped[0].number) == 1


def test_a_second_retry_of_one_trial_fails_at_once(tmp_path):
    # resumers on other machines (one storage, each its own --out) can each queue it
    from cetnet.search.engine import _refuse_duplicate_retry
    from cetnet.train.rundir import RunDirError

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    interrupted = study.ask()
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    for _ in range(2):  # two resumers
        study.enqueue_trial({"x": 1.0}, user_attrs={"retry_of": 0}, skip_if_exists=False)
    first, second = study.ask(), study.ask()
    # Optuna's heartbeat retry of a silent trial copies its attributes: not a duplicate
    study.enqueue_trial({"x": 1.0}, user_attrs={"retry_of": 0}, skip_if_exists=False)
    heartbeat = study.ask()
    study._storage.set_trial_system_attr(heartbeat._trial_id, "failed_trial", first.number)
    _refuse_duplicate_retry(study, first)
    _refuse_duplicate_retry(study, heartbeat)
    with pytest.raises(RunDirError, match="a second retry of trial 0: trial 1 retries it"):
        _refuse_duplicate_retry(study, second)


def test_a_worker_that_finds_a_study_without_its_setup_waits_for_it(tmp_path):
    import threading

    from cetnet.search.engine import claim_study, open_storage

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    creator = optuna.create_study(storage=url, study_name="s")  # the setup comes next
    timer = threading.Timer(0.5, creator.set_user_attr, ("setup", {"dataset": "first"}))
    timer.start()
    try:
        study, saved = claim_study(open_storage(url), "s", resume=True,
                                   setup={"dataset": "second"}, where=url)
    finally:
        timer.join()
    assert saved == {"dataset": "first"} and study.user_attrs["setup"] == saved
    with pytest.raises(SearchError, match="already exists .*add --resume"):
        claim_study(open_storage(url), "s", resume=False, setup={}, where=url)
    study, saved = claim_study(open_storage(url), "new", resume=False, setup={"a": 1},
                               where=url)
    assert saved is None and study.user_attrs["setup"] == {"a": 1}


def test_a_study_records_its_rows_not_only_their_encoding():
    # test labels edited (the encoding unchanged): a resume on them was accepted and mixed
    # trials of two datasets in one study
    from cetnet.data import make_synthetic
    from cetnet.search.engine import data_identity, setup_changes

    base = make_synthetic(num_rows=600)
    edited = make_synthetic(num_rows=600)
    edited.splits["test"].label[:3] = 1 - edited.splits["test"].label[:3]
    before, after = data_identity({}, base), data_identity({}, edited)
    assert before["data_digest"] == after["data_digest"]
    assert setup_changes(before, after) == ["data_content"]
    # a study recorded by an earlier cetnet (no data_content) is not refused for it, and
    # records it then: the next resume compares it
    study = optuna.create_study()
    old = {"data_digest": before["data_digest"]}
    study.set_user_attr("setup", old)
    assert setup_changes(old, after, study=study) == []
    assert study.user_attrs["setup"] == {**old, "data_content": after["data_content"]}
    assert setup_changes(study.user_attrs["setup"], before) == ["data_content"]


def test_a_dead_pid_of_another_container_with_this_hostname_is_left_to_the_heartbeat(tmp_path):
    # containers sharing a hostname number their own processes: a pid this one lacks may be
    # alive in the other, whose running trial must not be failed and run a second time
    import socket

    from cetnet.search import engine

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours, theirs = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
                    for _ in range(2))
    host, boot, namespace = process_space().split("/")
    assert host == socket.gethostname() and boot and namespace  # Linux exposes both
    for trial, space in ((ours, process_space()), (theirs, f"{host}/{boot}/{namespace}0")):
        trial.set_user_attr("host", space)
        trial.set_user_attr("pid", dead.pid)
    said: list[str] = []
    engine._requeue_interrupted(study, said.append)
    assert said == [f"trial {ours.number}: its process ({dead.pid}) is gone; queued again"]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[theirs.number] == optuna.trial.TrialState.RUNNING


def test_a_trial_the_heartbeat_retried_is_not_queued_again(tmp_path, space_file, one_thread):
    """A worker Ctrl-C'd, dead before Optuna recorded the FAIL, leaves a RUNNING trial marked
    interrupted; a live worker's heartbeat fails it and queues a copy (attributes included).
    A resume queued it a second time (the config trained twice, one of --trials spent on it),
    and the copy, still marked interrupted, would be queued again after a real failure."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from cetnet.search import engine

    study = run_search(_options(tmp_path, space_file, trials=1, pruner="none"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    silent = study.ask(dict(study.trials[0].distributions))
    for name, value in (("host", process_space()), ("pid", dead.pid), ("interrupted", True)):
        silent.set_user_attr(name, value)
    frozen = study._storage.get_trial(silent._trial_id)
    study._storage.set_trial_state_values(silent._trial_id, optuna.trial.TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(max_retry=2)(study, frozen)  # what the heartbeat does
    said: list[str] = []
    engine._requeue_interrupted(study, said.append)
    assert said == []
    resumed = run_search(_options(tmp_path, space_file, trials=2, pruner="none", resume=True))
    trials = resumed.get_trials()
    assert len(trials) == 3  # the first, the silent one, its heartbeat copy: none queued again
    copy = trials[2]
    assert copy.state == optuna.trial.TrialState.COMPLETE
    assert copy.params.items() >= frozen.params.items()  # (with what its config samples)
    assert copy.system_attrs["failed_trial"] == silent.number
    assert copy.user_attrs["interrupted"] is False


def test_a_resumer_tolerates_a_trial_another_resumer_has_failed(tmp_path, monkeypatch):
    # a dead process's RUNNING trial: both resumers tried to fail it, the second crashed
    from cetnet.search import engine

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("host", process_space())
    trial.set_user_attr("pid", dead.pid)
    stale = study.get_trials(deepcopy=False)  # what the second resumer read
    said: list[str] = []
    engine._requeue_interrupted(study, said.append)
    monkeypatch.setattr(study, "get_trials", lambda deepcopy=True, states=None: stale)
    engine._requeue_interrupted(study, said.append)
    assert said == [f"trial {trial.number}: its process ({dead.pid}) is gone; queued again"]
