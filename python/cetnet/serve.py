"""Using a finished run: load it, score a split or a csv of new rows, export it for serving.

A run directory (``cetnet train --out RUN``) holds the resolved ``config.yaml`` and the
checkpoints ``best.pt`` / ``last.pt``. This module turns it into predictions and into a
``torch.export`` program (docs/EXTENDING.md):

- :func:`load_run`: the run's dataset and model with a checkpoint loaded, in eval mode.
- :func:`encode_csv`: rows of a csv (raw values, one column per schema feature) encoded with
  the run's vocabularies and dense statistics, as a :class:`~cetnet.data.Split`.
- :func:`write_predictions` / :func:`predict_run`: predictions of a split or a csv written as
  csv (``predict_run`` is what ``cetnet predict`` calls).
- :class:`ServingModule`, :func:`export_model`, :func:`export_run`, :func:`load_exported`: the
  ensemble as a ``torch.export`` program over plain tensors (``export_run`` is what
  ``cetnet export`` calls). The fused ops are registered with ``torch.library``
  and have fake kernels, so the program holds them as ``torch.ops.cetnet.*`` calls: it runs
  wherever ``cetnet_kernels`` is importable with its compiled extension (``import
  cetnet_kernels`` before ``torch.export.load``), without the ``cetnet`` library or the run
  directory.

Export runs under ``torch.no_grad()`` on an eval-mode model: with gradients enabled, an
embedding trained by a fused optimizer (``model.embedding_optimizer: sgd | rowwise_adagrad``)
takes its training path, the ``multi_embedding_fused`` op whose backward updates the tables in
place; without gradients it is the plain lookup ``cetnet::multi_embedding``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence, cast

import numpy as np
import torch
from cetnet_kernels.backends import BACKENDS, resolve_backend
from torch import Tensor, nn

from cetnet.atomic import FirstWriteError, atomic_write, write_text_atomic
from cetnet.config import ConfigError, Spec
from cetnet.data.cache import user_path
from cetnet.data.csvio import DataFormatError, parse_float, read_chunks, shorten
from cetnet.data.dataset import Split, SplitStats
from cetnet.data.schema import OOV_ID, PAD_ID, Batch, Schema
from cetnet.train.builders import EnsembleModel, load_plugins
from cetnet.train.checkpoint import (BEST, LAST, check_data_digest, check_model_config,
                                     load_checkpoint)
from cetnet.train.evaluate import Predictions, predict, score
from cetnet.train.loop import check_backend, resolve_device
from cetnet.train.rundir import CONFIG_FILE
from cetnet.train.sharded import load_model_state
from cetnet.train.runner import build_run, load_run_config

__all__ = ["LoadedRun", "ExportedRun", "ServingModule", "load_run", "checkpoint_file",
           "encode_csv", "write_predictions", "predict_run", "batch_inputs", "example_inputs",
           "dynamic_shapes", "export_model", "export_run", "load_exported", "SCHEMA_FILE",
           "LIST_SEP"]

#: The name under which :func:`export_run` stores the schema and member names in the
#: exported file (``torch.export.save(..., extra_files=...)``).
SCHEMA_FILE = "cetnet_serving.json"
#: What separates the ids of a multi-hot bag or a sequence in one csv cell.
LIST_SEP = "|"


# ------------------------------------------------------------------------------------------------
# A finished run
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A run rebuilt from its directory (:func:`load_run`).

    Attributes:
        run_dir: the run directory.
        config: its validated ``config.yaml``.
        dataset: the dataset the config names (rebuilt, so its vocabularies are the run's).
        model: the ensemble with the checkpoint loaded, in eval mode, on ``device``.
        device: where the model is.
        epoch: the epoch the checkpoint was written after (None if it does not say).
    """

    run_dir: Path
    config: dict
    dataset: Any
    model: nn.Module
    device: torch.device
    epoch: int | None

    @property
    def member_names(self) -> list[str]:
        return list(cast(EnsembleModel, self.model).member_names)


