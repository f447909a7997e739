// CUDA kernels of the KDEF loss (contract: cetnet_kernels.reference.kdef_loss_reference; the math
// and the layout of the gradient coefficients are those of cetnet_kernels/triton/kdef.py).
//
// With p = sigmoid(z) (q = 1 - p exact), teacher pT_b = sigmoid((1/K) sum_k z_bk):
//   s_k = 1 - (1/B) sum_b |y_b - p_bk|     M_k = (1/B) sum_b (p_bk - pT_b)^2
//   N_ij = (1/B) sum_b (p_bi - p_bj)^2     Lbce = (1/(K B)) sum_{b,k} softplus(z_bk) - y_b z_bk
//   a = softmax(-s), E_j = exp(s_j - max s), Z_i = sum_{l != i} E_l, b_ij = E_j / Z_i,
//   R_i = sum_{j != i} b_ij N_ij, loss = Lbce + sum_k a_k M_k + (1/K) sum_i R_i,
//   G_k = -a_k (M_k - sum_l a_l M_l) + (1/K) sum_{i != k} b_ik (N_ik - R_i).
//
// Four launches on the current stream, no host synchronization:
//   1. Pass 1 (stats kernels): the teacher, and per block one float64 partial of each of the
//      NQ = 2K + K(K-1)/2 + 1 batch sums (|y - p_k| for s, M's, the N pairs i < j, the BCE).
//   2. sum_partials_kernel: the partials of each quantity summed over the blocks in a fixed order.
//   3. kdef_finalize_kernel (one block, float64): a, E, Z, R, G, the loss, and the coefficient
//      vector of pass 2, coef = [E (K), 2a/B (K), 2/(K B Z) (K), G/B (K), sum E, 1/(K B)].
//   4. Pass 2 (grad kernels, with compute_grad): elementwise dloss/dz, the S2S sum in O(K) per
//      row as sum_j E_j (d_k - d_j) = d_k sum E - sum_j E_j d_j with d = p - pT (teacher-centred:
//      the rounding stays proportional to |p - pT|).
//
// Both passes stage row tiles of the logits in shared memory as acc_t, laid out [row][member] with
// an odd pitch P (K or K + 1): the staging loads run along whichever of the logits' two strides
// is smaller (coalesced for row- and column-major inputs alike), and neither those stores nor the
// per-row reads that follow hit a bank twice. The gradient leaves through the same stage with
// coalesced stores ([B, K] contiguous).
//   * K <= 8 (register path, K a template parameter): one thread per row; the row's members, and
//     in pass 1 all NQ of its terms, are held in registers.
//   * K > 8 (general path): the per-row work (teacher, p, BCE, the S2S sum) is done by groups of
//     L = min(32, 2^floor(log2 K)) lanes per row with shuffle sums; in pass 1 each thread then
//     owns up to kMaxSlots quantities and sums their terms over the tile's rows from shared
//     memory. Above 2048 quantities (K > 62) the quantities are split into chunks along
//     gridDim.y, and the blocks of each chunk re-read the rows (the K^2 pair terms dominate by
//     then). A tile of even one row that does not fit in shared memory (K beyond ~11,000 for
//     float, ~5,500 for double) is staged in a global scratch buffer instead.
// Determinism: the terms are summed in acc_t over at most kFlush rows per thread, then in float64:
// across a warp in a fixed shuffle tree, across a block in a fixed order, and across blocks (each
// block owns a contiguous range of row tiles) in a fixed order. No atomics. The pass-1 grid is
// sized by the occupancy calculator (one wave, as in fusion_cuda.cu), so it depends on (B, K,
// dtype) and the device: bitwise reproducible run to run on a device, not across GPU models.
// Indices into global memory are 64-bit.
#include "fusion_math.h"

#include "checks.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace cetnet::cuda {
namespace {

constexpr int kThreads = 256;  // the row-tile kernels
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRegK = 8;         // register path for K <= 8
constexpr int kRegRows = kThreads;  // rows per tile of the register path: one per thread
constexpr int kMaxTileRows = 256;   // rows per tile of the general path, at most
constexpr int kGlobalTileRows = 32;  // rows per tile staged in global memory
// Dynamic shared memory per block, leaving room below 48 KB (no opt-in) for the static arrays.
constexpr size_t kDynSmemBudget = 44 * 1024;
constexpr int kMaxSlots = 8;    // quantities per thread (general pass 1)
constexpr int kFlush = 32;      // terms summed in acc_t before they join a float64 sum
constexpr int kLoadUnroll = 4;  // staging loads in flight per thread
// Pass-1 blocks per SM, at most: each block ends with a flush of its NQ sums (about one tile's
// work), so fewer, longer blocks; 4 x 256 threads still keep enough loads in flight.
constexpr int kPass1BlocksPerSM = 4;
constexpr int64_t kMaxPartials = int64_t{1} << 23;    // float64 elements of the partials (64 MiB)
constexpr int64_t kMaxScratch = int64_t{1} << 26;     // acc_t elements of a global stage
constexpr int kFinalizeThreads = 256;
constexpr int kUseLabel = -1;  // slot operands of the general pass 1 (see stats_kernel)
constexpr int kUseTeacher = -2;

// ---------------------------------------------------------------------------------------------
// Quantity layout of a partials row: [0, K) sum |y - p_k|, [K, 2K) sum (p_k - pT)^2,
// [2K, 2K + K(K-1)/2) sum (p_i - p_j)^2 for i < j (row-major upper triangle), then the BCE sum.
// ---------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ int64_t pair_start(int64_t i, int64_t K) {
  return i * (2 * K - i - 1) / 2;  // i (2K - i - 1) is even
}
__host__ __device__ __forceinline__ int64_t pair_index(int64_t i, int64_t j, int64_t K) {
  return pair_start(i, K) + (j - i - 1);
}
__host__ __device__ __forceinline__ int64_t num_quantities(int64_t K) {
  return 2 * K + K * (K - 1) / 2;
}

