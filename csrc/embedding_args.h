// Argument checks of the multi-table embedding ops, shared by the CPU and CUDA kernels: all that
// does not depend on where the op runs. The id and offsets *values* are checked by each backend
// (CPU: on the host before the pass; CUDA: by the kernels, raised after the launch).
#pragma once

#include "codes.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace cetnet {

// The validated shape of one call: M members, F features, B rows, N output columns.
struct EmbeddingArgs {
  int64_t M = 0, F = 0, B = -1, N = 0;
  int64_t Vtot = 0;          // sum of the vocabulary sizes (rows of one member's tables)
  int64_t weight_numel = 0;  // sum over members of Vtot * D_m
  std::vector<std::string> names;
  std::vector<int64_t> dims, vocab, mode, ncols, col_start;
  std::optional<int64_t> padding_idx;

  const std::string& name(int64_t f) const { return names[f]; }
};

// Feature names travel joined by '\n' (for error messages); "#f" when they do not match F.
inline std::vector<std::string> split_names(const std::string& joined, int64_t F) {
  std::vector<std::string> out;
  std::stringstream ss(joined);
  std::string item;
  while (std::getline(ss, item, '\n')) out.push_back(item);
  if (static_cast<int64_t>(out.size()) != F) {
    out.clear();
    for (int64_t f = 0; f < F; ++f) out.push_back("#" + std::to_string(f));
  }
  return out;
}

// a + b and a * b of sizes computed from user values, refused when they pass int64: a wrapped
// product (vocab 2^62 x dim 4 = 16) would pass the weight-size check and index out of bounds.
inline int64_t checked_add(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::add_overflows(a, b, &out), op, ": ", what,
                    " overflows int64 (", a, " + ", b, ")");
  return out;
}
inline int64_t checked_mul(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(a, b, &out), op, ": ", what,
                    " overflows int64 (", a, " x ", b, ")");
  return out;
}

inline void check_feature_tensor(const at::Tensor& t, const char* what, const std::string& name,
                                 const at::Device& device, const char* op) {
  TORCH_CHECK(t.device() == device, op, ": feature '", name, "': ", what, " must be on ",
              device, " (where the weight is), got ", t.device());
}

inline void check_int_tensor(const at::Tensor& t, const char* what, const std::string& name,
                             const at::Device& device, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
                   ": feature '", name, "': ", what, " must be int32 or int64, got ",
                   t.scalar_type());
  check_feature_tensor(t, what, name, device, op);
}

