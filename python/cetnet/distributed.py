"""Data-parallel training on ``torch.distributed`` (see docs/DISTRIBUTED.md).

``torchrun --nproc_per_node N -m cetnet train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`process_group` initializes the default process group from them (gloo for a CPU run,
NCCL for a CUDA one) when ``WORLD_SIZE > 1`` and none exists yet. Without a process group
(a plain ``cetnet train``) every helper here is a no-op returning the single-process answer,
and no collective is ever issued.

The helpers are collectives where they say so: every rank must call them in the same order.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar, cast

import torch
from torch import Tensor, nn

__all__ = ["DistributedError", "active", "world_size", "rank", "is_main", "env_world_size",
           "planned_world_size", "check_batch_size", "process_group", "local_device", "comm_device",
           "shard_range", "all_gather_rows", "broadcast_object", "from_main", "broadcast_state",
           "broadcast_batch_norm_stats",
           "all_sum", "all_gather_objects", "barrier", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S",
           "timeout_seconds", "restart_count", "collective_failure", "InjectedFault",
           "mark_claimed", "claimed_by_this_job"]

#: The process group's timeout in seconds: a collective that waits longer for another rank
#: fails (instead of hanging the job forever).
TIMEOUT_ENV = "CETNET_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: The largest timeout: ~31 years (a timedelta of 1e15 s overflows before torch sees it).
MAX_TIMEOUT_S = 1e9
#: Test hook (docs/DISTRIBUTED.md): ``kill|hang:RANK:EPOCH:STEP``.
FAULT_ENV = "CETNET_TEST_FAULT"

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A data-parallel run that cannot go on: bad torchrun settings, another rank's failure."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group of more than one rank is initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks of the initialized process group (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that writes the run directory."""
    return rank() == 0


def launched_rank() -> int:
    """This process's rank: the group's, else ``$RANK`` as torchrun sets it (0 when unset).
    For what a command prints before the group exists or after it is gone: one rank speaks."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0, 0)


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name, "")
    if not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"${name} must be an integer, got {text!r}") from None
    if value < low:
        raise DistributedError(f"${name} must be >= {low}, got {value}")
    return value


def restart_count() -> int:
    """How many times torchrun has restarted the group (``$TORCHELASTIC_RESTART_COUNT``; 0 on
    the first attempt and without torchrun)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0, 0)


#: The key (with the run directory's path) rank 0 sets in torchrun's store once it has claimed
#: a run directory: the agent keeps its store across restarts, so a restarted attempt knows
#: whether what the directory holds is this job's (see :func:`claimed_by_this_job`).
CLAIMED_KEY = "cetnet/claimed/"
_agent_rendezvous: list[tuple[Any, int, int]] = []  # torchrun's, made once per process


def _rendezvous() -> tuple[Any, int, int]:
    """``(store, rank, world size)`` from torchrun's environment. Under torchrun's agent store
    (one job per process, its store outliving every attempt) made once and kept."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent and _agent_rendezvous:
        return _agent_rendezvous[0]
    from torch.distributed.rendezvous import rendezvous

    timeout = datetime.timedelta(seconds=timeout_seconds())
    store, r, world = next(rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    if agent:
        _agent_rendezvous.append((store, r, world))
    return store, r, world


def _job_store() -> Any | None:
    """The store torchrun's agent hosts for this job (it outlives every attempt), or None when
    the process was not started by torchrun with an agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return _rendezvous()[0]


def _claim_key(run_dir: Any) -> str:
    return CLAIMED_KEY + os.path.abspath(os.fspath(run_dir))


def mark_claimed(run_dir: Any) -> None:
    """Rank 0, once it has claimed ``run_dir`` (cleared it for ``--overwrite``, or checked it):
    records so in torchrun's store, for the attempts that restart this job."""
    store = _job_store()
    if store is not None:
        store.set(_claim_key(run_dir), "1")