// The pair (i, j), i < j, of pair index m: the square-root estimate, then exact integer fix-ups.
__device__ __forceinline__ void pair_of(int64_t m, int K, int& i, int& j) {
  const double k2 = 2.0 * K - 1.0;
  const double disc = fmax(k2 * k2 - 8.0 * static_cast<double>(m), 0.0);
  int64_t ii = static_cast<int64_t>((k2 - sqrt(disc)) * 0.5);
  ii = ii < 0 ? 0 : (ii > K - 2 ? K - 2 : ii);
  while (ii > 0 && pair_start(ii, K) > m) --ii;
  while (ii < K - 2 && pair_start(ii + 1, K) <= m) ++ii;
  i = static_cast<int>(ii);
  j = static_cast<int>(m - pair_start(ii, K) + ii + 1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_of(acc_t z) {
  Elem<acc_t> el;
  (void)set_probs(el, z);
  return el.p;
}

// softplus(z) - y z from z and e = exp(-|z|).
template <typename acc_t>
__device__ __forceinline__ acc_t bce_term(acc_t z, acc_t e, acc_t y) {
  return vmax(z, acc_t(0)) + vlog1p_unit(e) - y * z;
}

// dloss/dz of one member (see the file comment; sgn(0) = 0 as torch.abs's gradient).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_term(acc_t p, acc_t q, acc_t y, acc_t pt, acc_t wd,
                                           acc_t esum, acc_t cbce, acc_t ca, acc_t cs, acc_t cg) {
  const acc_t d = p - pt;
  const acc_t sg = y > p ? acc_t(1) : (y < p ? acc_t(-1) : acc_t(0));
  return (p - y) * cbce + (p * q) * (ca * d + cs * (d * esum - wd) + sg * cg);
}

// The dynamic shared memory of a block.
template <typename T>
__device__ __forceinline__ T* shared_cache() {
  extern __shared__ __align__(sizeof(double)) unsigned char kdef_smem[];
  return reinterpret_cast<T*>(kdef_smem);
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions.
// ---------------------------------------------------------------------------------------------
struct SumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {  // NaN-propagating
  __device__ __forceinline__ double operator()(double a, double b) const { return vmax(a, b); }
};
struct MinOp {  // NaN-propagating
  __device__ __forceinline__ double operator()(double a, double b) const {
    return (a != a || a < b) ? a : b;
  }
};

// op over the block (blockDim.x a multiple of 32) in a fixed tree, returned to every thread.
// All threads of the block must call it (it synchronizes).
template <typename Op>
__device__ __forceinline__ double block_reduce(double v, Op op, double identity) {
  __shared__ double warp_vals[32];
  __shared__ double result;
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  __syncthreads();  // the previous call's readers are done
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? warp_vals[lane] : identity;
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// Sum over an aligned group of L lanes (L a power of two <= 32), as lane 0 of the group forms it
// (a fixed order), returned to the whole group. Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int L) {
  for (int off = L >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0, L);
}

// ---------------------------------------------------------------------------------------------
// Row tiles.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Logits {
  const scalar_t* z;  // [B, K], any strides
  int64_t s0, s1;
  int64_t B;
  int K;
  bool rows_fast;  // stage along the rows (s0 < s1: column-major-like) instead of the members
};

// Position (a, b) = (i / inner, i % inner) of a flat index i advancing by `step`, without a
// division per step.
struct Walk {
  int a, b, da, db, inner;
  __device__ __forceinline__ Walk(int start, int step, int inner_) : inner(inner_) {
    a = start / inner;
    b = start - a * inner;
    da = step / inner;
    db = step - da * inner;
  }
  __device__ __forceinline__ void next() {
    a += da;
    b += db;
    if (b >= inner) {
      b -= inner;
      ++a;
    }
  }
};

// Stages rows [b0, b0 + n) of the logits as acc_t at stage[r * P + k]. Consecutive threads take
// consecutive elements along the smaller stride; kLoadUnroll loads are issued before their stores.
// The caller synchronizes before reading the stage.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const Logits<scalar_t>& x, int64_t b0, int n, int P,
                                          acc_t* stage) {
  const int T = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int cnt = n * x.K;
  const scalar_t* base = x.z + b0 * x.s0;
  Walk w(tid, T, x.rows_fast ? n : x.K);
  for (int i = tid; i < cnt; i += kLoadUnroll * T) {
    scalar_t v[kLoadUnroll] = {};
    int off[kLoadUnroll];
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int r = x.rows_fast ? w.b : w.a;
      const int k = x.rows_fast ? w.a : w.b;
      off[u] = r * P + k;
      if (i + u * T < cnt) v[u] = base[r * x.s0 + k * x.s1];
      w.next();
    }
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      if (i + u * T < cnt) stage[off[u]] = static_cast<acc_t>(v[u]);
    }
  }
}

