// CPU kernels: the row math of fusion_math.h run on at::vec::Vectorized, one SIMD lane per row.
//
// Rows are processed in tiles of L = Vec::size() rows: a tile's logits are transposed into
// member-major SIMD vectors (any input strides), each member's sigmoid/log-sigmoid/entropy is
// computed once and cached, and the row functions run on whole vectors. Tiles are grouped in
// fixed blocks of kBlockRows rows and blocks run in parallel (at::parallel_for); reductions sum
// one partial per block in block order, so results are bitwise identical for any thread count.
#include "isa.h"  // the kernels namespace: one build per vector ISA
#include "cpu/vec_math.h"  // before fusion_math.h: provides the Vectorized overloads
#include "fusion_math.h"

#include "checks.h"
#include "cpu/tile_io.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace cetnet::cpu::CETNET_ISA {
namespace {

constexpr int64_t kBlockRows = 512;

// Per-task scratch: the cached member values (and softmax exponentials) of one tile and a
// transpose buffer.
template <typename acc_t>
struct Scratch {
  static constexpr int L = Vec<acc_t>::size();
  explicit Scratch(int K)
      : cache(K), e(K), buf(static_cast<size_t>(K) * L), row(K, cache.data(), e.data()) {}
  struct Row {
    static constexpr bool kCachesE = true;
    Row(int K_, const Elem<Vec<acc_t>>* c, Vec<acc_t>* e_) : K(K_), cache(c), ecache(e_) {}
    int K;
    const Elem<Vec<acc_t>>* cache;
    Vec<acc_t>* ecache;
    const Elem<Vec<acc_t>>& elem(int k) const { return cache[k]; }
    void set_e(int k, const Vec<acc_t>& v) const { ecache[k] = v; }
    const Vec<acc_t>& e(int k) const { return ecache[k]; }
  };
  std::vector<Elem<Vec<acc_t>>> cache;
  std::vector<Vec<acc_t>> e;
  std::vector<acc_t> buf;  // [K][L] member-major
  Row row;
};

// Computes the elems of a tile from the gathered logits in scratch.buf: all fields, or (full =
// false) only p and q.
template <typename acc_t>
inline void fill_cache(Scratch<acc_t>& s, int K, bool full = true) {
  constexpr int L = Vec<acc_t>::size();
  for (int k = 0; k < K; ++k) {
    const Vec<acc_t> z = Vec<acc_t>::loadu(s.buf.data() + k * L);
    if (full) {
      set_elem(s.cache[k], z);
    } else {
      set_probs(s.cache[k], z);  // in place; the log fields keep stale values, never read
    }
  }
}

// Runs body(scratch, block, row_begin, row_end) over fixed blocks of rows, in parallel.
template <typename acc_t, typename Body>
void parallel_blocks(int64_t B, int K, const Body& body) {
  const int64_t nblocks = (B + kBlockRows - 1) / kBlockRows;
  // About 32k logits per task: small batches stay on the calling thread (no fork cost).
  const int64_t grain = std::max<int64_t>(1, 32768 / (kBlockRows * K));
  at::parallel_for(0, nblocks, grain, [&](int64_t lo, int64_t hi) {
    Scratch<acc_t> scratch(K);
    for (int64_t blk = lo; blk < hi; ++blk)
      body(scratch, blk, blk * kBlockRows, std::min(B, (blk + 1) * kBlockRows));
  });
}

// Reads the 0-dim CPU temperature through its pointer: a dispatched .item() costs more than the
// whole kernel at small batch sizes.
double read_temperature(const at::Tensor& temperature, const char* op) {
  double tau = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, temperature.scalar_type(),
                                  "cetnet_temperature",
                                  [&] { tau = static_cast<double>(*temperature.const_data_ptr<scalar_t>()); });
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op,
                    ": temperature must be finite and > 0, got ", tau);
  return tau;
}

// The temperature's scale in the compute type, refusing a tau that rounds to 0 there (1e-300
// is 0 in float: the kernels would divide by zero) or to inf (a float64 tensor of 1e39: every
// weight would be NaN).
template <typename acc_t>
TempScale<Vec<acc_t>> checked_temp_scale(double tau, const char* op) {
  const acc_t t = static_cast<acc_t>(tau);
  TORCH_CHECK_VALUE(t > acc_t(0) && std::isfinite(t), op, ": temperature ", tau,
                    (t > acc_t(0) ? " overflows to inf" : " underflows to 0"), " in ",
                    c10::CppTypeToScalarType<acc_t>::value,
                    ", the compute dtype of these logits; use float64 logits or another "
                    "temperature");
  return temp_scale<Vec<acc_t>, acc_t>(tau);
}

// A 0-dim tensor holding v, written through its pointer (cheaper than at::scalar_tensor).
at::Tensor scalar_out(double v, const at::TensorOptions& opts) {
  at::Tensor t = at::empty({}, opts);
  if (t.scalar_type() == at::kDouble) {
    *t.mutable_data_ptr<double>() = v;
  } else {
    *t.mutable_data_ptr<float>() = static_cast<float>(v);
  }
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> confidence_fusion(const at::Tensor& logits,
                                                     const at::Tensor& temperature,
                                                     bool logit_space, bool /*detach_weights*/) {
  const char* op = "cetnet::confidence_fusion";
  check_fusion_args(logits, temperature, op);
  const double tau = read_temperature(temperature, op);
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor weights = at::empty({B, K}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = Vec<acc_t>;
    constexpr int L = V::size();
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    scalar_t* p_out = prob.mutable_data_ptr<scalar_t>();
    scalar_t* w_out = weights.mutable_data_ptr<scalar_t>();
    const TempScale<V> ts = checked_temp_scale<acc_t>(tau, op);
    const bool unit_tau = tau == 1.0;  // the default: no logarithm needed (exp_confidence)
    parallel_blocks<acc_t>(B, K, [&](Scratch<acc_t>& s, int64_t, int64_t lo, int64_t hi) {
      for (int64_t b0 = lo; b0 < hi; b0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, hi - b0));
        gather_tile(z, s0, s1, b0, n, K, s.buf.data());
        fill_cache(s, K, /*full=*/!unit_tau);
        acc_t* wbuf = s.buf.data();  // the logits are cached: reuse the buffer for weights
        const auto put_w = [&](int k, const V& w) { w.store(wbuf + k * L); };
        const V p = unit_tau ? fusion_forward_row_unit_tau<V>(s.row, logit_space, put_w)
                             : fusion_forward_row<V>(s.row, ts, logit_space, put_w);
        store_rows(p, b0, n, p_out);
        scatter_tile(wbuf, b0, n, K, w_out);
      }
    });
  });
  return {prob, weights};
}

