"""`make gpu-check`: the one command for a machine with an NVIDIA GPU.

Builds the extension with CUDA for the local GPU's arch (all cores), probes that C++ exceptions
reach Python, runs the GPU benchmarks (bench/bench_gpu.py), compute-sanitizer memcheck and
racecheck on a small smoke script when compute-sanitizer is on the PATH, then every CUDA and
Triton test (``pytest -m gpu``, in parallel when pytest-xdist is there), and Nsight Compute over
the fusion kernels when ``ncu`` is there (bench/profile_fusion.py: issue rate against DRAM
throughput), and writes bench/GPU_RESULTS.md naming the device. Needs torch >= 2.6 with CUDA
and Triton already installed; needs no internet. Prints progress. The whole check has a budget
(``--budget``, 8 minutes: the target on an H200 from a bare checkout, build included): each step
has a time limit so that a hang cannot eat it, the benchmarks come before the tests (a test step
cut short still leaves the numbers), the tests may run past the budget up to ``--hard-limit``
(a complete pass is the check's point), and Nsight Compute runs only in what the budget has
left.

Without a CUDA GPU it exits at once with status 2 and one line. Exit status 1 when a step failed
(the report is still written), 0 when all passed.

Logs, the benchmark JSONs, gpu_check.json and a copy of the report go to ``--out`` (default
``build-gpu-check/``). With ``$OUT`` set (a machine that returns only a few files from
``$OUT``), ``--out`` is also packed into ``$OUT/gpu-check.tgz`` with GPU_RESULTS.md and
gpu_check.json beside it; the report and the archive are rewritten after every step, and no step
runs past ``--hard-limit`` (570 s: that machine stops a command at 600 s), so a run stopped from
outside still leaves what it had.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[gpu-check {time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program (compute-sanitizer, ncu): on the PATH, else in /usr/local/cuda."""
    fallback = Path("/usr/local/cuda/bin") / name
    return shutil.which(name) or (str(fallback) if fallback.exists() else None)


def build_nvcc(env: dict) -> list[str] | None:
    """The nvcc command torch's extension build will run under ``env``: PYTORCH_NVCC as
    given, else CUDA_HOME's or CUDA_PATH's, else the PATH's, else /usr/local/cuda's (the order
    of torch.utils.cpp_extension); None when there is none."""
    if env.get("PYTORCH_NVCC"):
        return shlex.split(env["PYTORCH_NVCC"])
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        nvcc = str(Path(home, "bin", "nvcc"))
    else:
        nvcc = shutil.which("nvcc", path=env.get("PATH")) or "/usr/local/cuda/bin/nvcc"
    return [nvcc] if Path(nvcc).exists() else None


def nvcc_splits(env: dict) -> bool:
    """Whether the build's nvcc (:func:`build_nvcc`) has --split-compile (CUDA 11.8 on)."""
    cmd = build_nvcc(env)
    if cmd is None:
        return False
    try:
        out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--split-compile" in out.stdout


NCU_MIN_S = 30  # the 11-29 H200 profile took 17 s


def xdist_args(cpus: int) -> list[str]:
    """pytest-xdist's options when it is installed: a worker per CPU (at most 16) and, from
    xdist 3.2 on, ``--dist worksteal`` (an idle worker takes queued tests from a busy one, so a
    worker stuck compiling Triton kernels does not hold the end of the run); [] without xdist."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("pytest-xdist")
    except importlib.metadata.PackageNotFoundError:
        return []
    args = ["-n", str(max(1, min(16, cpus)))]
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return args + (["--dist", "worksteal"] if major_minor >= (3, 2) else [])


def run_step(name: str, cmd: list[str], out_dir: Path, timeout: float, env: dict | None = None
             ) -> dict:
    """Runs ``cmd`` with its output teed to ``out_dir/<name>.log``; never raises."""
    log(f"{name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
    path = out_dir / f"{name}.log"
    t0 = time.monotonic()
    killed = threading.Event()
    with open(path, "w") as f:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as exc:  # e.g. a tool found on disk that cannot run here
            f.write(f"[gpu-check] could not start: {exc}\n")
            log(f"{name}: FAILED (could not start: {exc})")
            return {"name": name, "rc": "not started", "seconds": 0.0, "log": path.name,
                    "tail": f"could not start: {exc}", "summary": f"could not start: {exc}"}

        def kill() -> None:  # a hang with no output must not block the read below
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            tail.append(line)
            del tail[:-60]
        proc.wait()
        timer.cancel()
        rc = "timeout" if killed.is_set() else proc.returncode
        if killed.is_set():
            f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
            tail.append(f"[gpu-check] killed after {timeout:.0f} s\n")
    secs = time.monotonic() - t0
    log(f"{name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {secs:.0f} s")
    if rc != 0:
        sys.stdout.write("".join(tail[-25:]))
    return {"name": name, "rc": rc, "seconds": round(secs, 1), "log": path.name,
            "tail": "".join(tail[-40:])}


def pytest_summary(text: str) -> str:
    """pytest's closing line ('== 12 passed, 3 skipped in 4.5s ==') from a log tail."""
    for line in reversed(text.splitlines()):
        if line.startswith(("[gw", "tests/", "FAILED ", "ERROR ")):  # a test's line, not the end
            continue
        s = line.strip().strip("=").strip()
        if " in " in s and any(w in s for w in ("passed", "failed", "error", "skipped")):
            return s
    return "no summary line"


