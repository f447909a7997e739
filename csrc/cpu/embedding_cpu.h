// CPU kernels of the multi-table embedding ops (schemas and contracts in csrc/registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace cetnet::cpu {

std::vector<at::Tensor> multi_embedding(const at::Tensor& weight, at::TensorList ids,
                                        at::TensorList offsets,
                                        at::TensorList per_sample_weights,
                                        at::IntArrayRef modes, at::IntArrayRef dims,
                                        at::IntArrayRef vocab,
                                        std::optional<int64_t> padding_idx,
                                        const std::string& feature_names);

std::vector<at::Tensor> multi_embedding_fused(
    const at::Tensor& weight, const at::Tensor& state, const at::Tensor& placeholder,
    at::TensorList ids, at::TensorList offsets, at::TensorList per_sample_weights,
    at::IntArrayRef modes, at::IntArrayRef dims, at::IntArrayRef vocab,
    std::optional<int64_t> padding_idx, const std::string& feature_names, int64_t optimizer,
    double lr, double eps, double weight_decay);

at::Tensor multi_embedding_backward(at::TensorList grads, const at::Tensor& weight,
                                    at::TensorList ids, at::TensorList offsets,
                                    at::TensorList per_sample_weights, at::IntArrayRef modes,
                                    at::IntArrayRef dims, at::IntArrayRef vocab,
                                    std::optional<int64_t> padding_idx);

void multi_embedding_update(at::TensorList grads, const at::Tensor& weight,
                            const at::Tensor& state, at::TensorList ids, at::TensorList offsets,
                            at::TensorList per_sample_weights, at::IntArrayRef modes,
                            at::IntArrayRef dims, at::IntArrayRef vocab,
                            std::optional<int64_t> padding_idx, int64_t optimizer, double lr,
                            double eps, double weight_decay);

}  // namespace cetnet::cpu
