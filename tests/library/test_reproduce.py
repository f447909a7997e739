"""`cetnet reproduce` (cetnet.reproduce): rows, caching / resume, statistics, the report.
Tiny synthetic runs (1 epoch of 2 steps) with DNN / DCNv2 members keep it fast."""

from __future__ import annotations

import json
import math

import pytest

from cetnet.data import load_dataset
from cetnet.reproduce import experiment as ex
from cetnet.reproduce.__main__ import build_parser, main
from cetnet.reproduce.report import comparisons, summarize
from cetnet.reproduce.rows import ROW_NAMES, check_model, row_config, scaled_single_model
from cetnet.reproduce.stats import T975, mean_std, paired_difference, t_quantile_975

TINY = ["data.num_rows=1200", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_size=64", "train.warmup_steps=0", "model.members=[dnn, dcnv2]",
        "model.embedding_dim=4", "model.dnn.hidden=[8]", "model.dcnv2.hidden=[8]",
        "device=cpu"]


def _args(tmp_path, *extra, rows="dnn,cetnet", seeds=2, grid="none"):
    return ["--dataset", "synthetic", "--seeds", str(seeds), "--rows", rows, "--grid", grid,
            "--out", str(tmp_path / "out"), "--report", str(tmp_path / "doc" / "RESULTS.md"),
            "--no-plots", "--set", *TINY, *extra]


@pytest.fixture(scope="module")
def base():
    return ex.base_config("synthetic", overrides=TINY[:1])


@pytest.fixture(scope="module")
def schema(base):
    data = dict(base["data"])
    return load_dataset(data.pop("name"), **data).schema


def test_every_row_validates_and_builds(base, schema):
    counts = {}
    for row in ROW_NAMES:
        if row == "scaled_single":
            continue
        cfg = row_config(base, row, seed=3, train={"lr": 2e-3})
        assert cfg["train"]["seed"] == 3 and cfg["train"]["lr"] == 2e-3
        assert cfg["data"] == base["data"] and cfg["train"]["epochs"] == base["train"]["epochs"]
        counts[row] = check_model(cfg, schema)
    assert row_config(base, "dnn")["model"]["members"] == ["dnn"]
    assert "fusion" not in row_config(base, "kdef")["model"]
    assert row_config(base, "cetnet_both")["model"]["fusion"]["mutual_weight"] == 0.5
    assert counts["cetnet"] == counts["naive"] and counts["dnn"] < counts["cetnet"]
    for kind in ("dhen", "dnn", "interformer"):
        s = scaled_single_model(base, schema, kind)
        assert s["target"] == counts["cetnet"]
        assert abs(s["num_parameters"] - s["target"]) / s["target"] < 0.05, s
        assert s["dim"] > 16
        cfg = row_config(base, "scaled_single", model=s["model"])
        assert check_model(cfg, schema) == s["num_parameters"]
        assert cfg["model"]["members"] == [kind]


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert len(T975) == 30
    # beyond the table: continuous with it and with known values
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-4)
    assert t_quantile_975(10**6) == pytest.approx(1.95997, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_interval_matches_a_hand_computation():
    a = {0: 0.70, 1: 0.72, 2: 0.71, 7: 0.5}  # seed 7 has no partner: left out
    b = {0: 0.69, 1: 0.70, 2: 0.70}
    d = paired_difference(a, b)
    # diffs 0.01, 0.02, 0.01: mean 0.013333, sd sqrt(((-1/300)^2 * 2 + (2/300)^2) / 2)
    sd = math.sqrt(((1 / 300) ** 2 * 2 + (2 / 300) ** 2) / 2)
    half = 4.302652730 * sd / math.sqrt(3)
    assert d.n == 3 and d.seeds == [0, 1, 2]
    assert d.mean == pytest.approx(0.04 / 3) and d.std == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(0.04 / 3 - half), pytest.approx(0.04 / 3 + half))
    assert d.verdict() == "within seed noise"  # the interval [-0.0010, 0.0277] holds 0
    tight = paired_difference({0: 1.0, 1: 1.1, 2: 1.2}, {0: 0.9, 1: 1.0, 2: 1.09})
    assert tight.verdict() == "better" and tight.verdict(higher_is_better=False) == "worse"
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one.n == 1 and math.isnan(one.low) and one.verdict().startswith("n/a")
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))


