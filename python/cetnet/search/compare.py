"""``cetnet search --compare OUT [OUT ...]``: finished studies of one space side by side.

- **Equal budget**: the best validation AUC found within the first n finished trials of each
  study (its best-so-far curve), n up to the smallest study's count: random vs TPE vs the
  predictor, say, each run with ``--pruner none`` and the same ``--trials``.
- **Proxies**: the rank correlation of each proxy with the full-training AUC over every
  distinct completed trial of all the studies (a config trained by several studies, such as
  the random start-up trials samplers share when seeded alike, counts once).
- **The winner retrained** (``--retrain-seeds N``): the best trial's config trained from
  scratch with seeds 0..N-1, beside each ``--baseline`` config trained with the same seeds;
  mean ± std of the test metrics and the paired difference per seed with its 95 % interval.

Writes COMPARE.md, compare.csv (the curves) and best_so_far.png into ``--out``. The retrained
runs live in ``OUT/retrain/<code>/<config key>/seed-<s>`` and are reused when found finished
(``<code>``: :func:`cetnet.code_identity.code_tag`, so runs of another build are not).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cetnet import code_identity as code_id
from cetnet.atomic import write_text_atomic
from cetnet.config import ConfigError
from cetnet.search.report import (BEST_CONFIG, CORRELATED, METRICS, csv_text, pareto_front,
                                  rank_correlation, write_plot)

__all__ = ["CompareOptions", "StudyTrials", "read_trials", "best_so_far", "compare_studies"]

FINISHED = ("COMPLETE", "PRUNED")  # the states that count towards a study's --trials
TEST_METRICS = (("auc", "AUC", True), ("gauc", "gAUC", True), ("logloss", "logloss", False))


class CompareError(ConfigError):
    """A study folder or baseline ``--compare`` cannot use (one line, naming it)."""


@dataclass
class CompareOptions:
    studies: Sequence[Path]
    out: Path
    retrain_seeds: int = 0
    baselines: Sequence[str] = ()
    command: str = ""
    say: Callable[[str], None] = field(default=lambda text: print(text, flush=True))


@dataclass
class StudyTrials:
    """One study's trials.csv: ``label`` (its folder's name) and rows by trial number, values
    parsed (numbers as float, empty cells as ``None``)."""

    label: str
    folder: Path
    rows: list[dict[str, Any]]

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] in FINISHED]

    @property
    def cost_versions(self) -> set[str]:
        """How the study measured FLOPs and the warm-up proxies (``trials.csv``'s
        ``cost_version``; a file written before the column: ``"1"``)."""
        return {str(r.get("cost_version") or "1") for r in self.rows} or {"1"}


def _number(text: str) -> float | None:
    if text in ("", None):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_trials(folder: Path) -> StudyTrials:
    """The trials of the study whose outputs are in ``folder`` (its ``trials.csv``)."""
    path = Path(folder) / "trials.csv"
    if not path.is_file():
        raise CompareError(f"--compare {folder}: no trials.csv there (the --out of a finished "
                           f"cetnet search)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"number", "state", "valid_auc", "run_dir"} - set(reader.fieldnames or ())
        if missing:
            raise CompareError(f"--compare {path}: not a cetnet search trials.csv (no "
                               f"{', '.join(sorted(missing))} column)")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row: dict[str, Any] = dict(raw)
            try:
                row["number"] = int(raw["number"])
            except (TypeError, ValueError):
                raise CompareError(f"--compare {path}:{line}: trial number "
                                   f"{raw['number']!r} is not an integer") from None
            for name in METRICS:
                if name in row:
                    row[name] = _number(raw[name])
            rows.append(row)
    rows.sort(key=lambda r: r["number"])
    return StudyTrials(Path(folder).name or str(folder), Path(folder), rows)


def _auc(row: dict[str, Any]) -> float | None:
    """The trial's full-training validation AUC; ``None`` when it has none or it is NaN.
    (Not its objective: with ``--cost-weight`` that is the AUC less a cost, and studies are
    compared on what they all share.)"""
    value = row.get("valid_auc")
    return value if value is not None and math.isfinite(value) else None


def best_so_far(study: StudyTrials) -> list[tuple[float | None, dict[str, Any] | None]]:
    """Per finished trial, in trial order: the best validation AUC among the finished trials
    so far and the row that holds it (``(None, None)`` until one completed; pruned trials use
    budget and add nothing)."""
    best: tuple[float | None, dict[str, Any] | None] = (None, None)
    curve = []
    for row in study.finished:
        value = _auc(row) if row["state"] == "COMPLETE" else None
        if value is not None and (best[0] is None or value > best[0]):
            best = (value, row)
        curve.append(best)
    return curve


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _checkpoints(n: int) -> list[int]:
    marks = sorted({k for k in (1, 5, 10, 15, 20, 30, 40, 50, 75, 100) if k < n} | {n})
    return [k for k in marks if k >= 1]


def _distinct_complete(studies: Sequence[StudyTrials]) -> list[dict[str, Any]]:
    """The completed trials of all the studies, one per config (the first study that has it
    names it: ``row["study"]``)."""
    seen: dict[str, dict[str, Any]] = {}
    for study in studies:
        for row in study.rows:
            if row["state"] == "COMPLETE" and _auc(row) is not None:
                # the run folder's name is the hash of the trial's config: one config, once
                key = Path(row["run_dir"]).name if row["run_dir"] else \
                    f"{study.label}#{row['number']}"
                seen.setdefault(key, {**row, "study": study.label})
    return list(seen.values())


def _sigeo_fit_section(distinct: list[dict[str, Any]]) -> list[str]:
    """The SiGeo-style score's weights fitted to these trials, and how well a fit ranks trials
    it was not fitted on (two folds: alternate trials)."""
    from cetnet.search.proxies import SIGEO_TERMS, fit_sigeo_weights

    rows = [r for r in distinct if all(r.get(t) is not None and math.isfinite(r[t])
                                       for t in SIGEO_TERMS)]
    if len(rows) < 8:
        return []

    def terms(part: list[dict[str, Any]]) -> list[list[float]]:
        return [[r[t] for t in SIGEO_TERMS] for r in part]

    def tau(weights: tuple[float, ...], part: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [sum(w * r[t] for w, t in zip(weights, SIGEO_TERMS)) for r in part]
        return rank_correlation(scores, [r["valid_auc"] for r in part])

    weights, _ = fit_sigeo_weights(terms(rows), [r["valid_auc"] for r in rows])
    fitted = tau(weights, rows)
    folds = (rows[0::2], rows[1::2])
    held = []
    for train, test in (folds, folds[::-1]):
        w, _ = fit_sigeo_weights(terms(train), [r["valid_auc"] for r in train])
        held.append(tau(w, test))
    text = ",".join(f"{w:.4g}" for w in weights)
    lines = ["### The SiGeo-style score with fitted weights", "",
            f"Weights of (zico, fisher_rao, loss) fitted to these {len(rows)} trials (the "
            "direction of the standardized terms with the highest Kendall tau): "
            f"`--proxy sigeo --sigeo-weights {text}`.", "",
            "| SiGeo-style score | Kendall tau | Spearman |", "|---|---:|---:|",
            f"| weights fitted to all these trials (in sample) | "
            f"{_fmt(fitted['kendall_tau'], 3)} | {_fmt(fitted['spearman'], 3)} |"]
    lines += [f"| fitted to half {a} (every other trial), ranking half {b} ({h['n']} trials) | "
              f"{_fmt(h['kendall_tau'], 3)} | {_fmt(h['spearman'], 3)} |"
              for (a, b), h in zip((("A", "B"), ("B", "A")), held)]
    return lines + [""]


def _trial_name(row: dict[str, Any]) -> str:
    return f"{row['study']} #{row['number']}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _plot(studies: Sequence[StudyTrials], curves: Sequence[list], n: int, path: Path) -> bool:
    def draw(ax: Any) -> None:
        for study, curve in zip(studies, curves):
            points = [(i + 1, v) for i, (v, _) in enumerate(curve[:n]) if v is not None]
            if points:
                ax.step([p[0] for p in points], [p[1] for p in points], where="post",
                        label=study.label)
        ax.set_xlabel("finished trials")
        ax.set_ylabel("best validation AUC so far")
        ax.legend()

    return write_plot(path, draw)


# -- the winner retrained over seeds ---------------------------------------------------------

#: the packaged configs ``--baseline`` takes by name
BASELINE_NAMES = {"default": "default config", "paper": "paper's CETNet (DHEN + InterFormer)"}


def _baseline_config(spec: str) -> tuple[str, dict]:
    """``(label, config)`` of ``--baseline``: ``default`` (``cetnet train``'s default config),
    ``paper`` (the paper's pair, the base of the search's trials) or a config YAML."""
    from cetnet.config import load_config, paper_config_path

    if spec not in BASELINE_NAMES and not Path(spec).is_file():
        raise CompareError(f"--baseline {spec}: no such file (default, paper, or a config "
                           "YAML)")
    try:
        config = load_config({"default": None, "paper": paper_config_path()}.get(spec, spec))
    except ConfigError as e:
        raise CompareError(f"--baseline {spec}: {e}") from None
    return BASELINE_NAMES.get(spec, Path(spec).name), config


def _train_seeds(config: dict, seeds: int, out: Path,
                 say: Callable[[str], None], label: str) -> dict[int, dict]:
    """``{seed: metrics}`` of ``config`` trained with ``train.seed`` 0..seeds-1 (reused when a
    finished run of the same config and seed, trained by this code, is in ``out``: the runs are
    kept per code, so a comparison never pairs a run of an earlier build with new ones)."""
    import copy

    from cetnet.config import validate_config
    from cetnet.reproduce.experiment import config_key
    from cetnet.train.runner import train_or_reuse

    results = {}
    for seed in range(seeds):
        run = copy.deepcopy(config)
        run["train"] = {**run["train"], "seed": seed}
        run = validate_config(run)
        key = config_key({**run, "name": ""})
        code = code_id.code_tag(code_id.code_identity(run["device"]))
        metrics, reused = train_or_reuse(run, out / "retrain" / code / key / f"seed-{seed}")
        results[seed] = metrics
        say(f"retrain {label}, seed {seed}: test AUC {metrics['fused']['auc']:.4f}"
            + (" (reused)" if reused else ""))
    return results


def _winner_config_path(winner: dict[str, Any]) -> Path:
    """The best trial's ``full/config.yaml``: at its recorded run path, or (a path relative to
    where the search ran) under the study folder's ``runs/``."""
    recorded = Path(winner["run_dir"])
    runs = winner["folder"] / "runs"  # runs/<code>/<key>, or runs/<key> before runs were per code
    for run in (recorded, runs / recorded.parent.name / recorded.name, runs / recorded.name):
        if (run / "full" / "config.yaml").is_file():
            return run / "full" / "config.yaml"
    raise CompareError(f"--retrain-seeds: the best trial's run {recorded}/full/config.yaml is "
                       f"not on this machine (nor under {winner['folder'] / 'runs'})")


