"""Processes of this machine: whether a pid is alive, and where a recorded pid means something.

A pid names a process only on the machine, boot and pid namespace that recorded it: containers
that share a hostname (``docker run --uts=host``, Kubernetes pods on the host network) each
number their own processes, so one container must not judge another's pid dead because its own
namespace lacks it. :func:`process_space` is what two processes compare before one checks a pid
the other wrote.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["pid_alive", "process_space"]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process of this pid namespace (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def process_space() -> str:
    """``hostname/boot id/pid namespace``: equal for two processes exactly when a pid one of
    them records names the same process for the other (a pid recorded before a reboot names
    nothing). Parts the system does not expose (no ``/proc``) are left empty."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{boot}/{namespace}"
