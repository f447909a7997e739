// The one registration file: the schemas of every cetnet op and their CPU/CUDA kernels.
// Autograd is C++ (autograd.cpp: far cheaper per call than Python's register_autograd); fake
// (meta) kernels are registered in Python (cetnet_kernels/fusion.py).
//
// Contracts (acc = float64 for float64 logits, float32 otherwise; reduction 0 none/1 mean/2 sum;
// the integer codes are defined in csrc/codes.h, the C++ signatures in csrc/kernels.h):
//   confidence_fusion(logits [B,K], temperature [], logit_space, detach_weights) -> (prob [B], weights [B,K])   logits.dtype
//   confidence_fusion_backward(grad_prob [B]?, grad_weights [B,K]?, logits, weights [B,K]?,
//                              temperature, ...)   weights: the forward's (used on CPU to skip
//                              recomputing them; checked and ignored on CUDA)
//       -> (grad_logits [B,K] logits.dtype, grad_temperature [] acc: sum over rows of dL/dtau)
//   collaborative_loss(logits, labels [B], temperature, weights..., reduction, compute_grad, ...)
//       -> (loss acc: [B] for none, [] for mean/sum (mean of B = 0 is 0),
//           prob [B] logits.dtype,
//           grad_logits [B,K] logits.dtype: unreduced per-row d(row loss)/dz, or [0] if !compute_grad,
//           grad_temperature acc: [B] per row for none, [] row sum otherwise; [] zero if not asked)
//   kdef_loss(logits [B,K], labels [B], compute_grad)
//       -> (loss acc [] (0 for B = 0), teacher_prob [B] logits.dtype = sigmoid(mean_k z),
//           grad_logits [B,K] logits.dtype: dloss/dz, or [0] if !compute_grad)
//       (autograd and fake kernels in Python: cetnet_kernels/kdef.py)
// temperature is a 0-dim floating tensor on the logits' device; logits may have any strides.
//
// Multi-table embedding (cetnet_kernels/embedding.py; cetnet_kernels/embedding_ops.py registers
// their fake kernels and autograd in Python): M members x F features, one flat weight
// holding the T = M*F tables member-major, table (m, f) = row-major [vocab[f], dims[m]].
//   multi_embedding(weight [W], ids[F], offsets[F], per_sample_weights[F], modes[F], dims[M],
//                   vocab[F], padding_idx?, bounds_check, feature_names) -> M outputs [B, N, D_m]
//       (float32 for 16-bit weights, else weight.dtype). modes[f]: 0 = ids [B] (1 column) or
//       [B, T] (T columns); 1/2/3 = bag sum/mean/weighted sum of ids[f] (values, 1-D) split by
//       offsets[f] [B+1]; per_sample_weights[f] (float32, mode 3 only, else ignored). Unused
//       offsets/weights entries are empty tensors. feature_names: the F names joined by '\n'
//       (error messages only). Ids == padding_idx give zeros; other ids outside [0, vocab[f])
//       are never read: bounds_check 0 (codes.h) raises IndexError after the pass, 1 (off)
//       treats them as padding (zeros, no gradient), with no host synchronization on CUDA,
//       2 (warn) treats them as padding and warns (the lookup only; offsets still checked).
//   multi_embedding_fused(weight, state, placeholder, ..., optimizer, lr, eps, weight_decay)
//       the same forward; its autograd applies multi_embedding_update (placeholder: a tensor
//       that requires grad, so autograd runs although weight does not).
//   multi_embedding_backward(grads[M], weight, ids..., padding_idx?, bounds_check) -> grad [W]
//       (dense, weight.dtype; empty grads[m] = zero gradient).
//   multi_embedding_update(grads[M], weight!, state!, ..., optimizer 1 = sgd / 2 =
//       rowwise_adagrad, lr, eps, weight_decay) -> (): in-place, deterministic sparse update of
//       the rows the batch touched; state: one opmath-dtype value per table row (adagrad).
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "kernels.h"