def test_a_nan_seed_is_counted_and_named_not_hidden():
    # one NaN seed (a one-class test split, NaN predictions) showed the row as "–", as a
    # row without seeds, and the comparison said "fewer than 2 seeds" of three
    from cetnet.reproduce.report import _ci, _ms

    assert _ms([0.80, math.nan, 0.81]) == "0.8050 ± 0.0071 (1 of 3 NaN)"
    assert _ms([math.nan, math.nan]) == "NaN (2 of 2)" and _ms([]) == "–"
    d = paired_difference({0: 0.80, 1: math.nan, 2: 0.81, 3: 0.82},
                          {0: 0.70, 1: 0.70, 2: 0.71, 3: 0.715})
    assert d.n == 3 and d.seeds == [0, 2, 3] and d.nonfinite == [1]
    assert math.isfinite(d.mean) and math.isfinite(d.low)
    assert d.verdict() == "better (seed 1 left out: not finite)"
    few = paired_difference({0: 0.8, 1: math.nan}, {0: 0.7, 1: 0.7})
    assert few.verdict() == "n/a (1 seed with finite values) (seed 1 left out: not finite)"
    assert _ci(paired_difference({1: math.nan}, {1: 0.7})) == "NaN"


def test_a_peer_row_runs_the_grid_points_its_trainer_tells_apart(base):
    # FuxiCTR never reads model.embedding_lr: the small grid's 4 points were 2 runs, each
    # trained twice (and the row's tuning time counted twice)
    experiment = ex.Experiment(base, ["dnn", "fuxictr_dnn"], [0, 1], "small", "/tmp/unused",
                               log=lambda m: None)
    ours, peer = experiment.jobs("dnn"), experiment.jobs("fuxictr_dnn")
    assert len(ours) == 8 and len(peer) == 4
    assert [(j.seed, j.point) for j in peer] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    assert [j.grid for j in peer[:2]] == [{"train.lr": 1e-3}, {"train.lr": 3e-3}]
    # each kept point is the run (and cache entry) it was: the first point's config
    for j in peer:
        assert j.config["model"]["embedding_lr"] == 0.02
        assert j.key == ex.config_key(j.config, "fuxictr")


def _result(seed, point, valid, test, error=None):
    m = {"fused": {"auc": test, "gauc": test, "logloss": 1 - test},
         "members": {"m": {"auc": test, "gauc": test, "logloss": 1 - test}},
         "valid": {"fused": {"auc": valid}}, "train_seconds": 1.0, "best_epoch": 1}
    r = {"seed": seed, "point": point, "grid": {"train.lr": point}, "num_parameters": 10,
         "wall_seconds": 2.0, "metrics": m}
    if error:
        r = {**r, "error": error}
        del r["metrics"]
    return r


def test_grid_point_is_chosen_on_validation():
    results = [_result(0, 0, 0.70, 0.9), _result(0, 1, 0.75, 0.6), _result(0, 2, 0.75, 0.8),
               _result(0, 3, math.nan, 0.99), _result(0, 4, None, 0.99, error="TrainingError")]
    assert ex.select(results)["point"] == 1  # best validation AUC; tie -> the earlier point
    assert ex.select([_result(0, 0, None, 1, error="x")]) is None
    pts = ex.grid_points("small")
    assert len(pts) == 4 and {p["train.lr"] for p in pts} == {1e-3, 3e-3}
    assert ex.grid_points("none") == [{}]
    with pytest.raises(ValueError, match="grid"):
        ex.grid_points("huge")


def test_comparisons_pick_the_best_member_on_validation():
    chosen = {"dnn": {s: _result(s, 0, 0.60, 0.70 + s / 100) for s in range(3)},
              "dcnv2": {s: _result(s, 0, 0.65, 0.60) for s in range(3)},
              "cetnet": {s: _result(s, 0, 0.7, 0.72 + s / 100) for s in range(3)},
              "naive": {s: _result(s, 0, 0.69 - s / 1000, 0.71) for s in range(3)}}
    summary = summarize(chosen, {r: list(c.values()) for r, c in chosen.items()})
    assert summary["dnn"]["test"]["auc"] == [0.70, 0.71, 0.72]
    comps = comparisons(chosen, summary, ["dnn", "dcnv2"])
    first = comps[0]
    assert (first["a"], first["b"]) == ("cetnet", "dcnv2")  # better on validation, not test
    naive = next(c for c in comps if c["b"] == "naive")
    assert naive["diffs"]["auc"].diffs == pytest.approx([0.01, 0.02, 0.03])
    assert naive["diffs"]["logloss"].mean == pytest.approx(-0.02)
    # and the validation AUC the rows were chosen on
    assert naive["diffs"]["valid_auc"].diffs == pytest.approx([0.01, 0.011, 0.012])


def test_runs_are_cached_resumed_and_reported(tmp_path, monkeypatch):
    trained = []
    real = ex.Experiment.run_job

    def counting(self, job):
        trained.append(job.label())
        if len(trained) == 3 and not getattr(counting, "interrupted", False):
            counting.interrupted = True
            raise KeyboardInterrupt  # stop in the middle, as ^C would
        return real(self, job)

    monkeypatch.setattr(ex.Experiment, "run_job", counting)
    assert main(_args(tmp_path)) == 130  # interrupted at the third run
    results = list((tmp_path / "out" / "results").glob("*.json"))
    assert len(results) == 2
    trained.clear()
    assert main(_args(tmp_path, rows="dnn,cetnet")) == 0  # the same command continues
    assert len(trained) == 2  # only what was left
    assert len(list((tmp_path / "out" / "results").glob("*.json"))) == 4
    assert not (tmp_path / "out" / "runs").exists() or not any(
        (tmp_path / "out" / "runs").iterdir())  # checkpoints are not kept
    report = (tmp_path / "doc" / "RESULTS.md").read_text()
    assert "cetnet reproduce --dataset synthetic" in report and "torch" in report
    assert "| cetnet |" in report and "| dnn |" in report and "(a) best member alone (dnn)" \
        in report
    assert "| AUC verdict | Δvalid AUC | n |" in report
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["summary"]["cetnet"]["seeds"] == [0, 1]
    one = json.loads(results[0].read_text())
    assert one["key"] == results[0].stem and one["num_parameters"] > 0
    assert ex.config_key(one["config"]) == one["key"]

    # a second run trains nothing; --resume is accepted
    trained.clear()
    (tmp_path / "doc" / "RESULTS.md").unlink()
    assert main(_args(tmp_path, "--resume")) == 0
    assert trained == [] and (tmp_path / "doc" / "RESULTS.md").exists()
    # another budget is another config, hence another key
    assert main(_args(tmp_path, "--dry-run", "--epochs", "2")) == 0
    assert trained == []


def test_cached_results_of_other_data_are_refused(tmp_path):
    """Results cached in --out record the dataset's digest: the same command after its data
    changed (same options, other contents) is refused instead of reusing the runs."""
    from cetnet.data import make_synthetic
    from cetnet.train import register_dataset, unregister_dataset

    seed = {"value": 0}
    register_dataset("replaceable", lambda **o: make_synthetic(seed=seed["value"], **o))
    try:
        args = _args(tmp_path, "data.name=replaceable", rows="dnn", seeds=1)
        assert main(args) == 0
        seed["value"] = 1
        assert main(args) == 2
        assert main([*args, "--dry-run"]) == 2
        seed["value"] = 0
        assert main(args) == 0
        # other data options are other keys: they share the --out
        assert main(_args(tmp_path, "data.name=replaceable", "data.num_rows=1300", rows="dnn",
                          seeds=1)) == 0
        assert main(args) == 0
    finally:
        unregister_dataset("replaceable")


def test_cached_results_of_other_rows_with_the_same_encoding_are_refused(tmp_path):
    """A test label flipped (valid/test files edited: the vocabularies and dense statistics,
    hence the encoding digest, unchanged) is other data too: the cached runs were reused and
    reported as this data's. An --out recorded by an earlier cetnet (the encoding's digest
    only) is still read, and gets the rows' digest."""
    from cetnet.data import make_synthetic
    from cetnet.train import register_dataset, unregister_dataset

    flip = {"value": False}

    def make(**options):
        ds = make_synthetic(**options)
        if flip["value"]:
            ds.splits["test"].label[:5] = 1 - ds.splits["test"].label[:5]
        return ds

    register_dataset("edited", make)
    try:
        args = _args(tmp_path, "data.name=edited", rows="dnn", seeds=1)
        assert main(args) == 0
        record = json.loads((tmp_path / "out" / "data.json").read_text())
        assert list(record) == ["digests", "contents"]
        flip["value"] = True
        assert main(args) == 2
        # an --out of before (no rows' digest): accepted, the digest added
        (tmp_path / "out" / "data.json").write_text(json.dumps({"digests": record["digests"]}))
        assert main(args) == 0
        assert "contents" in json.loads((tmp_path / "out" / "data.json").read_text())
        flip["value"] = False
        assert main(args) == 2
    finally:
        unregister_dataset("edited")


