"""bench/GPU_RESULTS.md from a gpu-check run: the steps (build, tests, memcheck, benchmarks) and
the benchmark tables of bench_gpu.py as time, GB/s and % of the measured device-copy bandwidth.

    python bench/render_gpu.py OUT/gpu_check.json OUT/gpu_cuda.json   # -> stdout
"""

from __future__ import annotations

import json
import sys

FUSION_ORDER = ("kernels-cuda", "kernels-triton", "cetnet-cuda", "cetnet-triton", "eager")
EMB_CETNET = ("cetnet-cuda", "cetnet-cuda-nocheck", "cetnet-triton", "cetnet-triton-nocheck")
EMB_ORDER = (*EMB_CETNET, "torch-loop")
TRAIN_ORDER = ("cetnet-cuda", "cetnet-triton")
# Targets on H100/H200 (fraction of copy bandwidth).
TARGETS = {"fusion": 0.70, "forward": 0.60, "backward": 0.30, "zipf_over_uniform": 1.5}


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _gbs(nbytes: float, s: float | None) -> str:
    return "–" if not s else f"{nbytes / s / 1e9:.0f}"


def _median(b: dict, p: str) -> float | None:
    r = b["extra_info"].get("providers", {}).get(p)
    return r["median_s"] if r else None


def _by_case(emb: list[dict]) -> dict[tuple[str, str, int], dict]:
    """The embedding benchmarks by (ids, mode, B)."""
    return {(b["extra_info"]["ids"], b["extra_info"]["mode"], b["extra_info"]["B"]): b
            for b in emb}


def _share(b: dict, p: str) -> float | None:
    """Provider ``p``'s time as a share of the copy's in benchmark ``b`` (its %copy)."""
    t, t_copy = _median(b, p), _median(b, "copy")
    return t_copy / t if t and t_copy else None


def backward_shares(emb: list[dict]) -> list[tuple[str, str, int, str, float, float]]:
    """(ids, optimizer, B, provider, seconds, %copy) of the fused backward alone: the step's
    time minus the lookup's, against the backward's own bytes and the step's copy bandwidth."""
    by = _by_case(emb)
    rows = []
    for (ids, mode, B), b in sorted(by.items()):
        fwd = by.get((ids, "forward", B))
        t_copy = _median(b, "copy")
        if mode == "forward" or fwd is None or not t_copy:
            continue
        bwd_bytes = b["extra_info"]["bytes"] - fwd["extra_info"]["bytes"]
        copy_bw = b["extra_info"]["bytes"] / t_copy
        for p in EMB_CETNET:
            ts, tf = _median(b, p), _median(fwd, p)
            if ts is None or tf is None or ts <= tf:
                continue
            rows.append((ids, mode, B, p, ts - tf, bwd_bytes / (ts - tf) / copy_bw))
    return rows