std::tuple<at::Tensor, at::Tensor> confidence_fusion_backward(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const std::optional<at::Tensor>& weights,
    const at::Tensor& temperature, bool logit_space, bool detach_weights,
    bool compute_temperature_grad) {
  const char* op = "cetnet::confidence_fusion_backward";
  // The forward's weights w spare the softmax (one exp) and the entropy (one log) per member:
  // on a CPU this op is compute-bound, so reading them is cheaper than recomputing them.
  at::Tensor gp, gw, w;  // not structured bindings: lambdas below capture them (C++17)
  std::tie(gp, gw, w) =
      check_fusion_backward_args(grad_prob, grad_weights, logits, weights, temperature, op);
  const double tau = read_temperature(temperature, op);
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const bool has_gp = gp.defined(), has_gw = gw.defined(), has_w = w.defined();
  const bool want_gt = compute_temperature_grad && !detach_weights;
  const int64_t nblocks = (B + kBlockRows - 1) / kBlockRows;
  std::vector<double> gt_partial(nblocks, 0.0);
  at::Tensor grad_logits = at::empty({B, K}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = Vec<acc_t>;
    constexpr int L = V::size();
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const scalar_t* gp_ptr = has_gp ? gp.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gw_ptr = has_gw ? gw.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* w_ptr = has_w ? w.const_data_ptr<scalar_t>() : nullptr;
    const int64_t gp_s0 = has_gp ? gp.stride(0) : 0;
    const int64_t gw_s0 = has_gw ? gw.stride(0) : 0, gw_s1 = has_gw ? gw.stride(1) : 0;
    const int64_t w_s0 = has_w ? w.stride(0) : 0, w_s1 = has_w ? w.stride(1) : 0;
    scalar_t* gz_out = grad_logits.mutable_data_ptr<scalar_t>();
    const TempScale<V> ts = checked_temp_scale<acc_t>(tau, op);
    parallel_blocks<acc_t>(B, K, [&](Scratch<acc_t>& s, int64_t blk, int64_t lo, int64_t hi) {
      std::vector<acc_t> gwbuf(has_gw ? static_cast<size_t>(K) * L : 0);
      std::vector<acc_t> wbuf(has_w ? static_cast<size_t>(K) * L : 0);
      double gt_sum = 0.0;
      for (int64_t b0 = lo; b0 < hi; b0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, hi - b0));
        gather_tile(z, s0, s1, b0, n, K, s.buf.data());
        if (has_gw) gather_tile(gw_ptr, gw_s0, gw_s1, b0, n, K, gwbuf.data());
        const V g_p = has_gp ? gather_rows<scalar_t, acc_t>(gp_ptr, gp_s0, b0, n) : V(0);
        const auto get_gw = [&](int k) { return has_gw ? V::loadu(gwbuf.data() + k * L) : V(0); };
        acc_t* gzbuf = s.buf.data();
        const auto put_gz = [&](int k, const V& g) { g.store(gzbuf + k * L); };
        V gt;
        if (has_w) {
          gather_tile(w_ptr, w_s0, w_s1, b0, n, K, wbuf.data());
          fill_cache(s, K, /*full=*/want_gt);
          gt = fusion_backward_row_w<V>(
              s.row, ts, logit_space, detach_weights, want_gt, g_p,
              [&](int k) { return V::loadu(wbuf.data() + k * L); }, get_gw, put_gz);
        } else {
          fill_cache(s, K, /*full=*/true);
          gt = fusion_backward_row<V>(s.row, ts, logit_space, detach_weights, g_p, get_gw,
                                      put_gz);
        }
        scatter_tile(gzbuf, b0, n, K, gz_out);
        if (want_gt) gt_sum += static_cast<double>(sum_lanes(gt, n));
      }
      gt_partial[blk] = gt_sum;
    });
  });
  double gt_total = 0.0;
  for (double v : gt_partial) gt_total += v;
  at::Tensor grad_temperature =
      scalar_out(want_gt ? gt_total : 0.0, logits.options().dtype(acc_type_of(logits)));
  return {grad_logits, grad_temperature};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> collaborative_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad) {
  const char* op = "cetnet::collaborative_loss";
  check_loss_args(logits, labels, temperature, reduction, op);
  const double tau = read_temperature(temperature, op);
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const auto acc_dtype = acc_type_of(logits);
  const at::Tensor y_t = labels.scalar_type() == acc_dtype ? labels : labels.to(acc_dtype);
  const bool per_row = reduction == kReduceNone;
  const bool want_gt = compute_grad && compute_temperature_grad;
  const LossWeights weights{member_weight, ensemble_weight, distill_weight, mutual_weight};

  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor grad_logits = grad_logits_out(logits, compute_grad);
  at::Tensor loss_rows = per_row ? at::empty({B}, logits.options().dtype(acc_dtype)) : at::Tensor();
  at::Tensor gt_rows =
      (per_row && want_gt) ? at::empty({B}, logits.options().dtype(acc_dtype)) : at::Tensor();
  const int64_t nblocks = (B + kBlockRows - 1) / kBlockRows;
  std::vector<double> loss_partial(nblocks, 0.0), gt_partial(nblocks, 0.0);
  std::vector<int64_t> bad_label(nblocks, -1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = Vec<acc_t>;
    constexpr int L = V::size();
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const acc_t* y_ptr = y_t.const_data_ptr<acc_t>();
    const int64_t y_s0 = y_t.stride(0);
    scalar_t* p_out = prob.mutable_data_ptr<scalar_t>();
    scalar_t* gz_out = compute_grad ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* loss_out = per_row ? loss_rows.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gt_out = gt_rows.defined() ? gt_rows.mutable_data_ptr<acc_t>() : nullptr;
    const TempScale<V> ts = checked_temp_scale<acc_t>(tau, op);
    parallel_blocks<acc_t>(B, K, [&](Scratch<acc_t>& s, int64_t blk, int64_t lo, int64_t hi) {
      // A bad label is an input error: remember the first, raise after the pass.
      if ((bad_label[blk] = first_bad_label(y_ptr, y_s0, lo, hi)) >= 0) return;
      double loss_sum = 0.0, gt_sum = 0.0;
      for (int64_t b0 = lo; b0 < hi; b0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, hi - b0));
        gather_tile(z, s0, s1, b0, n, K, s.buf.data());
        fill_cache(s, K);
        const V y = gather_rows<acc_t, acc_t>(y_ptr, y_s0, b0, n);
        acc_t* gzbuf = s.buf.data();
        const LossRowOut<V> r = collaborative_loss_row<V>(
            s.row, y, ts, logit_space, detach_weights, weights, compute_grad,
            [&](int k, const V& g) { g.store(gzbuf + k * L); });
        store_rows(r.p, b0, n, p_out);
        if (compute_grad) scatter_tile(gzbuf, b0, n, K, gz_out);
        if (per_row) {
          store_rows(r.loss, b0, n, loss_out);
          if (gt_out) store_rows(r.gtau, b0, n, gt_out);
        } else {
          loss_sum += static_cast<double>(sum_lanes(r.loss, n));
          if (want_gt) gt_sum += static_cast<double>(sum_lanes(r.gtau, n));
        }
      }
      loss_partial[blk] = loss_sum;
      gt_partial[blk] = gt_sum;
    });
  });
  for (int64_t blk = 0; blk < nblocks; ++blk)
    if (bad_label[blk] >= 0) raise_bad_label(op, y_t, bad_label[blk]);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  at::Tensor loss, grad_temperature;
  if (per_row) {
    loss = loss_rows;
    grad_temperature = want_gt ? gt_rows : scalar_out(0.0, acc_opts);
  } else {
    double total = 0.0, gt_total = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      total += loss_partial[blk];
      gt_total += gt_partial[blk];
    }
    if (reduction == kReduceMean && B > 0) total /= static_cast<double>(B);
    loss = scalar_out(total, acc_opts);
    grad_temperature = scalar_out(want_gt ? gt_total : 0.0, acc_opts);
  }
  return {loss, prob, grad_logits, grad_temperature};
}

}  // namespace cetnet::cpu::CETNET_ISA