def test_results_of_other_code_are_trained_again_unless_reused(tmp_path, monkeypatch, capsys):
    """A result records the code that trained it: after an upgrade (another digest) the same
    command trains it again, the old result and run kept under superseded/, instead of pairing
    old runs with new ones; --reuse-other-code reuses them and the report says so. A result
    written before results recorded their code counts as other code."""
    from cetnet import code_identity as ci

    trained = []
    real = ex.Experiment.run_job

    def counting(self, job):
        trained.append(job.label())
        return real(self, job)

    monkeypatch.setattr(ex.Experiment, "run_job", counting)
    args = _args(tmp_path, "--keep-checkpoints", rows="dnn", seeds=2)
    assert main(args) == 0 and len(trained) == 2
    out = tmp_path / "out"
    first = {p.name: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    mine = ci.code_identity("auto")
    assert all(r["code"] == mine for r in first.values())
    report = (tmp_path / "doc" / "RESULTS.md").read_text()
    assert f"- trained by: cetnet {mine['cetnet']}, code {mine['digest']}" in report

    upgraded = {**mine, "digest": "0123456789abcdef"}
    monkeypatch.setattr(ci, "code_identity", lambda device: upgraded)
    trained.clear()
    assert main([*args, "--reuse-other-code"]) == 0 and trained == []
    assert "2 cached results trained by other code" in capsys.readouterr().out
    report = (tmp_path / "doc" / "RESULTS.md").read_text()
    assert "**trained by 1 builds" not in report and f"code {mine['digest']}" in report
    trained.clear()
    assert main(args) == 0 and len(trained) == 2
    assert "trained again" in capsys.readouterr().out
    kept = out / "superseded" / ci.code_tag(mine)
    assert {p.name: json.loads(p.read_text()) for p in (kept / "results").glob("*.json")} \
        == first
    assert sorted(p.name for p in (kept / "runs").iterdir()) == sorted(
        n.removesuffix(".json") for n in first)
    assert all(json.loads(p.read_text())["code"] == upgraded
               for p in (out / "results").glob("*.json"))
    # trained, not read back from the moved runs' metrics.json
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        n.removesuffix(".json") for n in first)

    # one result of before results recorded their code, reused beside the others: the report
    # names both builds
    path = next((out / "results").glob("*.json"))
    old = json.loads(path.read_text())
    del old["code"]
    path.write_text(json.dumps(old))
    trained.clear()
    assert main([*args, "--reuse-other-code"]) == 0 and trained == []
    report = (tmp_path / "doc" / "RESULTS.md").read_text()
    assert "**trained by 2 builds of the code**" in report and "unrecorded" in report
    assert sum(json.loads((out / "results.json").read_text())["codes"].values()) == 2
    assert main(args) == 0 and len(trained) == 1
    assert (out / "superseded" / "unrecorded" / "results" / path.name).exists()


def test_a_run_other_code_started_is_trained_again_not_finished(tmp_path, monkeypatch, capsys):
    """An interrupted run resumed by other code (an upgrade between two invocations) would be
    one run of two codes: the code that starts a run is recorded (out/started/) until its
    result records it, and a run of other code, or of no record, is moved aside and trained
    from the start, unless --reuse-other-code; a run another process holds is not moved."""
    from cetnet import code_identity as ci
    from cetnet.train.rundir import RunLock

    args = _args(tmp_path, "--keep-checkpoints", rows="dnn", seeds=1)
    assert main(args) == 0
    out = tmp_path / "out"
    result = next((out / "results").glob("*.json"))
    key, mine = result.stem, ci.code_identity("auto")
    started, metrics = out / "started" / f"{key}.json", out / "runs" / key / "metrics.json"
    assert not started.exists()  # the result records the code now
    other = {**mine, "digest": "0123456789abcdef"}

    def interrupted(code):  # as if stopped after training, before the result was stored
        result.unlink()
        started.parent.mkdir(exist_ok=True)
        if code is None:
            started.unlink(missing_ok=True)
        else:
            started.write_text(json.dumps({"code": code}))
        return metrics.stat().st_mtime_ns

    stamp = interrupted(mine)
    assert main(args) == 0 and metrics.stat().st_mtime_ns == stamp  # its metrics read back
    stamp = interrupted(other)
    assert main([*args, "--reuse-other-code"]) == 0 and metrics.stat().st_mtime_ns == stamp
    # kept, it counts as the code that started it, and says who finished it
    kept = json.loads(result.read_text())
    assert kept["code"] == other and kept["finished_by"] == mine
    stamp = interrupted(other)
    with RunLock(out / "runs" / key):  # another process trains it: refused, nothing moved
        assert main(args) == 2
    assert "another cetnet process is using it" in capsys.readouterr().err
    assert metrics.stat().st_mtime_ns == stamp and not (out / "superseded").exists()
    assert json.loads(started.read_text())["code"] == other  # its record untouched
    assert main(args) == 0
    assert (out / "superseded" / ci.code_tag(other) / "runs" / key / "metrics.json").exists()
    assert metrics.stat().st_mtime_ns != stamp  # trained again
    assert json.loads(result.read_text())["code"] == mine
    interrupted(None)  # a run of a cetnet that did not record its code
    assert main(args) == 0
    assert (out / "superseded" / "unrecorded" / "runs" / key / "metrics.json").exists()


