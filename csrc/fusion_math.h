// Per-row math of the confidence fusion and the collaborative loss (design: MATH.md §1-2).
//
// Written once, templated on the value type V, and shared by every compiled backend:
//   * CUDA: V = float/double, one thread per row;
//   * CPU:  V = at::vec::Vectorized<float/double>, one SIMD lane per row (csrc/cpu/).
// The row is reached through an accessor `Row` with `int K` and `Elem<V> elem(int k)`, so a
// backend decides whether per-member values are cached (CPU tile, CUDA shared memory) or
// recomputed from the logit.
//
// Everything is in logit form: softplus, log-sigmoid and entropy come from one exp and one
// log1p of -|z|; log p and log(1-p) of the fused prediction are log-sum-exps; the ratios
// r_j/p and r_j/(1-p) of the ensemble-BCE gradient are formed in log space. Nothing is
// clamped, and a NaN/inf logit only poisons its own row.
#pragma once

#include "isa.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CETNET_HD __host__ __device__ __forceinline__
#else
#define CETNET_HD inline
#endif

namespace cetnet {
inline namespace CETNET_ISA_NS {  // isa.h

// ---------------------------------------------------------------------------------------------
// Scalar primitives. The Vectorized overloads live in csrc/cpu/vec_math.h.
// ---------------------------------------------------------------------------------------------
CETNET_HD float vexp(float x) { return ::expf(x); }
CETNET_HD double vexp(double x) { return ::exp(x); }
CETNET_HD float vlog(float x) { return ::logf(x); }
CETNET_HD double vlog(double x) { return ::log(x); }
// log(1 + x) for x in [0, 1] (the only range the row math needs: x = exp(-|z|)).
CETNET_HD float vlog1p_unit(float x) { return ::log1pf(x); }
CETNET_HD double vlog1p_unit(double x) { return ::log1p(x); }
CETNET_HD float vabs(float x) { return ::fabsf(x); }
CETNET_HD double vabs(double x) { return ::fabs(x); }
// NaN-propagating max: a NaN in either argument gives NaN (its row is poisoned anyway).
template <typename T>
CETNET_HD T vmax(T a, T b) {
  return (a != a || a > b) ? a : b;
}
// x >= 0 ? a : b
template <typename T>
CETNET_HD T select_nonneg(T x, T a, T b) {
  return x >= T(0) ? a : b;
}

// ---------------------------------------------------------------------------------------------
// One member's values, derived from its logit z.
// ---------------------------------------------------------------------------------------------
template <typename V>
struct Elem {
  V z;    // logit
  V p;    // sigmoid(z)
  V q;    // 1 - p = sigmoid(-z), exact (not 1 - p)
  V lsp;  // log sigmoid(z)  = -softplus(-z)
  V lsq;  // log sigmoid(-z) = -softplus(z)
  V c;    // confidence = -H(p) = -(log1p(e^-|z|) + |z| sigmoid(-|z|))
};

// Sets z, p and q of `out` (nothing else) and returns e = exp(-|z|) for the logs. Written in
// place: a CPU tile fills its cache with it, and copying whole Elems of SIMD vectors is not free.
template <typename V>
CETNET_HD V set_probs(Elem<V>& out, V z) {
  const V one(1);
  const V e = vexp(-vabs(z));  // in (0, 1]: never overflows
  const V r = one / (one + e);
  const V er = e * r;
  out.z = z;
  out.p = select_nonneg(z, r, er);
  out.q = select_nonneg(z, er, r);
  return e;
}

// z, p and q of an elem (logs zero), and e = exp(-|z|) for the logs.
template <typename V>
CETNET_HD Elem<V> elem_probs(V z, V& e) {
  const V zero(0);
  Elem<V> out;
  e = set_probs(out, z);
  out.lsp = zero;
  out.lsq = zero;
  out.c = zero;
  return out;
}

// All fields of `out`, in place.
template <typename V>
CETNET_HD void set_elem(Elem<V>& out, V z) {
  const V zero(0);
  const V l = vlog1p_unit(set_probs(out, z));
  out.lsp = -(vmax(-z, zero) + l);
  out.lsq = -(vmax(z, zero) + l);
  // -H(p) as two terms of one sign: z*p + lsq, the same value, cancels to a few digits for a
  // large |z| (z = 15: -5.7e-6 for -4.9e-6 in float), which small temperatures magnify.
  out.c = -(l + vabs(z) * select_nonneg(z, out.q, out.p));
}

template <typename V>
CETNET_HD Elem<V> make_elem(V z) {
  Elem<V> out;
  set_elem(out, z);
  return out;
}

// p and q only, no logarithm: all the backward needs when the weights come from the forward.
template <typename V>
CETNET_HD Elem<V> make_elem_pq(V z) {
  V e;
  return elem_probs(z, e);
}

// ---------------------------------------------------------------------------------------------
// Row statistics of the fusion: the max-subtracted softmax of c/tau and the fused prediction.
// e_k = exp((c_k - m)/tau) with m = max_j c_j, w_k = e_k / S.
//
// A row accessor may cache e_k (Row::kCachesE with set_e/e: the CPU tile does) so that the
// softmax exponentials are computed once per member; otherwise they are recomputed.
// ---------------------------------------------------------------------------------------------
template <typename R, typename = void>
struct caches_e : std::false_type {};
template <typename R>
struct caches_e<R, std::void_t<decltype(R::kCachesE)>> : std::integral_constant<bool, R::kCachesE> {};

// Below this, a positive sum of e_k p_k may have lost precision to underflowed (subnormal)
// terms: take the log-space path. 1e-30 leaves float's subnormal terms below 1e-8 relative.
CETNET_HD float tiny_sum(float) { return 1e-30f; }
CETNET_HD double tiny_sum(double) { return 1e-290; }
// a < b ? x : y per lane, and whether any lane has a < b.
template <typename T>
CETNET_HD T select_lt(T a, T b, T x, T y) {
  return a < b ? x : y;
}
CETNET_HD bool any_lt(float a, float b) { return a < b; }
CETNET_HD bool any_lt(double a, double b) { return a < b; }

// ---------------------------------------------------------------------------------------------
// Division by the temperature. Every "x / tau" of the row math goes through this: x * (1/tau)
// while 1/tau is finite (the fast path), x / tau once 1/tau overflows (tau below ~1/FLT_MAX in
// float), where x * inf would turn an exact 0 (the winning member's exponent, a one-hot weight's
// gradient) into NaN. The row math divides differences that are exactly 0 at the winner
// (c_k - max_j c_j, u_k - ubar, c_k - cbar) and multiplies by a weight before dividing, so a
// weight that underflowed to 0 stays 0 at any tau > 0.
// ---------------------------------------------------------------------------------------------
template <typename V>
struct TempScale {
  V inv;        // 1 / tau (rounded once from double)
  V tau;
  bool divide;  // 1/tau is not finite: divide by tau instead
  CETNET_HD V operator()(V x) const { return divide ? x / tau : x * inv; }
};

// The scale for a temperature read as double; S is the compute scalar type. A tau that is not
// finite and > 0 in S (the host layers reject it) gives NaN everywhere, never a silent number.
template <typename V, typename S>
CETNET_HD TempScale<V> temp_scale(double tau) {
  const S t = static_cast<S>(tau);
  if (!(t > S(0)) || !(t - t == S(0))) {
    const S nan = std::numeric_limits<S>::quiet_NaN();
    return {V(nan), V(nan), false};
  }
  const S inv = static_cast<S>(1.0 / tau);
  return {V(inv), V(t), !(inv - inv == S(0))};
}

template <typename V>
struct FusionStats {
  V m;       // max_k c_k (the softmax exponent of member k is (c_k - m) / tau, exactly 0 at the max)
  V invS;    // 1 / sum_k e_k
  V logS;    // log sum_k e_k
  V cbar;    // sum_k w_k c_k
  V zf;      // sum_k w_k z_k (logit space only)
  V p;       // fused probability
  V pw;      // sum_k w_k p_k as summed (prob space): p itself may come from exp(log p)
  V q;       // 1 - p, exact        (only when with_logs)
  V logp;    // log p               (only when with_logs)
  V log1mp;  // log (1 - p)         (only when with_logs)
  V inv_sp;  // 1 / sum_k e_k p_k   (prob space, with_logs)
  V inv_sq;  // 1 / sum_k e_k q_k   (prob space, with_logs)
  V smin;    // min of those two sums: below tiny_sum, a lane took the log-space path
  bool any_slow;
};

template <typename V, typename Row>
CETNET_HD V member_e(const Row& row, int k, const FusionStats<V>& st, const TempScale<V>& ts) {
  if constexpr (caches_e<Row>::value) {
    return row.e(k);
  } else {
    return vexp(ts(row.elem(k).c - st.m));
  }
}

// with_logs: also form q = 1 - p, log p and log(1-p) exactly (needed by the BCE/KL terms).
// Prob space: p = sum_k e_k p_k / S and 1 - p = sum_k e_k q_k / S are sums of positive terms,
// accurate unless they underflow; a lane whose sum is below tiny_sum instead takes
// log p = LSE_k(log w_k + log sigmoid(z_k)) and log(1-p) = LSE_k(log w_k + log sigmoid(-z_k)).
template <typename V, typename Row>
CETNET_HD FusionStats<V> fusion_stats(const Row& row, const TempScale<V>& ts, bool logit_space,
                                       bool with_logs) {
  const int K = row.K;
  FusionStats<V> st;
  // Subtract the max before scaling: c_k/tau - max c/tau overflows to -inf - -inf = NaN at tiny
  // tau, and a contracted fma(c, 1/tau, -m) leaves the winner an exponent of its rounding error.
  V m = row.elem(0).c;
  for (int k = 1; k < K; ++k) m = vmax(m, row.elem(k).c);
  V S(0), Sc(0), Sz(0), Sp(0), Sq(0);
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    const V e = vexp(ts(el.c - m));
    if constexpr (caches_e<Row>::value) row.set_e(k, e);
    S = S + e;
    Sc = Sc + e * el.c;
    Sz = Sz + e * el.z;
    Sp = Sp + e * el.p;
    Sq = Sq + e * el.q;
  }
  const V one(1);
  st.invS = one / S;
  st.m = m;
  // log S only serves the log-space paths below (with_logs); the forward skips its log.
  st.logS = with_logs ? vlog(S) : V(0);
  st.cbar = Sc * st.invS;
  st.zf = Sz * st.invS;
  st.any_slow = false;
  if (logit_space) {
    const Elem<V> f = make_elem(st.zf);
    st.p = f.p;
    st.q = f.q;
    st.logp = f.lsp;
    st.log1mp = f.lsq;
    return st;
  }
  st.p = Sp * st.invS;
  st.pw = st.p;
  st.q = Sq * st.invS;
  if (!with_logs) return st;
  st.inv_sp = one / Sp;
  st.inv_sq = one / Sq;
  st.logp = vlog(Sp) - st.logS;
  st.log1mp = vlog(Sq) - st.logS;
  const V tiny(tiny_sum(V(0)));
  st.smin = select_lt(Sp, Sq, Sp, Sq);
  st.any_slow = any_lt(st.smin, tiny);
  if (!st.any_slow) return st;
  const V ninf(-std::numeric_limits<float>::infinity());
  V ma = ninf, mb = ninf;
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    const V lw = ts(el.c - m) - st.logS;
    ma = vmax(ma, lw + el.lsp);
    mb = vmax(mb, lw + el.lsq);
  }
  V sa(0), sb(0);
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    const V lw = ts(el.c - m) - st.logS;
    sa = sa + vexp(lw + el.lsp - ma);
    sb = sb + vexp(lw + el.lsq - mb);
  }
  const V logp = ma + vlog(sa), log1mp = mb + vlog(sb);
  st.logp = select_lt(st.smin, tiny, logp, st.logp);
  st.log1mp = select_lt(st.smin, tiny, log1mp, st.log1mp);
  st.p = select_lt(st.smin, tiny, vexp(logp), st.p);
  st.q = select_lt(st.smin, tiny, vexp(log1mp), st.q);
  return st;
}