TORCH_LIBRARY(cetnet, m) {
  // detach_weights does not change the forward values; it is in the schema so autograd sees it.
  m.def(
      "confidence_fusion(Tensor logits, Tensor temperature, bool logit_space, bool detach_weights) "
      "-> (Tensor, Tensor)");
  m.def(
      "confidence_fusion_backward(Tensor? grad_prob, Tensor? grad_weights, Tensor logits, "
      "Tensor? weights, Tensor temperature, bool logit_space, bool detach_weights, "
      "bool compute_temperature_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "collaborative_loss(Tensor logits, Tensor labels, Tensor temperature, float ensemble_weight, "
      "float member_weight, float distill_weight, float mutual_weight, bool logit_space, "
      "bool detach_weights, int reduction, bool compute_grad, bool compute_temperature_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kdef_loss(Tensor logits, Tensor labels, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "multi_embedding(Tensor weight, Tensor[] ids, Tensor[] offsets, "
      "Tensor[] per_sample_weights, int[] modes, int[] dims, int[] vocab, int? padding_idx, "
      "int bounds_check, str feature_names) -> Tensor[]");
  m.def(
      "multi_embedding_fused(Tensor weight, Tensor state, Tensor placeholder, Tensor[] ids, "
      "Tensor[] offsets, Tensor[] per_sample_weights, int[] modes, int[] dims, int[] vocab, "
      "int? padding_idx, int bounds_check, str feature_names, int optimizer, float lr, float eps, "
      "float weight_decay) -> Tensor[]");
  m.def(
      "multi_embedding_backward(Tensor[] grads, Tensor weight, Tensor[] ids, Tensor[] offsets, "
      "Tensor[] per_sample_weights, int[] modes, int[] dims, int[] vocab, int? padding_idx, "
      "int bounds_check) -> Tensor");
  m.def(
      "multi_embedding_update(Tensor[] grads, Tensor(a!) weight, Tensor(b!) state, "
      "Tensor[] ids, Tensor[] offsets, Tensor[] per_sample_weights, int[] modes, int[] dims, "
      "int[] vocab, int? padding_idx, int bounds_check, int optimizer, float lr, float eps, "
      "float weight_decay) -> ()");
}

// Every op's kernel of backend `ns` (cetnet::cpu: the forwarders of cpu/dispatch.h to the
// kernel build chosen for this CPU; cetnet::cuda: declared in kernels.h); multi_embedding_fused's
// forward is the backend's plain lookup.
#define CETNET_REGISTER_BACKEND(m, ns)                                         \
  m.impl("confidence_fusion", cetnet::ns::confidence_fusion);                   \
  m.impl("confidence_fusion_backward", cetnet::ns::confidence_fusion_backward); \
  m.impl("collaborative_loss", cetnet::ns::collaborative_loss);                 \
  m.impl("kdef_loss", cetnet::ns::kdef_loss);                                   \
  m.impl("multi_embedding", cetnet::ns::multi_embedding);                       \
  m.impl("multi_embedding_fused",                                               \
         &cetnet::multi_embedding_fused<cetnet::ns::multi_embedding>);          \
  m.impl("multi_embedding_backward", cetnet::ns::multi_embedding_backward);     \
  m.impl("multi_embedding_update", cetnet::ns::multi_embedding_update);

TORCH_LIBRARY_IMPL(cetnet, CPU, m) { CETNET_REGISTER_BACKEND(m, cpu) }

TORCH_LIBRARY_IMPL(cetnet, Autograd, m) {
  m.impl("confidence_fusion", &cetnet::confidence_fusion_autograd);
  m.impl("collaborative_loss", &cetnet::collaborative_loss_autograd);
}

#ifdef CETNET_WITH_CUDA
TORCH_LIBRARY_IMPL(cetnet, CUDA, m) { CETNET_REGISTER_BACKEND(m, cuda) }
#endif
