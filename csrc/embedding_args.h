// Argument checks of the multi-table embedding ops, shared by the CPU and CUDA kernels: all that
// does not depend on where the op runs. The id and offsets *values* are checked by each backend
// (CPU: on the host before the pass; CUDA: by the kernels, raised after the launch).
#pragma once

#include "isa.h"

#include "codes.h"
#include "embedding_layout.h"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

namespace cetnet {

// bounds_check='warn' warns once per process and feature name (bad_id_warnings.cpp, outside
// the ISA namespaces: one registry). first_bad_id_warning: true for the first call with
// `feature` since the start or the last reset_bad_id_warnings(); bad_id_warned: whether it
// has been (a lookup reports its first bad id among the features not warned about yet).
bool first_bad_id_warning(const std::string& feature);
bool bad_id_warned(const std::string& feature);
void reset_bad_id_warnings();

inline namespace CETNET_ISA_NS {  // isa.h

// The validated shape of one call: the table layout (embedding_layout.h) plus B rows, the
// feature names and input modes.
struct EmbeddingArgs : TableLayout {
  int64_t B = -1;
  std::vector<std::string> names;
  std::vector<int64_t> mode;
  std::optional<int64_t> padding_idx;
  int64_t bounds_check = kBoundsError;  // codes.h: raise for a bad id, warn, or neither

  // Every op checks the ids (and offsets) and raises: kBoundsError.
  bool raises_on_bad_ids() const { return bounds_check == kBoundsError; }
  // The lookup checks them: kBoundsError raises, kBoundsWarn warns. With kBoundsWarn, backward
  // and the fused update treat a bad id as padding without checking again (as kBoundsOff).
  bool lookup_checks_ids() const { return bounds_check != kBoundsOff; }
  const std::string& name(int64_t f) const { return names[f]; }
  // Whether a bad id of feature f is left out of the report: with kBoundsWarn, once the
  // feature has been warned about (its ids are still counted and read as padding).
  bool report_skips(int64_t f) const {
    return bounds_check == kBoundsWarn && bad_id_warned(names[f]);
  }
};

// The first out-of-range id of a call (feature f, batch row b, position pos; `count` bad ids in
// all): IndexError, or with kBoundsWarn a warning (the ids were read as padding), the first
// time feature f has one in this process (first_bad_id_warning). One message for the CPU and
// CUDA kernels (the Triton and reference backends write the same in Python).
inline void report_bad_id(const EmbeddingArgs& A, const char* op, int64_t f, int64_t id,
                          int64_t b, int64_t pos, int64_t count) {
  if (A.bounds_check == kBoundsWarn && !first_bad_id_warning(A.name(f))) return;
  std::ostringstream msg;
  msg << op << ": feature '" << A.name(f) << "': id " << id
      << " is out of range for its vocabulary of size " << A.vocab[f] << " (valid ids: 0 .. "
      << A.vocab[f] - 1;
  if (A.padding_idx.has_value()) msg << ", or padding_idx = " << *A.padding_idx;
  msg << "; batch row " << b << ", position " << pos << ")";
  if (A.bounds_check == kBoundsWarn) {
    TORCH_WARN(msg.str(), "; bounds_check='warn': ", count, count == 1 ? " id" : " ids",
               " out of range in this lookup, read as padding (zero vectors, no gradient or "
               "update). Warned once per feature: later out-of-range ids of '", A.name(f),
               "' are read as padding without a warning (cetnet_kernels."
               "reset_bad_id_warnings() re-arms it)");
    return;
  }
  TORCH_CHECK_INDEX(false, msg.str());
}

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
    std::optional<int64_t> padding_idx, int64_t bounds_check, const std::string& feature_names,
    at::DeviceType device_type, const char* op) {
  EmbeddingArgs A;
  A.names = split_names(feature_names, static_cast<int64_t>(vocab.size()));
  A.set_tables(dims, vocab, A.names, op);
  TORCH_CHECK_VALUE(static_cast<int64_t>(ids.size()) == A.F &&
                        static_cast<int64_t>(offsets.size()) == A.F &&
                        static_cast<int64_t>(psw.size()) == A.F &&
                        static_cast<int64_t>(modes.size()) == A.F,
                    op, ": ids, offsets, per_sample_weights and modes need one entry per "
                    "feature (", A.F, "), got ", ids.size(), ", ", offsets.size(), ", ",
                    psw.size(), ", ", modes.size());
  A.mode.assign(modes.begin(), modes.end());
  A.padding_idx = padding_idx;
  TORCH_CHECK_VALUE(bounds_check == kBoundsError || bounds_check == kBoundsOff ||
                        bounds_check == kBoundsWarn,
                    op, ": bounds_check must be 0 (error), 1 (off) or 2 (warn), got ",
                    bounds_check);
  A.bounds_check = bounds_check;
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op,
                   ": weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.numel() == A.weight_numel, op,
                    ": weight must be 1-D with ", A.weight_numel, " elements, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(weight.device().type() == device_type, op, ": weight must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", weight.device());
  const at::Device device = weight.device();

  std::vector<int64_t> ncols(A.F);
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
      ncols[f] = ids[f].dim() == 2 ? ids[f].size(1) : 1;
    } else {
      TORCH_CHECK_VALUE(ids[f].dim() == 1, op, ": feature '", nm,
                        "': bag values must be 1-D, got shape ", ids[f].sizes());
      check_int_tensor(offsets[f], "offsets", nm, device, op);
      TORCH_CHECK_VALUE(offsets[f].dim() == 1 && offsets[f].numel() >= 1, op, ": feature '",
                        nm, "': offsets must be 1-D of length B + 1, got shape ",
                        offsets[f].sizes());
      Bf = offsets[f].numel() - 1;
      ncols[f] = 1;
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
  }
  A.set_columns(std::move(ncols), op);
  return A;
}