// a_k = w_k p_k / p and b_k = w_k q_k / (1 - p), both in [0, 1] (prob space, with_logs).
template <typename V>
CETNET_HD void member_ratios(const Elem<V>& el, V e, const FusionStats<V>& st,
                             const TempScale<V>& ts, V& a, V& b) {
  a = e * el.p * st.inv_sp;
  b = e * el.q * st.inv_sq;
  if (st.any_slow) {
    const V tiny(tiny_sum(V(0)));
    const V lw = ts(el.c - st.m) - st.logS;
    a = select_lt(st.smin, tiny, vexp(lw + el.lsp - st.logp), a);
    b = select_lt(st.smin, tiny, vexp(lw + el.lsq - st.log1mp), b);
  }
}

// ---------------------------------------------------------------------------------------------
// confidence_fusion forward: p and (optionally, through `put_w(k, w_k)`) the weights.
// ---------------------------------------------------------------------------------------------
template <typename V, typename Row, typename PutW>
CETNET_HD V fusion_forward_row(const Row& row, const TempScale<V>& ts, bool logit_space,
                               PutW put_w) {
  const FusionStats<V> st = fusion_stats<V>(row, ts, logit_space, /*with_logs=*/false);
  for (int k = 0; k < row.K; ++k) put_w(k, member_e<V>(row, k, st, ts) * st.invS);
  return st.p;
}

// ---------------------------------------------------------------------------------------------
// confidence_fusion forward at tau = 1 (the default) without a logarithm. With r = sigmoid(|z|)
// and s = sigmoid(-|z|), the confidence is c = z p - softplus(z) = log r - |z| s, so
//   exp(c) = r exp(-|z| s),  in [exp(-0.279) / 2, 1]:
// no max to subtract (nothing under- or overflows), and p, q, r, s all come from one exp(-|z|).
// The row needs z, p and q only (set_probs) and must cache e (Row::set_e / e).
// ---------------------------------------------------------------------------------------------
template <typename V>
CETNET_HD V exp_confidence(const Elem<V>& el) {
  const V r = select_nonneg(el.z, el.p, el.q);
  const V s = select_nonneg(el.z, el.q, el.p);
  return r * vexp(-vabs(el.z) * s);
}

template <typename V, typename Row, typename PutW>
CETNET_HD V fusion_forward_row_unit_tau(const Row& row, bool logit_space, PutW put_w) {
  static_assert(caches_e<Row>::value, "the row must cache the softmax exponentials");
  const int K = row.K;
  V S(0), Sm(0);
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    const V e = exp_confidence(el);
    row.set_e(k, e);
    S = S + e;
    Sm = Sm + e * (logit_space ? el.z : el.p);
  }
  const V invS = V(1) / S;
  for (int k = 0; k < K; ++k) put_w(k, row.e(k) * invS);
  const V m = Sm * invS;  // fused logit (logit space) or fused probability
  return logit_space ? make_elem_pq(m).p : m;
}

// ---------------------------------------------------------------------------------------------
// confidence_fusion backward (vector-Jacobian product). g_p: upstream grad of p for this row;
// get_w(k): the fusion weight w_k; get_gw(k): upstream grad of w_k; put_gz(k, g): writes dL/dz_k.
// Returns this row's dL/dtau when want_gt (it needs c_k: the row must then hold full elems; the
// rest needs only z_k, p_k and q_k, see make_elem_pq).
//   u_k = g_w_k + g_m m_k, with m_k = p_k (prob space) or z_k (logit space)
//   g_c_k = w_k (u_k - sum_j w_j u_j) / tau                (0 with detach_weights)
//   g_z_k = g_m w_k dm_k/dz_k + g_c_k z_k p_k (1-p_k),  g_tau = -(1/tau) sum_k g_c_k c_k
// ---------------------------------------------------------------------------------------------
template <typename V, typename Row, typename GetW, typename GetGW, typename PutGZ>
CETNET_HD V fusion_backward_row_w(const Row& row, const TempScale<V>& ts, bool logit_space,
                                  bool detach_weights,
                                  bool want_gt, V g_p, GetW get_w, GetGW get_gw, PutGZ put_gz) {
  const int K = row.K;
  V g_m = g_p;
  if (logit_space) {
    // p = sigmoid(z_f), z_f = sum_k w_k z_k: carry the upstream grad to z_f.
    V zf(0);
    for (int k = 0; k < K; ++k) zf = zf + get_w(k) * row.elem(k).z;
    const Elem<V> f = make_elem_pq(zf);
    g_m = g_p * f.p * f.q;
  }
  V ubar(0);
  if (!detach_weights) {
    for (int k = 0; k < K; ++k) {
      const Elem<V>& el = row.elem(k);
      ubar = ubar + get_w(k) * (get_gw(k) + g_m * (logit_space ? el.z : el.p));
    }
  }
  V gt(0);
  // sum_k g_c_k c_k = sum_k g_c_k (c_k - c_0), as sum_k g_c_k = 0: the confidences differ by
  // far less than their size, and the difference keeps dL/dtau accurate at small tau.
  const V c0 = want_gt ? row.elem(0).c : V(0);
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    const V w = get_w(k);
    const V pq = el.p * el.q;
    V gz = g_m * w * (logit_space ? V(1) : pq);
    if (!detach_weights) {
      const V u = get_gw(k) + g_m * (logit_space ? el.z : el.p);
      const V gc = ts(w * (u - ubar));
      gz = gz + gc * el.z * pq;
      if (want_gt) gt = gt + gc * (el.c - c0);
    }
    put_gz(k, gz);
  }
  return -ts(gt);
}

// The same, with the weights recomputed from the logits (the row must hold full elems).
template <typename V, typename Row, typename GetGW, typename PutGZ>
CETNET_HD V fusion_backward_row(const Row& row, const TempScale<V>& ts, bool logit_space,
                                bool detach_weights, V g_p, GetGW get_gw, PutGZ put_gz) {
  const FusionStats<V> st = fusion_stats<V>(row, ts, logit_space, /*with_logs=*/false);
  return fusion_backward_row_w<V>(
      row, ts, logit_space, detach_weights, /*want_gt=*/true, g_p,
      [&](int k) { return member_e<V>(row, k, st, ts) * st.invS; }, get_gw, put_gz);
}

// ---------------------------------------------------------------------------------------------
// Collaborative loss of one row (MATH.md §2), and, with compute_grad, dloss/dz_k and dloss/dtau
// of that row (unreduced). Weights: alpha member BCE, beta ensemble BCE, gamma distillation to
// the detached ensemble, delta mutual learning between members.
// ---------------------------------------------------------------------------------------------
struct LossWeights {
  double alpha, beta, gamma, delta;
};

template <typename V>
struct LossRowOut {
  V loss;
  V p;
  V gtau;
};

template <typename V, typename Row, typename PutGZ>
CETNET_HD LossRowOut<V> collaborative_loss_row(const Row& row, V y, const TempScale<V>& ts,
                                               bool logit_space,
                                               bool detach_weights, const LossWeights& lw,
                                               bool compute_grad, PutGZ put_gz) {
  const int K = row.K;
  const V one(1);
  const V alpha(lw.alpha), beta(lw.beta), gamma(lw.gamma), delta(lw.delta);
  const bool use_a = lw.alpha != 0, use_b = lw.beta != 0, use_g = lw.gamma != 0;
  const bool use_d = lw.delta != 0 && K > 1;
  const bool need_logs = use_b || use_g;
  const FusionStats<V> st = fusion_stats<V>(row, ts, logit_space, need_logs);
  const V p = st.p;
  const V q = st.q;  // 1 - p, exact near p = 1 (p itself would round to 1)

  LossRowOut<V> out;
  out.p = p;
  out.gtau = V(0);
  V loss(0);
  V P(0), C(0), Q(0);  // sums over members, for the mutual term
  for (int k = 0; k < K; ++k) {
    const Elem<V>& el = row.elem(k);
    if (use_a) loss = loss + alpha * (-el.lsq - y * el.z);  // softplus(z) - y z
    if (use_g) loss = loss + gamma * (p * (st.logp - el.lsp) + q * (st.log1mp - el.lsq));
    if (use_d) {
      P = P + el.p;
      Q = Q + el.q;
      C = C + el.c;
    }
  }
  if (use_b) loss = loss - beta * (y * st.logp + (one - y) * st.log1mp);
  const V inv_km1(use_d ? 1.0 / (K - 1) : 0.0);
  if (use_d) {
    // sum_{j != k} KL(p_j || p_k) = (C - c_k) - (P - p_k) log p_k - (Q - q_k) log(1 - p_k)
    for (int k = 0; k < K; ++k) {
      const Elem<V>& el = row.elem(k);
      loss = loss + delta * inv_km1 * ((C - el.c) - (P - el.p) * el.lsp - (Q - el.q) * el.lsq);
    }
  }
  out.loss = loss;
  if (!compute_grad) return out;

  // Temperature: only the ensemble BCE depends on tau (the gamma/delta targets are detached).
  if (use_b && !detach_weights) {
    // With sum_k w_k = sum_k a_k = sum_k b_k = 1 and d_k = c_k - max_j c_j:
    //   sum_k a_k c_k - cbar = sum_k (a_k - w_k) d_k,  sum_k w_k z_k c_k - z_f cbar
    //   = sum_k w_k (z_k - z_f) d_k.
    // The confidences differ by far less than their size, so the plain sums would lose the
    // result to the rounding of cbar (percents at tau = 1e-3 in float32); these forms keep it,
    // and are exactly 0 for one-hot weights at any tau.
    V s1(0), s2(0);
    for (int k = 0; k < K; ++k) {
      const Elem<V>& el = row.elem(k);
      const V e = member_e<V>(row, k, st, ts);
      const V w = e * st.invS;
      const V d = el.c - st.m;
      if (logit_space) {
        s1 = s1 + w * (el.z - st.zf) * d;
      } else {
        V a, b;
        member_ratios<V>(el, e, st, ts, a, b);
        s1 = s1 + (a - w) * d;
        s2 = s2 + (b - w) * d;
      }
    }
    if (logit_space) {
      // d BCE/dtau = (p - y) dz_f/dtau, dz_f/dtau = -(1/tau^2) sum_k w_k (z_k - z_f) d_k
      out.gtau = -beta * (p - y) * ts(ts(s1));
    } else {
      out.gtau = beta * ts(ts(y * s1 + (one - y) * s2));
    }
  }
  for (int j = 0; j < K; ++j) {
    const Elem<V>& el = row.elem(j);
    V g(0);
    if (use_a) g = g + alpha * (el.p - y);
    if (use_g) g = g + gamma * (el.p - p);
    if (use_d) g = g + delta * inv_km1 * (V(K) * el.p - P);
    if (use_b) {
      // (weight x the 1 + x/tau of the softmax) as weight + (weight x x)/tau: a weight that
      // underflowed to 0 gives 0, not 0 * inf.
      const V e = member_e<V>(row, j, st, ts);
      if (logit_space) {
        const V w = e * st.invS;
        const V wbr = detach_weights ? w : w + ts(w * el.z * el.p * el.q * (el.z - st.zf));
        g = g + beta * (p - y) * wbr;
      } else {
        V a, b;
        member_ratios<V>(el, e, st, ts, a, b);
        const V rho = (one - y) * (b * el.p) - y * (a * el.q);  // r_j/(1-p), r_j/p terms
        // p_j - p with p as summed: exactly 0 for the winner of one-hot weights.
        const V rbr = detach_weights ? rho : rho + ts(rho * el.z * (el.p - st.pw));
        g = g + beta * rbr;
      }
    }
    put_gz(j, g);
  }
  return out;
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet
