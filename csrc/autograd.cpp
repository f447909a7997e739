// Autograd of the fused ops, in C++ (registered for the Autograd key in registration.cpp).
//
// Python's torch.library.register_autograd costs far more per call than the kernels at CTR batch
// sizes, so the backward formulas live here. The forward of collaborative_loss already computed
// the per-row gradient; backward scales it by the upstream gradient, and adds the fusion VJP only
// when the returned prob also received a gradient (unused outputs are not materialized).
#include "kernels.h"
#include "codes.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <vector>

namespace cetnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

using FusionFn = ConfidenceFusionFn;
using FusionBackwardFn = ConfidenceFusionBackwardFn;
using LossFn = CollaborativeLossFn;

// A backward's gradients, first order only. Computed without a graph (the backward ops have no
// autograd); under create_graph they come out requiring grad through torch's DelayedError node,
// so differentiating them again raises, naming the op, instead of treating them as constants.
// The node also takes the op's differentiable inputs (``anchors``): its edges then lead to them,
// so a second backward restricted to those inputs (autograd.grad(penalty, params)) reaches it
// too. (cetnet_kernels.backends.first_order does the same for the Python-registered ops.)
variable_list first_order(variable_list grads, const char* op, const variable_list& anchors) {
  variable_list inputs;
  std::vector<size_t> where;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) {
      where.push_back(i);
      inputs.push_back(grads[i].detach().requires_grad_(true));
    }
  }
  if (inputs.empty()) return grads;
  for (const auto& a : anchors) {
    if (a.defined() && a.requires_grad()) inputs.push_back(a);
  }
  auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string(op) +
          " has no second derivative: its gradient cannot be differentiated again "
          "(create_graph=True)",
      static_cast<int64_t>(inputs.size()));
  variable_list marked = (*error)(std::move(inputs));
  for (size_t j = 0; j < where.size(); ++j) grads[where[j]] = marked[j];
  return grads;
}

// The backward of an op whose first two saved tensors are its differentiable inputs (logits,
// temperature): ``gradients`` without a graph, then first_order under create_graph.
variable_list first_order_backward(AutogradContext* ctx, const variable_list& grads,
                                   const char* op,
                                   variable_list (*gradients)(AutogradContext*,
                                                              const variable_list&)) {
  const bool create_graph = at::GradMode::is_enabled();
  variable_list out;
  {
    at::NoGradGuard no_graph;
    out = gradients(ctx, grads);
  }
  if (!create_graph) return out;
  const auto saved = ctx->get_saved_variables();
  return first_order(std::move(out), op, {saved[0], saved[1]});
}

c10::TypedOperatorHandle<FusionFn>& fusion_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cetnet::confidence_fusion", "")
                       .typed<FusionFn>();
  return op;
}

c10::TypedOperatorHandle<FusionBackwardFn>& fusion_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cetnet::confidence_fusion_backward", "")
                       .typed<FusionBackwardFn>();
  return op;
}

c10::TypedOperatorHandle<LossFn>& loss_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cetnet::collaborative_loss", "")
                       .typed<LossFn>();
  return op;
}

// Both Functions are traceable by compiled autograd (torch._dynamo.compiled_autograd): their
// backward reads only saved tensors and saved_data and calls registered ops, which have fake
// kernels. (Not traceable, dynamo would run them outside the graph: a graph break, an error
// under fullgraph.) Compiled autograd refuses mark_non_differentiable and mark_dirty, so neither
// is used here.
class ConfidenceFusionFunction : public torch::autograd::Function<ConfidenceFusionFunction> {
 public:
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const Tensor& logits,
                               const Tensor& temperature, bool logit_space, bool detach_weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [prob, weights] = fusion_op().call(logits, temperature, logit_space, detach_weights);
    // Backward reuses the weights on CPU, where recomputing them costs more than reading them;
    // not in 16-bit (their rounding would reach the gradient) nor on GPUs (memory-bound).
    const bool keep_w = logits.device().is_cpu() &&
                        (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble);
    ctx->save_for_backward({logits, temperature, keep_w ? weights : Tensor()});
    ctx->saved_data["logit_space"] = logit_space;
    ctx->saved_data["detach_weights"] = detach_weights;
    ctx->set_materialize_grads(false);
    return {prob, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return first_order_backward(ctx, grads, "cetnet::confidence_fusion", &gradients);
  }

