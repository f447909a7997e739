// C++ test of the cetnet ops through the dispatcher (libtorch only, no Python): values against a
// straightforward double-precision computation written here (MATH.md §1-2), gradients against
// central finite differences of the ops' own outputs in float64, and input checks.
// Built and run by CMake (CMakeLists.txt): `ctest --output-on-failure`.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK_MSG(cond, ...)                                                       \
  do {                                                                             \
    ++g_checks;                                                                    \
    if (!(cond)) {                                                                 \
      ++g_failures;                                                                \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
      std::fprintf(stderr, __VA_ARGS__);                                           \
      std::fprintf(stderr, "\n");                                                  \
    }                                                                              \
  } while (0)

// |a - b| <= atol + rtol |b|
void check_close(double a, double b, double rtol, double atol, const std::string& what) {
  const bool ok = std::abs(a - b) <= atol + rtol * std::abs(b);
  CHECK_MSG(ok, "%s: got %.17g, expected %.17g (diff %.3g)", what.c_str(), a, b, std::abs(a - b));
}

void check_tensor_close(const at::Tensor& got, const std::vector<double>& want, double rtol,
                        double atol, const std::string& what) {
  const at::Tensor g = got.to(at::kDouble).contiguous().view(-1);
  CHECK_MSG(g.numel() == static_cast<int64_t>(want.size()), "%s: %lld elements, expected %zu",
            what.c_str(), static_cast<long long>(g.numel()), want.size());
  if (g.numel() != static_cast<int64_t>(want.size())) return;
  const double* p = g.const_data_ptr<double>();
  for (size_t i = 0; i < want.size(); ++i)
    check_close(p[i], want[i], rtol, atol, what + "[" + std::to_string(i) + "]");
}

std::vector<double> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous().view(-1);
  return std::vector<double>(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
}

// ---------------------------------------------------------------------------------------------
// The ops, through the dispatcher.
// ---------------------------------------------------------------------------------------------
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

T2 fusion(const at::Tensor& z, const at::Tensor& tau, bool logit_space, bool detach = false) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cetnet::confidence_fusion", "")
                             .typed<T2(const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(z, tau, logit_space, detach);
}

T2 fusion_backward(const std::optional<at::Tensor>& gp, const std::optional<at::Tensor>& gw,
                   const at::Tensor& z, const at::Tensor& tau, bool logit_space, bool detach,
                   bool compute_tau_grad, const std::optional<at::Tensor>& w = std::nullopt) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cetnet::confidence_fusion_backward", "")
          .typed<T2(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, bool,
                    bool, bool)>();
  return op.call(gp, gw, z, w, tau, logit_space, detach, compute_tau_grad);
}

struct Weights {
  double ensemble, member, distill, mutual;  // beta, alpha, gamma, delta
};

T4 loss_op(const at::Tensor& z, const at::Tensor& y, const at::Tensor& tau, const Weights& w,
           bool logit_space, bool detach, int64_t reduction, bool compute_grad = true,
           bool compute_tau_grad = true) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cetnet::collaborative_loss", "")
          .typed<T4(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                    double, double, bool, bool, int64_t, bool, bool)>();
  return op.call(z, y, tau, w.ensemble, w.member, w.distill, w.mutual, logit_space, detach,
                 reduction, compute_grad, compute_tau_grad);
}

// ---------------------------------------------------------------------------------------------
// Double-precision reference (MATH.md §1-2), written plainly. Used with moderate logits.
// ---------------------------------------------------------------------------------------------
double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)); }
double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

struct RefFusion {
  std::vector<double> w;
  double p;
};

RefFusion ref_fusion(const std::vector<double>& z, double tau, bool logit_space) {
  const size_t K = z.size();
  std::vector<double> c(K);
  for (size_t k = 0; k < K; ++k) c[k] = z[k] * sigmoid(z[k]) - softplus(z[k]);  // -H(p_k)
  double m = -INFINITY;
  for (double ck : c) m = std::max(m, ck / tau);
  double S = 0;
  for (double ck : c) S += std::exp(ck / tau - m);
  RefFusion r;
  r.w.resize(K);
  double p = 0, zf = 0;
  for (size_t k = 0; k < K; ++k) {
    r.w[k] = std::exp(c[k] / tau - m) / S;
    p += r.w[k] * sigmoid(z[k]);
    zf += r.w[k] * z[k];
  }
  r.p = logit_space ? sigmoid(zf) : p;
  return r;
}

