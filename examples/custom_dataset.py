"""A dataset of your own, read from a csv file and trained on by the ``cetnet`` trainer.

This module is a *plugin*: importing it registers the dataset ``clicks_csv`` with
:func:`cetnet.train.register_dataset`. Its factory :func:`load_clicks_csv` reads a csv of ad
impressions (one row each, in time order) into a :class:`cetnet.data.CTRDataset`: it cuts the
rows into train / valid / test, builds every vocabulary and the dense statistics on the train
rows only (an unseen value is the OOV id), and encodes the three splits. Any config naming it
trains on it; the options of the ``data:`` section are the factory's keyword arguments::

    data: {name: clicks_csv, path: clicks.csv, max_seq_len: 10, min_count: 1}

Run ``python examples/custom_dataset.py`` to write a csv of generated impressions
(:func:`write_clicks_csv`, with a planted signal) and train CETNet on it through the Python API
(:func:`cetnet.train.run_training`); from the command line the same run is::

    python -m cetnet --plugin examples.custom_dataset train \\
        --set 'data={name: clicks_csv, path: clicks.csv}' 'model.members=[dnn, dcnv2]' \\
              model.embedding_dim=16

The csv has a header and these columns: ``user``, ``ad``, ``category``, ``device`` (raw
strings), ``hour``, ``price`` (numbers, empty for missing), ``interests`` (a bag: values
separated by ``|``), ``recent_ads`` (the user's previous ads, most recent first, separated by
``|``) and ``label`` (0 or 1). ``cetnet.serve.encode_csv`` reads new rows of the same format
with a trained run's vocabularies (examples/predict_run.py).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from cetnet.data import (SPLITS, CTRDataset, DataFormatError, DenseStats, FeatureSpec, Schema,
                         Split, SplitStats, Vocabulary)
from cetnet.data.schema import OOV_ID
from cetnet.train import register_dataset

DATASET = "clicks_csv"
SPARSE = ("user", "ad", "category", "device")
DENSE = ("hour", "price")
BAG, HISTORY = "interests", "recent_ads"
CATEGORIES = ("sports", "music", "travel", "food", "games", "cars")
DEVICES = ("android", "ios", "web")


def write_clicks_csv(path: str | Path, rows: int = 20_000, *, users: int = 300,
                     ads: int = 200, seed: int = 0) -> Path:
    """Writes ``rows`` generated impressions: a user clicks more on ads of the categories
    she is interested in and on ads like those she saw recently, less late at night and on
    expensive items; each user has a taste of her own (her id alone carries signal)."""
    rng = np.random.default_rng(seed)
    user_taste = rng.normal(0, 0.7, users)
    interests = [rng.choice(len(CATEGORIES), rng.integers(1, 4), replace=False)
                 for _ in range(users)]
    ad_category = rng.integers(0, len(CATEGORIES), ads)
    ad_quality = rng.normal(0, 0.5, ads)
    history: list[list[int]] = [[] for _ in range(users)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*SPARSE, *DENSE, BAG, HISTORY, "label"])
        for _ in range(rows):
            u, a = int(rng.integers(users)), int(rng.integers(ads))
            device, hour = DEVICES[rng.integers(3)], int(rng.integers(24))
            price = float(np.round(rng.gamma(2.0, 20.0), 2))
            recent = history[u][:10]
            same = np.mean([ad_category[h] == ad_category[a] for h in recent]) if recent else 0
            logit = (user_taste[u] + ad_quality[a] + 1.5 * (ad_category[a] in interests[u])
                     + 1.0 * same - 0.8 * (hour < 6) - 0.02 * price + 1.0)
            label = int(rng.random() < 1 / (1 + np.exp(-logit)))
            out.writerow([f"u{u}", f"ad{a}", CATEGORIES[ad_category[a]], device, hour,
                          "" if rng.random() < 0.02 else price,  # a few prices are missing
                          "|".join(CATEGORIES[c] for c in interests[u]),
                          "|".join(f"ad{h}" for h in recent), label])
            history[u].insert(0, a)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*SPARSE, *DENSE, BAG, HISTORY, "label")
                   if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(path, 1, None, f"no column(s) {missing}")
        return list(reader)


def _number(cell: str, path: Path, line: int, column: str) -> float:
    try:
        return float(cell) if cell.strip() else float("nan")  # empty: missing, imputed later
    except ValueError:
        raise DataFormatError(path, line, column, f"{cell[:40]!r} is not a number") from None


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)  # 0 is the padding id
    for r, ids in enumerate(rows):
        out[r, :min(len(ids), width)] = ids[:width]
    return out


def load_clicks_csv(path: str, *, max_seq_len: int = 10, min_count: int = 1,
                    valid_fraction: float = 0.1, test_fraction: float = 0.1) -> CTRDataset:
    """The dataset of a csv written by :func:`write_clicks_csv` (or of your own rows in its
    format): the first rows train, then valid, then test (time order); vocabularies (values
    seen ``min_count`` times in train) and dense statistics from train only."""
    path = Path(path).expanduser()
    rows = _read(path)
    n = len(rows)
    cut = [0, int(n * (1 - valid_fraction - test_fraction)), int(n * (1 - test_fraction)), n]
    if min(b - a for a, b in zip(cut, cut[1:])) < 1:
        raise DataFormatError(path, None, None, f"{n} rows are too few for three splits")
    train = rows[:cut[1]]

    def vocabulary(values: list[str]) -> Vocabulary:
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        return Vocabulary.from_counts(counts, min_count)

    def bag(cell: str) -> list[str]:
        return [t for t in cell.split("|") if t]

    vocabs = {name: vocabulary([r[name] for r in train]) for name in SPARSE}
    vocabs[BAG] = vocabulary([t for r in train for t in bag(r[BAG])])
    # the history holds ads: it uses the ad vocabulary (source="ad"), with a table of its own
    ids = {name: np.array([vocabs[name].id(r[name]) for r in rows]) for name in SPARSE}
    ids[BAG] = _padded([list(vocabs[BAG].encode(bag(r[BAG]))) for r in rows],
                       max(1, max(len(bag(r[BAG])) for r in rows)))
    ids[HISTORY] = _padded([list(vocabs["ad"].encode(bag(r[HISTORY]))) for r in rows],
                           max_seq_len)
    dense_raw = np.array([[_number(r[c], path, i + 2, c) for c in DENSE]
                          for i, r in enumerate(rows)])
    labels = np.array([_number(r["label"], path, i + 2, "label") for i, r in enumerate(rows)])
    stats = DenseStats.fit(dense_raw[:cut[1]])

    schema = Schema([
        *(FeatureSpec(name, "sparse", vocabs[name].size) for name in SPARSE),
        *(FeatureSpec(name, "dense") for name in DENSE),
        FeatureSpec(BAG, "multihot", vocabs[BAG].size, max_len=ids[BAG].shape[1],
                    pooling="mean"),
        FeatureSpec(HISTORY, "sequence", vocabs["ad"].size, max_len=max_seq_len, source="ad"),
    ], label="label", group="user")
    splits = {}
    for k, name in enumerate(SPLITS):
        part = slice(cut[k], cut[k + 1])
        z, imputed = stats.transform(dense_raw[part])
        these = {key: v[part] for key, v in ids.items()}
        oov = {f.name: int((these[f.name] == OOV_ID).sum()) for f in schema.categorical}
        cells = {f.name: int((these[f.name] != 0).sum()) for f in schema.categorical}
        splits[name] = Split(schema, sparse=these, dense=z, multihot=these, sequence=these,
                             label=labels[part], group=these["user"],
                             stats=SplitStats(oov, cells, dict(zip(DENSE, map(int, imputed)))))
    return CTRDataset(DATASET, schema, splits, vocabs, stats, group_key="user",
                      notes=[f"{path.name}: {n} rows, cut {cut[1:3]} (train / valid / test)"])


# Importing the module (``--plugin examples.custom_dataset``) registers the dataset.
register_dataset(DATASET, load_clicks_csv)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a csv of generated clicks and train CETNet "
                                             "on it as a registered dataset.")
    ap.add_argument("--csv", type=Path, default=Path("runs/clicks.csv"),
                    help="the csv to read (written first when missing or with --rows)")
    ap.add_argument("--rows", type=int, help="write this many generated rows (default 20000 "
                                             "when --csv does not exist)")
    ap.add_argument("--members", default="dnn,dcnv2", help="comma-separated library members")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/custom-dataset"))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from cetnet.config import load_config
    from cetnet.train import format_metrics_table, run_training

    if args.rows is not None or not args.csv.exists():
        write_clicks_csv(args.csv, args.rows or 20_000, seed=args.seed)
        print(f"wrote {args.csv}")
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    # The packaged config with overrides, as `cetnet train --set ...` builds it; the data
    # section is replaced whole (the MovieLens options would not fit this dataset).
    config = load_config(None, [
        f"data={{name: {DATASET}, path: {args.csv.resolve()}}}",
        f"model.members=[{', '.join(members)}]", f"model.embedding_dim={args.dim}",
        *(f"model.{m}={{hidden: [64]}}" for m in members if m == "dnn"),
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        "train.warmup_steps=0", f"train.seed={args.seed}", "device=cpu"])
    config["name"] = "custom-dataset"
    run_dir, metrics = run_training(config, args.out, overwrite=args.overwrite,
                                    quiet=args.quiet, plots=False)
    if args.quiet:
        print(format_metrics_table(metrics))
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
