"""`make gpu-check` (bench/gpu_check.py) and its report (bench/render_gpu.py), on the CPU: the
no-GPU exit, the exception probe, skip reasons from junit XML, and the rendered tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from render_gpu import render  # noqa: E402


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_2_at_once_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines == [lines[0]] and "no CUDA GPU" in lines[0]


def test_exception_probe(tmp_path):
    step = gpu_check.exception_probe(tmp_path, _env())
    assert step["rc"] == 0, step
    assert "ValueError" in step["summary"]


def test_exception_probe_reports_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_PROBE",
                        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # no debugger run
    monkeypatch.setattr(gpu_check, "_CONTROLS", {"torch": gpu_check._CONTROLS["torch"]})
    step = gpu_check.exception_probe(tmp_path, _env())
    assert step["rc"] == -11 and "signal 11" in step["summary"] and step["diagnose"]
    log = (tmp_path / "exception-probe.log").read_text()
    assert re.search(r"eh_frame_hdr: [1-9]", log)  # the toolchain facts at once
    assert "control torch" not in log  # the slow diagnostics later, if time allows
    diag = gpu_check.probe_diagnostics(tmp_path, _env())
    assert diag["summary"].startswith("control torch: ok")
    assert "control torch: ok" in (tmp_path / "exception-probe.log").read_text()
    past = gpu_check.probe_diagnostics(tmp_path, _env(), deadline=time.monotonic())
    assert past["summary"] == "control torch: not run (no time left)"


def test_a_control_past_its_limit_is_killed_and_said(monkeypatch):
    monkeypatch.setattr(gpu_check, "_CONTROLS", {
        "hang": ("import subprocess, sys, time\n"
                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                 "time.sleep(60)", {}, 2)})
    t0 = time.monotonic()
    lines = gpu_check.crash_controls(_env())
    assert time.monotonic() - t0 < 30  # the grandchild did not hold the pipes open either
    assert lines == [lines[0]] and "control hang: did not finish" in lines[0], lines
    assert "killed after 2 s" in lines[0]


def test_crash_controls_pass_where_exceptions_work():
    # The three control experiments for real (one builds a small extension with torch's
    # cpp_extension): on this machine C++ exceptions reach Python, so each must say ok, not
    # crash or fail, else a GPU run's verdicts could not be trusted either.
    lines = gpu_check.crash_controls(_env())
    assert [ln.split(":")[0] for ln in lines] == [f"control {n}" for n in gpu_check._CONTROLS]
    assert all(ln.split(": ")[1].startswith("ok in ") for ln in lines), lines


def test_skip_reasons_from_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase name="a"><skipped message="needs two GPUs"/></testcase>'
        '<testcase name="b"><skipped message="needs two GPUs"/></testcase>'
        '<testcase name="c"><skipped message="no expecttest"/></testcase>'
        '<testcase name="d"/></testsuite></testsuites>')
    assert gpu_check.skip_reasons(xml) == {"needs two GPUs": 2, "no expecttest": 1}
    assert gpu_check.skip_reasons(tmp_path / "missing.xml") == {}


def test_pytest_summary():
    tail = "....\nFAILED x\n==== 2 failed, 580 passed, 8 skipped in 122.56s ====\n"
    assert gpu_check.pytest_summary(tail) == "2 failed, 580 passed, 8 skipped in 122.56s"
    assert gpu_check.pytest_summary("killed") == "no summary line"
    # a killed -v run: a test's own line is never taken for the closing one
    assert gpu_check.pytest_summary("[gw1] [ 9%] PASSED tests/a.py::t[failed in 2 s]\n"
                                    "tests/a.py::u[skipped in 1 s] PASSED [ 9%]\n") \
        == "no summary line"


def _bench(kind: str, providers: dict, **extra) -> dict:
    return {"extra_info": {"kind": kind, "providers": {p: {"median_s": t}
                                                       for p, t in providers.items()}, **extra}}


def test_render_tables_and_ratios():
    info = {"device": "NVIDIA H200", "capability": "9.0", "cpus": 16, "date": "d",
            "torch": "2.11", "cuda": "13.0", "triton": "3.6", "python": "3.12", "total_s": 9,
            "steps": [{"name": "build", "rc": 0, "seconds": 40},
                      {"name": "tests", "rc": 1, "seconds": 99, "summary": "1 failed",
                       "skip_reasons": {"needs two GPUs": 2}}]}
    emb = dict(M=2, F=26, D=64, rows=10 ** 6, B=65536, hottest_share=0.05)
    L = 2 * 26 * 65536
    bench = {"benchmarks": [
        _bench("fusion", {"copy": 4e-5, "kernels-cuda": 5e-5}, op="collaborative_loss", K=4,
               B=4194304, bytes=160 << 20),
        _bench("fusion", {"copy": 4e-5, "kernels-cuda": 8e-5}, op="collaborative_loss", K=4,
               B=4194304, tau=0.7, bytes=160 << 20),
        _bench("embedding", {"copy": 4e-4, "cetnet-cuda": 8e-4}, ids="uniform", mode="forward",
               bytes=2 * L * 256, **emb),
        _bench("embedding", {"copy": 1e-3, "cetnet-cuda": 2e-3}, ids="uniform", mode="sgd",
               bytes=5 * L * 256, **emb),
        _bench("embedding", {"copy": 1e-3, "cetnet-cuda": 3e-3}, ids="zipf", mode="sgd",
               bytes=5 * L * 256, **emb),
        _bench("embedding", {"copy": 2e-3, "cetnet-cuda": 5e-3}, ids="bags", mode="forward",
               bytes=9 * L * 256, **emb),
    ]}
    md = render(info, bench)
    assert "**NVIDIA H200**" in md and "| tests | FAILED (1) | 99 | 1 failed |" in md
    assert "2 × needs two GPUs" in md
    assert "| collaborative_loss | 4 | 4,194,304 | 1 |" in md and "0.05 (80%)" in md
    assert "| collaborative_loss | 4 | 4,194,304 | 0.7 |" in md and "0.08 (50%)" in md
    assert md.index("| 4,194,304 | 1 |") < md.index("| 4,194,304 | 0.7 |")
    assert "| uniform | forward | 65,536 | 5.0% |" in md and "0.8 (50%)" in md
    assert "sgd cetnet-cuda 1.50x" in md  # Zipf / uniform
    assert "| bags | forward | 65,536 | 5.0% |" in md and "5 (40%)" in md
    # backward alone: (2 - 0.8) ms for 3 L D 4 bytes against the sgd copy bandwidth
    assert "| uniform | sgd | 65,536 | cetnet-cuda | 1.2 |" in md
    assert "No benchmark results" in render(info, None)
    # the targets: each provider's worst case (fusion at the largest B and tau 1 only)
    assert "4 of 4 met" not in md and "## Targets" in md
    assert "| fusion ops ≥ 70% of copy at B = 4,194,304 | kernels-cuda | 80% " \
        "(collaborative_loss) | yes |" in md
    assert "| embedding forward ≥ 60% of copy | cetnet-cuda | 50% (uniform) | **no** |" in md
    assert "| Zipf ids ≤ 1.5x the time of uniform | cetnet-cuda | 1.50x (sgd) | yes |" in md
    assert md.index("## Targets") < md.index("## Fusion ops")


def test_test_outcomes_from_verbose_lines():
    # xdist's and plain pytest's -v lines, a crashed worker's test, and the -ra summary's
    # repeat of a failure: each test once, its last outcome
    # ids with spaces (parametrized by messages) stay whole, so siblings don't overwrite
    # each other; a file that failed to collect counts as an error
    bad = "tests/kernels/test_bad_input.py::test_bad_logits[logits0-ValueError-logits must be"
    log = ("[gw0] [  1%] PASSED tests/kernels/test_a.py::test_x[cuda-fp32]\n"
           "[gw1] [  2%] FAILED tests/kernels/test_a.py::test_y\n"
           "tests/kernels/test_b.py::test_z SKIPPED (needs two GPUs)     [  3%]\n"
           "[gw2] node down: Not properly terminated\n"
           "[gw2] [  4%] FAILED tests/kernels/test_b.py::test_crash \n"
           f"[gw3] [  5%] PASSED {bad} 2-D-reference-cuda]\n"
           f"[gw4] [  6%] FAILED {bad} 2-D-cuda-cuda]\n"
           f"{bad} 2-D-triton-cuda] PASSED                  [  7%]\n"
           "FAILED tests/kernels/test_a.py::test_y - AssertionError: x\n"
           "ERROR tests/kernels/test_c.py - ImportError: no module\n")
    outcomes = gpu_check.test_outcomes(log)
    assert outcomes == {"tests/kernels/test_a.py::test_x[cuda-fp32]": "PASSED",
                        "tests/kernels/test_a.py::test_y": "FAILED",
                        "tests/kernels/test_b.py::test_z": "SKIPPED",
                        "tests/kernels/test_b.py::test_crash": "FAILED",
                        f"{bad} 2-D-reference-cuda]": "PASSED",
                        f"{bad} 2-D-cuda-cuda]": "FAILED",
                        f"{bad} 2-D-triton-cuda]": "PASSED",
                        "tests/kernels/test_c.py": "ERROR"}
    assert gpu_check.outcomes_summary(outcomes) == "3 failed, 1 error, 3 passed, 1 skipped"
    assert gpu_check.outcomes_summary({}) == "no test finished"


def test_render_lists_failed_tests():
    from render_gpu import render_steps

    info = {"steps": [{"name": "tests", "rc": 1, "seconds": 9, "summary": "1 failed",
                       "failed": ["tests/a.py::t"]}]}
    text = "\n".join(render_steps(info))
    assert "Failed tests (1):" in text and "- `tests/a.py::t`" in text
    assert "Failed tests" not in "\n".join(render_steps({"steps": [{"name": "b", "rc": 0,
                                                                       "seconds": 1}]}))


# Excerpt of a real `ncu` details report (H200, 2026-11-29), trimmed to the rows parsed.
_NCU_TEXT = """\
==PROF== Profiling "fusion_forward_kernel": 0%....50%....100% - 17 passes
  void cetnet::<unnamed>::fusion_forward_kernel<float, float, 1>(cetnet::<unnamed>::TileIO<T1, \
T1>, cetnet::<unnamed>::TauRef, bool, T1 *) (528, 1, 1)x(256, 1, 1), Context 1, Stream 7, \
Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %        28.11
    Duration                         us        94.21
    Compute (SM) Throughput           %        73.07
    Section: Scheduler Statistics
    Issued Warp Per Scheduler                        0.78
    Registers Per Thread             register/thread              64
    Achieved Occupancy                        %        41.96
  _collaborative_loss_kernel (16384, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    DRAM Throughput                   %        13.43
    Duration                         ms         1.25
    Elapsed Cycles                cycle      214,289
"""


def test_ncu_rows_and_table():
    from render_gpu import render_ncu

    rows = gpu_check.ncu_rows(_NCU_TEXT)
    assert rows == [
        {"kernel": "fusion_forward_kernel", "backend": "cuda", "dram_pct": 28.11, "us": 94.21,
         "sm_pct": 73.07, "issued": 0.78, "registers": 64.0, "occupancy_pct": 41.96},
        # a duration in ms is given in microseconds; metrics not profiled are absent
        {"kernel": "_collaborative_loss_kernel", "backend": "triton", "dram_pct": 13.43,
         "us": 1250.0}]
    table = "\n".join(render_ncu(rows))
    assert "| fusion_forward_kernel | cuda | 94.2 | 28.1 | 73.1 | 0.78 | 64 | 42.0 |" in table
    assert "| _collaborative_loss_kernel | triton | 1250.0 | 13.4 | – | – | – | – |" in table
    assert render_ncu([]) == [] and gpu_check.ncu_rows("no report") == []


def test_nvcc_split_compile_probe(tmp_path):
    # gpu-check asks nvcc whether it has --split-compile before it sets the build knob
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho '--split-compile <number>   (-split-compile)'\n")
    nvcc.chmod(0o755)
    assert gpu_check.nvcc_splits({"CUDA_HOME": str(tmp_path / "cuda")})
    # the nvcc torch's build runs: CUDA_PATH when CUDA_HOME is unset, PYTORCH_NVCC first
    assert gpu_check.nvcc_splits({"CUDA_PATH": str(tmp_path / "cuda")})
    old = tmp_path / "old" / "bin" / "nvcc"
    old.parent.mkdir(parents=True)
    old.write_text("#!/bin/sh\necho 'an older nvcc'\n")
    old.chmod(0o755)
    assert not gpu_check.nvcc_splits({"CUDA_PATH": str(tmp_path / "old"),
                                      "PATH": str(nvcc.parent)})
    assert not gpu_check.nvcc_splits({"PYTORCH_NVCC": str(old),
                                      "CUDA_HOME": str(tmp_path / "cuda")})
    assert gpu_check.build_nvcc({"PYTORCH_NVCC": "ccache nvcc"}) == ["ccache", "nvcc"]
    assert not gpu_check.nvcc_splits({"CUDA_HOME": str(tmp_path / "old")})
    assert not gpu_check.nvcc_splits({"CUDA_HOME": str(tmp_path / "none")})


def test_xdist_args(monkeypatch):
    import importlib.metadata

    def version_is(v):
        def version(name):
            if v is None:
                raise importlib.metadata.PackageNotFoundError(name)
            assert name == "pytest-xdist"
            return v
        return version

    monkeypatch.setattr(importlib.metadata, "version", version_is(None))
    assert gpu_check.xdist_args(16) == []
    monkeypatch.setattr(importlib.metadata, "version", version_is("3.1.0"))
    assert gpu_check.xdist_args(64) == ["-n", "16"]
    monkeypatch.setattr(importlib.metadata, "version", version_is("3.8.0"))
    assert gpu_check.xdist_args(2) == ["-n", "2", "--dist", "worksteal"]
    monkeypatch.setattr(importlib.metadata, "version", version_is("10.0.1rc1"))
    assert gpu_check.xdist_args(0) == ["-n", "1", "--dist", "worksteal"]


def test_render_training_step():
    info = {"device": "NVIDIA H200", "steps": []}
    bench = {"benchmarks": [_bench("train", {"cetnet-cuda": 0.01, "cetnet-triton": 0.0125},
                                   config="bars_criteo_x1", B=4096, rows=10 ** 6,
                                   skipped={"x": "why"})]}
    md = render(info, bench)
    assert "## A whole training step" in md
    assert "| cetnet-cuda | 10 | 409,600 | 1.00x |" in md
    assert "| cetnet-triton | 12.5 | 327,680 | 1.25x |" in md
    assert "- x skipped: why" in md


def test_the_timed_training_step_trains_the_packaged_criteo_model():
    """bench_gpu_train_step's step, on the CPU: the packaged Criteo_x1 model, whose embedding
    moves in backward (fused row-wise Adagrad) and whose dense layers move in Adam's step."""
    from train_step import criteo_config, train_step

    assert criteo_config()["model"]["members"] == ["dnn", "dcnv2"]
    model, step = train_step("auto", "cpu", rows=50, batch_size=64)
    table = next(p for n, p in model.named_parameters() if "embedding" in n)
    dense = list(model.dense_parameters())
    before = table.detach().clone(), [p.detach().clone() for p in dense]
    losses = [float(step()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(table, before[0])
    assert all(not torch.equal(p, q) for p, q in zip(dense, before[1]) if p.grad is not None)


def test_clock_cuts_each_step_to_the_hard_limit(monkeypatch):
    clock = gpu_check.Clock(budget=480, hard=570)
    monkeypatch.setattr(gpu_check, "T0", time.monotonic() - 500)  # 500 s into the check
    assert clock.budget_left() == pytest.approx(-20, abs=1)
    assert clock.limit(300) == pytest.approx(570 - 500 - gpu_check.REPORT_RESERVE_S, abs=1)
    assert clock.limit(5) == 5


def test_report_is_written_and_packed_after_each_step(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "device-out" / "gpu-check.tgz"
    out.mkdir()
    (out / "build.log").write_text("built")
    (out / "bench-fusion.json").write_text('{"benchmarks": [{"extra_info": {"kind": "train", '
                                          '"config": "c", "B": 8, "rows": 9, "providers": '
                                          '{"cetnet-cuda": {"median_s": 0.5}}}}]}')
    (out / "bench-embedding.json").write_text('{"benchm')  # killed while writing: left out
    info = {"device": "NVIDIA H200"}
    steps = [{"name": "build", "rc": 0, "seconds": 1.0, "tail": "x"}]
    md = gpu_check.write_report(info, steps, out, archive)
    assert "| build | ok | 1.0 |" in md and "| cetnet-cuda | 500 | 16 | 1.00x |" in md
    assert (archive.parent / "GPU_RESULTS.md").read_text() == md
    assert json.loads((archive.parent / "gpu_check.json").read_text())["steps"][0]["name"] == \
        "build"
    import tarfile

    with tarfile.open(archive) as tar:
        assert {"./build.log", "./gpu_check.json", "./GPU_RESULTS.md"} <= set(tar.getnames())
    assert sorted(p.name for p in archive.parent.iterdir()) == [
        "GPU_RESULTS.md", "gpu-check.tgz", "gpu_check.json"]  # three files for the device
    assert gpu_check.merged_benchmarks(tmp_path) is None


def test_the_whole_check_runs_through_on_a_faked_gpu(tmp_path, monkeypatch):
    """gpu_check.main end to end with torch told there is a GPU (the steps' subprocesses know
    better: the benchmarks skip, `pytest -m gpu` selects only the CPU-ISA tests): every step's
    bookkeeping, the per-step report and the archive for the device's $OUT, no exception."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Faked H200")
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    results = tmp_path / "GPU_RESULTS.md"
    (tmp_path / "gc").mkdir()
    (tmp_path / "gc" / "bench-train.jsonl").write_text(  # an earlier run's: never reported
        '{"name": "old", "extra_info": {"kind": "train", "config": "stale", "B": 1, '
        '"rows": 1, "providers": {"cetnet-cuda": {"median_s": 1.0}}}}\n')
    assert gpu_check.main(["--out", str(tmp_path / "gc"), "--archive",
                           str(tmp_path / "gc" / "a.tgz")]) == 2  # it would pack itself
    rc = gpu_check.main(["--skip-build", "--skip-sanitizers", "--out", str(tmp_path / "gc"),
                         "--results", str(results)])
    assert rc == 1  # the bench groups ran no benchmark (pytest exit 5)
    info = json.loads((tmp_path / "device-out" / "gpu_check.json").read_text())
    names = [s["name"] for s in info["steps"]]
    assert names == ["exception-probe", "bench-fusion", "bench-embedding", "bench-train",
                     "tests", "ncu"], names
    by = {s["name"]: s for s in info["steps"]}
    assert by["exception-probe"]["rc"] == 0 and by["tests"]["rc"] == 0
    assert "passed" in by["tests"]["summary"]
    md = results.read_text()
    assert "**Faked H200**" in md and md == (tmp_path / "device-out" / "GPU_RESULTS.md").read_text()
    assert "stale" not in md and not (tmp_path / "gc" / "bench-train.jsonl").exists()


def test_a_bench_group_stopped_early_keeps_what_it_finished(tmp_path):
    """bench-<group>.json when pytest wrote it, else the .jsonl lines bench_gpu.py appends per
    finished benchmark (the last one possibly cut short); failed providers are named."""
    line = ('{"name": "embedding-uniform-forward", "extra_info": {"kind": "embedding", '
            '"ids": "uniform", "mode": "forward", "skipped": {"cetnet-triton": "failed: '
            'CompilationError: x"}, "providers": {}}}')
    (tmp_path / "bench-embedding.jsonl").write_text(line + "\n" + line[:30])
    benches = gpu_check.group_benchmarks(tmp_path, "embedding")
    assert len(benches) == 1
    assert gpu_check.failed_providers(benches) == ["cetnet-triton in embedding-uniform-forward"]
    assert gpu_check.group_benchmarks(tmp_path, "fusion") is None
    (tmp_path / "bench-fusion.json").write_text('{"benchmarks": []}')
    assert gpu_check.merged_benchmarks(tmp_path) == {"benchmarks": benches}


def test_render_names_the_providers_that_failed():
    bench = {"benchmarks": [_bench("fusion", {"copy": 4e-5, "kernels-cuda": 5e-5},
                                   op="kdef_loss", K=4, B=1024, bytes=1 << 20,
                                   skipped={"kernels-triton": "failed: OutOfMemoryError: oom",
                                            "eager": "not asked for"})]}
    md = render({"device": "d", "steps": []}, bench)
    assert "Not timed:" in md and "- **kernels-triton failed** in kdef_loss-4-1024: " \
        "OutOfMemoryError: oom" in md
    assert "not asked for" not in md


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_gpu_smoke_runs_on_the_cpu_backends(backend):
    """tests/kernels/gpu_smoke.py (what compute-sanitizer runs on a GPU) on CPU tensors, so a
    change of the API it calls shows here and not in the one GPU run."""
    from cetnet_kernels import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} not available on the CPU here")
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    import gpu_smoke

    gpu_smoke.fusion(backend, "cpu")
    gpu_smoke.embedding(backend, "cpu")


def test_bench_timer_notes_a_failing_provider_and_records_each_benchmark(monkeypatch, tmp_path):
    """bench_gpu.EventTimer / _run on the CPU, CUDA events faked by a wall clock: a provider
    whose warm-up raises is a 'failed: ...' note, the others are timed; every finished
    benchmark is appended to $CETNET_BENCH_JSONL; the steps (their tables) are dropped."""
    import importlib

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Faked H200")
    monkeypatch.setenv("CETNET_BENCH_TARGET_S", "0.01")
    monkeypatch.setenv("CETNET_BENCH_JSONL", str(tmp_path / "g.jsonl"))
    bench_gpu = importlib.import_module("bench_gpu")

    class Benchmark:  # what _run uses of pytest-benchmark's fixture
        def __init__(self):
            self.group, self.extra_info = None, {}

        def pedantic(self, fn, rounds, iterations, warmup_rounds):
            for _ in range(rounds):
                fn()

    def broken():
        raise RuntimeError("no kernel image")

    x = torch.ones(1000)
    steps = {"ok": lambda: x.mul_(1.0), "broken": broken}
    skipped = {"other": "not built"}
    bench = Benchmark()
    bench_gpu._run(bench, steps, skipped, "g1", {"kind": "fusion", "op": "x"})
    assert steps == {}
    assert skipped == {"other": "not built",
                       "broken": "failed: RuntimeError: no kernel image"}
    assert set(bench.extra_info["providers"]) == {"ok"}
    line = json.loads((tmp_path / "g.jsonl").read_text())
    assert line["name"] == "g1" and line["extra_info"]["skipped"]["broken"].startswith("failed")
    with pytest.raises(RuntimeError, match="every provider failed"):
        bench_gpu._run(Benchmark(), {"broken": broken}, {}, "g2", {})


def test_a_step_left_without_time_fails_the_check(tmp_path, monkeypatch):
    """Steps the hard limit leaves no time for are 'no time' rows and fail the check (the
    tests not run is not a pass); the report is still written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Faked H200")
    monkeypatch.delenv("OUT", raising=False)
    rc = gpu_check.main(["--skip-build", "--hard-limit", "12", "--out", str(tmp_path / "gc"),
                         "--results", str(tmp_path / "r.md")])
    assert rc == 1
    info = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    by = {s["name"]: s for s in info["steps"]}
    assert by["tests"]["rc"] == "no time" and by["bench-fusion"]["rc"] == "no time"
    report = (tmp_path / "r.md").read_text()
    assert "| tests | FAILED (no time) | 0 | not run: no time left" in report
