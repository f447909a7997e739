// CUDA kernels: the row math of fusion_math.h run with V = float/double, one thread per row.
//
// This file only holds launch glue, the row accessors, the tile I/O and the reductions; all the
// math is the shared, CPU-tested code of fusion_math.h (acc_t = at::opmath_type: double for
// double logits, float otherwise).
//
// Tiled path (K small enough that a block's caches fit in 48 KB of shared memory):
//   * A block of T threads works on tiles of T*R rows (R = 1 or 2 rows per thread). The tile's
//     logits (and grad_weights, if any) are staged in shared memory with coalesced loads (for
//     contiguous inputs: consecutive threads read consecutive elements of the tile's T*R*K
//     contiguous values; other strides: each thread reads its own rows). The first kPrefetch
//     elements per thread of the next tile, and its per-row scalars (grad_prob / labels), are
//     loaded into registers before the current tile is computed, so loads overlap the math.
//   * Each thread then runs its rows from shared memory: each member's Elem (6 values) and its
//     softmax exponential are computed once into a per-thread column laid out [field][k][T]
//     (a warp's accesses hit 32 consecutive words: no bank conflicts), and the row's outputs
//     (weights / grad) go back to the staged row, then to global memory with coalesced stores.
//   * tau == 1 (read on the device) takes the log-free paths (exp_confidence), as the CPU does.
//   * For float accumulation and K in 2..8 (kRegRowMaxK) the kernels are compiled per K and a
//     row lives in registers (RegRow) instead of the per-thread shared-memory column: the member
//     loops unroll, and the cache's stores, loads and address arithmetic, which cost more issue
//     slots than the math at small K (the kernels are bound by instruction issue, not DRAM),
//     are gone. The staging of the tile is unchanged.
// Global path (larger K): one thread per row, member values recomputed from the global logits.
// Blocks loop over tiles/rows (grid sized by the occupancy calculator); indices into global
// memory are 64-bit. Reductions over rows are deterministic: each thread sums its rows in
// float64, each block reduces its threads in a fixed tree to one float64 partial, and one
// single-block kernel sums the partials in a fixed order (no atomics).
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
#include <limits>

namespace cetnet::cuda {
namespace {

constexpr int kCacheFields = 7;                // z, p, q, lsp, lsq, c and the softmax exp e
// Dynamic shared memory per block without opt-in: 48 KB less block_sum's static 32 doubles.
constexpr size_t kMaxSharedBytes = 48 * 1024 - 32 * sizeof(double);
constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 32;
constexpr int kMaxRowsPerThread = 2;
// Logits per thread loaded one tile ahead: 8 for float accumulation (all of a tile's for
// R*K <= 8); none for double, whose kernels need those registers (no spills at 128).
template <typename acc_t>
constexpr int prefetch_count() {
  return sizeof(acc_t) == 8 ? 0 : 8;
}
constexpr int kFinalizeThreads = 256;

// Register budget: __launch_bounds__(256, kMinBlocks) caps float kernels at 64 registers.
template <typename acc_t>
constexpr int min_blocks() {
  return sizeof(acc_t) == 8 ? 2 : 4;
}
// Register rows (KC > 0) hold K members' values (6 fields and e each) in registers: the kernels
// whose rows would spill at 64 get 80 (3 blocks) or, for the loss at K > 4, 128 (2 blocks).
// What still spills (sm_90, float): 16-32 bytes of the tile's prefetch buffer in the backward at
// K = 4 and 7 and the loss at K = 4, stored and reloaded once per tile, not per row.
template <int KC>
constexpr int min_blocks_backward() {
  return KC > 5 ? 3 : 4;
}
template <int KC>
constexpr int min_blocks_loss() {
  return KC > 4 ? 2 : KC > 0 ? 3 : 4;
}

// ---------------------------------------------------------------------------------------------
// Row accessors.
// ---------------------------------------------------------------------------------------------
// A thread's column of the shared-memory cache: field f of member k at col[(f * K + k) * T].
// kFull = false: only z, p and q were filled (set_probs); the log fields read as 0.
template <typename acc_t, bool kFull>
struct SmemRow {
  static constexpr bool kCachesE = true;
  int K;
  int T;
  acc_t* col;
  __device__ __forceinline__ acc_t& at(int f, int k) const { return col[(f * K + k) * T]; }
  __device__ __forceinline__ Elem<acc_t> elem(int k) const {
    Elem<acc_t> e;
    e.z = at(0, k);
    e.p = at(1, k);
    e.q = at(2, k);
    if constexpr (kFull) {
      e.lsp = at(3, k);
      e.lsq = at(4, k);
      e.c = at(5, k);
    } else {
      e.lsp = acc_t(0);
      e.lsq = acc_t(0);
      e.c = acc_t(0);
    }
    return e;
  }
  __device__ __forceinline__ void set_e(int k, acc_t v) const { at(6, k) = v; }
  __device__ __forceinline__ acc_t e(int k) const { return at(6, k); }
  // Computes member k's values from its logit (all fields, or z, p and q only).
  __device__ __forceinline__ void fill(int k, acc_t z) const {
    Elem<acc_t> el;
    if constexpr (kFull) {
      set_elem(el, z);
    } else {
      (void)set_probs(el, z);
    }
    at(0, k) = el.z;
    at(1, k) = el.p;
    at(2, k) = el.q;
    if constexpr (kFull) {
      at(3, k) = el.lsp;
      at(4, k) = el.lsq;
      at(5, k) = el.c;
    }
  }
  __device__ __forceinline__ void fill_row(const acc_t* z) const {
    for (int k = 0; k < K; ++k) fill(k, z[k]);
  }
};

template <typename scalar_t, typename acc_t>
struct GlobalRow {
  int K;
  const scalar_t* z;  // logits of this row
  int64_t s1;         // member stride
  __host__ __device__ __forceinline__ Elem<acc_t> elem(int k) const {
    return make_elem(static_cast<acc_t>(z[static_cast<int64_t>(k) * s1]));
  }
};

// A row held in registers, for K known at compile time (KC): the member loops of fusion_math.h
// unroll, so every field lives in a register and nothing goes through a shared-memory cache.
// At small K the cache's loads, stores and address arithmetic cost more instructions than the
// math, and these kernels are bound by instruction issue. kFull as for SmemRow.
template <typename acc_t, int KC, bool kFull>
struct RegRow {
  static_assert(KC > 0, "RegRow needs the member count at compile time");
  static constexpr bool kCachesE = true;
  static constexpr int K = KC;
  Elem<acc_t> el[KC];
  mutable acc_t ev[KC];  // the softmax exponentials (or weights): the row math's set_e is const
  __device__ __forceinline__ const Elem<acc_t>& elem(int k) const { return el[k]; }
  __device__ __forceinline__ void set_e(int k, acc_t v) const { ev[k] = v; }
  __device__ __forceinline__ acc_t e(int k) const { return ev[k]; }
  __device__ __forceinline__ void fill_row(const acc_t* z) {
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      if constexpr (kFull) {
        set_elem(el[k], z[k]);
      } else {
        el[k] = make_elem_pq(z[k]);
      }
    }
  }
};

// The row of a tiled kernel: in registers for a compile-time K (KC > 0), else the thread's
// column of the shared-memory cache.
template <typename acc_t, int KC, bool kFull>
__device__ __forceinline__ auto tile_row(int K, int T, acc_t* col) {
  if constexpr (KC > 0) {
    return RegRow<acc_t, KC, kFull>{};
  } else {
    return SmemRow<acc_t, kFull>{K, T, col};
  }
}

// The dynamic shared memory of a block, as acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t* shared_cache() {
  extern __shared__ __align__(sizeof(double)) unsigned char cetnet_smem[];
  return reinterpret_cast<acc_t*>(cetnet_smem);
}

// ---------------------------------------------------------------------------------------------
// Temperature, read on the device in its own dtype (no conversion kernel, no host sync).
// ---------------------------------------------------------------------------------------------
struct TauRef {
  const void* ptr;
  int kind;  // 0 float, 1 double, 2 half, 3 bfloat16
};

__device__ __forceinline__ double read_tau(const TauRef& t) {
  switch (t.kind) {
    case 0:
      return static_cast<double>(*static_cast<const float*>(t.ptr));
    case 2:
      return static_cast<double>(static_cast<float>(*static_cast<const at::Half*>(t.ptr)));
    case 3:
      return static_cast<double>(static_cast<float>(*static_cast<const at::BFloat16*>(t.ptr)));
    default:
      return *static_cast<const double*>(t.ptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic sums.
// ---------------------------------------------------------------------------------------------
// Sum of v over the block (blockDim.x a multiple of 32), valid in thread 0. All threads of the
// block must call it (it synchronizes).
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < nwarps ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// One block: out0 = sum(partials[0, :]) (divided by `count` if mean), out1 = sum(partials[1, :])
// (when out1 is not null), each cast to acc_t. partials: [2, n] float64, rows n apart.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_sums_kernel(const double* __restrict__ partials, int n, double count, bool mean,
                         acc_t* __restrict__ out0, acc_t* __restrict__ out1) {
  double s0 = 0.0, s1 = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
    if (out0 != nullptr) s0 += partials[i];
    if (out1 != nullptr) s1 += partials[n + i];
  }
  s0 = block_sum(s0);
  s1 = block_sum(s1);
  if (threadIdx.x == 0) {
    if (out0 != nullptr) out0[0] = static_cast<acc_t>(mean && count > 0.0 ? s0 / count : s0);
    if (out1 != nullptr) out1[0] = static_cast<acc_t>(s1);
  }
}

// ---------------------------------------------------------------------------------------------
// Tile I/O.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename rs_t>
struct TileIO {
  const scalar_t* z;  // logits [B, K], any strides
  int64_t s0, s1;
  const scalar_t* gw;  // grad_weights [B, K] (any strides), or null
  int64_t gw_s0, gw_s1;
  const rs_t* rs;  // one value per row (grad_prob / labels), or null (reads as 0)
  int64_t rs_s0;
  scalar_t* out;  // [B, K] contiguous output (weights / grad), or null
  int64_t B;
  int K;
  int R;  // rows per thread per tile (1 or kMaxRowsPerThread)
};

// Runs body(zrow, gwrow, rs, b) for every row b of the block's tiles. zrow: the row's K staged
// logits (acc_t, shared memory), overwritten by the body with the row's K outputs, which are
// then stored to io.out; gwrow: its staged grad_weights (null if none); rs: its row scalar.
// Shared memory: [cache: kCacheFields*K*T][logits: T*R*K][grad_weights: T*R*K if any], without
// the cache when KC > 0 (K = KC at compile time, rows in registers: RegRow).
// Every thread of the block must call it (it synchronizes; the tile loop is block-uniform).
template <int KC, typename acc_t, typename scalar_t, typename rs_t, typename Body>
__device__ __forceinline__ void tile_loop(const TileIO<scalar_t, rs_t>& io, acc_t* smem,
                                          const Body& body) {
  const int T = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int K = KC > 0 ? KC : io.K, R = io.R;
  const int tile_rows = T * R;
  acc_t* stage = smem + (KC > 0 ? 0 : kCacheFields * K * T);
  acc_t* gstage = stage + tile_rows * K;
  const bool contiguous = io.s1 == 1 && io.s0 == K;
  const bool gw_contiguous = io.gw_s1 == 1 && io.gw_s0 == K;
  const int64_t ntiles = (io.B + tile_rows - 1) / tile_rows;
  const int64_t step = gridDim.x;

  constexpr int kPrefetch = prefetch_count<acc_t>();
  scalar_t pf[kPrefetch > 0 ? kPrefetch : 1];
  rs_t pr0 = rs_t(0), pr1 = rs_t(0);
  // Loads the start of tile `tile` (if any) into registers.
  const auto prefetch = [&](int64_t tile) {
    if (tile >= ntiles) return;
    const int64_t b0 = tile * tile_rows;
    const int n = static_cast<int>(std::min<int64_t>(tile_rows, io.B - b0));
    if (contiguous) {
      const scalar_t* src = io.z + b0 * K;
      const int cnt = n * K;
#pragma unroll
      for (int j = 0; j < kPrefetch; ++j) {
        const int i = tid + j * T;
        if (i < cnt) pf[j] = src[i];
      }
    }
    if (io.rs != nullptr) {
      if (tid < n) pr0 = io.rs[(b0 + tid) * io.rs_s0];
      if (R > 1 && T + tid < n) pr1 = io.rs[(b0 + T + tid) * io.rs_s0];
    }
  };

  int64_t tile = blockIdx.x;
  prefetch(tile);
  for (; tile < ntiles; tile += step) {
    const int64_t b0 = tile * tile_rows;
    const int n = static_cast<int>(std::min<int64_t>(tile_rows, io.B - b0));
    const int cnt = n * K;
    if (contiguous) {
#pragma unroll
      for (int j = 0; j < kPrefetch; ++j) {
        const int i = tid + j * T;
        if (i < cnt) stage[i] = static_cast<acc_t>(pf[j]);
      }
      const scalar_t* src = io.z + b0 * K;
      for (int i = tid + kPrefetch * T; i < cnt; i += T) stage[i] = static_cast<acc_t>(src[i]);
    } else {
      for (int lr = tid; lr < n; lr += T) {
        const scalar_t* zr = io.z + (b0 + lr) * io.s0;
        for (int k = 0; k < K; ++k) stage[lr * K + k] = static_cast<acc_t>(zr[k * io.s1]);
      }
    }
    if (io.gw != nullptr) {
      if (gw_contiguous) {
        const scalar_t* src = io.gw + b0 * K;
        for (int i = tid; i < cnt; i += T) gstage[i] = static_cast<acc_t>(src[i]);
      } else {
        for (int lr = tid; lr < n; lr += T) {
          const scalar_t* gr = io.gw + (b0 + lr) * io.gw_s0;
          for (int k = 0; k < K; ++k) gstage[lr * K + k] = static_cast<acc_t>(gr[k * io.gw_s1]);
        }
      }
    }
    const rs_t cur0 = pr0, cur1 = pr1;
    __syncthreads();  // the tile is staged
    prefetch(tile + step);
    for (int r = 0; r < R; ++r) {
      const int lr = r * T + tid;
      if (lr < n) {
        body(stage + lr * K, io.gw != nullptr ? gstage + lr * K : nullptr,
             static_cast<acc_t>(r == 0 ? cur0 : cur1), b0 + lr);
      }
    }
    __syncthreads();  // the outputs are staged
    if (io.out != nullptr) {
      scalar_t* dst = io.out + b0 * K;
      for (int i = tid; i < cnt; i += T) dst[i] = static_cast<scalar_t>(stage[i]);
    }
    __syncthreads();  // the stage may be refilled
  }
}

#define CETNET_ROW_LOOP(b, B)                                                            \
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < (B); \
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// Kernels. kCached: the tiled path (dynamic shared memory); otherwise the global path.
// KC > 0 (tiled path only): K == KC, the rows held in registers (tile_row).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, bool kCached, int KC = 0>
__global__ void __launch_bounds__(kMaxThreads, min_blocks<acc_t>())
    fusion_forward_kernel(TileIO<scalar_t, scalar_t> io, TauRef tau, bool logit_space,
                          scalar_t* __restrict__ p_out) {
  const double t = read_tau(tau);
  const TempScale<acc_t> ts = temp_scale<acc_t, acc_t>(t);
  const bool unit_tau = t == 1.0;  // the default: no logarithm (exp_confidence)
  const int K = io.K;
  if constexpr (kCached) {
    acc_t* smem = shared_cache<acc_t>();
    acc_t* col = smem + threadIdx.x;
    const int T = static_cast<int>(blockDim.x);
    tile_loop<KC>(io, smem, [&](acc_t* zrow, const acc_t*, acc_t, int64_t b) {
      const auto put_w = [&](int k, acc_t w) { zrow[k] = w; };
      acc_t p;
      if (unit_tau) {
        auto row = tile_row<acc_t, KC, false>(K, T, col);
        row.fill_row(zrow);
        p = fusion_forward_row_unit_tau<acc_t>(row, logit_space, put_w);
      } else {
        auto row = tile_row<acc_t, KC, true>(K, T, col);
        row.fill_row(zrow);
        p = fusion_forward_row<acc_t>(row, ts, logit_space, put_w);
      }
      p_out[b] = static_cast<scalar_t>(p);
    });
  } else {
    CETNET_ROW_LOOP(b, io.B) {
      scalar_t* w_row = io.out + b * K;
      const GlobalRow<scalar_t, acc_t> row{K, io.z + b * io.s0, io.s1};
      const acc_t p = fusion_forward_row<acc_t>(
          row, ts, logit_space, [&](int k, acc_t w) { w_row[k] = static_cast<scalar_t>(w); });
      p_out[b] = static_cast<scalar_t>(p);
    }
  }
}

// gt_partial: one float64 partial of dL/dtau per block (want_gt), else gt_zero[0] is set to 0.
template <typename scalar_t, typename acc_t, bool kCached, int KC = 0>
__global__ void __launch_bounds__(kMaxThreads,
                                  sizeof(acc_t) == 8 ? 2 : min_blocks_backward<KC>())
    fusion_backward_kernel(TileIO<scalar_t, scalar_t> io, TauRef tau, bool logit_space,
                           bool detach_weights, bool want_gt, double* __restrict__ gt_partial,
                           acc_t* __restrict__ gt_zero) {
  const double t = read_tau(tau);
  const TempScale<acc_t> ts = temp_scale<acc_t, acc_t>(t);
  const bool unit_tau = t == 1.0;
  const int K = io.K;
  double gt_sum = 0.0;
  if constexpr (kCached) {
    acc_t* smem = shared_cache<acc_t>();
    acc_t* col = smem + threadIdx.x;
    const int T = static_cast<int>(blockDim.x);
    tile_loop<KC>(io, smem, [&](acc_t* zrow, const acc_t* gwrow, acc_t g_p, int64_t) {
      const auto get_gw = [&](int k) { return gwrow != nullptr ? gwrow[k] : acc_t(0); };
      const auto put_gz = [&](int k, acc_t g) { zrow[k] = g; };
      if (unit_tau && !want_gt) {
        // Weights from the log-free forward (kept in the e slots), then the VJP on z, p, q.
        auto row = tile_row<acc_t, KC, false>(K, T, col);
        row.fill_row(zrow);
        (void)fusion_forward_row_unit_tau<acc_t>(row, logit_space,
                                                 [&](int k, acc_t w) { row.set_e(k, w); });
        (void)fusion_backward_row_w<acc_t>(
            row, ts, logit_space, detach_weights, /*want_gt=*/false, g_p,
            [&](int k) { return row.e(k); }, get_gw, put_gz);
      } else {
        auto row = tile_row<acc_t, KC, true>(K, T, col);
        row.fill_row(zrow);
        const acc_t gt = fusion_backward_row<acc_t>(row, ts, logit_space, detach_weights,
                                                    g_p, get_gw, put_gz);
        if (want_gt) gt_sum += static_cast<double>(gt);
      }
    });
  } else {
    CETNET_ROW_LOOP(b, io.B) {
      const acc_t g_p = io.rs != nullptr ? static_cast<acc_t>(io.rs[b * io.rs_s0]) : acc_t(0);
      const scalar_t* gw_row = io.gw != nullptr ? io.gw + b * io.gw_s0 : nullptr;
      scalar_t* gz_row = io.out + b * K;
      const GlobalRow<scalar_t, acc_t> row{K, io.z + b * io.s0, io.s1};
      const acc_t gt = fusion_backward_row<acc_t>(
          row, ts, logit_space, detach_weights, g_p,
          [&](int k) {
            return gw_row != nullptr
                       ? static_cast<acc_t>(gw_row[static_cast<int64_t>(k) * io.gw_s1])
                       : acc_t(0);
          },
          [&](int k, acc_t g) { gz_row[k] = static_cast<scalar_t>(g); });
      if (want_gt) gt_sum += static_cast<double>(gt);
    }
  }
  if (want_gt) {
    gt_sum = block_sum(gt_sum);  // want_gt is uniform: every thread gets here
    if (threadIdx.x == 0) gt_partial[blockIdx.x] = gt_sum;
  } else if (gt_zero != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    gt_zero[0] = acc_t(0);
  }
}

// per_row: loss_out[b] (and gt_out[b] if not null) per row. Otherwise one float64 partial per
// block of the losses (partials[blockIdx.x]) and of dloss/dtau (partials[gridDim.x +
// blockIdx.x], if want_gt). gt_zero (if not null) is set to 0.
// (double: one block of 256 per SM guaranteed, which keeps it free of spills.)
template <typename scalar_t, typename acc_t, bool kCached, int KC = 0>
__global__ void __launch_bounds__(kMaxThreads, sizeof(acc_t) == 8 ? 1 : min_blocks_loss<KC>())
    collaborative_loss_kernel(TileIO<scalar_t, acc_t> io, TauRef tau, bool logit_space,
                              bool detach_weights, LossWeights weights, bool compute_grad,
                              bool per_row, bool want_gt, scalar_t* __restrict__ p_out,
                              acc_t* __restrict__ loss_out, acc_t* __restrict__ gt_out,
                              double* __restrict__ partials, acc_t* __restrict__ gt_zero) {
  const TempScale<acc_t> ts = temp_scale<acc_t, acc_t>(read_tau(tau));
  const int K = io.K;
  double loss_sum = 0.0, gt_sum = 0.0;
  // The per-row outputs; gz(k, g) stores dloss/dz_k.
  const auto finish = [&](const LossRowOut<acc_t>& r, int64_t b) {
    p_out[b] = static_cast<scalar_t>(r.p);
    if (per_row) {
      loss_out[b] = r.loss;
      if (want_gt) gt_out[b] = r.gtau;
    } else {
      loss_sum += static_cast<double>(r.loss);
      if (want_gt) gt_sum += static_cast<double>(r.gtau);
    }
  };
  if constexpr (kCached) {
    acc_t* smem = shared_cache<acc_t>();
    auto row = tile_row<acc_t, KC, true>(K, static_cast<int>(blockDim.x), smem + threadIdx.x);
    tile_loop<KC>(io, smem, [&](acc_t* zrow, const acc_t*, acc_t y, int64_t b) {
      row.fill_row(zrow);
      const LossRowOut<acc_t> r = collaborative_loss_row<acc_t>(
          row, y, ts, logit_space, detach_weights, weights, compute_grad,
          [&](int k, acc_t g) { zrow[k] = g; });
      finish(r, b);
    });
  } else {
    CETNET_ROW_LOOP(b, io.B) {
      const acc_t y = io.rs[b * io.rs_s0];
      scalar_t* gz_row = io.out != nullptr ? io.out + b * K : nullptr;
      const GlobalRow<scalar_t, acc_t> row{K, io.z + b * io.s0, io.s1};
      const LossRowOut<acc_t> r = collaborative_loss_row<acc_t>(
          row, y, ts, logit_space, detach_weights, weights, compute_grad,
          [&](int k, acc_t g) { gz_row[k] = static_cast<scalar_t>(g); });
      finish(r, b);
    }
  }
  if (!per_row) {  // uniform: every thread gets here
    loss_sum = block_sum(loss_sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = loss_sum;
    if (want_gt) {
      gt_sum = block_sum(gt_sum);
      if (threadIdx.x == 0) partials[gridDim.x + blockIdx.x] = gt_sum;
    }
  }
  if (gt_zero != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gt_zero[0] = acc_t(0);
}

#undef CETNET_ROW_LOOP

// ---------------------------------------------------------------------------------------------
// Launch configuration.
// ---------------------------------------------------------------------------------------------
struct LaunchConfig {
  bool cached;
  int threads;
  int rows;  // rows per thread per tile (tiled path)
  size_t smem;
  unsigned int blocks;
};

// Tiled path: the most threads (a power of two in [32, 256]), then the most rows per thread,
// whose cache and staging buffers fit in 48 KB (for float, K up to 47 without grad_weights; for
// double, 23; reg_rows: no cache, only the staging). Otherwise the global path, 256 threads.
// The grid is as many blocks as fit on the device at once (occupancy calculator), at most one
// per tile/row group; blocks loop over the rest. The grid depends only on the kernel, K and the
// device, so the reductions' order is fixed.
template <typename acc_t, typename KC, typename KG>
LaunchConfig launch_config(int64_t B, int K, bool has_gw, bool reg_rows, KC cached_kernel,
                           KG global_kernel) {
  LaunchConfig cfg{false, kMaxThreads, 1, 0, 1};
  // per thread
  const size_t cache = reg_rows ? 0 : kCacheFields * static_cast<size_t>(K) * sizeof(acc_t);
  const size_t stage = (has_gw ? 2 : 1) * static_cast<size_t>(K) * sizeof(acc_t);  // per row
  for (int t = kMaxThreads; t >= kMinThreads && !cfg.cached; t /= 2) {
    for (int r = kMaxRowsPerThread; r >= 1; --r) {
      const size_t bytes = static_cast<size_t>(t) * (cache + static_cast<size_t>(r) * stage);
      if (bytes <= kMaxSharedBytes) {
        cfg = LaunchConfig{true, t, r, bytes, 1};
        break;
      }
    }
  }
  int per_sm = 0;
  if (cfg.cached) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, cached_kernel,
                                                                 cfg.threads, cfg.smem));
  } else {
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, global_kernel, cfg.threads, 0));
  }
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      std::max<int64_t>(1, static_cast<int64_t>(prop->multiProcessorCount) * std::max(per_sm, 1));
  const int64_t rows_per_block = static_cast<int64_t>(cfg.threads) * cfg.rows;
  const int64_t needed = (B + rows_per_block - 1) / rows_per_block;
  cfg.blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, max_blocks)));
  return cfg;
}