def test_the_cpu_kernel_build_in_use_is_part_of_the_code():
    """The CPU kernel builds (default, avx2, avx512) may round differently in the last bits:
    results of one are other code for another."""
    from cetnet import code_identity as ci
    from cetnet_kernels import build_info, set_cpu_capability

    info = build_info()
    before = ci.code_identity("auto")
    others = [c for c in info["cpu_capabilities_runnable"] if c != before["cpu"]]
    if not info["cpu"] or not others:
        pytest.skip("one CPU kernel build runs here")
    previous = set_cpu_capability(others[0])
    try:
        assert not ci.same_code(before, "auto") and ci.code_tag(ci.code_identity("auto")) != ci.code_tag(before)
        assert ci.code_identity("auto")["digest"] == before["digest"]
    finally:
        set_cpu_capability(previous)
    assert ci.same_code(before, "auto")


def test_the_device_trained_on_is_part_of_the_code(tmp_path, monkeypatch, capsys):
    """A GPU runs other kernels than the CPU (other rounding, other times): with ``device:
    auto`` one --out can hold results of a GPU machine and a CPU one, and the two are other
    code for each other (trained again, the GPU's kept under superseded/ in a folder naming
    it); the report names the device of its results."""
    import torch

    from cetnet import code_identity as ci

    if torch.cuda.is_available():
        pytest.skip("the test plays a GPU's results on a CPU machine")
    assert ci.device_identity("auto") == ci.device_identity("cpu") == {"device": "cpu"}
    assert ci.device_identity("cuda:7") == {"device": "cuda:7 (unavailable)"}
    gpu = {"device": "NVIDIA H200 (sm_90)", "triton": "3.6.0"}
    real = ci.device_identity
    monkeypatch.setattr(ci, "device_identity", lambda device: gpu)
    args = _args(tmp_path, "--keep-checkpoints", rows="dnn", seeds=1)
    assert main(args) == 0
    out = tmp_path / "out"
    on_gpu = json.loads(next((out / "results").glob("*.json")).read_text())["code"]
    assert on_gpu["device"] == gpu["device"] and on_gpu["triton"] == "3.6.0"
    assert "device NVIDIA H200 (sm_90) with Triton 3.6.0" in \
        (tmp_path / "doc" / "RESULTS.md").read_text()
    monkeypatch.setattr(ci, "device_identity", real)
    assert not ci.same_code(on_gpu, "auto")
    assert main(args) == 0
    assert "1 cached result trained by other code" in capsys.readouterr().out
    tag = ci.code_tag(on_gpu)
    assert "NVIDIA_H200" in tag and "triton3.6.0" in tag and tag != ci.code_tag(
        ci.code_identity("auto"))
    assert len(list((out / "superseded" / tag / "results").glob("*.json"))) == 1
    now = json.loads(next((out / "results").glob("*.json")).read_text())["code"]
    assert now["device"] == "cpu" and "triton" not in now
    assert ci.same_code(now, "auto") and ci.same_code(now, "cpu")
    assert not ci.same_code({k: v for k, v in now.items() if k != "device"}, "cpu")


