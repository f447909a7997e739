// Autograd (Autograd dispatch key) kernels of the fused ops; see autograd.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cetnet {

std::tuple<at::Tensor, at::Tensor> confidence_fusion_autograd(const at::Tensor& logits,
                                                              const at::Tensor& temperature,
                                                              bool logit_space,
                                                              bool detach_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> collaborative_loss_autograd(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad);

}  // namespace cetnet
