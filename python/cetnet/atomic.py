"""Atomic file writes, shared by run directories, checkpoints and the dataset cache, and the
check that a torch.save file read back is whole (:func:`zip_damage`).

Every write goes to a temporary file with a unique name in the target's directory, is flushed
to disk, then ``os.replace``-d over the target: a reader sees the old file or the new one, never
half of one, and two processes writing the same target never share a temporary file. A write
killed before the replace leaves its temporary behind; :func:`remove_stale_temps` sweeps those
on the next start. Files get the permissions ``open()`` would give (``0o666`` less the umask),
not ``mkstemp``'s ``0o600``, so the files of one run all look alike.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["TEMP_SUFFIX", "atomic_write", "write_bytes_atomic", "write_text_atomic",
           "remove_stale_temps", "zip_damage", "FirstWriteError"]

TEMP_SUFFIX = ".tmp"  # temporaries are ".<target name>.<random>.tmp" beside the target


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], object], *, binary: bool = True,
                 fsync: bool = True) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then replaces ``path`` with it.

    The parent directory must exist (creating it is the caller's decision). On any exception
    (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched. With
    ``fsync`` the file's data and then the directory entry are synced to disk.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            try:
                write(f)
            except RuntimeError as e:
                raise _write_failure(e, path) from None
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # e.g. closing the file flushed into a size limit: say which
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_directory(path.parent)


class FirstWriteError:
    """A binary file that, after its first failed write, takes every later write without
    writing (``error`` holds the failure: raise it once the writer is done). For a writer
    whose C++ destructor writes the end of its archive when it was not finished, as
    torch.export.save's does after a full disk: that write failing too throws from a
    destructor, which aborts the process (C++ terminate) after the Python error was given."""

    def __init__(self, f: IO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._f.write(data)
            except OSError as e:
                self.error = e
                raise
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            self._f.flush()


def _write_failure(e: RuntimeError, path: Path) -> BaseException:
    """``e`` as the OSError it is when torch.save's zip writer failed to write (it reports a
    full disk or a file size limit as ``RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos``); ``e`` itself otherwise."""
    text = str(e)
    if "inline_container" not in text and "PytorchStreamWriter" not in text:
        return e
    try:
        full = shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        full = False
    reason = text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__
    return OSError(errno.ENOSPC if full else errno.EIO,
                   f"{os.strerror(errno.ENOSPC) if full else 'a write failed'} (torch: {reason})",
                   str(path))


def zip_damage(file: IO[bytes]) -> str | None:
    """What is damaged in the zip archive (a ``torch.save`` file) ``file`` holds: its first
    member whose bytes fail their CRC, which ``torch.load`` does not check (a flipped bit in a
    tensor loads as another value), or None. ``file`` is left at its start; a file that is no
    zip archive is its reader's to refuse (None)."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        bad = None
    finally:
        file.seek(0)
    return None if bad is None else f"its part {bad} fails its CRC check (damaged bytes)"


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (the new file's data is, by the fsync before
    it; the directory entry needs its own after a power loss). Best effort: a filesystem or
    platform that cannot open or sync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_file(path: str | Path, what: str) -> None:
    """OSError naming ``what`` (e.g. ``--report``) unless ``path`` can be written as a file
    (its directory created if needed): not an existing directory, under an existing
    directory (not a file) this process may write. For outputs written at the end of a long
    command: checked first, they cannot fail it last."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path}: is a directory, not a file")
    problem = creation_problem(path)
    if problem is not None:
        raise OSError(f"{what} {path}: cannot create it: {problem}")


def creation_problem(path: str | Path) -> str | None:
    """Why ``path`` (file or directory, with its missing parents) could not be created, as a
    phrase (its nearest existing ancestor is a file, or one this process may not write into),
    or None when it can be."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to write in {parent}"
    return None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def remove_stale_temps(directory: str | Path, *, older_than_s: float = 3600.0) -> list[Path]:
    """Deletes temporaries of :func:`atomic_write` in ``directory`` older than ``older_than_s``.

    A temporary that young may belong to a write in progress in another process, so it stays.
    Returns the files removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for p in directory.glob(f".*{TEMP_SUFFIX}"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another process swept it first
            pass
    return removed