// The M forward outputs [B, N, D_m], in the weight's opmath dtype (float32 for 16-bit weights).
inline std::vector<at::Tensor> embedding_outputs(const EmbeddingArgs& A, const at::Tensor& weight) {
  const auto acc_dtype = at::toOpMathType(weight.scalar_type());
  std::vector<at::Tensor> outs;
  outs.reserve(A.M);
  for (int64_t m = 0; m < A.M; ++m)
    outs.push_back(at::empty({A.B, A.N, A.dims[m]}, weight.options().dtype(acc_dtype)));
  return outs;
}

// The backward ops' output gradients, one per member, checked against the call's shape and
// brought to the weight's opmath dtype, contiguous; an absent or empty one comes back undefined
// (a zero gradient).
inline std::vector<at::Tensor> embedding_grads(const EmbeddingArgs& A, at::TensorList grads,
                                               const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == A.M, op, ": expected ", A.M,
                    " gradients (one per member), got ", grads.size());
  const auto acc_dtype = at::toOpMathType(weight.scalar_type());
  std::vector<at::Tensor> g(A.M);
  for (int64_t m = 0; m < A.M; ++m) {
    if (!grads[m].defined() || grads[m].numel() == 0) continue;
    TORCH_CHECK_VALUE(grads[m].dim() == 3 && grads[m].size(0) == A.B &&
                          grads[m].size(1) == A.N && grads[m].size(2) == A.dims[m],
                      op, ": grads[", m, "] must have shape [", A.B, ", ", A.N, ", ",
                      A.dims[m], "], got ", grads[m].sizes());
    TORCH_CHECK(grads[m].device() == weight.device(), op, ": grads[", m, "] must be on ",
                weight.device());
    g[m] = grads[m].to(acc_dtype).contiguous();
  }
  return g;
}

// multi_embedding_update's optimizer code and, for row-wise Adagrad, its state: one opmath
// value per table row, on the weight's device.
inline void check_update_args(const EmbeddingArgs& A, int64_t optimizer, const at::Tensor& state,
                              const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(optimizer == kSGD || optimizer == kRowwiseAdagrad, op,
                    ": optimizer must be 1 (sgd) or 2 (rowwise_adagrad), got ", optimizer);
  if (optimizer != kRowwiseAdagrad) return;
  const auto acc_dtype = at::toOpMathType(weight.scalar_type());
  TORCH_CHECK_VALUE(state.dim() == 1 && state.numel() == A.state_rows &&
                        state.is_contiguous() && state.scalar_type() == acc_dtype,
                    op, ": state must be a contiguous 1-D ", acc_dtype, " tensor of ",
                    A.state_rows, " elements (one per table row), got ", state.scalar_type(),
                    " ", state.sizes());
  if (weight.is_cpu()) {  // the CPU op's message names the device type
    TORCH_CHECK(state.device().is_cpu(), op, ": state must be a CPU tensor");
  } else {
    TORCH_CHECK(state.device() == weight.device(), op, ": state must be on ", weight.device());
  }
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet
