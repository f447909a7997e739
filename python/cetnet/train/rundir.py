"""The run directory: its file names, creation, lock and JSON files.

Layout: ``config.yaml`` (the resolved config), ``metrics.json``, ``best.pt`` / ``last.pt``
(see :mod:`cetnet.train.checkpoint`; ``last.prev.pt``: the ``last.pt`` before the latest,
kept for a resume when ``last.pt`` is unreadable), ``curves.png`` / ``members_auc.png`` (plots),
``eval_<split>.json`` (``eval_<split>_last.json`` for ``--checkpoint last.pt``,
``eval_<split>_<stem>-<hash>.json`` for a checkpoint given as a path) from ``cetnet
evaluate``, ``train.log`` (the log lines), ``history.csv`` (metrics per epoch), TensorBoard's
``events.out.tfevents.*`` when tensorboard is installed, and ``.lock``.

One directory holds one run. A training run holds an exclusive ``fcntl.flock`` on ``.lock``
for its whole life (the OS releases it when the process ends, however it ends), so a second
run into the same directory fails at once instead of interleaving its files with the first's;
``cetnet evaluate`` holds a shared lock while it reads the checkpoint and writes its JSON. The
lock file is never replaced or deleted: a new inode would be a second, independent lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from cetnet.atomic import TEMP_SUFFIX, creation_problem, write_text_atomic
from cetnet.processes import pid_alive
from cetnet.train.checkpoint import has_last

__all__ = ["CONFIG_FILE", "METRICS_FILE", "LOCK_FILE", "RunDirError", "RunDirBusy",
           "RunDirChanged", "RunLock",
           "default_run_dir", "make_run_dir", "run_files", "foreign_files", "check_run_dir",
           "clear_run", "write_json", "read_json", "json_safe"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
# What a run writes (checkpoint and plot names are repeated here to keep this module free of
# torch and matplotlib; tests check they agree).
# Besides, what the commands and examples write into a run directory by default: an export
# (model.pt2, and the example's model.check.pt) and predictions (predictions_<split>.csv), which
# --overwrite deletes with the run they came from (kept, they would sit beside another run).
_RUN_FILE = re.compile(r"config\.yaml|metrics\.json|best\.pt|last\.pt|last\.prev\.pt|curves\.png"
                       r"|members_auc\.png|eval_[a-z]+(?:_[A-Za-z0-9_.-]+)?\.json|\.lock"
                       r"|model\.pt2|model\.check\.pt|predictions_[A-Za-z0-9_.-]+\.csv"
                       r"|train\.log|history\.csv|events\.out\.tfevents\.[^/]+"
                       rf"|\..+\.[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}")


class RunDirError(Exception):
    """A run directory that cannot be used as asked: in use by another process, holding a run
    already, or holding files that are not a run's (the message names the directory)."""


class RunDirBusy(RunDirError):
    """The run directory's lock is held by another process (a run training in it)."""


class RunDirChanged(RunDirError):
    """Another process wrote the run directory between the checks of a run and its claim of
    the directory: what the checks decided (resume it, replace it) no longer holds."""


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(name: str, out: str | Path | None = None) -> Path:
    """Creates (if needed) and returns the run directory: ``out``, or a new directory for
    ``name`` (the default, suffixed ``-2``, ``-3`` ... if taken). A default directory is
    claimed by an exclusive ``mkdir``: two runs started in the same second get two."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = path = default_run_dir(name)
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, n = base.with_name(f"{base.name}-{n}"), n + 1


def run_files(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` but the lock file (sorted; [] for a missing directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


#: The one folder a run writes: the DCP checkpoints of TorchRec tables (cetnet.train.sharded).
RUN_FOLDER = "tables"


def _is_run_entry(run_dir: Path, name: str) -> bool:
    path = run_dir / name
    if name == RUN_FOLDER:
        return path.is_dir() and not path.is_symlink()
    return bool(_RUN_FILE.fullmatch(name)) and path.is_file()


def foreign_files(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` that a run does not write (a directory other than
    :data:`RUN_FOLDER` is always foreign)."""
    run_dir = Path(run_dir)
    return [n for n in run_files(run_dir) if not _is_run_entry(run_dir, n)]


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_run_dir(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Whether a run may write ``run_dir``, without writing anything: RunDirError when another
    process holds its lock, when it holds files and neither ``resume`` nor ``overwrite`` is
    given, or when ``overwrite`` would have to delete files that are not a run's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory")
    if not run_dir.exists():
        _check_creatable(run_dir)
        return
    lock = run_dir / LOCK_FILE
    if lock.exists():
        RunLock(run_dir).probe()
    names = run_files(run_dir)
    if resume or not names:
        return
    if not overwrite:
        foreign = foreign_files(run_dir)
        if len(foreign) == len(names):
            raise RunDirError(f"{run_dir} holds files that are not a cetnet run's "
                              f"({_listing(names)}): give another --out (a new or empty "
                              "directory)")
        # --overwrite deletes a run's files only: suggested when nothing else is there
        replace = "replace it with --overwrite, " if not foreign else ""
        if not has_last(run_dir):
            raise RunDirError(f"{run_dir} already holds a run ({_listing(names)}) without a "
                              "checkpoint (it stopped before its first epoch ended: nothing to "
                              f"resume): {replace}give another --out")
        raise RunDirError(f"{run_dir} already holds a run ({_listing(names)}): continue it with "
                          f"--resume {run_dir}, {replace}or give another --out")
    _refuse_foreign(run_dir)


def _check_creatable(run_dir: Path) -> None:
    """RunDirError when ``run_dir`` (which does not exist) cannot be created: its nearest
    existing ancestor is a file, or a directory this process may not write into. Checked up
    front, so that a run does not fail at mkdir after loading its data and model."""
    problem = creation_problem(run_dir)
    if problem is not None:
        raise RunDirError(f"cannot create {run_dir}: {problem}")


def _refuse_foreign(run_dir: Path) -> None:
    foreign = foreign_files(run_dir)
    if foreign:
        raise RunDirError(f"--overwrite: {run_dir} holds files that are not a cetnet run's "
                          f"({_listing(foreign)}); refusing to delete them")


def clear_run(run_dir: str | Path) -> list[str]:
    """Deletes the files of a previous run in ``run_dir`` (``--overwrite``), all but the lock
    file; call it holding the lock. Refuses (RunDirError) when a file is not a run's."""
    _refuse_foreign(Path(run_dir))
    removed = []
    for name in run_files(run_dir):
        path = Path(run_dir) / name
        if name == RUN_FOLDER and path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(name)
    return removed


class RunLock:
    """``fcntl.flock`` on ``run_dir/.lock``: exclusive for a training run (which writes its pid
    into the file), shared for an evaluation. Non-blocking: a lock held by another process is a
    RunDirError at once. Use as a context manager, or :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: str | Path, *, shared: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.shared = shared
        self._fd: int | None = None

    def _holder(self) -> str:
        """`` (pid N)`` when the file names a live process, else ``""``."""
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})" if pid > 0 and pid != os.getpid() and pid_alive(pid) else ""

    def _busy(self) -> RunDirError:
        what = ("a training run is writing it" if self.shared
                else "another cetnet process is using it")
        return RunDirBusy(f"{self.run_dir}: {what}{self._holder()} (it holds {self.path}); "
                          "wait for it to finish or use another directory")

    def probe(self, attempts: int = 5) -> None:
        """RunDirError if another process holds the lock now; takes nothing, writes nothing.
        The probe itself takes the lock for an instant, so two probes at once (the ranks of a
        data-parallel run checking one directory) can meet: a refused probe is retried
        ``attempts`` times over about half a second before the lock counts as held."""
        for attempt in range(attempts):
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
                            | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if attempt == attempts - 1:
                    raise self._busy() from None
            finally:
                os.close(fd)  # closing drops the lock taken for the probe
            time.sleep(0.05 * (attempt + 1))

    def acquire(self) -> RunLock:
        """Takes the lock (creating the file, permissions as ``open()`` gives them)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise self._busy() from None
        if not self.shared:  # in place: the lock file must keep its inode
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None (JSON has no NaN) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    """Writes ``obj`` as indented JSON, atomically (temp file + ``os.replace``)."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
