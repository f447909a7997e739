// The CPU kernels as the op registration sees them: cetnet::cpu::<op> calls the kernel build
// (one per vector ISA, csrc/isa.h) chosen at load time. Choice: CETNET_CPU_CAPABILITY
// (default | avx2 | avx512) if set, else the widest build this CPU runs; set_capability()
// switches at run time (tests, benchmarks).
#pragma once

#include "kernels.h"

#include <string>
#include <utility>
#include <vector>

namespace cetnet::cpu {

struct KernelTable {
  ConfidenceFusionFn* confidence_fusion;
  ConfidenceFusionBackwardFn* confidence_fusion_backward;
  CollaborativeLossFn* collaborative_loss;
  KdefLossFn* kdef_loss;
  MultiEmbeddingFn* multi_embedding;
  MultiEmbeddingBackwardFn* multi_embedding_backward;
  MultiEmbeddingUpdateFn* multi_embedding_update;
};

// The chosen build's kernels. The first call makes the choice; a CETNET_CPU_CAPABILITY this
// build cannot honour is a ValueError naming it (from the first op call, or from import of the
// Python extension, which asks at once).
const KernelTable& active_kernels();
// Name of the chosen build: "default", "avx2" or "avx512".
std::string capability();
// The builds compiled into this library, and those of them this CPU can run, narrowest first.
std::vector<std::string> compiled_capabilities();
std::vector<std::string> runnable_capabilities();
// Switch to a build by name; ValueError if it is not compiled in or this CPU cannot run it.
void set_capability(const std::string& name);

namespace detail {
template <auto Slot>
struct Forward;
template <typename R, typename... A, R (*KernelTable::*Slot)(A...)>
struct Forward<Slot> {
  static R call(A... a) { return (active_kernels().*Slot)(std::forward<A>(a)...); }
};
}  // namespace detail

// Constant pointers with the kernels' signatures, usable wherever a kernel function is
// (registration.cpp's CETNET_REGISTER_BACKEND, template arguments).
#define CETNET_CPU_FORWARD(op) \
  inline constexpr auto op = &detail::Forward<&KernelTable::op>::call;
CETNET_CPU_FORWARD(confidence_fusion)
CETNET_CPU_FORWARD(confidence_fusion_backward)
CETNET_CPU_FORWARD(collaborative_loss)
CETNET_CPU_FORWARD(kdef_loss)
CETNET_CPU_FORWARD(multi_embedding)
CETNET_CPU_FORWARD(multi_embedding_backward)
CETNET_CPU_FORWARD(multi_embedding_update)
#undef CETNET_CPU_FORWARD

}  // namespace cetnet::cpu
