// The Python extension module cetnet_kernels._C. Importing it runs the static op registrations
// (registration.cpp); build_info() says what was compiled. Not part of the libtorch (CMake) build.
#include <torch/extension.h>
#include <torch/version.h>

#include "build_info.h"
#include "codes.h"

#ifdef CETNET_WITH_CUDA
#include "cuda/fusion_cuda.h"
#endif

namespace {

bool cpu_supports_build() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#endif
  return true;
}

template <size_t N>
pybind11::dict code_dict(const cetnet::CodeName (&names)[N]) {
  pybind11::dict d;
  for (const auto& c : names) d[c.name] = c.value;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cetnet compiled kernels (CPU C++, optional CUDA)";
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["cpu"] = true;
        info["cpu_capability"] = cetnet::cpu_capability();
        info["cpu_supported"] = cpu_supports_build();
        info["cuda"] = cetnet::with_cuda();
#ifdef CETNET_WITH_CUDA
        info["cuda_archs"] = cetnet::cuda::compiled_archs();
        info["cuda_version"] = cetnet::cuda::cuda_version();
#else
        info["cuda_archs"] = pybind11::list();
        info["cuda_version"] = pybind11::none();
#endif
        info["torch_version"] = TORCH_VERSION;
        return info;
      },
      "Which backends and CPU vector ISA this build of cetnet_kernels._C contains.");
  m.def(
      "codes",
      [] {
        pybind11::dict codes;
        codes["InputMode"] = code_dict(cetnet::kInputModeNames);
        codes["Optimizer"] = code_dict(cetnet::kOptimizerNames);
        codes["Reduction"] = code_dict(cetnet::kReductionNames);
        return codes;
      },
      "The integer codes of the op schemas (csrc/codes.h), by the member names of "
      "cetnet_kernels.codes' IntEnums.");
}
