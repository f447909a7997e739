"""MovieLens-100k, the default real dataset, framed as CTR prediction.

Fetched once into ``<root>/movielens-100k/`` (``<root>``: ``$CETNET_DATA``, else
``~/.cache/cetnet``) as RecBole-style "atomic" files (tab-separated, header cells
``name:type``): from a local copy put there (``ml-100k.zip`` or its ``ml-100k/`` folder), else
from the GroupLens zip (:data:`GROUPLENS_URL`, or ``$CETNET_MOVIELENS_URL``), else read out of
the ``recbole==1.2.1`` wheel (fetched with ``pip download --no-deps``, never installed). Each
download is announced on stderr; without network :class:`FetchError` says where to put a copy.
:func:`install_raw` (``cetnet data prepare movielens-100k --from PATH``) installs a local copy.
The encoded dataset is cached next to the raw files, so later loads are fast and offline.

Framing: label = rating >= 4; rows cut 80/10/10 into train/valid/test by ``split``:
``global_time`` (default: rows sorted by timestamp, cut at two moments; most valid/test rows
are then of users unseen in training), ``user_time`` (each user's own interactions sorted by
time, the user's last 10 % are test, the 10 % before valid) or ``random`` (rows drawn at
random, seeded by ``split_seed``). Within each split rows are in time order.
``hist_item`` = the user's items rated strictly before the row's timestamp, most recent first
(whatever split those items are in: the history is causal in time).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cetnet.atomic import TEMP_SUFFIX
from cetnet.data.cache import (cache_file, cached, default_root, file_stamp, open_cache_dir,
                               user_path, write_atomic)
from cetnet.data.csvio import DataFormatError, clip, read_chunks, shorten
from cetnet.data.dataset import SPLITS, CacheError, CTRDataset, Split, SplitStats
from cetnet.data.normalize import DenseStats
from cetnet.data.options import (MAX_SEQ_LEN, ConfigError, check_bool, check_choice,
                                 check_float, check_int)
from cetnet.data.schema import OOV_ID, PAD_ID, FeatureSpec, Schema
from cetnet.data.vocab import MISSING, encode_with_train_vocab, factorize

__all__ = ["GROUPLENS_URL", "URL_ENV", "RECBOLE_SPEC", "SPLIT_KINDS", "FetchError", "fetch_raw",
           "install_raw", "grouplens_url", "read_raw", "MovieLensRaw", "build_movielens",
           "load_movielens"]

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
#: Set to download the GroupLens zip from elsewhere (a mirror, a ``file://`` URL).
URL_ENV = "CETNET_MOVIELENS_URL"
_ZIP_NAME, _DIR_NAME = "ml-100k.zip", "ml-100k"
_GROUPLENS_FILES = ("u.data", "u.user", "u.item")  # in the order of _PARTS
_STAGING_PREFIX = ".install-"
RECBOLE_SPEC = "recbole==1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
_PARTS = ("inter", "user", "item")
_HEADERS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "user": ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
    "item": ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
}
# u.genre of the GroupLens archive, in the order of u.item's 19 flag columns.
_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
           "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
           "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_AGE_BUCKETS = [(18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                (56, "50-55")]
_CACHE_VERSION = 2
_SOURCES = ("grouplens", "recbole")
#: How the rows are cut into train / valid / test (see the module docstring).
SPLIT_KINDS = ("global_time", "user_time", "random")


class FetchError(RuntimeError, FileNotFoundError):
    """The raw files are not there and no source could provide them (the message says why for
    each source). A FileNotFoundError too, so the CLI reports it in one line."""


# --------------------------------------------------------------------------------------------
# fetching and installing the raw files


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(f"[cetnet.data] {msg}", file=sys.stderr)


def grouplens_url() -> str:
    """Where the GroupLens source downloads from: ``$CETNET_MOVIELENS_URL`` (a mirror, or a
    ``file://`` URL) if set, else :data:`GROUPLENS_URL`."""
    return os.environ.get(URL_ENV) or GROUPLENS_URL


def check_root(root: object, where: str = "dataset 'movielens-100k'") -> str | Path | None:
    """``root`` if it can name a directory (None: the default cache root), else ConfigError."""
    if root is not None and (not isinstance(root, (str, Path)) or not str(root)):
        raise ConfigError(f"{where}: root: expected a directory path, got {shorten(root)}")
    return root


def _complete(folder: Path) -> bool:
    return all((folder / f"ml-100k.{p}").is_file() for p in _PARTS)


def fetch_raw(root: str | Path | None = None, *, sources: Sequence[str] = ("grouplens", "recbole"),
              timeout: float = 5.0, verbose: bool = True) -> Path:
    """Makes sure ``<root>/movielens-100k/ml-100k.{inter,user,item}`` exist; returns the folder.

    When they are missing, a local copy put into that folder (``ml-100k.zip`` or its unzipped
    ``ml-100k/``) is installed; else the sources are tried in order, each download announced
    on stderr (what, from where, into which folder) whatever ``verbose`` says.

    Args:
        root: the cache directory (default ``$CETNET_DATA`` or ``~/.cache/cetnet``).
        sources: what to try, in order: ``"grouplens"`` (the official zip from
            :func:`grouplens_url`, ``timeout`` seconds) and ``"recbole"`` (the files inside the
            recbole wheel from the package index pip uses).
        timeout: seconds for a network request.
        verbose: say on stderr where the files came from.

    Raises:
        FetchError: every source failed; the message gives each reason, where to put a copy
            and the ``cetnet data prepare movielens-100k --from`` command.
        CacheError: the folder cannot be created or written.
    """
    where = "dataset 'movielens-100k'"
    if isinstance(sources, str) or not all(isinstance(x, str) and x in _SOURCES
                                           for x in sources):
        raise ConfigError(f"{where}: sources: expected a list of {', '.join(_SOURCES)}, got "
                          f"{shorten(sources)}")
    timeout = check_float(timeout, "timeout", where, minimum=0)
    verbose = check_bool(verbose, "verbose", where)
    folder = _open_folder(check_root(root, where))
    if _complete(folder):
        return folder
    for local in (folder / _ZIP_NAME, folder / _DIR_NAME):
        if local.exists():
            _log(f"installing MovieLens-100k from {local} (found in the data cache)")
            _install_copy(local, folder)
            return folder
    errors = []
    for source in sources:
        _log(_ANNOUNCE[source].format(url=grouplens_url(), folder=folder, spec=RECBOLE_SPEC))
        try:
            files = {"grouplens": _from_grouplens, "recbole": _from_recbole}[source](timeout)
            with _staged(folder, files, source) as staged:
                _check_staged(staged, {p: f"ml-100k.{p} of the {source} download"
                                       for p in _PARTS})
                _commit(staged, folder)
        except CacheError:
            raise  # the disk, not the source
        except Exception as e:  # noqa: BLE001 - any failure means: try the next source
            name = _SOURCE_NAMES[source].format(url=grouplens_url())
            errors.append(f"{name}: {_reason(e)}")
            _log(f"MovieLens-100k from {name} failed: {_reason(e)}")
            continue
        _log(f"MovieLens-100k fetched from {source} into {folder}", verbose)
        return folder
    raise FetchError(offline_message(folder, root, errors))


#: How an error names a source.
_SOURCE_NAMES = {"grouplens": "grouplens ({url})", "recbole": "package index"}
#: One line on stderr before each download.
_ANNOUNCE = {
    "grouplens": "downloading MovieLens-100k (about 5 MB) from {url} into {folder}",
    "recbole": "downloading MovieLens-100k from the package index into {folder}: the files "
               "inside the {spec} wheel (pip download --no-deps; nothing is installed)",
}


def offline_message(folder: Path, root: str | Path | None, errors: Sequence[str]) -> str:
    """What :class:`FetchError` says: why each source failed, and how to install a copy."""
    command = "cetnet data prepare movielens-100k" + (
        f" root={shlex.quote(str(root))}" if root is not None else "")
    return (f"could not fetch MovieLens-100k into {folder}: "
            f"{'; '.join(errors) or 'no source given'}. Without network: download "
            f"{GROUPLENS_URL} on another machine, then run `{command} --from ml-100k.zip`, or "
            f"put ml-100k.zip (or the ml-100k/ folder inside it, holding "
            f"{', '.join(_GROUPLENS_FILES)}) into {folder}/ and run again")


def _reason(e: BaseException) -> str:
    """A failure in a few words: the URL error's reason, pip's last error line, ..."""
    if isinstance(e, urllib.error.HTTPError):
        text = f"HTTP {e.code} {e.reason}"
    elif isinstance(e, urllib.error.URLError):
        text = f"{type(e).__name__}: {e.reason}"
    elif type(e) is RuntimeError:  # pip's failure, said by _from_recbole
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return clip(text, 300)


def _from_grouplens(timeout: float) -> dict[str, bytes]:
    url = grouplens_url()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return _read_zip(z, url)
    except zipfile.BadZipFile:
        raise DataFormatError(url, None, None, "not a zip file") from None


def _from_recbole(timeout: float) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1",
               "--timeout", f"{max(timeout, 10.0):g}", RECBOLE_SPEC, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if res.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")),
                        lines[-1] if lines else f"exit status {res.returncode}")
            raise RuntimeError(f"pip download {RECBOLE_SPEC} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            return {p: z.read(f"{_WHEEL_DIR}ml-100k.{p}") for p in _PARTS}


def install_raw(source: str | Path, root: str | Path | None = None, *,
                verbose: bool = True) -> Path:
    """Installs a local copy of MovieLens-100k into ``<root>/movielens-100k/``; returns the
    folder (``cetnet data prepare movielens-100k --from SOURCE``).

    ``source`` is GroupLens' ``ml-100k.zip``, the ``ml-100k/`` folder inside it (``u.data``,
    ``u.user``, ``u.item``), a folder holding that ``ml-100k/``, or a folder of RecBole's
    ``ml-100k.inter`` / ``.user`` / ``.item``. The tables are converted and checked in a
    temporary folder, then moved in (``ml-100k.inter`` last: the copy counts as there only
    once it is whole); a copy identical to the installed one changes nothing, another one
    replaces it and the encoded caches of the old one.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataFormatError: it is no MovieLens-100k copy (naming the path and the missing file, or
            the file and line that is malformed); nothing is installed then.
        CacheError: the cache folder cannot be created or written.
    """
    where = "dataset 'movielens-100k'"
    if not isinstance(source, (str, Path)) or not str(source):
        raise ConfigError(f"{where}: --from: expected a file or folder path, got "
                          f"{shorten(source)}")
    folder = _open_folder(check_root(root, where))
    changed = _install_copy(user_path(source), folder)
    _log(f"MovieLens-100k from {source} {'installed in' if changed else 'is already in'} "
         f"{folder}", verbose)
    return folder


def _open_folder(root: str | Path | None) -> Path:
    """The dataset's cache folder, created; temporaries of killed writes swept."""
    folder = open_cache_dir(default_root(root) / "movielens-100k")
    cutoff = time.time() - 3600  # younger ones may belong to an install in progress
    for p in folder.glob(f"{_STAGING_PREFIX}*{TEMP_SUFFIX}"):
        try:
            if p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
    return folder


def _install_copy(source: Path, folder: Path) -> bool:
    """Reads, checks and installs the local copy ``source``; False if it was there already."""
    files, names = _read_local(source)
    with _staged(folder, files, f"local copy {source.resolve()}") as staged:
        _check_staged(staged, names)
        return _commit(staged, folder)


_LAYOUT = (f"a MovieLens-100k copy is GroupLens' {_ZIP_NAME}, or a folder holding "
           f"{', '.join(_GROUPLENS_FILES)} (the {_DIR_NAME}/ folder inside that zip)")


def _read_local(source: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """``(tables, names)``: the atomic tables of a local copy, and what each came from."""
    if not source.exists():
        raise FileNotFoundError(f"--from {source}: no such file or folder")
    if not source.is_dir():
        try:
            with zipfile.ZipFile(source) as z:
                return _read_zip(z, source), {p: f"{source}: {n}" for p, n in
                                              zip(_PARTS, _GROUPLENS_FILES)}
        except (zipfile.BadZipFile, zlib.error, EOFError):
            raise DataFormatError(source, None, None, f"not a readable zip file ({_LAYOUT})"
                                  ) from None
    for d in (source, source / _DIR_NAME):
        if all((d / f).is_file() for f in _GROUPLENS_FILES):
            names = {p: str(d / f) for p, f in zip(_PARTS, _GROUPLENS_FILES)}
            return _convert([(d / f).read_bytes() for f in _GROUPLENS_FILES], names), names
        if all((d / f"ml-100k.{p}").is_file() for p in _PARTS):  # RecBole's atomic files
            return ({p: (d / f"ml-100k.{p}").read_bytes() for p in _PARTS},
                    {p: str(d / f"ml-100k.{p}") for p in _PARTS})
    d = source / _DIR_NAME if (source / _DIR_NAME).is_dir() else source
    missing = [f for f in _GROUPLENS_FILES if not (d / f).is_file()]
    raise DataFormatError(d, None, None, f"no {', '.join(missing)} in this folder ({_LAYOUT})")


def _read_zip(z: zipfile.ZipFile, where: str | Path) -> dict[str, bytes]:
    """The atomic tables of a GroupLens zip (``ml-100k/u.data`` ..., or the files at its top)."""
    names = set(z.namelist())
    prefix = next((p for p in (f"{_DIR_NAME}/", "") if f"{p}u.data" in names), f"{_DIR_NAME}/")
    missing = [prefix + f for f in _GROUPLENS_FILES if prefix + f not in names]
    if missing:
        raise DataFormatError(where, None, None, f"no {', '.join(missing)} in the zip "
                                                 f"({_LAYOUT})")
    return _convert([z.read(prefix + f) for f in _GROUPLENS_FILES],
                    {p: f"{where}: {prefix}{f}" for p, f in zip(_PARTS, _GROUPLENS_FILES)})


def _convert(files: Sequence[bytes], names: dict[str, str]) -> dict[str, bytes]:
    """:func:`grouplens_to_atomic` of ``u.data``, ``u.user``, ``u.item``, a malformed line named
    in the copy's own file."""
    u_data, u_user, u_item = files
    try:
        return grouplens_to_atomic(u_data, u_user, u_item)
    except DataFormatError as e:
        raise DataFormatError(names["item"], e.line, e.column, e.reason) from None


@contextlib.contextmanager
def _staged(folder: Path, files: dict[str, bytes], source: str) -> Iterator[Path]:
    """A temporary folder inside ``folder`` holding the tables and ``SOURCE``; removed on
    exit, whatever happens."""
    try:
        staged = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=TEMP_SUFFIX, dir=folder))
    except OSError as e:
        raise CacheError(folder, f"cannot write in it ({e.strerror or e})") from None
    try:
        for part in _PARTS:
            write_atomic(staged / f"ml-100k.{part}", files[part])
        write_atomic(staged / "SOURCE", source.encode())
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


#: The rows of MovieLens-100k's tables (ratings, users, items), which a copy must have: a file
#: cut short (a failed copy) parses, and would be installed as the dataset. None: any (tests'
#: small copies).
ROW_COUNTS: dict[str, int] | None = {"inter": 100_000, "user": 943, "item": 1_682}


def _check_staged(staged: Path, names: dict[str, str]) -> None:
    """DataFormatError (naming the copy's file) unless the staged tables have rows, parse and
    have MovieLens-100k's row counts (:data:`ROW_COUNTS`). A line number of a converted
    GroupLens file is one less: it has no header."""
    for part in _PARTS:
        with open(staged / f"ml-100k.{part}", "rb") as f:
            if len(list(itertools.islice((ln for ln in f if ln.strip()), 2))) < 2:
                raise DataFormatError(names[part], None, None, "it has no rows")
    try:
        raw = read_raw(staged)
    except DataFormatError as e:
        part = Path(e.path).suffix.lstrip(".")
        name = names.get(part, e.path)
        shift = 1 if name.endswith(_GROUPLENS_FILES) else 0
        line = e.line - shift if e.line is not None and e.line > shift else None
        raise DataFormatError(name, line, e.column, e.reason) from None
    if ROW_COUNTS is None:
        return
    for part, got in (("inter", len(raw.user)), ("user", len(raw.users)),
                      ("item", len(raw.items))):
        if got != ROW_COUNTS[part]:
            raise DataFormatError(names[part], None, None,
                                  f"{got:,} rows, MovieLens-100k has {ROW_COUNTS[part]:,}: a "
                                  "copy cut short, or another dataset")


