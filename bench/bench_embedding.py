"""Training-step benchmarks of the multi-table embedding (pytest-benchmark), CPU.

Step = lookup + backward + SGD update of M members x F features (one table each, 100k rows per
table, fp32), Zipf(1.05) ids (``(zipf - 1) % rows``; 4 pre-drawn batches used in turn), the
same constant output gradient for every provider. Providers:

- ``cetnet-cpu``: ``MultiTableEmbedding(optimizer="sgd")``: one lookup launch, SGD applied in
  backward (no gradient tensor).
- ``loop``: what FuxiCTR / DeepCTR users do: M x F ``nn.Embedding(sparse=True)``, members'
  outputs ``torch.stack``-ed to ``[B, F, D]``, ``torch.optim.SGD`` (``zero_grad``, ``step``).
- ``compile``: the ``loop`` lookups under ``torch.compile`` (backward + SGD step as in ``loop``);
  compiled and warmed up outside the timed region.
- ``fbgemm``: one FBGEMM CPU TBE holding all M x F tables, ``EXACT_SGD``
  (``fbgemm-gpu-cpu``; skipped with the reason when it is not importable, and at D = 10: TBE
  needs dims that are multiples of 4). With the sequence case it runs ``PoolingMode.NONE``.

Shapes (``cpu-<provider>-M2-F26-B4096-D16``; ``-T50``: one of the 26 features is a [B, 50]
history sequence, the rest single ids). The default matrix is the full one (below) trimmed to
run in about 8 minutes on 2 cores: M=2 x B in {512, 4096, 16384} at D=16, D in {10, 64} at B=4096,
M=4 at B=4096, and the sequence case. CETNET_BENCH_EMB_FULL=1 runs M in {2, 4} x B in {512,
4096, 16384} x D in {10, 16, 64} + the sequence case. CETNET_BENCH_PROVIDERS filters providers,
CETNET_BENCH_TARGET_S sets the timed seconds per benchmark (default 1.0).

``bench_embedding_host_overhead``: host time of one fused-SGD step at B = 1, the module's eager
path against the fused op called through torch.library's autograd (interleaved rounds; results
in EMBEDDING_RESULTS.md).

Useful bytes (FBGEMM's accounting): forward reads the looked-up rows and writes the outputs,
``2 * lookups * M * D * 4``; forward + backward counts twice that. ``extra_info`` carries them;
``python bench/bench_embedding.py summarize results.json`` prints the table of ms, GB/s and
ratios. ``python bench/bench_embedding.py interleaved [--headline | --sequence | --full]
[--threads N] [--into FILE]`` times the providers round-robin instead (robust to load from other
processes on a shared machine); ``--into`` writes the wide table into FILE's matrix markers (how
EMBEDDING_RESULTS.md's matrix is made)."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import InterleavedTimer, device_name, env_strs  # noqa: E402

import cetnet_kernels as ck  # noqa: E402

ROWS = 100_000
F = 26
LR = 0.01
ZIPF_A = 1.05
N_BATCHES = 4
PROVIDERS = ("cetnet-cpu", "loop", "compile", "fbgemm")


def _shapes() -> list[tuple[int, int, int, int]]:
    """(M, B, D, T) with T = 0 for single ids only, else the length of one history feature."""
    if os.environ.get("CETNET_BENCH_EMB_FULL", "0") == "1":
        out = [(M, B, D, 0) for M in (2, 4) for B in (512, 4096, 16384) for D in (10, 16, 64)]
    else:
        out = [(2, 512, 16, 0), (2, 4096, 16, 0), (2, 16384, 16, 0), (2, 4096, 10, 0),
               (2, 4096, 64, 0), (4, 4096, 16, 0)]
    return out + [(2, 4096, 16, 50)]


def _params():
    providers = [p for p in env_strs("CETNET_BENCH_PROVIDERS", list(PROVIDERS)) if p in PROVIDERS]
    return [pytest.param(p, M, B, D, T,
                         id=f"cpu-{p}-M{M}-F{F}-B{B}-D{D}" + (f"-T{T}" if T else ""))
            for (M, B, D, T) in _shapes() for p in providers]


def lookups_per_member(B: int, T: int) -> int:
    return B * (F - 1 + T) if T else B * F


def useful_bytes(M: int, B: int, D: int, T: int) -> int:
    """Forward + backward bytes, FBGEMM's accounting: 2 x (rows read + outputs written)."""
    return 2 * 2 * lookups_per_member(B, T) * M * D * 4