// KL(q || sigmoid(z)) for q in (0, 1).
double kl(double q, double z) {
  return q * (std::log(q) + softplus(-z)) + (1 - q) * (std::log1p(-q) + softplus(z));
}

double ref_loss_row(const std::vector<double>& z, double y, double tau, const Weights& wt,
                    bool logit_space) {
  const size_t K = z.size();
  const double p = ref_fusion(z, tau, logit_space).p;
  double l = -wt.ensemble * (y * std::log(p) + (1 - y) * std::log1p(-p));
  for (size_t k = 0; k < K; ++k) {
    l += wt.member * (softplus(z[k]) - y * z[k]);
    l += wt.distill * kl(p, z[k]);
    if (K > 1) {
      double mutual = 0;
      for (size_t j = 0; j < K; ++j)
        if (j != k) mutual += kl(sigmoid(z[j]), z[k]);
      l += wt.mutual * mutual / static_cast<double>(K - 1);
    }
  }
  return l;
}

std::vector<double> row_of(const at::Tensor& z, int64_t b) { return to_vec(z[b]); }

at::Tensor f64(std::initializer_list<double> v) {
  return at::tensor(std::vector<double>(v), at::TensorOptions().dtype(at::kDouble));
}

at::Tensor scalar(double v, at::ScalarType dt = at::kDouble) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(dt));
}

