"""Host-side helpers shared by every op family and backend (fusion, KDEF, embedding; the
Python front ends and the Triton launchers alike)."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["acc_dtype", "check_count", "constant_tensor", "device_guard", "filled",
           "shape_only", "upload"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute (accumulation) dtype of inputs of ``dtype``: float64 stays float64, every
    other floating dtype (float32, float16, bfloat16) computes in float32, as in the kernels."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape_only(*args: Any) -> bool:
    """True when a tensor among ``args`` is a meta or fake tensor: the call only propagates
    shapes (torch.compile tracing, fake kernels), so nothing may be launched or read."""
    return any(isinstance(a, Tensor) and (a.device.type == "meta" or is_fake(a)) for a in args)


def device_guard(t: Tensor) -> ContextManager[Any]:
    """``torch.cuda.device(t.device)`` for a real CUDA tensor: Triton launches on the current
    device, which need not be the tensors'. A no-op (nullcontext) for CPU tensors (interpreter),
    meta tensors and fake/functional tensors while tracing (nothing is launched then, and the
    traced graph's launches are guarded by whoever runs them)."""
    if t.device.type != "cuda" or is_fake(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def check_count(value: object, name: str, op: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ValueError ``"<op>: <name> must be an
    int >= 1, got <value!r>"`` (member counts, dims, vocabulary sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    return value


def upload(values: Sequence[int | float] | float, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without making the host wait: on
    CUDA that call copies from pageable memory, which synchronizes with the stream; this stages
    the values in pinned memory and copies asynchronously (small per-call metadata); while a
    CUDA graph is captured, see :func:`filled`."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    if _capturing(device):
        return filled(t, device)
    return t.pin_memory().to(device, non_blocking=True)


def filled(values: Tensor, device: torch.device) -> Tensor:
    """A copy of the host tensor ``values`` on ``device`` made by one fill kernel per element,
    the values travelling as the kernels' parameters: what :func:`upload` does while a CUDA
    graph is captured, as the graph's copy node would read the pinned host buffer again at
    every replay, long after it was freed and reused (the per-element kernels cost only a
    capture that met a constant its warm-up did not make)."""
    out = torch.empty(values.shape, dtype=values.dtype, device=device)
    flat = out.view(-1)
    for i, v in enumerate(values.reshape(-1).tolist()):
        flat[i].fill_(v)
    return out


# (values, dtype, device) -> tensor, least recently used first
_CONSTANTS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_MAX_CONSTANTS = 1024
# The cached tensors a captured CUDA graph reads: kept alive for good, even once evicted from
# _CONSTANTS (the graph reads their memory at every replay), and the key's one tensor from then
# on (a miss takes it back), so that no later capture replaces one that a graph reads.
_READ_BY_GRAPHS: dict[tuple, Tensor] = {}
_LOCK = threading.Lock()  # callers may run in threads (nn.DataParallel replicas)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cacheable(t: Tensor) -> bool:
    """Whether a tensor just made can serve later calls: not a fake tensor (made under a fake
    mode: torch.compile, make_fx) nor a torch.func transform's wrapper (a tensor made while
    a grad transform runs belongs to its level)."""
    return (type(t) is Tensor and not is_fake(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def constant_tensor(values: Sequence[int | float] | float, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """``values`` on ``device`` (a Python number: a 0-dim tensor) for values that repeat from
    call to call (a layout's dims, bases, codes, a temperature): copied once per (values, dtype,
    device), synchronously (the tensor is complete before any stream reads it), then shared, so
    later calls cost nothing; callers must not write to it. Made outside inference mode (an
    inference tensor could not be saved for backward by a later call), and not cached when
    it is a fake tensor or a torch.func transform's wrapper (see :func:`_cacheable`). While a
    CUDA graph is being captured a tensor made before (by the warm-up calls the capture needs
    anyway) is used as is and kept alive for good (it never changes, so a replay reads the
    right values, even after the cache has dropped it); one not made yet is an :func:`upload`
    (a cached tensor made now would live in the graph's memory pool, and be filled only by
    replays), which fills it by kernels the graph replays (:func:`filled`)."""
    key = (values if isinstance(values, (int, float)) else tuple(values), dtype, device)
    capturing = _capturing(device)
    with _LOCK:
        t = _CONSTANTS.get(key)
        if t is None:
            t = _READ_BY_GRAPHS.get(key)
            if t is None:
                if capturing:
                    return upload(key[0], dtype, device)
                with torch.inference_mode(False):
                    t = torch.tensor(key[0], dtype=dtype, device=device)
                if not _cacheable(t):
                    return t
            _CONSTANTS[key] = t
            if len(_CONSTANTS) > _MAX_CONSTANTS:
                _CONSTANTS.popitem(last=False)
        else:
            _CONSTANTS.move_to_end(key)
        if capturing:
            _READ_BY_GRAPHS[key] = t
        return t