// Checks every argument but the id/offsets values; `device_type` is the backend's (the weight
// must be there, every other tensor on the weight's device).
inline EmbeddingArgs check_embedding_args(
    const at::Tensor& weight, at::TensorList ids, at::TensorList offsets, at::TensorList psw,
    at::IntArrayRef modes, at::IntArrayRef dims, at::IntArrayRef vocab,
    std::optional<int64_t> padding_idx, const std::string& feature_names,
    at::DeviceType device_type, const char* op) {
  EmbeddingArgs A;
  A.M = static_cast<int64_t>(dims.size());
  A.F = static_cast<int64_t>(vocab.size());
  TORCH_CHECK_VALUE(A.M >= 1, op, ": dims must name at least one member");
  TORCH_CHECK_VALUE(A.F >= 1, op, ": vocab must name at least one feature");
  // Kernels count members and features in int.
  TORCH_CHECK_VALUE(A.M <= std::numeric_limits<int>::max() &&
                        A.F <= std::numeric_limits<int>::max(),
                    op, ": at most ", std::numeric_limits<int>::max(),
                    " members and features, got ", A.M, " and ", A.F);
  TORCH_CHECK_VALUE(static_cast<int64_t>(ids.size()) == A.F &&
                        static_cast<int64_t>(offsets.size()) == A.F &&
                        static_cast<int64_t>(psw.size()) == A.F &&
                        static_cast<int64_t>(modes.size()) == A.F,
                    op, ": ids, offsets, per_sample_weights and modes need one entry per "
                    "feature (", A.F, "), got ", ids.size(), ", ", offsets.size(), ", ",
                    psw.size(), ", ", modes.size());
  A.names = split_names(feature_names, A.F);
  A.dims.assign(dims.begin(), dims.end());
  A.vocab.assign(vocab.begin(), vocab.end());
  A.mode.assign(modes.begin(), modes.end());
  A.padding_idx = padding_idx;
  for (int64_t m = 0; m < A.M; ++m)
    TORCH_CHECK_VALUE(A.dims[m] >= 1, op, ": dims[", m, "] must be >= 1, got ", A.dims[m]);
  for (int64_t f = 0; f < A.F; ++f) {
    TORCH_CHECK_VALUE(A.vocab[f] >= 1, op, ": feature '", A.name(f),
                      "': vocabulary size must be >= 1, got ", A.vocab[f]);
    A.Vtot = checked_add(A.Vtot, A.vocab[f], "the total vocabulary size", op);
  }
  for (int64_t m = 0; m < A.M; ++m)
    A.weight_numel = checked_add(
        A.weight_numel, checked_mul(A.dims[m], A.Vtot, "vocabulary x dim", op),
        "the weight size (sum of vocabulary x dim over members)", op);
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op,
                   ": weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.numel() == A.weight_numel, op,
                    ": weight must be 1-D with ", A.weight_numel, " elements, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(weight.device().type() == device_type, op, ": weight must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", weight.device());
  const at::Device device = weight.device();

  A.ncols.resize(A.F);
  A.col_start.resize(A.F);
  for (int64_t f = 0; f < A.F; ++f) {
    const std::string& nm = A.name(f);
    const int64_t mode = A.mode[f];
    TORCH_CHECK_VALUE(mode >= kIds && mode <= kBagWeightedSum, op, ": feature '", nm,
                      "': unknown mode ", mode);
    check_int_tensor(ids[f], "ids", nm, device, op);
    int64_t Bf;
    if (!is_bag(mode)) {
      TORCH_CHECK_VALUE(ids[f].dim() == 1 || ids[f].dim() == 2, op, ": feature '", nm,
                        "': ids must be [B] or [B, T], got shape ", ids[f].sizes());
      Bf = ids[f].size(0);
      A.ncols[f] = ids[f].dim() == 2 ? ids[f].size(1) : 1;
    } else {
      TORCH_CHECK_VALUE(ids[f].dim() == 1, op, ": feature '", nm,
                        "': bag values must be 1-D, got shape ", ids[f].sizes());
      check_int_tensor(offsets[f], "offsets", nm, device, op);
      TORCH_CHECK_VALUE(offsets[f].dim() == 1 && offsets[f].numel() >= 1, op, ": feature '",
                        nm, "': offsets must be 1-D of length B + 1, got shape ",
                        offsets[f].sizes());
      Bf = offsets[f].numel() - 1;
      A.ncols[f] = 1;
      if (mode == kBagWeightedSum) {
        TORCH_CHECK_TYPE(psw[f].scalar_type() == at::kFloat, op, ": feature '", nm,
                         "': per_sample_weights must be float32, got ", psw[f].scalar_type());
        TORCH_CHECK_VALUE(psw[f].dim() == 1 && psw[f].numel() == ids[f].numel(), op,
                          ": feature '", nm, "': per_sample_weights must have shape [",
                          ids[f].numel(), "], got ", psw[f].sizes());
        check_feature_tensor(psw[f], "per_sample_weights", nm, device, op);
      }
    }
    if (A.B < 0) A.B = Bf;
    TORCH_CHECK_VALUE(Bf == A.B, op, ": feature '", nm, "' has batch size ", Bf,
                      " but feature '", A.name(0), "' has ", A.B);
    A.col_start[f] = A.N;
    A.N = checked_add(A.N, A.ncols[f], "the number of output columns", op);
  }
  return A;
}

}  // namespace cetnet
