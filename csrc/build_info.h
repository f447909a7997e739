// What this build of csrc/ contains, for cetnet_kernels.build_info() and the C++ tests.
#pragma once

#include <string>

namespace cetnet {

// Compiled vector ISA of the CPU kernels ("avx512", "avx2" or "generic").
inline const char* cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

inline bool with_cuda() {
#ifdef CETNET_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace cetnet
