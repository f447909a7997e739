"""Loading of the compiled extension ``cetnet_kernels._C`` and what it was built with.

Importing cetnet_kernels never fails because the extension is missing or broken: the reference
and Triton backends still work, and one warning says what is missing and how to build it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

__all__ = ["HAS_C", "build_info", "load_error"]

_C: Any = None
load_error: str | None = None
try:
    from cetnet_kernels import _C  # noqa: F811  (runs the TORCH_LIBRARY registrations)

    if not _C.build_info()["cpu_supported"]:
        load_error = (
            f"this CPU lacks the {_C.build_info()['cpu_capability']} instructions the extension "
            "was built for; rebuild with CETNET_CPU_ISA=generic"
        )
        _C = None
except ImportError as exc:  # not built, or built against another torch
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


def build_info() -> dict[str, Any]:
    """What this installation can run.

    Returns a dict with ``cpu`` / ``cuda`` (compiled kernels present), ``cpu_capability`` (vector
    ISA of the CPU kernels), ``cuda_archs``, ``cuda_version``, ``torch_version`` (the torch the
    extension was compiled against), ``triton`` (importable), and ``error`` (why the extension
    did not load, or None).
    """
    import importlib.util

    if HAS_C:
        info = dict(_C.build_info())
    else:
        info = {"cpu": False, "cpu_capability": None, "cuda": False, "cuda_archs": [],
                "cuda_version": None, "torch_version": None}
    info.pop("cpu_supported", None)
    info["triton"] = importlib.util.find_spec("triton") is not None
    info["error"] = load_error
    return info
