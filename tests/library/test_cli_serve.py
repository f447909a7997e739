"""``cetnet predict`` and ``cetnet export`` on a tiny trained run (the synthetic dataset of the
``train_config`` fixture, one short epoch): the predictions of a split, of a csv of the same
rows, a csv predicted in chunks of rows exactly as whole, an exported program that matches the
eager model, outputs that are never replaced without ``--overwrite`` (nor half written), and
bad input as one line naming the argument. Also: output cut short by a closed pipe (``cetnet
data list | head -1``) ends quietly. And the out-of-vocabulary values of the rows predict reads
(``cetnet.cli.OOVTally``), with a warning naming a BARS sequence's separator."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cetnet_kernels import available_backends

from cetnet import serve
from cetnet.atomic import TEMP_SUFFIX
from cetnet.cli import BROKEN_PIPE_STATUS, main
from cetnet.config import dump_config
from cetnet.data.csvio import DataFormatError
from cetnet.train import predict
from cetnet.train.rundir import read_json

from run_support import small_run_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("serve")
        config = root / "tiny.yaml"
        dump_config(small_run_config(epochs=1, max_steps_per_epoch=4), config)
        assert main(["train", "--config", str(config), "--out", str(root / "run"), "--quiet",
                     "--no-plots"]) == 0
        yield root / "run"
    finally:
        torch.set_num_threads(threads)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _split_as_csv(run: serve.LoadedRun, split: str, path: Path, labels: bool = False) -> int:
    """The rows of ``split`` as raw values (dense features un-normalized, bags and sequences
    '|'-separated without padding), plus a column the run does not read (and the label
    column with ``labels``)."""
    schema, rows = run.dataset.schema, run.dataset.splits[split]
    stats = run.dataset.dense_stats
    raw = rows.dense.double().numpy() * stats.std + stats.mean
    n = len(rows)
    table = []
    for r in range(n):
        line = {f.name: int(rows.sparse[f.name][r]) for f in schema.sparse}
        line |= {f.name: repr(float(raw[r, j])) for j, f in enumerate(schema.dense)}
        for f in (*schema.multihot, *schema.sequence):
            ids = (rows.multihot | rows.sequence)[f.name][r]
            line[f.name] = "|".join(str(int(i)) for i in ids if int(i) != 0)
        if labels:
            line[schema.label] = int(rows.label[r])
        table.append(line | {"note": "ignored"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return n


def test_predict_writes_a_split_and_prints_its_scores(run_dir, tmp_path, capsys):
    out = tmp_path / "test.csv"
    assert main(["predict", str(run_dir), "--out", str(out), "--batch-size", "100"]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 300
    assert list(rows[0]) == ["row", "prob", "label", "prob_dnn", "prob_dcnv2", "weight_dnn",
                             "weight_dcnv2"]
    # the scores of the best checkpoint on test, as the run recorded them
    assert f"{read_json(run_dir / 'metrics.json')['fused']['auc']:.4f}" in printed
    assert f"written: {out}" in printed
    # another checkpoint, given as a path
    assert main(["predict", str(run_dir), "--split", "valid", "--out", str(tmp_path / "v.csv"),
                 "--checkpoint", str(run_dir / "last.pt")]) == 0
    assert len(_rows(tmp_path / "v.csv")) == 300


def test_predict_a_csv_of_new_rows_as_the_run_reads_its_own(run_dir, tmp_path, capsys):
    run = serve.load_run(run_dir)
    new_rows = tmp_path / "new_rows.csv"
    n = _split_as_csv(run, "test", new_rows)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--csv", str(new_rows), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AUC" not in printed  # no label column: no scores
    got = torch.tensor([float(r["prob"]) for r in _rows(out)])
    # no label: the label cells are empty (a 0 there read as a negative label)
    assert len(got) == n and {r["label"] for r in _rows(out)} == {""}
    expected = predict(run.model, run.dataset.splits["test"]).prob
    torch.testing.assert_close(got, expected.double().float(), rtol=0, atol=2e-6)


def _edit_lines(path: Path, edit) -> Path:
    """``path`` rewritten with ``edit(lines) -> lines`` (lines without their line ends)."""
    lines = path.read_text().splitlines()
    out = path.with_name(f"edited_{path.name}")
    out.write_text("\n".join(edit(lines)) + "\n")
    return out


def _set_cell(lines: list[str], line: int, column: str, value: str) -> list[str]:
    """``lines`` with ``column``'s cell on (1-based) ``line`` set to ``value``."""
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = value
    return lines[:line - 1] + [",".join(cells)] + lines[line:]


def _without_labels(lines: list[str], column: str, first: int, stop: int) -> list[str]:
    """``lines`` with ``column``'s cells of (1-based) lines ``first`` to ``stop - 1`` emptied."""
    for line in range(first, min(stop, len(lines) + 1)):
        lines = _set_cell(lines, line, column, "")
    return lines


def _recording(monkeypatch) -> list:
    """The predictions of every ``predict`` call of cetnet.serve from now on, in order."""
    calls = []

    def recorder(*args, **kwargs):
        calls.append(predict(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(serve, "predict", recorder)
    return calls


def test_predict_a_labelled_csv_scores_it_as_the_split(run_dir, tmp_path):
    """The csv of a split with its labels: the split's scores, gAUC included (grouped by the
    raw user value); a byte-order mark and CRLF line ends change nothing; a label column
    left empty means unlabelled rows (no scores)."""
    run = serve.load_run(run_dir)
    path = tmp_path / "labelled.csv"
    _split_as_csv(run, "test", path, labels=True)
    split_out, split_scores = serve.predict_run(run_dir, tmp_path / "s.csv", split="test")
    csv_out, csv_scores = serve.predict_run(run_dir, tmp_path / "c.csv", csv_path=path)
    assert split_scores is not None and csv_scores is not None
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    want = flat(split_scores)
    assert "fused.gauc" in want and flat(csv_scores) == pytest.approx(want, abs=1e-5)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + path.read_text().replace("\n", "\r\n").encode())
    _, excel_scores = serve.predict_run(run_dir, tmp_path / "e.csv", csv_path=excel)
    assert excel_scores == csv_scores
    blank = _edit_lines(path, lambda ls: [ls[0]] + [_set_cell([ls[0], x], 2, "label", "")[1]
                                                   for x in ls[1:]])
    assert serve.predict_run(run_dir, tmp_path / "b.csv", csv_path=blank)[1] is None
    assert {r["label"] for r in _rows(tmp_path / "b.csv")} == {""}
    assert {r["label"] for r in _rows(tmp_path / "e.csv")} == {"0", "1"}


def test_predict_csv_groups_unseen_users_apart(run_dir, tmp_path):
    """gAUC groups by the raw group value: two users the run never saw (both OOV as a
    feature) are two groups, not one."""
    run = serve.load_run(run_dir)
    path = tmp_path / "rows.csv"
    _split_as_csv(run, "test", path, labels=True)
    group = run.dataset.group_key
    lines = path.read_text().splitlines()[:5]
    for line, user in ((2, "900001"), (3, "900001"), (4, "900002"), (5, "900002")):
        lines = _set_cell(lines, line, group, user)
    path.write_text("\n".join(lines) + "\n")
    rows = serve.encode_csv(run.dataset, path)
    assert rows.group.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("chunk, batch", [(1, 1), (1, 3), (7, 3), (10**6, 3)])
def test_predict_csv_in_chunks_is_the_file_predicted_whole(run_dir, tmp_path, monkeypatch,
                                                           chunk, batch):
    """A csv is encoded and predicted a chunk of rows at a time (rounded up to whole batches:
    a row's bits depend on the rows of its forward pass), with the predictions, output bytes
    and scores of the file predicted whole, bit for bit; bags (one row's much wider than the
    rest) and sequences are padded per chunk, groups and labels are the file's."""
    run = serve.load_run(run_dir)
    schema = run.dataset.schema
    assert schema.multihot and schema.sequence and run.dataset.group_key
    path = tmp_path / "rows.csv"
    n = _split_as_csv(run, "test", path, labels=True)
    bag = schema.multihot[0].name
    path = _edit_lines(path, lambda ls: _set_cell(ls, 9, bag, "|".join(["3"] * 40)))
    whole = _recording(monkeypatch)
    want, want_scores = serve.predict_run(run_dir, tmp_path / "whole.csv", csv_path=path,
                                          batch_size=batch)
    assert len(whole) == 1 and want_scores is not None and "gauc" in want_scores["fused"]
    chunked = _recording(monkeypatch)
    monkeypatch.setattr(serve, "CSV_CHUNK_ROWS", chunk)
    got, got_scores = serve.predict_run(run_dir, tmp_path / "chunked.csv", csv_path=path,
                                        batch_size=batch)
    rows = -(-chunk // batch) * batch
    assert [len(p.prob) for p in chunked] == [rows] * (n // rows) + [n % rows] * (n % rows > 0)
    assert got.read_bytes() == want.read_bytes()
    assert got_scores == want_scores
    for name in ("prob", "logits", "weights", "label", "group"):
        assert torch.equal(torch.cat([getattr(p, name) for p in chunked]),
                           getattr(whole[0], name)), name


def test_predict_csv_stopped_halfway_leaves_the_output_as_it_was(run_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """Chunks go to a temporary beside ``--out``, which replaces it at the end only: Ctrl-C or
    a bad row halfway leaves an existing output as it was and no temporary behind."""
    run = serve.load_run(run_dir)
    path = tmp_path / "rows.csv"
    _split_as_csv(run, "test", path)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    out.write_text("mine\n")
    monkeypatch.setattr(serve, "CSV_CHUNK_ROWS", 10)
    real = serve.predict
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            assert list(out.parent.glob(f".p.csv.*{TEMP_SUFFIX}"))  # two chunks written there
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve.predict_run(run_dir, out, csv_path=path, batch_size=10)
    assert [len(rows) for rows in calls] == [10, 10, 10]
    assert out.read_text() == "mine\n" and [p.name for p in out.parent.iterdir()] == ["p.csv"]
    monkeypatch.setattr(serve, "predict", real)
    bad = _edit_lines(path, lambda ls: _set_cell(ls, 200, run.dataset.schema.dense[0].name,
                                                 "abc"))
    assert main(["predict", str(run_dir), "--csv", str(bad), "--out", str(out), "--overwrite",
                 "--batch-size", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 200" in err[0], err
    assert out.read_text() == "mine\n" and [p.name for p in out.parent.iterdir()] == ["p.csv"]
    # a new output directory is made only once the header and the first chunk are read
    assert main(["predict", str(run_dir), "--csv", str(_bad_csv(tmp_path)), "--out",
                 str(tmp_path / "new" / "p.csv")]) == 2
    assert not (tmp_path / "new").exists()
    # and removed again when a later chunk fails (folders made for it, deepest first)
    assert main(["predict", str(run_dir), "--csv", str(bad), "--out",
                 str(tmp_path / "new" / "deeper" / "p.csv"), "--batch-size", "10"]) == 2
    assert not (tmp_path / "new").exists()


# (how a good labelled csv is broken, the line and column the error must name)
BAD_ROWS = {
    "not a number": (lambda ls, c: _set_cell(ls, 3, c["dense"], "abc"), 3, "dense"),
    "inf": (lambda ls, c: _set_cell(ls, 2, c["dense"], "inf"), 2, "dense"),
    "nan": (lambda ls, c: _set_cell(ls, 4, c["dense"], "nan"), 4, "dense"),
    "label 2": (lambda ls, c: _set_cell(ls, 3, c["label"], "2"), 3, "label"),
    "label -1": (lambda ls, c: _set_cell(ls, 2, c["label"], "-1"), 2, "label"),
    "label missing": (lambda ls, c: _set_cell(ls, 4, c["label"], ""), 4, "label"),
    "short row": (lambda ls, c: ls[:2] + ["1,2,3"] + ls[3:], 3, None),
    "extra field": (lambda ls, c: ls[:3] + [ls[3] + ",x"] + ls[4:], 4, None),
    "blank lines count": (lambda ls, c: _set_cell(ls[:2] + ["", ""] + ls[2:], 5, c["dense"],
                                                  "abc"), 5, "dense"),
    "header only": (lambda ls, c: ls[:1], 1, None),
    "late bad value": (lambda ls, c: _set_cell(ls, 250, c["dense"], "abc"), 250, "dense"),
    "labels after rows without": (lambda ls, c: _without_labels(ls, c["label"], 2, 100), 2,
                                  "label"),
    "rows without labels after labels": (lambda ls, c: _without_labels(ls, c["label"], 150,
                                                                       400), 150, "label"),
}


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "chunks of 1"])
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_predict_csv_bad_rows_are_one_line_naming_line_and_column(run_dir, tmp_path, capsys,
                                                                  monkeypatch, case, chunk):
    """The same error, naming the file's own line, whether the file is read whole or a row
    at a time (blank lines and the header counted; labels mixed across chunks refused as
    within one)."""
    if chunk is not None:
        monkeypatch.setattr(serve, "CSV_CHUNK_ROWS", chunk)
    run = serve.load_run(run_dir)
    path = tmp_path / "good.csv"
    _split_as_csv(run, "test", path, labels=True)
    schema = run.dataset.schema
    edit, line, column = BAD_ROWS[case]
    names = {"dense": schema.dense[0].name, "label": schema.label}
    bad = _edit_lines(path, lambda ls: edit(ls, names))
    out = tmp_path / "p.csv"
    assert _status(["predict", str(run_dir), "--csv", str(bad), "--out", str(out),
                    "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"line {line}" in err, err
    if column is not None:
        assert f"column {names[column]!r}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited_good.csv", "good.csv"]


@pytest.mark.skipif("cpu" not in available_backends("cpu"),
                    reason="export traces the compiled kernels; cetnet_kernels._C is not built")
def test_export_past_a_file_size_limit_is_one_error_not_an_abort(run_dir, tmp_path):
    """A full disk or a file size limit while exporting: the error line, then the writer's
    destructor wrote the end of its archive, failed again and aborted the process (C++
    terminate, exit 134, ~30 native frames). Now one error naming the file, exit 2, and
    nothing left behind."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "served"
    out.mkdir()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from cetnet.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))
        sys.exit(main(["export", {str(run_dir)!r}, {str(out / "m.pt2")!r}]))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cetnet export: error:" in done.stderr and str(out / "m.pt2") in done.stderr
    assert "terminate called" not in done.stderr and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []


def test_export_writes_a_program_that_matches_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "served" / "model.pt2"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert f"{out}" in capsys.readouterr().out
    exported = serve.load_exported(out)
    assert exported.member_names == ["dnn", "dcnv2"]
    run = serve.load_run(run_dir)
    batch = run.dataset.splits["test"].take(torch.arange(7))
    with torch.no_grad():
        served = exported.module()(*serve.batch_inputs(batch))
        eager = run.model(batch)
    torch.testing.assert_close(served["prob"], eager.prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(served["weights"], eager.weights, rtol=0, atol=1e-6)
    # a NaN or infinite dense value: an error naming dense, not NaN probabilities (the
    # program's runtime assertion; its message is ServingModule's)
    assert run.dataset.schema.dense
    for bad in (math.nan, math.inf):
        sparse, dense, bags, sequences = serve.batch_inputs(batch)
        inputs = (sparse, dense.clone(), bags, sequences)
        inputs[1][2, 0] = bad
        with pytest.raises(RuntimeError, match="dense: a value is NaN or infinite") as failed:
            exported.module()(*inputs)
        assert "Runtime assertion failed" in str(failed.value.__cause__)
        with pytest.raises(RuntimeError, match="Runtime assertion failed"):
            exported.program.module()(*inputs)  # the plain module of the program
        with pytest.raises(RuntimeError, match="dense: a value is NaN or infinite"):
            serve.ServingModule(run.model)(*inputs)
    # module() is the program's own module (its state_dict keys, graph), its call patched
    module, plain = exported.module(), exported.program.module()
    assert isinstance(module, torch.fx.GraphModule) and hasattr(module, "graph")
    assert list(module.state_dict()) == list(plain.state_dict())
    with torch.no_grad():  # and the program goes on serving
        again = exported.module()(*serve.batch_inputs(batch))
    torch.testing.assert_close(again["prob"], eager.prob, rtol=0, atol=1e-6)
    # an existing program is kept unless --overwrite; a write leaves no temporary behind
    before = out.read_bytes()
    assert main(["export", str(run_dir), str(out), "--checkpoint", "last.pt"]) == 2
    assert "OUT.pt2" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(run_dir), str(out), "--checkpoint", "last.pt",
                 "--overwrite"]) == 0
    assert serve.load_exported(out).member_names == ["dnn", "dcnv2"]
    assert not list(out.parent.glob(f"*{TEMP_SUFFIX}"))


def test_export_without_the_compiled_kernels_says_so(run_dir, tmp_path, capsys, monkeypatch):
    # the run trained on the reference backend; export rebuilds it on "auto", which the
    # environment turns back into the reference backend: no program, one line saying why
    monkeypatch.setenv("CETNET_BACKEND", "reference")
    assert main(["export", str(run_dir), str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only the reference backend runs" in err
    assert not (tmp_path / "m.pt2").exists()


def test_loading_a_program_without_the_compiled_kernels_says_so(run_dir, tmp_path,
                                                                monkeypatch):
    # cetnet_kernels imports without its extension (a warning), and torch.export.load then
    # failed with "an error when deserializing the saved file" after screens of warnings
    from cetnet_kernels import _extension

    path = serve.export_run(run_dir, tmp_path / "m.pt2")
    monkeypatch.setattr(_extension, "HAS_C", False)
    monkeypatch.setattr(_extension, "load_error", "ImportError: no _C here")
    with pytest.raises(RuntimeError, match=r"compiled ops of cetnet_kernels._C, which is not "
                                           r"available here \(ImportError: no _C here\)"):
        serve.load_exported(path)


def test_one_very_wide_bag_is_refused_not_padded_into_every_row(run_dir, tmp_path, capsys,
                                                                 monkeypatch):
    # every row of a chunk is padded to its widest bag: one bag of 6,000 ids in 6,000 rows
    # took 0.4 GiB, one of 100k in 100k rows would take 80 (killed for memory instead of an
    # error). A file of one chunk (or encode_csv's whole file) is refused; smaller chunks
    # predict it, the wide bag padding only its own chunk.
    run = serve.load_run(run_dir)
    path = tmp_path / "wide.csv"
    _split_as_csv(run, "test", path)
    rows = _rows(path)
    bag = run.dataset.schema.multihot[0].name
    rows[3][bag] = "|".join(["1"] * 2000)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(serve, "MAX_BAG_CELLS", 1000)  # (the file is small)
    assert main(["predict", str(run_dir), "--csv", str(path), "--out",
                 str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a bag of 2,000 ids; rows are padded" in err[0], err
    assert "for 300 rows" in err[0] and not (tmp_path / "p.csv").exists()
    with pytest.raises(DataFormatError, match=f"line 5, column '{bag}': a bag of 2,000 ids"):
        serve.encode_csv(run.dataset, path)
    monkeypatch.setattr(serve, "CSV_CHUNK_ROWS", 4)
    assert main(["predict", str(run_dir), "--csv", str(path), "--out", str(tmp_path / "p.csv"),
                 "--batch-size", "64"]) == 2  # a chunk of 64 rows, still too wide
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"line 5, column '{bag}': a bag of 2,000 ids" in err[0], err
    assert "for 64 rows" in err[0] and not (tmp_path / "p.csv").exists()
    assert main(["predict", str(run_dir), "--csv", str(path), "--out", str(tmp_path / "p.csv"),
                 "--batch-size", "4"]) == 0  # chunks of 4 rows
    monkeypatch.undo()
    assert main(["predict", str(run_dir), "--csv", str(path), "--out",
                 str(tmp_path / "whole.csv"), "--batch-size", "4"]) == 0  # within the budget
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def _bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("user,item\n1,2\n")
    return path


# (arguments after the command, what the error line must name); {run}, {tmp} are filled in
BAD_INPUT = [
    (["predict", "{tmp}/nope", "--out", "{tmp}/p.csv"], "RUN_DIR"),
    (["predict", "{tmp}", "--out", "{tmp}/p.csv"], "config.yaml"),
    (["predict", "{run}", "--out", "{tmp}/p.csv", "--checkpoint", "epoch3.pt"], "--checkpoint"),
    (["predict", "{run}", "--out", "{tmp}/p.csv", "--checkpoint", "{tmp}/x.pt"],
     "--checkpoint"),
    (["predict", "{run}", "--out", "{tmp}/p.csv", "--csv", "{tmp}/none.csv"], "--csv"),
    (["predict", "{run}", "--out", "{tmp}/p.csv", "--csv", "{tmp}/bad.csv"], "--csv"),
    (["predict", "{run}", "--out", "{tmp}/exists.csv"], "--out"),
    (["predict", "{run}", "--out", "{tmp}"], "--out"),
    (["predict", "{run}", "--out", "{tmp}/p.csv", "--batch-size", "0"], "--batch-size"),
    (["predict", "{run}"], "--out"),
    (["export", "{tmp}/nope", "{tmp}/m.pt2"], "RUN_DIR"),
    (["export", "{run}", "{tmp}/m.pt2", "--checkpoint", "epoch3.pt"], "--checkpoint"),
    (["export", "{run}", "{tmp}/exists.csv"], "OUT.pt2"),
]


def _status(argv: list[str]) -> int:
    """main's status, also for a usage error (argparse exits)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, named", BAD_INPUT, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else v)
def test_bad_input_is_one_line_naming_the_argument(run_dir, tmp_path, capsys, argv, named):
    _bad_csv(tmp_path)
    (tmp_path / "exists.csv").write_text("mine\n")
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cetnet {argv[0]}: error: "), err
    assert named in err and "Traceback" not in err
    assert (tmp_path / "exists.csv").read_text() == "mine\n"  # never replaced
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.pt2").exists()


def test_a_closed_pipe_ends_quietly():
    # the reader goes away before cetnet writes (as `| head -1` does once it has its line):
    # no "Broken pipe" error, the status of a program that SIGPIPE ended
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cetnet", "data", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == BROKEN_PIPE_STATUS == 141
    assert err == ""
    # through a shell, as a user types it: the first line arrives, nothing on stderr
    shell = subprocess.run(f"'{sys.executable}' -m cetnet data list | head -1",
                           shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert shell.returncode == 0 and shell.stdout.startswith("Datasets")
    assert shell.stderr == ""


def test_a_checkpoint_of_another_model_config_is_refused(run_dir, tmp_path, capsys):
    """config.yaml and best.pt are read unlocked by predict and export: a run overwritten with
    another fusion temperature in between paired the new config with the old weights (they fit
    the shapes) and predicted other probabilities without a word (reviewer: up to 0.0068)."""
    import shutil

    import yaml

    from cetnet.train.checkpoint import MODEL_CONFIG, CheckpointError, load_checkpoint
    from cetnet.train.runner import evaluate_run

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    assert load_checkpoint(other / "best.pt")[MODEL_CONFIG] == config["model"]
    config["model"]["fusion"]["temperature"] = 0.05  # the overwriting run's config
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for load in (lambda: serve.load_run(other), lambda: evaluate_run(other, write=False),
                 lambda: evaluate_run(other)):
        with pytest.raises(CheckpointError, match="another model config"):
            load()
    assert main(["predict", str(other), "--split", "test", "--out",
                 str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with another model config" in err[0], err
    # another run's checkpoint: the config it does not fit is this run's (the message named
    # the config beside the checkpoint, which it fits)
    assert main(["predict", str(other), "--checkpoint", str(run_dir / "best.pt"), "--split",
                 "test", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert f"trained with another model config than {other / 'config.yaml'} says" in err, err
    # a tuple in memory (a config made in Python) is a list in config.yaml; NaN equals NaN:
    # the run's own checkpoint was refused
    from cetnet.train.checkpoint import check_model_config

    check_model_config({MODEL_CONFIG: {"members": ("dnn", "dcnv2"), "x": math.nan}},
                       {"model": {"members": ["dnn", "dcnv2"], "x": math.nan}}, "best.pt")
    # a checkpoint of before (no model section recorded) is taken as it is
    state = load_checkpoint(other / "best.pt")
    del state[MODEL_CONFIG]
    torch.save(state, other / "best.pt")
    assert serve.load_run(other).config["model"]["fusion"]["temperature"] == 0.05


# --- out-of-vocabulary values of the rows predict reads (cetnet.cli.OOVTally) -------------------

def test_predict_help_says_a_bars_run_reads_its_own_format_and_splitter(capsys):
    # the help said '|' between a sequence's values for every run; a BARS run splits them by
    # its YAML's splitter ('^' by default), and a user following the help got every history
    # read as one unknown value, silently
    assert _status(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'|' between the values of a bag or a sequence" in text
    assert "A run on a BARS dataset" in text and "splitter there (default '^')" in text


def test_oov_tally_sums_the_chunks_as_the_file_read_whole(run_dir, tmp_path):
    """Summed over chunks, the counts are those of the file encoded whole; the rows of the
    test split have its shares, and nothing is warned about."""
    from cetnet.cli import OOVTally

    run = serve.load_run(run_dir)
    path = tmp_path / "rows.csv"
    n = _split_as_csv(run, "test", path)
    lines = path.read_text().splitlines()
    halves = [_edit_lines(path, lambda ls: ls[:120]), tmp_path / "rest.csv"]
    halves[1].write_text("\n".join([lines[0], *lines[120:]]) + "\n")
    tally = OOVTally("--csv rows.csv")
    for half in halves:
        tally.add(run, serve.encode_csv(run.dataset, half))
    whole = serve.encode_csv(run.dataset, path).stats
    test = run.dataset.splits["test"].stats
    assert tally.rows == n and tally.oov == whole.oov and tally.cells == whole.cells
    assert tally.oov == test.oov and tally.cells == test.cells
    assert tally.warnings() == []
    table = tally.lines()
    assert table[0] == (f"out-of-vocabulary values of the {n:,} rows of --csv rows.csv "
                        f"(share in the run's test split):")
    assert len(table) == 1 + len(run.dataset.schema.categorical)


def test_oov_tally_warns_about_a_feature_far_above_the_test_split(run_dir, tmp_path):
    """A column whose values are mostly unknown while the test split's are not is named, with
    the separator a bag or sequence needs; a share above the test split's but not past the
    threshold (half the values, twice the test split's) is only listed."""
    from cetnet.cli import OOV_WARN_SHARE, OOVTally

    run = serve.load_run(run_dir)
    schema = run.dataset.schema
    seq, sparse = schema.sequence[0].name, schema.sparse[0].name
    path = tmp_path / "rows.csv"
    n = _split_as_csv(run, "test", path)
    unknown = str(10**9)  # an id outside every vocabulary: OOV

    def edit(lines: list[str]) -> list[str]:
        for line in range(2, n + 2):
            lines = _set_cell(lines, line, seq, unknown)
            if line < 2 + n * 0.4:  # 40 % of the rows: above the test split's, below the bar
                lines = _set_cell(lines, line, sparse, unknown)
        return lines

    edited = _edit_lines(path, edit)
    tally = OOVTally("--csv rows.csv")
    tally.add(run, serve.encode_csv(run.dataset, edited))
    assert tally.share(seq) == 1.0 and 0.3 < tally.share(sparse) <= OOV_WARN_SHARE
    (warning,) = tally.warnings()
    test_share = run.dataset.splits["test"].stats.oov[seq] / \
        run.dataset.splits["test"].stats.cells[seq]
    assert warning.startswith(f"--csv rows.csv: 100.0% of {seq}'s values are out of "
                              f"vocabulary, against {test_share:.1%} in the run's test split")
    assert "separated by '|'" in warning
    assert any(line.split()[0] == sparse and "40.0%" in line for line in tally.lines())


BARS_YAML = """\
tiny_x1:
    data_format: csv
    train_data: train.csv
    valid_data: valid.csv
    test_data: test.csv
    min_categr_count: 1
    feature_cols:
        - {name: user_id, type: meta}
        - {name: item_id, type: categorical}
        - {name: item_history, type: sequence, splitter: ^, max_len: 5, share_embedding: item_id}
        - {name: tag_history, type: sequence, splitter: ;, max_len: 5}
    label_col: {name: label, dtype: float}
"""


def _bars_dataset(tmp_path: Path):
    """A small BARS dataset: histories of items joined by '^' and of tags joined by ';'."""
    import random

    from cetnet.data import load_bars

    rng = random.Random(0)
    for split, n in (("train", 200), ("valid", 60), ("test", 60)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "user_id", "item_id", "item_history", "tag_history"])
            for _ in range(n):
                w.writerow([rng.randint(0, 1), rng.randint(1, 20), f"i{rng.randint(1, 15)}",
                            "^".join(f"i{rng.randint(1, 15)}" for _ in range(3)),
                            ";".join(f"t{rng.randint(1, 6)}" for _ in range(2))])
    path = tmp_path / "dataset_config.yaml"
    path.write_text(BARS_YAML)
    return path, load_bars(path)


def test_oov_tally_names_the_splitter_of_a_bars_sequence(tmp_path):
    """The reviewer's case: a BARS run's new rows with histories joined by '|' (as the help
    said) read each history as one unknown value. The warning names the YAML's splitter of
    the feature; the rows of the dataset's own test file warn about nothing."""
    from types import SimpleNamespace

    from cetnet.cli import OOVTally, list_separators

    yaml_path, dataset = _bars_dataset(tmp_path)
    config = {"data": {"name": "bars", "config": str(yaml_path)}}
    assert list_separators(config, dataset) == {"item_history": "^", "tag_history": ";"}
    run = SimpleNamespace(dataset=dataset, config=config)
    own = OOVTally("--csv test.csv")
    for rows, _ in dataset.row_encoder(tmp_path / "test.csv", 25):  # in chunks, as predict reads
        own.add(run, rows)
    assert own.rows == 60 and own.warnings() == []
    piped = tmp_path / "piped.csv"
    piped.write_text((tmp_path / "test.csv").read_text().replace("^", "|"))
    tally = OOVTally("--csv piped.csv")
    for rows, _ in dataset.row_encoder(piped, None):
        tally.add(run, rows)
    (warning,) = tally.warnings()
    assert warning.startswith("--csv piped.csv: 100.0% of item_history's values are out of "
                              "vocabulary, against 0.0% in the run's test split")
    assert "separated by '^'" in warning
    assert tally.cells["item_history"] == 60  # one (unknown) value per row, not three
    # another dataset with a format of its own: the separator is not known, only the advice
    assert list_separators({"data": {"name": "elsewhere"}}, dataset) == {
        "item_history": None, "tag_history": None}


def test_predict_prints_the_oov_of_the_rows_it_read_and_warns(tmp_path, capsys, one_thread):
    """End to end: `cetnet predict` on a BARS run prints the out-of-vocabulary values of the
    rows it read and warns about histories joined by '|' instead of the YAML's '^'."""
    yaml_path, _ = _bars_dataset(tmp_path)
    config = small_run_config(epochs=1, batch_size=64)
    config["data"] = {"name": "bars", "config": str(yaml_path)}
    dump_config(config, tmp_path / "run.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(run_dir),
                 "--quiet", "--no-plots"]) == 0
    piped = tmp_path / "piped.csv"
    piped.write_text((tmp_path / "test.csv").read_text().replace("^", "|"))
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--csv", str(piped), "--out",
                 str(tmp_path / "p.csv"), "--batch-size", "16"]) == 0  # 4 chunks of 16 rows
    captured = capsys.readouterr()
    assert (f"out-of-vocabulary values of the 60 rows of --csv {piped} (share in the run's "
            "test split):") in captured.out
    assert any(line.split()[:4] == ["item_history", "60", "of", "60"]
               for line in captured.out.splitlines()), captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "item_history's values" in warnings[0] \
        and "separated by '^'" in warnings[0], captured.err
