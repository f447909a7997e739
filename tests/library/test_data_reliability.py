"""Reliability of the data layer: the dataset cache under concurrency and damage, clear errors for
bad csv files and bad options, and a malformed BARS dataset YAML.

Every bad input is one error of a type the CLI prints in one line (ConfigError, DataFormatError,
FileNotFoundError) naming the file, line / key and column / feature; user values in messages are
quoted short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cetnet import atomic
from cetnet.cli import main
from cetnet.config import ConfigError
from cetnet.data import (CTRDataset, DataFormatError, Split, load_bars, load_dataset,
                         make_synthetic)
from cetnet.data import cache as cache_mod
from cetnet.data import csvio
from cetnet.data import movielens as ml
from cetnet.data.csvio import read_chunks, shorten

from helpers import flip_a_stored_byte
from cetnet.data.dataset import FORMAT_VERSION, CacheError
from cetnet.data.movielens import FetchError, load_movielens

from test_data_bars import CONFIGS, make_bars

REPO = Path(__file__).resolve().parents[2]
USER_ERRORS = (ConfigError, DataFormatError, FileNotFoundError)  # what the CLI prints in a line


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# ================================================================================ the cache

BARRIER_PLUGIN = '''
"""Test plugin: holds every process here until all have started, so their prepares overlap."""
import os, pathlib, time
folder = pathlib.Path(os.environ["CETNET_TEST_BARRIER"])
(folder / f"ready-{os.getpid()}").touch()
deadline = time.monotonic() + 120
while len(list(folder.glob("ready-*"))) < int(os.environ["CETNET_TEST_PROCESSES"]):
    if time.monotonic() > deadline:
        raise SystemExit("barrier: the other processes never started")
    time.sleep(0.01)
'''


def test_concurrent_cli_prepares_into_one_cache_all_succeed(tmp_path):
    """Three real `cetnet data prepare bars` processes, released together, encode and cache the
    same dataset into one directory: all succeed, with the same summary, and leave one complete
    cache file and no temporary (a fixed '.tmp' name made them fail with 'No such file')."""
    cfg = make_bars(tmp_path, "taobaoad_x1", {"train": 3000, "test": 600})
    cache = tmp_path / "cache"
    (tmp_path / "barrier").mkdir()
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "cetnet_test_barrier.py").write_text(BARRIER_PLUGIN)
    n = 3
    env = {**os.environ, "CETNET_TEST_BARRIER": str(tmp_path / "barrier"),
           "CETNET_TEST_PROCESSES": str(n),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), str(REPO / "python"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cetnet", "--plugin", "cetnet_test_barrier", "data", "prepare",
           "bars", f"config={cfg}", f"cache_dir={cache}", "chunk_size=500"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert len({out for out, _ in outs}) == 1  # the same summary, whoever wrote the cache
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1, files
    assert sorted(p.name for p in cache.iterdir()) == [  # and its record of the inputs
        files[0].name, files[0].stem + ".sources.json"]
    assert load_bars(cfg, cache_dir=cache).summary() == load_bars(cfg).summary()
    assert outs[0][0].strip() == load_bars(cfg).summary()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "other_version",
                                    "not_a_dataset", "flipped_byte"])
def test_a_damaged_bars_cache_is_detected_and_rebuilt(tmp_path, damage, capfd):
    cfg = make_bars(tmp_path, "amazonelectronics_x1")
    cache = tmp_path / "cache"
    first = load_bars(cfg, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    good = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "flipped_byte":  # loaded silently with one id changed, before CRCs
        path.write_bytes(flip_a_stored_byte(good))
    elif damage == "other_version":
        torch.save({"version": FORMAT_VERSION + 1}, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    capfd.readouterr()
    again = load_bars(cfg, cache_dir=cache)
    err = capfd.readouterr().err
    assert "warning" in err and str(path) in err and "rebuilding" in err
    assert again.summary() == first.summary()
    assert path.read_bytes() != b"" and CTRDataset.load(path).summary() == first.summary()
    assert [p.name for p in cache.glob("*.pt")] == [path.name]


@pytest.mark.parametrize("content, pattern", [
    (b"", r"empty \(0 bytes\)"),
    (b"PK\x03\x04 not really a zip", r"truncated or corrupt \(\d+ bytes\)"),
])
def test_loading_an_unreadable_saved_dataset_names_the_file(tmp_path, content, pattern):
    path = tmp_path / "ds.pt"
    path.write_bytes(content)
    with pytest.raises(CacheError, match=pattern) as e:
        CTRDataset.load(path)
    assert _one_line(e).startswith(f"{path}: unreadable saved dataset")
    assert isinstance(e.value, DataFormatError)  # printed in one line by the CLI
    make_synthetic(300).save(path)
    state = torch.load(path, weights_only=True)
    del state["splits"]["train"]["label"]
    torch.save(state, path)
    with pytest.raises(CacheError, match=r"inconsistent saved dataset \(KeyError"):
        CTRDataset.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        CTRDataset.load(tmp_path / "nope.pt")


def test_a_cache_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    cfg = make_bars(tmp_path, "criteo_x1")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot use it as a data/cache directory") as e:
        load_bars(cfg, cache_dir=blocker)
    assert str(blocker) in _one_line(e)

    def denied(self, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(CTRDataset, "save", denied)  # as root, chmod cannot deny a write
    with pytest.raises(CacheError, match=r"cannot write the cache file \(Permission denied\)"):
        load_bars(cfg, cache_dir=tmp_path / "cache")
    # a directory that takes no file is said before the encode (hours on a large dataset),
    # not after it; an existing cache in it is still read
    built = []
    monkeypatch.setattr(cache_mod.tempfile, "TemporaryFile",
                        lambda dir: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(CacheError, match=r"cannot write the cache file \(Read-only file system"):
        cache_mod.cached(tmp_path / "ro" / "x.pt", lambda: built.append(1))
    assert built == []
    monkeypatch.undo()
    first = load_bars(cfg, cache_dir=tmp_path / "shared")
    monkeypatch.setattr(cache_mod.tempfile, "TemporaryFile",
                        lambda dir: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    assert load_bars(cfg, cache_dir=tmp_path / "shared").summary() == first.summary()


def _old(path: Path, seconds: float = 7200.0) -> Path:
    path.write_bytes(b"half a file")
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_temporaries_of_killed_writes_are_swept_on_the_next_start(tmp_path, monkeypatch):
    cfg = make_bars(tmp_path, "criteo_x1")
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = _old(cache / f".criteo_x1-0123456789abcdef.pt.k3j2h1{atomic.TEMP_SUFFIX}")
    fresh = cache / f".criteo_x1-0123456789abcdef.pt.zz9{atomic.TEMP_SUFFIX}"
    fresh.write_bytes(b"a write in progress elsewhere")  # young: may be another process's
    load_bars(cfg, cache_dir=cache)
    assert not stale.exists() and fresh.exists()

    # a write killed half-way leaves its temporary; the next start removes it once stale
    def killed(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(cache / "x.pt", killed)
    assert not list(cache.glob(f"*{atomic.TEMP_SUFFIX}"))[1:]  # atomic_write cleans up itself

    folder = tmp_path / "ml" / "movielens-100k"
    folder.mkdir(parents=True)
    stale = _old(folder / f".ml-100k.inter.abc{atomic.TEMP_SUFFIX}")
    _fake_movielens(tmp_path / "ml")
    load_movielens(tmp_path / "ml", verbose=False, sources=())
    assert not stale.exists()


def _fake_movielens(root: Path, n: int = 60) -> Path:
    """A small MovieLens in the atomic format (fetch_raw then finds it: no download)."""
    rng = np.random.default_rng(0)
    u_data = "".join(f"{rng.integers(1, 8)}\t{rng.integers(1, 12)}\t{rng.integers(1, 6)}\t"
                     f"{880000000 + k}\n" for k in range(n)).encode()
    u_user = "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|other|{10000 + u}\n"
                     for u in range(1, 8)).encode()
    u_item = "".join("|".join([str(i), f"Movie {i} (1995)", "01-Jan-1995", "", "http://x"]
                              + ["1" if g == i % 19 else "0" for g in range(19)]) + "\n"
                     for i in range(1, 12)).encode()
    folder = root / "movielens-100k"
    folder.mkdir(parents=True, exist_ok=True)
    for part, data in ml.grouplens_to_atomic(u_data, u_user, u_item).items():
        (folder / f"ml-100k.{part}").write_bytes(data)
    return folder


def test_a_damaged_movielens_cache_is_rebuilt_and_keys_separate_options(tmp_path, capfd):
    folder = _fake_movielens(tmp_path)
    a = load_movielens(tmp_path, max_seq_len=5, verbose=False, sources=())
    (path,) = folder.glob("*.pt")
    assert path.name.startswith("encoded-T5-min1-mean-")
    path.write_bytes(path.read_bytes()[:100])
    again = load_movielens(tmp_path, max_seq_len=5, verbose=False, sources=())
    assert again.summary() == a.summary() and "rebuilding" in capfd.readouterr().err
    b = load_movielens(tmp_path, max_seq_len=6, genre_pooling="sum", verbose=False, sources=())
    assert b.schema.by_name("hist_item").max_len == 6
    assert len(list(folder.glob("*.pt"))) == 2
    # an edited raw file is a new key: the old encoding is not read for it
    inter = folder / "ml-100k.inter"
    inter.write_text(inter.read_text() + "1\t1\t5\t990000000\n")
    c = load_movielens(tmp_path, max_seq_len=5, verbose=False, sources=())
    assert sum(len(s) for s in c.splits.values()) == sum(len(s) for s in a.splits.values()) + 1


def test_bars_cache_keys_separate_options_versions_and_files(tmp_path, monkeypatch):
    cfg = make_bars(tmp_path, "amazonelectronics_x1")
    cache = tmp_path / "cache"

    def names() -> set[str]:
        return {p.name for p in cache.glob("*.pt")}

    load_bars(cfg, cache_dir=cache)
    load_bars(cfg, cache_dir=cache, chunk_size=7)  # chunking does not change the encoding
    assert len(names()) == 1
    seen = names()
    for options in ({"min_count": 3}, {"seq_order": "newest_first"}, {"max_rows": 50}):
        load_bars(cfg, cache_dir=cache, **options)
        assert len(names()) == len(seen) + 1, options
        seen = names()
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", FORMAT_VERSION + 1)
    load_bars(cfg, cache_dir=cache)
    assert len(names()) == len(seen) + 1
    monkeypatch.undo()
    seen = names()
    train = cfg.parent / "train.csv"
    train.write_text(train.read_text() + "1,3,4,5,6^7,8\n")
    assert len(load_bars(cfg, cache_dir=cache).splits["train"]) == 301
    assert len(names()) == len(seen) + 1
    # a dataset id is reduced to a safe file name inside the cache directory
    path = cache_mod.cache_file(cache, "../../etc/.x y", ("k",))
    assert path.parent == cache and path.name.startswith("_.._etc_.x_y-")
    assert cache_mod.cache_file(cache, "...", 1).name.startswith("dataset-")


# ============================================================================ csv errors

def _csv(tmp_path: Path, text: str | bytes, name: str = "a.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _read(path: Path, required=("x", "y"), **kw) -> list:
    return list(read_chunks(path, list(required), **kw))


@pytest.mark.parametrize("text, pattern", [
    ("x,y\n", r"a\.csv, line 1: no data rows \(the file has a header line only\)"),
    ("x,y\n\n\n", r"a\.csv, line 1: no data rows"),
    ("", r"a\.csv, line 1: empty file, expected a header line"),
    ("\n\n", r"a\.csv, line 1: empty file"),
    ("x,y,x\n1,2,3\n", r"a\.csv, line 1, column 'x': the header names this column twice "
                       r"\(fields 1 and 3\)"),
    ('x,y\n1,2\n3,"4\n5,6\n', r"a\.csv, line 3: a quote opened on this line is never closed"),
    ('x,y\n1,2\n3,4\n"5,6\n7,8\n', r"a\.csv, line 4, column 'y': expected 2 columns, got 1; "
                                   r"this row runs from line 4 to line 5: a quote opened on "
                                   r"line 4"),
    ('x,y\n1,"a\nb",7\n3,4\n', r"line 2, column '<extra #3>': expected 2 columns, got 3; this "
                               r"row runs from line 2 to line 3: a quote opened on line 2"),
    (b"x,y\n1,2\n3,\xff\xfe4\n", r"a\.csv, line 3, column 'y': not valid UTF-8 text \(byte "
                                 r"0xff at character 3 of the line\)"),
    (b"x,y\n" + b"1,2\n" * 5000 + b"\xe9,3\n", r"line 5002, column 'x': not valid UTF-8"),
    (b"\xe9x,y\n1,2\n", r"a\.csv, line 1: not valid UTF-8 text"),
    (b"x,y\n1,2\n\x00\x01\x02", r"a\.csv, line 3: a NUL byte: this looks like a binary file"),
    ("\ufeffx,y\n".encode("utf-16"), r"a\.csv, line 1: UTF-16 text; save the file as UTF-8"),
    ("X ,y\n1,2\n", r"line 1, column 'x': column is missing; the header has \['X ', 'y'\]; "
                    r"did you mean 'X '\?"),
    ("x;y\n1;2\n", r"column 'x': column is missing; the header has \['x;y'\]; the header has "
                   r"one column: is the file ','-separated text\?"),
])
def test_csv_format_errors_name_file_line_and_column(tmp_path, text, pattern):
    with pytest.raises(DataFormatError, match=pattern) as e:
        _read(_csv(tmp_path, text))
    _one_line(e)


def test_csv_accepts_a_bom_legit_multiline_fields_and_an_empty_file_when_allowed(tmp_path):
    (lines, cols), = _read(_csv(tmp_path, "\ufeffx,y\n1,2\n3,4\n"))
    assert cols == {"x": ("1", "3"), "y": ("2", "4")} and lines == [2, 3]
    (lines, cols), = _read(_csv(tmp_path, 'x,y\n1,"a\nb"\n3,"c ""q"""\n'))
    assert cols["y"] == ("a\nb", 'c "q"') and lines == [2, 4]  # the line a row starts on
    (_, cols), = _read(_csv(tmp_path, 'x,y\n1,"a\nb"'))  # closed at the end of the file
    assert cols["y"] == ("a\nb",)
    assert _read(_csv(tmp_path, "x,y\n"), allow_empty=True) == []
    (_, cols), = _read(_csv(tmp_path, ",,x,y\n,,1,2\n"))  # unnamed columns may repeat
    assert cols == {"x": ("1",), "y": ("2",)}


