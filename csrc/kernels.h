// The C++ signature of every cetnet op (schemas and contracts in registration.cpp), written once:
// each backend's kernels (cetnet::cpu, cetnet::cuda) and the autograd kernels are declared as
// functions of these types, so the compiler holds every definition to the one signature.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace cetnet {

using ConfidenceFusionFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& logits,
    const at::Tensor& temperature, bool logit_space, bool detach_weights);
using ConfidenceFusionBackwardFn = std::tuple<at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const std::optional<at::Tensor>& weights,
    const at::Tensor& temperature, bool logit_space, bool detach_weights,
    bool compute_temperature_grad);
using CollaborativeLossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad);
// (loss [] acc, teacher_prob [B] logits.dtype, grad_logits [B, K] logits.dtype or [0]).
using KdefLossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& logits,
    const at::Tensor& labels, bool compute_grad);
using MultiEmbeddingFn = std::vector<at::Tensor>(const at::Tensor& weight, at::TensorList ids,
    at::TensorList offsets, at::TensorList per_sample_weights, at::IntArrayRef modes,
    at::IntArrayRef dims, at::IntArrayRef vocab, std::optional<int64_t> padding_idx,
    int64_t bounds_check, const std::string& feature_names);
using MultiEmbeddingBackwardFn = at::Tensor(at::TensorList grads, const at::Tensor& weight,
    at::TensorList ids, at::TensorList offsets, at::TensorList per_sample_weights,
    at::IntArrayRef modes, at::IntArrayRef dims, at::IntArrayRef vocab,
    std::optional<int64_t> padding_idx, int64_t bounds_check);
using MultiEmbeddingUpdateFn = void(at::TensorList grads, const at::Tensor& weight,
    const at::Tensor& state, at::TensorList ids, at::TensorList offsets,
    at::TensorList per_sample_weights, at::IntArrayRef modes, at::IntArrayRef dims,
    at::IntArrayRef vocab, std::optional<int64_t> padding_idx, int64_t bounds_check,
    int64_t optimizer, double lr, double eps, double weight_decay);

// Autograd-key kernels of the fused ops (autograd.cpp).
ConfidenceFusionFn confidence_fusion_autograd;
CollaborativeLossFn collaborative_loss_autograd;

// multi_embedding_fused on any backend: its forward is the backend's plain lookup; state, the
// placeholder and the optimizer settings are inputs only so that autograd hands them to the
// fused backward (multi_embedding_update).
template <MultiEmbeddingFn* Lookup>
std::vector<at::Tensor> multi_embedding_fused(
    const at::Tensor& weight, const at::Tensor& /*state*/, const at::Tensor& /*placeholder*/,
    at::TensorList ids, at::TensorList offsets, at::TensorList per_sample_weights,
    at::IntArrayRef modes, at::IntArrayRef dims, at::IntArrayRef vocab,
    std::optional<int64_t> padding_idx, int64_t bounds_check, const std::string& feature_names,
    int64_t /*optimizer*/, double /*lr*/, double /*eps*/, double /*weight_decay*/) {
  return Lookup(weight, ids, offsets, per_sample_weights, modes, dims, vocab, padding_idx,
                bounds_check, feature_names);
}

}  // namespace cetnet

// The kernels one backend provides, declared inside its namespace (cpu: csrc/cpu/*.cpp, cuda:
// csrc/cuda/*.cu).
#define CETNET_DECLARE_BACKEND_KERNELS                             \
  ::cetnet::ConfidenceFusionFn confidence_fusion;                  \
  ::cetnet::ConfidenceFusionBackwardFn confidence_fusion_backward; \
  ::cetnet::CollaborativeLossFn collaborative_loss;                \
  ::cetnet::KdefLossFn kdef_loss;                                  \
  ::cetnet::MultiEmbeddingFn multi_embedding;                      \
  ::cetnet::MultiEmbeddingBackwardFn multi_embedding_backward;     \
  ::cetnet::MultiEmbeddingUpdateFn multi_embedding_update;

// CPU: one build of the kernels per vector ISA (csrc/isa.h); cetnet::cpu::<op> (cpu/dispatch.h)
// calls the build chosen at load time.
namespace cetnet::cpu::base {
CETNET_DECLARE_BACKEND_KERNELS
}  // namespace cetnet::cpu::base
namespace cetnet::cpu::avx2 {
CETNET_DECLARE_BACKEND_KERNELS
}  // namespace cetnet::cpu::avx2
namespace cetnet::cpu::avx512 {
CETNET_DECLARE_BACKEND_KERNELS
}  // namespace cetnet::cpu::avx512

// CUDA: the same contract, except that the temperature's validity (finite, > 0) and the labels'
// range ([0, 1]) are checked by the Python layer: a bad temperature gives NaN results there,
// never a host sync or a crash. Declared in every build; defined only with CETNET_WITH_CUDA.
namespace cetnet::cuda {
CETNET_DECLARE_BACKEND_KERNELS

// The virtual architectures compiled into this build, as nvcc's __CUDA_ARCH_LIST__ gives them
// (e.g. {800, 900}); empty if that macro was not available.
std::vector<int64_t> compiled_archs();

// The CUDA runtime version the kernels were compiled against, e.g. "13.0".
std::string cuda_version();
}  // namespace cetnet::cuda
