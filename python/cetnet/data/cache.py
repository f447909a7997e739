"""Where downloaded and processed datasets are kept, and how encoded datasets are cached.

A cache file's name carries a digest of everything its contents depend on (the loader's cache
version, :data:`~cetnet.data.dataset.FORMAT_VERSION`, the options, the input files' sizes,
modification and status-change times and inodes), so a cache of other options, another format or
rewritten files is never read for this one.
Every write is atomic (:mod:`cetnet.atomic`): concurrent prepares into one directory each write
through their own temporary and the last ``os.replace`` wins with a complete file; temporaries of
killed writes are swept on the next start. An unreadable cache file (empty, truncated, corrupt,
another format) is rebuilt.

Beside each cache file, ``<name>.sources.json`` records the input files' stamps it was made from,
the dataset format and the loader's cache version: a cache whose inputs have changed since can
never be read again (its name holds their old stamps), so :func:`cache_status` can tell it
superseded and ``cetnet data caches DIR --prune`` remove it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cetnet.atomic import remove_stale_temps, write_bytes_atomic
from cetnet.data.dataset import FORMAT_VERSION, CacheError, CTRDataset

__all__ = ["default_root", "user_path", "write_atomic", "open_cache_dir", "cache_file",
           "file_stamp", "read_cache", "write_cache", "check_writable", "cached", "CacheError",
           "cache_status", "find_caches", "loader_versions", "sources_path"]


def user_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded (kept as it is when that user is
    unknown: the file check then says the path does not exist)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def default_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$CETNET_DATA``, else ``~/.cache/cetnet``."""
    if root is not None:
        return user_path(root)
    env = os.environ.get("CETNET_DATA")
    return user_path(env) if env else Path.home() / ".cache" / "cetnet"


def open_cache_dir(directory: str | Path) -> Path:
    """Creates ``directory`` if needed and sweeps the temporaries that killed writes left there.

    Raises:
        CacheError: it cannot be created (a file is in the way, no permission, ...).
    """
    directory = user_path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise CacheError(directory, f"cannot use it as a data/cache directory "
                                    f"({getattr(e, 'strerror', None) or e})") from None
    remove_stale_temps(directory)
    return directory


