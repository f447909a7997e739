"""Helpers shared by conftest.py and the bench_*.py modules: environment knobs that select the
benchmark matrix, and machine names."""

from __future__ import annotations

import os
import platform

import torch


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    return [s.strip() for s in raw.split(",") if s.strip()] if raw else default


def selected_devices() -> list[str]:
    """CETNET_BENCH_DEVICES (comma list of cpu, cuda); default: cuda if there is a GPU, else cpu."""
    return _env_list("CETNET_BENCH_DEVICES", ["cuda"] if torch.cuda.is_available() else ["cpu"])


def env_ints(name: str, default: list[int]) -> list[int]:
    return [int(float(s)) for s in _env_list(name, [str(d) for d in default])]


def env_strs(name: str, default: list[str]) -> list[str]:
    return _env_list(name, default)


def cpu_name() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{model}, {cores} cores"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"