def render_targets(fusion: list[dict], emb: list[dict]) -> list[str]:
    """The H100/H200 targets, each backend's worst case against its bound, met or not."""
    rows = []  # (target, provider, worst value text, met)

    def worst(target: str, provider: str, cases: list[tuple[float, str]], bound: float,
              higher_is_better: bool = True) -> None:
        if not cases:
            return
        value, case = min(cases) if higher_is_better else max(cases)
        met = value >= bound if higher_is_better else value <= bound
        text = f"{100 * value:.0f}% ({case})" if higher_is_better else f"{value:.2f}x ({case})"
        rows.append((target, provider, text, "yes" if met else "**no**"))

    big = max((b["extra_info"]["B"] for b in fusion), default=0)
    for p in ("kernels-cuda", "kernels-triton", "cetnet-cuda", "cetnet-triton") if fusion else ():
        cases = [(v, b["extra_info"]["op"]) for b in fusion
                 if b["extra_info"]["B"] == big and b["extra_info"].get("tau", 1.0) == 1.0
                 and (v := _share(b, p)) is not None]
        worst(f"fusion ops ≥ {100 * TARGETS['fusion']:.0f}% of copy at B = {big:,}", p, cases,
              TARGETS["fusion"])
    single = [b for b in emb if b["extra_info"]["ids"] in ("uniform", "zipf")]
    for p in EMB_CETNET:
        cases = [(v, b["extra_info"]["ids"]) for b in single
                 if b["extra_info"]["mode"] == "forward" and (v := _share(b, p)) is not None]
        worst(f"embedding forward ≥ {100 * TARGETS['forward']:.0f}% of copy", p, cases,
              TARGETS["forward"])
    shares = backward_shares(single)
    for p in EMB_CETNET:
        cases = [(v, ids) for ids, mode, _B, q, _t, v in shares if mode == "sgd" and q == p]
        worst(f"fused-SGD backward ≥ {100 * TARGETS['backward']:.0f}% of copy", p, cases,
              TARGETS["backward"])
    by = _by_case(single)
    for p in EMB_CETNET:
        cases = []
        for (ids, mode, B), b in by.items():
            u = by.get(("uniform", mode, B))
            if ids == "zipf" and u is not None and _median(b, p) and _median(u, p):
                cases.append((_median(b, p) / _median(u, p), mode))
        worst(f"Zipf ids ≤ {TARGETS['zipf_over_uniform']}x the time of uniform", p, cases,
              TARGETS["zipf_over_uniform"], higher_is_better=False)
    if not rows:
        return []
    met = sum(r[3] == "yes" for r in rows)
    return ["", "## Targets", "",
            f"Each backend's worst case against the H100/H200 targets: {met} of {len(rows)} met.",
            "`kernels-*` are the fusion ops themselves, `cetnet-*` the public ops with autograd; "
            "`-nocheck`: the embedding's bounds check off.", "",
            "| target | provider | worst case | met |", "|---|---|---|---|",
            *[f"| {t} | {p} | {v} | {m} |" for t, p, v, m in rows]]


def render_failures(benches: list[dict]) -> list[str]:
    """The providers that failed (not timed) in these benchmarks, with their errors."""
    lines = []
    for b in benches:
        e = b["extra_info"]
        label = "-".join(str(e[k]) for k in ("op", "ids", "mode", "config", "K", "B", "tau")
                         if k in e)
        lines += [f"- **{p} failed** in {label}: {why.removeprefix('failed: ')}"
                  for p, why in (e.get("skipped") or {}).items()
                  if str(why).startswith("failed")]
    return ["", "Not timed:", "", *lines] if lines else []


def render_steps(info: dict) -> list[str]:
    lines = ["| step | result | seconds | summary |", "|---|---|---:|---|"]
    for s in info.get("steps", []):
        rc = s["rc"]
        res = "ok" if rc == 0 else ("skipped" if rc == "skipped" else f"FAILED ({rc})")
        lines.append(f"| {s['name']} | {res} | {s['seconds']} | {s.get('summary', '')} |")
    failed = [name for s in info.get("steps", []) for name in s.get("failed", [])]
    if failed:
        lines += ["", f"Failed tests ({len(failed)}):", ""]
        lines += [f"- `{name}`" for name in failed[:40]]
        if len(failed) > 40:
            lines.append(f"- … and {len(failed) - 40} more (the tests log has them all)")
    skipped = [(why, n) for s in info.get("steps", []) for why, n in s.get("skip_reasons", {})
               .items()]
    if skipped:
        lines += ["", "Tests skipped on the GPU, by reason:", ""]
        lines += [f"- {n} × {why}" for why, n in sorted(skipped, key=lambda x: -x[1])]
    return lines


