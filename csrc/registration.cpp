// The one registration file: the schemas of every cetnet op and their CPU/CUDA kernels.
// Autograd is C++ (autograd.cpp: far cheaper per call than Python's register_autograd); fake
// (meta) kernels are registered in Python (cetnet_kernels/fusion.py).
//
// Contracts (acc = float64 for float64 logits, float32 otherwise; reduction 0 none/1 mean/2 sum):
//   confidence_fusion(logits [B,K], temperature [], logit_space, detach_weights) -> (prob [B], weights [B,K])   logits.dtype
//   confidence_fusion_backward(grad_prob [B]?, grad_weights [B,K]?, logits, temperature, ...)
//       -> (grad_logits [B,K] logits.dtype, grad_temperature [] acc: sum over rows of dL/dtau)
//   collaborative_loss(logits, labels [B], temperature, weights..., reduction, compute_grad, ...)
//       -> (loss acc: [B] for none, [] for mean/sum (mean of B = 0 is 0),
//           prob [B] logits.dtype,
//           grad_logits [B,K] logits.dtype: unreduced per-row d(row loss)/dz, or [0] if !compute_grad,
//           grad_temperature acc: [B] per row for none, [] row sum otherwise; [] zero if not asked)
// temperature is a 0-dim floating tensor on the logits' device; logits may have any strides.
#include <torch/library.h>

#include "autograd.h"
#include "cpu/fusion_cpu.h"
#ifdef CETNET_WITH_CUDA
#include "cuda/fusion_cuda.h"
#endif

TORCH_LIBRARY(cetnet, m) {
  // detach_weights does not change the forward values; it is in the schema so autograd sees it.
  m.def(
      "confidence_fusion(Tensor logits, Tensor temperature, bool logit_space, bool detach_weights) "
      "-> (Tensor, Tensor)");
  m.def(
      "confidence_fusion_backward(Tensor? grad_prob, Tensor? grad_weights, Tensor logits, "
      "Tensor temperature, bool logit_space, bool detach_weights, bool compute_temperature_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "collaborative_loss(Tensor logits, Tensor labels, Tensor temperature, float ensemble_weight, "
      "float member_weight, float distill_weight, float mutual_weight, bool logit_space, "
      "bool detach_weights, int reduction, bool compute_grad, bool compute_temperature_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cetnet, CPU, m) {
  m.impl("confidence_fusion", &cetnet::cpu::confidence_fusion);
  m.impl("confidence_fusion_backward", &cetnet::cpu::confidence_fusion_backward);
  m.impl("collaborative_loss", &cetnet::cpu::collaborative_loss);
}

TORCH_LIBRARY_IMPL(cetnet, Autograd, m) {
  m.impl("confidence_fusion", &cetnet::confidence_fusion_autograd);
  m.impl("collaborative_loss", &cetnet::collaborative_loss_autograd);
}

#ifdef CETNET_WITH_CUDA
TORCH_LIBRARY_IMPL(cetnet, CUDA, m) {
  m.impl("confidence_fusion", &cetnet::cuda::confidence_fusion);
  m.impl("confidence_fusion_backward", &cetnet::cuda::confidence_fusion_backward);
  m.impl("collaborative_loss", &cetnet::cuda::collaborative_loss);
}
#endif