def load_run(run_dir: str | Path, *, checkpoint: str = BEST, device: str | None = None,
             plugins: Sequence[str] = (), backend: str | None = None) -> LoadedRun:
    """Rebuilds a run's dataset and model from ``run_dir/config.yaml`` and loads
    ``checkpoint`` (the name of a file in ``run_dir``).

    Args:
        run_dir: a run directory written by ``cetnet train`` / ``run_training``.
        checkpoint: ``best.pt`` (default) or ``last.pt`` (a file of ``run_dir``), or the path
            of a checkpoint elsewhere (:func:`checkpoint_file`).
        device: overrides the run's ``device`` (``cpu``, ``cuda``, ``auto``).
        plugins: modules to import first, as ``cetnet --plugin``: a run of a registered
            dataset or model needs the module that registers it.
        backend: overrides the run's kernel ``backend`` (every backend has the same weights);
            ``config["backend"]`` of the result is the one the model was built with.

    Raises:
        FileNotFoundError: no ``config.yaml`` or no such checkpoint.
        ConfigError: a bad config, device or checkpoint name.
        CheckpointError: a checkpoint that cannot be read or does not fit the model.
    """
    load_plugins(plugins)
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if backend is not None:
        config["backend"] = Spec(str, choices=BACKENDS).check("backend", backend)
    path = checkpoint_file(run_dir, checkpoint)
    dev = resolve_device(device or config["device"],
                         "device" if device else f"{run_dir / CONFIG_FILE}: device")
    check_backend(config["backend"], dev)
    dataset, model = build_run(config)
    state = load_checkpoint(path, map_location=dev, keys=("model",))
    check_data_digest(state, dataset, path)
    # (config.yaml and the checkpoint read unlocked; the checkpoint may be another run's)
    check_model_config(state, config, path, run_dir / CONFIG_FILE)
    load_model_state(model, state, path)
    model.to(dev).eval()
    return LoadedRun(run_dir, config, dataset, model, dev, state.get("epoch"))


def checkpoint_file(run_dir: str | Path, checkpoint: str | Path) -> Path:
    """The checkpoint file ``checkpoint`` names: a bare file name (``best.pt``, ``last.pt``) is
    a file of ``run_dir``, anything with a ``/`` in it a path (e.g. ``other/best.pt``, a copy
    kept elsewhere; it must still fit the run's model). FileNotFoundError naming
    ``--checkpoint`` when there is no such file."""
    text = str(checkpoint)
    if not text or "\x00" in text:
        raise ConfigError(f"--checkpoint: expected best.pt, last.pt or a path, got "
                          f"{shorten(text)}")
    if "/" in text or os.sep in text:
        path = user_path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {text}: no such file")
        return path
    path = Path(run_dir) / text
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no {text} in {run_dir}"
                                + (" (no epoch of the run has finished?)"
                                   if text in (BEST, LAST) else ""))
    return path


# ------------------------------------------------------------------------------------------------
# New rows from a csv
# ------------------------------------------------------------------------------------------------
def _vocab_of(dataset: Any, feature: Any) -> Any:
    vocabs = getattr(dataset, "vocabs", None) or {}
    return vocabs.get(feature.name) or (vocabs.get(feature.source) if feature.source else None)


def _encode_tokens(tokens: list[str], vocab: Any, vocab_size: int, path: Path, line: int,
                   column: str) -> tuple[list[int], int]:
    """Ids of ``tokens`` and how many are OOV: through ``vocab`` when the dataset has one (an
    unknown token is OOV), else the tokens are ids already (one outside ``[0, vocab_size)``
    is OOV)."""
    if vocab is not None:
        ids = [vocab.id(t) for t in tokens]
        return ids, sum(i == OOV_ID for i in ids)
    ids = []
    for t in tokens:
        try:
            i = int(t)
        except ValueError:
            raise DataFormatError(path, line, column, f"{shorten(t)} is no id (the dataset has "
                                  "no vocabulary for this feature: give integer ids)") from None
        ids.append(i if 0 <= i < vocab_size and i != PAD_ID else OOV_ID)
    return ids, sum(i == OOV_ID for i in ids)


#: Data lines of a ``--csv`` that :func:`predict_run` encodes and predicts at a time (rounded
#: up to whole forward batches), so that its memory does not grow with the file.
CSV_CHUNK_ROWS = 65_536

#: Padding the bags of a chunk of rows (:data:`CSV_CHUNK_ROWS`; :func:`encode_csv`: the file)
#: to their widest bag may take this many cells (2 GiB of ids), or 16 per id of the bags,
#: whichever is more: beyond, one very wide bag is refused rather than take the memory (200k
#: rows padded to a widest bag of 100 take 160 MB, and pass).
MAX_BAG_CELLS = 1 << 28


