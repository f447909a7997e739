// CUDA kernels of the cetnet fusion ops (registered in csrc/registration.cpp). Same contract as
// the CPU kernels (csrc/cpu/fusion_cpu.h), except that the temperature's validity (finite, > 0)
// and the labels' range ([0, 1]) are checked by the Python layer: a bad temperature gives NaN
// results here, never a host sync or a crash.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace cetnet::cuda {

std::tuple<at::Tensor, at::Tensor> confidence_fusion(const at::Tensor& logits,
                                                     const at::Tensor& temperature,
                                                     bool logit_space, bool detach_weights);

std::tuple<at::Tensor, at::Tensor> confidence_fusion_backward(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const std::optional<at::Tensor>& weights,
    const at::Tensor& temperature, bool logit_space, bool detach_weights,
    bool compute_temperature_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> collaborative_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad);

// The virtual architectures compiled into this build, as nvcc's __CUDA_ARCH_LIST__ gives them
// (e.g. {800, 900}); empty if that macro was not available.
std::vector<int64_t> compiled_archs();

// The CUDA runtime version the kernels were compiled against, e.g. "13.0".
std::string cuda_version();

}  // namespace cetnet::cuda
