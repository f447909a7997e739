// CPU kernel of the KDEF loss (registered in csrc/registration.cpp; math in cetnet_kernels/kdef.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cetnet::cpu {

// (loss [] acc, teacher_prob [B] logits.dtype, grad_logits [B, K] logits.dtype or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kdef_loss(const at::Tensor& logits,
                                                         const at::Tensor& labels,
                                                         bool compute_grad);

}  // namespace cetnet::cpu