def _commit(staged: Path, folder: Path) -> bool:
    """Moves the staged tables into ``folder``; False when identical ones are there already.

    ``ml-100k.inter`` is removed first and moved in last, so an interrupted install leaves an
    incomplete copy (installed again next time), never a mixture of two. Encoded caches of a
    replaced copy are removed (they can never be read again: their keys name the old files).
    """
    names = [f"ml-100k.{p}" for p in _PARTS]
    if all((folder / n).is_file() and filecmp.cmp(staged / n, folder / n, shallow=False)
           for n in names):
        return False
    replaced = any((folder / n).exists() for n in names)
    try:
        (folder / names[0]).unlink(missing_ok=True)
        for n in (*names[1:], "SOURCE", names[0]):
            os.replace(staged / n, folder / n)
    except OSError as e:
        raise CacheError(folder, f"cannot install the MovieLens-100k files ("
                                 f"{e.strerror or e})") from None
    if replaced:
        for old in folder.glob("encoded-*.pt"):
            old.unlink(missing_ok=True)
    return True


def grouplens_to_atomic(u_data: bytes, u_user: bytes, u_item: bytes) -> dict[str, bytes]:
    """Converts the GroupLens ``u.data`` / ``u.user`` / ``u.item`` files to the atomic format."""
    def table(part: str, rows: list[list[str]]) -> bytes:
        lines = ["\t".join(_HEADERS[part])] + ["\t".join(r) for r in rows]
        return ("\n".join(lines) + "\n").encode("utf-8")

    inter = [line.split("\t") for line in u_data.decode("latin-1").splitlines() if line.strip()]
    user = [line.split("|") for line in u_user.decode("latin-1").splitlines() if line.strip()]
    items = []
    for k, line in enumerate(u_item.decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) != 5 + len(_GENRES):
            raise DataFormatError("u.item", k, None, f"expected {5 + len(_GENRES)} fields, "
                                  f"got {len(f)}")
        title = f[1].rsplit(" (", 1)[0] if f[1].endswith(")") else f[1]
        year = f[2][-4:] if f[2] else "unknown"
        genres = [g for g, flag in zip(_GENRES, f[5:]) if flag.strip() == "1"] or ["unknown"]
        items.append([f[0], title, year, " ".join(genres)])
    return {"inter": table("inter", inter), "user": table("user", user),
            "item": table("item", items)}


