"""The Markdown reports (and PNG plots) of the ``embedding-size`` and ``scaling`` studies."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from cetnet.atomic import write_text_atomic
from cetnet.reproduce.report import (_by_seed, _ci, _ms, machine_info, pyplot, report_header,
                                     save_png)
from cetnet.reproduce.rows import Row
from cetnet.reproduce.stats import mean_std, paired_difference

__all__ = ["write_study_report", "member_spread"]


def member_spread(members: Mapping[str, Mapping[str, Sequence[float]]]) -> list[float]:
    """Per seed, the max − min test AUC over the members (0 for one member)."""
    if not members:
        return []
    per_member = [m["auc"] for m in members.values()]
    return [max(v) - min(v) for v in zip(*per_member)]


def _member_mean(members: Mapping[str, Mapping[str, Sequence[float]]]) -> list[float]:
    per_member = [m["auc"] for m in members.values()]
    return [sum(v) / len(v) for v in zip(*per_member)] if per_member else []


def _abundance_mean(entry: Mapping[str, Any]) -> list[float]:
    """Per seed, the mean information abundance over the row's embedding sets."""
    sets = list((entry.get("abundance") or {}).values())
    return [sum(v) / len(v) for v in zip(*sets)] if sets else []


def _m(values: Sequence[float]) -> float:
    return mean_std(values)[0]


def _errorbar(ax: Any, xs: Sequence[float], values: Sequence[Sequence[float]], label: str,
              **kw: Any) -> None:
    ms = [mean_std(v) for v in values]
    keep = [(x, m, 0.0 if math.isnan(s) else s) for x, (m, s) in zip(xs, ms) if not math.isnan(m)]
    if keep:
        ax.errorbar([k[0] for k in keep], [k[1] for k in keep], yerr=[k[2] for k in keep],
                    marker="o", capsize=3, label=label, **kw)