def render_fusion(benches: list[dict]) -> list[str]:
    if not benches:
        return []
    provs = [p for p in FUSION_ORDER if any(_median(b, p) for b in benches)]
    head = ["op", "K", "B", "τ", "copy ms", "copy GB/s"] + [f"{p} ms (%copy)" for p in provs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for b in sorted(benches, key=lambda b: (b["extra_info"]["op"], b["extra_info"]["K"],
                                            b["extra_info"]["B"],
                                            -b["extra_info"].get("tau", 1.0))):
        e = b["extra_info"]
        t_copy = _median(b, "copy")
        tau = "–" if e["op"] == "kdef_loss" else f"{e.get('tau', 1.0):g}"
        cells = [e["op"], str(e["K"]), f"{e['B']:,}", tau, _ms(t_copy),
                 _gbs(e["bytes"], t_copy)]
        for p in provs:
            t = _median(b, p)
            cells.append(f"{_ms(t)} ({_pct(t_copy / t if t and t_copy else None)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + render_failures(benches)


def render_embedding(benches: list[dict]) -> list[str]:
    if not benches:
        return []
    by = _by_case(benches)
    provs = [p for p in EMB_ORDER if any(_median(b, p) for b in benches)]
    head = ["ids", "mode", "B", "hottest row", "copy GB/s"] + [f"{p} ms (%copy)" for p in provs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for key in sorted(by, key=lambda k: (k[0], ("forward", "sgd", "rowwise_adagrad").index(k[1])
                                         if k[1] in ("forward", "sgd", "rowwise_adagrad")
                                         else 9, k[2])):
        b = by[key]
        e = b["extra_info"]
        t_copy = _median(b, "copy")
        cells = [e["ids"], e["mode"], f"{e['B']:,}", f"{100 * e['hottest_share']:.1f}%",
                 _gbs(e["bytes"], t_copy)]
        for p in provs:
            t = _median(b, p)
            cells.append(f"{_ms(t)} ({_pct(t_copy / t if t and t_copy else None)})")
        lines.append("| " + " | ".join(cells) + " |")
    # The backward alone: (lookup + backward + update) - lookup, against its own bytes.
    derived = []
    for ids, mode, B, p, t, share in backward_shares(benches):
        b = by[(ids, mode, B)]
        bw = (b["extra_info"]["bytes"] - by[(ids, "forward", B)]["extra_info"]["bytes"]) / t
        derived.append(f"| {ids} | {mode} | {B:,} | {p} | {_ms(t)} | {bw / 1e9:.0f} | "
                       f"{_pct(share)} |")
    if derived:
        lines += ["", "The fused backward alone (step − lookup; reads the output gradient, reads "
                  "and writes each looked-up row):", "",
                  "| ids | optimizer | B | backend | ms | GB/s | %copy |",
                  "|---|---|---:|---|---:|---:|---:|", *derived]
    ratios = []
    for (ids, mode, B), b in sorted(by.items()):
        if ids != "zipf" or ("uniform", mode, B) not in by:
            continue
        u = by[("uniform", mode, B)]
        for p in EMB_CETNET:
            tz, tu = _median(b, p), _median(u, p)
            if tz and tu:
                ratios.append(f"{mode} {p} {tz / tu:.2f}x")
    if ratios:
        lines += ["", "Zipf / uniform time (target ≤ 1.5x): " + ", ".join(ratios) + "."]
    return lines + render_failures(benches)


def render_train(benches: list[dict]) -> list[str]:
    """Time per training step and samples per second, each backend against the first one."""
    lines = []
    for b in benches:
        e = b["extra_info"]
        provs = [p for p in TRAIN_ORDER if _median(b, p)]
        if not provs:
            continue
        first = _median(b, provs[0])
        lines += [f"{e['config']}, batch {e['B']:,}, {e['rows']:,} ids per feature:", "",
                  "| backend | ms / step | samples / s | time vs " + provs[0] + " |",
                  "|---|---:|---:|---:|"]
        for p in provs:
            t = _median(b, p)
            lines.append(f"| {p} | {_ms(t)} | {e['B'] / t:,.0f} | {t / first:.2f}x |")
        skipped = e.get("skipped") or {}
        lines += [f"- {p} skipped: {why}" for p, why in skipped.items()
                  if not str(why).startswith("failed")]
    return lines + render_failures(benches)


def render(info: dict, bench: dict | None) -> str:
    lines = [
        "# GPU results",
        "",
        "Written by `make gpu-check` (bench/gpu_check.py): build with CUDA for the local arch, "
        "a probe that C++ exceptions reach Python, bench/bench_gpu.py, compute-sanitizer "
        "(memcheck, racecheck) over a smoke run, then every CUDA and Triton test. Times are "
        "medians per call from CUDA events over bursts of calls in interleaved rounds; `%copy` "
        "is the provider's bandwidth (the op's minimum bytes over its time) as a share of a "
        "device-to-device copy of the same bytes, measured in the same rounds.",
        "",
        f"- device: **{info.get('device')}** (compute capability {info.get('capability')}), "
        f"{info.get('cpus')} CPUs",
        f"- date {info.get('date')} · torch {info.get('torch')} (CUDA {info.get('cuda')}) · "
        f"triton {info.get('triton')} · Python {info.get('python')} · gpu-check took "
        f"{info.get('total_s')} s",
        "",
        "## Steps",
        "",
        *render_steps(info),
    ]
    if bench:
        benches = bench.get("benchmarks", [])
        fusion = [b for b in benches if b["extra_info"].get("kind") == "fusion"]
        emb = [b for b in benches if b["extra_info"].get("kind") == "embedding"]
        train = [b for b in benches if b["extra_info"].get("kind") == "train"]
        lines += render_targets(fusion, emb)
        if fusion:
            lines += ["", "## Fusion ops (fp32, forward + backward)", "",
                      "`kernels-*`: the backend's forward and backward ops alone "
                      "(torch.ops.cetnet, no autograd); `cetnet-*`: the public op with "
                      "`loss.backward()` / `prob.sum().backward()`; `eager`: the plain-PyTorch "
                      f"reference. Target: ≥ {100 * TARGETS['fusion']:.0f}% of copy at B = 4M.",
                      "", *render_fusion(fusion)]
        if emb:
            e0 = emb[0]["extra_info"]
            lines += ["", f"## Multi-table embedding (M = {e0['M']} members × F = {e0['F']} "
                      f"features, {e0['rows']:,} rows per table, D = {e0['D']}, fp32)", "",
                      "`forward`: the lookup; `sgd` / `rowwise_adagrad`: lookup + backward with "
                      "the fused update. ids: single ids (`uniform`, `zipf`) or `bags` (every "
                      "feature a mean bag of 1-15 uniform ids). Bytes: FBGEMM's accounting "
                      "(forward (L + M·F·B)·D·4, backward 3·L·D·4 more, for L lookups: M·F·B "
                      "single ids, or the bags' values). `torch-loop`: one `nn.Embedding"
                      "(sparse=True)` (`nn.EmbeddingBag` for bags) per member and feature + "
                      "`torch.optim.SGD`. Targets: "
                      f"forward ≥ {100 * TARGETS['forward']:.0f}%, fused-SGD backward ≥ "
                      f"{100 * TARGETS['backward']:.0f}% of copy; Zipf within "
                      f"{TARGETS['zipf_over_uniform']}x of uniform.", "",
                      *render_embedding(emb)]
        if train:
            lines += ["", "## A whole training step", "",
                      "`cetnet train`'s step (batch to the device, loss, backward with the "
                      "embedding's fused row-wise Adagrad, gradient clipping, Adam) for the "
                      "packaged Criteo_x1 config (CETNet of a DNN and a DCNv2, embedding dim 10) "
                      "on synthetic Criteo-shaped batches (13 dense, 26 categorical features, "
                      "Zipf ids); bench/train_step.py.", "", *render_train(train)]
    else:
        lines += ["", "No benchmark results (the bench step did not run or failed)."]
    lines += render_ncu(info.get("ncu") or [])
    return "\n".join(lines) + "\n"


def render_ncu(rows: list[dict]) -> list[str]:
    """The Nsight Compute table of the fusion kernels (gpu_check.ncu_rows), if any."""
    if not rows:
        return []

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    out = ["", "## Nsight Compute: the fusion kernels (bench/profile_fusion.py, B = 4M, K = 4, "
           "fp32)", "",
           "One launch each, `--clock-control none`. A kernel whose schedulers issue on most "
           "cycles while DRAM is far under its peak is bound by instructions, not bandwidth.", "",
           "| kernel | backend | µs | DRAM % of peak | SM % of peak | issued warps / scheduler "
           "/ cycle | registers | achieved occupancy % |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['kernel']} | {r['backend']} | {cell(r, 'us', '.1f')} | "
                   f"{cell(r, 'dram_pct', '.1f')} | {cell(r, 'sm_pct', '.1f')} | "
                   f"{cell(r, 'issued', '.2f')} | {cell(r, 'registers', '.0f')} | "
                   f"{cell(r, 'occupancy_pct', '.1f')} |")
    return out


def main(argv: list[str]) -> int:
    info = json.loads(open(argv[0]).read())
    bench = json.loads(open(argv[1]).read()) if len(argv) > 1 else None
    sys.stdout.write(render(info, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