def test_the_plugins_loaded_are_part_of_the_code(tmp_path, monkeypatch):
    """A dataset or model a plugin registers trains by the plugin's code: results of another
    version of it are other code (a module, or every file of a package)."""
    from cetnet import code_identity as ci
    from cetnet.train import builders

    monkeypatch.setattr(builders, "LOADED_PLUGINS", [])
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_members.py").write_text('"""Doc."""\nSCALE = 1\n')
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "layers.py").write_text("WIDTH = 8\n")
    plain = ci.code_identity("cpu")["digest"]

    def digest() -> str:
        ci._fixed_identity.cache_clear()  # (read once per process otherwise)
        return ci.code_identity("cpu")["digest"]

    builders.load_plugins(["my_members", "my_pkg"])
    assert builders.LOADED_PLUGINS == ["my_members", "my_pkg"]
    with_plugins = digest()
    assert with_plugins != plain
    (tmp_path / "my_members.py").write_text('"""Other words."""\nSCALE = 1  # why\n')
    assert digest() == with_plugins  # prose
    (tmp_path / "my_pkg" / "layers.py").write_text("WIDTH = 16\n")
    changed = digest()
    assert changed != with_plugins  # a file of the package's
    (tmp_path / "my_pkg" / ".#layers.py").symlink_to("root@host.1234")  # an editor's lock
    assert digest() == changed  # (a dangling link: FileNotFoundError before)
    ci._fixed_identity.cache_clear()


def test_code_digest_ignores_prose_not_code(tmp_path):
    from cetnet.code_identity import source_digest

    module = tmp_path / "m.py"
    module.write_text('"""Doc."""\n\ndef f(x):\n    """Adds one."""\n    return x + 1  # why\n')
    before = source_digest([("m.py", module)])
    module.write_text('"""Other words."""\n\ndef f(x):\n    # a comment\n    return x + 1\n')
    assert source_digest([("m.py", module)]) == before
    module.write_text('"""Doc."""\n\ndef f(x):\n    return x + 2\n')
    assert source_digest([("m.py", module)]) != before
    native = tmp_path / "k.cu"
    native.write_text("int a;")
    assert source_digest([("k.cu", native), ("m.py", module)]) == \
        source_digest([("m.py", module), ("k.cu", native)])


def test_report_has_plots(tmp_path):
    args = [a for a in _args(tmp_path, rows="dnn", seeds=1) if a != "--no-plots"]
    assert main(args) == 0
    assert (tmp_path / "doc" / "results" / "test_auc_by_row.png").stat().st_size > 1000


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(_args(tmp_path, "--resume")) == 2  # nothing to resume yet
    assert main(_args(tmp_path, "--split", "user_time")) == 2  # a MovieLens option
    assert main(_args(tmp_path, rows="dnn,nope")) == 2
    assert main([*_args(tmp_path)[:-len(TINY)], "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err or "no results" in err
    assert "unknown row" in err and "movielens" in err


def test_parser_exposes_the_options():
    ns = build_parser().parse_args(["--seeds", "3", "--rows", "dnn", "--split", "random"])
    assert (ns.seeds, ns.rows, ns.split, ns.grid, ns.dataset) == (
        3, "dnn", "random", "small", "movielens-100k")


def test_set_is_cumulative_in_reproduce_and_search_as_in_train():
    # a second --set replaced the first silently
    from cetnet.search.__main__ import build_parser as search_parser

    argv = ["--set", "data.num_rows=3000", "--set", "train.max_steps_per_epoch=5", "train.lr=1"]
    expected = ["data.num_rows=3000", "train.max_steps_per_epoch=5", "train.lr=1"]
    assert build_parser().parse_args(argv).overrides == expected
    assert search_parser().parse_args(argv).overrides == expected
    assert "train and compare the rows over seeds with equal data" in \
        build_parser().format_help().replace("\n", " ").lower().replace("  ", " ")


def _study_args(tmp_path, study, *extra):
    return ["--dataset", "synthetic", "--study", study, "--seeds", "2", "--grid", "none",
            "--out", str(tmp_path / "out"), "--report", str(tmp_path / "doc" / "STUDY.md"),
            "--set", *TINY, *extra]


def test_scaling_study_reports_members_and_abundance(tmp_path):
    assert main(_study_args(tmp_path, "scaling", "--archs", "dnn", "--ks", "1,2")) == 0
    report = (tmp_path / "doc" / "STUDY.md").read_text()
    # K = 1 once, then 2 tables x 3 methods at K = 2
    for row in ("| dnn | 1 | separate | single |", "| dnn | 2 | separate | naive |",
                "| dnn | 2 | shared | cetnet |", "| dnn | 2 | shared | kdef |"):
        assert row in report, row
    # plots are named after the report (STUDY.md: study_*; RESULTS-scaling.md: scaling_*)
    assert (tmp_path / "doc" / "results" / "study_dnn.png").stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    shared = data["summary"]["dnn_k2_shared_naive"]
    separate = data["summary"]["dnn_k2_separate_naive"]
    assert list(shared["abundance"]) == ["shared"]  # one set feeds both members
    assert list(separate["abundance"]) == ["dnn", "dnn_1"]
    assert all(1.0 <= v <= 4.0 for v in separate["abundance"]["dnn"])  # dim 4 tables
    assert separate["embedding_parameters"] == 2 * shared["embedding_parameters"]


def test_embedding_size_study_pairs_cetnet_with_larger_multi_embedding(tmp_path):
    assert main(_study_args(tmp_path, "embedding-size", "--dims", "4,8")) == 0
    report = (tmp_path / "doc" / "STUDY.md").read_text()
    assert "| cetnet | 4 |" in report and "| multi_embedding | 8 |" in report
    for a, b in (("cetnet_d4", "multi_embedding_d4"), ("cetnet_d4", "multi_embedding_d8"),
                 ("cetnet_d8", "multi_embedding_d8")):
        assert f"| {a} | {b} |" in report
    assert "| cetnet_d8 | multi_embedding_d4 |" not in report
    assert "| ΔAUC | verdict | Δvalid AUC | n |" in report
    assert (tmp_path / "doc" / "results" /
            "study_auc_vs_embedding_parameters.png").stat().st_size > 1000


def test_study_options_are_checked(tmp_path, capsys):
    assert main(_study_args(tmp_path, "scaling", "--ks", "0,2")) == 2
    assert main(_study_args(tmp_path, "scaling", "--archs", "dnn,mlp")) == 2
    assert main(_study_args(tmp_path, "embedding-size", "--dims", "x")) == 2
    err = capsys.readouterr().err
    assert "--ks" in err and "--archs" in err and "--dims" in err


def test_information_abundance():
    import torch

    from cetnet.metrics import information_abundance

    assert information_abundance(torch.eye(5)) == pytest.approx(5.0)
    assert information_abundance(torch.ones(7, 3)) == pytest.approx(1.0)  # collapsed
    padded = torch.cat([torch.zeros(1, 4), torch.randn(50, 4, dtype=torch.float64)])
    assert information_abundance(padded) == pytest.approx(information_abundance(padded[1:]))
    assert math.isnan(information_abundance(torch.zeros(3, 3)))
    assert math.isnan(information_abundance(torch.tensor([[1.0, float("nan")]])))
    with pytest.raises(ValueError, match="matrix"):
        information_abundance(torch.ones(3))


def test_abundance_leaves_the_padding_row_out(base, schema):
    import torch

    from cetnet.metrics import information_abundance
    from cetnet.models.build import build_model

    model = build_model(row_config(base, "naive")["model"], schema)
    emb = model.embedding
    name = emb.features[0].name
    with torch.no_grad():
        emb.table(0, name)[0] = 1e6  # the padding row (id 0): never read
    got = model.information_abundance()
    assert list(got) == model.member_names
    assert got[model.member_names[0]][name] == pytest.approx(
        information_abundance(emb.table(0, name)[1:]))


def test_fuxictr_peer_row_is_trained_by_fuxictr_and_compared(tmp_path, capsys, monkeypatch):
    from cetnet.reproduce.peers import INSTALL_HINT, fuxictr_available

    if not fuxictr_available():
        pytest.skip(f"fuxictr is not installed ({INSTALL_HINT})")
    assert main(_args(tmp_path, rows="dnn,fuxictr_dnn")) == 0
    said = capsys.readouterr().out
    # cetnet's count of the peer's config is not FuxiCTR's model: not printed as its count
    assert "fuxictr_dnn: parameters counted by its trainer as it trains" in said
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    peer = data["summary"]["fuxictr_dnn"]
    assert peer["seeds"] == [0, 1] and list(peer["members"]) == ["fuxictr_dnn"]
    assert peer["num_parameters"] != data["summary"]["dnn"]["num_parameters"]  # its own model
    report = (tmp_path / "doc" / "RESULTS.md").read_text()
    assert "| dnn | fuxictr_dnn | cetnet's dnn vs FuxiCTR's (the peer) |" in report
    # the same config under another trainer is another cache entry
    keys = {p.stem for p in (tmp_path / "out" / "results").glob("*.json")}
    assert len(keys) == 4
    # a peer's result names FuxiCTR's version: another version's is other code (cetnet's
    # rows are not FuxiCTR's, another version leaves them be)
    from cetnet import code_identity as ci

    codes = {json.loads(p.read_text())["row"]: json.loads(p.read_text())["code"]
             for p in (tmp_path / "out" / "results").glob("*.json")}
    assert codes["fuxictr_dnn"]["fuxictr"] == "2.3.10" and "fuxictr" not in codes["dnn"]
    # one build of cetnet, the peer's FuxiCTR apart (not "2 builds": nothing was reused)
    assert "- trained by: cetnet " in report and "(all 4 results)" in report
    assert "- peer rows trained by FuxiCTR 2.3.10 (2 results)" in report
    assert "**trained by" not in report
    monkeypatch.setattr(ci, "fuxictr_identity", lambda: {"fuxictr": "2.4.0"})
    assert main([*_args(tmp_path, rows="dnn,fuxictr_dnn"), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "2 cached results trained by other code" in said and "FuxiCTR 2.3.10: 2" in said
    assert said.count(": to train (") == 2  # the peer's two seeds, not cetnet's dnn


def test_scaled_single_widens_the_best_single_row_even_when_not_a_member(base, monkeypatch):
    """auto: the best single architecture by mean validation AUC among the study's single
    rows (a DCNv2 better alone than DHEN or InterFormer is what a user would widen); the
    members when the study has no single row."""
    valid = {"dnn": 0.70, "dcnv2": 0.74, "dhen": 0.72, "interformer": 0.71}
    base = {**base, "model": {**base["model"], "members": ["dhen", "interformer"]}}

    def arch(rows):
        experiment = ex.Experiment(base, rows, [0, 1], "none", "/tmp/unused",
                                   log=lambda m: None)
        monkeypatch.setattr(experiment, "chosen", lambda row, seed: {
            "metrics": {"valid": {"fused": {"auc": valid[row] + 0.001 * seed}}}})
        return experiment._scaled_arch()

    assert arch(["dnn", "dcnv2", "dhen", "interformer", "scaled_single", "cetnet"]) == "dcnv2"
    assert arch(["dnn", "dhen", "scaled_single"]) == "dhen"
    assert arch(["scaled_single", "cetnet"]) == "dhen"  # no single row: of the members


def test_scaled_single_runs_after_the_single_rows_but_otherwise_in_place(base):
    def order(rows):
        return ex.Experiment(base, rows, [0], "none", "/tmp/unused", log=lambda m: None) \
            .run_order()

    assert order(["scaled_single", "dnn", "cetnet", "dcnv2", "naive"]) == [
        "dnn", "cetnet", "dcnv2", "scaled_single", "naive"]
    assert order(["dnn", "scaled_single", "cetnet", "kdef"]) == [
        "dnn", "scaled_single", "cetnet", "kdef"]
    assert order(["cetnet", "scaled_single"]) == ["cetnet", "scaled_single"]


def test_scaled_single_without_single_rows_reads_the_members_from_the_cache(tmp_path, capsys):
    # the members trained alone are not in the study: their jobs were looked up among the
    # study's rows (a KeyError traceback); now they are read from the cache, of which an
    # earlier run with the single rows leaves some
    assert main(_args(tmp_path, rows="dnn", seeds=1)) == 0
    assert main(_args(tmp_path, "--dry-run", rows="cetnet,scaled_single", seeds=1)) == 0
    out = capsys.readouterr()
    assert "scaled_single: dnn at embedding dim" in out.out + out.err


def test_rows_of_a_base_with_one_embedding_dim_per_member(schema):
    # the packaged default gives [8, 32, 8] for dnn, dcnv2, dnn: a row of other members takes
    # each member's dim by kind (the first member's for a kind the base lacks), a shared
    # embedding its first member's
    base = ex.base_config("synthetic", overrides=TINY[:1])
    base["model"] = {**base["model"], "members": ["dnn", "dcnv2", "dnn"],
                     "embedding_dim": [4, 12, 4]}
    dims = {row: row_config(base, row)["model"]["embedding_dim"]
            for row in ROW_NAMES if row != "scaled_single"}
    assert dims["dnn"] == 4 and dims["dcnv2"] == 12 and dims["dhen"] == 4
    assert dims["kdef_shared"] == 4 and dims["cetnet"] == dims["naive"] == [4, 12, 4]
    assert dims["kdef"] == [4, 12, 4] and dims["multi_embedding"] == [4, 12, 4]
    for row in dims:
        check_model(row_config(base, row), schema)
    assert scaled_single_model(base, schema, "dcnv2")["dim"] >= 12
    from cetnet.reproduce.studies import scaling_rows
    for row in scaling_rows(["dcnv2"], [1, 2]):
        cfg = row_config(base, row)
        check_model(cfg, schema)
        assert cfg["model"]["embedding_dim"] in (12, [12, 12])
    # dims that build are kept as given (and so are the rows' cache keys)
    base["model"] = {**base["model"], "members": ["dnn", "dcnv2"], "embedding_dim": [8, 8]}
    assert row_config(base, "kdef_shared")["model"]["embedding_dim"] == [8, 8]
    base["model"] = {**base["model"], "members": ["dnn"], "embedding_dim": [8]}
    assert row_config(base, "dcnv2")["model"]["embedding_dim"] == [8]


def test_a_metric_stored_as_null_reads_as_nan():
    """metrics.json stores a NaN as null: the gAUC of data without groups, read back from a
    reused run, crashed the reports (float(None)); it is a non-finite value like NaN."""
    import math

    from cetnet.reproduce.stats import mean_std, paired_difference

    assert all(math.isnan(x) for x in mean_std([None, None]))
    d = paired_difference({0: None, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert d.nonfinite == [0] and d.seeds == [1, 2]