def test_huge_values_are_quoted_short_in_every_message(tmp_path):
    big = "7" * 5_000_000 + "x" * 5_000_000  # a 10 MB cell
    cases = [
        (f"x,y\n1,{big}\n", ("x", "y"), lambda p: csvio.parse_float(
            next(read_chunks(p, ["y"]))[1]["y"], p, [2], "y")),
        (f"x,{big}\n1,2\n", ("x", "y"), None),   # a missing column lists the header
        ("x,y\n1,2\n", (big, "y"), None),        # the (missing) column's name itself
    ]
    for k, (text, required, action) in enumerate(cases):
        p = _csv(tmp_path, text, f"{k}.csv")
        with pytest.raises(DataFormatError) as e:
            action(p) if action else _read(p, required)
        message = _one_line(e)
        assert len(message) < 600 and "10,000,000 characters" in message, message[:700]
    assert shorten("a" * 100) == f"{'a' * 80!r}… (100 characters)"
    assert shorten("short") == "'short'"
    nested = [[list(range(1000))] * 1000] * 1000  # as a YAML alias bomb builds it: no blow-up
    assert len(shorten(nested)) < 120


def test_a_label_just_above_one_is_reported_exactly(tmp_path):
    cfg = make_bars(tmp_path, "criteo_x1")
    train = cfg.parent / "train.csv"
    lines = train.read_text().splitlines()
    lines[5] = "1.0000001" + lines[5][1:]
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"train\.csv, line 6, column 'label': label must "
                                              r"be 0 or 1, got '1\.0000001'"):
        load_bars(cfg)
    schema = make_synthetic(300).schema
    split = make_synthetic(300).splits["test"]
    state = split.state_dict()
    for value, shown in ((1.00000001, "1.00000001"), (np.float32(1.0000001), "1.0000001192"),
                         (-0.0001, "-0.0001"), (float("nan"), "nan")):
        label = np.zeros(len(split), np.float64 if isinstance(value, float) else np.float32)
        label[7] = value
        with pytest.raises(ValueError, match=rf"label\[7\] = {shown}"):
            Split.from_state_dict(schema, {**state, "label": label})


def test_data_paths_that_are_not_csv_files(tmp_path, monkeypatch):
    cases = {
        "a directory": (tmp_path, r"is a directory, expected a data file"),
        "a device": (Path("/dev/zero"), r"is not a regular file"),
        "a system file": (Path("/etc/passwd"), r"column is missing; the header has \["),
        "a binary": (Path(sys.executable).resolve(), r"NUL byte: this looks like a binary"),
        "missing": (tmp_path / "nope.csv", r"nope\.csv: no such file"),
        "in a file": (tmp_path / "f.csv" / "x.csv", r"no such file"),
    }
    (tmp_path / "f.csv").write_text("x,y\n1,2\n")
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # reading a pipe would hang
    cases["a pipe"] = (fifo, r"is not a regular file")
    for what, (path, pattern) in cases.items():
        with pytest.raises(USER_ERRORS, match=pattern) as e:
            _read(path, ["label"])
        message = _one_line(e)
        assert len(message) < 300, (what, message)
    with open("/etc/passwd") as f:
        second_line = f.read().splitlines()[1]
    with pytest.raises(DataFormatError) as e:
        _read(Path("/etc/passwd"), ["label"])
    assert second_line not in str(e.value)  # never more than a snippet of a system file

    real_open = open

    def denied(path, *a, **kw):
        if str(path).endswith("secret.csv"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    secret = _csv(tmp_path, "x,y\n1,2\n", "secret.csv")
    monkeypatch.setattr(csvio, "open", denied, raising=False)  # as root nothing is denied
    with pytest.raises(DataFormatError, match=r"secret\.csv: cannot read it \(Permission "
                                              r"denied\)"):
        _read(secret)
    monkeypatch.setattr(csvio.os, "access", lambda p, mode: False)
    with pytest.raises(DataFormatError, match=r"secret\.csv: cannot read it \(permission"):
        _read(secret)


def test_bars_split_files_are_checked_before_reading_naming_the_yaml_key(tmp_path):
    cfg = make_bars(tmp_path, "criteo_x1")
    (cfg.parent / "valid.csv").write_text((cfg.parent / "valid.csv").read_text().split("\n")[0])
    with pytest.raises(DataFormatError, match=r"valid\.csv, line 1: no data rows"):
        load_bars(cfg)
    (cfg.parent / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=rf"dataset config {cfg}, dataset 'criteo_x1': "
                                                rf"test_data: no such file .*test\.csv"):
        load_bars(cfg)
    (cfg.parent / "test.csv").mkdir()
    with pytest.raises(DataFormatError, match=r"test\.csv: is a directory, expected a data "
                                              r"file \(test_data of dataset config"):
        load_bars(cfg)


def test_a_bom_in_a_bars_file_is_stripped(tmp_path):
    cfg = make_bars(tmp_path, "avazu_x1")
    plain = load_bars(cfg)
    for split in ("train", "valid", "test"):
        p = cfg.parent / f"{split}.csv"
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert load_bars(cfg).summary() == plain.summary()


# ======================================================================= dataset options

def test_switching_to_synthetic_on_the_default_config_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "--set", "data.name=synthetic", "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    # the default config's MovieLens options (min_count, split) do not fit the synthetic data
    assert "cetnet train: error: dataset 'synthetic': unknown options 'min_count', 'split'; it " \
           "takes num_rows, seed" in err
    assert "--set 'data={name: synthetic}'" in err


@pytest.mark.parametrize("name, options, pattern", [
    ("synthetic", {"bogus": 1, "min_count": 2}, r"unknown options 'bogus', 'min_count'"),
    ("synthetic", {"num_rows": "abc"}, r"dataset 'synthetic': num_rows: expected an integer "
                                       r">= 3, got 'abc'"),
    ("synthetic", {"num_rows": 1e5}, r"num_rows: expected an integer >= 3, got 100000\.0"),
    ("synthetic", {"max_seq_len": True}, r"max_seq_len: expected an integer in \[1, 100,000\], "
                                         r"got True"),
    ("synthetic", {"num_items": 5, "num_clusters": 20}, r"num_items: expected an integer >= 20"),
    ("synthetic", {"split_fractions": [0.9, 0.8]}, r"split_fractions: expected two cumulative"),
    ("synthetic", {"num_rows": 3}, r"num_rows 3 with split_fractions \[0\.8, 0\.9\] leaves "
                                   r"the test split empty"),
    ("synthetic", {"signal": float("nan")}, r"signal: expected a number, got nan"),
    ("nope", {}, r"unknown dataset 'nope'; choose one of \['bars', 'movielens-100k', .*\] \(a "
              r"dataset a plugin registers needs its module: cetnet --plugin MODULE"),
    ("bars", {}, r"dataset 'bars' needs config=\.\.\. \(the dataset YAML\)"),
    ("bars", {"config": "x.yaml", "root": "/tmp"}, r"dataset 'bars': unknown option 'root'"),
    ("movielens-100k", {"max_seq_len": "20"}, r"dataset 'movielens-100k': max_seq_len: "
                                              r"expected an integer"),
    ("movielens-100k", {"genre_pooling": "max"}, r"genre_pooling: expected one of 'mean', "
                                                 r"'sum', got 'max'"),
    ("movielens-100k", {"min_count": 0}, r"min_count: expected an integer >= 1, got 0"),
    ("movielens-100k", {"refresh": "yes"}, r"refresh: expected true or false, got 'yes'"),
    ("movielens-100k", {"sources": "grouplens"}, r"sources: expected a list of grouplens, "
                                                 r"recbole"),
    ("movielens-100k", {"seed": 1}, r"unknown option 'seed'"),
])
def test_bad_dataset_options_are_config_errors(tmp_path, name, options, pattern):
    if name == "movielens-100k":
        options = {"root": tmp_path, **options}
    with pytest.raises(ConfigError, match=pattern) as e:
        load_dataset(name, **options)
    _one_line(e)


def test_movielens_paths_and_fetch_failures_are_clear_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot use it as a data/cache directory"):
        load_movielens(blocker, verbose=False, sources=())
    with pytest.raises(FetchError, match=r"could not fetch MovieLens-100k into .*: no source"):
        load_movielens(tmp_path / "empty", verbose=False, sources=())
    assert issubclass(FetchError, FileNotFoundError) and issubclass(FetchError, RuntimeError)


@pytest.mark.parametrize("part, column, value, pattern", [
    ("inter", 3, "nan", r"ml-100k\.inter, line 3, column 'timestamp:float': not a whole number: "
                        r"'nan'"),
    ("inter", 0, "1.5", r"column 'user_id:token': not a whole number: '1\.5'"),
    ("user", 1, "25.5", r"ml-100k\.user, line 3, column 'age:token': not a whole number"),
    ("user", 1, "9" * 400, r"column 'age:token': not a whole number: '9999.*… \(400 char"),
])
def test_movielens_raw_values_are_checked(tmp_path, part, column, value, pattern):
    folder = _fake_movielens(tmp_path)
    p = folder / f"ml-100k.{part}"
    lines = p.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[column] = value
    lines[2] = "\t".join(cells)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=pattern) as e:
        load_movielens(tmp_path, verbose=False, sources=())
    _one_line(e)


