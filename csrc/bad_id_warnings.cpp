// bounds_check='warn' warns about a feature's out-of-range ids once per process: every lookup's
// message differs (the id, row and count), so Python's warning filter would let each through,
// one per training step. One registry for every CPU kernel build (each vector ISA compiles
// embedding_args.h in a namespace of its own) and the CUDA kernels; the Python backends use it
// too when the extension is loaded (cetnet_kernels/embedding_args.py).
#include <mutex>
#include <set>
#include <string>

namespace cetnet {
namespace {

std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}

std::set<std::string>& warned_features() {
  static std::set<std::string> names;
  return names;
}

}  // namespace

bool bad_id_warned(const std::string& feature) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return warned_features().count(feature) > 0;
}

bool first_bad_id_warning(const std::string& feature) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return warned_features().insert(feature).second;
}

void reset_bad_id_warnings() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  warned_features().clear();
}

}  // namespace cetnet