def _embedding_size(specs: Mapping[str, Row], summary: Mapping[str, dict],
                    chosen: Mapping[str, Mapping[int, Any]], folder: Path | None,
                    prefix: str) -> list[str]:
    rows = [r for r in summary if specs[r].params.get("dim")]
    lines = ["", "## AUC against embedding size (test, mean ± std over seeds)", "",
             "| model | embedding dim | embedding parameters | parameters | AUC | gAUC | logloss "
             "| valid AUC |", "|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        s, p = summary[r], specs[r].params
        lines.append(f"| {p['kind']} | {p['dim']} | {s['embedding_parameters'] or 0:,} | "
                     f"{s['num_parameters'] or 0:,} | {_ms(s['test']['auc'])} | "
                     f"{_ms(s['test']['gauc'])} | {_ms(s['test']['logloss'])} | "
                     f"{_ms(s['valid_auc'])} |")
    cet = {specs[r].params["dim"]: r for r in rows if specs[r].params["kind"] == "cetnet"}
    me = {specs[r].params["dim"]: r for r in rows
          if specs[r].params["kind"] == "multi_embedding"}
    pairs = [(cet[a], me[b]) for a in sorted(cet) for b in sorted(me) if a <= b]
    if pairs:
        lines += ["", "## CETNet at a dim against multi-embedding at the same or a larger dim",
                  "", "Paired by seed, test AUC `a − b`, mean [95 % t interval]. The claim holds "
                  "at a pair when the interval is above 0 (*better*) or contains 0 (*comparable*) "
                  "while CETNet uses fewer embedding parameters. Δvalid AUC: the same for the "
                  "validation AUC each row was chosen on.", "",
                  "| a | b | embedding parameters a / b | ΔAUC | verdict | Δvalid AUC | n |",
                  "|---|---|---|---|---|---|---:|"]
        for a, b in pairs:
            d = paired_difference(_by_seed(chosen[a], "auc"), _by_seed(chosen[b], "auc"))
            dv = paired_difference(_by_seed(chosen[a], "valid_auc"),
                                   _by_seed(chosen[b], "valid_auc"))
            ea, eb = summary[a]["embedding_parameters"], summary[b]["embedding_parameters"]
            lines.append(f"| {a} | {b} | {ea or 0:,} / {eb or 0:,} | {_ci(d)} | {d.verdict()} "
                         f"| {_ci(dv)} | {d.n} |")
    if folder is not None and rows:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, by_dim in (("cetnet", cet), ("multi_embedding", me)):
            dims = sorted(by_dim)
            _errorbar(ax, [summary[by_dim[d]]["embedding_parameters"] for d in dims],
                      [summary[by_dim[d]]["test"]["auc"] for d in dims], kind)
            for d in dims:
                m = _m(summary[by_dim[d]]["test"]["auc"])
                if not math.isnan(m):
                    ax.annotate(f"d={d}", (summary[by_dim[d]]["embedding_parameters"], m),
                                fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("embedding parameters (all tables)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        name = save_png(fig, folder / f"{prefix}auc_vs_embedding_parameters.png")
        lines += ["", "## Plot", "", f"![{name}](results/{name})"]
    return lines


def _scaling(specs: Mapping[str, Row], summary: Mapping[str, dict], folder: Path | None,
             prefix: str) -> list[str]:
    rows = [r for r in summary if "k" in specs[r].params]
    lines = ["", "## Ensemble and members against K (test, mean ± std over seeds)", "",
             "*member AUC*: the mean over the K members of each member's own test AUC; *spread*: "
             "max − min member AUC; *abundance*: information abundance Σσ/max σ of the tables "
             "(mean over features and embedding sets; from 1 = collapsed to the dim).", "",
             "| arch | K | tables | method | ensemble AUC | member AUC | spread | ensemble − mean "
             "member | abundance | parameters |", "|---|---:|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        s, p = summary[r], specs[r].params
        ens, mem = s["test"]["auc"], _member_mean(s["members"])
        gap = [a - b for a, b in zip(ens, mem)]
        lines.append(f"| {p['arch']} | {p['k']} | {p['tables']} | {p['method']} | {_ms(ens)} | "
                     f"{_ms(mem)} | {_ms(member_spread(s['members']))} | {_ms(gap)} | "
                     f"{_ms(_abundance_mean(s), 2)} | {s['num_parameters'] or 0:,} |")
    if folder is None or not rows:
        return lines
    plt = pyplot()
    names = []
    for arch in dict.fromkeys(specs[r].params["arch"] for r in rows):
        mine = [r for r in rows if specs[r].params["arch"] == arch]
        single = [r for r in mine if specs[r].params["k"] == 1]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        panels = (("ensemble test AUC", lambda s: s["test"]["auc"]),
                  ("mean member test AUC", lambda s: _member_mean(s["members"])),
                  ("information abundance (mean)", _abundance_mean))
        for (title, get), ax in zip(panels, axes):
            for i, method in enumerate(("naive", "cetnet", "kdef")):
                for tables, style in (("separate", "-"), ("shared", "--")):
                    line = single + [r for r in mine if specs[r].params["method"] == method
                                     and specs[r].params["tables"] == tables]
                    line.sort(key=lambda r: specs[r].params["k"])
                    if len(line) <= len(single):
                        continue
                    _errorbar(ax, [specs[r].params["k"] for r in line],
                              [get(summary[r]) for r in line], f"{method}, {tables}",
                              color=f"C{i}", linestyle=style)
            ax.set_xscale("log", base=2)
            ks = sorted({specs[r].params["k"] for r in mine})
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("K (members)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{arch}: K members of one architecture", y=1.03)
        names.append(save_png(fig, folder / f"{prefix}{arch}.png"))
    return lines + ["", "## Plots", ""] + [f"![{n}](results/{n})" for n in names]


def write_study_report(path: str | Path, study: str, *, command: Sequence[str],
                       specs: Mapping[str, Row], summary: Mapping[str, dict],
                       chosen: Mapping[str, Mapping[int, Any]], base: Mapping[str, Any],
                       seeds: Sequence[int], points: Sequence[Mapping], out: Path,
                       note: str = "", plots: bool = True,
                       codes: Mapping[str, int] | None = None) -> Path:
    """Writes the study's Markdown report (its plots into ``results/`` beside it, named after
    the report, and ``results.json`` into ``out``); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    title = {"embedding-size": "# Study: embedding size (CETNet against multi-embedding)",
             "scaling": "# Study: scaling the number of members"}[study]
    lines = report_header(title, command=command, base=base, seeds=seeds, points=points,
                          out=out, note=note, info=info, codes=codes)
    folder = path.parent / "results" if plots else None
    # named after the report (RESULTS-scaling.md: scaling_*.png), so that two reports of one
    # study side by side keep their own plots
    stem = path.stem.lower().removeprefix("results").strip("-_") or study
    prefix = f"{stem.replace('-', '_')}_"
    if study == "embedding-size":
        lines += _embedding_size(specs, summary, chosen, folder, prefix)
    else:
        lines += _scaling(specs, summary, folder, prefix)
    failed = [f"{r}: {f}" for r, s in summary.items() for f in s["failed"]]
    missing = [f"{r} seed {x}: no finished grid point" for r, s in summary.items()
               for x in seeds if x not in s["seeds"]]
    if failed or missing:
        lines += ["", "## Failures", ""] + [f"- {x}" for x in failed + missing]
    lines.append("")
    write_text_atomic(path, "\n".join(lines))
    raw = {"command": list(command), "study": study, "machine": info,
           "codes": dict(codes or {}), "seeds": list(seeds),
           "rows": {r: {"what": specs[r].what, "params": dict(specs[r].params)} for r in summary},
           "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(raw, indent=1, default=str) + "\n")
    return path