def write_atomic(path: Path, data: bytes) -> None:
    """Writes through a unique temporary file, so an interrupted fetch never leaves a partial
    file and two concurrent fetches never share a temporary.

    Raises:
        CacheError: the file cannot be written (no permission, disk full, ...).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except OSError as e:
        raise CacheError(path, f"cannot write it ({e.strerror or e})") from None


def file_stamp(path: Path) -> tuple[str, int, int, int, int]:
    """What a cache key records of an input file: resolved path, size, modification time,
    status-change time and inode. The last two catch a file rewritten in place with its size
    and modification time kept (``cp -p``, ``rsync -t``, an archive unpacked over it), which
    a cache keyed on size and mtime took for the old one: no program can set them back."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def cache_file(directory: Path, stem: str, key: Any) -> Path:
    """``<directory>/<stem>-<digest>.pt``: ``digest`` hashes ``repr(key)`` with the dataset
    format version; ``stem`` (e.g. a dataset id from a YAML) is reduced to safe characters, so it
    can neither leave the directory nor look like a temporary."""
    digest = hashlib.sha1(repr((FORMAT_VERSION, key)).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", stem).lstrip(".")[:80] or "dataset"
    return directory / f"{safe}-{digest}.pt"


def read_cache(path: Path, verbose: bool = False) -> CTRDataset | None:
    """The cached dataset, or None when there is none or it is unreadable (then it is rebuilt:
    a warning on stderr says so)."""
    if not path.exists():
        return None
    try:
        ds = CTRDataset.load(path)
    except FileNotFoundError:  # removed meanwhile
        return None
    except CacheError as e:
        print(f"[cetnet.data] warning: {e}; rebuilding it", file=sys.stderr)
        return None
    if verbose:
        print(f"[cetnet.data] {ds.name}: read from cache {path}", file=sys.stderr)
    return ds


def write_cache(ds: CTRDataset, path: Path) -> None:
    """Saves ``ds`` at ``path`` atomically.

    Raises:
        CacheError: it cannot be written (naming the file and why).
    """
    try:
        ds.save(path)
    except OSError as e:
        raise _cannot_write(path, e) from None


def _cannot_write(path: Path, e: OSError) -> CacheError:
    return CacheError(path, f"cannot write the cache file ({e.strerror or e}); free space, fix "
                            f"the directory's permissions or choose another cache directory")


def cached(path: Path | None, build: Callable[[], CTRDataset], *, refresh: bool = False,
           verbose: bool = False, sources: Sequence[tuple[str, int, int, int, int]] = (),
           loader: tuple[str, int] | None = None) -> CTRDataset:
    """``path``'s dataset if readable (and not ``refresh``), else ``build()`` saved there;
    ``sources``: the :func:`file_stamp` of each input file its key holds, recorded beside it
    with ``loader`` (its name and cache version: :func:`loader_versions`) in
    :func:`sources_path` (a cache read without the record gets it: its key matched)."""
    if path is not None and not refresh:
        ds = read_cache(path, verbose)
        if ds is not None:
            if sources and not sources_path(path).exists():
                _record_sources(path, sources, loader)
            return ds
    if path is not None:
        check_writable(path)  # before the encode (hours for a large dataset), not after it
    ds = build()
    if path is not None:
        write_cache(ds, path)
        if sources:
            _record_sources(path, sources, loader)
    return ds


def loader_versions() -> dict[str, int]:
    """The cache version of each loader that records its caches' inputs (a cache of another
    version is in a key this cetnet never makes)."""
    from cetnet.data import bars, movielens

    return {"bars": bars._CACHE_VERSION, "movielens-100k": movielens._CACHE_VERSION}


def sources_path(path: Path) -> Path:
    """The record of the input files a cache file was made from (``<name>.sources.json``)."""
    return path.with_name(path.stem + ".sources.json")


def _record_sources(path: Path, sources: Sequence[tuple[str, int, int, int, int]],
                    loader: tuple[str, int] | None) -> None:
    record: dict[str, Any] = {"format": FORMAT_VERSION, "sources": [list(s) for s in sources]}
    if loader is not None:
        record["loader"], record["loader_version"] = loader
    try:
        write_bytes_atomic(sources_path(path), (json.dumps(record) + "\n").encode())
    except OSError:  # only a help for pruning: the cache itself is written
        pass


def cache_status(path: Path) -> tuple[str, str]:
    """``(status, why)`` of a cache file: ``current`` (its input files are as recorded),
    ``superseded`` (one was rewritten or replaced since: the cache can never be read again,
    its name holds the old stamps), ``missing-input`` (an input file cannot be read now, e.g.
    a folder moved or unmounted: readable again when it is back), ``other-version`` (written
    by a cetnet of another dataset format or loader version: this one never reads it, one of
    that version may) or ``unknown`` (no record of its inputs: written before cetnet kept
    one)."""
    try:
        record = json.loads(sources_path(path).read_text())
        stamps = [tuple(s) for s in record["sources"]]
        fmt = record["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown", "no record of its input files"
    loader, version = record.get("loader"), record.get("loader_version")
    if fmt != FORMAT_VERSION:
        return "other-version", f"dataset format {fmt}, this cetnet's {FORMAT_VERSION}"
    if loader is not None and version != loader_versions().get(loader, version):
        return "other-version", (f"{loader} cache version {version}, this cetnet's "
                                 f"{loader_versions()[loader]}")
    for stamp in stamps:
        try:
            now = file_stamp(Path(stamp[0]))
        except OSError as e:
            return "missing-input", f"{stamp[0]}: {e.strerror or e}"
        if now != stamp:
            return "superseded", f"{stamp[0]} changed since"
    return "current", f"{len(stamps)} input file(s) unchanged"


def find_caches(directory: Path) -> Iterator[Path]:
    """The cache files under ``directory`` (any depth): ``*-<16 hex digits>.pt``."""
    pattern = re.compile(r".*-[0-9a-f]{16}\.pt")
    for path in sorted(directory.rglob("*.pt")):
        if pattern.fullmatch(path.name) and path.is_file():
            yield path


def check_writable(path: Path) -> None:
    """CacheError unless a cache file can be created beside ``path`` (a file is created in
    its directory and removed: permissions, a read-only mount, a full disk's inodes)."""
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise _cannot_write(path, e) from None