// Stores the staged rows [b0, b0 + n) to the contiguous [B, K] output, coalesced.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(scalar_t* out, int64_t b0, int n, int K, int P,
                                           const acc_t* stage) {
  const int T = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int cnt = n * K;
  scalar_t* dst = out + b0 * K;
  Walk w(tid, T, K);
  for (int i = tid; i < cnt; i += T) {
    dst[i] = static_cast<scalar_t>(stage[w.a * P + w.b]);
    w.next();
  }
}

// The teacher probability of a staged row, summed by its group of L lanes (`act`: the group has
// a row; every lane of the warp must call it).
template <typename acc_t>
__device__ __forceinline__ acc_t group_teacher(const acc_t* row, bool act, int K, int li, int L) {
  acc_t zs(0);
  if (act) {
    for (int k = li; k < K; k += L) zs += row[k];
  }
  return sigmoid_of(group_sum(zs, L) / static_cast<acc_t>(K));
}

// ---------------------------------------------------------------------------------------------
// Pass 1.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct StatsArgs {
  Logits<scalar_t> x;
  const acc_t* y;  // labels in acc_t, stride ys
  int64_t ys;
  scalar_t* teacher;   // [B]
  double* partials;    // [gridDim.x, NQ]
  acc_t* gstage;       // global stage (one stage_elems slice per block), or null: shared memory
  int64_t stage_elems;
  int64_t tiles_per_block;  // block x owns row tiles [x * tiles_per_block, ...)
  int64_t Q;                // quantities but the BCE (NQ = Q + 1)
  int64_t C;                // quantities per chunk: W * J
  int64_t nchunks;
  int TR, P;  // rows per tile, stage pitch
  int W, G, J;  // general path: quantity lanes, row groups (thread = g * W + w), slots per thread
  int L;        // general path: lanes per row
};

// Adds the warp's sum of each f[q] (a fixed shuffle tree, in float64) to wacc[q / 32] of lane
// q % 32, and clears f. Every lane of the warp must call it.
template <typename acc_t, int kNQ>
__device__ __forceinline__ void warp_flush(acc_t (&f)[kNQ], double (&wacc)[(kNQ + 31) / 32],
                                           int lane) {
#pragma unroll
  for (int q = 0; q < kNQ; ++q) {
    double v = static_cast<double>(f[q]);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == q % 32) wacc[q / 32] += v;
    f[q] = acc_t(0);
  }
}

// Register path (K = kK <= 8): one row per thread, its NQ terms in registers. Tiles of kRegRows
// rows, so each thread sums at most kFlush rows in acc_t between flushes.
template <typename scalar_t, typename acc_t, int kK>
__global__ void __launch_bounds__(kThreads)
    kdef_stats_reg_kernel(StatsArgs<scalar_t, acc_t> a) {
  constexpr int kQ = 2 * kK + kK * (kK - 1) / 2;
  constexpr int kNQ = kQ + 1;
  constexpr int kP = kK | 1;
  acc_t* stage = shared_cache<acc_t>();
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  acc_t f[kNQ];
#pragma unroll
  for (int q = 0; q < kNQ; ++q) f[q] = acc_t(0);
  double wacc[(kNQ + 31) / 32] = {};

  const int64_t ntiles = (a.x.B + kRegRows - 1) / kRegRows;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block;
  const int64_t t1 = std::min(ntiles, t0 + a.tiles_per_block);
  int since_flush = 0;
  for (int64_t t = t0; t < t1; ++t) {  // block-uniform
    const int64_t b0 = t * kRegRows;
    const int n = static_cast<int>(std::min<int64_t>(kRegRows, a.x.B - b0));
    const acc_t y = tid < n ? a.y[(b0 + tid) * a.ys] : acc_t(0);  // issued with the tile's loads
    load_tile(a.x, b0, n, kP, stage);
    __syncthreads();  // the tile is staged
    if (tid < n) {
      const acc_t* row = stage + tid * kP;
      acc_t z[kK], p[kK];
      acc_t zs(0);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        z[k] = row[k];
        zs += z[k];
      }
      const acc_t pt = sigmoid_of(zs / static_cast<acc_t>(kK));
      a.teacher[b0 + tid] = static_cast<scalar_t>(pt);
      acc_t bce(0);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        Elem<acc_t> el;
        const acc_t e = set_probs(el, z[k]);
        p[k] = el.p;
        bce += bce_term(z[k], e, y);
        f[k] += vabs(y - p[k]);
        const acc_t d = p[k] - pt;
        f[kK + k] += d * d;
      }
#pragma unroll
      for (int i = 0; i < kK; ++i) {
#pragma unroll
        for (int j = i + 1; j < kK; ++j) {
          const acc_t d = p[i] - p[j];
          f[2 * kK + pair_index(i, j, kK)] += d * d;
        }
      }
      f[kQ] += bce;
    }
    __syncthreads();  // the stage may be refilled
    if (++since_flush == kFlush) {
      warp_flush(f, wacc, lane);
      since_flush = 0;
    }
  }
  warp_flush(f, wacc, lane);
  // The warps' sums, added in warp order (the stage is free: the loop ended on a barrier).
  double* ws = shared_cache<double>();
#pragma unroll
  for (int j = 0; j < (kNQ + 31) / 32; ++j) {
    const int q = lane + 32 * j;
    if (q < kNQ) ws[warp * kNQ + q] = wacc[j];
  }
  __syncthreads();
  for (int q = tid; q < kNQ; q += kThreads) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += ws[w * kNQ + q];
    a.partials[static_cast<int64_t>(blockIdx.x) * kNQ + q] = s;
  }
}

// General path (K > 8). Per tile: the row groups form the teacher, the BCE and p (in place of z);
// then thread (g, w) adds, for each of its slots, the slot's term of rows g, g + G, ...
// A slot is quantity q = chunk * C + w + j * W: operands (sa, sb) = (k, kUseLabel) for |y - p_k|,
// (k, kUseTeacher) for (p_k - pT)^2, (i, j) for (p_i - p_j)^2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) kdef_stats_kernel(StatsArgs<scalar_t, acc_t> a) {
  __shared__ double red[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int K = a.x.K, P = a.P, TR = a.TR, L = a.L, W = a.W, G = a.G, J = a.J;
  acc_t* stage =
      a.gstage != nullptr
          ? a.gstage + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * a.stage_elems
          : shared_cache<acc_t>();
  acc_t* ys = stage + TR * P;  // labels of the tile's rows
  acc_t* pts = ys + TR;        // their teacher probabilities
  const int64_t NQ = a.Q + 1;
  const int64_t ntiles = (a.x.B + TR - 1) / TR;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block;
  const int64_t t1 = std::min(ntiles, t0 + a.tiles_per_block);
  const int li = tid % L, gid = tid / L, ngroups = kThreads / L;
  const bool owner = tid < G * W;
  const int g = tid / W, w = tid % W;
  double bce_d = 0.0;  // this thread's BCE terms (chunk 0)
  acc_t bce_f(0);
  int bce_n = 0;

  for (int64_t c = blockIdx.y; c < a.nchunks; c += gridDim.y) {  // block-uniform
    int sa[kMaxSlots], sb[kMaxSlots];
    int ns = 0;  // the valid slots are a prefix: q grows with j
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
      const int64_t q = c * a.C + w + static_cast<int64_t>(j) * W;
      sa[j] = 0;
      sb[j] = kUseLabel;
      if (owner && j < J && q < a.Q) {
        if (q < K) {
          sa[j] = static_cast<int>(q);
        } else if (q < 2 * K) {
          sa[j] = static_cast<int>(q - K);
          sb[j] = kUseTeacher;
        } else {
          pair_of(q - 2 * K, K, sa[j], sb[j]);
        }
        ns = j + 1;
      }
    }
    double acc[kMaxSlots];
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) acc[j] = 0.0;

    for (int64_t t = t0; t < t1; ++t) {  // block-uniform
      const int64_t b0 = t * TR;
      const int n = static_cast<int>(std::min<int64_t>(TR, a.x.B - b0));
      for (int r = tid; r < n; r += kThreads) ys[r] = a.y[(b0 + r) * a.ys];
      load_tile(a.x, b0, n, P, stage);
      __syncthreads();  // the tile is staged
      for (int r0 = 0; r0 < n; r0 += ngroups) {  // block-uniform: the shuffles need whole warps
        const int r = r0 + gid;
        const bool act = r < n;
        acc_t* row = stage + (act ? r : 0) * P;
        const acc_t pt = group_teacher(row, act, K, li, L);
        if (act) {
          if (li == 0) {
            pts[r] = pt;
            if (c == 0) a.teacher[b0 + r] = static_cast<scalar_t>(pt);
          }
          const acc_t y = ys[r];
          for (int k = li; k < K; k += L) {
            Elem<acc_t> el;
            const acc_t z = row[k];
            const acc_t e = set_probs(el, z);
            if (c == 0) {
              bce_f += bce_term(z, e, y);
              if (++bce_n == kFlush) {
                bce_d += static_cast<double>(bce_f);
                bce_f = acc_t(0);
                bce_n = 0;
              }
            }
            row[k] = el.p;
          }
        }
      }
      __syncthreads();  // p, y and pT of every row are staged
      if (ns > 0) {
        for (int r0 = g; r0 < n; r0 += G * kFlush) {
          acc_t fs[kMaxSlots];
#pragma unroll
          for (int j = 0; j < kMaxSlots; ++j) fs[j] = acc_t(0);
          const int r1 = std::min(n, r0 + G * kFlush);
          for (int r = r0; r < r1; r += G) {
            const acc_t* row = stage + r * P;
            const acc_t yr = ys[r], pt = pts[r];
#pragma unroll
            for (int j = 0; j < kMaxSlots; ++j) {
              if (j < ns) {
                const acc_t u = row[sa[j]];
                const acc_t v = sb[j] >= 0 ? row[sb[j]] : (sb[j] == kUseLabel ? yr : pt);
                const acc_t d = u - v;
                fs[j] += sb[j] == kUseLabel ? vabs(d) : d * d;
              }
            }
          }
#pragma unroll
          for (int j = 0; j < kMaxSlots; ++j) acc[j] += static_cast<double>(fs[j]);
        }
      }
      __syncthreads();  // the stage may be refilled
    }
    // Each quantity: its G row groups in group order.
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
      if (j < J) {  // block-uniform
        red[tid] = owner ? acc[j] : 0.0;
        __syncthreads();
        const int64_t q = c * a.C + tid + static_cast<int64_t>(j) * W;
        if (tid < W && q < a.Q) {
          double s = 0.0;
          for (int gg = 0; gg < G; ++gg) s += red[gg * W + tid];
          a.partials[static_cast<int64_t>(blockIdx.x) * NQ + q] = s;
        }
        __syncthreads();
      }
    }
  }
  if (blockIdx.y == 0) {  // block-uniform: the chunk-0 blocks own the BCE
    const double s = block_reduce(bce_d + static_cast<double>(bce_f), SumOp{}, 0.0);
    if (tid == 0) a.partials[static_cast<int64_t>(blockIdx.x) * NQ + a.Q] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Partials -> totals -> coefficients.
// ---------------------------------------------------------------------------------------------
// tot[q] = sum over the nb blocks of partials[b, q]: block (32, 32), x the quantity lane, y the
// block lane; each thread sums its blocks in order, then y-lane 0 sums the 32 lanes in order.
__global__ void __launch_bounds__(1024)
    sum_partials_kernel(const double* __restrict__ partials, int64_t nb, int64_t NQ,
                        double* __restrict__ tot) {
  __shared__ double lanes[32][33];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  for (int64_t q0 = static_cast<int64_t>(blockIdx.x) * 32; q0 < NQ;
       q0 += static_cast<int64_t>(gridDim.x) * 32) {
    const int64_t q = q0 + tx;
    double s = 0.0;
    if (q < NQ) {
      for (int64_t b = ty; b < nb; b += 32) s += partials[b * NQ + q];
    }
    lanes[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && q < NQ) {
      double t = 0.0;
      for (int l = 0; l < 32; ++l) t += lanes[l][tx];
      tot[q] = t;
    }
    __syncthreads();
  }
}

// The K-sized math in float64, one block. ws: 6K doubles of scratch. coef: null without
// compute_grad.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    kdef_finalize_kernel(const double* __restrict__ tot, int K, int64_t B, double* __restrict__ ws,
                         acc_t* __restrict__ loss, acc_t* __restrict__ coef) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const double Bd = static_cast<double>(B), Kd = static_cast<double>(K);
  const double inf = std::numeric_limits<double>::infinity();
  double* s = ws;
  double* M = ws + K;
  double* a = ws + 2 * K;
  double* E = ws + 3 * K;
  double* Z = ws + 4 * K;
  double* R = ws + 5 * K;
  const double* N = tot + 2 * static_cast<int64_t>(K);  // pair sums
  const auto nij = [&](int i, int j) {  // N_ij, i != j
    return N[i < j ? pair_index(i, j, K) : pair_index(j, i, K)] / Bd;
  };
  // Each thread owns the members k = tid, tid + T, ...: what it writes for them it reads back
  // without a barrier; other threads read them after a block_reduce (which synchronizes).
  double smax = -inf, smin = inf;
  for (int k = tid; k < K; k += T) {
    s[k] = 1.0 - tot[k] / Bd;
    M[k] = tot[K + k] / Bd;
    smax = vmax(smax, s[k]);
    smin = MinOp{}(smin, s[k]);
  }
  smax = block_reduce(smax, MaxOp{}, -inf);
  smin = block_reduce(smin, MinOp{}, inf);
  double sa = 0.0, se = 0.0;
  for (int k = tid; k < K; k += T) {
    a[k] = exp(smin - s[k]);  // softmax(-s), unnormalized
    E[k] = exp(s[k] - smax);
    sa += a[k];
    se += E[k];
  }
  sa = block_reduce(sa, SumOp{}, 0.0);
  se = block_reduce(se, SumOp{}, 0.0);
  double am = 0.0;
  for (int k = tid; k < K; k += T) {
    a[k] /= sa;
    am += a[k] * M[k];
  }
  am = block_reduce(am, SumOp{}, 0.0);  // also publishes a and E
  double sr = 0.0;
  for (int i = tid; i < K; i += T) {
    double z = 0.0, r = 0.0;
    for (int l = 0; l < K; ++l) {
      if (l != i) {
        z += E[l];
        r += E[l] * nij(i, l);
      }
    }
    Z[i] = z;
    R[i] = K > 1 ? r / z : 0.0;
    sr += R[i];
  }
  sr = block_reduce(sr, SumOp{}, 0.0);  // also publishes Z and R
  if (tid == 0) loss[0] = static_cast<acc_t>(tot[num_quantities(K)] / (Kd * Bd) + am + sr / Kd);
  if (coef == nullptr) return;
  for (int k = tid; k < K; k += T) {
    double gs = 0.0;
    for (int i = 0; i < K; ++i) {
      if (i != k) gs += (nij(i, k) - R[i]) / Z[i];
    }
    const double G = -a[k] * (M[k] - am) + E[k] * gs / Kd;
    coef[k] = static_cast<acc_t>(E[k]);
    coef[K + k] = static_cast<acc_t>(2.0 * a[k] / Bd);
    coef[2 * K + k] = static_cast<acc_t>(K > 1 ? 2.0 / (Kd * Bd * Z[k]) : 0.0);
    coef[3 * K + k] = static_cast<acc_t>(G / Bd);
  }
  if (tid == 0) {
    coef[4 * K] = static_cast<acc_t>(se);
    coef[4 * K + 1] = static_cast<acc_t>(1.0 / (Kd * Bd));
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct GradArgs {
  Logits<scalar_t> x;
  const acc_t* y;
  int64_t ys;
  const acc_t* coef;  // [4K + 2], see the file comment
  scalar_t* out;      // [B, K] contiguous
  acc_t* gstage;      // global stage (one TR * P slice per block), or null: shared memory
  int TR, P, L;
};

// Register path (K = kK <= 8): one row per thread, tiles of kRegRows rows.
template <typename scalar_t, typename acc_t, int kK>
__global__ void __launch_bounds__(kThreads) kdef_grad_reg_kernel(GradArgs<scalar_t, acc_t> a) {
  constexpr int kP = kK | 1;
  acc_t* stage = shared_cache<acc_t>();
  const int tid = static_cast<int>(threadIdx.x);
  acc_t E[kK], ca[kK], cs[kK], cg[kK];
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    E[k] = a.coef[k];
    ca[k] = a.coef[kK + k];
    cs[k] = a.coef[2 * kK + k];
    cg[k] = a.coef[3 * kK + k];
  }
  const acc_t esum = a.coef[4 * kK], cbce = a.coef[4 * kK + 1];
  const int64_t ntiles = (a.x.B + kRegRows - 1) / kRegRows;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {  // block-uniform
    const int64_t b0 = t * kRegRows;
    const int n = static_cast<int>(std::min<int64_t>(kRegRows, a.x.B - b0));
    const acc_t y = tid < n ? a.y[(b0 + tid) * a.ys] : acc_t(0);
    load_tile(a.x, b0, n, kP, stage);
    __syncthreads();  // the tile is staged
    if (tid < n) {
      acc_t* row = stage + tid * kP;
      acc_t z[kK], p[kK], q[kK];
      acc_t zs(0);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        z[k] = row[k];
        zs += z[k];
      }
      const acc_t pt = sigmoid_of(zs / static_cast<acc_t>(kK));
      acc_t wd(0);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        Elem<acc_t> el;
        (void)set_probs(el, z[k]);
        p[k] = el.p;
        q[k] = el.q;
        wd += E[k] * (p[k] - pt);
      }
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        row[k] = grad_term(p[k], q[k], y, pt, wd, esum, cbce, ca[k], cs[k], cg[k]);
      }
    }
    __syncthreads();  // the gradient rows are staged
    store_tile(a.out, b0, n, kK, kP, stage);
    __syncthreads();  // the stage may be refilled
  }
}

// General path (K > 8): groups of L lanes per row; p and q are recomputed from the staged logit
// in the sweep that needs them.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) kdef_grad_kernel(GradArgs<scalar_t, acc_t> a) {
  const int tid = static_cast<int>(threadIdx.x);
  const int K = a.x.K, P = a.P, TR = a.TR, L = a.L;
  acc_t* stage = a.gstage != nullptr
                     ? a.gstage + static_cast<int64_t>(blockIdx.x) * TR * P
                     : shared_cache<acc_t>();
  const int li = tid % L, gid = tid / L, ngroups = kThreads / L;
  const acc_t* E = a.coef;
  const acc_t* ca = a.coef + K;
  const acc_t* cs = a.coef + 2 * K;
  const acc_t* cg = a.coef + 3 * K;
  const acc_t esum = a.coef[4 * K], cbce = a.coef[4 * K + 1];
  const int64_t ntiles = (a.x.B + TR - 1) / TR;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {  // block-uniform
    const int64_t b0 = t * TR;
    const int n = static_cast<int>(std::min<int64_t>(TR, a.x.B - b0));
    load_tile(a.x, b0, n, P, stage);
    __syncthreads();  // the tile is staged
    for (int r0 = 0; r0 < n; r0 += ngroups) {  // block-uniform: the shuffles need whole warps
      const int r = r0 + gid;
      const bool act = r < n;
      acc_t* row = stage + (act ? r : 0) * P;
      const acc_t pt = group_teacher(row, act, K, li, L);
      acc_t wd(0);
      if (act) {
        for (int k = li; k < K; k += L) wd += E[k] * (sigmoid_of(row[k]) - pt);
      }
      wd = group_sum(wd, L);
      if (act) {
        const acc_t y = a.y[(b0 + r) * a.ys];
        for (int k = li; k < K; k += L) {
          Elem<acc_t> el;
          (void)set_probs(el, row[k]);
          row[k] = grad_term(el.p, el.q, y, pt, wd, esum, cbce, ca[k], cs[k], cg[k]);
        }
      }
    }
    __syncthreads();  // the gradient rows are staged
    store_tile(a.out, b0, n, K, P, stage);
    __syncthreads();  // the stage may be refilled
  }
}

// ---------------------------------------------------------------------------------------------
// Launch plans.
// ---------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most rows (a power of two <= kMaxTileRows) whose stage of per_row acc_t values fits the
// shared-memory budget; 0 if not even one row does.
template <typename acc_t>
int fit_tile_rows(int64_t per_row) {
  for (int tr = kMaxTileRows; tr >= 1; tr /= 2) {
    if (static_cast<int64_t>(tr) * per_row * static_cast<int64_t>(sizeof(acc_t)) <=
        static_cast<int64_t>(kDynSmemBudget)) {
      return tr;
    }
  }
  return 0;
}

int row_lanes(int K) {
  int L = 1;
  while (L < 32 && 2 * L <= K) L *= 2;
  return L;
}

struct StatsPlan {
  bool reg;
  bool global;  // the stage is in global memory
  int TR, P, W, G, J, L;
  int64_t Q, NQ, C, nchunks, stage_elems, tiles_per_block;
  unsigned int gx, gy;
  size_t smem;
};

template <typename acc_t>
StatsPlan stats_plan(int K) {
  StatsPlan sp{};
  sp.reg = K <= kMaxRegK;
  sp.P = K | 1;
  sp.Q = num_quantities(K);
  sp.NQ = sp.Q + 1;
  sp.W = sp.G = sp.J = sp.L = 1;
  sp.C = sp.Q;
  sp.nchunks = 1;
  if (sp.reg) {
    sp.TR = kRegRows;
    sp.stage_elems = static_cast<int64_t>(kRegRows) * sp.P;
    sp.smem = std::max<size_t>(sp.stage_elems * sizeof(acc_t),
                               static_cast<size_t>(kWarps) * sp.NQ * sizeof(double));
  } else {
    const int64_t per_row = static_cast<int64_t>(sp.P) + 2;  // the row, its label and teacher
    sp.TR = fit_tile_rows<acc_t>(per_row);
    sp.global = sp.TR == 0;
    if (sp.global) sp.TR = kGlobalTileRows;
    sp.stage_elems = static_cast<int64_t>(sp.TR) * per_row;
    sp.smem = sp.global ? 0 : static_cast<size_t>(sp.stage_elems) * sizeof(acc_t);
    // Slots per thread J, quantity lanes W = ceil(Q / J) and row groups G = kThreads / W: a
    // thread's work per tile is J slots x TR / G rows, so the least J / G (K = 16: J = 3, W = 51,
    // G = 5 keeps 255 threads busy where J = 1 would idle 104). Above kMaxSlots * kThreads
    // quantities: J = kMaxSlots, W = kThreads, and several chunks.
    sp.J = kMaxSlots;
    sp.W = kThreads;
    sp.G = 1;
    for (int j = 1; j <= kMaxSlots; ++j) {
      const int64_t w = ceil_div(sp.Q, j);
      if (w > kThreads) continue;
      const int g = kThreads / static_cast<int>(w);
      if (j * sp.G < sp.J * g) {  // j / g < J / G
        sp.J = j;
        sp.W = static_cast<int>(w);
        sp.G = g;
      }
    }
    sp.C = static_cast<int64_t>(sp.W) * sp.J;
    sp.nchunks = ceil_div(sp.Q, sp.C);
    sp.L = row_lanes(K);
  }
  return sp;
}

