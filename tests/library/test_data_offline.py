"""MovieLens-100k without surprises: downloads are announced, a local copy is installed with
``cetnet data prepare movielens-100k --from PATH``, no network is one clear error saying where to
put the files, and ``cetnet train`` leaves no run directory when its data or model is missing.

No test here touches the network: the data cache is a temporary ``$CETNET_DATA``, ``urlopen``
only serves ``file://`` URLs and the package-index source always fails.
"""

from __future__ import annotations

import io
import os
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from cetnet.cli import main
from cetnet.config import dump_config
from cetnet.data import CacheError, DataFormatError, default_root
from cetnet.data import movielens as ml
from cetnet.data.movielens import (GROUPLENS_URL, URL_ENV, FetchError, fetch_raw, install_raw,
                                   load_movielens)

GENRES = 19


def grouplens_files(ratings: int = 80) -> dict[str, bytes]:
    """A small copy of GroupLens' ``u.data``, ``u.user`` and ``u.item``."""
    data = [f"{1 + k % 5}\t{1 + k % 9}\t{1 + k % 5}\t{880000000 + k}" for k in range(ratings)]
    users = [f"{u}|{18 + 3 * u}|{'FM'[u % 2]}|writer|0{u}123" for u in range(1, 6)]
    items = []
    for i in range(1, 10):
        flags = ["1" if g == i else "0" for g in range(GENRES)]
        items.append("|".join([str(i), f"Film {i} (1994)", "01-Jan-1994", "", "http://x", *flags]))
    return {name: ("\n".join(lines) + "\n").encode()
            for name, lines in (("u.data", data), ("u.user", users), ("u.item", items))}


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "ml-100k/") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(prefix + name, data)
    return path


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """A temporary data cache; only ``file://`` URLs open; the package index fails."""
    real_urlopen = urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        if not str(url).startswith("file:"):
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
        return real_urlopen(url, *args, **kwargs)

    def no_index(timeout):
        raise RuntimeError(f"pip download {ml.RECBOLE_SPEC} failed: ERROR: no network")

    cache = tmp_path / "cache"
    monkeypatch.setenv("CETNET_DATA", str(cache))
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(ml, "_from_recbole", no_index)
    monkeypatch.setattr(ml, "ROW_COUNTS", None)  # small copies (one test puts them back)
    return cache / "movielens-100k"


def installed(folder: Path) -> list[str]:
    """What the cache folder holds (hidden entries included: a staging folder would show)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cetnet {command}: error: "), err
    return last


# --- where the data comes from ----------------------------------------------------------------


def test_cetnet_data_is_the_cache_root(offline, tmp_path, monkeypatch, capsys):
    assert default_root() == tmp_path / "cache"
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert f"Data cache: {tmp_path / 'cache'}" in out and GROUPLENS_URL in out
    assert "--from ml-100k.zip" in out
    monkeypatch.delenv("CETNET_DATA")
    assert default_root() == Path.home() / ".cache" / "cetnet"


def test_a_download_is_announced_with_its_url_and_folder(offline, tmp_path, monkeypatch, capsys):
    url = write_zip(tmp_path / "mirror.zip", grouplens_files()).as_uri()
    monkeypatch.setenv(URL_ENV, url)
    assert fetch_raw(sources=("grouplens",), verbose=False) == offline  # announced even so
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "downloading MovieLens-100k" in err[0] and url in err[0] and str(offline) in err[0]
    assert (offline / "SOURCE").read_text() == "grouplens"
    assert installed(offline) == ["SOURCE", "ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    # there now: no second download, nothing said
    assert fetch_raw(sources=("grouplens",), verbose=False) == offline
    assert capsys.readouterr().err == ""


def test_a_damaged_download_is_not_installed(offline, tmp_path, monkeypatch, capsys):
    (tmp_path / "portal.zip").write_text("<html>log in to the wifi</html>")
    monkeypatch.setenv(URL_ENV, (tmp_path / "portal.zip").as_uri())
    with pytest.raises(FetchError, match="portal.zip: not a zip file"):
        fetch_raw(sources=("grouplens",))
    assert installed(offline) == []


# --- no network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failure, reason", [
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
     "Name or service not known"),
    (urllib.error.URLError(TimeoutError("timed out")), "timed out"),
    (TimeoutError("The read operation timed out"), "TimeoutError: The read operation timed out"),
    (urllib.error.HTTPError(GROUPLENS_URL, 503, "Service Unavailable", {}, io.BytesIO()),
     "HTTP 503 Service Unavailable"),
    (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
], ids=["dns", "connect-timeout", "read-timeout", "http-error", "reset"])
def test_offline_is_one_clear_error_saying_where_to_put_the_files(offline, monkeypatch, capsys,
                                                                  failure, reason):
    def urlopen(url, *args, **kwargs):
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert main(["data", "prepare", "movielens-100k"]) == 2
    line = error_line(capsys, "data prepare")
    assert reason in line and "no network" in line  # both sources' reasons
    assert f"into {offline}/ and run again" in line  # the folder ...
    assert "ml-100k.zip" in line and "u.data, u.user, u.item" in line  # ... the file names
    assert "`cetnet data prepare movielens-100k --from ml-100k.zip`" in line
    assert f"download {GROUPLENS_URL} on another machine" in line
    assert installed(offline) == []


def test_offline_error_names_a_root_option(tmp_path):
    root = tmp_path / "my data"
    with pytest.raises(FetchError) as e:
        fetch_raw(root)
    assert f"`cetnet data prepare movielens-100k root='{root}' --from ml-100k.zip`" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)  # the CLI's one-line errors


# --- a local copy -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zip", "zip-flat", "folder", "parent-folder", "recbole"])
def test_from_installs_a_local_copy(offline, tmp_path, capsys, layout):
    files = grouplens_files()
    source = {
        "zip": lambda: write_zip(tmp_path / "ml-100k.zip", files),
        "zip-flat": lambda: write_zip(tmp_path / "flat.zip", files, prefix=""),
        "folder": lambda: write_folder(tmp_path / "dl" / "ml-100k", files),
        "parent-folder": lambda: write_folder(tmp_path / "dl" / "ml-100k", files).parent,
        "recbole": lambda: write_folder(tmp_path / "rb", {
            f"ml-100k.{p}": data for p, data in ml.grouplens_to_atomic(*files.values()).items()}),
    }[layout]()
    assert main(["data", "prepare", "movielens-100k", "--from", str(source)]) == 0
    out = capsys.readouterr().out
    assert "80 rows" in out and f"local copy {source}" in out
    names = installed(offline)
    assert [n for n in names if not n.startswith("encoded-")] == [
        "SOURCE", "ml-100k.inter", "ml-100k.item", "ml-100k.user"]  # no staging folder left
    ds = load_movielens(verbose=False, sources=())  # offline from now on
    assert sum(len(s) for s in ds.splits.values()) == 80


def test_a_copy_in_the_cache_folder_is_installed_without_asking(offline, capsys):
    write_zip(write_folder(offline, {}) / "ml-100k.zip", grouplens_files())
    ds = load_movielens(max_seq_len=5, verbose=False)
    assert sum(len(s) for s in ds.splits.values()) == 80
    assert "found in the data cache" in capsys.readouterr().err
    assert (offline / "SOURCE").read_text() == f"local copy {offline / 'ml-100k.zip'}"


def _without(name: str) -> dict[str, bytes]:
    return {k: v for k, v in grouplens_files().items() if k != name}


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere", "--from {d}/nowhere: no such file or folder"),
    (lambda d: write_folder(d / "ml-100k", _without("u.user")),
     "{d}/ml-100k: no u.user in this folder"),
    (lambda d: write_folder(d / "ml-100k", _without("u.user")).parent,
     "{d}/ml-100k: no u.user in this folder"),
    (lambda d: write_folder(d / "empty", {}), "{d}/empty: no u.data, u.user, u.item in this"),
    (lambda d: write_zip(d / "ml-100k.zip", _without("u.item")),
     "{d}/ml-100k.zip: no ml-100k/u.item in the zip"),
    (lambda d: write_folder(d, {"x.zip": b"PK\x03\x04 cut short"}) / "x.zip",
     "{d}/x.zip: not a readable zip file"),
    (lambda d: write_folder(d / "bad", {**grouplens_files(),
                                        "u.data": b"1\t2\t5\t880000000\n1\tten\t4\t880000001\n"}),
     "{d}/bad/u.data, line 2, column 'item_id:token': not a whole number: 'ten'"),
    (lambda d: write_zip(d / "short.zip", {**grouplens_files(), "u.item": b"1|Film|x\n"}),
     "{d}/short.zip: ml-100k/u.item, line 1: expected 24 fields, got 3"),
    (lambda d: write_folder(d / "none", {**grouplens_files(), "u.data": b""}),
     "{d}/none/u.data: it has no rows"),
], ids=["missing", "no-u.user", "parent-no-u.user", "empty-folder", "zip-no-u.item", "bad-zip",
        "bad-line", "bad-item", "no-ratings"])
def test_a_bad_copy_is_one_error_naming_path_and_file(offline, tmp_path, capsys, make, message):
    source = make(tmp_path / "src")
    assert main(["data", "prepare", "movielens-100k", "--from", str(source)]) == 2
    line = error_line(capsys, "data prepare")
    assert message.format(d=tmp_path / "src") in line, line
    assert installed(offline) == []  # nothing half-written


def test_a_new_copy_replaces_the_old_and_its_encoded_caches(offline, tmp_path):
    install_raw(write_zip(tmp_path / "a.zip", grouplens_files(80)), verbose=False)
    load_movielens(max_seq_len=5, verbose=False, sources=())
    assert len(list(offline.glob("encoded-*.pt"))) == 1
    stamp = (offline / "ml-100k.inter").stat().st_mtime_ns
    install_raw(write_zip(tmp_path / "same.zip", grouplens_files(80)), verbose=False)
    assert (offline / "ml-100k.inter").stat().st_mtime_ns == stamp  # identical: kept
    assert len(list(offline.glob("encoded-*.pt"))) == 1
    install_raw(write_zip(tmp_path / "b.zip", grouplens_files(60)), verbose=False)
    assert not list(offline.glob("encoded-*.pt"))
    ds = load_movielens(max_seq_len=5, verbose=False, sources=())
    assert sum(len(s) for s in ds.splits.values()) == 60
    assert (offline / "SOURCE").read_text() == f"local copy {tmp_path / 'b.zip'}"


def test_an_interrupted_install_leaves_no_mixture(offline, tmp_path, monkeypatch):
    install_raw(write_zip(tmp_path / "a.zip", grouplens_files(80)), verbose=False)
    real_replace, moved = os.replace, []

    def replace(src, dst):  # the third file moved into the cache folder fails
        if Path(dst).parent == offline:
            if len(moved) == 2:
                raise OSError(28, "No space left on device")
            moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(ml.os, "replace", replace)
    with pytest.raises(CacheError, match="cannot install the MovieLens-100k files"):
        install_raw(write_zip(tmp_path / "b.zip", grouplens_files(60)), verbose=False)
    monkeypatch.setattr(ml.os, "replace", real_replace)
    # ml-100k.inter goes last: without it the copy is incomplete, never half old, half new
    assert not (offline / "ml-100k.inter").exists()
    assert not [n for n in installed(offline) if n.startswith(".")]
    with pytest.raises(FetchError):
        fetch_raw(verbose=False)
    install_raw(tmp_path / "b.zip", verbose=False)
    assert sum(len(s) for s in load_movielens(verbose=False, sources=()).splits.values()) == 60


def test_from_is_for_datasets_with_raw_files(capsys, tmp_path):
    assert main(["data", "prepare", "synthetic", "--from", str(tmp_path)]) == 2
    assert "has no raw files to install" in error_line(capsys, "data prepare")
    with pytest.raises(DataFormatError):  # a DataFormatError names the path
        install_raw(write_folder(tmp_path / "e", {}))


def test_prepare_help_names_the_download_url(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert GROUPLENS_URL in out and "--from PATH" in out and "$CETNET_DATA" in out


# --- cetnet train writes nothing before its data and model are ready ---------------------------


def _movielens_config(train_config, tmp_path: Path, **model: object) -> Path:
    cfg = train_config(epochs=1, max_steps_per_epoch=2)
    cfg["data"] = {"name": "movielens-100k", "max_seq_len": 5}
    cfg["model"].update(model)
    dump_config(cfg, tmp_path / "ml.yaml")
    return tmp_path / "ml.yaml"


def test_train_without_data_leaves_no_run_directory(train_config, offline, tmp_path,
                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _movielens_config(train_config, tmp_path)
    assert main(["train", "--config", str(config), "--no-plots"]) == 2
    assert "--from ml-100k.zip" in error_line(capsys, "train")
    assert main(["train", "--config", str(config), "--out", "run", "--no-plots"]) == 2
    assert "--from ml-100k.zip" in error_line(capsys, "train")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()

    # a model that cannot be built: no run directory either
    write_zip(write_folder(offline, {}) / "ml-100k.zip", grouplens_files())
    assert main(["train", "--config", str(config), "--out", "run", "--no-plots",
                 "model.members=[dnn, nope]"]) == 2
    assert "nope" in error_line(capsys, "train")
    assert main(["train", "--config", str(config), "--no-plots", "model.dnn.widht=3"]) == 2
    assert "widht" in error_line(capsys, "train")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()

    # with both ready, the run is written (and the copy installed from the cache folder)
    assert main(["train", "--config", str(config), "--out", "run", "--no-plots", "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_copy_cut_short_is_refused_not_installed(tmp_path, monkeypatch):
    # a ratings file cut mid-line (a failed copy) still parses: it was installed, with fewer
    # rows and one timestamp cut to another time
    files = grouplens_files(ratings=80)
    data = files["u.data"]
    cut = data[:data.index(b"\t88", len(data) // 2) + 4]  # inside a timestamp: 4 columns
    source = write_folder(tmp_path / "copy", {**files, "u.data": cut})
    monkeypatch.setattr(ml, "ROW_COUNTS", {"inter": 80, "user": len(files["u.user"].splitlines()),
                                           "item": len(files["u.item"].splitlines())})
    with pytest.raises(DataFormatError, match=r"u.data.*: \d+ rows, MovieLens-100k has 80: a "
                                              r"copy cut short"):
        install_raw(source)
    install_raw(write_folder(tmp_path / "whole", files))  # the whole copy: installed
