"""Build of cetnet_kernels._C (CPU C++ kernels always, CUDA kernels when possible).

Environment knobs:
  CETNET_CUDA=1|0      force / disable the CUDA kernels (default: built when torch has CUDA and
                       nvcc is found).
  CETNET_CPU_ISA=auto|avx512|avx2|generic
                       vector ISA of the CPU kernels (default: the best one this machine runs;
                       use "generic" for a build that must run on any x86-64 / other CPU).
  TORCH_CUDA_ARCH_LIST  CUDA archs (default: the visible GPUs', else "8.0;9.0+PTX").
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip().lower() if value else None


def _want_cuda() -> bool:
    forced = _flag("CETNET_CUDA")
    if forced in ("0", "false", "no", "off"):
        return False
    available = torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )
    if forced in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "CETNET_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    return available


def _cpu_flags() -> list[str]:
    """-m flags and at::vec CPU_CAPABILITY macros for the chosen vector ISA."""
    isa = _flag("CETNET_CPU_ISA") or "auto"
    if isa == "auto":
        isa = "generic"
        if platform.machine().lower() in ("x86_64", "amd64") and os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
                isa = "avx512"
            elif {"avx2", "fma", "f16c"} <= flags:
                isa = "avx2"
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa == "generic":
        return []
    raise ValueError(f"CETNET_CPU_ISA must be auto, avx512, avx2 or generic, got {isa!r}")


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std: torch's BuildExtension picks the standard its headers need (C++20 from torch 2.14).
    # -fopenmp: at::parallel_for is header code; without it the OpenMP pragma is dropped and
    # every CPU kernel runs on one thread.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", *_cpu_flags()]
    macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("CETNET_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cls = CUDAExtension
    else:
        cls = CppExtension
    return cls(
        name="cetnet_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    # cetnet_kernels at the top level; the model library (cetnet and its subpackages) in python/.
    packages=["cetnet_kernels", "cetnet_kernels.triton"] + find_packages("python"),
    package_dir={"cetnet": "python/cetnet"},
    package_data={"cetnet": ["configs/*.yaml"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