def _bags(rows: list[list[int]], lines: list[int], path: Path, column: str) -> np.ndarray:
    """``[N, widest bag]`` ids (every row padded to the widest, as the dataset stores bags);
    DataFormatError naming the widest bag when that padding would be out of all proportion
    to the ids (one bag of 6,000 tags in 6,000 rows took 0.4 GiB; 100k in 100k rows, 80)."""
    width = max(map(len, rows), default=1)
    cells = len(rows) * width
    if cells > max(MAX_BAG_CELLS, 16 * sum(map(len, rows))):
        r = max(range(len(rows)), key=lambda i: len(rows[i]))
        raise DataFormatError(path, lines[r], column, f"a bag of {width:,} ids; rows are "
                              f"padded to the widest bag ({cells * 8 / 2**20:,.0f} MiB for "
                              f"{len(rows):,} rows): predict it in a file of its own")
    return _padded(rows, width)


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    for r, ids in enumerate(rows):
        ids = ids[:out.shape[1]]
        out[r, :len(ids)] = ids
    return out


def encode_csv(dataset: Any, path: str | Path, *, delimiter: str = ",",
               list_sep: str = LIST_SEP) -> Split:
    """Encodes the rows of a csv file as the run's dataset encodes its own rows.

    The file has a header and one column per feature of ``dataset.schema`` (extra columns are
    ignored): a sparse feature holds the raw value (looked up in ``dataset.vocabs``; an
    unknown value is OOV) or, for a dataset without vocabularies (the synthetic one), the id;
    a multi-hot bag or a sequence holds its values separated by ``list_sep`` (a sequence most
    recent first; longer ones are cut to the schema's ``max_len``); a dense feature holds a
    finite number, empty for missing (normalized with ``dataset.dense_stats``, a missing one
    imputed with the train mean). The label column (``schema.label``) is optional: without it,
    or with every cell of it empty, every label is 0 and scores of these rows mean nothing
    (``stats.labelled`` is then False: pass it to :func:`write_predictions`);
    otherwise every row needs a label in [0, 1]. The gAUC group is the raw value of the
    dataset's group column (``dataset.group_key``, e.g. the user): unseen users are groups of
    their own, as in the dataset's splits; without that column there are no groups, and gAUC
    is NaN (one group of every row would only repeat the AUC).

    A dataset whose own files have another format (``dataset.row_encoder``: BARS, whose
    config names the columns, the sequence separators and order and the ``copy_from``
    features) reads the file as it reads its own files instead.

    The file is read as the dataset readers read theirs (:func:`cetnet.data.csvio.read_chunks`:
    a UTF-8 byte-order mark dropped, blank lines skipped, quoted fields may span lines, every
    row must have the header's number of fields). The whole file becomes one Split, its bags
    padded to the file's widest (:data:`MAX_BAG_CELLS`): for a file of any size,
    :func:`predict_run` encodes and predicts it a chunk of rows at a time.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: no header or no data rows, a missing feature column, a row with too
            few or too many fields, a quote never closed, bytes that are not UTF-8, a dense
            value that is not a finite number, a label outside [0, 1] or missing (naming the
            file, line and column).
    """
    return next(_csv_splits(dataset, path, None, delimiter=delimiter, list_sep=list_sep))


@dataclass
class _Rows:
    """Rows of a plain csv encoded as far as lists go (what :func:`_split` makes a Split of):
    their line numbers, ids per categorical feature, OOV counts, raw dense values (NaN:
    missing), label cells (none without a label column) and gAUC group ids."""

    lines: list[int]
    ids: dict[str, list[list[int]]]
    oov: dict[str, int]
    dense: list[np.ndarray]
    labels: list[str]
    groups: list[int]
    grouped: bool = False  # the file has the dataset's group column (else every row is group 0)


def _csv_splits(dataset: Any, path: str | Path, chunk_rows: int | None, *,
                delimiter: str = ",", list_sep: str = LIST_SEP) -> Iterator[Split]:
    """The rows of ``path`` as :func:`encode_csv` encodes them: a Split per ``chunk_rows``
    data lines, or one of the whole file with None. Each has ``stats.labelled`` of the whole
    file: the first chunk decides it, and a later chunk with labels after one without is the
    error of a file mixing them (a ``row_encoder`` dataset's: whether its header has the
    label column)."""
    encoder = getattr(dataset, "row_encoder", None)
    if encoder is not None:  # a dataset with a file format of its own (BARS)
        for split, labelled in encoder(path, chunk_rows):
            split.stats.labelled = labelled
            yield split
        return
    path = Path(path)
    labelled, first = None, 0
    for rows in _encoded_rows(dataset, path, chunk_rows, delimiter, list_sep):
        if labelled is None:
            labelled, first = any(rows.labels), rows.lines[0]
        elif not labelled and any(rows.labels):  # the file's first row has no label
            raise _no_label(path, first, dataset.schema.label)
        split = _split(dataset, rows, path, labelled)
        split.stats.labelled = labelled
        yield split


