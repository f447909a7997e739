"""The ``cetnet`` command line: ``cetnet train``, ``cetnet evaluate``, ``cetnet predict``,
``cetnet export``, ``cetnet data prepare``, ``cetnet data list``, ``cetnet models``,
``cetnet reproduce``, ``cetnet search``, ``cetnet --version``.

Examples::

    cetnet train                                   # the default config (CETNet on ML-100k)
    cetnet train --config my.yaml --epochs 3 --set model.fusion.temperature=0.5
    cetnet train --resume runs/cetnet_ml100k-20250101-120000 --epochs 12
    cetnet train --out runs/t05 --overwrite        # replace the run in runs/t05
    cetnet train --dry-run --set model.dnn.hidden=[64]   # check everything, write no run
    cetnet evaluate runs/cetnet_ml100k-20250101-120000 --split valid
    cetnet predict runs/t05 --csv new_rows.csv --out new_rows_predictions.csv
    cetnet export runs/t05 runs/t05/model.pt2      # torch.export program for serving
    cetnet data prepare movielens-100k                # what the default config trains on
    cetnet data prepare movielens-100k --from ml-100k.zip    # offline: a copy from GroupLens
    cetnet data list                                  # datasets and their options
    cetnet models                                     # ensembles, members, their options
    cetnet reproduce --dataset movielens-100k --seeds 5       # the evidence (docs/REPRODUCE.md)
    cetnet search --dataset movielens-100k --trials 40        # Optuna search (docs/SEARCH.md)
    cetnet --plugin my_datasets train --set data.name=my_log   # a module that registers more

A failure caused by the input (a config value, a file, a checkpoint, a run directory in use,
a training loss that stopped being finite) ends in one line ``cetnet <command>: error: ...``
and exit status 2; a traceback means a bug. Output cut short by a closed pipe (``cetnet data list
| head -1``) ends quietly with exit status 141, as a program killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from cetnet.config import ConfigError, load_config, parse_value
from cetnet.data.csvio import DataFormatError
from cetnet.train.checkpoint import LAST, CheckpointError, has_last
from cetnet.train.loop import TrainingError
from cetnet.train.rundir import CONFIG_FILE, RunDirError

__all__ = ["main", "build_parser", "parse_args", "train_config", "OOVTally", "list_separators",
           "OOV_WARN_SHARE", "OOV_WARN_RATIO"]

#: The embedding optimizers of the fused kernels (``model.embedding_optimizer``).
FUSED_EMBEDDING_OPTIMIZERS = ("sgd", "rowwise_adagrad")
SPLITS = ("train", "valid", "test")
#: The exit status when stdout is a pipe closed early: 128 + SIGPIPE, what a shell reports for
#: a program that SIGPIPE ended (Python ignores the signal, so it ends the program itself).
BROKEN_PIPE_STATUS = 141
_CHECKPOINT_HELP = ("best.pt (default), last.pt, or the path of a checkpoint file (anything "
                    "with a '/': one kept elsewhere; it must fit the run's model)")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line like every other error of the CLI
    (``cetnet train: error: ...``, status 2); the usage is one ``--help`` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: computed when asked (it imports torch and the kernels)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of cetnet, torch and the kernels, and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from cetnet.catalog import version_text

        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cetnet", description="Train and evaluate CTR ensembles.")
    ap.add_argument("--version", action=_Version)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (it may register datasets and models); "
                         "repeatable; also $CETNET_PLUGINS=mod1,mod2")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model from a config",
                        description="Train from a YAML config plus dotted overrides "
                                    "(KEY=VALUE, e.g. train.epochs=3 model.fusion.temperature=0.5).")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    tr.add_argument("--config", type=Path, help="YAML config (default: the packaged "
                                                "cetnet_ml100k.yaml; with --resume: the run's)")
    tr.add_argument("--set", dest="set_", nargs="+", action="extend", default=[],
                    metavar="KEY=VALUE", help="config overrides (same as the positional ones)")
    tr.add_argument("--backend", choices=["auto", "reference"], help="kernel backend")
    tr.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    tr.add_argument("--embedding", choices=["cetnet", "torchrec"],
                    help="who holds the member tables: cetnet's fused embedding (default) or "
                         "TorchRec's, sharded over the ranks (docs/DISTRIBUTED.md)")
    tr.add_argument("--out", type=Path, help="run directory (default runs/<name>-<timestamp>); "
                                             "it must be empty or new unless --resume or "
                                             "--overwrite")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run in --out: its files are deleted before the new run "
                         "writes, with an export or predictions under their default names "
                         "(model.pt2, predictions_*.csv); files that are not a run's are never "
                         "deleted")
    tr.add_argument("--epochs", type=int, help="train.epochs")
    tr.add_argument("--seed", type=int, help="train.seed")
    # RUN_DIR is required: with an optional one, `--resume train.epochs=3` read the override
    # as the directory and `--out D --resume` made the next argument's meaning depend on it.
    tr.add_argument("--resume", type=Path, metavar="RUN_DIR",
                    help="continue the interrupted run in RUN_DIR (with its config.yaml unless "
                         "--config is given; --out, if given, must name the same directory); "
                         "its data and model must not change, other changes are printed")
    tr.add_argument("--dry-run", action="store_true",
                    help="check the config, the dataset, the model (built without memory), the "
                         "run directory and the --resume checkpoint; write no run (the dataset "
                         "is fetched and its encoding cached, as a run would)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    tr.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")

    ev = _run_parser(
        sub, "evaluate", "score a finished run's checkpoint on a split",
        "Rebuild a run's dataset and model from RUN_DIR (config.yaml and a checkpoint), score "
        "a split of its dataset (fused and per-member AUC, gAUC, logloss, mean fusion "
        "weights), print the table and write it into RUN_DIR as eval_<split>.json "
        "(eval_<split>_last.json for last.pt; a checkpoint given as a path gets a name of its "
        "own). A run of a registered dataset or model needs `cetnet --plugin MODULE evaluate "
        "...`.")
    ev.add_argument("--split", default="test", choices=SPLITS,
                    help="the split to score (default test)")
    ev.add_argument("--batch-size", type=_positive_int, metavar="N",
                    help="rows per forward pass (default the run's train.eval_batch_size)")
    ev.add_argument("--device", help="override the run's device")

    pd = _run_parser(
        sub, "predict", "write a finished run's predictions of a split or of a csv of new rows",
        "Rebuild a run's dataset and model from RUN_DIR (config.yaml and a checkpoint), score "
        "a split of its dataset or the rows of a csv, print the scores when the rows have "
        "labels of both classes, and write one csv line per row: row, prob, label, "
        "prob_<member>... and, for CETNet, weight_<member>... A run of a registered dataset or "
        "model needs `cetnet --plugin MODULE predict ...`.")
    rows = pd.add_mutually_exclusive_group()
    rows.add_argument("--split", default="test", choices=SPLITS,
                      help="the split of the run's dataset to score (default test)")
    rows.add_argument("--csv", type=Path, metavar="FILE",
                      help="new rows to score: a header and one column per feature of the run, "
                           "raw values as in the dataset's files ('|' between the values of a "
                           "bag or a sequence); the label column is optional. A run on a BARS "
                           "dataset (data: {name: bars, config: YAML}) reads the rows in that "
                           "dataset's own csv format instead: its YAML's columns, and between "
                           "the values of a sequence the feature's splitter there (default "
                           "'^'); a value in another format reads as out of vocabulary")
    pd.add_argument("--out", type=Path, required=True, metavar="FILE",
                    help="the predictions csv (refused if it exists, unless --overwrite)")
    pd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pd.add_argument("--batch-size", type=_positive_int, metavar="N",
                    help="rows per forward pass (default the run's train.eval_batch_size)")
    pd.add_argument("--device", help="override the run's device")

    ex = _run_parser(
        sub, "export", "export a finished run's model as a torch.export program (.pt2)",
        "Rebuild a run's model from RUN_DIR (config.yaml and a checkpoint) and save it with "
        "torch.export to OUT.pt2, with the feature schema and member names inside "
        "(cetnet_serving.json). The program takes plain tensors (any batch size) and runs "
        "wherever cetnet_kernels is importable, on the device it was exported on; "
        "cetnet.serve.load_exported reads it. It needs the compiled kernels (a run trained "
        "with backend reference is exported on them, with the same weights).")
    ex.add_argument("out", type=Path, metavar="OUT.pt2",
                    help="the program file (refused if it exists, unless --overwrite)")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT.pt2 if it exists")
    ex.add_argument("--device", default="cpu",
                    help="the device to export on, where the program will run (default cpu)")

    sub.add_parser("models", help="list the ensembles and members with their options")

    da = sub.add_parser("data", help="dataset commands")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("list", help="list the datasets and their options")
    pr = dsub.add_parser(
        "prepare", help="download and cache a dataset, print its summary",
        description="Download (or install from --from) and encode a dataset into the data cache "
                    "($CETNET_DATA, else ~/.cache/cetnet; root=DIR for another), then print its "
                    "summary. movielens-100k is downloaded from "
                    "https://files.grouplens.org/datasets/movielens/ml-100k.zip; without network, "
                    "download that file elsewhere and give it with --from.")
    pr.add_argument("name")
    pr.add_argument("--from", dest="from_", type=Path, metavar="PATH",
                    help="install the raw files from a local copy instead of downloading: "
                         "ml-100k.zip, or a folder holding u.data, u.user, u.item (or holding "
                         "ml-100k/ with them)")
    pr.add_argument("options", nargs="*", metavar="KEY=VALUE",
                    help="options of the dataset (e.g. root=~/.cache/cetnet); for the dataset "
                         "of the default config, its options (e.g. max_seq_len) unless given")

    ca = dsub.add_parser(
        "caches", help="list the encoded-dataset caches in folders; --prune removes superseded",
        description="List the encoded-dataset cache files under each DIR (default: the data "
                    "root, $CETNET_DATA or ~/.cache/cetnet; a BARS dataset's is its "
                    "data.cache_dir) with their size and status: current, superseded (an input "
                    "file was rewritten or replaced since: the cache can never be read again), "
                    "missing-input (an input cannot be read now: kept), other-version (another "
                    "cetnet's: kept) or unknown (written before cetnet recorded its inputs). "
                    "--prune deletes the superseded ones.")
    ca.add_argument("dirs", nargs="*", type=Path, metavar="DIR")
    ca.add_argument("--prune", action="store_true", help="delete the superseded caches")

    pl = sub.add_parser(
        "plan", help="memory, communication and step time of the embedding tables on N GPUs",
        description="Per GPU and training step, under data-parallel, table-wise, column-wise "
                    "and row-wise sharding: the tables' and optimizer's memory, the bytes "
                    "communicated, the embedding kernels' and communication time (kernel rates "
                    "measured in bench/), and the sharding to choose. Formulas: "
                    "docs/SCALING.md. --config takes the members, dims, optimizer and batch "
                    "from a cetnet train config; the features' rows always come from --vocab.")
    pl.add_argument("--config", type=Path, help="a cetnet train config (members, dims, "
                                                "embedding_optimizer, train.batch_size)")
    pl.add_argument("--members", type=int, help="M embedding sets (members); --dim then holds "
                                                "one dim, or one per member")
    pl.add_argument("--features", type=int, help="F features; --vocab then holds one count, or "
                                                 "one per feature")
    pl.add_argument("--vocab", required=True, metavar="V[,V2,...]",
                    help="rows per table (1e9, 10^9 and 2^20 are fine)")
    pl.add_argument("--dim", metavar="D[,D2,...]",
                    help="embedding dim(s) (required without --config)")
    pl.add_argument("--batch", type=int,
                    help="global batch (rows per step, all GPUs; required without --config)")
    pl.add_argument("--gpus", default="8,64,1024", metavar="N[,N2,...]",
                    help="GPU counts to plan for (default 8,64,1024)")
    pl.add_argument("--optimizer", choices=["sgd", "rowwise_adagrad", "adam"],
                    help="embedding optimizer (default the config's, else rowwise_adagrad; adam: "
                         "the dense-gradient path, embedding_optimizer: null)")
    pl.add_argument("--weights-dtype", choices=["fp32", "fp16"], default="fp32")
    pl.add_argument("--ids-per-feature", type=int, default=1, metavar="H",
                    help="ids per row and feature (multi-hot bags; default 1)")
    pl.add_argument("--memory-gb", type=float, default=100.0,
                    help="GB per GPU for the tables and optimizer state (default 100 of an "
                         "H200's 141)")
    pl.add_argument("--device", choices=["h200", "cpu"], default="h200",
                    help="whose measured kernel rates (default h200)")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--nvlink-gbytes", type=float, default=450.0,
                    help="NVLink GB/s per GPU, one way (default 450)")
    pl.add_argument("--link-gbps", type=float, default=400.0,
                    help="inter-node Gb/s per GPU (default 400: 8 x 400 Gb/s InfiniBand per "
                         "node of 8)")

    # Its own parser (cetnet.reproduce) reads the rest: `cetnet reproduce --help` shows it, and
    # the other commands do not import the experiment code.
    rp = sub.add_parser("reproduce", add_help=False,
                        help="train and compare the ensembles and their baselines over seeds, "
                             "write docs/RESULTS.md (cetnet reproduce --help)")
    rp.add_argument("args", nargs="*", help=argparse.SUPPRESS)  # filled by parse_args
    # Likewise cetnet.search's own parser: the other commands do not import Optuna.
    se = sub.add_parser("search", add_help=False,
                        help="search ensembles and their hyperparameters with Optuna, each "
                             "trial an ordinary run (cetnet search --help, docs/SEARCH.md)")
    se.add_argument("args", nargs="*", help=argparse.SUPPRESS)  # filled by parse_args
    return ap


def _run_parser(sub: argparse._SubParsersAction, name: str, help: str,
                description: str) -> argparse.ArgumentParser:
    """A command on a finished run: RUN_DIR and --checkpoint, as cetnet.serve reads them."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run directory written by cetnet train")
    parser.add_argument("--checkpoint", default="best.pt", help=_CHECKPOINT_HELP)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses a command line; ``train`` takes its KEY=VALUE overrides anywhere among the options.

    argparse fills a ``nargs="*"`` positional from one run of arguments only, so in ``train a=1
    --quiet b=2`` it would reject ``b=2``; the leftover non-option arguments are overrides too.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for own in ("reproduce", "search"):  # everything after it is its module's (options included)
        if own in argv:
            i = argv.index(own)
            args = parser.parse_args(argv[:i + 1])
            if args.command == own:
                args.args = argv[i + 1:]
                return args
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE words after an option (train's --quiet, data prepare's --from PATH): argparse
    # fills the positional list before the option and leaves these over
    positional = {"train": "overrides", "data": "options"}.get(args.command)
    if positional is not None and hasattr(args, positional):
        setattr(args, positional, [*getattr(args, positional),
                                   *(x for x in extra if not x.startswith("-"))])
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def train_config(args: argparse.Namespace, notes: list[str] | None = None
                 ) -> tuple[dict, Path | None, bool]:
    """``(config, run_dir, resume)`` of parsed ``cetnet train`` arguments: the config file
    (with ``--resume``: the run's) with the overrides and flags applied, validated. What it
    changes and says so (a fused embedding optimizer with ``backend: reference``) goes into
    ``notes``, or on stderr at once without it."""
    out, resume = args.out, args.resume is not None
    if resume:
        if "=" in str(args.resume) and not args.resume.is_dir():
            raise ConfigError(f"--resume takes the run directory first: --resume RUN_DIR "
                              f"[KEY=VALUE ...]; {str(args.resume)!r} is no directory and looks "
                              f"like an override")
        if out is not None and out.resolve() != args.resume.resolve():
            raise ConfigError("--resume RUN_DIR and --out name different directories")
        out = args.resume
    if resume and not has_last(out):  # last.pt, or the last.prev.pt kept while it is replaced
        raise FileNotFoundError(f"--resume: no {LAST} in {out} (nothing to resume)")
    path = args.config
    if resume and path is None:
        path = out / CONFIG_FILE  # the interrupted run's resolved config
    overrides = [*args.overrides, *args.set_]
    for flag, key in (("backend", "backend"), ("device", "device"), ("epochs", "train.epochs"),
                      ("seed", "train.seed"), ("embedding", "embedding")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(path, overrides)
    model_cfg = config["model"]
    from cetnet.models.build import DEFAULTS as MODEL_DEFAULTS

    # (a config without the key gets build_model's default, a fused optimizer)
    fused = model_cfg.get("embedding_optimizer", MODEL_DEFAULTS["embedding_optimizer"])
    if config["backend"] == "reference" and fused in FUSED_EMBEDDING_OPTIMIZERS:
        # The plain-PyTorch embedding has no fused optimizer: the comparison run trains its
        # tables with Adam on dense gradients instead (said, not silently). Another value is
        # left for build_model to reject.
        note = (f"backend reference: embedding_optimizer {fused!r} is a fused-kernel "
                "optimizer; training the embedding with Adam instead "
                "(model.embedding_optimizer=null)")
        if notes is None:
            print(note, file=sys.stderr)
        else:
            notes.append(note)
        model_cfg["embedding_optimizer"] = None
    return config, out, resume


def _train(args: argparse.Namespace) -> int:
    from cetnet.distributed import launched_rank
    from cetnet.train import format_metrics_table, run_training
    from cetnet.train.loop import print_warnings
    from cetnet.train.runner import check_run

    # under torchrun every rank runs this: rank 0 alone prints the summary lines
    say = print if launched_rank() == 0 else (lambda *a, **k: None)
    notes: list[str] = []  # printed once the config passed its checks: a bad one is one line
    config, out, resume = train_config(args, notes)
    if args.dry_run:
        plan = check_run(config, out, resume=resume, overwrite=args.overwrite)
        for note in notes:
            print(note, file=sys.stderr)
        for change in plan.changes:
            say(f"resume: {change} (config.yaml would be updated)", file=sys.stderr)
        rows = ", ".join(f"{s} {len(split):,}" for s, split in plan.dataset.splits.items())
        what = (f"resume {out} from epoch {plan.checkpoint['epoch']}" if plan.checkpoint
                else f"train into {out or 'a new directory under runs/'}")
        say(f"dry run: the config, the dataset ({rows} rows), the model "
            f"({plan.num_parameters:,} parameters) and the run directory are fine; it would "
            f"{what}; no run was written")
        return 0
    if notes:  # (rare: a reference-backend comparison) checked first, then said, then run
        check_run(config, out, resume=resume, overwrite=args.overwrite)
        for note in notes:
            print(note, file=sys.stderr)
    run_dir, metrics = run_training(config, out, resume=resume, overwrite=args.overwrite,
                                    quiet=args.quiet, plots=not args.no_plots)
    if launched_rank() == 0:
        if args.quiet:  # fit prints the table and the warnings under it itself otherwise
            print(format_metrics_table(metrics))
            print_warnings(metrics["warnings"])
        print(f"run directory: {run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cetnet.train import evaluate_run, format_metrics_table
    from cetnet.train.runner import evaluation_path
    from cetnet.train.loop import print_warnings

    metrics = evaluate_run(args.run_dir, args.split, checkpoint=args.checkpoint,
                           device=args.device, batch_size=args.batch_size)
    print(format_metrics_table(metrics, args.split))
    print_warnings(metrics["warnings"])
    print(f"written: {evaluation_path(args.run_dir, args.split, args.checkpoint)}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_inputs(args: argparse.Namespace, out: Path, out_flag: str) -> None:
    """Before a run is loaded: RUN_DIR is a directory, the output is not a directory and is
    new unless --overwrite (ConfigError / FileNotFoundError naming the argument)."""
    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {args.run_dir}: no such directory")
    if out.is_dir():
        raise ConfigError(f"{out_flag} {out} is a directory; give a file name")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out_flag} {out} exists; --overwrite replaces it")


def _predict(args: argparse.Namespace) -> int:
    from cetnet.serve import predict_run
    from cetnet.train import format_metrics_table
    from cetnet.train.loop import print_warnings

    _check_inputs(args, args.out, "--out")
    if args.csv is not None and not args.csv.exists():
        raise FileNotFoundError(f"--csv {args.csv}: no such file")
    tally = OOVTally(f"--csv {args.csv}" if args.csv is not None else f"the {args.split} split")
    try:
        out, scores = predict_run(args.run_dir, args.out,
                                  split=None if args.csv is not None else args.split,
                                  csv_path=args.csv, checkpoint=args.checkpoint,
                                  device=args.device, batch_size=args.batch_size,
                                  on_rows=tally.add)
    except DataFormatError as e:  # a bad --csv is named as the argument
        if args.csv is None or e.path != str(args.csv):
            raise
        raise DataFormatError(f"--csv {e.path}", e.line, e.column, e.reason) from None
    if scores is not None:
        print(format_metrics_table(scores, args.csv.name if args.csv else args.split))
    print(f"written: {out}")
    print("\n".join(tally.lines()))
    print_warnings(tally.warnings())
    return 0


#: ``cetnet predict`` warns about a feature whose share of out-of-vocabulary values in the rows
#: it read is above this and above :data:`OOV_WARN_RATIO` times its share in the run's test
#: split: a column in another format than the dataset's files (a sequence joined by another
#: separator reads as one unknown value per row), not new values.
OOV_WARN_SHARE = 0.5
OOV_WARN_RATIO = 2.0


class OOVTally:
    """Out-of-vocabulary values per categorical feature over the rows ``cetnet predict``
    reads (summed over the chunks of a csv), set against the run's test split.

    ``add(run, rows)`` takes the loaded run (a :class:`cetnet.serve.LoadedRun`) and each
    :class:`~cetnet.data.Split` of rows read (``rows.stats.oov`` / ``.cells``); :meth:`lines`
    is the table ``cetnet predict`` prints, :meth:`warnings` its warnings."""

    def __init__(self, source: str) -> None:
        self.source = source  # what the rows are: "--csv new.csv", "the test split"
        self.rows = 0
        self.oov: dict[str, int] = {}
        self.cells: dict[str, int] = {}
        self.test: dict[str, float] = {}  # the test split's share per feature
        self.separators: dict[str, str | None] | None = None  # (set by the first add)

    def add(self, run: Any, rows: Any) -> None:
        if self.separators is None:  # the first chunk: what the run's data holds
            test = run.dataset.splits["test"].stats
            self.test = {name: test.oov.get(name, 0) / cells
                         for name, cells in test.cells.items() if cells}
            self.separators = list_separators(run.config, run.dataset)
        self.rows += len(rows)
        for name, cells in rows.stats.cells.items():
            self.cells[name] = self.cells.get(name, 0) + cells
            self.oov[name] = self.oov.get(name, 0) + rows.stats.oov.get(name, 0)

    def share(self, name: str) -> float | None:
        return self.oov[name] / self.cells[name] if self.cells.get(name) else None

    def lines(self) -> list[str]:
        """``out-of-vocabulary values of the N rows of SOURCE`` and one line per feature:
        count, of how many values, the share, and the test split's share."""
        if not self.cells:
            return []
        width = max(map(len, self.cells))
        out = [f"out-of-vocabulary values of the {self.rows:,} rows of {self.source} "
               f"(share in the run's test split):"]
        for name in self.cells:
            share, test = self.share(name), self.test.get(name)
            out.append(f"  {name:<{width}} {self.oov[name]:>10,} of {self.cells[name]:,}"
                       + (f" ({share:.1%}" if share is not None else " (-")
                       + (f"; test {test:.1%})" if test is not None else ")"))
        return out

    def warnings(self) -> list[str]:
        """One sentence per feature whose share is far above the test split's
        (:data:`OOV_WARN_SHARE`, :data:`OOV_WARN_RATIO`), naming the separator the dataset
        expects for a bag or a sequence."""
        out = []
        for name in self.cells:
            share, test = self.share(name), self.test.get(name, 0.0)
            if share is None or share <= OOV_WARN_SHARE or share <= OOV_WARN_RATIO * test:
                continue
            text = (f"{self.source}: {share:.1%} of {name}'s values are out of vocabulary, "
                    f"against {test:.1%} in the run's test split")
            seps = self.separators or {}
            if name in seps:
                sep = seps[name]
                text += (f": each {name} cell must hold raw values as in the dataset's files, "
                         + (f"separated by {sep!r}" if sep is not None else
                            "separated as there") + " (a cell joined otherwise reads as one "
                         "unknown value)")
            else:
                text += ": its cells must hold raw values as in the dataset's files"
            out.append(text)
        return out


def list_separators(config: dict, dataset: Any) -> dict[str, str | None]:
    """What separates the values of each bag or sequence feature in a row ``cetnet predict``
    reads: ``'|'`` in the csv of :func:`cetnet.serve.encode_csv`; a BARS dataset reads its own
    format (``dataset.row_encoder``), with its YAML's per-feature ``splitter``; None where it
    is not known (another dataset with a format of its own, a YAML that no longer reads)."""
    from cetnet.serve import LIST_SEP

    schema = dataset.schema
    names = [f.name for f in (*schema.multihot, *schema.sequence)]
    if getattr(dataset, "row_encoder", None) is None:
        return dict.fromkeys(names, LIST_SEP)
    data = config.get("data") or {}
    found: dict[str, str] = {}
    if data.get("name") == "bars":
        from cetnet.data.bars_config import read_config

        try:
            columns = read_config(data["config"], dataset_id=data.get("dataset_id")).columns
        except (ConfigError, OSError, KeyError):  # the run read it: changed since
            columns = []
        found = {c.name: c.splitter for c in columns if c.type == "sequence"}
    return {name: found.get(name) for name in names}


def _export(args: argparse.Namespace) -> int:
    from cetnet.serve import export_run

    _check_inputs(args, args.out, "OUT.pt2")
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, device=args.device)
    print(f"exported {args.checkpoint} of {args.run_dir} on {args.device}: {out} "
          f"({out.stat().st_size / 2**20:.2f} MiB)")
    return 0


def _caches(dirs: Sequence[Path], prune: bool) -> int:
    """``cetnet data caches``: the cache files under ``dirs`` with size and status; with
    ``prune`` the superseded ones (and their records) are deleted."""
    from cetnet.data.cache import cache_status, default_root, find_caches, sources_path

    roots = list(dirs) or [default_root()]
    if not dirs and not roots[0].is_dir():
        print(f"0 cache file(s): no data root {roots[0]} yet")
        return 0
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory")
    superseded: list[tuple[Path, int]] = []
    count = 0
    for root in roots:
        for path in find_caches(root):
            status, why = cache_status(path)
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # removed meanwhile
                continue
            count += 1
            print(f"{status:<12} {size / 2**20:10.1f} MB  {path}  ({why})")
            if status == "superseded":
                superseded.append((path, size))
    freed = sum(size for _, size in superseded)
    if not prune:
        print(f"{count} cache file(s); {len(superseded)} superseded ({freed / 2**20:.1f} MB)"
              + (": --prune deletes them" if superseded else ""))
        return 0
    for path, _ in superseded:
        path.unlink(missing_ok=True)
        sources_path(path).unlink(missing_ok=True)
    print(f"deleted {len(superseded)} superseded cache file(s), {freed / 2**20:.1f} MB")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from cetnet.train import prepare_dataset

    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {item!r}: expected KEY=VALUE")
        options[key] = parse_value(value)
    default = load_config(None)["data"]
    if args.name == default["name"]:  # prepare what `cetnet train` will train on
        options = {**{k: v for k, v in default.items() if k != "name"}, **options}
    if args.from_ is not None:
        from cetnet.data.registry import install

        install(args.name, args.from_, **options)
    result = prepare_dataset(args.name, **options)
    summary = getattr(result, "summary", None)
    print(summary() if callable(summary) else result)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from cetnet.plan import plan_text, workloads_from_flags

    works = workloads_from_flags(
        args.members, args.features, args.vocab, args.dim, args.batch, args.gpus,
        optimizer=args.optimizer, weights_dtype=args.weights_dtype,
        ids_per_feature=args.ids_per_feature, memory_gb=args.memory_gb, device=args.device,
        gpus_per_node=args.gpus_per_node, nvlink_gbytes=args.nvlink_gbytes,
        link_gbps=args.link_gbps, config=args.config)
    print(plan_text(works))
    return 0


#: What the user's input causes (a config value, a dataset file, a checkpoint, a run directory,
#: a run that diverged, a file that cannot be opened): one line, exit status 2. A ValueError,
#: TypeError etc. out of the code is a bug and keeps its traceback (ConfigError, DataFormatError
#: and CheckpointError are ValueErrors raised deliberately, naming the input).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataFormatError, CheckpointError,
                                            RunDirError, TrainingError, OSError)