_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# One pattern per line format; test ids may hold spaces (parametrize ids from messages).
_OUTCOME_LINES = (
    # xdist -v: "[gw3] [  5%] PASSED tests/a.py::t[x y]"
    re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({_OUTCOMES}) (tests/.+?::.+?)\s*$"),
    # plain -v: "tests/a.py::t[x y] PASSED [  5%]", "tests/a.py::t SKIPPED (why) [  6%]"
    re.compile(rf"^(tests/.+?::.+?) ({_OUTCOMES})\b.*\[\s*\d+%\]\s*$"),
    # a file that failed to collect, from -ra's summary: "ERROR tests/a.py - ImportError: x"
    re.compile(r"^(ERROR) (tests/[^\s:]+\.py)(?: - .*)?$"),
)


def test_outcomes(log_text: str) -> dict[str, str]:
    """Test id -> outcome, from pytest -v lines ('[gw3] [ 5%] PASSED tests/a.py::t' with xdist,
    'tests/a.py::t PASSED [ 5%]' without) and files that failed to collect: what ran, even when
    the step was killed before pytest's closing summary. The last line naming a test wins (a
    teardown error after a pass counts as the error)."""
    seen: dict[str, str] = {}
    for line in log_text.splitlines():
        for i, pattern in enumerate(_OUTCOME_LINES):
            m = pattern.match(line)
            if m:
                outcome, name = (m.group(2), m.group(1)) if i == 1 else (m.group(1), m.group(2))
                seen[name] = outcome
                break
    return seen


def outcomes_summary(outcomes: dict[str, str]) -> str:
    """'1400 passed, 3 failed, 20 skipped' from test_outcomes, for a step with no summary."""
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.lower()] = counts.get(o.lower(), 0) + 1
    order = ("failed", "error", "passed", "skipped", "xfail", "xpass")
    return ", ".join(f"{counts[k]} {k}" for k in order if k in counts) or "no test finished"


# Nsight Compute's details page: a launch's header line, then "    <metric> [unit] <value>" rows.
_NCU_LAUNCH = re.compile(r"^  (\S.*?) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context")
_NCU_METRICS = {"Duration": "us", "DRAM Throughput": "dram_pct",
                "Compute (SM) Throughput": "sm_pct", "Issued Warp Per Scheduler": "issued",
                "Registers Per Thread": "registers", "Achieved Occupancy": "occupancy_pct"}
_NCU_ROW = re.compile(r"^    (" + "|".join(re.escape(m) for m in _NCU_METRICS)
                      + r")\s+(?:(\S+)\s+)?([\d.,]+)\s*$")
_TO_US = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}


def ncu_rows(text: str) -> list[dict]:
    """One dict per profiled launch in an ``ncu`` details report (default text output): the
    kernel's base name, backend ("triton" for Triton's underscore-named kernels, else "cuda")
    and the metrics of _NCU_METRICS (duration in microseconds whatever unit ncu chose)."""
    rows: list[dict] = []
    for line in text.splitlines():
        head = _NCU_LAUNCH.match(line)
        if head:
            sig = re.sub(r"<unnamed>|\(anonymous namespace\)", "anon",
                         head.group(1).removeprefix("void "))
            name = re.split(r"[<(]", sig, maxsplit=1)[0].split("::")[-1].strip()
            rows.append({"kernel": name, "backend": "triton" if name.startswith("_") else "cuda"})
            continue
        m = _NCU_ROW.match(line)
        if m and rows:
            key, unit = _NCU_METRICS[m.group(1)], m.group(2)
            value = float(m.group(3).replace(",", ""))
            if key == "us":
                value *= _TO_US.get(unit or "us", float("nan"))
            rows[-1].setdefault(key, value)
    return rows