 private:
  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor& temperature = saved[1];
    std::optional<Tensor> weights;
    if (saved[2].defined()) weights = saved[2];
    const bool detach = ctx->saved_data["detach_weights"].toBool();
    const bool need_z = ctx->needs_input_grad(0);
    const bool need_t = ctx->needs_input_grad(1) && !detach;
    std::optional<Tensor> g_prob, g_w;
    if (grads[0].defined()) g_prob = grads[0];
    if (grads[1].defined() && !detach) g_w = grads[1];  // constant weights pass no gradient
    Tensor gz, gt;
    if ((need_z || need_t) && (g_prob || g_w)) {
      std::tie(gz, gt) = fusion_backward_op().call(g_prob, g_w, logits, weights, temperature,
                                                   ctx->saved_data["logit_space"].toBool(), detach,
                                                   need_t);
    }
    if (need_t && !gt.defined()) gt = at::zeros({}, temperature.options());
    return {need_z ? gz : Tensor(), need_t ? gt.to(temperature.scalar_type()) : Tensor(),
            Tensor(), Tensor()};
  }
};

class CollaborativeLossFunction : public torch::autograd::Function<CollaborativeLossFunction> {
 public:
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& labels,
                               const Tensor& temperature, double ensemble_weight,
                               double member_weight, double distill_weight, double mutual_weight,
                               bool logit_space, bool detach_weights, int64_t reduction,
                               bool compute_grad, bool compute_temperature_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, prob, grad_logits, grad_t] = loss_op().call(
        logits, labels, temperature, ensemble_weight, member_weight, distill_weight,
        mutual_weight, logit_space, detach_weights, reduction, compute_grad,
        compute_temperature_grad);
    ctx->save_for_backward({logits, temperature, grad_logits, grad_t});
    ctx->saved_data["logit_space"] = logit_space;
    ctx->saved_data["detach_weights"] = detach_weights;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["compute_grad"] = compute_grad;
    // grad_logits and grad_t are differentiable outputs here (compiled autograd refuses
    // mark_non_differentiable); collaborative_loss_autograd returns them detached, so no
    // gradient ever reaches them.
    ctx->set_materialize_grads(false);
    return {loss, prob, grad_logits, grad_t};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return first_order_backward(ctx, grads, "cetnet::collaborative_loss", &gradients);
  }

 private:
  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor& temperature = saved[1];
    const Tensor& grad_logits = saved[2];
    const Tensor& grad_t = saved[3];
    const bool detach = ctx->saved_data["detach_weights"].toBool();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_z = ctx->needs_input_grad(0);
    // detached weights: the temperature reaches nothing differentiable: no gradient (as
    // autograd gives the reference), not a zero
    const bool need_t = ctx->needs_input_grad(2) && !detach;
    const Tensor& g_loss = grads[0];
    const Tensor& g_prob = grads[1];
    Tensor gz, gt;
    if ((need_z || need_t) && g_loss.defined()) {
      TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                  "collaborative_loss was called with compute_grad=False; its gradient was not "
                  "computed in the forward pass");
      if (reduction == kReduceNone) {
        if (need_z) gz = grad_logits * g_loss.unsqueeze(1);
        if (need_t && grad_t.dim() == 1) gt = (grad_t * g_loss).sum();
      } else {
        const int64_t B = logits.size(0);
        const Tensor scale =
            (reduction == kReduceMean && B > 0) ? g_loss * (1.0 / B) : g_loss;
        if (need_z) gz = grad_logits * scale;  // low-precision * fp32 0-dim: computed in fp32
        if (need_t) gt = grad_t * scale;
      }
      if (gz.defined()) gz = gz.to(logits.scalar_type());
    }
    if (g_prob.defined() && (need_z || need_t)) {
      auto [gz2, gt2] = fusion_backward_op().call(g_prob, std::nullopt, logits, std::nullopt,
                                                  temperature,
                                                  ctx->saved_data["logit_space"].toBool(), detach,
                                                  need_t);
      gz = gz.defined() ? gz + gz2 : gz2;
      gt = gt.defined() ? gt + gt2 : gt2;
    }
    if (need_t && !gt.defined()) gt = at::zeros({}, temperature.options());
    return {need_z ? gz : Tensor(),
            Tensor(),
            need_t ? gt.to(temperature.scalar_type()) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

}  // namespace

std::tuple<Tensor, Tensor> confidence_fusion_autograd(const Tensor& logits,
                                                      const Tensor& temperature, bool logit_space,
                                                      bool detach_weights) {
  auto out = ConfidenceFusionFunction::apply(logits, temperature, logit_space, detach_weights);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> collaborative_loss_autograd(
    const Tensor& logits, const Tensor& labels, const Tensor& temperature, double ensemble_weight,
    double member_weight, double distill_weight, double mutual_weight, bool logit_space,
    bool detach_weights, int64_t reduction, bool compute_grad, bool compute_temperature_grad) {
  auto out = CollaborativeLossFunction::apply(
      logits, labels, temperature, ensemble_weight, member_weight, distill_weight, mutual_weight,
      logit_space, detach_weights, reduction, compute_grad, compute_temperature_grad);
  return {out[0], out[1], out[2].detach(), out[3].detach()};
}

}  // namespace cetnet
