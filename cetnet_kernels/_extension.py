"""Loading of the compiled extension ``cetnet_kernels._C`` and what it was built with.

Importing cetnet_kernels never fails because the extension is missing or broken: the reference
and Triton backends still work, and one warning says what is missing and how to build it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

__all__ = ["HAS_C", "build_info", "load_error", "set_cpu_capability"]

load_error: str | None = None
try:
    import cetnet_kernels._C as _C  # (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"

HAS_C = _C is not None
if not HAS_C:
    warnings.warn(
        "cetnet_kernels._C is not available (" + str(load_error) + "): the 'cpu' and 'cuda' "
        "backends are off and 'auto' uses 'triton' (CUDA tensors) or 'reference'. Build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
if HAS_C:
    # Choose the CPU kernel build now: a CETNET_CPU_CAPABILITY this build cannot honour is a
    # ValueError at import naming it, not an error from the first op call.
    _C.build_info()


def build_info() -> dict[str, Any]:
    """What this installation can run.

    Returns a dict with ``cpu`` / ``cuda`` (compiled kernels present), ``cpu_capability`` (the
    CPU kernel build in use: ``default``, ``avx2`` or ``avx512``), ``cpu_capabilities`` (the
    builds compiled in), ``cpu_capabilities_runnable`` (those this CPU runs), ``cuda_archs``, ``cuda_version``, ``torch_version`` (the torch the
    extension was compiled against), ``triton`` (importable), and ``error`` (why the extension
    did not load, or None).
    """
    import importlib.util

    if HAS_C:
        info = dict(_C.build_info())
    else:
        info = {"cpu": False, "cpu_capability": None, "cpu_capabilities": [],
                "cpu_capabilities_runnable": [], "cuda": False, "cuda_archs": [],
                "cuda_version": None, "torch_version": None}
    info["triton"] = importlib.util.find_spec("triton") is not None
    info["error"] = load_error
    return info


def set_cpu_capability(name: str) -> str:
    """Run the CPU ops with the kernel build ``name`` from now on; returns the previous one.

    The extension holds one build of the CPU kernels per vector ISA (``default`` runs on any
    CPU; ``avx2``, ``avx512``); at import it takes the ``CETNET_CPU_CAPABILITY`` environment
    variable if set, else the widest this CPU runs. Builds may round differently in the last
    bits (vector width changes the order of sums and where multiply-adds are fused).
    Raises ValueError for a build that is not compiled in or that this CPU cannot run, and
    RuntimeError when the extension is not loaded.
    """
    if not HAS_C:
        raise RuntimeError(f"cetnet_kernels._C is not available ({load_error})")
    previous = str(_C.build_info()["cpu_capability"])
    _C.set_cpu_capability(str(name))
    return previous