def _retrain_entries(winner: dict[str, Any], options: CompareOptions
                     ) -> list[tuple[str, dict[str, Any]]]:
    """``(label, config)`` of the best trial and each baseline, checked (a baseline must
    train on the best trial's data): before anything is written or trained."""
    from cetnet.config import read_yaml, validate_config

    best = validate_config(read_yaml(_winner_config_path(winner)))
    entries = [("best trial", best)]
    for spec in options.baselines:
        label, config = _baseline_config(spec)
        if config["data"] != best["data"]:  # a paired comparison on other data means nothing
            raise CompareError(f"--baseline {spec}: its data section {config['data']} is not "
                               f"the best trial's {best['data']}")
        entries.append((label, config))
    return entries


def _study_data(study: StudyTrials) -> dict[str, Any] | None:
    """The data section of a finished trial's run config, when a run of the study is on this
    machine (None otherwise: nothing to check)."""
    from cetnet.config import read_yaml

    for row in study.finished:
        try:
            return read_yaml(_winner_config_path({**row, "folder": study.folder})).get("data")
        except (CompareError, ConfigError, OSError):
            continue
    return None


def _per_seed(runs: dict[int, dict], key: str) -> dict[int, float]:
    """``{seed: value}`` of a fused test metric, or of the validation AUC (``valid_auc``)."""
    if key == "valid_auc":
        return {s: r["valid"]["fused"]["auc"] for s, r in runs.items()}
    return {s: r["fused"][key] for s, r in runs.items()}