def claimed_by_this_job(run_dir: Any) -> bool:
    """Whether an earlier attempt of this torchrun job claimed ``run_dir``: only then is what
    it holds (a checkpoint, a finished run) this job's to resume or return. An attempt that
    failed before rank 0 claimed it (a rank lost while the data loaded) leaves the run of
    before, which the restart must treat as the command says (``--overwrite`` replaces it).
    True without torchrun's store (``$TORCHELASTIC_RESTART_COUNT`` set by hand): the
    directory is trusted."""
    store = _job_store()
    return True if store is None else bool(store.check([_claim_key(run_dir)]))


def timeout_seconds() -> float:
    """``$CETNET_DIST_TIMEOUT`` (seconds, > 0 and at most :data:`MAX_TIMEOUT_S`; default
    :data:`DEFAULT_TIMEOUT_S`): how long a
    collective waits for the other ranks before it fails."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise DistributedError(f"${TIMEOUT_ENV} must be a number of seconds > 0 and <= "
                               f"{MAX_TIMEOUT_S:.0e}, got {text!r}")
    return value


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch.distributed's failure of a collective or of the rendezvous (a
    timeout, a rank that died), as opposed to an error of the run itself."""
    dist = _dist()
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    # gloo says a timeout in several ways: "Timed out waiting ...", or, when the wait is in
    # its transport, "Application timeout caused pair closure"
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "Connection closed",
                            "Connection reset", "Application timeout", "pair closure"))


class InjectedFault:
    """Test hook: ``$CETNET_TEST_FAULT=ACTION:RANK:EPOCH:STEP`` makes rank RANK, on torchrun's
    first attempt only, SIGKILL itself (``kill``) or sleep forever (``hang``) right before step
    STEP (1-based) of epoch EPOCH (epoch 0, step 0: before rank 0 claims the run directory).
    Unset (always, outside tests): :meth:`parse` is None."""

    def __init__(self, action: str, epoch: int, step: int) -> None:
        self.action, self.epoch, self.step = action, epoch, step

    @classmethod
    def parse(cls, this_rank: int) -> "InjectedFault | None":
        text = os.environ.get(FAULT_ENV, "").strip()
        if not text or restart_count() > 0:
            return None
        parts = text.split(":")
        try:
            action, r, epoch, step = parts[0], *(int(p) for p in parts[1:])
        except ValueError:
            action = ""
        if action not in ("kill", "hang"):
            raise DistributedError(f"${FAULT_ENV} must be kill|hang:RANK:EPOCH:STEP, got {text!r}")
        return cls(action, epoch, step) if r == this_rank else None

    def at(self, epoch: int, step: int) -> None:
        """Fires when ``(epoch, step)`` (step 1-based) is the fault's."""
        if (epoch, step) != (self.epoch, self.step):
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(3600)


