"""``cetnet reproduce`` / ``python -m cetnet.reproduce``: train and compare the rows over
seeds with equal data, budget and tuning, then write the report (docs/REPRODUCE.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cetnet.atomic import check_output_file
from cetnet.config import ConfigError
from cetnet.cli import USER_ERRORS, one_line
from cetnet.data.movielens import SPLIT_KINDS
from cetnet.models.build import MEMBERS
from cetnet.reproduce.experiment import GRIDS, Experiment, base_config, grid_points
from cetnet.reproduce.report import code_counts, comparisons, summarize, write_report
from cetnet.reproduce.rows import ROW_NAMES, ROWS, parse_rows
from cetnet.reproduce.studies import (DEFAULT_ARCHS, DEFAULT_DIMS, DEFAULT_KS, STUDIES,
                                      embedding_size_rows, parse_archs, parse_ints, scaling_rows)
from cetnet.reproduce.study_report import write_study_report

__all__ = ["add_arguments", "run", "main", "build_parser", "study_rows"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``cetnet reproduce`` to ``parser``."""
    a = parser.add_argument
    a("--dataset", default="movielens-100k",
      help="movielens-100k (default), synthetic, or a BARS dataset YAML")
    a("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    a("--study", choices=STUDIES, default="main",
      help="main: the rows of the comparison (default); embedding-size: CETNet and "
      "multi-embedding at --dims; scaling: K = --ks members of each of --archs, separate or "
      "shared tables, naive / CETNet / KDEF")
    a("--rows", default="all", help=f"comma-separated rows of the main study (default all): "
      f"{','.join(ROW_NAMES)}")
    a("--dims", default=",".join(map(str, DEFAULT_DIMS)),
      help="embedding dims of the embedding-size study (default %(default)s)")
    a("--ks", default=",".join(map(str, DEFAULT_KS)),
      help="member counts of the scaling study (default %(default)s)")
    a("--archs", default=",".join(DEFAULT_ARCHS),
      help="member architectures of the scaling study (default %(default)s)")
    a("--out", default=None, help="where runs and results are cached (default "
      "runs/reproduce-<dataset>)")
    a("--resume", action="store_true", help="continue the experiment in --out (re-running "
      "does the same: finished runs are never trained again); refuses an --out without results")
    a("--split", choices=SPLIT_KINDS, default=None,
      help="MovieLens-100k split (default: the base config's, user_time for the packaged one)")
    a("--grid", choices=list(GRIDS), default="small",
      help="tuning grid per (row, seed): small = train.lr x model.embedding_lr 2x2 (default), "
      "none = the config's values")
    a("--config", default=None, help="base config (default: the packaged CETNet of the "
      "paper's pair, DHEN + InterFormer: cetnet_dhen_interformer_ml100k.yaml)")
    a("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
      help="config overrides for every row, e.g. train.epochs=3 data.num_rows=5000")
    a("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    a("--scaled-arch", default="auto", choices=["auto", *MEMBERS],
      help="architecture of scaled_single (auto: the best of CETNet's members trained alone, "
      "by mean validation AUC)")
    a("--report", default=None, help="the Markdown report (plots go to results/ beside it; "
      "default docs/RESULTS.md, docs/RESULTS-<study>.md for a study)")
    a("--note", default="", help="a line put at the top of the report (e.g. 'reduced run: ...')")
    a("--no-plots", action="store_true", help="write no PNG plots")
    a("--keep-checkpoints", action="store_true", help="keep each run's directory "
      "(checkpoints); by default only its result JSON is kept")
    a("--retry-failed", action="store_true", help="train again the runs stored as failed")
    a("--reuse-other-code", action="store_true", help="reuse cached results trained by other "
      "code (another cetnet build or torch version) instead of training them again; the "
      "report names each result's code")
    a("--dry-run", action="store_true", help="list the runs (and parameter counts), train "
      "nothing, write no report")
    return parser


def study_rows(args: argparse.Namespace) -> list:
    """The rows the chosen ``--study`` trains (names for main, :class:`Row` s otherwise)."""
    if args.study == "embedding-size":
        return embedding_size_rows(parse_ints(args.dims, "--dims"))
    if args.study == "scaling":
        return scaling_rows(parse_archs(args.archs), parse_ints(args.ks, "--ks"))
    return parse_rows(args.rows)


#: The most seeds a study takes (each trains every row once).
MAX_SEEDS = 1000


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="cetnet reproduce",
        description="Train and compare the rows over seeds with equal data, budget and tuning, "
                    "then write the report (docs/REPRODUCE.md)."))


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Runs the command for parsed ``args``; ``argv`` (for the report) defaults to
    ``sys.argv[2:]`` when run as ``cetnet reproduce``."""
    if argv is None:
        argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "reproduce" else sys.argv[1:]
    try:
        if not 1 <= args.seeds <= MAX_SEEDS:
            raise ConfigError(f"reproduce: --seeds must be in [1, {MAX_SEEDS}], got "
                              f"{args.seeds}")
        overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"]
                                            if args.epochs is not None else [])
        base = base_config(args.dataset, config=args.config, overrides=overrides,
                           split=args.split)
        stem = Path(args.dataset).stem if args.dataset.endswith((".yaml", ".yml")) \
            else args.dataset
        suffix = "" if args.study == "main" else f"-{args.study}"
        out = Path(args.out or f"runs/reproduce-{stem}{suffix}")
        report = args.report or f"docs/RESULTS{suffix}.md"
        check_output_file(report, "--report")  # before hours of training, not after
        if args.resume and not (out / "results").is_dir():
            raise FileNotFoundError(f"reproduce: --resume: no results in {out} to continue")
        rows = study_rows(args)
        peers = [r for r in rows if isinstance(r, str) and ROWS[r].trainer == "fuxictr"]
        if peers:
            from cetnet.reproduce.peers import INSTALL_HINT, fuxictr_available

            if not fuxictr_available():
                raise ConfigError(f"reproduce: rows {', '.join(peers)} need FuxiCTR: "
                                  f"{INSTALL_HINT}; or leave those rows out with --rows")
        exp = Experiment(base, rows, list(range(args.seeds)), args.grid, out,
                         scaled_arch=args.scaled_arch, keep_checkpoints=args.keep_checkpoints,
                         retry_failed=args.retry_failed,
                         reuse_other_code=args.reuse_other_code)
        for row in exp.specs:  # every row validates before anything trains
            if row == "scaled_single":
                continue
            count = exp.num_parameters(row)  # (a peer's config is validated by cetnet too)
            print(f"{row}: " + (f"{count:,} parameters" if exp.specs[row].trainer == "cetnet"
                                else "parameters counted by its trainer as it trains"),
                  flush=True)
        exp.run(dry_run=args.dry_run)
        if args.dry_run:
            return 0
        chosen = {}
        all_results = {}
        for row in exp.specs:  # the rows' names
            results = [r for r in (exp.read_result(j.key) for j in exp._jobs_cached(row))
                       if r is not None]
            all_results[row] = results
            chosen[row] = {s: c for s in exp.seeds
                           if (c := exp.chosen(row, s)) is not None}
        summary = summarize(chosen, all_results)
        codes = code_counts(r for rs in all_results.values() for r in rs)
        if args.study != "main":
            path = write_study_report(report, args.study, command=list(argv), specs=exp.specs,
                                      summary=summary, chosen=chosen, base=base,
                                      seeds=exp.seeds, points=grid_points(args.grid), out=out,
                                      note=args.note, plots=not args.no_plots,
                                      codes=codes)
            print(f"reproduce: report written to {path}")
            return 0
        comps = comparisons(chosen, summary, base["model"].get("members") or [])
        path = write_report(report, command=list(argv), summary=summary, comps=comps,
                            base=base, seeds=exp.seeds, grid=args.grid,
                            points=grid_points(args.grid), scaled=exp.scaled, out=out,
                            note=args.note, plots=not args.no_plots, codes=codes)
        print(f"reproduce: report written to {path}")
        for c in comps:
            d = c["diffs"]["auc"]
            print(f"  {c['a']} - {c['b']}: test AUC {d.mean:+.4f} "
                  + (f"[{d.low:+.4f}, {d.high:+.4f}] " if d.n >= 2 else "")
                  + f"-> {d.verdict()}")
        return 0
    except USER_ERRORS as e:  # as `cetnet`'s own: also when run as python -m cetnet.reproduce
        print(f"cetnet reproduce: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue where it stopped",
              file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