def _retrain_section(entries: list[tuple[str, dict[str, Any]]],
                     options: CompareOptions) -> list[str]:
    from cetnet.reproduce.stats import mean_std, paired_difference

    seeds = options.retrain_seeds
    results = [(label, config, _train_seeds(config, seeds, options.out, options.say, label))
               for label, config in entries]
    lines = ["## The best trial retrained from scratch", "",
             f"Each config trained with `train.seed` 0..{seeds - 1} (initial weights, batch "
             "order, dropout; the data is the same), its own epochs and early stopping; test "
             "metrics of the best validation epoch, mean ± std over seeds:", "",
             "| config | members | epochs | AUC | gAUC | logloss | valid AUC |",
             "|---|---|---:|---|---|---|---|"]
    for label, config, runs in results:
        cells = []
        for key, _, _ in TEST_METRICS:
            m, sd = mean_std([r["fused"][key] for r in runs.values()])
            cells.append(f"{_fmt(m)} ± {_fmt(sd)}")
        m, sd = mean_std([r["valid"]["fused"]["auc"] for r in runs.values()])
        model = config["model"]
        members = ", ".join(model.get("members") or []) or "-"
        lines.append(f"| {label} ({model['ensemble']}) | {members} | "
                     f"{config['train']['epochs']} | " + " | ".join(cells)
                     + f" | {_fmt(m)} ± {_fmt(sd)} |")
    lines += ["", "Per seed, validation AUC / test AUC:", "",
              "| seed | " + " | ".join(label for label, _, _ in results) + " |",
              "|---:|" + "---|" * len(results)]
    for seed in range(seeds):
        lines.append(f"| {seed} | " + " | ".join(
            f"{_fmt(runs[seed]['valid']['fused']['auc'])} / {_fmt(runs[seed]['fused']['auc'])}"
            for _, _, runs in results) + " |")
    if len(results) > 1:
        lines += ["", "Paired by seed, each config minus every one after it (95 % t interval; "
                  "validation AUC is what the configs are chosen on, the test metrics are "
                  "reported beside):", "",
                  "| a | b | metric | mean difference | 95 % interval | verdict |",
                  "|---|---|---|---:|---|---|"]
        for i, (a, _, a_runs) in enumerate(results):
            for b, _, b_runs in results[i + 1:]:
                for key, name, higher in (("valid_auc", "valid AUC", True), *TEST_METRICS):
                    d = paired_difference(_per_seed(a_runs, key), _per_seed(b_runs, key))
                    lines.append(f"| {a} | {b} | {name} | {d.mean:+.4f} | "
                                 f"[{_fmt(d.low)}, {_fmt(d.high)}] | {d.verdict(higher)} |")
    return lines + [""]