def _batches(B: int, T: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)

    def zipf(*shape):
        return torch.from_numpy((rng.zipf(ZIPF_A, shape) - 1) % ROWS)

    out = []
    for _ in range(N_BATCHES):
        ids = {f"f{f}": zipf(B) for f in range(F)}
        if T:
            ids["f0"] = zipf(B, T)
        out.append(ids)
    return out


class _Cycle:
    """Hands out the pre-drawn batches in turn."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        x = self.items[self.i % len(self.items)]
        self.i += 1
        return x


def _make_step(provider: str, M: int, B: int, D: int, T: int, info: dict):
    torch.manual_seed(0)
    batches = _batches(B, T)
    ncols = F - 1 + T if T else F
    next_batch = _Cycle(batches)

    if provider == "cetnet-cpu":
        if "cpu" not in ck.available_backends("cpu"):
            pytest.skip(f"cetnet_kernels._C is not built: {ck.build_info()['error']}")
        mod = ck.MultiTableEmbedding(M, [(f"f{f}", ROWS) for f in range(F)], D, optimizer="sgd",
                                     lr=LR, backend="cpu")
        grads = [torch.ones(B, ncols, D) for _ in range(M)]

        def step():
            outs = mod(next_batch())
            torch.autograd.backward(outs, grads)

        return step

    if provider in ("loop", "compile"):
        embs = nn.ModuleList(nn.Embedding(ROWS, D, sparse=True) for _ in range(M * F))
        opt = torch.optim.SGD(embs.parameters(), lr=LR)

        def lookup(ids):
            return [torch.cat([embs[m * F + f](ids[f"f{f}"]).view(B, -1, D) for f in range(F)],
                              dim=1) for m in range(M)]

        fn = lookup
        if provider == "compile":
            torch._dynamo.reset()
            fn = torch.compile(lookup, dynamic=False)
        grads = [torch.ones(B, ncols, D) for _ in range(M)]

        def step():
            opt.zero_grad(set_to_none=True)
            outs = fn(next_batch())
            torch.autograd.backward(outs, grads)
            opt.step()

        if provider == "compile":
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:  # e.g. no C++ compiler for inductor
                pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
            info["compile_s"] = round(time.perf_counter() - t0, 2)
        return step

    if provider == "fbgemm":
        try:
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
                EmbeddingLocation, PoolingMode)
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
                ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
        except Exception as exc:  # not installed, or built for another torch
            pytest.skip(f"fbgemm_gpu is not importable ({type(exc).__name__}: {exc}); "
                        "pip install fbgemm-gpu-cpu==1.8.0")
        if D % 4:
            pytest.skip(f"FBGEMM's TBE needs embedding dims that are multiples of 4, got D={D}")
        # SUM-pooled TBEs (FBGEMM's fast CPU path; PoolingMode.NONE, its other way to return
        # every position of a sequence, runs ~10x slower): one over the single-id tables (B
        # bags of one id) and, with a sequence, one over its M tables whose B * T positions are
        # bags of one id each: the same rows read and updated, the same outputs
        # (bit-identical tables after an SGD step).
        seq = ["f0"] if T else []
        single = [f"f{f}" for f in range(F) if f"f{f}" not in seq]
        groups = [names for names in (single, seq) if names]
        tbes = [SplitTableBatchedEmbeddingBagsCodegen(
            [(ROWS, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * (M * len(names)),
            optimizer=EmbOptimType.EXACT_SGD, learning_rate=LR, pooling_mode=PoolingMode.SUM)
            for names in groups]
        prepared = []  # per batch, per TBE: (indices, offsets), tables member-major
        for ids in batches:
            inputs = []
            for names in groups:
                indices = torch.cat([ids[name].reshape(-1) for _ in range(M) for name in names])
                offsets = torch.arange(len(indices) + 1, dtype=torch.int64)  # bags of one id
                inputs.append((indices, offsets))
            prepared.append(inputs)
        next_input = _Cycle(prepared)
        grads = [torch.ones_like(tbe(*inp)) for tbe, inp in zip(tbes, prepared[0])]

        def step():
            outs = [tbe(*inp) for tbe, inp in zip(tbes, next_input())]
            torch.autograd.backward(outs, grads)

        return step

    raise ValueError(provider)


def _plan(step) -> tuple[int, int]:
    target = float(os.environ.get("CETNET_BENCH_TARGET_S", "1.0"))
    step()
    t0 = time.perf_counter()
    step()
    t = max(time.perf_counter() - t0, 1e-6)
    return max(5, min(200, math.ceil(target / t))), 1


@pytest.mark.parametrize("provider,M,B,D,T", _params())
def bench_embedding_step(benchmark, provider, M, B, D, T):
    info: dict = {}
    step = _make_step(provider, M, B, D, T, info)
    rounds, iterations = _plan(step)
    benchmark.group = f"embedding-M{M}-F{F}-B{B}-D{D}" + (f"-T{T}" if T else "")
    benchmark.extra_info.update(
        op="embedding_step", provider=provider, device="cpu", device_name=device_name("cpu"),
        M=M, F=F, B=B, D=D, T=T, rows=ROWS, zipf=ZIPF_A, bytes=useful_bytes(M, B, D, T),
        torch_version=torch.__version__, **info)
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)


def _host_steps() -> dict:
    """Two ways to run one fused-SGD step of M = 2 x F = 26 features at B = 1 (the kernels'
    work is negligible: this is host time): ``module``, MultiTableEmbedding's eager path
    (autograd.Functions over the ops), and ``registered-op``, the fused op called directly with
    autograd, which goes through torch.library's Python autograd wrapper as the module did
    before 2026-11-29."""
    from cetnet_kernels.embedding import OPTIMIZER_CODES
    from cetnet_kernels.embedding_args import OptimizerArgs

    mod = ck.MultiTableEmbedding(2, [(f"f{i}", 1000) for i in range(F)], [16, 16],
                                 optimizer="sgd", lr=LR)
    gen = torch.Generator().manual_seed(0)
    ids = {f"f{i}": torch.randint(0, 1000, (1,), generator=gen) for i in range(F)}
    grads = [torch.ones(1, F, 16) for _ in range(2)]
    opt = OptimizerArgs(int(OPTIMIZER_CODES["sgd"]), LR, mod.eps, mod.weight_decay)
    fused = torch.ops.cetnet.multi_embedding_fused.default

    def module_step() -> None:
        torch.autograd.backward(mod(ids), grads)

    def op_step() -> None:
        a, _ = mod._normalize(ids)
        outs = fused(a.weight, mod._no_state, mod._placeholder, *a[1:], *opt)
        torch.autograd.backward(outs, grads)

    return {"module": module_step, "registered-op": op_step}


def bench_embedding_host_overhead(benchmark):
    """Host time per step of ``module`` and ``registered-op`` (see ``_host_steps``), timed in
    interleaved rounds (``extra_info["providers"]``: median / min seconds per step each);
    pytest-benchmark's own stats are the module's."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip("cetnet_kernels._C is not built")
    steps = _host_steps()
    summary = InterleavedTimer.run(steps, calls=50, rounds=40)
    benchmark.group = f"embedding-host-M2-F{F}-B1-D16"
    benchmark.extra_info.update(
        op="embedding_host_overhead", device="cpu", device_name=device_name("cpu"), M=2, F=F,
        B=1, D=16, providers=summary, torch_version=torch.__version__,
        op_over_module=summary["registered-op"]["median_s"] / summary["module"]["median_s"])
    benchmark.pedantic(steps["module"], rounds=200, iterations=1, warmup_rounds=5)


