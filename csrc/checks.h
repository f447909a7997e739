// Argument checks shared by the CPU and CUDA entry points. The Python layer gives friendlier
// messages first; these keep direct torch.ops.cetnet.* calls from ever reading out of bounds.
#pragma once

#include "isa.h"

#include "codes.h"

#include <ATen/ATen.h>

#include <iomanip>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace cetnet {
inline namespace CETNET_ISA_NS {  // isa.h

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [batch, members], got ",
                    logits.dim(), "-D");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits needs at least one member (K >= 1)");
  // The row math counts members in int: refuse what it cannot count rather than truncate K
  // (a stride-0 view can have K >= 2^31 without the memory to back it).
  TORCH_CHECK_VALUE(logits.size(1) <= std::numeric_limits<int>::max(), op,
                    ": at most ", std::numeric_limits<int>::max(), " members (K), got ",
                    logits.size(1));
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op,
                   ": logits must be floating point, got ", logits.scalar_type());
}

inline void check_temperature(const at::Tensor& temperature, const at::Tensor& logits,
                              const char* op) {
  TORCH_CHECK_VALUE(temperature.numel() == 1 && temperature.dim() == 0, op,
                    ": temperature must be a 0-dim tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(temperature.scalar_type()), op,
                   ": temperature must be floating point");
  TORCH_CHECK(temperature.device() == logits.device(), op,
              ": temperature must be on the device of logits (", logits.device(), "), got ",
              temperature.device());
}

inline void check_rows(const at::Tensor& t, const at::Tensor& logits, const char* name,
                       const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
                    " must have shape [", logits.size(0), "], got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point");
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device());
}

inline void check_like_logits(const at::Tensor& t, const at::Tensor& logits, const char* name,
                              const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == logits.sizes(), op, ": ", name, " must have shape ",
                    logits.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point");
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device());
}

// Checks the optional upstream gradients of confidence_fusion_backward and brings them to the
// logits' dtype; an absent one comes back undefined.
inline std::pair<at::Tensor, at::Tensor> fusion_upstream_grads(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const char* op) {
  at::Tensor gp, gw;
  if (grad_prob.has_value() && grad_prob->defined()) {
    check_rows(*grad_prob, logits, "grad_prob", op);
    gp = grad_prob->to(logits.scalar_type());
  }
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_like_logits(*grad_weights, logits, "grad_weights", op);
    gw = grad_weights->to(logits.scalar_type());
  }
  return {gp, gw};
}

// Checks the optional forward weights passed to confidence_fusion_backward; absent: undefined.
inline at::Tensor saved_weights(const std::optional<at::Tensor>& weights, const at::Tensor& logits,
                                const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  check_like_logits(*weights, logits, "weights", op);
  TORCH_CHECK_TYPE(weights->scalar_type() == logits.scalar_type(), op,
                   ": weights must have the logits' dtype ", logits.scalar_type(), ", got ",
                   weights->scalar_type());
  return *weights;
}

// Labels outside [0, 1] (or NaN) are an input error. The kernels look for the first bad one of
// each block of rows inside their pass (first_bad_label) and raise after it (raise_bad_label),
// printing every digit: 1.0000001 must not read "= 1".
template <typename T>
inline int64_t first_bad_label(const T* y, int64_t stride, int64_t lo, int64_t hi) {
  for (int64_t b = lo; b < hi; ++b) {
    const T v = y[b * stride];
    if (!(v >= T(0) && v <= T(1))) return b;
  }
  return -1;
}

inline void raise_bad_label(const char* op, const at::Tensor& labels, int64_t b) {
  TORCH_CHECK_VALUE(false, op, ": labels must lie in [0, 1]; labels[", b, "] = ",
                    std::setprecision(std::numeric_limits<double>::max_digits10),
                    labels[b].item<double>());
}

// The accumulation dtype: float64 for float64 inputs, float32 for the rest.
inline at::ScalarType acc_type_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK_VALUE(reduction >= kReduceNone && reduction <= kReduceSum, op,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The arguments of each fusion op, checked in the same order on every backend.
inline void check_fusion_args(const at::Tensor& logits, const at::Tensor& temperature,
                              const char* op) {
  check_logits(logits, op);
  check_temperature(temperature, logits, op);
}

// confidence_fusion_backward: (grad_prob, grad_weights, weights), each checked and brought to
// the logits' dtype, or undefined when absent.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_fusion_backward_args(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const std::optional<at::Tensor>& weights,
    const at::Tensor& temperature, const char* op) {
  check_fusion_args(logits, temperature, op);
  auto [gp, gw] = fusion_upstream_grads(grad_prob, grad_weights, logits, op);
  return {gp, gw, saved_weights(weights, logits, op)};
}

inline void check_loss_args(const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& temperature, int64_t reduction, const char* op) {
  check_logits(logits, op);
  check_rows(labels, logits, "labels", op);
  check_temperature(temperature, logits, op);
  check_reduction(reduction, op);
}

inline void check_kdef_args(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  check_logits(logits, op);
  check_rows(labels, logits, "labels", op);
}

// The grad_logits output of the loss ops: [B, K] in the logits' dtype, or [0] when the
// gradient is not asked for.
inline at::Tensor grad_logits_out(const at::Tensor& logits, bool compute_grad) {
  return compute_grad ? at::empty(logits.sizes(), logits.options())
                      : at::empty({0}, logits.options());
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet
