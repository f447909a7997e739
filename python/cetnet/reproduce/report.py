"""Aggregation over seeds, paired comparisons, and the Markdown report with its plots."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cetnet.atomic import write_bytes_atomic, write_text_atomic
from cetnet.code_identity import describe
from cetnet.reproduce.rows import CETNET_VARIANTS, PEER_ROWS, ROWS, SINGLE_ROWS
from cetnet.reproduce.stats import PairedDiff, mean_std, paired_difference

__all__ = ["METRICS", "summarize", "comparisons", "write_report", "report_header",
           "machine_info", "pyplot", "save_png"]

#: (name, higher is better)
METRICS = (("auc", True), ("gauc", True), ("logloss", False))


def _ms(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± std`` of the finite values; non-finite ones (a NaN metric of a seed) are
    counted, not hidden: ``0.8050 ± 0.0071 (1 of 3 NaN)``, or ``NaN (3 of 3)``."""
    given = [float(v) for v in values if v is not None]
    finite = [v for v in given if math.isfinite(v)]
    bad = len(given) - len(finite)
    note = f" ({bad} of {len(given)} NaN)" if bad else ""
    m, s = mean_std(finite)
    if math.isnan(m):
        return f"NaN ({bad} of {len(given)})" if bad else "–"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}") + note


def _mean_finite(values: Any) -> float:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(xs) / len(xs) if xs else math.nan


def summarize(chosen: Mapping[str, Mapping[int, Mapping[str, Any]]],
              all_results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict]:
    """Per row: the seeds, the chosen results' test metrics (fused and per member), their
    mean / std, parameter count, train seconds (chosen point, and the whole grid), mean fusion
    weight per member, failures."""
    out = {}
    for row, by_seed in chosen.items():
        res = [by_seed[s] for s in sorted(by_seed)]
        m = [r["metrics"] for r in res]
        entry: dict[str, Any] = {
            "seeds": sorted(by_seed),
            "num_parameters": res[0]["num_parameters"] if res else None,
            "test": {k: [x["fused"][k] for x in m] for k, _ in METRICS},
            "valid_auc": [x["valid"]["fused"]["auc"] for x in m],
            "train_seconds": [x["train_seconds"] for x in m],
            "samples_per_s": [x["train_samples"] / x["train_seconds"] for x in m
                              if x.get("train_samples") and x.get("train_seconds")],
            "grid_seconds": [sum(r.get("wall_seconds", 0.0) for r in all_results[row]
                                 if r["seed"] == s) for s in sorted(by_seed)],
            "best_epoch": [x["best_epoch"] for x in m],
            "grid_chosen": [r["grid"] for r in res],
            "failed": [f"seed {r['seed']} point {r['point']}: {r['error']}"
                       for r in all_results[row] if r.get("error")],
        }
        entry["embedding_parameters"] = res[0].get("embedding_parameters") if res else None
        if m and all("abundance" in x for x in m):
            # per embedding set: the mean over its features' tables, one value per seed
            entry["abundance"] = {name: [_mean_finite(x["abundance"][name].values())
                                         for x in m] for name in m[0]["abundance"]}
        members = list(m[0]["members"]) if m else []
        entry["members"] = {name: {k: [x["members"][name][k] for x in m] for k, _ in METRICS}
                            for name in members}
        if m and all("fusion_weights" in x for x in m):
            entry["fusion_weights"] = {name: [x["fusion_weights"][name] for x in m]
                                       for name in members}
        out[row] = entry
    return out


def _by_seed(chosen: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, float]:
    """Per seed, the fused test ``metric``; ``valid_auc``: the fused validation AUC (the
    metric the grid point and the best epoch were chosen on)."""
    if metric == "valid_auc":
        return {s: r["metrics"]["valid"]["fused"]["auc"] for s, r in chosen.items()}
    return {s: r["metrics"]["fused"][metric] for s, r in chosen.items()}


def best_member_row(summary: Mapping[str, dict], members: Sequence[str]) -> str | None:
    """Of the single rows of CETNet's member architectures, the one with the best mean
    validation AUC (selection on validation, never test)."""
    cands = {k: mean_std(summary[k]["valid_auc"])[0] for k in dict.fromkeys(members)
             if k in SINGLE_ROWS and k in summary and summary[k]["valid_auc"]}
    return max(cands, key=cands.__getitem__) if cands else None


def comparisons(chosen: Mapping[str, Mapping[int, Mapping[str, Any]]],
                summary: Mapping[str, dict], members: Sequence[str]) -> list[dict]:
    """Paired (per seed) differences ``a - b`` of the test metrics and of the validation AUC
    (``diffs["valid_auc"]``) with 95 % t intervals: cetnet vs its best member alone, scaled_single, naive, multi_embedding, kdef(_shared); each
    CETNet variant vs cetnet and vs naive."""
    pairs: list[tuple[str, str, str]] = []
    best = best_member_row(summary, members)
    if "cetnet" in chosen:
        if best:
            pairs.append(("cetnet", best, f"(a) best member alone ({best})"))
        for b, what in (("scaled_single", "(b) one bigger single model, same parameters"),
                        ("naive", "(c) naive ensemble"), ("multi_embedding", "(d) multi-embedding"),
                        ("kdef", "(e) KDEF"), ("kdef_shared", "(e') KDEF, shared embedding")):
            if b in chosen:
                pairs.append(("cetnet", b, what))
        for v in CETNET_VARIANTS:
            if v in chosen:
                pairs.append((v, "cetnet", "variant vs the cetnet row"))
    for v in CETNET_VARIANTS:
        if v in chosen and "naive" in chosen:
            pairs.append((v, "naive", "variant vs naive ensemble"))
    for peer in PEER_ROWS:
        mine = peer.removeprefix("fuxictr_")
        if peer in chosen and mine in chosen:
            pairs.append((mine, peer, f"cetnet's {mine} vs FuxiCTR's (the peer)"))
    out = []
    for a, b, what in pairs:
        diffs = {m: paired_difference(_by_seed(chosen[a], m), _by_seed(chosen[b], m))
                 for m in [*(name for name, _ in METRICS), "valid_auc"]}
        out.append({"a": a, "b": b, "what": what, "diffs": diffs})
    return out


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _ci(d: PairedDiff, digits: int = 4) -> str:
    if d.n == 0:
        return "NaN" if d.nonfinite else "–"
    if d.n < 2:
        return f"{d.mean:+.{digits}f} (1 seed)"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> str:
    """Writes ``fig`` as a PNG to ``path`` atomically, closes it; returns the file name."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
    return path.name


def _plots(summary: Mapping[str, dict], comps: Sequence[dict], folder: Path,
           prefix: str = "") -> list[str]:
    """PNG plots into ``folder``; returns their file names."""
    plt = pyplot()
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        names.append(save_png(fig, folder / (prefix + name)))

    rows = [r for r in summary if summary[r]["seeds"]]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
        for i, r in enumerate(rows):
            vals = summary[r]["test"]["auc"]
            m, s = mean_std(vals)
            ax.errorbar([m], [i], xerr=[0 if math.isnan(s) else s], fmt="o", color="C0",
                        capsize=3)
            ax.scatter(vals, [i] * len(vals), s=10, color="C1", alpha=0.6, zorder=3)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlabel("test AUC (fused): mean ± std over seeds; dots: seeds")
        ax.grid(axis="x", alpha=0.3)
        save(fig, "test_auc_by_row.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            p = summary[r]["num_parameters"]
            ax.scatter([p], [mean_std(summary[r]["test"]["auc"])[0]], s=20)
            ax.annotate(r, (p, mean_std(summary[r]["test"]["auc"])[0]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("mean test AUC")
        ax.grid(alpha=0.3)
        save(fig, "auc_vs_parameters.png")
    shown = [c for c in comps if c["diffs"]["auc"].n >= 1]
    if shown:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.2))
        for i, c in enumerate(shown):
            d = c["diffs"]["auc"]
            err = [[d.mean - d.low], [d.high - d.mean]] if d.n >= 2 else None
            ax.errorbar([d.mean], [i], xerr=err, fmt="o", capsize=3, color="C0")
            ax.scatter(d.diffs, [i] * len(d.diffs), s=10, color="C1", alpha=0.6, zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(shown)), [f"{c['a']} − {c['b']}" for c in shown])
        ax.invert_yaxis()
        ax.set_xlabel("paired test AUC difference: mean, 95 % t interval; dots: seeds")
        ax.grid(axis="x", alpha=0.3)
        save(fig, "paired_auc_differences.png")
    return names


def report_header(title: str, *, command: Sequence[str], base: Mapping[str, Any],
                  seeds: Sequence[int], points: Sequence[Mapping], out: Path, note: str,
                  info: Mapping[str, Any], peer_rows: bool = False,
                  codes: Mapping[str, int] | None = None) -> list[str]:
    """The report's first lines: title, note, the exact command, machine, the code that
    trained the results (``codes``: {description: number of results}), data, the training
    budget every row shares, seeds, tuning and where the raw results are."""
    t = base["train"]
    lines = [title, ""]
    if note:
        lines += [f"> **{note}**", ""]
    lines += [
        "Written by:", "", "```", "cetnet reproduce " + shlex.join(command), "```", "",
        f"- date: {info['date']}",
        f"- machine: {info['platform']}, {info['cpu']}, {info['cpu_count']} CPUs"
        + (f", GPU {info['cuda']}" if info["cuda"] else ""),
        f"- python {info['python']}, torch {info['torch']}; device `{base['device']}`, "
        f"backend `{base['backend']}`",
        *_code_lines(codes or {}),
        f"- data: `{json.dumps(base['data'])}`",
        f"- training budget (every row): epochs {t['epochs']}, batch {t['batch_size']}, "
        f"max_steps_per_epoch {t['max_steps_per_epoch']}, patience {t['patience']}, "
        f"schedule {t['lr_schedule']} (warmup {t['warmup_steps']}), embedding dim "
        f"{base['model'].get('embedding_dim')}, embedding optimizer "
        f"{base['model'].get('embedding_optimizer')}",
        f"- seeds: {', '.join(map(str, seeds))} (train.seed: initial weights, batch order, "
        "dropout; the data is the same for every seed)",
        f"- tuning: {len(points)} grid point(s) per (row, seed)"
        + (": " + ", ".join("{" + ", ".join(f"{k}={v:g}" for k, v in p.items()) + "}"
                            for p in points) if points and points[0] else
           " (the base config's train.lr and model.embedding_lr)")
        + ("; a FuxiCTR row runs the points' distinct train.lr only (FuxiCTR's Adam trains its "
           "tables at train.lr; model.embedding_lr is cetnet's)"
           if peer_rows and any(k.startswith("model.") for p in points for k in p) else "")
        + "; the point with the best validation fused AUC is kept, its test metrics reported",
        f"- raw results: `{out}` (one JSON per run, keyed by a hash of its config)",
    ]
    return lines


#: How :func:`code_counts` names the FuxiCTR version of the peer rows' results.
PEER_CODE = "FuxiCTR "


def code_counts(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``{description: number of results}`` of the cetnet builds that trained ``results``, and
    ``{"FuxiCTR <version>": n}`` of the peer rows' (a peer result names both)."""
    counts: Counter[str] = Counter()
    for r in results:
        code = r.get("code")
        if isinstance(code, dict) and "fuxictr" in code:
            counts[f"{PEER_CODE}{code['fuxictr']}"] += 1
            code = {k: v for k, v in code.items() if k != "fuxictr"}
        counts[describe(code)] += 1
    return dict(counts)


