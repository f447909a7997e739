// CPU kernel of the KDEF loss (math: cetnet_kernels/kdef.py), in two passes over [B, K]:
//   1. batch reductions per fixed block of rows (exam scores s_k, teacher distances M_k, member
//      distances N_ij, the BCE sum) and the teacher prob; the blocks' float64 partials are summed
//      in block order, so the loss is bitwise identical for any thread count;
//   2. with compute_grad, the gradient, elementwise, from K-sized coefficients (a, E/Z, G).
// Rows are processed in tiles of L = Vec::size() rows, one SIMD lane per row (csrc/cpu/tile_io.h).
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
#include <vector>

namespace cetnet::cpu::CETNET_ISA {
namespace {

constexpr int64_t kKdefBlockRows = 512;

// Offsets into one block's partial sums: s[K], M[K], N[K(K-1)/2] (i < j, row-major), bce.
struct KdefSums {
  explicit KdefSums(int64_t K_) : K(K_), n_off(2 * K_), bce(2 * K_ + K_ * (K_ - 1) / 2), size(bce + 1) {}
  int64_t K, n_off, bce, size;
  int64_t s(int64_t k) const { return k; }
  int64_t m(int64_t k) const { return K + k; }
  // Pair (i, j), i < j.
  int64_t n(int64_t i, int64_t j) const { return n_off + i * (2 * K - i - 1) / 2 + (j - i - 1); }
};

// The K-sized quantities of the loss and its gradient, from the summed batch statistics.
struct KdefCoefs {
  double loss = 0.0;
  std::vector<double> a, e, inv_z, g;  // a = softmax(-s); E_j; 1 / sum_{l != i} E_l; G_k
};

KdefCoefs kdef_coefs(const std::vector<double>& tot, const KdefSums& I, int64_t B) {
  const int64_t K = I.K;
  const double inv_b = 1.0 / static_cast<double>(B);
  std::vector<double> s(K), M(K);
  for (int64_t k = 0; k < K; ++k) {
    s[k] = tot[I.s(k)] * inv_b;
    M[k] = tot[I.m(k)] * inv_b;
  }
  const auto N = [&](int64_t i, int64_t j) {
    return i == j ? 0.0 : tot[I.n(std::min(i, j), std::max(i, j))] * inv_b;
  };
  KdefCoefs c;
  c.a.resize(K);
  c.e.resize(K);
  c.inv_z.assign(K, 0.0);
  c.g.resize(K);
  // a = softmax(-s); s in [0, 1], so the exponentials stay in [1/e, 1] after the shift.
  const double smin = *std::min_element(s.begin(), s.end());
  const double smax = *std::max_element(s.begin(), s.end());
  double za = 0.0;
  for (int64_t k = 0; k < K; ++k) za += (c.a[k] = std::exp(smin - s[k]));
  double aM = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    c.a[k] /= za;
    aM += c.a[k] * M[k];
  }
  for (int64_t j = 0; j < K; ++j) c.e[j] = std::exp(s[j] - smax);
  std::vector<double> R(K, 0.0);
  for (int64_t i = 0; i < K && K > 1; ++i) {
    double z = 0.0;
    for (int64_t l = 0; l < K; ++l)
      if (l != i) z += c.e[l];
    c.inv_z[i] = 1.0 / z;
    for (int64_t j = 0; j < K; ++j)
      if (j != i) R[i] += c.e[j] * c.inv_z[i] * N(i, j);
  }
  double s2s = 0.0;
  for (int64_t i = 0; i < K; ++i) s2s += R[i];
  c.loss = tot[I.bce] * inv_b / static_cast<double>(K) + aM + s2s / static_cast<double>(K);
  for (int64_t k = 0; k < K; ++k) {
    double through_b = 0.0;
    for (int64_t i = 0; i < K; ++i)
      if (i != k) through_b += c.e[k] * c.inv_z[i] * (N(i, k) - R[i]);
    c.g[k] = -c.a[k] * (M[k] - aM) + through_b / static_cast<double>(K);
  }
  return c;
}

// Lanes r < n as 1, the rest 0 (the padding rows of a batch's last tile).
template <typename acc_t>
Vec<acc_t> lane_mask(int n) {
  constexpr int L = Vec<acc_t>::size();
  alignas(64) acc_t m[L];
  for (int r = 0; r < L; ++r) m[r] = r < n ? acc_t(1) : acc_t(0);
  return Vec<acc_t>::loadu(m);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kdef_loss(const at::Tensor& logits,
                                                         const at::Tensor& labels,
                                                         bool compute_grad) {
  const char* op = "cetnet::kdef_loss";
  check_kdef_args(logits, labels, op);
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor");
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));  // check_logits: K <= INT_MAX
  const at::ScalarType acc_dtype = acc_type_of(logits);
  at::Tensor teacher = at::empty({B}, logits.options());
  at::Tensor grad = grad_logits_out(logits, compute_grad);
  if (B == 0) return {at::zeros({}, logits.options().dtype(acc_dtype)), teacher, grad};
  const at::Tensor y_t = labels.to(acc_dtype);
  const KdefSums I(K);
  const int64_t nblocks = (B + kKdefBlockRows - 1) / kKdefBlockRows;
  std::vector<double> partial(static_cast<size_t>(nblocks * I.size), 0.0);
  std::vector<int64_t> bad_label(nblocks, -1);
  double loss = 0.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_kdef_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = Vec<acc_t>;
    constexpr int L = V::size();
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const acc_t* y_ptr = y_t.const_data_ptr<acc_t>();
    const int64_t y_s0 = y_t.stride(0);
    scalar_t* t_out = teacher.mutable_data_ptr<scalar_t>();
    const V inv_k(acc_t(1) / static_cast<acc_t>(K));
    // About 32k logits per task: small batches stay on the calling thread.
    const int64_t grain = std::max<int64_t>(1, 32768 / (kKdefBlockRows * K));

    // ---- pass 1: batch statistics per block, and the teacher.
    at::parallel_for(0, nblocks, grain, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> buf(static_cast<size_t>(K) * L);
      std::vector<V> p(K), acc(static_cast<size_t>(I.size));
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t b_lo = blk * kKdefBlockRows, b_hi = std::min(B, b_lo + kKdefBlockRows);
        // A bad label is an input error: remember the first, raise after the pass.
        if ((bad_label[blk] = first_bad_label(y_ptr, y_s0, b_lo, b_hi)) >= 0) continue;
        std::fill(acc.begin(), acc.end(), V(0));
        for (int64_t b0 = b_lo; b0 < b_hi; b0 += L) {
          const int n = static_cast<int>(std::min<int64_t>(L, b_hi - b0));
          gather_tile(z, s0, s1, b0, n, K, buf.data());
          const V y = gather_rows<acc_t, acc_t>(y_ptr, y_s0, b0, n);
          const V mask = n == L ? V(1) : lane_mask<acc_t>(n);
          V zsum(0), bce(0);
          for (int k = 0; k < K; ++k) {
            const V zk = V::loadu(buf.data() + k * L);
            const Elem<V> el = make_elem(zk);
            p[k] = el.p;
            zsum = zsum + zk;
            bce = bce + (-el.lsq - y * zk);  // softplus(z) - y z
          }
          const V pt = make_elem_pq(zsum * inv_k).p;
          store_rows(pt, b0, n, t_out);
          acc[I.bce] = acc[I.bce] + bce * mask;
          for (int k = 0; k < K; ++k) {
            acc[I.s(k)] = acc[I.s(k)] + (V(1) - (y - p[k]).abs()) * mask;
            const V d = p[k] - pt;
            acc[I.m(k)] = acc[I.m(k)] + d * d * mask;
            for (int j = k + 1; j < K; ++j) {
              const V dj = p[k] - p[j];
              acc[I.n(k, j)] = acc[I.n(k, j)] + dj * dj * mask;
            }
          }
        }
        double* out = partial.data() + blk * I.size;
        for (int64_t i = 0; i < I.size; ++i) out[i] = static_cast<double>(sum_lanes(acc[i], L));
      }
    });
    for (int64_t blk = 0; blk < nblocks; ++blk)
      if (bad_label[blk] >= 0) raise_bad_label(op, y_t, bad_label[blk]);
    std::vector<double> tot(static_cast<size_t>(I.size), 0.0);
    for (int64_t blk = 0; blk < nblocks; ++blk)
      for (int64_t i = 0; i < I.size; ++i) tot[i] += partial[blk * I.size + i];
    const KdefCoefs c = kdef_coefs(tot, I, B);
    loss = c.loss;
    if (!compute_grad) return;

    // ---- pass 2: the gradient.
    scalar_t* g_out = grad.mutable_data_ptr<scalar_t>();
    const double inv_b = 1.0 / static_cast<double>(B);
    const V c_bce(static_cast<acc_t>(inv_b / K)), c_two(static_cast<acc_t>(2.0 * inv_b));
    const V c_one(static_cast<acc_t>(inv_b));
    std::vector<V> a(K), e(K), inv_z(K), g(K);
    for (int k = 0; k < K; ++k) {
      a[k] = V(static_cast<acc_t>(c.a[k]));
      e[k] = V(static_cast<acc_t>(c.e[k]));
      inv_z[k] = V(static_cast<acc_t>(c.inv_z[k]));
      g[k] = V(static_cast<acc_t>(c.g[k]));
    }
    at::parallel_for(0, nblocks, grain, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> buf(static_cast<size_t>(K) * L);
      std::vector<V> p(K), q(K);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t b_lo = blk * kKdefBlockRows, b_hi = std::min(B, b_lo + kKdefBlockRows);
        for (int64_t b0 = b_lo; b0 < b_hi; b0 += L) {
          const int n = static_cast<int>(std::min<int64_t>(L, b_hi - b0));
          gather_tile(z, s0, s1, b0, n, K, buf.data());
          const V y = gather_rows<acc_t, acc_t>(y_ptr, y_s0, b0, n);
          V zsum(0), ep(0);
          for (int k = 0; k < K; ++k) {
            const V zk = V::loadu(buf.data() + k * L);
            const Elem<V> el = make_elem_pq(zk);
            p[k] = el.p;
            q[k] = el.q;
            zsum = zsum + zk;
            ep = ep + e[k] * el.p;  // sum_j E_j p_j
          }
          const V pt = make_elem_pq(zsum * inv_k).p;
          for (int k = 0; k < K; ++k) {
            const V pq = p[k] * q[k];
            // sum_{j != k} b_kj (p_k - p_j) = p_k - (sum_j E_j p_j - E_k p_k) / Z_k (K > 1)
            const V s2s = K > 1 ? p[k] - (ep - e[k] * p[k]) * inv_z[k] : V(0);
            const V diff = y - p[k];
            const V sgn = V::blendv(V(0), V(1), diff > V(0)) - V::blendv(V(0), V(1), diff < V(0));
            const V gk = (p[k] - y) * c_bce + c_two * pq * (a[k] * (p[k] - pt) + s2s * inv_k) +
                         c_one * pq * sgn * g[k];
            gk.store(buf.data() + k * L);
          }
          scatter_tile(buf.data(), b0, n, K, g_out);
        }
      }
    });
  });
  at::Tensor loss_t = at::empty({}, logits.options().dtype(acc_dtype));
  if (acc_dtype == at::kDouble) {
    *loss_t.mutable_data_ptr<double>() = loss;
  } else {
    *loss_t.mutable_data_ptr<float>() = static_cast<float>(loss);
  }
  return {loss_t, teacher, grad};
}

}  // namespace cetnet::cpu::CETNET_ISA