// The pass-1 grid for `kernel`: about one wave of blocks (rows x chunks), each row block owning
// a contiguous range of tiles, within the partials' and the global stage's budgets.
template <typename Kernel>
void stats_grid(StatsPlan& sp, Kernel kernel, int64_t B) {
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, sp.smem));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t target = static_cast<int64_t>(prop->multiProcessorCount) *
                         std::min(std::max(per_sm, 1), kPass1BlocksPerSM);
  const int64_t ntiles = ceil_div(B, sp.TR);
  int64_t gy = std::min<int64_t>(sp.nchunks, 65535);
  if (sp.global) gy = std::min(gy, std::max<int64_t>(1, kMaxScratch / sp.stage_elems));
  int64_t nb = std::min(ntiles, std::max<int64_t>(1, ceil_div(target, gy)));
  nb = std::min(nb, std::max<int64_t>(1, kMaxPartials / sp.NQ));
  if (sp.global) nb = std::min(nb, std::max<int64_t>(1, kMaxScratch / (sp.stage_elems * gy)));
  sp.tiles_per_block = ceil_div(ntiles, nb);
  nb = ceil_div(ntiles, sp.tiles_per_block);  // every block has a tile
  sp.gx = static_cast<unsigned int>(nb);
  sp.gy = static_cast<unsigned int>(gy);
}

// Pass 2's grid: as many blocks as fit on the device at once, at most one per tile (no reduction:
// the device may decide).
template <typename Kernel>
unsigned int grad_blocks(Kernel kernel, size_t smem, int64_t ntiles, int64_t cap) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident =
      std::max<int64_t>(1, static_cast<int64_t>(prop->multiProcessorCount) * std::max(per_sm, 1));
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min({ntiles, resident, cap})));
}