# =================================================================== the BARS dataset YAML

def _amazon(tmp_path: Path) -> tuple[Path, dict]:
    cfg = make_bars(tmp_path, "amazonelectronics_x1")
    return cfg, yaml.safe_load(cfg.read_text())


def _features(doc: dict) -> list[dict]:
    return doc["amazonelectronics_x1"]["feature_cols"]


def _set(key: str, value):
    def edit(doc):
        doc["amazonelectronics_x1"][key] = value
    return edit


def _feature_set(k: int, key: str, value):
    def edit(doc):
        if value is _DELETE:
            del _features(doc)[k][key]
        else:
            _features(doc)[k][key] = value
    return edit


_DELETE = object()
WHERE = "dataset 'amazonelectronics_x1'"
SEQ = r"feature_cols\[3\] 'item_history'"

YAML_CASES = [
    # the reported cases
    (_set("label_col", "label"), ConfigError,
     r"label_col: expected a mapping like \{name: label, dtype: float\}, got 'label'"),
    (_set("feature_cols", 5), ConfigError, r"feature_cols: expected a list of features, got 5"),
    (_feature_set(1, "name", _DELETE), ConfigError,
     r"feature_cols\[1\]: 'name' is missing \(every feature names its column\)"),
    (_feature_set(3, "max_len", "five"), ConfigError,
     SEQ + r": max_len: expected an integer in \[1, 100,000\], got 'five'"),
    (_feature_set(3, "max_len", "1e11"), ConfigError, SEQ + r": max_len: .* got '1e11'"),
    (_feature_set(3, "max_len", 1e11), ConfigError, SEQ + r": max_len: .* got 100000000000\.0"),
    (_feature_set(3, "max_len", 10**11), ConfigError, SEQ + r": max_len: .* got 100000000000"),
    (_feature_set(3, "splitter", ""), ConfigError,
     SEQ + r": splitter: expected a non-empty separator string, got ''"),
    (lambda d: _features(d).append({"name": "label", "type": "numeric"}), ConfigError,
     r"feature_cols\[5\] 'label': is the label column 'label' of label_col; a feature must not "
     r"read the label"),
    # siblings: every field, its type, range, emptiness, duplicates and references
    (_feature_set(3, "max_len", True), ConfigError, SEQ + r": max_len: .* got True"),
    (_feature_set(3, "max_len", 0), ConfigError, SEQ + r": max_len: .* got 0"),
    (_feature_set(3, "max_len", 2.5), ConfigError, SEQ + r": max_len: .* got 2\.5"),
    (_feature_set(3, "max_len", _DELETE), ConfigError, SEQ + r": max_len is missing"),
    (_feature_set(3, "splitter", 5), ConfigError, SEQ + r": splitter: .* got 5"),
    (_feature_set(1, "name", ""), ConfigError, r"feature_cols\[1\]: name: expected a column "
                                               r"name or a list of column names, got ''"),
    (_feature_set(1, "name", []), ConfigError, r"feature_cols\[1\]: name: .* got an empty list"),
    (_feature_set(1, "name", 5), ConfigError, r"feature_cols\[1\]: name: .* got 5"),
    (_feature_set(1, "name", None), ConfigError, r"feature_cols\[1\]: name: .* got None"),
    (_feature_set(1, "name", ["a", "b", "a"]), ConfigError,
     r"feature_cols\[1\]: name: 'a' is listed twice"),
    (_feature_set(1, "type", _DELETE), ConfigError,
     r"feature_cols\[1\] 'item_id': type: unsupported type None; one of categorical"),
    (_feature_set(1, "type", "Categorical"), ConfigError, r"unsupported type 'Categorical'"),
    (_feature_set(1, "active", "False"), ConfigError,
     r"feature_cols\[1\] 'item_id': active: expected true or false, got 'False'"),
    (_feature_set(1, "active", 1), ConfigError, r"active: expected true or false, got 1"),
    (_feature_set(1, "min_categr_count", 0), ConfigError,
     r"feature_cols\[1\] 'item_id': min_categr_count: expected an integer >= 1, got 0"),
    (_feature_set(1, "min_categr_count", True), ConfigError, r"min_categr_count: .* got True"),
    (_feature_set(1, "preprocess", "lowercase"), ConfigError,
     r"preprocess: unsupported 'lowercase' \(only copy_from\(column\)\)"),
    (_feature_set(1, "preprocess", 5), ConfigError, r"preprocess: expected a non-empty"),
    (_feature_set(1, "preprocess", "copy_from(label)"), ConfigError,
     r"feature_cols\[1\] 'item_id': copies \(label\) the label column 'label'"),
    (_feature_set(3, "order", "sideways"), ConfigError,
     SEQ + r": order: expected one of 'oldest_first', 'newest_first', got 'sideways'"),
    (_feature_set(3, "share_embedding", ""), ConfigError,
     SEQ + r": share_embedding: expected a feature name, got ''"),
    (_feature_set(3, "share_embedding", "nope"), ConfigError,
     SEQ + r": share_embedding 'nope' names no active feature"),
    (_feature_set(3, "share_embedding", "user_id"), ConfigError,
     SEQ + r": share_embedding 'user_id' names a meta column"),
    (_feature_set(3, "share_embedding", "item_history"), ConfigError,
     SEQ + r": share_embedding cycle item_history -> item_history"),
    (lambda d: (_features(d)[1].update(share_embedding="item_history")), ConfigError,
     r"feature_cols\[1\] 'item_id': share_embedding cycle item_id -> item_history -> item_id"),
    (lambda d: _features(d).append({"name": "p", "type": "numeric",
                                    "share_embedding": "item_id"}), ConfigError,
     r"feature_cols\[5\] 'p': share_embedding: a numeric feature has no embedding table"),
    (lambda d: _features(d).append({"name": "item_id", "type": "categorical"}), ConfigError,
     r"feature_cols\[5\] 'item_id': duplicate feature name \(also feature_cols\[1\]\)"),
    (lambda d: _features(d).append(5), ConfigError,
     r"feature_cols\[5\]: expected a mapping like \{name: x, type: categorical\}, got 5"),
    (_set("feature_cols", []), ConfigError, r"feature_cols: expected a list of features, got "
                                            r"\[\]"),
    (_set("feature_cols", [{"name": "user_id", "type": "meta"}]), ConfigError,
     r"feature_cols: no active feature \(besides meta columns\)"),
    (_set("label_col", {"dtype": "float"}), ConfigError, r"label_col: 'name' is missing"),
    (_set("label_col", {"name": ""}), ConfigError, r"label_col\.name: expected a column name"),
    (_set("label_col", [{"name": "a"}, {"name": "b"}]), ConfigError,
     r"label_col: one label_col only"),
    (_set("min_categr_count", "1"), ConfigError,
     WHERE + r": min_categr_count: expected an integer >= 1, got '1'"),
    (_set("train_data", ""), ConfigError, WHERE + r": train_data: expected a file path, got ''"),
    (_set("train_data", 5), ConfigError, r"train_data: expected a file path, got 5"),
    (_set("train_data", "a\x00b"), ConfigError, r"train_data: expected a file path"),
    (_set("valid_data", ["x.csv"]), ConfigError, r"valid_data: expected a file path, got "
                                                 r"\['x.csv'\]"),
    (lambda d: [d["amazonelectronics_x1"].pop(k) for k in ("valid_data", "test_data")],
     ConfigError, r"needs valid_data or test_data"),
    (lambda d: d["amazonelectronics_x1"].pop("train_data"), ConfigError,
     r"no dataset settings with train_data found"),
    (lambda d: d["amazonelectronics_x1"].pop("label_col"), ConfigError,
     r"'label_col' is missing"),
    (_set("data_format", "h5"), ConfigError, r"data_format 'h5'; only csv is read"),
    (_set("group_id", ""), ConfigError, r"group_id: expected a column name, got ''"),
    (_set("group_id", ["user_id", "item_id"]), ConfigError,
     r"group_id: expected a column name, got \['user_id', 'item_id'\]"),
    (_set("group_id", "item_history"), ConfigError,
     r"group_id 'item_history' names a sequence column"),
    (lambda d: d.update(tuner_space=["a"]), ConfigError,
     r"tuner_space: expected a mapping, got \['a'\]"),
    (lambda d: d.update(dataset_id=5), ConfigError, r"dataset_id: expected a non-empty string"),
    (lambda d: d.update(dataset_id="other"), ConfigError,
     r"dataset_id 'other' is not one of them; choose dataset_id among "
     r"\['amazonelectronics_x1'\]"),
    (lambda d: d.update(dataset_config=5), ConfigError, r"dataset_config: expected a mapping, "
                                                        r"got 5"),
    (lambda d: d.update(other={"train_data": "x.csv"}), ConfigError,
     r"choose dataset_id among \['amazonelectronics_x1', 'other'\]"),
]


@pytest.mark.parametrize("edit, exc, pattern", YAML_CASES,
                         ids=[f"{k}" for k in range(len(YAML_CASES))])
def test_malformed_dataset_yaml_is_one_error_naming_file_key_and_feature(tmp_path, edit, exc,
                                                                         pattern):
    cfg, doc = _amazon(tmp_path)
    edit(doc)
    cfg.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(exc, match=pattern) as e:
        load_bars(cfg)
    message = _one_line(e)
    assert message.startswith(f"dataset config {cfg}"), message
    assert isinstance(e.value, USER_ERRORS)


@pytest.mark.parametrize("text, pattern", [
    ("", r"expected a YAML mapping .*, got an empty file"),
    ("- a\n- b\n", r"got YAML a list; is it a dataset config\?"),
    ("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1\n", r"got YAML text; is it a dataset "
                                                         r"config\?"),
    ("a: [1, 2\nb: 3\n", r", line 2, column 2: not valid YAML: while parsing a flow sequence "
                         r"expected ',' or '\]', but got ':'"),
    (b"a: 1\nb: \xff\n", r", line 2: not valid UTF-8 text \(byte 0xff\); is it a YAML file\?"),
    ("a: \x01\n", r"line 1, column 4: not valid YAML"),
    ("[" * 5000, r"not valid YAML"),
])
def test_unreadable_dataset_yaml_is_one_config_error(tmp_path, text, pattern):
    p = tmp_path / "d.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=pattern) as e:
        load_bars(p)
    assert _one_line(e).startswith(f"dataset config {p}")
    assert "root:/root" not in str(e.value)  # a system file's contents are not quoted


