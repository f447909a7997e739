"""What ``cetnet search`` writes: trials.csv, pareto.csv, SEARCH.md and auc_vs_flops.png, and
the warm-up proxy's rank correlation with the full-training AUC."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from cetnet.atomic import atomic_write, write_text_atomic

__all__ = ["kendall_tau", "spearman", "rank_correlation", "pareto_front", "trial_rows",
           "distinct_rows", "best_row", "csv_text", "write_plot", "write_outputs", "BEST_CONFIG"]

METRICS = ("objective", "over_max_cost", "proxy_auc", "sigeo", "zico", "fisher_rao", "neg_warmup_loss", "valid_auc",
           "valid_gauc", "valid_logloss", "test_auc", "flops", "params", "step_ms", "seconds")
#: What the report correlates with the full-training validation AUC: the proxies of a warmed-up
#: trial (cetnet.search.proxies) and, as the naive baselines zero-cost proxies are measured
#: against, the parameter count and the FLOPs.
BEST_CONFIG = "best_config.yaml"  # the best trial's run config, for cetnet train --config
CORRELATED = (("proxy_auc", "warm-up validation AUC"),
              ("sigeo", "SiGeo-style score (zico + fisher_rao - warm-up loss)"),
              ("zico", "ZiCo term (gradient mean / spread)"),
              ("fisher_rao", "Fisher-Rao norm (log)"),
              ("neg_warmup_loss", "minus the warm-up training loss"),
              ("params", "parameters (baseline)"), ("flops", "FLOPs per sample (baseline)"))


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (nan when one side is
    constant)."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties counted as scipy.stats.kendalltau does)."""
    concordant = discordant = tie_x = tie_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + tie_x) * (concordant + discordant + tie_y))
    return (concordant - discordant) / denom if denom > 0 else math.nan


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """``{n, kendall_tau, spearman, by}``: scipy's when installed, else this module's."""
    n = len(x)
    if n < 3:
        return {"n": n, "kendall_tau": math.nan, "spearman": math.nan, "by": "-"}
    try:
        from scipy import stats

        return {"n": n, "kendall_tau": float(stats.kendalltau(x, y).statistic),
                "spearman": float(stats.spearmanr(x, y).statistic), "by": "scipy"}
    except ImportError:
        return {"n": n, "kendall_tau": kendall_tau(x, y), "spearman": spearman(x, y),
                "by": "cetnet.search.report"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(auc, flops)`` no other point dominates (an AUC at least as
    high at no more FLOPs, better in one of them)."""
    front = []
    for i, (a, f) in enumerate(points):
        if not any((b >= a and g <= f) and (b > a or g < f) for b, g in points):
            front.append(i)
    return front


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, the metrics of :data:`METRICS`, the run directory
    and every parameter (``param.<name>``; empty where the trial did not sample it)."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    # how the study measured FLOPs and the warm-up proxies (cost.COST_VERSION; a study saved
    # without it: 1), so that --compare does not pool trials measured two ways
    version = getattr(study, "user_attrs", {}).get("setup", {}).get("cost_version", 1)
    rows = []
    for t in trials:
        row = {"number": t.number, "state": t.state.name}
        row.update({m: t.user_attrs.get(m, "") for m in METRICS})
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        row["error"] = t.user_attrs.get("error", "")
        # why the trial has no SiGeo statistics (e.g. a split of too few batches)
        row["proxy_error"] = t.user_attrs.get("proxy_error", "")
        row["cost_version"] = version
        # the code that trained it (cetnet.code_identity's digest; empty: an earlier cetnet)
        row["code"] = t.user_attrs.get("code", "")
        row.update({f"param.{n}": t.params.get(n, "") for n in names})
        rows.append(row)
    return rows


def csv_text(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def distinct_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials of ``rows``, one per run directory (the first trial that trained
    it; ``row["same_as"]``: the later trials' numbers). A sampler that draws a config again
    gets the same run back, reused: the same metrics, not a new measurement, so it must count
    once in a correlation and appear once on a front (as ``--compare`` counts configs)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["state"] != "COMPLETE":
            continue
        key = r["run_dir"] or f"#{r['number']}"  # a trial without a run directory: itself
        if key in seen:
            seen[key]["same_as"].append(r["number"])
        else:
            seen[key] = {**r, "same_as": []}
    return list(seen.values())


def _finite(value: Any) -> bool:
    return value != "" and value is not None and math.isfinite(float(value))


def _front_rows(study: Any, rows: list[dict[str, Any]], multi: bool) -> list[dict[str, Any]]:
    complete = [r for r in distinct_rows(rows) if _finite(r["valid_auc"]) and _finite(r["flops"])]
    if multi:
        best = {t.number for t in study.best_trials}
        front = [r for r in complete if r["number"] in best]
    else:
        front = [complete[i] for i in pareto_front([(r["valid_auc"], r["flops"])
                                                    for r in complete])]
    return sorted(front, key=lambda r: r["flops"])


def _fmt(value: Any, digits: int = 4) -> str:
    if value == "" or value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_plot(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (6, 4)
               ) -> bool:
    """Draws ``draw(ax)`` on a new figure and writes it to ``path`` as a PNG, atomically;
    ``False`` (nothing written) when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return True


def _plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> bool:
    return write_plot(path, lambda ax: _draw_front(ax, rows, front))


def _draw_front(ax: Any, rows: list[dict[str, Any]], front: list[dict[str, Any]]) -> None:
    done = [r for r in rows if r["valid_auc"] != "" and r["flops"] != ""]
    ax.scatter([r["flops"] for r in done], [r["valid_auc"] for r in done], s=18,
               color="tab:blue", label="trials")
    if front:
        ax.plot([r["flops"] for r in front], [r["valid_auc"] for r in front], "o-",
                color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per sample")
    ax.set_ylabel("validation AUC (full training)")
    ax.legend()


def write_outputs(study: Any, out: Path, objectives: Sequence[str], command: str,
                  cost_weight: float | None = None) -> dict:
    """Writes the four outputs; returns ``{"rows", "front", "correlation", "best"}``.
    ``cost_weight``: the study's ``--cost-weight`` (None: the one its setup recorded)."""
    if cost_weight is None:  # the setup records it when it is set
        cost_weight = float(getattr(study, "user_attrs", {}).get("setup", {})
                            .get("cost_weight") or 0.0)
    rows = trial_rows(study)
    columns = list(rows[0]) if rows else ["number", "state", *METRICS, "run_dir", "error",
                                          "proxy_error", "cost_version", "code"]
    write_text_atomic(out / "trials.csv", csv_text(rows, columns))
    multi = len(objectives) > 1
    front = _front_rows(study, rows, multi)
    write_text_atomic(out / "pareto.csv", csv_text([{c: r[c] for c in columns} for r in front],
                                                   columns))
    distinct = distinct_rows(rows)
    corr = {}
    for name, _ in CORRELATED:
        # finite pairs only: one NaN (a diverged warm-up, a log of 0) makes the whole row NaN
        pairs = [(float(r[name]), float(r["valid_auc"])) for r in distinct
                 if _finite(r[name]) and _finite(r["valid_auc"])]
        corr[name] = rank_correlation([p for p, _ in pairs], [a for _, a in pairs])
    plotted = _plot(rows, front, out / "auc_vs_flops.png")
    best = best_row(rows, front, multi)
    wrote_config = best is not None and _write_best_config(best, out / BEST_CONFIG)
    if not wrote_config:  # never leave an earlier invocation's best config standing
        (out / BEST_CONFIG).unlink(missing_ok=True)
    write_text_atomic(out / "SEARCH.md", _markdown(study, rows, front, corr, objectives,
                                                   command, plotted, best, wrote_config,
                                                   cost_weight))
    return {"rows": rows, "front": front, "correlation": corr, "best": best}


def best_row(rows: list[dict[str, Any]], front: list[dict[str, Any]],
             multi: bool) -> dict[str, Any] | None:
    """The best completed trial: by the study's objective (the validation AUC, or the AUC
    less the cost with ``--cost-weight``); with two objectives, the Pareto-front trial of the
    highest validation AUC. ``None`` when no trial completed."""
    complete = front if multi else [r for r in rows
                                    if r["state"] == "COMPLETE" and r["valid_auc"] != ""]
    if not complete:
        return None
    return max(complete, key=lambda r: r["valid_auc"] if multi or r["objective"] == ""
               else r["objective"])


def _write_best_config(best: dict[str, Any], path: Path) -> bool:
    """Writes the best trial's resolved run config (its ``full/config.yaml``), a file ``cetnet
    train --config`` takes as it is; ``False`` when that run directory is not on this machine
    (a worker elsewhere trained it)."""
    from cetnet.config import dump_config, read_yaml

    source = Path(best["run_dir"]) / "full" / "config.yaml"
    if not source.is_file():
        return False
    dump_config(read_yaml(source), path)
    return True


def _numbers(row: dict[str, Any]) -> str:
    """``"3"``, or ``"3 (= 5, 8)"`` when later trials drew the same config."""
    again = row.get("same_as") or []
    return f"{row['number']}" + (f" (= {', '.join(map(str, again))})" if again else "")


def _markdown(study: Any, rows: list[dict[str, Any]], front: list[dict[str, Any]],
              corr: dict[str, dict[str, Any]], objectives: Sequence[str], command: str,
              plotted: bool, best: dict[str, Any] | None, wrote_config: bool,
              cost_weight: float = 0.0) -> str:
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    if len(objectives) > 1:
        objective = (f"{' and '.join(objectives)} (maximize validation AUC, minimize forward "
                     "FLOPs per sample)")
    elif cost_weight:  # what the study maximizes, not the AUC alone
        objective = (f"auc - {cost_weight:g} * log10(FLOPs per sample) (maximize validation "
                     f"AUC less {cost_weight:g} per decade of forward FLOPs per sample; "
                     "--cost-weight)")
    else:
        objective = f"{' and '.join(objectives)} (maximize validation AUC)"
    lines = [f"# Search: {study.study_name}", "", f"Objective: {objective}.",
             "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ".",
             "", "Command:", "", "```", command, "```", "", "## Best trial", ""]
    if best is not None:
        by = f"objective {_fmt(best['objective'])}, " if cost_weight else ""
        lines += [f"Trial {best['number']}: {by}validation AUC {_fmt(best['valid_auc'])}, gAUC "
                  f"{_fmt(best['valid_gauc'])}, logloss {_fmt(best['valid_logloss'])}, test AUC "
                  f"{_fmt(best['test_auc'])}, {_fmt(best['flops'], 0)} FLOPs/sample, "
                  f"{best['params']} parameters; its run: `{best['run_dir']}/full` "
                  "(config.yaml, metrics.json)" + (
                      f"; as a train config: {BEST_CONFIG} (`cetnet train --config "
                      f"{BEST_CONFIG}`)." if wrote_config else
                      f"; that run is not on this machine, so no {BEST_CONFIG} was written."),
                  "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| {k[6:]} | {v} |" for k, v in best.items()
                  if k.startswith("param.") and v != ""]
    else:
        lines.append("No trial completed.")
    lines += ["", "## Pareto front (validation AUC vs FLOPs per sample)", "",
              "One row per config: when later trials drew it again (and got its run back), "
              "their numbers follow the first's, as in \"3 (= 5, 8)\".", "",
              "| trial | valid AUC | FLOPs/sample | parameters | proxy AUC |",
              "|---|---|---|---|---|"]
    lines += [f"| {_numbers(r)} | {_fmt(r['valid_auc'])} | {_fmt(r['flops'], 0)} | "
              f"{r['params']} | {_fmt(r['proxy_auc'])} |" for r in front]
    lines += ["", "## Warm-up proxies", "",
              "Rank correlation of each proxy with the full-training validation AUC, over the "
              "distinct completed trials (a config drawn again counts once: its run was reused) "
              "whose proxy and AUC are both finite, n of them per row (pruned trials have no "
              "full AUC):", "",
              "| proxy | trials | Kendall tau | Spearman |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {corr[name]['n']} | {_fmt(corr[name]['kendall_tau'], 3)} | "
              f"{_fmt(corr[name]['spearman'], 3)} |" for name, what in CORRELATED]
    by = next((c["by"] for c in corr.values() if c["by"] != "-"), "-")  # rows of n < 3: none
    lines += ["", f"(computed by {by})", ""]
    if plotted:
        lines += ["![AUC vs FLOPs](auc_vs_flops.png)", ""]
    lines += ["All trials: trials.csv; the front: pareto.csv.", ""]
    return "\n".join(lines)