def _code_lines(codes: Mapping[str, int]) -> list[str]:
    """A line for the cetnet builds that trained the results and one for the peer rows'
    FuxiCTR versions, in bold when there are several (results of other code reused)."""
    peers = {k: n for k, n in codes.items() if k.startswith(PEER_CODE)}
    builds = {k: n for k, n in codes.items() if k not in peers}
    lines = []
    for counts, one, several in (
            (builds, "trained by: {} (all {} results)",
             "**trained by {} builds of the code** ({}): results of other code were reused "
             "(--reuse-other-code), so a paired difference may compare runs of different code"),
            (peers, "peer rows trained by {} ({} results)",
             "**peer rows trained by {} FuxiCTR versions** ({}): results of another were "
             "reused (--reuse-other-code)")):
        if len(counts) == 1:
            lines.append("- " + one.format(*next(iter(counts.items()))))
        elif counts:
            parts = "; ".join(f"{what}: {n}" for what, n in counts.items())
            lines.append("- " + several.format(len(counts), parts))
    return lines


def write_report(path: str | Path, *, command: Sequence[str], summary: Mapping[str, dict],
                 comps: Sequence[dict], base: Mapping[str, Any], seeds: Sequence[int],
                 grid: Mapping[str, Sequence[float]] | str, points: Sequence[Mapping],
                 scaled: Mapping[str, Any] | None, out: Path, note: str = "",
                 plots: bool = True, codes: Mapping[str, int] | None = None) -> Path:
    """Writes the Markdown report (and ``results/*.png`` beside it, and ``results.json`` in
    ``out``); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    lines = report_header("# CETNet reproduction results", command=command, base=base,
                          seeds=seeds, points=points, out=out, note=note, info=info,
                          peer_rows=any(r.startswith("fuxictr_") for r in summary), codes=codes)
    if scaled:
        lines.append(f"- scaled_single = `{scaled['kind']}` at embedding dim {scaled['dim']} "
                     f"(widths scaled alike): {scaled['num_parameters']:,} parameters vs the "
                     f"cetnet row's {scaled['target']:,}")
    lines += ["", "## Rows", "", "| row | what | parameters |", "|---|---|---:|"]
    for r, s in summary.items():
        p = s["num_parameters"]
        lines.append(f"| {r} | {ROWS[r].what} | {p:,} |" if p else f"| {r} | {ROWS[r].what} | – |")
    lines += ["", "## Test metrics (chosen grid point), mean ± std over seeds", "",
              "| row | seeds | AUC | gAUC | logloss | valid AUC | train s | samples/s | grid s "
              "| best epoch |",
              "|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r, s in summary.items():
        lines.append(
            f"| {r} | {len(s['seeds'])} | {_ms(s['test']['auc'])} | {_ms(s['test']['gauc'])} "
            f"| {_ms(s['test']['logloss'])} | {_ms(s['valid_auc'])} | "
            f"{_ms(s['train_seconds'], 0)} | {_ms(s.get('samples_per_s', []), 0)} | "
            f"{_ms(s['grid_seconds'], 0)} | {_ms(s['best_epoch'], 1)} |")
    multi = {r: s for r, s in summary.items() if len(s["members"]) > 1}
    if multi:
        lines += ["", "## Members inside the ensembles (test, mean ± std over seeds)", "",
                  "| row | member | AUC | gAUC | logloss | mean fusion weight |",
                  "|---|---|---|---|---|---|"]
        for r, s in multi.items():
            for name, mm in s["members"].items():
                w = s.get("fusion_weights", {}).get(name)
                lines.append(f"| {r} | {name} | {_ms(mm['auc'])} | {_ms(mm['gauc'])} | "
                             f"{_ms(mm['logloss'])} | {_ms(w, 3) if w else '–'} |")
    if comps:
        lines += ["", "## Paired differences over seeds (a − b), 95 % t intervals", "",
                  "Per seed, the difference of the two rows' test metrics, and of their "
                  "validation AUC (the metric each row's grid point and epoch were chosen on); "
                  "mean [95 % CI] with t_{0.975, n−1}. *better/worse*: the interval excludes 0 "
                  "(for logloss lower is better); *within seed noise*: it does not. The verdict "
                  "is for each comparison on its own: no correction for the many comparisons "
                  "of the table.", "",
                  "| a | b | question | ΔAUC | ΔgAUC | Δlogloss | AUC verdict | Δvalid AUC "
                  "| n |",
                  "|---|---|---|---|---|---|---|---|---:|"]
        for c in comps:
            d = c["diffs"]
            lines.append(f"| {c['a']} | {c['b']} | {c['what']} | {_ci(d['auc'])} | "
                         f"{_ci(d['gauc'])} | {_ci(d['logloss'])} | {d['auc'].verdict()} "
                         f"| {_ci(d['valid_auc'])} | {d['auc'].n} |")
    failed = [f"{r}: {f}" for r, s in summary.items() for f in s["failed"]]
    missing = [f"{r} seed {x}" for r, s in summary.items() for x in seeds if x not in s["seeds"]]
    if failed or missing:
        lines += ["", "## Failures", ""] + [f"- {x}" for x in failed + [
            f"{m}: no finished grid point" for m in missing]]
    if plots:
        # plots of another report beside docs/RESULTS.md get their own names
        prefix = "" if path.stem == "RESULTS" else \
            path.stem.lower().removeprefix("results").strip("-_") + "_"
        pngs = _plots(summary, comps, path.parent / "results", prefix)
        if pngs:
            lines += ["", "## Plots", ""] + [f"![{n}](results/{n})" for n in pngs]
    lines.append("")
    write_text_atomic(path, "\n".join(lines))
    raw = {"command": list(command), "machine": info, "codes": dict(codes or {}),
           "seeds": list(seeds), "grid": grid,
           "scaled_single": scaled, "summary": summary,
           "comparisons": [{**c, "diffs": {k: vars(v) for k, v in c["diffs"].items()}}
                           for c in comps]}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(raw, indent=1, default=str) + "\n")
    return path