// Member counts with register-row kernels (float accumulation: float, half, bfloat16 logits).
// Each costs three kernels per dtype in compile time; other K take the shared-memory cache.
constexpr int kRegRowMaxK = 8;

// Calls f(std::integral_constant<int, KC>{}): KC = K when K has register-row kernels, else 0.
template <typename acc_t, typename F>
void with_member_count(int K, const F& f) {
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    switch (K) {
      case 2: return f(std::integral_constant<int, 2>{});
      case 3: return f(std::integral_constant<int, 3>{});
      case 4: return f(std::integral_constant<int, 4>{});
      case 5: return f(std::integral_constant<int, 5>{});
      case 6: return f(std::integral_constant<int, 6>{});
      case 7: return f(std::integral_constant<int, 7>{});
      case kRegRowMaxK: return f(std::integral_constant<int, kRegRowMaxK>{});
      default: break;
    }
  }
  f(std::integral_constant<int, 0>{});
}

// In with_member_count's callback (KC in scope).
#define CETNET_CONFIG(KERNEL, B, K, has_gw)                                                 \
  launch_config<acc_t>((B), (K), (has_gw), KC > 0, KERNEL<scalar_t, acc_t, true, KC>,        \
                       KERNEL<scalar_t, acc_t, false>)

// Launches KERNEL<scalar_t, acc_t, cached or not> with cfg on stream, then checks the launch.
#define CETNET_LAUNCH(KERNEL, cfg, stream, ...)                                                \
  do {                                                                                         \
    if ((cfg).cached) {                                                                        \
      KERNEL<scalar_t, acc_t, true, KC><<<(cfg).blocks, (cfg).threads, (cfg).smem, (stream)>>>( \
          __VA_ARGS__);                                                                        \
    } else {                                                                                   \
      KERNEL<scalar_t, acc_t, false><<<(cfg).blocks, (cfg).threads, 0, (stream)>>>(__VA_ARGS__); \
    }                                                                                          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                            \
  } while (0)

