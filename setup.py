"""Build of cetnet_kernels._C (CPU C++ kernels always, CUDA kernels when possible).

Environment knobs:
  CETNET_CUDA=1|0      force / disable the CUDA kernels (default: built when torch has CUDA and
                       nvcc is found).
  CETNET_CPU_ISA=all|native|default|<list>
                       which builds of the CPU kernels to compile besides the default one (any
                       CPU): "all" (default on x86-64: avx2 and avx512, the widest this CPU runs
                       is picked at import, CETNET_CPU_CAPABILITY overrides), "native" (only the
                       widest this build machine runs: quicker to build, not portable),
                       "default" (none), or a comma list such as "avx2".
  TORCH_CUDA_ARCH_LIST  CUDA archs (default: the visible GPUs', else "8.0;9.0+PTX").
  CETNET_DEBUG=1       keep the C++ debug info (-g; default -g0: a module 20x smaller).
  CETNET_NVCC_SPLIT_COMPILE=N
                       nvcc's --split-compile=N (N threads per .cu file, 0 = every CPU): the
                       fusion file, with kernels per member count, is the longest compile.
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip().lower() if value else None


def _nvcc_split_compile() -> list[str]:
    """``--split-compile=N`` from CETNET_NVCC_SPLIT_COMPILE (unset: none)."""
    value = _flag("CETNET_NVCC_SPLIT_COMPILE")
    if value is None:
        return []
    if not (value.isascii() and value.isdigit()):  # ("²".isdigit() is True)
        raise RuntimeError(f"CETNET_NVCC_SPLIT_COMPILE must be a number of threads >= 0 (0: every "
                           f"CPU), got {os.environ['CETNET_NVCC_SPLIT_COMPILE']!r}")
    return [f"--split-compile={int(value)}"]


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


# The -m flags and at::vec macros of each vector ISA the CPU kernels are also compiled for.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# The CPU kernels (compiled once per ISA); csrc/cpu/dispatch.cpp picks one at load time.
CPU_KERNEL_SOURCES = sorted(set(glob.glob("csrc/cpu/*.cpp")) - {"csrc/cpu/dispatch.cpp"})


def _native_isas() -> list[str]:
    """The ISAs of ISA_FLAGS this build machine runs (from /proc/cpuinfo)."""
    if not os.path.exists("/proc/cpuinfo"):
        return []
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    isas = []
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.append("avx512")
    return isas


def _cpu_isas() -> list[str]:
    """The ISAs to compile the CPU kernels for besides the default build (CETNET_CPU_ISA)."""
    choice = _flag("CETNET_CPU_ISA") or "all"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if choice == "all":
        return list(ISA_FLAGS)
    if choice == "native":
        return _native_isas()[-1:]
    if choice in ("default", "none"):
        return []
    isas = [x.strip() for x in choice.split(",") if x.strip()]
    bad = [x for x in isas if x not in ISA_FLAGS]
    if bad or not isas:
        raise ValueError("CETNET_CPU_ISA must be all, native, default or a comma list of "
                         f"{', '.join(ISA_FLAGS)}; got {choice!r}")
    return [x for x in ISA_FLAGS if x in isas]


class BuildExtensionPerISA(BuildExtension):
    """BuildExtension that also compiles the CPU kernels once per extra ISA (ext.cpu_isas),
    each with its flags into its own folder, and links those objects after the default ones
    (so the copies of shared inline code the linker keeps are the default build's)."""

    def build_extension(self, ext):
        objects = []
        for isa in getattr(ext, "cpu_isas", []):
            args = dict(ext.extra_compile_args)
            args["cxx"] = list(args["cxx"]) + ISA_FLAGS[isa]
            objects += self.compiler.compile(
                CPU_KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, "isa-" + isa),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=args, depends=ext.depends)
        ext.extra_objects = [o for o in (ext.extra_objects or []) if "/isa-" not in o] + objects
        super().build_extension(ext)
        module = self.get_ext_fullpath(ext.name)
        if _links_libstdcxx_statically(module):
            # never leave a module behind that crashes on its first error, nor an older one in
            # the source tree (where --inplace would have copied this one) to be tested instead
            in_tree = os.path.join(ROOT, *ext.name.split(".")[:-1], os.path.basename(module))
            for path in {module, in_tree}:
                if os.path.exists(path):
                    os.remove(path)
            raise RuntimeError(
                f"{module} was linked with a static copy of libstdc++ (compiler "
                f"{os.environ.get('CXX', 'c++')}): its C++ error messages would crash the "
                "process next to torch's shared libstdc++. Build with a compiler that links "
                "libstdc++ dynamically, e.g. CXX=/usr/bin/g++")


def _torch_libstdcxx() -> list[str]:
    """The shared libstdc++ this process loaded with torch, as a link input (Linux), else [].

    Linked by path, so the module uses torch's libstdc++ even where the compiler would link its
    own statically: seen on a GPU image whose g++ wrapper (-B to a gcc whose folder holds only
    libstdc++.a) did so. A second, static copy in the module shares no locale state with
    torch's, and every error message that formatted a number crashed the process there (with
    gcc 12 here, the message lost its numbers). ``-lstdc++`` would find the same archive."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)  # the path may hold spaces
                path = fields[5] if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return [path]
    except OSError:
        pass
    return []


def _links_libstdcxx_statically(module: str) -> bool:
    """True when a built Linux module needs no shared libstdc++ (readelf's dynamic section) or
    defines ``std::locale::classic()`` itself (nm: libstdc++'s locale code was linked in; weak
    template instantiations from the headers, which a normal module may export, don't count);
    False otherwise, or when binutils is not there to say."""
    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if readelf is None or nm is None or not sys.platform.startswith("linux"):
        return False
    needed = subprocess.run([readelf, "-d", module], capture_output=True, text=True).stdout
    defined = subprocess.run([nm, "-D", "--defined-only", module], capture_output=True,
                             text=True).stdout
    return (("(NEEDED)" in needed and "libstdc++" not in needed)
            or re.search(r"\s_ZNSt6locale7classicEv$", defined, re.M) is not None)


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std: torch's BuildExtension picks the standard its headers need (C++20 from torch 2.14).
    # -fopenmp: at::parallel_for is header code; without it the OpenMP pragma is dropped and
    # every CPU kernel runs on one thread.
    # -g0 unless CETNET_DEBUG=1: Python's CFLAGS carry -g, and the debug info is 95 % of the
    # module (41 MB instead of 2 MB with three CPU kernel builds) and slows the build.
    debug = (_flag("CETNET_DEBUG") or "0") in ("1", "true", "yes", "on")
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-g" if debug else "-g0"]
    isas = _cpu_isas()
    macros = [(f"CETNET_CPU_HAVE_{isa.upper()}", None) for isa in isas]
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("CETNET_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _nvcc_split_compile()
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cls = CUDAExtension
    else:
        cls = CppExtension
    ext = cls(
        name="cetnet_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] + _torch_libstdcxx(),
    )
    ext.cpu_isas = isas
    return ext


setup(
    # cetnet_kernels at the top level; the model library (cetnet and its subpackages) in python/.
    # cetnet.configs holds only YAML files: a data package, listed so setuptools ships it.
    packages=["cetnet_kernels", "cetnet_kernels.triton", "cetnet.configs"]
    + find_packages("python"),
    package_dir={"cetnet": "python/cetnet"},
    package_data={"cetnet.configs": ["*.yaml"], "cetnet.search": ["default_space.yaml"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionPerISA.with_options(use_ninja=True)},
)