// f(std::integral_constant<int, K>) for K in [1, kMaxRegK].
template <typename F>
void with_reg_k(int K, F&& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "kdef_loss: no register path for K = ", K);
  }
}
static_assert(kMaxRegK == 8, "with_reg_k covers K = 1..8");

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kdef_loss(const at::Tensor& logits,
                                                         const at::Tensor& labels,
                                                         bool compute_grad) {
  const char* op = "cetnet::kdef_loss";
  check_kdef_args(logits, labels, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const auto acc_dtype = acc_type_of(logits);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  const auto f64_opts = logits.options().dtype(at::kDouble);
  at::Tensor teacher = at::empty({B}, logits.options());
  at::Tensor grad = grad_logits_out(logits, compute_grad);
  if (B == 0) return {at::zeros({}, acc_opts), teacher, grad};
  // The stage is indexed in int (rows x pitch): only a K whose K^2 partials could never be
  // allocated comes near the limit.
  TORCH_CHECK(static_cast<int64_t>(kGlobalTileRows) * ((K | 1) + 2) <=
                  std::numeric_limits<int>::max(),
              op, ": K = ", K, " members is beyond the CUDA kernels' indexing");
  at::Tensor loss = at::empty({}, acc_opts);
  const at::Tensor y = labels.to(acc_dtype);  // label values are checked by the Python layer
  const bool rows_fast = K == 1 || logits.stride(0) < logits.stride(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kdef_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Logits<scalar_t> x{logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                             B, K, rows_fast};
    const acc_t* y_ptr = y.const_data_ptr<acc_t>();

    // Pass 1.
    StatsPlan sp = stats_plan<acc_t>(K);
    if (sp.reg) {
      with_reg_k(K, [&](auto kc) {
        stats_grid(sp, kdef_stats_reg_kernel<scalar_t, acc_t, decltype(kc)::value>, B);
      });
    } else {
      stats_grid(sp, kdef_stats_kernel<scalar_t, acc_t>, B);
    }
    at::Tensor partials = at::empty({static_cast<int64_t>(sp.gx), sp.NQ}, f64_opts);
    at::Tensor gstage1 =
        sp.global ? at::empty({static_cast<int64_t>(sp.gx) * sp.gy * sp.stage_elems}, acc_opts)
                  : at::Tensor();
    StatsArgs<scalar_t, acc_t> sa{x,
                                  y_ptr,
                                  y.stride(0),
                                  teacher.mutable_data_ptr<scalar_t>(),
                                  partials.mutable_data_ptr<double>(),
                                  sp.global ? gstage1.mutable_data_ptr<acc_t>() : nullptr,
                                  sp.stage_elems,
                                  sp.tiles_per_block,
                                  sp.Q,
                                  sp.C,
                                  sp.nchunks,
                                  sp.TR,
                                  sp.P,
                                  sp.W,
                                  sp.G,
                                  sp.J,
                                  sp.L};
    if (sp.reg) {
      with_reg_k(K, [&](auto kc) {
        constexpr int kK = decltype(kc)::value;
        kdef_stats_reg_kernel<scalar_t, acc_t, kK><<<sp.gx, kThreads, sp.smem, stream>>>(sa);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      kdef_stats_kernel<scalar_t, acc_t>
          <<<dim3(sp.gx, sp.gy), kThreads, sp.smem, stream>>>(sa);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // Totals (when there are several blocks) and the K-sized math.
    const bool several = sp.gx > 1;
    at::Tensor work = at::empty({(several ? sp.NQ : 0) + 6 * static_cast<int64_t>(K)}, f64_opts);
    double* work_ptr = work.mutable_data_ptr<double>();
    const double* tot = partials.const_data_ptr<double>();
    if (several) {
      const unsigned int rb =
          static_cast<unsigned int>(std::min<int64_t>(ceil_div(sp.NQ, 32), 4096));
      sum_partials_kernel<<<rb, dim3(32, 32), 0, stream>>>(tot, sp.gx, sp.NQ, work_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tot = work_ptr;
    }
    at::Tensor coef = compute_grad ? at::empty({4 * static_cast<int64_t>(K) + 2}, acc_opts)
                                   : at::Tensor();
    kdef_finalize_kernel<acc_t><<<1, kFinalizeThreads, 0, stream>>>(
        tot, K, B, work_ptr + (several ? sp.NQ : 0), loss.mutable_data_ptr<acc_t>(),
        compute_grad ? coef.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!compute_grad) return;

    // Pass 2.
    GradArgs<scalar_t, acc_t> ga{x,
                                 y_ptr,
                                 y.stride(0),
                                 coef.const_data_ptr<acc_t>(),
                                 grad.mutable_data_ptr<scalar_t>(),
                                 /*gstage=*/nullptr,
                                 /*TR=*/0,
                                 /*P=*/K | 1,
                                 /*L=*/row_lanes(K)};
    if (K <= kMaxRegK) {
      ga.TR = kRegRows;
      const size_t smem = static_cast<size_t>(kRegRows) * ga.P * sizeof(acc_t);
      const int64_t ntiles = ceil_div(B, kRegRows);
      with_reg_k(K, [&](auto kc) {
        constexpr int kK = decltype(kc)::value;
        const auto kernel = kdef_grad_reg_kernel<scalar_t, acc_t, kK>;
        const unsigned int blocks = grad_blocks(kernel, smem, ntiles, ntiles);
        kernel<<<blocks, kThreads, smem, stream>>>(ga);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      ga.TR = fit_tile_rows<acc_t>(ga.P);
      const bool global = ga.TR == 0;
      if (global) ga.TR = kGlobalTileRows;
      const int64_t stage_elems = static_cast<int64_t>(ga.TR) * ga.P;
      const size_t smem = global ? 0 : static_cast<size_t>(stage_elems) * sizeof(acc_t);
      const int64_t ntiles = ceil_div(B, ga.TR);
      const auto kernel = kdef_grad_kernel<scalar_t, acc_t>;
      const unsigned int blocks = grad_blocks(
          kernel, smem, ntiles,
          global ? std::max<int64_t>(1, kMaxScratch / stage_elems) : ntiles);
      at::Tensor gstage2 =
          global ? at::empty({static_cast<int64_t>(blocks) * stage_elems}, acc_opts)
                 : at::Tensor();
      if (global) ga.gstage = gstage2.mutable_data_ptr<acc_t>();
      kernel<<<blocks, kThreads, smem, stream>>>(ga);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, teacher, grad};
}

}  // namespace cetnet::cuda