def skip_reasons(junit: Path) -> dict[str, int]:
    """Skip reason -> count, from pytest's junit XML (what the GPU run could not check)."""
    import xml.etree.ElementTree as ET

    counts: dict[str, int] = {}
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return counts
    for el in root.iter("skipped"):
        why = (el.get("message") or "no reason").strip().splitlines()[0][:200]
        counts[why] = counts.get(why, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


_PROBE = """
import torch, cetnet_kernels  # noqa: F401  (registers the ops)
try:
    torch.ops.cetnet.confidence_fusion(torch.randn(3), torch.tensor(1.0), False, False)
except ValueError as exc:
    print("probe ok:", str(exc).splitlines()[0])
else:
    raise SystemExit("probe: a 1-D logits tensor was not refused")
"""


# Control experiments run when the probe crashes, each in its own process, to say where the fault
# lies: "torch" (a C++ exception thrown by torch itself: if this crashes too, the image's torch
# or its runtime libraries are at fault, not our build), "no-gpu-visible" (our probe with
# CUDA_VISIBLE_DEVICES empty: the same build passes on machines without a GPU, so a pass here
# points at the driver), "inline-extension" (a minimal extension built just now by the same
# compiler with torch's own flags, throwing one TORCH_CHECK: if this crashes, the compiler /
# toolchain is at fault, not our code: on the image above it crashed, as load_inline links
# libstdc++ the compiler's way). Each exits 0 only when the exception reached Python.
# name -> (code, environment variables to set, time limit in seconds).
_CONTROLS = {
    "torch": ("""
import torch
try:
    torch.mm(torch.ones(2, 3), torch.ones(2, 3))
except RuntimeError as exc:
    print("control ok: torch's own C++ exception:", str(exc).splitlines()[0])
else:
    raise SystemExit("control: torch.mm of mismatched shapes did not raise")
""", {}, 60),
    "no-gpu-visible": (_PROBE, {"CUDA_VISIBLE_DEVICES": ""}, 60),
    "inline-extension": ("""
import tempfile, torch
from torch.utils.cpp_extension import load_inline
src = ('#include <torch/extension.h>\\n'
       'void throws(torch::Tensor x) '
       '{ TORCH_CHECK_VALUE(x.dim() == 2, "need 2-D, got ", x.dim()); }')
mod = load_inline("cetnet_probe_ext", src, functions=["throws"], verbose=False,
                  build_directory=tempfile.mkdtemp(prefix="cetnet-probe-"))
try:
    mod.throws(torch.ones(3))
except ValueError as exc:
    print("control ok: a fresh extension's TORCH_CHECK:", str(exc).splitlines()[0])
else:
    raise SystemExit("control: the fresh extension's check did not raise")
""", {}, 180),
}


def crash_controls(env: dict, deadline: float = float("inf")) -> list[str]:
    """One line per control experiment (_CONTROLS): ok, or how it failed. A control past its
    limit (or past ``deadline``, a time.monotonic() value) is killed with its whole process
    group (the compiler of load_inline too); one that would start with under 5 s left is not
    run."""
    lines = []
    for name, (code, extra_env, own_limit) in _CONTROLS.items():
        left = deadline - time.monotonic()
        limit = min(own_limit, left)
        if left < 5:
            lines.append(f"control {name}: not run (no time left)")
            log(lines[-1])
            continue
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                    env={**env, **extra_env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as exc:
            lines.append(f"control {name}: did not start: {exc}")
            log(lines[-1])
            continue
        try:
            out, err = proc.communicate(timeout=limit)
            rc = proc.returncode
            said = out if rc == 0 else out + err  # stderr: warnings
            last = (said.strip().splitlines() or ["no output"])[-1][:200]
            what = ("ok" if rc == 0 else f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            what, last = "did not finish", f"killed after {limit:.0f} s"
        lines.append(f"control {name}: {what} in {time.monotonic() - t0:.0f} s: {last}")
        log(lines[-1])
    return lines


def exception_probe(out: Path, env: dict, limit: float = 120) -> dict:
    """Raises a C++ argument error in the extension (CPU op, 1-D logits) in a subprocess. On a
    failure, the toolchain facts (seconds) go to exception-probe.log at once; a crash's slow
    diagnostics (a debugger's backtrace, the control experiments) are left to
    :func:`probe_diagnostics`, run when the budget allows (``step["diagnose"]``)."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                              capture_output=True, text=True, errors="replace", timeout=limit)
    except subprocess.TimeoutExpired:
        log(f"exception-probe: FAILED (no answer in {limit:.0f} s)")
        return {"name": "exception-probe", "rc": "timeout", "seconds": round(limit, 1),
                "summary": f"the probe did not finish in {limit:.0f} s"}
    rc = proc.returncode
    step: dict = {"name": "exception-probe", "rc": 0 if rc == 0 else rc}
    if rc == 0:
        step["summary"] = "a C++ argument error reaches Python as ValueError"
        step["seconds"] = round(time.monotonic() - t0, 1)
        log("exception-probe: ok")
        return step
    facts = []
    for cmd in (["sh", "-c", "echo CC=$CC CXX=$CXX; command -v c++ g++ gcc; g++ --version | "
                 "head -1; ldd cetnet_kernels/_C*.so | grep -E 'stdc|gcc_s|gomp'"],
                # a libstdc++ / libgcc linked statically into the extension (a compiler wrapper
                # adding -static-libstdc++) would give it its own exception runtime
                # no libstdc++ among them: a static copy (seen: a CXX wrapper whose -B folder
                # held only libstdc++.a), whose locale state torch's copy does not share
                ["sh", "-c", "readelf -d cetnet_kernels/_C*.so | grep NEEDED; echo "
                 "defines-cxa_throw: $(nm cetnet_kernels/_C*.so 2>/dev/null | "
                 "grep -c -E ' [TtWw] (__cxa_throw|_Unwind_RaiseException)$')"],
                # the unwinder finds a shared object's frames through its PT_GNU_EH_FRAME
                # header: a linker that leaves it out makes every throw through it fatal
                ["sh", "-c", "echo eh_frame_hdr: $(readelf -lW cetnet_kernels/_C*.so | "
                 "grep -c GNU_EH_FRAME); readelf -p .comment cetnet_kernels/_C*.so 2>/dev/null "
                 "| grep -v '^$' | head -5"],
                # what the compiler wrapper adds (a script is printed, a binary named)
                ["sh", "-c", "for c in $(command -v c++ g++) $CXX; do echo \"== $c\"; "
                 "if [ \"$(head -c2 \"$c\")\" = '#!' ]; then head -40 \"$c\"; "
                 "else ls -lL \"$c\"; fi; done; g++ -v 2>&1 | tail -2"]):
        try:
            facts.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                        errors="replace", timeout=30).stdout.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            facts.append(f"{cmd[-1][:40]}: {exc}")
    if rc < 0:
        step["diagnose"] = True
        step["summary"] = (f"a C++ exception from cetnet_kernels._C does not reach Python "
                           f"(killed by signal {-rc}): argument errors crash the process on this "
                           "toolchain")
    else:  # e.g. the extension did not build or import: say so, not "crash"
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        step["summary"] = f"probe failed (exit {rc}): {last}"
    why = ("killed by signal %d" % -rc) if rc < 0 else f"exit {rc}"
    (out / "exception-probe.log").write_text(proc.stdout + proc.stderr + "\n" + "\n".join(facts))
    step["log"] = "exception-probe.log"
    step["seconds"] = round(time.monotonic() - t0, 1)
    log(f"exception-probe: FAILED ({why}); toolchain: {' | '.join(facts)[:600]}")
    return step


def probe_diagnostics(out: Path, env: dict, deadline: float = float("inf")) -> dict:
    """After a crashing probe: the crash's innermost frames (gdb or cuda-gdb, when there) and
    the control experiments (:data:`_CONTROLS`), appended to exception-probe.log; nothing runs
    past ``deadline`` (a time.monotonic() value)."""
    t0 = time.monotonic()
    facts = []
    dbg = shutil.which("gdb") or shutil.which("cuda-gdb")
    limit = min(120, deadline - time.monotonic())
    if dbg and limit >= 10:
        try:
            bt = subprocess.run([dbg, "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args",
                                 sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                                capture_output=True, text=True, errors="replace",
                                timeout=limit).stdout
            facts.append("\n".join(ln for ln in bt.splitlines() if ln.startswith("#")))
        except (OSError, subprocess.TimeoutExpired) as exc:
            facts.append(f"{dbg}: {exc}")
    controls = crash_controls(env, deadline)
    with open(out / "exception-probe.log", "a") as f:
        f.write("\n" + "\n".join(facts + controls) + "\n")
    summary = "; ".join(ln.split(" in ")[0] for ln in controls) or "no control ran"
    if facts:
        summary += f"; {dbg} backtrace in the log"
    return {"name": "probe-diagnostics", "rc": 0, "seconds": round(time.monotonic() - t0, 1),
            "summary": summary, "log": "exception-probe.log"}


class Clock:
    """The check's time: ``budget`` (the soft target the tests and the profile adapt to) and
    ``hard`` (no step runs past it: the device's command limit, with time left to write the
    report and pack it), both in seconds from the start."""

    def __init__(self, budget: float, hard: float) -> None:
        self.budget, self.hard = budget, hard

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def budget_left(self) -> float:
        return self.budget - self.elapsed()

    def deadline(self) -> float:
        """The time.monotonic() value no step may pass."""
        return T0 + self.hard - REPORT_RESERVE_S

    def limit(self, own: float) -> float:
        """A step's time limit: its own, cut to what the hard limit leaves."""
        return min(own, self.deadline() - time.monotonic())


REPORT_RESERVE_S = 10  # writing the report and the archive after the last step
MIN_STEP_S = 15  # a step with less time than this left is not started
BENCH_GROUPS = {"fusion": "bench_gpu_fusion", "embedding": "bench_gpu_embedding",
                "train": "bench_gpu_train_step"}


def group_benchmarks(out: Path, group: str) -> list[dict] | None:
    """One bench group's results: its pytest-benchmark JSON (bench-<group>.json), else the
    benchmarks it finished before it was stopped (bench-<group>.jsonl, a line each, written by
    bench_gpu.py as it goes); None when it has neither."""
    try:
        return json.loads((out / f"bench-{group}.json").read_text())["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not run, or killed before pytest wrote it at the session's end
    try:
        lines = (out / f"bench-{group}.jsonl").read_text().splitlines()
    except OSError:
        return None
    benches = []
    for line in lines:
        try:
            benches.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by the kill
    return benches


def merged_benchmarks(out: Path) -> dict | None:
    """The bench groups' results (:func:`group_benchmarks`) as one, or None."""
    groups = [group_benchmarks(out, g) for g in BENCH_GROUPS]
    if all(g is None for g in groups):
        return None
    return {"benchmarks": [b for g in groups for b in g or []]}


def failed_providers(benches: list[dict]) -> list[str]:
    """'<provider> in <group>' for every provider a benchmark could not time."""
    return [f"{p} in {b.get('name') or b['extra_info'].get('op') or ''}".strip()
            for b in benches for p, why in (b["extra_info"].get("skipped") or {}).items()
            if str(why).startswith("failed")]


# What a run leaves in --out: removed at the start, so that nothing of an earlier run is
# reported (or packed) as this one's.
_RUN_FILES = ("*.log", "bench-*.json", "bench-*.jsonl", "tests.xml", "gpu_check.json",
              "GPU_RESULTS.md")


def write_report(info: dict, steps: list[dict], out: Path, archive: Path | None,
                 results: Path | None = None) -> str:
    """gpu_check.json and GPU_RESULTS.md in ``out`` (and the report at ``results`` too), and,
    with ``archive``, a tar.gz of ``out`` with the report and the JSON beside it: written after
    every step, so a run killed from outside still leaves what it had."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from render_gpu import render

    info["steps"] = [{k: v for k, v in s.items() if k != "tail"} for s in steps]
    info["total_s"] = round(time.monotonic() - T0, 1)
    (out / "gpu_check.json").write_text(json.dumps(info, indent=1, default=str))
    try:
        md = render(info, merged_benchmarks(out))
    except Exception as exc:  # the JSON and the logs still go out
        md = (f"# GPU results\n\nThe report could not be rendered ({type(exc).__name__}: "
              f"{exc}); gpu_check.json and the logs have the results.\n")
    (out / "GPU_RESULTS.md").write_text(md)
    if results is not None:
        results.write_text(md)
    if archive is not None:
        import tarfile

        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(archive.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=".")
        tmp.replace(archive)
        for name in ("GPU_RESULTS.md", "gpu_check.json"):
            shutil.copyfile(out / name, archive.parent / name)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build-gpu-check",
                    help="logs, benchmark JSONs, gpu_check.json and a copy of the report")
    ap.add_argument("--archive", type=Path,
                    default=Path(os.environ["OUT"], "gpu-check.tgz") if os.environ.get("OUT")
                    else None,
                    help="also pack --out into this tar.gz, with GPU_RESULTS.md and "
                         "gpu_check.json beside it, after every step (default: $OUT/gpu-check.tgz "
                         "when $OUT is set: three files to fetch)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "GPU_RESULTS.md",
                    help="where the report goes (besides --out)")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built")
    ap.add_argument("--skip-tests", action="store_true",
                    help="no tests, and no exception probe or sanitizers either")
    ap.add_argument("--skip-sanitizers", action="store_true",
                    help="no compute-sanitizer memcheck / racecheck")
    ap.add_argument("--skip-bench", action="store_true",
                    help="no benchmarks, and no Nsight Compute pass either")
    ap.add_argument("--skip-ncu", action="store_true",
                    help="no Nsight Compute pass over the fusion kernels")
    ap.add_argument("--budget", type=float, default=480,
                    help="seconds for the whole check (the target: 8 minutes): Nsight Compute "
                         "runs only in what the other steps leave of it; the tests may run past "
                         "it, up to --hard-limit (a complete test pass is worth more than the "
                         "profile)")
    ap.add_argument("--hard-limit", type=float, default=570,
                    help="seconds after which no step runs, whatever it was given (a device "
                         "machine's command limit is 600 s)")
    ap.add_argument("--ncu-timeout", type=float, default=150)
    ap.add_argument("--test-timeout", type=float, default=420)
    ap.add_argument("--bench-timeout", type=float, default=150, help="per benchmark group")
    ap.add_argument("--build-timeout", type=float, default=300)
    ap.add_argument("--memcheck-timeout", type=float, default=120)
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed (install torch >= 2.6 with CUDA first)")
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch "
              f"({torch.__version__}, CUDA {torch.version.cuda}); nothing to check")
        return 2

    if argv is not None:  # called, not run as a script: the clock starts now, not at import
        global T0
        T0 = time.monotonic()
    clock = Clock(args.budget, args.hard_limit)
    out = args.out.resolve()  # the steps run in ROOT: paths handed to them must be absolute
    archive = args.archive.resolve() if args.archive else None
    if archive is not None and (archive.parent == out or out in archive.parents):
        print(f"gpu-check: --archive {archive} must lie outside --out {out} (it packs --out)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _RUN_FILES:
        for old_file in out.glob(pattern):
            old_file.unlink()
    cap = torch.cuda.get_device_capability()
    arch = f"{cap[0]}.{cap[1]}"
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # a missing triton is reported, not fatal: the CUDA backend runs
        triton_version = f"not importable ({type(exc).__name__})"
    info = {
        "device": torch.cuda.get_device_name(), "capability": arch,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    log(f"{info['device']} (sm_{cap[0]}{cap[1]}), torch {info['torch']}, CUDA {info['cuda']}, "
        f"triton {triton_version}, {info['cpus']} CPUs; budget {args.budget:.0f} s, hard limit "
        f"{args.hard_limit:.0f} s")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)
    steps: list[dict] = []

    def step(name: str, cmd: list[str], own_limit: float, step_env: dict | None = None
             ) -> dict | None:
        """run_step within the hard limit; None (and a 'skipped' row) when no time is left."""
        limit = clock.limit(own_limit)
        if limit < MIN_STEP_S:  # a failure: the check did not do what it is for
            steps.append({"name": name, "rc": "no time", "seconds": 0,
                          "summary": f"not run: no time left (hard limit {args.hard_limit:.0f} s)"})
            log(f"{name}: not run (no time left)")
            return None
        s = run_step(name, cmd, out, limit, step_env or env)
        steps.append(s)
        return s

    def report() -> None:
        try:
            write_report(info, steps, out, archive, args.results)
        except Exception as exc:  # the check goes on; the next report may succeed
            log(f"report: not written ({type(exc).__name__}: {exc})")

    # 1. Build: in place (no pip, no network), CUDA on, for this GPU's arch, every core.
    if not args.skip_build:
        benv = dict(env, CETNET_CUDA="1", TORCH_CUDA_ARCH_LIST=arch,
                    MAX_JOBS=str(os.cpu_count() or 4))
        if not shutil.which("nvcc") and not os.environ.get("CUDA_HOME"):
            for guess in ("/usr/local/cuda", "/opt/cuda"):
                if Path(guess, "bin", "nvcc").exists():
                    benv["CUDA_HOME"] = guess
        if nvcc_splits(benv):  # the fusion file's per-K kernels compile on every core
            benv.setdefault("CETNET_NVCC_SPLIT_COMPILE", "0")
        s = step("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                           "--build-temp", "build-gpu/tmp"], args.build_timeout, benv)
        if s is None or s["rc"] != 0:  # what follows would test an older module, or none
            log("build failed: the probe, tests, sanitizers and benchmarks need the fresh "
                "build and are skipped")
            args.skip_tests = args.skip_bench = True
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import json, cetnet_kernels as c; print(json.dumps("
             "{k: str(v) for k, v in c.build_info().items()}))"],
            cwd=ROOT, env=env, capture_output=True, text=True, errors="replace", timeout=60)
        info["build_info"] = probe.stdout.strip() or probe.stderr.strip()[-500:]
    except subprocess.TimeoutExpired:
        info["build_info"] = "importing cetnet_kernels took over 60 s"
    log(f"build_info: {info['build_info']}")
    report()

    # 1b. A C++ exception from the extension must reach Python as an exception. On one GPU image
    # (torch 2.11, the image's /opt/gcc wrapper around gcc 13.3) every such error, CPU kernels'
    # too, killed the process with SIGSEGV while formatting its message: that compiler linked a
    # static libstdc++ into the module (setup.py now links torch's shared one, and refuses a
    # module without it). Probe it in a subprocess and, if it fails, say it plainly (with the
    # toolchain facts) instead of leaving it to crashed pytest workers.
    probe_step = None
    if not args.skip_tests:
        if clock.limit(120) < 5:
            steps.append({"name": "exception-probe", "rc": "no time", "seconds": 0,
                          "summary": "not run: no time left"})
        else:
            probe_step = exception_probe(out, env, clock.limit(120))
            steps.append(probe_step)
        report()

    # 2. Benchmarks -> GPU_RESULTS.md, a process per group (a kernel fault or an out-of-memory
    # in one group does not lose the others; each writes its JSON when it ends). Before the
    # tests: short, and their numbers are the targets, so a test step cut short still leaves
    # them.
    if not args.skip_bench:
        for group, name in BENCH_GROUPS.items():
            bench_json = out / f"bench-{group}.json"
            s = step(f"bench-{group}", [sys.executable, "-m", "pytest", "bench/bench_gpu.py",
                                        "-q", "-k", name, f"--benchmark-json={bench_json}"],
                     args.bench_timeout,
                     dict(env, CETNET_BENCH_JSONL=str(out / f"bench-{group}.jsonl")))
            if s is not None:
                s["summary"] = pytest_summary(s["tail"])
                failed = failed_providers(group_benchmarks(out, group) or [])
                if failed:  # timed without them: a failure, though pytest passed
                    s["summary"] += f"; not timed: {', '.join(failed)}"
                    if s["rc"] == 0:
                        s["rc"] = "providers failed"
            report()

    # 3. compute-sanitizer over a small run of every CUDA and Triton kernel: memcheck (out of
    # bounds, misaligned, leaks) and racecheck (shared-memory hazards of the tiled kernels).
    # Without the caching allocator, so that an access past a small tensor leaves its
    # allocation instead of landing in a neighbour of the same cached block.
    sanitizer = cuda_tool("compute-sanitizer")
    senv = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    for tool in () if args.skip_tests or args.skip_sanitizers else ("memcheck", "racecheck"):
        if sanitizer is None:
            steps.append({"name": tool, "rc": "skipped", "seconds": 0,
                          "summary": "compute-sanitizer not found"})
            log(f"{tool}: skipped (compute-sanitizer not found)")
            continue
        # racecheck: the CUDA kernels only. Triton's generated code showed write-write hazards
        # on the per-row stores after a row reduction (every lane of the row stores the same
        # value; H200, Triton 3.6): not ours to fix there, reported in the notes.
        smoke = ["tests/kernels/gpu_smoke.py"] + (["cuda"] if tool == "racecheck" else [])
        s = step(tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable,
                        *smoke], args.memcheck_timeout, senv)
        if s is not None:
            s["summary"] = next((ln.strip("= ") for ln in reversed(s["tail"].splitlines())
                                 if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln),
                                "no summary")
        report()

    # 4. Every CUDA and Triton test (tests carrying the `gpu` marker, see tests/conftest.py),
    # with what the hard limit leaves (most of it goes to Triton compiling each
    # specialization): past the budget if need be, a complete pass being the check's point.
    if not args.skip_tests:
        junit = out / "tests.xml"  # read for skip reasons
        junit.unlink(missing_ok=True)  # written at the session's end only: never a stale one
        # ... and the CPU kernel builds' agreement (the GPU host's CPU often runs avx512).
        # -v: a line per test, so a step killed at its limit still says what ran and failed.
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu or cpu_isa", "-v", "-ra",
               "--durations=15", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
        cmd[3:3] = xdist_args(os.cpu_count() or 2)
        import importlib.util

        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd[3:3] = ["--timeout", "150"]  # a hung test fails alone, not the whole step
        # one inductor compile worker per test process: 16 xdist workers each starting a
        # pool of one per CPU would fight over the same 16 cores
        tenv = dict(env, TORCHINDUCTOR_COMPILE_THREADS="1")
        if clock.budget_left() < args.test_timeout:
            log(f"tests: {max(clock.budget_left(), 0):.0f} s of the budget left; they may run "
                f"past it, up to the hard limit")
        s = step("tests", cmd, args.test_timeout, tenv)
        if s is not None:
            s["summary"] = pytest_summary(s["tail"])
            outcomes = test_outcomes((out / s["log"]).read_text(errors="replace"))
            if s["summary"] == "no summary line":  # killed: what the per-test lines say
                s["summary"] = (f"no closing summary; per-test lines: "
                                f"{outcomes_summary(outcomes)}")
            s["failed"] = sorted(n for n, o in outcomes.items() if o in ("FAILED", "ERROR"))
            s["skip_reasons"] = skip_reasons(junit)
            log(f"tests: {s['summary']}")
            for name in s["failed"]:
                log(f"  failed: {name}")
            for why, n in s["skip_reasons"].items():
                log(f"  skipped {n} x {why}")
        report()

    # 4b. A crashing probe's slow diagnostics (debugger, control experiments), in what is left.
    if probe_step is not None and probe_step.get("diagnose"):
        steps.append(probe_diagnostics(out, env, clock.deadline()))
        report()

    # 5. Nsight Compute over the fusion kernels (bench/profile_fusion.py): issue against memory.
    # Last and optional: it runs only in what is left of the budget.
    ncu = cuda_tool("ncu")
    ncu_time = min(args.ncu_timeout, clock.budget_left())
    if not (args.skip_bench or args.skip_ncu):
        if ncu is None:
            steps.append({"name": "ncu", "rc": "skipped", "seconds": 0,
                          "summary": "ncu (Nsight Compute) not found"})
        elif ncu_time < NCU_MIN_S:
            steps.append({"name": "ncu", "rc": "skipped", "seconds": 0,
                          "summary": f"{max(ncu_time, 0):.0f} s of the budget left "
                                     f"(--budget {args.budget:.0f})"})
            log(f"ncu: skipped ({steps[-1]['summary']})")
        else:
            s = step("ncu", [ncu, "--clock-control", "none", "-k",
                             "regex:fusion|collaborative|sums", "--section", "SpeedOfLight",
                             "--section", "SchedulerStats", "--section", "Occupancy",
                             "--section", "LaunchStats", sys.executable,
                             "bench/profile_fusion.py"], ncu_time)
            if s is not None:
                info["ncu"] = ncu_rows((out / s["log"]).read_text(errors="replace"))
                s["summary"] = f"{len(info['ncu'])} kernel launches profiled"
                if isinstance(s["rc"], int) and s["rc"] != 0 and not info["ncu"]:
                    # e.g. a runtime without hardware counters (a timeout stays a failure)
                    last = (s["tail"].strip().splitlines() or ["no output"])[-1][:160]
                    s["rc"], s["summary"] = "skipped", f"ncu could not profile here: {last}"

    try:
        print(write_report(info, steps, out, archive, args.results))
    except Exception as exc:
        log(f"report: not written ({type(exc).__name__}: {exc})")
    failed = [s["name"] for s in steps if s["rc"] not in (0, "skipped")]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all steps passed"
    log(f"done in {time.monotonic() - T0:.1f} s; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