def summarize(path: str) -> str:
    """A markdown table (median ms, useful GB/s, cetnet's speed-up) from a benchmark JSON."""
    data = json.loads(Path(path).read_text())
    rows: dict[tuple, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") != "embedding_step":  # (the host-overhead bench has its own table)
            continue
        key = (e["M"], e["B"], e["D"], e["T"])
        rows.setdefault(key, {})[e["provider"]] = {"ms": b["stats"]["median"] * 1e3,
                                                    "min_ms": b["stats"]["min"] * 1e3,
                                                    "bytes": e["bytes"]}
    return matrix_table(rows)


def matrix_table(rows: dict[tuple, dict[str, dict]]) -> str:
    """The wide markdown table of ``{(M, B, D, T): {provider: {"ms", "bytes"}}}``: ms and useful
    GB/s per provider, then each provider's time over cetnet's."""
    provs = [p for p in PROVIDERS if any(p in r for r in rows.values())]
    head = ("| M | B | D | T | " + " | ".join(f"{p} ms (GB/s)" for p in provs)
            + " | " + " | ".join(f"{p} / cetnet" for p in provs if p != "cetnet-cpu") + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(provs) - 1)]
    for key in sorted(rows):
        r = rows[key]
        cells = []
        for p in provs:
            if p in r:
                cells.append(f"{r[p]['ms']:.2f} ({r[p]['bytes'] / r[p]['ms'] / 1e6:.2f})")
            else:
                cells.append("-")
        ratios = []
        for p in provs:
            if p == "cetnet-cpu":
                continue
            ok = p in r and "cetnet-cpu" in r
            ratios.append(f"{r[p]['ms'] / r['cetnet-cpu']['ms']:.2f}x" if ok else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] or '-'} | "
                     + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def interleaved(shapes, providers, rounds: int,
                matrix: dict[tuple, dict[str, dict]] | None = None) -> str:
    """Times the providers round-robin (one step each per round, the order rotating from round
    to round) and reports median / min ms,
    useful GB/s and ratios. On a shared machine, load changes hit every provider alike, which
    pytest-benchmark's one-provider-after-the-other runs cannot guarantee. ``matrix``, when
    given, receives ``{(M, B, D, T): {provider: {"ms", "min_ms", "bytes"}}}`` (for
    :func:`matrix_table`)."""
    lines = [f"threads = {torch.get_num_threads()}, rounds = {rounds}, {device_name('cpu')}", "",
             "| M | B | D | T | provider | median ms | min ms | useful GB/s | / cetnet-cpu |",
             "|---|---|---|---|---|---|---|---|---|"]
    for M, B, D, T in shapes:
        steps = {}
        for p in providers:
            try:
                steps[p] = _make_step(p, M, B, D, T, {})
            except pytest.skip.Exception as exc:
                lines.append(f"| {M} | {B} | {D} | {T or '-'} | {p} | skipped: {exc} | | | |")
                print(f"M={M} B={B} D={D} T={T}: {p} skipped ({exc})", file=sys.stderr)
        for step in steps.values():
            step()
            step()
        times: dict[str, list[float]] = {p: [] for p in steps}
        order = list(steps)
        for r in range(rounds):
            # the order rotates each round: no provider always runs after the same one
            for p in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                steps[p]()
                times[p].append(time.perf_counter() - t0)
        med = {p: sorted(v)[len(v) // 2] * 1e3 for p, v in times.items()}
        if matrix is not None:
            matrix[(M, B, D, T)] = {p: {"ms": med[p], "min_ms": min(times[p]) * 1e3,
                                        "bytes": useful_bytes(M, B, D, T)} for p in steps}
        print(f"M={M} B={B} D={D} T={T}: " + ", ".join(f"{p} {med[p]:.2f} ms" for p in steps),
              file=sys.stderr, flush=True)
        for p in steps:
            gbs = useful_bytes(M, B, D, T) / med[p] / 1e6
            ratio = f"{med[p] / med['cetnet-cpu']:.2f}x" if "cetnet-cpu" in med else "-"
            lines.append(f"| {M} | {B} | {D} | {T or '-'} | {p} | {med[p]:.2f} | "
                         f"{min(times[p]) * 1e3:.2f} | {gbs:.2f} | {ratio} |")
        del steps
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s1 = sub.add_parser("summarize", help="table from a --benchmark-json file")
    s1.add_argument("json")
    into_help = ("write the table between the <!-- matrix:begin/end --> markers of this "
                 "markdown file (bench/EMBEDDING_RESULTS.md)")
    s1.add_argument("--into", help=into_help)
    s2 = sub.add_parser("interleaved", help="round-robin timing of the providers")
    s2.add_argument("--threads", type=int, default=torch.get_num_threads())
    s2.add_argument("--rounds", type=int, default=20)
    s2.add_argument("--providers", default="cetnet-cpu,loop,fbgemm")
    s2.add_argument("--headline", action="store_true", help="only M=2, B=4096, D=16")
    s2.add_argument("--sequence", action="store_true", help="only M=2, B=4096, D=16, T=50")
    s2.add_argument("--full", action="store_true",
                    help="the full matrix (as CETNET_BENCH_EMB_FULL=1)")
    s2.add_argument("--into", help=into_help)
    a = ap.parse_args()

    def write_into(target: Path, heading: str, table: str) -> None:
        import re

        block = f"<!-- matrix:begin -->\n{heading}:\n\n{table}\n<!-- matrix:end -->"
        text = target.read_text()
        pattern = re.compile(r"<!-- matrix:begin -->.*?<!-- matrix:end -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{target}: no <!-- matrix:begin/end --> markers")
        target.write_text(pattern.sub(lambda _: block, text))
        print(f"wrote the matrix into {target}")

    if a.cmd == "summarize":
        table = summarize(a.json)
        if a.into:
            from datetime import datetime

            meta = json.loads(Path(a.json).read_text())
            when = meta.get("datetime", "")
            try:
                when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
            except ValueError:
                pass
            names = {b["extra_info"].get("device_name") for b in meta["benchmarks"]}
            write_into(Path(a.into),
                       f"Median ms of pytest-benchmark rounds (useful GB/s), "
                       f"{', '.join(sorted(n for n in names if n))}, {when}, torch "
                       f"{meta.get('machine_info', {}).get('torch_version', '?')}, source "
                       f"`{Path(a.json).name}`", table)
        else:
            print(table)
    else:
        from datetime import datetime, timezone

        torch.set_num_threads(a.threads)
        if a.full:
            os.environ["CETNET_BENCH_EMB_FULL"] = "1"
        shapes = [(2, 4096, 16, 0)] if a.headline else [(2, 4096, 16, 50)] if a.sequence \
            else _shapes()
        start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        matrix: dict[tuple, dict[str, dict]] = {}
        long_table = interleaved(shapes, a.providers.split(","), a.rounds, matrix)
        if a.into:
            write_into(Path(a.into),
                       f"Median ms of {a.rounds} interleaved rounds (each round one step of "
                       f"every provider, the order rotating; useful GB/s), "
                       f"{device_name('cpu')}, started {start}, torch {torch.__version__}, "
                       f"`{shlex.join(['python', 'bench/bench_embedding.py', *sys.argv[1:]])}`",
                       matrix_table(matrix))
        else:
            print(long_table)