def _encoded_rows(dataset: Any, path: Path, chunk_rows: int | None, delimiter: str,
                  list_sep: str) -> Iterator[_Rows]:
    """:class:`_Rows` of ``chunk_rows`` data lines at a time (None: the whole file, read a
    :data:`CSV_CHUNK_ROWS` at a time). Groups are numbered across the file."""
    schema: Schema = dataset.schema
    group_column = getattr(dataset, "group_key", None) or schema.group
    columns = [ft.name for ft in schema.features]
    optional = [c for c in (schema.label, group_column) if c and c not in columns]
    groups: dict[str, int] = {}  # raw group value -> gAUC group id

    def empty() -> _Rows:
        return _Rows([], {ft.name: [] for ft in schema.categorical},
                     {ft.name: 0 for ft in schema.categorical}, [], [], [])

    rows = empty()
    for lines, chunk in read_chunks(path, columns, delimiter=delimiter, optional=optional,
                                    chunk_size=chunk_rows or CSV_CHUNK_ROWS):
        rows.lines += lines
        for ft in schema.categorical:
            vocab = _vocab_of(dataset, ft)
            for line, cell in zip(lines, chunk[ft.name]):
                cell = cell.strip()
                tokens = ([cell] if ft.kind == "sparse"
                          else [t.strip() for t in cell.split(list_sep) if t.strip()])
                got, bad = _encode_tokens(tokens, vocab, ft.vocab_size, path, line, ft.name)
                rows.ids[ft.name].append(got)
                rows.oov[ft.name] += bad
        rows.dense.append(np.asarray(
            [parse_float(chunk[ft.name], path, lines, ft.name) for ft in schema.dense],
            dtype=np.float64).T.reshape(len(lines), len(schema.dense)))
        if schema.label in chunk:
            rows.labels += [c.strip() for c in chunk[schema.label]]
        if group_column and group_column in chunk:
            rows.grouped = True
            rows.groups += [groups.setdefault(v.strip(), len(groups))
                            for v in chunk[group_column]]
        else:
            rows.groups += [0] * len(lines)
        if chunk_rows is not None:
            yield rows
            rows = empty()
    if chunk_rows is None:
        yield rows


def _split(dataset: Any, rows: _Rows, path: Path, labelled: bool) -> Split:
    """The Split of ``rows``: labels checked (``labelled``: the file's rows have labels),
    dense values normalized, bags padded to their widest."""
    schema: Schema = dataset.schema
    labels = _labels(rows.labels, rows.lines, len(rows.lines), path, schema.label, labelled)
    dense = np.concatenate(rows.dense)
    stats = getattr(dataset, "dense_stats", None)
    if stats is not None and schema.dense:
        z, imputed = stats.transform(dense)
    else:
        imputed = np.isnan(dense).sum(0)
        z = np.nan_to_num(dense).astype(np.float32)
    ids = rows.ids
    sparse = {ft.name: np.asarray([i[0] for i in ids[ft.name]], dtype=np.int64)
              for ft in schema.sparse}
    bags = {ft.name: _bags(ids[ft.name], rows.lines, path, ft.name) for ft in schema.multihot}
    seqs = {ft.name: _padded(ids[ft.name], ft.max_len) for ft in schema.sequence}
    cells = {name: sum(map(len, v)) for name, v in ids.items()}
    return Split(schema, sparse=sparse, dense=z, multihot=bags, sequence=seqs, label=labels,
                 group=np.asarray(rows.groups, dtype=np.int64),
                 stats=SplitStats(oov=rows.oov, cells=cells,
                                  imputed={ft.name: int(c) for ft, c in zip(schema.dense,
                                                                            imputed)}),
                 grouped=rows.grouped)


def _labels(cells: list[str], lines: list[int], n: int, path: Path, column: str,
            labelled: bool) -> np.ndarray:
    """``[n]`` float32 labels: all 0 unless ``labelled`` (the file has a label column with a
    cell that is not empty); else each cell must be a number in [0, 1] (DataFormatError
    naming the first that is not, or the first empty one)."""
    if not labelled:
        return np.zeros(n, dtype=np.float32)
    for cell, line in zip(cells, lines):
        if not cell:
            raise _no_label(path, line, column)
    y = np.asarray(parse_float(cells, path, lines, column))
    bad = np.flatnonzero((y < 0) | (y > 1))
    if len(bad):
        raise DataFormatError(path, lines[bad[0]], column,
                              f"label must lie in [0, 1], got {shorten(cells[bad[0]])}")
    return y.astype(np.float32)


def _no_label(path: Path, line: int, column: str) -> DataFormatError:
    return DataFormatError(path, line, column, "no label, while other rows have one (give "
                           "every row a label, or none)")


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------
def write_predictions(pred: Predictions, member_names: Sequence[str], path: str | Path, *,
                      labelled: bool = True) -> Path:
    """Writes ``pred`` as csv: ``row, prob, label`` (empty when ``labelled`` is False: rows
    read without a label, whose 0 in ``pred.label`` is no label), then ``prob_<member>`` per
    member and, when the ensemble has fusion weights, ``weight_<member>`` (written
    atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, _header(member_names, pred.weights is not None)
                      + _lines(pred, labelled, 0))
    return path


def _header(member_names: Sequence[str], weights: bool) -> str:
    """The header line of a predictions csv (:func:`write_predictions`)."""
    names = list(member_names)
    cols = ["row", "prob", "label", *(f"prob_{m}" for m in names)]
    return ",".join(cols + [f"weight_{m}" for m in names if weights]) + "\n"


def _lines(pred: Predictions, labelled: bool, first_row: int) -> str:
    """The lines of ``pred``'s rows in a predictions csv, numbered from ``first_row``."""
    member = torch.sigmoid(pred.logits.double())
    parts = [pred.prob.double().unsqueeze(1), pred.label.double().unsqueeze(1), member]
    if pred.weights is not None:
        parts.append(pred.weights.double())
    cells = [[f"{v:.6g}" for v in values] for values in torch.cat(parts, 1).tolist()]
    if not labelled:
        for row in cells:
            row[1] = ""
    return "".join(",".join([str(i), *row]) + "\n" for i, row in enumerate(cells, first_row))


def predict_run(run_dir: str | Path, out: str | Path, *, split: str | None = "test",
                csv_path: str | Path | None = None, checkpoint: str = BEST,
                device: str | None = None, batch_size: int | None = None,
                plugins: Sequence[str] = (),
                on_rows: Callable[[LoadedRun, Split], None] | None = None,
                ) -> tuple[Path, dict | None]:
    """Scores a split of the run's dataset, or the rows of ``csv_path`` (:func:`encode_csv`;
    it wins over ``split``), with the run's ``checkpoint`` and writes the predictions to
    ``out`` (:func:`write_predictions`). Returns ``(out, scores)``: scores are
    :func:`cetnet.train.evaluate.score`'s when the rows have labels (a split, or a csv with a
    label column holding both classes), else None.

    A csv is encoded, predicted and written :data:`CSV_CHUNK_ROWS` rows at a time (its bags
    padded per chunk), its predictions byte for byte those of the file encoded whole; ``out``
    is still written atomically (an error halfway leaves it as it was). ``on_rows(run, rows)``
    is called with each Split of rows before it is predicted (e.g. to count its
    out-of-vocabulary values)."""
    run = load_run(run_dir, checkpoint=checkpoint, device=device, plugins=plugins)
    batch = batch_size or run.config["train"]["eval_batch_size"]
    if csv_path is not None:
        return _predict_csv(run, Path(csv_path), Path(out), batch, on_rows)
    if split not in run.dataset.splits:
        raise ConfigError(f"--split: the dataset has no split {shorten(split)}, only "
                          f"{', '.join(run.dataset.splits)}")
    rows = run.dataset.splits[split]
    if on_rows is not None:
        on_rows(run, rows)
    pred = predict(run.model, rows, batch_size=batch, device=run.device)
    return write_predictions(pred, run.member_names, out), _scores(pred, run.member_names)