// Central finite difference of f at x (a float64 tensor), entry by entry.
std::vector<double> finite_diff(const at::Tensor& x, const std::function<double(const at::Tensor&)>& f,
                                double h = 1e-5) {
  const at::Tensor flat = x.contiguous().view(-1);
  std::vector<double> g(flat.numel());
  for (int64_t i = 0; i < flat.numel(); ++i) {
    at::Tensor xp = flat.clone(), xm = flat.clone();
    xp[i] += h;
    xm[i] -= h;
    g[i] = (f(xp.view(x.sizes())) - f(xm.view(x.sizes()))) / (2 * h);
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------
void test_k1_is_bce_with_logits() {
  const at::Tensor z = f64({-30.0, -4.0, -0.5, 0.0, 0.3, 2.0, 7.5, 40.0}).view({8, 1});
  const at::Tensor y = f64({0.0, 1.0, 0.0, 1.0, 0.25, 0.0, 1.0, 0.0});
  const Weights w{0.7, 1.3, 0.4, 0.9};  // gamma/delta terms vanish for K = 1 (KL(p||p) = 0)
  const double ab = w.ensemble + w.member;
  std::vector<double> want(8), want_g(8);
  double sum = 0;
  for (int b = 0; b < 8; ++b) {
    const double zb = z[b][0].item<double>(), yb = y[b].item<double>();
    want[b] = ab * (softplus(zb) - yb * zb);
    want_g[b] = ab * (sigmoid(zb) - yb);
    sum += want[b];
  }
  for (bool ls : {false, true}) {
    const std::string tag = ls ? " logit" : " prob";
    const auto [loss, prob, gz, gt] = loss_op(z, y, scalar(0.8), w, ls, false, /*none*/ 0);
    check_tensor_close(loss, want, 1e-12, 1e-12, "K=1 loss" + tag);
    check_tensor_close(gz, want_g, 1e-12, 1e-12, "K=1 grad" + tag);
    check_tensor_close(prob, to_vec(at::sigmoid(z.view(-1))), 1e-14, 0, "K=1 prob" + tag);
    check_tensor_close(gt, std::vector<double>(8, 0.0), 0, 1e-12, "K=1 grad_tau" + tag);
    check_close(std::get<0>(loss_op(z, y, scalar(0.8), w, ls, false, 1)).item<double>(), sum / 8,
                1e-12, 0, "K=1 mean" + tag);
    check_close(std::get<0>(loss_op(z, y, scalar(0.8), w, ls, false, 2)).item<double>(), sum,
                1e-12, 0, "K=1 sum" + tag);
  }
  // float32 agrees with the float64 reference to float precision.
  const auto [loss32, p32, g32, t32] =
      loss_op(z.to(at::kFloat), y.to(at::kFloat), scalar(0.8, at::kFloat), w, false, false, 0);
  CHECK_MSG(loss32.scalar_type() == at::kFloat && p32.scalar_type() == at::kFloat, "dtypes");
  check_tensor_close(loss32, want, 1e-5, 1e-6, "K=1 loss f32");
  check_tensor_close(g32, want_g, 1e-5, 1e-6, "K=1 grad f32");
}

void test_fusion_hand_checked() {
  const at::Tensor tau = scalar(1.0);
  // Members z and -z are equally confident: w = (1/2, 1/2), p = (sigmoid(z) + sigmoid(-z))/2 = 1/2.
  // Equal members: w = 1/K, p = sigmoid(z).
  const at::Tensor z = f64({1.5, -1.5, 0.0, 2.0, 2.0, 2.0}).view({2, 3}).narrow(1, 0, 2);
  const auto [p, w] = fusion(z.narrow(0, 0, 1), tau, false);
  check_tensor_close(p, {0.5}, 0, 1e-15, "symmetric p");
  check_tensor_close(w, {0.5, 0.5}, 0, 1e-15, "symmetric w");
  const at::Tensor eq = f64({2.0, 2.0, 2.0}).view({1, 3});
  for (bool ls : {false, true}) {
    const auto [pe, we] = fusion(eq, scalar(0.3), ls);
    check_tensor_close(pe, {sigmoid(2.0)}, 1e-15, 0, "equal members p");
    check_tensor_close(we, {1.0 / 3, 1.0 / 3, 1.0 / 3}, 1e-15, 0, "equal members w");
  }
  // A confident member (z = 4) outweighs an uncertain one (z = 0): by hand,
  // c(4) = 4 sigmoid(4) - softplus(4) = -0.0900948..., c(0) = -ln 2,
  // w_0 = 1 / (1 + exp(c(0) - c(4))) = 0.6463543..., p = w_0 sigmoid(4) + w_1 / 2.
  const double c4 = 4 * sigmoid(4.0) - std::log1p(std::exp(4.0));
  check_close(c4, -0.0900947678, 0, 1e-10, "hand c(4)");
  const double w0 = 1.0 / (1.0 + std::exp(-std::log(2.0) - c4));
  check_close(w0, 0.6463543393, 0, 1e-10, "hand w_0");
  const auto [p2, w2] = fusion(f64({4.0, 0.0}).view({1, 2}), tau, false);
  check_tensor_close(w2, {w0, 1 - w0}, 1e-14, 0, "hand w");
  check_tensor_close(p2, {w0 * sigmoid(4.0) + (1 - w0) * 0.5}, 1e-14, 0, "hand p");
  const auto [pl, wl] = fusion(f64({4.0, 0.0}).view({1, 2}), tau, true);
  check_tensor_close(pl, {sigmoid(4 * w0)}, 1e-14, 0, "hand p (logit space)");
}

at::Tensor sample_logits(int64_t B, int64_t K, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({B, K}, gen, at::TensorOptions().dtype(at::kDouble)) * 2.5;
}

at::Tensor sample_labels(int64_t B, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor y = at::rand({B}, gen, at::TensorOptions().dtype(at::kDouble));
  y.narrow(0, 0, B / 2).round_();  // half hard 0/1 labels, half soft
  return y;
}

void test_against_reference() {
  const int64_t B = 6, K = 4;
  // Strided logits (a transposed view) must give the same values as contiguous ones.
  const at::Tensor zt = sample_logits(K, B, 1).t();
  const at::Tensor y = sample_labels(B, 2);
  const double tau = 0.6;
  const Weights w{1.0, 0.5, 0.3, 0.2};
  for (bool ls : {false, true}) {
    const std::string tag = ls ? " logit" : " prob";
    const auto [p, wts] = fusion(zt, scalar(tau), ls);
    const auto [loss, lp, gz, gt] = loss_op(zt, y, scalar(tau), w, ls, false, 0);
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<double> zb = row_of(zt, b);
      const RefFusion r = ref_fusion(zb, tau, ls);
      const std::string rt = tag + " row " + std::to_string(b);
      check_close(p[b].item<double>(), r.p, 1e-12, 1e-15, "fusion p" + rt);
      check_tensor_close(wts[b], r.w, 1e-12, 1e-15, "fusion w" + rt);
      check_close(lp[b].item<double>(), r.p, 1e-12, 1e-15, "loss prob" + rt);
      check_close(loss[b].item<double>(), ref_loss_row(zb, y[b].item<double>(), tau, w, ls), 1e-11,
                  1e-12, "loss" + rt);
    }
    const auto [pc, wc] = fusion(zt.contiguous(), scalar(tau), ls);
    CHECK_MSG(at::equal(pc, p) && at::equal(wc, wts), "strided vs contiguous fusion%s", tag.c_str());
    const auto [lc, lpc, gzc, gtc] = loss_op(zt.contiguous(), y, scalar(tau), w, ls, false, 0);
    CHECK_MSG(at::equal(lc, loss) && at::equal(gzc, gz), "strided vs contiguous loss%s", tag.c_str());
  }
}

// The alpha/beta terms are true derivatives: compare with finite differences of the op's loss.
// The gamma/delta targets are detached: compare with their closed forms (MATH.md §2).
void test_loss_gradients() {
  const int64_t B = 5, K = 3;
  const at::Tensor z = sample_logits(B, K, 3);
  const at::Tensor y = sample_labels(B, 4);
  const double tau = 0.7;
  const Weights ab{0.8, 0.6, 0.0, 0.0};
  for (bool ls : {false, true}) {
    const std::string tag = ls ? " logit" : " prob";
    const auto [loss, p, gz, gt] = loss_op(z, y, scalar(tau), ab, ls, false, /*sum*/ 2);
    // Per-row grads of the summed loss = d(sum)/dz.
    const auto fd = finite_diff(z, [&](const at::Tensor& zz) {
      return std::get<0>(loss_op(zz, y, scalar(tau), ab, ls, false, 2, false, false)).item<double>();
    });
    check_tensor_close(gz, fd, 1e-6, 1e-8, "loss grad vs FD" + tag);
    const auto fdt = finite_diff(scalar(tau), [&](const at::Tensor& t) {
      return std::get<0>(loss_op(z, y, t, ab, ls, false, 2, false, false)).item<double>();
    });
    check_tensor_close(gt, fdt, 1e-6, 1e-8, "loss grad_tau vs FD" + tag);
    // mean: the loss is divided by B, the per-row grads are not.
    const auto [lmean, pm, gzm, gtm] = loss_op(z, y, scalar(tau), ab, ls, false, 1);
    check_close(lmean.item<double>(), loss.item<double>() / B, 1e-14, 0, "mean = sum / B" + tag);
    CHECK_MSG(at::allclose(gzm, gz, 1e-14, 0), "mean grads are per-row (unreduced)%s", tag.c_str());
    // detach_weights: no temperature gradient.
    const auto [ld, pd, gzd, gtd] = loss_op(z, y, scalar(tau), ab, ls, true, 2);
    check_close(gtd.item<double>(), 0.0, 0, 0, "detached grad_tau" + tag);
    CHECK_MSG(at::allclose(ld, loss, 1e-14, 0), "detach_weights keeps the loss value%s", tag.c_str());
  }
  // gamma/delta: grad_j = gamma (p_j - p) + delta sum_{i != j} (p_j - p_i) / (K - 1).
  const Weights gd{0.0, 0.0, 0.45, 0.35};
  const auto [loss, p, gz, gt] = loss_op(z, y, scalar(tau), gd, false, false, 0);
  std::vector<double> want;
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<double> zb = row_of(z, b);
    const double pf = ref_fusion(zb, tau, false).p;
    for (int64_t j = 0; j < K; ++j) {
      double mut = 0;
      for (int64_t i = 0; i < K; ++i)
        if (i != j) mut += sigmoid(zb[j]) - sigmoid(zb[i]);
      want.push_back(gd.distill * (sigmoid(zb[j]) - pf) + gd.mutual * mut / (K - 1));
    }
  }
  check_tensor_close(gz, want, 1e-12, 1e-14, "distill/mutual grads");
  check_tensor_close(gt, std::vector<double>(B, 0.0), 0, 0, "distill/mutual grad_tau");
}

