"""``cetnet search`` / ``python -m cetnet.search``: the command line of the search
(docs/SEARCH.md). An error of the input is one line ``cetnet search: error: ...``, status 2;
a search whose every trial failed writes its reports and ends in one such line, status 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from cetnet.config import ConfigError
from cetnet.data.csvio import DataFormatError
from cetnet.train.checkpoint import CheckpointError
from cetnet.train.loop import TrainingError
from cetnet.train.rundir import RunDirError

__all__ = ["build_parser", "main"]

PROG = "cetnet search"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from cetnet.search.engine import PROXIES, PRUNERS, SAMPLERS

    ap = _Parser(prog=PROG, description="Search ensembles (kind, K, member architectures, "
                 "dims, fusion, learning rates, batch size) with Optuna: each trial is an "
                 "ordinary cetnet run under --out (docs/SEARCH.md).")
    a = ap.add_argument
    a("--dataset", default="movielens-100k",
      help="movielens-100k (default), synthetic, or a BARS dataset YAML")
    a("--space", default="default", help="the search-space YAML (default: the packaged one)")
    a("--trials", type=int, default=20,
      help="finished (complete or pruned) trials the study should hold (default 20)")
    a("--objective", default="auc", help="auc (default): maximize validation AUC; auc,cost: "
      "also minimize forward FLOPs per sample (a Pareto front)")
    a("--sampler", choices=SAMPLERS, default=None,
      help="default tpe (predictor with --system)")
    a("--system", action="store_true",
      help="tune the system settings of the dataset config's model (batch size, threads, "
      "kernel backend, embedding optimizer) for measured training throughput, with a "
      "throughput predictor proposing the settings (CubicML's approach); writes SYSTEM.md")
    a("--pruner", choices=PRUNERS, default="median",
      help="decides on the warm-up proxy which trials train fully (default median; "
      "single-objective studies only)")
    a("--max-cost", type=float, default=None, metavar="FLOPS",
      help="FLOPs per sample a candidate may have; costlier ones are never trained")
    a("--cost-weight", type=float, default=0.0, metavar="W",
      help="one cost-aware objective: validation AUC - W * log10(FLOPs per sample) "
      "(with --objective auc; default 0: the AUC alone)")
    a("--proxy", choices=PROXIES, default="auc",
      help="what the pruner ranks warmed-up trials by: their validation AUC (default) or the "
      "SiGeo-style score of their warmed-up weights (both are recorded)")
    a("--sigeo-weights", default=None, metavar="Z,F,L",
      help="weights of the SiGeo-style score's terms: zico, fisher_rao, warm-up loss (default "
      "1,1,1; --compare fits them to finished trials)")
    a("--warmup-fraction", type=float, default=0.25,
      help="share of the training rows of the warm-up epoch (default 0.25; 0: no warm-up)")
    a("--storage", default=None,
      help="Optuna storage, any SQLAlchemy URL (default sqlite:///OUT/study.db), e.g. "
      "postgresql://user@host/db for workers on several machines")
    a("--study", default="cetnet-search", help="the study's name in the storage")
    a("--out", type=Path, default=None, help="runs and reports (default runs/search-<dataset>)")
    a("--resume", action="store_true",
      help="continue the study (finished trials are kept, their runs reused)")
    a("--reuse-other-code", action="store_true",
      help="with --resume: continue a study whose trials other code trained (another cetnet "
      "build or torch version; refused otherwise); trials.csv's code column names each "
      "trial's")
    a("--seed", type=int, default=0, help="the sampler's seed (give each worker its own)")
    a("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
      help="config overrides of every trial, e.g. data.num_rows=5000 train.epochs=3; they "
      "apply to the dataset's config, so the space's base and its searched values win over "
      "them (a --set they override is named in a warning: set that key in the space's base "
      "instead)")
    c = ap.add_argument_group("comparing finished studies (writes OUT/COMPARE.md)")
    c.add_argument("--compare", nargs="+", type=Path, default=None, metavar="STUDY_OUT",
                   help="the --out folders of finished studies: their best-so-far curves at "
                   "equal budget, the proxies' correlations over all their trials, the best "
                   "trial of all (trains nothing unless --retrain-seeds)")
    c.add_argument("--retrain-seeds", type=int, default=0, metavar="N",
                   help="with --compare: train the best trial's config from scratch with "
                   "seeds 0..N-1 (and each --baseline likewise), paired by seed")
    c.add_argument("--baseline", action="append", default=[], metavar="CONFIG",
                   help="with --retrain-seeds: a config to compare the best trial with: "
                   "default (cetnet train's), paper (DHEN + InterFormer, the base of the "
                   "trials) or a YAML; repeatable")
    return ap


def _compare(args: argparse.Namespace, argv: Sequence[str]) -> Path:
    from cetnet.search.compare import CompareOptions, compare_studies
    from cetnet.search.engine import main_command

    given = [flag for flag, used in (
        ("--system", args.system), ("--resume", args.resume), ("--storage", args.storage),
        ("--set", args.overrides), ("--sigeo-weights", args.sigeo_weights),
        ("--reuse-other-code", args.reuse_other_code)) if used]
    if given:
        raise ConfigError(f"--compare reads finished studies: {', '.join(given)} belong to "
                          f"running one")
    out = args.out or Path("runs") / "search-compare"
    compare_studies(CompareOptions(studies=args.compare, out=out,
                                   retrain_seeds=args.retrain_seeds, baselines=args.baseline,
                                   command=main_command(argv)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.compare is not None:
            out = _compare(args, argv)
            print(f"{PROG}: wrote {out}/COMPARE.md, compare.csv")
            return 0
        if args.retrain_seeds or args.baseline:
            raise ConfigError("--retrain-seeds and --baseline go with --compare")
        if args.reuse_other_code and not args.resume:
            raise ConfigError("--reuse-other-code continues a study: it goes with --resume")
        from cetnet.search.engine import SearchOptions, main_command, run_search

        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("needs Optuna: pip install optuna") from None
        out = args.out or Path("runs") / f"search-{Path(args.dataset).stem}"
        from cetnet.search.proxies import SIGEO_WEIGHTS, parse_sigeo_weights

        try:
            sigeo_weights = SIGEO_WEIGHTS if args.sigeo_weights is None else \
                parse_sigeo_weights(args.sigeo_weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        options = SearchOptions(
            out=out, dataset=args.dataset, space=args.space, trials=args.trials,
            objective=args.objective,
            sampler=args.sampler or ("predictor" if args.system else "tpe"), pruner=args.pruner,
            warmup_fraction=args.warmup_fraction, proxy=args.proxy, max_cost=args.max_cost,
            cost_weight=args.cost_weight, storage=args.storage, study=args.study,
            resume=args.resume, seed=args.seed, overrides=args.overrides,
            command=main_command(argv), sigeo_weights=sigeo_weights,
            reuse_other_code=args.reuse_other_code)
        if args.system:
            from cetnet.search.system import run_system_search

            ignored = [flag for flag, given in (
                ("--objective", args.objective != "auc"), ("--proxy", args.proxy != "auc"),
                ("--max-cost", args.max_cost is not None), ("--cost-weight", args.cost_weight),
                ("--pruner", args.pruner != "median"), ("--space", args.space != "default"),
                ("--warmup-fraction", args.warmup_fraction != 0.25),
                ("--sigeo-weights", args.sigeo_weights is not None)) if given]
            if ignored:
                raise ConfigError(f"--system measures one model's settings: "
                                  f"{', '.join(ignored)} belong to the architecture search")

            run_system_search(options)
            print(f"{PROG}: wrote {out}/SYSTEM.md, system.csv, best_system.yaml")
        else:
            from cetnet.search.engine import AllTrialsFailed

            try:
                run_search(options)
            except AllTrialsFailed as e:  # ran, wrote its reports, found nothing: status 1
                print(f"{PROG}: error: {e} (reports in {out})", file=sys.stderr)
                return 1
            print(f"{PROG}: wrote {out}/SEARCH.md, trials.csv, pareto.csv")
        return 0
    except (ConfigError, DataFormatError, CheckpointError, TrainingError, RunDirError,
            OSError) as e:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{PROG}: error: {text or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        # Ctrl-C inside Optuna's bookkeeping of a finished trial surfaces as another error
        # raised while handling it (UnboundLocalError in its _run_trial): still an interrupt
        if not _during_interrupt(e):
            raise
        return _interrupted()


def _interrupted() -> int:
    print(f"\n{PROG}: interrupted: continue with the same command and --resume", file=sys.stderr)
    return 130


def _during_interrupt(e: BaseException) -> bool:
    """Whether ``e`` was raised while a KeyboardInterrupt was being handled."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