def one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cetnet`` / ``python -m cetnet``; returns the exit status (0, 2 for an
    error the input causes, printed as one line, 130 for Ctrl-C, 141 when stdout is a pipe
    closed before the output ended, e.g. ``cetnet data list | head -1``)."""
    try:
        # The CPU kernel build is chosen when cetnet_kernels is imported, and a
        # CETNET_CPU_CAPABILITY it cannot honour is a ValueError there: import it first, so
        # that is one line whatever command would have imported it.
        import cetnet_kernels  # noqa: F401
    except ValueError as e:
        print(f"cetnet: error: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        try:
            return _main(argv)
        finally:  # output still buffered meets a closed pipe here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE_STATUS


def _discard_stdout() -> None:
    """Points stdout at /dev/null: what is still buffered for the closed pipe is dropped when
    Python flushes it at exit, instead of raising again there."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    try:
        from cetnet.train import load_plugins

        load_plugins(args.plugin)
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "export":
            return _export(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "reproduce":
            from cetnet.reproduce.__main__ import main as reproduce

            return reproduce(args.args)
        if args.command == "search":
            from cetnet.search.__main__ import main as search

            return search(args.args)
        if args.command == "models":
            from cetnet.catalog import models_text

            print(models_text())
            return 0
        if args.data_command == "list":
            from cetnet.catalog import datasets_text

            print(datasets_text())
            return 0
        if args.data_command == "caches":
            return _caches(args.dirs, args.prune)
        return _prepare(args)
    except BrokenPipeError:  # an OSError, but no error of the input: main ends quietly
        raise
    except USER_ERRORS as e:
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"cetnet {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from cetnet.distributed import launched_rank

        if launched_rank() == 0:  # one hint, not one per torchrun rank
            print(f"\n{interrupt_hint(exc)}", file=sys.stderr)
        return 130


def interrupt_hint(exc: KeyboardInterrupt) -> str:
    """What to tell a user who pressed Ctrl-C: the exact resume command, or that no epoch
    finished (run_training attaches the run directory to the exception)."""
    run_dir = getattr(exc, "run_dir", None)
    if run_dir is None:
        return "interrupted"
    if (Path(run_dir) / LAST).exists():
        return f"interrupted: continue with `cetnet train --resume {run_dir}`"
    return (f"interrupted before the first epoch ended: nothing to resume in {run_dir} (start "
            f"again with --out {run_dir} --overwrite)")


if __name__ == "__main__":
    sys.exit(main())