void test_fusion_backward() {
  const int64_t B = 4, K = 3;
  const at::Tensor z = sample_logits(B, K, 5);
  const at::Tensor gp = sample_logits(B, 1, 6).view({B});
  const at::Tensor gw = sample_logits(B, K, 7);
  const double tau = 0.9;
  for (bool ls : {false, true}) {
    const std::string tag = ls ? " logit" : " prob";
    // L = sum_b gp_b p_b + sum_{b,k} gw_bk w_bk
    auto L = [&](const at::Tensor& zz, const at::Tensor& t) {
      const auto [p, w] = fusion(zz, t, ls);
      return ((p * gp).sum() + (w * gw).sum()).item<double>();
    };
    const auto [gz, gt] = fusion_backward(gp, gw, z, scalar(tau), ls, false, true);
    check_tensor_close(gz, finite_diff(z, [&](const at::Tensor& zz) { return L(zz, scalar(tau)); }),
                       1e-6, 1e-8, "fusion grad vs FD" + tag);
    check_tensor_close(gt, finite_diff(scalar(tau), [&](const at::Tensor& t) { return L(z, t); }),
                       1e-6, 1e-8, "fusion grad_tau vs FD" + tag);
    // Without grad_weights / grad_prob.
    const auto [gz_p, gt_p] = fusion_backward(gp, std::nullopt, z, scalar(tau), ls, false, false);
    auto Lp = [&](const at::Tensor& zz) { return (std::get<0>(fusion(zz, scalar(tau), ls)) * gp).sum().item<double>(); };
    check_tensor_close(gz_p, finite_diff(z, Lp), 1e-6, 1e-8, "fusion grad (prob only) vs FD" + tag);
    check_close(gt_p.item<double>(), 0.0, 0, 0, "grad_tau not asked" + tag);
    const auto [gz_w, gt_w] = fusion_backward(std::nullopt, gw, z, scalar(tau), ls, false, true);
    auto Lw = [&](const at::Tensor& zz) { return (std::get<1>(fusion(zz, scalar(tau), ls)) * gw).sum().item<double>(); };
    check_tensor_close(gz_w, finite_diff(z, Lw), 1e-6, 1e-8, "fusion grad (weights only) vs FD" + tag);
    // From the forward's weights (the CPU fast path): the same gradients.
    const at::Tensor fw = std::get<1>(fusion(z, scalar(tau), ls));
    for (bool want_t : {false, true}) {
      const auto [gz_s, gt_s] = fusion_backward(gp, gw, z, scalar(tau), ls, false, want_t, fw);
      check_tensor_close(gz_s, to_vec(gz), 1e-13, 1e-15, "fusion grad from saved weights" + tag);
      check_close(gt_s.item<double>(), want_t ? gt.item<double>() : 0.0, 1e-13, 1e-15,
                  "fusion grad_tau from saved weights" + tag);
    }
  }
  // detach_weights, prob space: dp/dz_j = w_j p_j (1 - p_j).
  const auto [p, w] = fusion(z, scalar(tau), false);
  const auto [gz, gt] = fusion_backward(gp, std::nullopt, z, scalar(tau), false, true, true);
  const at::Tensor pk = at::sigmoid(z);
  check_tensor_close(gz, to_vec(gp.view({B, 1}) * w * pk * (1 - pk)), 1e-13, 1e-15, "detached grad");
  check_close(gt.item<double>(), 0.0, 0, 0, "detached grad_tau");
}

