// Choice of the CPU kernel build (cpu/dispatch.h). Compiled once, for the default ISA; the
// build system defines CETNET_CPU_HAVE_AVX2 / CETNET_CPU_HAVE_AVX512 when it compiled those builds.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

namespace cetnet::cpu {
namespace {

#define CETNET_KERNEL_TABLE(ns)                                                          \
  KernelTable {                                                                          \
    &ns::confidence_fusion, &ns::confidence_fusion_backward, &ns::collaborative_loss,    \
        &ns::kdef_loss, &ns::multi_embedding, &ns::multi_embedding_backward,             \
        &ns::multi_embedding_update                                                      \
  }

struct Build {
  const char* name;
  bool (*runs_here)();
  KernelTable kernels;
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers.
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         cpu_has_avx2();
}
#else
[[maybe_unused]] bool cpu_has_avx2() { return false; }
[[maybe_unused]] bool cpu_has_avx512() { return false; }
#endif
bool always() { return true; }

// Narrowest first.
const Build kBuilds[] = {
    {"default", &always, CETNET_KERNEL_TABLE(base)},
#ifdef CETNET_CPU_HAVE_AVX2
    {"avx2", &cpu_has_avx2, CETNET_KERNEL_TABLE(avx2)},
#endif
#ifdef CETNET_CPU_HAVE_AVX512
    {"avx512", &cpu_has_avx512, CETNET_KERNEL_TABLE(avx512)},
#endif
};

std::string joined(const std::vector<std::string>& names) {
  std::ostringstream os;
  for (size_t i = 0; i < names.size(); ++i) os << (i ? ", " : "") << names[i];
  return os.str();
}

const Build& find(const std::string& name, const char* source) {
  for (const Build& b : kBuilds) {
    if (name != b.name) continue;
    TORCH_CHECK_VALUE(b.runs_here(), source, "=", name, ": this CPU cannot run the ", name,
                      " kernels (it runs: ", joined(runnable_capabilities()), ")");
    return b;
  }
  TORCH_CHECK_VALUE(false, source, "=", name, ": must be one of the CPU kernel builds compiled in: ",
                    joined(compiled_capabilities()),
                    " (default, avx2 and avx512 exist; a build with CETNET_CPU_ISA set may hold fewer)");
  return kBuilds[0];  // unreachable
}

std::atomic<const Build*> g_active{nullptr};
std::mutex g_choose;

const Build& choose() {
  const char* env = std::getenv("CETNET_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') return find(env, "CETNET_CPU_CAPABILITY");
  const Build* best = &kBuilds[0];
  for (const Build& b : kBuilds)
    if (b.runs_here()) best = &b;
  return *best;
}

const Build& active() {
  const Build* b = g_active.load(std::memory_order_acquire);
  if (b != nullptr) return *b;
  std::lock_guard<std::mutex> lock(g_choose);
  b = g_active.load(std::memory_order_relaxed);
  if (b == nullptr) {
    b = &choose();  // throws on a bad CETNET_CPU_CAPABILITY, leaving nothing chosen
    g_active.store(b, std::memory_order_release);
  }
  return *b;
}

}  // namespace

const KernelTable& active_kernels() { return active().kernels; }

std::string capability() { return active().name; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> names;
  for (const Build& b : kBuilds) names.emplace_back(b.name);
  return names;
}

std::vector<std::string> runnable_capabilities() {
  std::vector<std::string> names;
  for (const Build& b : kBuilds)
    if (b.runs_here()) names.emplace_back(b.name);
  return names;
}

void set_capability(const std::string& name) {
  const Build& b = find(name, "cpu capability");
  std::lock_guard<std::mutex> lock(g_choose);
  g_active.store(&b, std::memory_order_release);
}

}  // namespace cetnet::cpu