def env_world_size() -> int:
    """``$WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1, 1)


def planned_world_size() -> int:
    """The world size of the initialized group, else the one ``$WORLD_SIZE`` announces (what a
    check made before :func:`process_group` must assume)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def check_batch_size(batch_size: int, world: int, key: str = "train.batch_size") -> None:
    """ValueError unless the global ``batch_size`` splits evenly over ``world`` ranks."""
    if world > 1 and batch_size % world:
        lower = batch_size // world * world
        hint = f"{lower} or {lower + world}" if lower else str(world)
        raise ValueError(f"{key} = {batch_size} is the global batch of a data-parallel run and "
                         f"must be divisible by the world size {world} (each rank trains on "
                         f"batch_size / world_size rows); use e.g. {hint}")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Initializes the default process group from torchrun's environment when ``$WORLD_SIZE``
    is above 1 and no group exists (NCCL when ``device`` is CUDA, gloo otherwise) and destroys
    it on exit. A group that already exists (initialized by the caller) is used and kept; with
    ``WORLD_SIZE`` unset or 1 nothing happens."""
    dist = _dist()
    if (dist.is_available() and dist.is_initialized()) or env_world_size() <= 1:
        yield
        return
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE is {env_world_size()} but ${', $'.join(missing)} "
                               "unset: start data-parallel runs with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device(device, initialized=False))
    timeout = datetime.timedelta(seconds=timeout_seconds())
    # torchrun's agent keeps one store across restarts: without a key prefix per attempt a
    # restarted rank can read the address a dead rank of the failed attempt published there
    # (gloo: "connectFullMesh failed ... Connection refused")
    store, r, world = _rendezvous()
    store = dist.PrefixStore(f"cetnet/attempt{restart_count()}/default_pg", store)
    dist.init_process_group(backend=backend, store=store, rank=r, world_size=world,
                            timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device, *, initialized: bool = True) -> torch.device:
    """This rank's device: ``cuda:$LOCAL_RANK`` for a CUDA device given without an index in a
    data-parallel run (without ``$LOCAL_RANK``, e.g. a group the caller initialized: the rank
    modulo the GPU count), ``device`` otherwise."""
    multi = active() if initialized else env_world_size() > 1
    if device.type != "cuda" or device.index is not None or not multi:
        return device
    fallback = rank() % max(torch.cuda.device_count(), 1) if initialized else 0
    local = _env_int("LOCAL_RANK", fallback, 0)
    if local >= torch.cuda.device_count():
        raise DistributedError(f"$LOCAL_RANK is {local} but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s): start at most "
                               "that many processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local)


def comm_device() -> torch.device:
    """Where the tensors of a collective must be: this rank's CUDA device under NCCL, the CPU
    otherwise (gloo)."""
    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rank ``r``'s contiguous share ``[start, stop)`` of ``n`` rows (``torch.tensor_split``'s
    split: the first ``n % world`` ranks get one row more). Concatenating the shares in rank
    order gives the rows in their order."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def all_gather_rows(t: Tensor, group: Any = None) -> Tensor:
    """Collective: every rank's ``t`` concatenated along dim 0 in rank order (row counts may
    differ); the one the embedding's data-parallel update uses
    (:func:`cetnet_kernels.embedding_ops.all_gather_rows`)."""
    from cetnet_kernels.embedding_ops import all_gather_rows as gather

    return gather(t, group)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Collective: rank ``src``'s picklable ``obj`` on every rank."""
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Collective: every rank's picklable ``obj``, in rank order."""
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0 only and hands its (picklable) result to every rank; when it
    raises, rank 0 re-raises and the other ranks raise a DistributedError saying so (instead
    of waiting for a result that never comes). Without a process group: ``fn()``."""
    if not active():
        return fn()
    if is_main():
        try:
            value = fn()
        except BaseException as e:
            broadcast_object((False, f"{type(e).__name__}: {e}"))
            raise
        broadcast_object((True, value))
        return value
    ok, value = cast("tuple[bool, Any]", broadcast_object(None))  # rank 0's (ok, value)
    if not ok:
        raise DistributedError(f"rank 0 failed: {value}")
    return value


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Collective: copies rank ``src``'s parameters and buffers into ``module`` on every rank
    (in place, tensor by tensor)."""
    dist = _dist()
    with torch.no_grad():
        for t in module.state_dict().values():
            if isinstance(t, Tensor):
                dist.broadcast(t, src=src)


def broadcast_batch_norm_stats(module: nn.Module, src: int = 0) -> None:
    """Collective: copies rank ``src``'s BatchNorm running statistics into ``module`` on every
    rank. Training updates them from each rank's own share (DDP copies rank 0's only at the
    start of a forward; TorchRec's model-parallel wrapper never does), so before an evaluation
    or a checkpoint every rank takes rank 0's: all score with, and save, the same model."""
    dist = _dist()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for t in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if isinstance(t, Tensor):
                        dist.broadcast(t, src=src)


def all_sum(values: Sequence[float]) -> list[float]:
    """Collective: the element-wise sum of ``values`` over the ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device())
    _dist().all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Collective: returns when every rank has reached it (no-op without a process group)."""
    if active():
        _dist().barrier()