def compare_studies(options: CompareOptions) -> dict[str, Any]:
    """Reads the studies, writes COMPARE.md, compare.csv and best_so_far.png into
    ``options.out``; returns ``{"studies", "budget", "curves", "correlation", "winner"}``."""
    if not options.studies:
        raise CompareError("--compare needs the --out folder of at least one study")
    if options.retrain_seeds < 0:
        raise CompareError(f"--retrain-seeds must be >= 0, got {options.retrain_seeds}")
    if options.baselines and not options.retrain_seeds:
        raise CompareError("--baseline is trained beside the retrained best trial: give "
                           "--retrain-seeds N too")
    studies = [read_trials(Path(folder)) for folder in options.studies]
    labels = [s.label for s in studies]
    if len(set(labels)) != len(labels):
        raise CompareError(f"--compare: two study folders share a name ({', '.join(labels)}); "
                           f"the folder's name labels its study")
    for study in studies:
        if not study.finished:
            raise CompareError(f"--compare {study.folder}: the study has no finished trial")
    for spec in options.baselines:  # a bad baseline fails before anything trains
        _baseline_config(spec)
    versions = {s.label: ",".join(sorted(s.cost_versions)) for s in studies}
    if len(set(versions.values())) > 1:  # their fronts and proxy fits would pool two measures
        first, *_ = versions
        other = next(k for k in versions if versions[k] != versions[first])
        raise CompareError(f"--compare: studies {first} and {other} measured FLOPs and the "
                           f"warm-up proxies differently (cost version {versions[first]} vs "
                           f"{versions[other]}: before version 2 attention counted no FLOPs and "
                           f"the warm-up loss was the training objective); compare studies of "
                           f"one version")
    data = {s.label: d for s in studies if (d := _study_data(s)) is not None}
    if len({json.dumps(d, sort_keys=True, default=str) for d in data.values()}) > 1:
        # their curves and front would be pooled
        first, *_ = data
        other = next(k for k in data if data[k] != data[first])
        raise CompareError(f"--compare: studies {first} and {other} ran on different data "
                           f"({data[first]} vs {data[other]}); compare studies of one dataset")
    budget = min(len(s.finished) for s in studies)
    curves = [best_so_far(s) for s in studies]
    options.out.mkdir(parents=True, exist_ok=True)

    rows = [{"trials": k, **{s.label: _fmt(c[k - 1][0]) if k <= len(c) else ""
                             for s, c in zip(studies, curves)}}
            for k in range(1, max((len(c) for c in curves), default=0) + 1)]
    write_text_atomic(options.out / "compare.csv", csv_text(rows, ["trials", *labels]))

    # the code that trained the trials (trials.csv's code; empty: a cetnet that did not record
    # it): the studies are compared as they were run, and the reader sees when code differs
    codes = {s.label: sorted({r.get("code") or "unrecorded" for r in s.finished})
             for s in studies}
    mixed = [label for label, c in codes.items() if len(c) > 1]
    code_line = ("Trials trained by code " + "; ".join(
        f"{label}: {', '.join(c)}" for label, c in codes.items())
        + (" (**studies of different code**: a difference between them may be the code's)"
           if len({tuple(c) for c in codes.values()}) > 1 else "")
        + (f" (**{', '.join(mixed)}: trials of several codes**, continued with "
           "--reuse-other-code: a difference between their trials may be the code's)"
           if mixed else "") + ".")
    lines = ["# Search studies compared", "", "Command:", "", "```", options.command, "```", "",
             code_line, "",
             "## Best validation AUC so far, at equal budget", "",
             f"Each study's best validation AUC within its first n finished trials, "
             f"n up to {budget}, the finished trials of the smallest study (trial order; a "
             "pruned trial uses budget and adds nothing):", "",
             "| study | " + " | ".join(f"n = {k}" for k in _checkpoints(budget))
             + " | found at trial | its test AUC |",
             "|---|" + "---:|" * (len(_checkpoints(budget)) + 2)]
    winner: dict[str, Any] | None = None
    for study, curve in zip(studies, curves):
        cells = [_fmt(curve[k - 1][0]) for k in _checkpoints(budget)]
        _, row = curve[budget - 1]
        found = "-" if row is None else str(row["number"])
        test = "-" if row is None else _fmt(row.get("test_auc"))
        lines.append(f"| {study.label} | " + " | ".join(cells) + f" | {found} | {test} |")
        value, row = curve[-1]  # the winner: of every trial, past the equal budget too
        if value is not None and row is not None and \
                (winner is None or value > winner["valid_auc"]):
            winner = {**row, "study": study.label, "folder": study.folder}
    plotted = _plot(studies, curves, budget, options.out / "best_so_far.png")
    if plotted:
        lines += ["", "![best so far](best_so_far.png)"]

    distinct = _distinct_complete(studies)
    corr = {}
    for name, _ in CORRELATED:
        pairs = [(r[name], r["valid_auc"]) for r in distinct
                 if r.get(name) is not None and math.isfinite(r[name])]
        corr[name] = rank_correlation([p for p, _ in pairs], [a for _, a in pairs])
    lines += ["", "## Warm-up proxies over all the studies", "",
              f"Rank correlation with the full-training validation AUC over the {len(distinct)} "
              "distinct completed trials (a config several studies trained counts once):", "",
              "| proxy | trials | Kendall tau | Spearman |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {corr[name]['n']} | {_fmt(corr[name]['kendall_tau'], 3)} | "
              f"{_fmt(corr[name]['spearman'], 3)} |" for name, what in CORRELATED]
    lines += ["", f"(computed by {corr['proxy_auc']['by']})", ""]
    lines += _sigeo_fit_section(distinct)
    costed = [r for r in distinct if r.get("flops") is not None and math.isfinite(r["flops"])]
    front = sorted((costed[i] for i in pareto_front([(r["valid_auc"], r["flops"])
                                                     for r in costed])),
                   key=lambda r: r["flops"])
    lines += ["## Pareto front of all the studies (validation AUC vs FLOPs per sample)", "",
              "| trial | valid AUC | test AUC | FLOPs/sample | parameters | step ms |",
              "|---|---|---|---:|---:|---:|"]
    lines += [f"| {_trial_name(r)} | {_fmt(r['valid_auc'])} | {_fmt(r.get('test_auc'))} | "
              f"{r['flops']:,.0f} | {_count(r.get('params'))} | {_fmt(r.get('step_ms'), 1)} |"
              for r in front]
    lines.append("")

    if winner is None:
        lines += ["No trial completed.", ""]
    else:
        lines += ["## Best trial of all", "",
                  f"Study {winner['study']}, trial {winner['number']}: validation AUC "
                  f"{_fmt(winner['valid_auc'])}, test AUC {_fmt(winner.get('test_auc'))}; its "
                  f"run `{winner['run_dir']}/full`, its config `{winner['study']}/{BEST_CONFIG}` "
                  "when it is that study's best.", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| {k[6:]} | {v} |" for k, v in winner.items()
                  if k.startswith("param.") and v not in ("", None)]
        lines.append("")
        if options.retrain_seeds:  # hours of training: what is known is written first
            entries = _retrain_entries(winner, options)
            write_text_atomic(options.out / "COMPARE.md", "\n".join(
                lines + ["(The retrained runs are in progress.)", ""]))
            lines += _retrain_section(entries, options)
    write_text_atomic(options.out / "COMPARE.md", "\n".join(lines))
    return {"studies": studies, "budget": budget, "curves": curves, "correlation": corr,
            "winner": winner}