def _predict_csv(run: LoadedRun, csv_path: Path, out: Path, batch_size: int,
                 on_rows: Callable[[LoadedRun, Split], None] | None = None,
                 ) -> tuple[Path, dict | None]:
    # Chunks of whole batches: every forward pass sees the rows it sees when the file is
    # predicted whole (a row's bits depend on its batch's rows: BLAS blocks by shape).
    chunk_rows = -(-CSV_CHUNK_ROWS // batch_size) * batch_size
    splits = _csv_splits(run.dataset, csv_path, chunk_rows)
    first = next(splits)  # a bad header or first chunk fails before anything is created
    labelled = first.stats.labelled
    kept: list[Predictions] = []  # for the scores of labelled rows (a few numbers per row)

    def write(f: IO) -> None:
        done = 0
        for rows in itertools.chain([first], splits):
            if on_rows is not None:
                on_rows(run, rows)
            pred = predict(run.model, rows, batch_size=batch_size, device=run.device)
            if not done:
                f.write(_header(run.member_names, pred.weights is not None))
            f.write(_lines(pred, labelled, done))
            done += len(rows)
            if labelled:
                kept.append(pred)

    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, write, binary=False)
    except BaseException:  # a bad row of a later chunk, Ctrl-C: leave no new folder either
        for d in made:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return out, (_scores(_joined(kept), run.member_names) if kept else None)


def _joined(parts: Sequence[Predictions]) -> Predictions:
    """``parts`` (predictions of consecutive rows) as one."""
    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return Predictions(cat("prob"), cat("logits"),
                       cat("weights") if parts[0].weights is not None else None,
                       cat("label"), cat("group"), parts[0].grouped)


def _scores(pred: Predictions, member_names: Sequence[str]) -> dict | None:
    """:func:`score` of ``pred`` (rows with labels) when it has both classes, else None."""
    both = bool((pred.label > 0.5).any() and (pred.label <= 0.5).any())
    return score(pred, list(member_names)) if both else None


# ------------------------------------------------------------------------------------------------
# torch.export
# ------------------------------------------------------------------------------------------------
class ServingModule(nn.Module):
    """An ensemble over plain tensors, what ``torch.export`` traces and a server calls.

    ``forward(sparse, dense, multihot, sequence)`` takes the fields of a
    :class:`~cetnet.data.Batch` (:func:`batch_inputs`): ``sparse`` name -> ``[B]`` int64 ids,
    ``dense`` ``[B, n_dense]`` float32 (normalized), ``multihot`` name -> ``(values [nnz],
    offsets [B + 1])``, ``sequence`` name -> ``[B, T]`` ids. It returns ``{"prob": [B],
    "logits": [B, K]}`` plus ``"weights": [B, K]`` for an ensemble with fusion weights (CETNet).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sparse: dict[str, Tensor], dense: Tensor,
                multihot: dict[str, tuple[Tensor, Tensor]],
                sequence: dict[str, Tensor]) -> dict[str, Tensor]:
        # a NaN or infinite dense value would come out as NaN probabilities: an error instead,
        # read on the host (an exported program keeps it as a runtime assertion: no
        # device-side assert on a GPU, which would end the process's CUDA context)
        torch._check(torch.isfinite(dense).all().item(),
                     lambda: "dense: a value is NaN or infinite (dense inputs must be finite)")
        # label and group are not read by a forward pass; Batch wants them
        rows = torch.zeros(dense.shape[0], dtype=torch.int64, device=dense.device)
        out = self.model(Batch(sparse, dense, multihot, sequence, rows.float(), rows))
        result = {"prob": out.prob, "logits": out.logits}
        if out.weights is not None:
            result["weights"] = out.weights
        return result


def batch_inputs(batch: Batch) -> tuple[dict, Tensor, dict, dict]:
    """The positional inputs of :class:`ServingModule` (and of an exported program) for a
    batch: ``(sparse, dense, multihot, sequence)``."""
    return (dict(batch.sparse), batch.dense, {k: tuple(v) for k, v in batch.multihot.items()},
            dict(batch.sequence))


def example_inputs(schema: Schema, batch_size: int = 4,
                   device: torch.device | str = "cpu") -> tuple[dict, Tensor, dict, dict]:
    """Inputs of ``batch_size`` rows for tracing: every id the OOV id (valid in every
    vocabulary), two values per bag plus one, full sequences, zero dense values. The sizes
    are chosen unequal and above 1 so that export does not specialize them."""
    if batch_size < 2:
        raise ValueError("example_inputs: batch_size must be >= 2 (export specializes 0 and 1)")
    ids = torch.full((batch_size,), OOV_ID, dtype=torch.int64, device=device)
    nnz = 2 * batch_size + 1
    offsets = torch.arange(batch_size + 1, dtype=torch.int64, device=device) * 2
    offsets[-1] = nnz
    return ({f.name: ids.clone() for f in schema.sparse},
            torch.zeros(batch_size, len(schema.dense), device=device),
            {f.name: (torch.full((nnz,), OOV_ID, dtype=torch.int64, device=device),
                      offsets.clone()) for f in schema.multihot},
            {f.name: torch.full((batch_size, f.max_len), OOV_ID, dtype=torch.int64,
                                device=device) for f in schema.sequence})


def dynamic_shapes(schema: Schema) -> tuple[dict, dict, dict, dict]:
    """``torch.export`` dynamic shapes of :class:`ServingModule`'s inputs: the batch size
    (any >= 1) and each bag's number of values (any >= 0); sequence lengths and the number
    of dense features are fixed by the schema."""
    batch = torch.export.Dim("batch", min=1)
    return ({f.name: {0: batch} for f in schema.sparse},
            {0: batch},
            {f.name: ({0: torch.export.Dim(f"bag_values_{i}", min=0)}, {0: batch + 1})
             for i, f in enumerate(schema.multihot)},
            {f.name: {0: batch} for f in schema.sequence})


def export_model(model: nn.Module, schema: Schema) -> torch.export.ExportedProgram:
    """``torch.export.export`` of :class:`ServingModule` (``model`` in eval mode, no grad; see
    the module docstring) on the model's device, with a dynamic batch size and bag sizes."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())),
                  torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # non-strict (torch >= 2.7's default; 2.6's strict dynamo cannot trace the dense
            # check's torch._check with a message, and without one drops the check)
            program = torch.export.export(ServingModule(model), example_inputs(schema, 4, device),
                                          dynamic_shapes=dynamic_shapes(schema), strict=False)
    finally:
        model.train(was_training)
    # An embedding trained by a fused optimizer has a buffer that requires grad (its autograd
    # placeholder, never read by the lookup); as a program constant it makes torch warn
    # whenever the program becomes a module. A served program needs no grad from it.
    for name, value in list(program.constants.items()):
        if isinstance(value, Tensor) and value.requires_grad:
            program.constants[name] = value.detach()
    return program


@dataclass
class ExportedRun:
    """A program written by :func:`export_run`, loaded by :func:`load_exported`.

    Attributes:
        program: the ``torch.export.ExportedProgram``.
        schema: the run's feature schema (what the inputs hold).
        member_names: the names of the logit / weight columns.
    """

    program: torch.export.ExportedProgram
    schema: Schema
    member_names: list[str]

    def module(self) -> nn.Module:
        """The callable module of the program (``module()(*batch_inputs(batch))``), for
        inference: its parameters do not require grad. It is the program's own module (its
        parameters, buffers, ``state_dict`` and graph as ``torch.export`` gives them), whose
        call says ``dense: a value is NaN or infinite`` when the program's dense check fails,
        as :class:`ServingModule` does, not only the bare runtime assertion."""
        module = self.program.module()
        for p in module.parameters():
            p.requires_grad_(False)
        call = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            except RuntimeError as e:  # read only on the error path: no cost to a good call
                dense = args[1] if len(args) > 1 else kwargs.get("dense")
                if "Runtime assertion failed" in str(e) and isinstance(dense, Tensor) \
                        and not bool(torch.isfinite(dense).all()):
                    raise RuntimeError("dense: a value is NaN or infinite (dense inputs must "
                                       "be finite)") from e
                raise

        module.forward = forward  # this instance's call only
        return module


