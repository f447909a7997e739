"""cetnet.atomic: unique temporaries, no partial files, umask permissions, stale sweeping."""

import os
import stat
import time

import pytest

from cetnet.atomic import atomic_write, remove_stale_temps, write_bytes_atomic


def test_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_permissions_follow_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a", b"x")
        (tmp_path / "b").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o644


def test_remove_stale_temps_keeps_young_ones_and_other_files(tmp_path):
    stale, young = tmp_path / ".x.pt.abc.tmp", tmp_path / ".x.pt.def.tmp"
    keep = tmp_path / "x.pt"
    for p in (stale, young, keep):
        p.write_bytes(b"")
    past = time.time() - 7200
    os.utime(stale, (past, past))
    os.utime(keep, (past, past))
    assert remove_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.pt.def.tmp", "x.pt"]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_checkpoint_or_cache_that_does_not_fit_is_one_oserror(tmp_path):
    """torch.save reports a failed write (a full disk, a file size limit) as a RuntimeError
    of its zip writer; after a whole encode the dataset cache ended in its traceback, a
    checkpoint too. Run under a file size limit in a child process."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal, torch
        from cetnet.atomic import atomic_write
        from cetnet.data import make_synthetic
        from cetnet.data.cache import CacheError, write_cache
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        out = Path({str(tmp_path)!r})
        try:
            atomic_write(out / "last.pt", lambda f: torch.save(torch.zeros(100000), f))
        except OSError as e:
            print("OSError", e.filename == str(out / "last.pt"), "torch:" in e.strerror)
        try:
            write_cache(make_synthetic(num_rows=3000), out / "data.pt")
        except CacheError as e:
            print("CacheError", "cannot write the cache file" in str(e))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split("\n")[:2] == ["OSError True True", "CacheError True"], \
        done.stdout + done.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # no temporary left behind


def test_a_size_limit_met_when_the_file_is_closed_names_the_file(tmp_path):
    """A write that fits the buffer fails only when the file is closed (its last flush); that
    error named no file ("[Errno 27] File too large") where a failed write names it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from cetnet.atomic import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        target = Path({str(tmp_path)!r}) / "best.pt"
        try:
            atomic_write(target, lambda f: f.write(b"x" * 4000), fsync=False)
        except OSError as e:
            print(e.filename == str(target), e.errno, str(target) in str(e))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["True", "27", "True"], done.stdout + done.stderr[-2000:]
    assert os.listdir(tmp_path) == []
