"""Batch prediction from a finished run directory.

A run directory (``cetnet train --out RUN``) holds the resolved ``config.yaml`` and the best
checkpoint ``best.pt``. This script rebuilds the run's dataset and model from them
(:func:`cetnet.serve.load_run`), scores a split of the dataset or the rows of a csv file
(raw values, encoded with the run's own vocabularies and dense statistics by
:func:`cetnet.serve.encode_csv`), prints the scores when the rows have labels and writes one
line per row: the fused probability, each member's and, for CETNet, each member's fusion
weight (:func:`cetnet.serve.write_predictions`)::

    python examples/predict_run.py runs/cetnet_ml100k-20250101-120000 --split test
    python examples/predict_run.py runs/custom-dataset --csv new_rows.csv \\
        --plugin examples.custom_dataset --out new_rows_predictions.csv

A run of a registered dataset or model needs the module that registers it (``--plugin``),
as ``cetnet --plugin ... evaluate`` does. ``cetnet.serve.predict_run`` does all of this in
one call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score a split or a csv with a finished run's "
                                             "checkpoint and write the predictions.")
    ap.add_argument("run_dir", type=Path)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--split", default="test", help="train, valid or test (default test)")
    what.add_argument("--csv", type=Path, help="rows to score: a header, one column per "
                                               "feature, raw values ('|' between list items)")
    ap.add_argument("--checkpoint", default="best.pt", help="best.pt or last.pt")
    ap.add_argument("--out", type=Path, help="default RUN_DIR/predictions_<split or csv>.csv")
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (the run's registered dataset or model)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--device", help="override the run's device (cpu, cuda, auto)")
    args = ap.parse_args(argv)

    root = str(Path(__file__).resolve().parents[1])  # so that --plugin examples.* imports
    if root not in sys.path:
        sys.path.insert(0, root)
    from cetnet.serve import encode_csv, load_run, write_predictions
    from cetnet.train import format_metrics_table, predict, score

    # 1. config.yaml -> dataset and model; best.pt -> weights (eval mode)
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device,
                   plugins=args.plugin)
    print(f"{args.run_dir}: {run.config['model'].get('ensemble')} of {run.member_names}, "
          f"{args.checkpoint} from epoch {run.epoch}")

    # 2. the rows: a split of the run's dataset, or a csv encoded like it
    if args.csv is not None:
        rows, name = encode_csv(run.dataset, args.csv), args.csv.stem  # labelled or not
        oov = {k: v for k, v in rows.stats.oov.items() if v}
        print(f"{args.csv}: {len(rows)} rows; OOV values per feature: {oov or 'none'}")
    else:
        rows, name = run.dataset.splits[args.split], args.split

    # 3. predict (eval mode, no grad, in row order) and score when there are both classes
    pred = predict(run.model, rows, batch_size=args.batch_size, device=run.device)
    if rows.stats.labelled and 0 < int((pred.label > 0.5).sum()) < len(pred.label):
        print(format_metrics_table(score(pred, run.member_names), name))

    # 4. one csv line per row (empty label cells for rows read without labels)
    out = write_predictions(pred, run.member_names,
                            args.out or args.run_dir / f"predictions_{name}.csv",
                            labelled=rows.stats.labelled)
    print(f"written: {out} ({len(pred.prob)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