// The temperature as the kernels read it: its own storage for float/double/half/bfloat16 (no
// conversion kernel), else a float64 copy kept alive in `holder`.
TauRef tau_ref(const at::Tensor& temperature, at::Tensor& holder) {
  switch (temperature.scalar_type()) {
    case at::kFloat:
      return TauRef{temperature.const_data_ptr(), 0};
    case at::kDouble:
      return TauRef{temperature.const_data_ptr(), 1};
    case at::kHalf:
      return TauRef{temperature.const_data_ptr(), 2};
    case at::kBFloat16:
      return TauRef{temperature.const_data_ptr(), 3};
    default:
      holder = temperature.to(at::kDouble);
      return TauRef{holder.const_data_ptr(), 1};
  }
}

// Sums the per-block float64 partials into out0 (mean over `count` if mean) and out1 (if not
// null), in one single-block launch.
template <typename acc_t>
void launch_finalize(const at::Tensor& partials, int n, int64_t count, bool mean, acc_t* out0,
                     acc_t* out1, cudaStream_t stream) {
  finalize_sums_kernel<acc_t><<<1, kFinalizeThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), n, static_cast<double>(count), mean, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> confidence_fusion(const at::Tensor& logits,
                                                     const at::Tensor& temperature,
                                                     bool logit_space, bool /*detach_weights*/) {
  // detach_weights only matters to the backward: the forward values do not depend on it.
  const char* op = "cetnet::confidence_fusion";
  check_fusion_args(logits, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor weights = at::empty({B, K}, logits.options());
  if (B == 0) return {prob, weights};
  at::Tensor tau_holder;
  const TauRef tau = tau_ref(temperature, tau_holder);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_member_count<acc_t>(K, [&](auto member_count) {
      constexpr int KC = decltype(member_count)::value;
      const LaunchConfig cfg = CETNET_CONFIG(fusion_forward_kernel, B, K, false);
      const TileIO<scalar_t, scalar_t> io{logits.const_data_ptr<scalar_t>(),
                                          logits.stride(0),
                                          logits.stride(1),
                                          nullptr,
                                          0,
                                          0,
                                          nullptr,
                                          0,
                                          weights.mutable_data_ptr<scalar_t>(),
                                          B,
                                          K,
                                          cfg.rows};
      CETNET_LAUNCH(fusion_forward_kernel, cfg, stream, io, tau, logit_space,
                    prob.mutable_data_ptr<scalar_t>());
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
  // The weights are checked but recomputed: on a GPU this op is memory-bound, and re-deriving
  // them from the logits costs less than reading [B, K] more bytes.
  at::Tensor gp, gw;  // not structured bindings: lambdas below capture them (C++17)
  std::tie(gp, gw, std::ignore) =
      check_fusion_backward_args(grad_prob, grad_weights, logits, weights, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const bool has_gp = gp.defined(), has_gw = gw.defined();
  const bool want_gt = compute_temperature_grad && !detach_weights;
  const auto acc_dtype = acc_type_of(logits);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  at::Tensor grad_logits = at::empty({B, K}, logits.options());
  if (B == 0) return {grad_logits, at::zeros({}, acc_opts)};
  // Written by the kernels: the finalize kernel's sum (want_gt), else a 0 from the main kernel.
  at::Tensor grad_temperature = at::empty({}, acc_opts);
  at::Tensor tau_holder;
  const TauRef tau = tau_ref(temperature, tau_holder);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_member_count<acc_t>(K, [&](auto member_count) {
      constexpr int KC = decltype(member_count)::value;
      const LaunchConfig cfg = CETNET_CONFIG(fusion_backward_kernel, B, K, has_gw);
      const TileIO<scalar_t, scalar_t> io{logits.const_data_ptr<scalar_t>(),
                                          logits.stride(0),
                                          logits.stride(1),
                                          has_gw ? gw.const_data_ptr<scalar_t>() : nullptr,
                                          has_gw ? gw.stride(0) : 0,
                                          has_gw ? gw.stride(1) : 0,
                                          has_gp ? gp.const_data_ptr<scalar_t>() : nullptr,
                                          has_gp ? gp.stride(0) : 0,
                                          grad_logits.mutable_data_ptr<scalar_t>(),
                                          B,
                                          K,
                                          cfg.rows};
      acc_t* gt_out = grad_temperature.mutable_data_ptr<acc_t>();
      const at::Tensor partials =
          want_gt ? at::empty({static_cast<int64_t>(cfg.blocks)}, logits.options().dtype(at::kDouble))
                  : at::Tensor();
      CETNET_LAUNCH(fusion_backward_kernel, cfg, stream, io, tau, logit_space, detach_weights,
                    want_gt, want_gt ? partials.mutable_data_ptr<double>() : nullptr,
                    want_gt ? nullptr : gt_out);
      if (want_gt) {
        launch_finalize<acc_t>(partials, static_cast<int>(cfg.blocks), B, /*mean=*/false, gt_out,
                               nullptr, stream);
      }
    });
  });
  return {grad_logits, grad_temperature};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> collaborative_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad) {
  const char* op = "cetnet::collaborative_loss";
  check_loss_args(logits, labels, temperature, reduction, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const auto acc_dtype = acc_type_of(logits);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  const bool per_row = reduction == kReduceNone;
  const bool want_gt = compute_grad && compute_temperature_grad;
  const LossWeights weights{member_weight, ensemble_weight, distill_weight, mutual_weight};

  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor grad_logits = grad_logits_out(logits, compute_grad);
  // reduction 'none': per-row losses (and per-row dloss/dtau if want_gt); otherwise 0-dim
  // tensors written by the kernels.
  at::Tensor loss = per_row ? at::empty({B}, acc_opts) : at::empty({}, acc_opts);
  at::Tensor grad_temperature =
      (per_row && want_gt) ? at::empty({B}, acc_opts) : at::empty({}, acc_opts);
  if (B == 0) {
    if (!per_row) loss.zero_();
    if (!(per_row && want_gt)) grad_temperature.zero_();
    return {loss, prob, grad_logits, grad_temperature};
  }
  const at::Tensor y_t = labels.to(acc_dtype);
  at::Tensor tau_holder;
  const TauRef tau = tau_ref(temperature, tau_holder);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_member_count<acc_t>(K, [&](auto member_count) {
      constexpr int KC = decltype(member_count)::value;
      const LaunchConfig cfg = CETNET_CONFIG(collaborative_loss_kernel, B, K, false);
      const TileIO<scalar_t, acc_t> io{logits.const_data_ptr<scalar_t>(),
                                       logits.stride(0),
                                       logits.stride(1),
                                       nullptr,
                                       0,
                                       0,
                                       y_t.const_data_ptr<acc_t>(),
                                       y_t.stride(0),
                                       compute_grad ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr,
                                       B,
                                       K,
                                       cfg.rows};
      const at::Tensor partials =
          per_row ? at::Tensor()
                  : at::empty({2, static_cast<int64_t>(cfg.blocks)},
                              logits.options().dtype(at::kDouble));
      acc_t* gt_ptr = grad_temperature.mutable_data_ptr<acc_t>();
      CETNET_LAUNCH(collaborative_loss_kernel, cfg, stream, io, tau, logit_space, detach_weights,
                    weights, compute_grad, per_row, want_gt, prob.mutable_data_ptr<scalar_t>(),
                    per_row ? loss.mutable_data_ptr<acc_t>() : nullptr,
                    (per_row && want_gt) ? gt_ptr : nullptr,
                    per_row ? nullptr : partials.mutable_data_ptr<double>(),
                    want_gt ? nullptr : gt_ptr);
      if (!per_row) {
        launch_finalize<acc_t>(partials, static_cast<int>(cfg.blocks), B, /*mean=*/reduction == kReduceMean,
                               loss.mutable_data_ptr<acc_t>(), want_gt ? gt_ptr : nullptr, stream);
      }
    });
  });
  return {loss, prob, grad_logits, grad_temperature};
}

std::vector<int64_t> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return std::vector<int64_t>{__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace cetnet::cuda
