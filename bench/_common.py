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


def ring_step(loss_of, optimizer, batches: list):
    """A training step on the next batch of ``batches`` (cycled): ``loss_of(batch)``'s loss,
    backward, ``optimizer.step()``."""
    it = [0]

    def step():
        batch = batches[it[0] % len(batches)]
        it[0] += 1
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_date(data: dict) -> str:
    """A pytest-benchmark JSON's date as ``YYYY-MM-DD HH:MM UTC`` (as it is when unparsable)."""
    from datetime import datetime

    when = data.get("datetime", "")
    try:
        return datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return when


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"



class InterleavedTimer:
    """Times several callables in interleaved rounds.

    One round runs each callable for its burst of calls (``burst[name]``, default 1), in an order
    rotated every round, and records the time per call of each burst. Timed one after the other,
    each provider would see a different stretch of a shared machine whose speed drifts over
    minutes; interleaved, drift hits them alike and their ratios hold.
    """

    def __init__(self, steps: dict, burst: dict | None = None) -> None:
        import time

        self._clock = time.perf_counter
        self.steps = steps
        self.names = list(steps)
        self.burst = {p: (burst or {}).get(p, 1) for p in self.names}
        self.times: dict[str, list[float]] = {p: [] for p in self.names}
        self._turn = 0

    def round(self) -> None:
        k = self._turn % len(self.names)
        self._turn += 1
        for p in self.names[k:] + self.names[:k]:
            step, n = self.steps[p], self.burst[p]
            t0 = self._clock()
            for _ in range(n):
                step()
            self.times[p].append((self._clock() - t0) / n)

    def calibrate(self) -> float:
        """Runs one untimed round and returns its duration in seconds."""
        t0 = self._clock()
        self.round()
        for ts in self.times.values():
            ts.clear()
        return self._clock() - t0

    @classmethod
    def run(cls, steps: dict, calls: int, rounds: int) -> dict[str, dict]:
        """The :meth:`summary` of ``rounds`` timed rounds (after an untimed one) of ``calls``
        calls of each step."""
        timer = cls(steps, burst={p: calls for p in steps})
        timer.calibrate()
        for _ in range(rounds):
            timer.round()
        return timer.summary()

    def summary(self) -> dict[str, dict]:
        """name -> median_s, min_s, rounds, calls_per_round."""
        import statistics

        return {p: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts),
                    "calls_per_round": self.burst[p]} for p, ts in self.times.items()}
