// What this build of csrc/ contains, for cetnet_kernels.build_info() and the C++ tests.
#pragma once

#include <string>

namespace cetnet {

inline bool with_cuda() {
#ifdef CETNET_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace cetnet