def export_run(run_dir: str | Path, out_path: str | Path, *, checkpoint: str = BEST,
               device: str | None = "cpu", plugins: Sequence[str] = ()) -> Path:
    """Exports a run's model (:func:`load_run`, :func:`export_model`) to ``out_path``
    (``torch.export.save``; conventionally ``*.pt2``), with the schema and member names as
    the extra file :data:`SCHEMA_FILE`, written atomically. The program runs on the device it
    was exported on (default the CPU).

    The model is traced on the compiled kernels, whose ops the program keeps: a run trained
    with ``backend: reference`` is rebuilt with ``auto`` (the same weights). Where only the
    reference backend runs (the C++ extension not built, or ``CETNET_BACKEND=reference``),
    ConfigError: its checks of the ids read tensor values, which ``torch.export`` cannot
    trace. A run of ``embedding: torchrec`` is traced on the fused embedding, its tables
    copied in and the copy checked to predict alike (TorchRec's lookups cannot be traced)."""
    load_plugins(plugins)
    run_config = load_run_config(run_dir)
    trained = run_config["backend"]
    run = load_run(run_dir, checkpoint=checkpoint, device=device,
                   backend="auto" if trained == "reference" else None)
    if resolve_backend(run.config["backend"], run.device) == "reference":
        raise ConfigError(f"only the reference backend runs on {run.device} here (the C++ "
                          "extension cetnet_kernels._C is not built, or "
                          "CETNET_BACKEND=reference); exporting needs the compiled kernels' "
                          "ops (the reference embedding checks ids by their values, which "
                          "torch.export cannot trace)")
    program = export_model(_exportable(run), run.dataset.schema)
    meta = {"schema": run.dataset.schema.to_dict(), "member_names": run.member_names,
            "run_dir": str(run.run_dir), "checkpoint": checkpoint, "epoch": run.epoch,
            "device": str(run.device)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # atomically: a reader (or a server reloading the file) never sees half of a program
    atomic_write(out_path, lambda f: _export_save(program, f, json.dumps(meta)))
    return out_path


def _export_save(program: Any, f: IO, meta: str) -> None:
    """torch.export.save into ``f``; a failed write (a full disk) is raised as itself, and the
    writer's own end-of-archive write at its destruction is absorbed (it aborted the process)."""
    guarded = FirstWriteError(f)
    try:
        torch.export.save(program, cast(IO[bytes], guarded),
                          extra_files={SCHEMA_FILE: meta})
    except Exception:
        if guarded.error is None:
            raise
    if guarded.error is not None:
        raise guarded.error


def _exportable(run: LoadedRun) -> nn.Module:
    """The run's model, or for a run of ``embedding: torchrec`` (torch.export cannot trace
    TorchRec's KeyedJaggedTensor lookups) the same model on the fused embedding: its TorchRec
    tables copied into a fused front (:meth:`TorchRecEmbeddingFront.tables_into`), every
    other weight and buffer loaded, then checked to predict as the TorchRec model does."""
    if run.config.get("embedding") != "torchrec":
        return run.model
    from cetnet.models import build_model
    from cetnet.models.torchrec_front import TABLES_PREFIX

    model = cast(Any, run.model)
    twin: Any = build_model(run.config["model"], run.dataset.schema,
                            backend=run.config["backend"]).to(run.device)
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(TABLES_PREFIX)}
    missing, unexpected = twin.load_state_dict(dense, strict=False)
    stray = [k for k in missing if not k.startswith(TABLES_PREFIX)] + list(unexpected)
    if stray:  # the two builds disagree beyond the front: nothing to export faithfully
        raise ConfigError(f"{run.run_dir}: the fused twin of the TorchRec model differs in "
                           f"{stray[:3]}")
    try:
        model.front.tables_into(twin.front)
    except ValueError as e:
        raise ConfigError(f"{run.run_dir}: {e}") from None
    twin.eval()
    # the same predictions, up to the order of float sums (TorchRec pools in its own order)
    rows = max(run.dataset.splits.values(), key=len)
    batch = rows.take(torch.arange(min(len(rows), 256))).to(run.device)
    with torch.no_grad():
        got, want = twin(batch).prob, model(batch).prob
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{run.run_dir}: the fused twin of the TorchRec model predicts "
                           f"otherwise (max difference {float((got - want).abs().max()):.3g})")
    return twin


def load_exported(path: str | Path) -> ExportedRun:
    """Loads a file written by :func:`export_run` (importing ``cetnet_kernels`` first, which
    registers the ``cetnet::*`` ops the program calls)."""
    from cetnet_kernels import _extension  # (registers torch.ops.cetnet.*)

    if not _extension.HAS_C:  # the program's ops come from the compiled module
        raise RuntimeError(f"{path}: the program calls the compiled ops of cetnet_kernels._C, "
                           f"which is not available here ({_extension.load_error}); build the "
                           "extension (pip install --no-build-isolation -e .)")
    extra = {SCHEMA_FILE: ""}
    program = torch.export.load(Path(path), extra_files=extra)
    if not extra[SCHEMA_FILE]:
        raise ValueError(f"{path}: no {SCHEMA_FILE} in it: not written by cetnet.serve."
                         "export_run (use torch.export.load for another program)")
    meta: Mapping[str, Any] = json.loads(extra[SCHEMA_FILE])
    return ExportedRun(program, Schema.from_dict(meta["schema"]), list(meta["member_names"]))
