// CPU kernels of the cetnet fusion ops (registered in csrc/registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cetnet::cpu {

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

}  // namespace cetnet::cpu