def test_dataset_yaml_paths_that_are_not_yaml_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset config .*nope\.yaml: no such file"):
        load_bars(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r": is a directory, expected a YAML file"):
        load_bars(tmp_path)
    with pytest.raises(ConfigError, match=r": is not a regular file"):
        load_bars("/dev/zero")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(17 << 20)  # sparse: no 17 MB written
    with pytest.raises(ConfigError, match=r"17,825,792 bytes is too large for a dataset config"):
        load_bars(big)
    with pytest.raises(ConfigError, match=r"dataset config: expected a YAML file path, got 5"):
        load_bars(5)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_bars("~no_such_user_hopefully/d.yaml")


@pytest.mark.parametrize("options, pattern", [
    ({"min_count": 0}, r"bars: min_count: expected an integer >= 1, got 0"),
    ({"seq_order": "newest"}, r"bars: seq_order: expected one of 'oldest_first', "
                              r"'newest_first', got 'newest'"),
    ({"chunk_size": 0}, r"bars: chunk_size: expected an integer >= 1, got 0"),
    ({"max_rows": 0}, r"bars: max_rows: expected an integer >= 1, got 0"),
    ({"max_rows": "10"}, r"bars: max_rows: expected an integer >= 1, got '10'"),
    ({"verbose": "yes"}, r"bars: verbose: expected true or false"),
    ({"cache_dir": 5}, r"bars: cache_dir: expected a directory path, got 5"),
])
def test_bad_bars_options_are_config_errors(tmp_path, options, pattern):
    cfg, _ = _amazon(tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        load_bars(cfg, **options)


def test_the_cli_prints_a_malformed_yaml_in_one_line(tmp_path, capsys):
    cfg, doc = _amazon(tmp_path)
    _features(doc)[3]["max_len"] = "five"
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["data", "prepare", "bars", f"config={cfg}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: dataset config {cfg}, {WHERE}: feature_cols[3] 'item_history': max_len:" \
           in err


def test_valid_bars_configs_still_load(tmp_path):
    """The strict reader accepts every published layout (the five BARS configs)."""
    for name in CONFIGS:
        cfg = make_bars(tmp_path / name, name, {"train": 40, "valid": 10, "test": 10})
        assert len(load_bars(cfg).splits["train"]) == 40
    _, doc = _amazon(tmp_path / "x")
    doc = doc["amazonelectronics_x1"]
    doc["feature_cols"][1]["active"] = False
    doc["feature_cols"][1]["max_len"] = "ignored on an inactive column"
    doc["feature_cols"][3]["share_embedding"] = None  # null: its own vocabulary
    for key in ("valid_data", "test_data", "train_data"):
        doc[key] = str(tmp_path / "x" / "amazonelectronics_x1" / doc[key])
    ds = load_bars(doc)
    assert "item_id" not in [f.name for f in ds.schema.features]
    assert ds.schema.by_name("item_history").source is None