void test_shapes_and_empty() {
  const at::Tensor z = sample_logits(3, 2, 8).to(at::kFloat);
  const at::Tensor y = sample_labels(3, 9).to(at::kFloat);
  const at::Tensor tau = scalar(1.0, at::kFloat);
  const Weights w{1.0, 0.5, 0.3, 0.2};
  const auto [l0, p0, g0, t0] = loss_op(z, y, tau, w, false, false, 0, /*compute_grad=*/false);
  CHECK_MSG(l0.sizes() == at::IntArrayRef({3}) && g0.sizes() == at::IntArrayRef({0}) && t0.dim() == 0,
            "none/no grad shapes");
  const auto [l1, p1, g1, t1] = loss_op(z, y, tau, w, false, false, 0, true, true);
  CHECK_MSG(g1.sizes() == z.sizes() && g1.is_contiguous() && t1.sizes() == at::IntArrayRef({3}),
            "none/grad shapes");
  const auto [l2, p2, g2, t2] = loss_op(z, y, tau, w, false, false, 1, true, true);
  CHECK_MSG(l2.dim() == 0 && t2.dim() == 0 && p2.sizes() == at::IntArrayRef({3}), "mean shapes");
  // B = 0: the mean of nothing is 0.
  const at::Tensor ze = at::empty({0, 3}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor ye = at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t red : {1, 2}) {
    const auto [le, pe, ge, te] = loss_op(ze, ye, scalar(1.0), w, false, false, red);
    CHECK_MSG(le.dim() == 0 && le.item<double>() == 0.0 && pe.numel() == 0 && ge.sizes() == ze.sizes(),
              "empty batch, reduction %lld", static_cast<long long>(red));
  }
  const auto [pe, we] = fusion(ze, scalar(1.0), false);
  CHECK_MSG(pe.numel() == 0 && we.sizes() == ze.sizes(), "empty fusion");
}

template <typename E, typename F>
void expect_throws(F&& f, const char* what) {
  ++g_checks;
  try {
    f();
  } catch (const E&) {
    return;
  } catch (const std::exception& e) {
    ++g_failures;
    std::fprintf(stderr, "FAILED: %s threw the wrong exception type: %s\n", what, e.what());
    return;
  }
  ++g_failures;
  std::fprintf(stderr, "FAILED: %s did not throw\n", what);
}

void test_bad_input() {
  const at::Tensor z = sample_logits(4, 3, 10);
  const at::Tensor y = sample_labels(4, 11);
  const Weights w{1.0, 0.5, 0.3, 0.2};
  expect_throws<c10::ValueError>([&] { fusion(z.view({-1}), scalar(1.0), false); }, "1-D logits");
  expect_throws<c10::ValueError>([&] { fusion(z.narrow(1, 0, 0), scalar(1.0), false); }, "K = 0");
  expect_throws<c10::ValueError>([&] { fusion(z, scalar(0.0), false); }, "temperature 0");
  expect_throws<c10::ValueError>([&] { fusion(z, scalar(NAN), false); }, "temperature NaN");
  expect_throws<c10::ValueError>([&] { fusion(z, f64({1.0}), false); }, "temperature [1]");
  expect_throws<c10::ValueError>([&] { loss_op(z, y, scalar(1.0), w, false, false, 3); }, "reduction 3");
  expect_throws<c10::ValueError>([&] { loss_op(z, y.narrow(0, 0, 3), scalar(1.0), w, false, false, 1); },
                                 "labels shape");
  at::Tensor bad = y.clone();
  bad[2] = 1.5;
  expect_throws<c10::ValueError>([&] { loss_op(z, bad, scalar(1.0), w, false, false, 1); }, "label 1.5");
  expect_throws<c10::TypeError>(
      [&] { fusion(z.to(at::kLong), scalar(1.0), false); }, "integer logits");
}

// With a CUDA build and a GPU: the CUDA kernels against the CPU ones (same row math), over
// dtypes, K on both sides of the shared-memory cache limit, and strided inputs.
void test_cuda_matches_cpu() {
  if (!at::hasCUDA()) {
    std::printf("  (no CUDA device: CUDA comparison skipped)\n");
    return;
  }
  const Weights w{1.0, 0.5, 0.3, 0.2};
  for (at::ScalarType dt : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    const double tol = dt == at::kDouble ? 1e-10 : dt == at::kFloat ? 1e-4 : dt == at::kHalf ? 4e-3 : 3e-2;
    for (int64_t K : {1, 3, 40, 100}) {
      for (int64_t B : {0, 5, 3000}) {
        const at::Tensor z = sample_logits(K, B, 20 + K).t().to(dt);  // strided
        const at::Tensor y = sample_labels(B, 30 + K);
        const at::Tensor gp = sample_logits(B, 1, 40).view({B}).to(dt);
        const at::Tensor gw = sample_logits(B, K, 50).to(dt);
        const at::Tensor tau = scalar(0.8, dt == at::kDouble ? at::kDouble : at::kFloat);
        const auto cu = [](const at::Tensor& t) { return t.to(at::kCUDA); };
        auto same = [&](const at::Tensor& gpu, const at::Tensor& cpu, const std::string& what) {
          const std::string tag = what + " " + std::string(c10::toString(dt)) + " K=" +
                                  std::to_string(K) + " B=" + std::to_string(B);
          CHECK_MSG(gpu.is_cuda() && gpu.scalar_type() == cpu.scalar_type() && gpu.sizes() == cpu.sizes(),
                    "%s: dtype/shape/device", tag.c_str());
          // Sums over rows (0-dim results) accumulate B rows' rounding differences.
          const double atol = gpu.dim() == 0 ? tol * std::sqrt(static_cast<double>(B + 1)) : tol;
          if (gpu.sizes() == cpu.sizes())
            CHECK_MSG(at::allclose(gpu.cpu().to(at::kDouble), cpu.to(at::kDouble), tol, atol, true),
                      "%s: values differ (max %g)", tag.c_str(),
                      cpu.numel() ? (gpu.cpu().to(at::kDouble) - cpu.to(at::kDouble)).abs().max().item<double>() : 0.0);
        };
        for (bool ls : {false, true}) {
          const auto [pc, wc] = fusion(z, tau, ls);
          const auto [pg, wg] = fusion(cu(z), cu(tau), ls);
          same(pg, pc, "fusion p");
          same(wg, wc, "fusion w");
          const auto [gzc, gtc] = fusion_backward(gp, gw, z, tau, ls, false, true);
          const auto [gzg, gtg] = fusion_backward(cu(gp), cu(gw), cu(z), cu(tau), ls, false, true);
          same(gzg, gzc, "fusion grad");
          same(gtg, gtc, "fusion grad_tau");
          for (int64_t red : {0, 1, 2}) {
            const auto c = loss_op(z, y, tau, w, ls, false, red);
            const auto g = loss_op(cu(z), cu(y), cu(tau), w, ls, false, red);
            const std::string r = " red=" + std::to_string(red);
            same(std::get<0>(g), std::get<0>(c), "loss" + r);
            same(std::get<1>(g), std::get<1>(c), "loss prob" + r);
            same(std::get<2>(g), std::get<2>(c), "loss grad" + r);
            same(std::get<3>(g), std::get<3>(c), "loss grad_tau" + r);
          }
        }
      }
    }
  }
  // On CUDA the temperature is not read on the host: a bad one gives NaN instead of an error.
  const at::Tensor z = sample_logits(4, 3, 60).to(at::kCUDA);
  const auto [p, wts] = fusion(z, scalar(0.0).to(at::kCUDA), false);
  CHECK_MSG(p.isnan().all().item<bool>() && wts.isnan().all().item<bool>(), "CUDA tau = 0 gives NaN");
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"k1_is_bce_with_logits", test_k1_is_bce_with_logits},
      {"fusion_hand_checked", test_fusion_hand_checked},
      {"against_reference", test_against_reference},
      {"loss_gradients", test_loss_gradients},
      {"fusion_backward", test_fusion_backward},
      {"shapes_and_empty", test_shapes_and_empty},
      {"bad_input", test_bad_input},
      {"cuda_matches_cpu", test_cuda_matches_cpu},
  };
  for (const auto& [name, fn] : tests) {
    const int before = g_failures;
    try {
      fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "FAILED: %s threw: %s\n", name, e.what());
    }
    std::printf("%-24s %s\n", name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