# --------------------------------------------------------------------------------------------
# raw tables


@dataclass
class MovieLensRaw:
    """The three raw tables, interactions as parallel arrays in file order."""

    user: np.ndarray       # [N] int64 raw user ids
    item: np.ndarray       # [N] int64 raw item ids
    rating: np.ndarray     # [N] float64
    timestamp: np.ndarray  # [N] int64
    users: dict[int, tuple[str, str, str, str]]  # user -> (age, gender, occupation, zip code)
    items: dict[int, tuple[str, list[str]]]      # item -> (release year, genres)


def _read_table(path: Path, part: str) -> tuple[list[int], dict[str, tuple[str, ...]]]:
    lines: list[int] = []
    cols: dict[str, tuple[str, ...]] = {c: () for c in _HEADERS[part]}
    for chunk_lines, chunk in read_chunks(path, [c for c in _HEADERS[part]
                                                 if c != "movie_title:token_seq"],
                                          delimiter="\t", chunk_size=1 << 20):
        lines += chunk_lines
        cols = {c: cols[c] + chunk.get(c, ()) for c in cols}
    return lines, cols


def _ints(values: Sequence[str], path: Path, lines: list[int], column: str) -> np.ndarray:
    """The column as int64; a cell that is not a whole number is a DataFormatError (``1e3``
    and ``5.0`` are whole; ``nan``, ``inf`` and ``2.5`` are not)."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except ValueError:
        x = None
    if x is not None and np.isfinite(x).all() and (x == np.round(x)).all() and (
            np.abs(x) < 2.0 ** 62).all():
        return x.astype(np.int64)
    for k, v in enumerate(values):
        try:
            f = float(v)
        except ValueError:
            f = None
        if f is None or not np.isfinite(f) or f != round(f) or abs(f) >= 2.0 ** 62:
            raise DataFormatError(path, lines[k], column,
                                  f"not a whole number: {shorten(v)}") from None
    raise AssertionError("unreachable: some value failed the vectorized check")


def read_raw(folder: str | Path) -> MovieLensRaw:
    """Parses ``ml-100k.{inter,user,item}`` in ``folder``.

    Raises:
        DataFormatError: a missing column, a wrong column count or a non-numeric id, rating,
            timestamp or age (naming file, line and column).
    """
    folder = Path(folder)
    p = folder / "ml-100k.inter"
    lines, c = _read_table(p, "inter")
    user = _ints(c["user_id:token"], p, lines, "user_id:token")
    item = _ints(c["item_id:token"], p, lines, "item_id:token")
    rating = _ints(c["rating:float"], p, lines, "rating:float").astype(np.float64)
    ts = _ints(c["timestamp:float"], p, lines, "timestamp:float")

    p = folder / "ml-100k.user"
    lines, c = _read_table(p, "user")
    ids = _ints(c["user_id:token"], p, lines, "user_id:token")
    ages = _ints(c["age:token"], p, lines, "age:token")  # the dense feature: whole years
    users = {int(u): (str(a), g, o, z) for u, a, g, o, z in zip(ids, ages, c["gender:token"],
                                                                 c["occupation:token"],
                                                                 c["zip_code:token"])}
    p = folder / "ml-100k.item"
    lines, c = _read_table(p, "item")
    ids = _ints(c["item_id:token"], p, lines, "item_id:token")
    items = {int(i): (y, g.split()) for i, y, g in zip(ids, c["release_year:token"],
                                                         c["class:token_seq"])}
    return MovieLensRaw(user, item, rating, ts, users, items)


# --------------------------------------------------------------------------------------------
# CTR framing


def _age_bucket(age: str) -> str:
    a = int(age)
    return next((name for limit, name in _AGE_BUCKETS if a < limit), "56+")


def history(user: np.ndarray, timestamp: np.ndarray, max_len: int) -> np.ndarray:
    """``[N, max_len]`` row indices of each row's history (-1 = padding).

    Row ``r``'s history is the rows of the same user with a timestamp strictly smaller than
    ``timestamp[r]``, most recent first (ties in time are never each other's history: a user
    rating several movies in the same second leaks nothing between them).
    """
    n = len(user)
    order = np.lexsort((np.arange(n), timestamp, user))  # by user, then time, then file order
    u, t = user[order], timestamp[order]
    pos = np.arange(n)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_time = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    time_start = np.maximum.accumulate(np.where(new_time, pos, 0))
    hist_sorted = np.full((n, max_len), -1, dtype=np.int64)
    for j in range(max_len):
        src = time_start - 1 - j  # the j-th most recent earlier row, in sorted order
        ok = src >= user_start
        hist_sorted[ok, j] = order[src[ok]]
    hist = np.empty_like(hist_sorted)
    hist[order] = hist_sorted
    return hist


def _stats(ids: np.ndarray, pad: np.ndarray | None, bounds: list[slice]) -> list[tuple[int, int]]:
    """(OOV count, id cells) per split; padding cells count as neither."""
    out = []
    for b in bounds:
        x = ids[b]
        real = np.ones(x.shape, bool) if pad is None else ~pad[b]
        out.append((int(((x == OOV_ID) & real).sum()), int(real.sum())))
    return out


def split_order(raw: MovieLensRaw, split: str = "global_time",
                split_fractions: tuple[float, float] = (0.8, 0.9),
                split_seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """``(order, (a, b))``: the raw rows in dataset order and where train and valid end in it
    (train = ``order[:a]``, valid = ``order[a:b]``, test = ``order[b:]``; each in time order,
    ties in file order).

    - ``global_time``: all rows by time, cut at the fractions.
    - ``user_time``: each user's rows by time (then file order); the user's first
      ``round(f0 * n_u)`` are train, up to ``round(f1 * n_u)`` valid, the rest test.
    - ``random``: a random permutation (``numpy.random.default_rng(split_seed)``) cut at the
      fractions.
    """
    n = len(raw.user)
    if split == "global_time":
        order = np.argsort(raw.timestamp, kind="stable")
        a, b = (int(round(f * n)) for f in split_fractions)
        return order, (a, b)
    part = np.empty(n, dtype=np.int64)
    if split == "user_time":
        by_user = np.lexsort((np.arange(n), raw.timestamp, raw.user))
        u = raw.user[by_user]
        starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
        sizes = np.diff(np.r_[starts, n])
        rank = np.arange(n) - np.repeat(starts, sizes)  # position within the user's rows
        n_u = np.repeat(sizes, sizes)
        cut_a = np.round(split_fractions[0] * n_u).astype(np.int64)
        cut_b = np.round(split_fractions[1] * n_u).astype(np.int64)
        part[by_user] = np.where(rank < cut_a, 0, np.where(rank < cut_b, 1, 2))
    elif split == "random":
        perm = np.random.default_rng(split_seed).permutation(n)
        a, b = (int(round(f * n)) for f in split_fractions)
        part[perm[:a]], part[perm[a:b]], part[perm[b:]] = 0, 1, 2
    else:
        raise ConfigError(f"dataset 'movielens-100k': split: expected one of "
                          f"{', '.join(SPLIT_KINDS)}, got {shorten(split)}")
    order = np.lexsort((np.arange(n), raw.timestamp, part))
    counts = np.bincount(part, minlength=3)
    return order, (int(counts[0]), int(counts[0] + counts[1]))


def build_movielens(raw: MovieLensRaw, *, max_seq_len: int = 50, min_count: int = 1,
                    genre_pooling: str = "mean", split_fractions: tuple[float, float] = (0.8, 0.9),
                    split: str = "global_time", split_seed: int = 0) -> CTRDataset:
    """Frames the raw tables as a CTR dataset (see the module docstring).

    Args:
        raw: the tables from :func:`read_raw`.
        max_seq_len: length T of ``hist_item`` / ``hist_genre``.
        min_count: train occurrences a value needs to get its own id (else OOV, id 1).
        genre_pooling: ``"mean"`` or ``"sum"`` for the ``genres`` multi-hot feature.
        split_fractions: the cumulative fractions where train and valid end (per user for
            ``split="user_time"``).
        split: ``"global_time"``, ``"user_time"`` or ``"random"`` (see :func:`split_order`).
        split_seed: the seed of the ``random`` split.
    """
    order, (a, b) = split_order(raw, split, split_fractions, split_seed)
    user, item = raw.user[order], raw.item[order]
    ts, rating = raw.timestamp[order], raw.rating[order]
    n = len(order)
    bounds = [slice(0, a), slice(a, b), slice(b, n)]
    train = bounds[0]

    # Work on the user and item tables (943 and 1,682 rows), then gather per interaction.
    uniq_user, user_row = np.unique(user, return_inverse=True)
    uniq_item, item_row = np.unique(item, return_inverse=True)
    profile = [raw.users.get(int(u), (MISSING,) * 4) for u in uniq_user]
    movie = [raw.items.get(int(i), (MISSING, [])) for i in uniq_item]
    age_raw = [p[0] for p in profile]
    table_tokens = {
        "user": ([str(u) for u in uniq_user], user_row),
        "item": ([str(i) for i in uniq_item], item_row),
        "age_bucket": ([_age_bucket(x) if x else MISSING for x in age_raw], user_row),
        "gender": ([p[1] for p in profile], user_row),
        "occupation": ([p[2] for p in profile], user_row),
        "zip_prefix": ([p[3][:3] for p in profile], user_row),
        # a few items have 'unknown' or garbled years: missing, so OOV (and counted)
        "release_year": ([y if y.isdigit() else MISSING for y, _ in movie], item_row),
    }
    ids, vocabs, stats = {}, {}, {}
    for name, (tokens, rows) in table_tokens.items():
        categories, codes = factorize(tokens)
        vocabs[name], ids[name] = encode_with_train_vocab(categories, codes[rows], train,
                                                          min_count)
        stats[name] = _stats(ids[name], None, bounds)

    genre_names, _ = factorize(g for _, gs in movie for g in gs)
    genre_code = {g: k for k, g in enumerate(genre_names)}
    width = max(1, max(len(gs) for _, gs in movie))
    item_bag = np.full((len(movie), width), -1, dtype=np.int64)
    for k, (_, gs) in enumerate(movie):
        item_bag[k, :len(gs)] = [genre_code[g] for g in gs]
    bag = item_bag[item_row]
    vocabs["genres"], ids["genres"] = encode_with_train_vocab(genre_names, bag, train, min_count)
    stats["genres"] = _stats(ids["genres"], bag < 0, bounds)

    hist = history(user, ts, max_seq_len)
    pad = hist < 0
    ids["hist_item"] = np.where(pad, PAD_ID, ids["item"][np.maximum(hist, 0)])
    stats["hist_item"] = _stats(ids["hist_item"], pad, bounds)
    # the primary genre of each history item: its first genre (-1 for an item without any)
    hist_genre = np.where(pad, -1, item_bag[item_row[np.maximum(hist, 0)], 0])
    vocabs["hist_genre"], ids["hist_genre"] = encode_with_train_vocab(genre_names, hist_genre,
                                                                      train, min_count)
    stats["hist_genre"] = _stats(ids["hist_genre"], pad, bounds)

    age = np.array([float(x) if x else np.nan for x in age_raw])[user_row][:, None]
    dense_stats = DenseStats.fit(age[train])

    def spec(name: str, kind: str = "sparse", **kw) -> FeatureSpec:
        return FeatureSpec(name, kind, vocabs[name].size if kind != "dense" else 0, **kw)

    schema = Schema([
        spec("user"), spec("item"), FeatureSpec("age", "dense"), spec("age_bucket"),
        spec("gender"), spec("occupation"), spec("zip_prefix"), spec("release_year"),
        spec("genres", "multihot", max_len=width, pooling=genre_pooling),
        FeatureSpec("hist_item", "sequence", vocabs["item"].size, max_len=max_seq_len,
                    source="item"),
        spec("hist_genre", "sequence", max_len=max_seq_len),
    ], label="label", group="user")
    label = (rating >= 4).astype(np.float32)
    splits = {}
    for k, (name, bnd) in enumerate(zip(SPLITS, bounds)):
        dense, imputed = dense_stats.transform(age[bnd])
        cat = {f.name: ids[f.name][bnd] for f in schema.categorical}
        splits[name] = Split(
            schema, sparse=cat, dense=dense, multihot=cat, sequence=cat, label=label[bnd],
            group=user[bnd],  # raw ids: users unseen in train keep their own gAUC group
            extras={"timestamp": ts[bnd]},
            stats=SplitStats(oov={f: s[k][0] for f, s in stats.items()},
                             cells={f: s[k][1] for f, s in stats.items()},
                             imputed={"age": int(imputed[0])}))
    return CTRDataset("movielens-100k", schema, splits, vocabs, dense_stats, group_key="user",
                      notes=[f"label = rating >= 4; split {split}"
                             + (f" (seed {split_seed})" if split == "random" else "")
                             + f" {split_fractions[0]:.0%}/"
                             f"{split_fractions[1] - split_fractions[0]:.0%}/"
                             f"{1 - split_fractions[1]:.0%}; hist_* hold items rated strictly "
                             f"before the row, most recent first"])


def load_movielens(root: str | Path | None = None, *, max_seq_len: int = 50, min_count: int = 1,
                   genre_pooling: str = "mean", split: str = "global_time",
                   split_seed: int = 0, refresh: bool = False, verbose: bool = True,
                   sources: Sequence[str] = ("grouplens", "recbole"),
                   timeout: float = 5.0) -> CTRDataset:
    """MovieLens-100k as a :class:`CTRDataset`, fetched and encoded once, then read from cache.

    Args:
        root: the cache directory (default ``$CETNET_DATA`` or ``~/.cache/cetnet``).
        max_seq_len, min_count, genre_pooling, split, split_seed: see
            :func:`build_movielens` (``split`` and ``split_seed`` are part of the cache key).
        refresh: re-encode even if an encoded cache exists (the raw files are kept).
        verbose: report fetching and caching on stderr.
        sources, timeout: see :func:`fetch_raw`.
    """
    where = "dataset 'movielens-100k'"
    check_root(root, where)
    max_seq_len = check_int(max_seq_len, "max_seq_len", where, minimum=1, maximum=MAX_SEQ_LEN)
    min_count = check_int(min_count, "min_count", where, minimum=1)
    genre_pooling = check_choice(genre_pooling, "genre_pooling", where, ("mean", "sum"))
    split = check_choice(split, "split", where, SPLIT_KINDS)
    split_seed = check_int(split_seed, "split_seed", where, minimum=0)
    refresh = check_bool(refresh, "refresh", where)
    folder = fetch_raw(root, sources=sources, timeout=timeout, verbose=verbose)
    stamps = [file_stamp(folder / f"ml-100k.{p}") for p in _PARTS]
    # the default split keeps its old key (and cache file); another split is another file
    tag = ""
    key: tuple[object, ...] = (_CACHE_VERSION, max_seq_len, min_count, genre_pooling, stamps)
    if split != "global_time":
        tag = f"-{split}" + (f"{split_seed}" if split == "random" else "")
        key += (split, split_seed if split == "random" else 0)
    path = cache_file(folder, f"encoded-T{max_seq_len}-min{min_count}-{genre_pooling}{tag}", key)

    def build() -> CTRDataset:
        ds = build_movielens(read_raw(folder), max_seq_len=max_seq_len, min_count=min_count,
                             genre_pooling=genre_pooling, split=split, split_seed=split_seed)
        source = folder / "SOURCE"
        ds.notes.append(f"raw files from {source.read_text().strip() if source.exists() else '?'}"
                        f", cached in {folder}")
        _log(f"encoded MovieLens-100k, caching it at {path}", verbose)
        return ds

    return cached(path, build, refresh=refresh, sources=stamps,
                  loader=("movielens-100k", _CACHE_VERSION))
