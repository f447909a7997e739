// CUDA kernels of the multi-table embedding (MultiTableEmbedding, cetnet_kernels/embedding.py).
//
// Storage as on CPU, laid out by csrc/embedding_layout.h: one flat weight holding the M * F
// tables member-major; table (m, f) = row-major [V_f, D_m] at table_base[m] + D_m * row_base[f].
// The row-wise state of row `id` of table (m, f) is state[m * Vtot + row_base[f] + id]. The
// "key" row_base[f] + id names a row of every member at once (all members read the same ids).
//
// Per-call metadata (input pointers, dims, column and bag lists) is packed into one pinned host
// buffer and copied to the device with one asynchronous copy: any number of features.
//
// Forward: launch 1 gathers every single-id / sequence column of every member (a group of G
// lanes per (batch row, column); lanes stride over the dim, 4-wide when rows are aligned);
// launch 2 pools every bag (a group per (batch row, bag feature), values visited in order).
//
// Bounds check: ids outside [0, V) other than padding_idx are never read; the kernels write a
// zero row instead and record the smallest bad flat index of the feature with atomicMin (an
// order-free, so deterministic, record), the lookup also counts them. Malformed offsets are
// recorded the same way (the bag is skipped, nothing out of range is read). After the launches
// one small D2H copy of the 2 F + 1 records tells the host whether to raise IndexError /
// ValueError with the CPU's message (bounds_check warn: a warning for the ids, once, in the
// lookup); with bounds_check off (codes.h) that copy is skipped: a bad id is padding, a
// malformed bag empty, and forward, backward and fused update never synchronize with the host.
//
// Backward (dense gradient and fused SGD / row-wise Adagrad), deterministic and atomic-free:
//   1. one launch writes an entry (key, output row, scale) per id slot and bag value, checking
//      ids and offsets; the host raises before anything is written if one is bad;
//   2. a stable CUB radix sort by key of only the bits that hold Vtot (deterministic); run
//      starts from a prefix count of the start flags, the number of runs left on the device
//      (the apply kernels read it): no host synchronization anywhere in the backward;
//   3. one launch with a group per run (= per touched row): for every member, each lane sums
//      its dims over the run's entries in sorted (= batch) order, then writes the dense
//      gradient row or applies the optimizer to the row. Every row belongs to one run: no races,
//      no float atomics, and the summation order is fixed, so results are bitwise reproducible.
//      Row-wise Adagrad needs the whole row's sum of squares before the update: the lanes
//      reduce it with a fixed shuffle tree, and the gradient is summed again in the same order
//      for the update pass (twice the gradient reads, no shared memory limit on the dim).
//   4. runs of more than kLongRun entries (hot rows: a Zipf-distributed feature puts thousands
//      of lookups on one row) would make one group walk thousands of entries serially, so
//      launch 3 skips them and pushes their run index onto a list (an atomic counter into a
//      buffer of E / (kLongRun + 1) slots, which bounds the number of such disjoint runs: no
//      host sync); launch 4 then gives each long run a block (grid-stride over the list, whose
//      order does not matter: every run is processed by one block on its own). The block stages
//      a tile of entries (source row, scale) in shared memory; thread (p, lane) sums the entries
//      p, p + P, ... of every tile for its dims in a fixed order, and the P partial sums are
//      combined with a fixed-shape tree in shared memory: bitwise reproducible, though not the
//      serial association of launch 3. The update per row is the one of launch 3 (Adagrad:
//      the block reduces the sum of squares with a fixed tree, then sums the run again).
#include "embedding_args.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstring>
#include <limits>
#include <sstream>
#include <tuple>
#include <type_traits>

namespace cetnet::cuda {
namespace {

constexpr int kThreads = 256;
// Runs with more entries than this go to the block-per-run kernel (apply_long_runs_kernel).
constexpr int64_t kLongRun = 64;
constexpr int kLongThreads = 256;  // block of apply_long_runs_kernel; also its tile of entries
constexpr int kLongVec = 4;        // dims per thread per chunk in apply_long_runs_kernel
constexpr unsigned long long kNoBad = ~0ULL;  // "nothing recorded" (atomicMin identity)

struct FeatureMeta {
  const void* ids;      // contiguous, int32 or int64
  const void* offsets;  // bags: [B + 1], int32 or int64; else nullptr
  const float* psw;     // weighted bags: per-sample weights [nvals]; else nullptr
  int64_t vocab;
  int64_t row_base;   // sum of the previous features' vocabularies
  int64_t nvals;      // numel of ids
  int64_t task_base;  // backward entry kernel: first task of this feature
  int32_t mode;
  int32_t ids64;
  int32_t offs64;
  int32_t ncols;      // T (columns) of an id feature, 1 for a bag
  int64_t col_start;  // first output column
};

struct MemberMeta {
  int64_t table_base;  // first element of member m's tables in the flat weight
  int64_t dim;
  void* ptr;           // forward: the output [B, N, D] (acc_t); backward: grads (acc_t) or null
  int64_t vec4;        // forward: rows and output can be moved 4 elements at a time
};

__device__ __forceinline__ int64_t read_index(const void* p, int32_t is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i]
              : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ void record_min(unsigned long long* slot, int64_t v) {
  atomicMin(slot, static_cast<unsigned long long>(v));
}

// A bad id met by the lookup: the feature's smallest flat index, and one more in the count
// (which starts at kNoBad: count = slot + 1 modulo 2^64, so it needs no initialization).
__device__ __forceinline__ void record_bad_id(unsigned long long* slot, unsigned long long* count,
                                              int64_t v) {
  record_min(slot, v);
  atomicAdd(count, 1ULL);
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// ---------------------------------------------------------------------------------------------
// Forward launch 1: single-id and sequence columns.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int G>
__global__ void gather_columns_kernel(const scalar_t* __restrict__ w,
                                      const FeatureMeta* __restrict__ feats,
                                      const MemberMeta* __restrict__ mem,
                                      const int32_t* __restrict__ col_f,
                                      const int32_t* __restrict__ col_t, int64_t B, int64_t C,
                                      int64_t N, int M, bool has_pad, int64_t pad,
                                      unsigned long long* bad, unsigned long long* bad_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % G;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  for (int64_t task = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
       task < B * C; task += groups) {
    const int64_t b = task / C;
    const int64_t c = task - b * C;
    const int f = col_f[c];
    const int64_t t = col_t[c];
    const FeatureMeta& fm = feats[f];
    const int64_t i = b * fm.ncols + t;
    const int64_t id = read_index(fm.ids, fm.ids64, i);
    const bool is_pad = has_pad && id == pad;
    const bool valid = !is_pad && id >= 0 && id < fm.vocab;
    if (!valid && !is_pad && lane == 0) record_bad_id(&bad[f], bad_count, i);
    const int64_t n = fm.col_start + t;
    for (int m = 0; m < M; ++m) {
      const int64_t D = mem[m].dim;
      acc_t* out = static_cast<acc_t*>(mem[m].ptr) + (b * N + n) * D;
      if (!valid) {
        for (int64_t d = lane; d < D; d += G) out[d] = acc_t(0);
        continue;
      }
      const scalar_t* src = w + mem[m].table_base + D * (fm.row_base + id);
      if (mem[m].vec4) {
        for (int64_t d = 4 * lane; d < D; d += 4 * G) {
          const Vec4<scalar_t> x = *reinterpret_cast<const Vec4<scalar_t>*>(src + d);
          Vec4<acc_t> y;
#pragma unroll
          for (int k = 0; k < 4; ++k) y.v[k] = static_cast<acc_t>(x.v[k]);
          *reinterpret_cast<Vec4<acc_t>*>(out + d) = y;
        }
      } else {
        for (int64_t d = lane; d < D; d += G) out[d] = static_cast<acc_t>(src[d]);
      }
    }
  }
}

// Checks bag b of feature f's offsets; returns false (and records b) when they are malformed.
// [k0, k1) is then a range of values that is safe to read.
__device__ __forceinline__ bool bag_range(const FeatureMeta& fm, int64_t b, int64_t B,
                                          unsigned long long* bad_off, int64_t& k0,
                                          int64_t& k1) {
  k0 = read_index(fm.offsets, fm.offs64, b);
  k1 = read_index(fm.offsets, fm.offs64, b + 1);
  const bool ok = k0 <= k1 && k0 >= 0 && k1 <= fm.nvals && (b != 0 || k0 == 0) &&
                  (b != B - 1 || k1 == fm.nvals);
  if (!ok) record_min(bad_off, b);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Forward launch 2: pooled bags (sum, mean, weighted sum), values summed in order.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int G>
__global__ void pool_bags_kernel(const scalar_t* __restrict__ w,
                                 const FeatureMeta* __restrict__ feats,
                                 const MemberMeta* __restrict__ mem,
                                 const int32_t* __restrict__ bag_f, int64_t B, int64_t J,
                                 int64_t N, int M, int64_t F, bool has_pad, int64_t pad,
                                 unsigned long long* bad, unsigned long long* bad_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % G;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  for (int64_t task = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
       task < B * J; task += groups) {
    const int64_t b = task / J;
    const int f = bag_f[task - b * J];
    const FeatureMeta& fm = feats[f];
    const int64_t n = fm.col_start;
    int64_t k0, k1;
    if (!bag_range(fm, b, B, &bad[F + f], k0, k1)) {
      k0 = k1 = 0;  // the op raises after the launch; nothing is read
    }
    int64_t count = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t id = read_index(fm.ids, fm.ids64, k);
      if (has_pad && id == pad) continue;
      if (id < 0 || id >= fm.vocab) {
        if (lane == 0) record_bad_id(&bad[f], bad_count, k);
        continue;
      }
      ++count;
    }
    const acc_t mean_scale =
        fm.mode == kBagMean && count > 1 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
    for (int m = 0; m < M; ++m) {
      const int64_t D = mem[m].dim;
      acc_t* out = static_cast<acc_t*>(mem[m].ptr) + (b * N + n) * D;
      const scalar_t* table = w + mem[m].table_base + D * fm.row_base;
      for (int64_t d = lane; d < D; d += G) {
        acc_t acc = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t id = read_index(fm.ids, fm.ids64, k);
          if ((has_pad && id == pad) || id < 0 || id >= fm.vocab) continue;
          const acc_t a = fm.psw ? static_cast<acc_t>(fm.psw[k]) : acc_t(1);
          acc += a * static_cast<acc_t>(table[id * D + d]);
        }
        out[d] = acc * mean_scale;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward launch 1: entries (key, output row, scale), one task per id slot or per bag.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int find_feature(const FeatureMeta* feats, int F, int64_t task) {
  int lo = 0, hi = F - 1;  // the last feature whose task_base <= task
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (feats[mid].task_base <= task) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename key_t, typename acc_t>
__global__ void entries_kernel(const FeatureMeta* __restrict__ feats, int F, int64_t tasks,
                               int64_t B, int64_t N, bool has_pad, int64_t pad, key_t sentinel,
                               const int64_t* __restrict__ entry_base, key_t* __restrict__ key,
                               int64_t* __restrict__ src, acc_t* __restrict__ scale,
                               unsigned long long* bad) {
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; task < tasks;
       task += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int f = find_feature(feats, F, task);
    const FeatureMeta& fm = feats[f];
    const int64_t local = task - fm.task_base;
    const int64_t e0 = entry_base[f];
    if (fm.mode == kIds) {
      const int64_t i = local;
      const int64_t b = i / fm.ncols, t = i - b * fm.ncols;
      const int64_t id = read_index(fm.ids, fm.ids64, i);
      const bool is_pad = has_pad && id == pad;
      const bool valid = !is_pad && id >= 0 && id < fm.vocab;
      if (!valid && !is_pad) record_min(&bad[f], i);
      key[e0 + i] = valid ? static_cast<key_t>(fm.row_base + id) : sentinel;
      src[e0 + i] = b * N + fm.col_start + t;
      scale[e0 + i] = acc_t(1);
      continue;
    }
    const int64_t b = local;
    int64_t k0, k1;
    // Malformed bag: with bounds checking on the op raises before any entry is used; off, its
    // entries keep the sentinel the key was filled with. (Off, overlapping malformed bags may
    // both write an entry: in-range values either way, the bags' result is unspecified.)
    if (!bag_range(fm, b, B, &bad[F + f], k0, k1)) continue;
    int64_t count = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t id = read_index(fm.ids, fm.ids64, k);
      if (has_pad && id == pad) continue;
      if (id < 0 || id >= fm.vocab) {
        record_min(&bad[f], k);
        continue;
      }
      ++count;
    }
    const acc_t mean_scale =
        fm.mode == kBagMean && count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t id = read_index(fm.ids, fm.ids64, k);
      const bool valid = !(has_pad && id == pad) && id >= 0 && id < fm.vocab;
      key[e0 + k] = valid ? static_cast<key_t>(fm.row_base + id) : sentinel;
      src[e0 + k] = b * N + fm.col_start;
      scale[e0 + k] = fm.psw ? static_cast<acc_t>(fm.psw[k]) : mean_scale;
    }
  }
}

template <typename key_t>
__global__ void run_flags_kernel(const key_t* __restrict__ skey, int64_t E, key_t sentinel,
                                 int32_t* __restrict__ flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    flag[i] = skey[i] != sentinel && (i == 0 || skey[i] != skey[i - 1]);
}

// starts[run] = the sorted position where the run begins (run = inclusive count - 1).
__global__ void run_starts_kernel(const int32_t* __restrict__ flag,
                                  const int64_t* __restrict__ count, int64_t E,
                                  int64_t* __restrict__ starts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (flag[i]) starts[count[i] - 1] = i;
}

// The feature whose rows hold `key` (row_base ascending).
__device__ __forceinline__ int feature_of_key(const FeatureMeta* feats, int F, int64_t key) {
  int lo = 0, hi = F - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (feats[mid].row_base <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The sum over the run's entries (in sorted = batch order) of scale * grad[src][d].
template <typename key_t, typename acc_t>
__device__ __forceinline__ acc_t reduce_run(const key_t* skey, const int64_t* perm,
                                            const int64_t* src, const acc_t* scale,
                                            const acc_t* g, int64_t D, int64_t d, int64_t begin,
                                            int64_t end, key_t k) {
  acc_t acc = 0;
  if (g == nullptr) return acc;
  for (int64_t i = begin; i < end && skey[i] == k; ++i) {
    const int64_t e = perm[i];
    acc += scale[e] * g[src[e] * D + d];
  }
  return acc;
}

// Sum of v over the G lanes of a group (a fixed xor tree: deterministic).
// The lanes of this thread's group of G (groups of one warp may leave the task loop at
// different times, so the warp-level primitives name only the group's lanes).
template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) {
    return 0xffffffffu;
  } else {
    return ((1u << G) - 1u) << ((threadIdx.x % 32) / G * G);
  }
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(group_mask<G>(), v, o, G);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Backward launch 2: one group per run (touched row); dense gradient or in-place update.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename key_t, int G, int kOpt>
__global__ void apply_runs_kernel(scalar_t* __restrict__ w, scalar_t* __restrict__ grad_weight,
                                  at::opmath_type<scalar_t>* __restrict__ state,
                                  const FeatureMeta* __restrict__ feats,
                                  const MemberMeta* __restrict__ mem, int F, int M, int64_t Vtot,
                                  const key_t* __restrict__ skey,
                                  const int64_t* __restrict__ perm,
                                  const int64_t* __restrict__ src,
                                  const at::opmath_type<scalar_t>* __restrict__ scale,
                                  const int64_t* __restrict__ starts,
                                  const int64_t* __restrict__ num_runs, int64_t E,
                                  at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> eps,
                                  at::opmath_type<scalar_t> wd, int64_t* __restrict__ long_list,
                                  unsigned long long* __restrict__ long_count,
                                  int64_t long_cap) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = *num_runs;  // written by the run count (same stream)
  const int lane = threadIdx.x % G;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  // Every lane of a group runs the same number of iterations (the task and loop bounds are
  // group-uniform), so the shuffles below see all G lanes.
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G; r < R;
       r += groups) {
    const int64_t begin = starts[r];
    const int64_t end = r + 1 < R ? starts[r + 1] : E;
    if (long_list != nullptr && end - begin > kLongRun) {  // group-uniform: the whole group skips
      if (lane == 0) {  // launch 4 handles it; at most long_cap such (disjoint) runs exist
        const unsigned long long slot = atomicAdd(long_count, 1ULL);
        if (slot < static_cast<unsigned long long>(long_cap))
          long_list[slot] = r;
      }
      continue;
    }
    const key_t k = skey[begin];
    const int f = feature_of_key(feats, F, static_cast<int64_t>(k));
    const int64_t id = static_cast<int64_t>(k) - feats[f].row_base;
    for (int m = 0; m < M; ++m) {
      const int64_t D = mem[m].dim;
      const acc_t* g = static_cast<const acc_t*>(mem[m].ptr);
      const int64_t row = mem[m].table_base + D * (feats[f].row_base + id);
      if constexpr (kOpt == kDense) {
        for (int64_t d = lane; d < D; d += G)
          grad_weight[row + d] =
              static_cast<scalar_t>(reduce_run(skey, perm, src, scale, g, D, d, begin, end, k));
        continue;
      }
      acc_t step = lr;
      if constexpr (kOpt == kRowwiseAdagrad) {
        acc_t sq = 0;
        for (int64_t d0 = 0; d0 < D; d0 += G) {  // group-uniform trip count
          const int64_t d = d0 + lane;
          if (d < D) {
            const acc_t a = reduce_run(skey, perm, src, scale, g, D, d, begin, end, k) +
                            wd * static_cast<acc_t>(w[row + d]);
            sq += a * a;
          }
        }
        sq = group_sum<G>(sq);
        const int64_t si = static_cast<int64_t>(m) * Vtot + static_cast<int64_t>(k);
        const acc_t s = state[si] + sq / static_cast<acc_t>(D);
        __syncwarp(group_mask<G>());  // every lane has read the old state
        if (lane == 0) state[si] = s;
        step = lr / (sqrt(s) + eps);
      }
      for (int64_t d = lane; d < D; d += G) {
        const acc_t cur = static_cast<acc_t>(w[row + d]);
        const acc_t a = reduce_run(skey, perm, src, scale, g, D, d, begin, end, k) + wd * cur;
        w[row + d] = static_cast<scalar_t>(cur - step * a);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward launch 4: one block per long run (more than kLongRun entries); see the header.
// ---------------------------------------------------------------------------------------------
// Threads: P = kLongThreads / W partitions of W lanes. A chunk is CW = W * kLongVec consecutive
// dims of the row; thread (p, lane) owns the chunk's dims j * W + lane (j < kLongVec) and, for
// each tile of kLongThreads consecutive entries of the run, sums the tile's entries p, p + P, ...
// Every loop bound below that contains a __syncthreads is block-uniform (it depends only on the
// run, the member and the chunk), and the shared buffers are reused only after a barrier.
template <typename scalar_t, typename key_t, int W, int kOpt>
__global__ void __launch_bounds__(kLongThreads) apply_long_runs_kernel(
    scalar_t* __restrict__ w, scalar_t* __restrict__ grad_weight,
    at::opmath_type<scalar_t>* __restrict__ state, const FeatureMeta* __restrict__ feats,
    const MemberMeta* __restrict__ mem, int F, int M, int64_t Vtot,
    const key_t* __restrict__ skey, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ src, const at::opmath_type<scalar_t>* __restrict__ scale,
    const int64_t* __restrict__ starts, const int64_t* __restrict__ num_runs, int64_t E,
    at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> wd,
    const int64_t* __restrict__ long_list, const unsigned long long* __restrict__ long_count,
    int64_t long_cap) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int P = kLongThreads / W;
  constexpr int CW = W * kLongVec;
  static_assert(kLongThreads % W == 0 && (P & (P - 1)) == 0, "P must be a power of two");
  static_assert((kLongThreads & (kLongThreads - 1)) == 0, "the block must be a power of two");
  static_assert(CW <= kLongThreads, "one thread per chunk dim in the update");
  __shared__ int64_t s_off[kLongThreads];  // tile: src[e] * D of each staged entry
  __shared__ acc_t s_scale[kLongThreads];  // tile: scale[e]
  __shared__ acc_t s_red[P * CW];          // partial sums [P][CW]; also the sum-of-squares tree
  static_assert(P * CW >= kLongThreads, "s_red also holds one value per thread");
  const int tid = static_cast<int>(threadIdx.x);
  const int p = tid / W;
  const int lane = tid % W;
  const int64_t R = *num_runs;
  const unsigned long long pushed = *long_count;  // written by launch 3 (same stream)
  const int64_t count = pushed < static_cast<unsigned long long>(long_cap)
                            ? static_cast<int64_t>(pushed) : long_cap;
  for (int64_t j = blockIdx.x; j < count; j += gridDim.x) {  // block-uniform
    const int64_t r = long_list[j];
    const int64_t begin = starts[r];
    int64_t end = r + 1 < R ? starts[r + 1] : E;
    const key_t k = skey[begin];
    if (r == R - 1) {
      // The last run may be followed by the sentinel keys (padding): its entries are the
      // prefix [begin, end) with key k (keys ascend, the sentinel is the largest).
      int64_t lo = begin + 1, hi = end;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (skey[mid] == k) lo = mid + 1; else hi = mid;
      }
      end = lo;
    }
    const int f = feature_of_key(feats, F, static_cast<int64_t>(k));
    const int64_t id = static_cast<int64_t>(k) - feats[f].row_base;
    for (int m = 0; m < M; ++m) {
      const int64_t D = mem[m].dim;
      const acc_t* g = static_cast<const acc_t*>(mem[m].ptr);
      const int64_t row = mem[m].table_base + D * (feats[f].row_base + id);
      acc_t step = lr;
      acc_t sq = 0;
      // Row-wise Adagrad: pass 0 sums the squares, pass 1 sums the run again (same code, same
      // order: the same values) and updates. SGD and the dense gradient: pass 1 only.
      for (int pass = kOpt == kRowwiseAdagrad ? 0 : 1; pass < 2; ++pass) {
        for (int64_t d0 = 0; d0 < D; d0 += CW) {
          acc_t acc[kLongVec];
#pragma unroll
          for (int v = 0; v < kLongVec; ++v) acc[v] = acc_t(0);
          if (g != nullptr) {
            for (int64_t t0 = begin; t0 < end; t0 += kLongThreads) {
              const int n = end - t0 < kLongThreads ? static_cast<int>(end - t0) : kLongThreads;
              __syncthreads();  // the previous tile has been read
              if (tid < n) {
                const int64_t e = perm[t0 + tid];
                s_off[tid] = src[e] * D;
                s_scale[tid] = scale[e];
              }
              __syncthreads();
#pragma unroll 4
              for (int t = p; t < n; t += P) {
                const int64_t off = s_off[t];
                const acc_t a = s_scale[t];
#pragma unroll
                for (int v = 0; v < kLongVec; ++v) {
                  const int64_t d = d0 + v * W + lane;
                  if (d < D) acc[v] += a * g[off + d];
                }
              }
            }
          }
          __syncthreads();  // s_red's previous readers are done
#pragma unroll
          for (int v = 0; v < kLongVec; ++v) s_red[p * CW + v * W + lane] = acc[v];
          __syncthreads();
#pragma unroll
          for (int h = P / 2; h > 0; h /= 2) {
            if (p < h) {
#pragma unroll
              for (int v = 0; v < kLongVec; ++v)
                s_red[p * CW + v * W + lane] += s_red[(p + h) * CW + v * W + lane];
            }
            __syncthreads();
          }
          // s_red[c] is the run's sum for dim d0 + c
          const int64_t d = d0 + tid;
          if (tid < CW && d < D) {
            const acc_t sum = s_red[tid];
            if constexpr (kOpt == kDense) {
              grad_weight[row + d] = static_cast<scalar_t>(sum);
            } else {
              const acc_t cur = static_cast<acc_t>(w[row + d]);
              const acc_t a = sum + wd * cur;
              if (pass == 0) sq += a * a;
              else w[row + d] = static_cast<scalar_t>(cur - step * a);
            }
          }
        }
        if constexpr (kOpt == kRowwiseAdagrad) {
          if (pass == 0) {
            __syncthreads();  // s_red's readers are done
            s_red[tid] = sq;
            __syncthreads();
#pragma unroll
            for (int h = kLongThreads / 2; h > 0; h /= 2) {
              if (tid < h) s_red[tid] += s_red[tid + h];
              __syncthreads();
            }
            // every thread computes the same new state (uniform code, as in launch 3); thread 0
            // writes it once all have read the old one
            const int64_t si = static_cast<int64_t>(m) * Vtot + static_cast<int64_t>(k);
            const acc_t s = state[si] + s_red[0] / static_cast<acc_t>(D);
            __syncthreads();
            if (tid == 0) state[si] = s;
            step = lr / (sqrt(s) + eps);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// Everything about one call that the kernels need: the checked arguments and table layout
// (embedding_args.h) plus the contiguous inputs (kept alive for the launches). The id and
// offsets values live on the device and are checked by the kernels.
struct Plan : EmbeddingArgs {
  std::vector<at::Tensor> ids, offsets, psw;
  at::Device device = at::kCPU;
};

Plan make_plan(const at::Tensor& weight, at::TensorList ids, at::TensorList offsets,
               at::TensorList psw, at::IntArrayRef modes, at::IntArrayRef dims,
               at::IntArrayRef vocab, std::optional<int64_t> padding_idx, int64_t bounds_check,
               const std::string& feature_names, const char* op) {
  Plan P;
  static_cast<EmbeddingArgs&>(P) =
      check_embedding_args(weight, ids, offsets, psw, modes, dims, vocab, padding_idx,
                           bounds_check, feature_names, at::kCUDA, op);
  P.device = weight.device();
  P.ids.resize(P.F);
  P.offsets.resize(P.F);
  P.psw.resize(P.F);
  for (int64_t f = 0; f < P.F; ++f) {
    P.ids[f] = ids[f].contiguous();
    if (is_bag(P.mode[f])) P.offsets[f] = offsets[f].contiguous();
    if (P.mode[f] == kBagWeightedSum) P.psw[f] = psw[f].contiguous();
  }
  return P;
}

// Host copy of the per-feature metadata (the task bases are filled by the backward).
std::vector<FeatureMeta> feature_meta(const Plan& P) {
  std::vector<FeatureMeta> fm(P.F);
  for (int64_t f = 0; f < P.F; ++f) {
    FeatureMeta& x = fm[f];
    std::memset(&x, 0, sizeof(x));
    x.ids = P.ids[f].const_data_ptr();
    x.ids64 = P.ids[f].scalar_type() == at::kLong;
    if (P.mode[f] != kIds) {
      x.offsets = P.offsets[f].const_data_ptr();
      x.offs64 = P.offsets[f].scalar_type() == at::kLong;
    }
    x.psw = P.psw[f].defined() ? P.psw[f].const_data_ptr<float>() : nullptr;
    x.vocab = P.vocab[f];
    x.row_base = P.row_base[f];
    x.nvals = P.ids[f].numel();
    x.mode = static_cast<int32_t>(P.mode[f]);
    x.ncols = static_cast<int32_t>(P.ncols[f]);
    x.col_start = P.col_start[f];
  }
  return fm;
}

// Kernel parameters are copied into a CUDA graph when it is captured: the metadata bytes travel
// in them while a capture is under way (see DeviceMeta::upload).
constexpr int kMetaChunk = 3072;
struct MetaChunk {
  uint8_t bytes[kMetaChunk];
};

__global__ void write_meta_kernel(uint8_t* __restrict__ dst, MetaChunk chunk, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = chunk.bytes[i];
}

// Packs host arrays into one pinned buffer and copies it to the device with one asynchronous
// copy (the caching host allocator keeps the pinned block alive until the copy is done).
// While the current stream is being captured into a CUDA graph, a copy node would read the host
// buffer again at every replay, long after it was freed and reused: the bytes are then written
// by small kernels that carry them as parameters, which the graph keeps.
class DeviceMeta {
 public:
  template <typename T>
  size_t add(const std::vector<T>& v) {
    const size_t at = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(at + std::max<size_t>(1, v.size() * sizeof(T)));
    if (!v.empty()) std::memcpy(bytes_.data() + at, v.data(), v.size() * sizeof(T));
    return at;
  }
  void upload(const at::Device& device) {
    const int64_t n = static_cast<int64_t>(bytes_.size());
    if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
      dev_ = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      for (int64_t at = 0; at < n; at += kMetaChunk) {
        const int len = static_cast<int>(std::min<int64_t>(kMetaChunk, n - at));
        MetaChunk chunk;
        std::memcpy(chunk.bytes, bytes_.data() + at, len);
        write_meta_kernel<<<1, 256, 0, stream>>>(dev_.data_ptr<uint8_t>() + at, chunk, len);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    dev_ = host.to(device, /*non_blocking=*/true);
  }
  template <typename T>
  const T* at_offset(size_t off) const {
    return reinterpret_cast<const T*>(static_cast<const uint8_t*>(dev_.const_data_ptr()) + off);
  }

 private:
  std::vector<uint8_t> bytes_;
  at::Tensor dev_;
};

int launch_blocks(int64_t threads_needed) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 16)));
}

// Calls f(std::integral_constant<int, G>) with the group size for rows of `lanes_needed`
// elements per lane-pass: 4, 8, 16 or 32 lanes.
template <typename Fn>
void with_group(int64_t lanes_needed, const Fn& fn) {
  if (lanes_needed <= 4) fn(std::integral_constant<int, 4>{});
  else if (lanes_needed <= 8) fn(std::integral_constant<int, 8>{});
  else if (lanes_needed <= 16) fn(std::integral_constant<int, 16>{});
  else fn(std::integral_constant<int, 32>{});
}

// Calls fn(std::integral_constant<int, opt>) for the optimizer code `opt` (codes.h): kernels
// take it as a template argument.
template <typename Fn>
void with_optimizer(int opt, const Fn& fn) {
  if (opt == kDense) fn(std::integral_constant<int, kDense>{});
  else if (opt == kSGD) fn(std::integral_constant<int, kSGD>{});
  else fn(std::integral_constant<int, kRowwiseAdagrad>{});
}

// Raises the CPU's error for malformed offsets, then reports the first recorded bad id as the
// CPU does (report_bad_id: raise, or warn with bounds_check warn). The offending values are
// copied to the host here.
void report_bad(const Plan& P, const at::Tensor& bad_dev, const char* op) {
  const at::Tensor bad = bad_dev.to(at::kCPU);  // the one D2H copy (synchronizes)
  const int64_t* rec = bad.const_data_ptr<int64_t>();
  auto none = [](int64_t v) { return static_cast<unsigned long long>(v) == kNoBad; };
  for (int64_t f = 0; f < P.F; ++f) {  // malformed offsets first, as on CPU
    if (none(rec[P.F + f])) continue;
    const at::Tensor o = P.offsets[f].to(at::kCPU).to(at::kLong);
    const int64_t* ov = o.const_data_ptr<int64_t>();
    const int64_t nvals = P.ids[f].numel();
    const std::string& nm = P.names[f];
    TORCH_CHECK_VALUE(ov[0] == 0, op, ": feature '", nm, "': offsets[0] must be 0, got ",
                      ov[0]);
    for (int64_t b = 0; b < P.B; ++b)
      TORCH_CHECK_VALUE(ov[b] <= ov[b + 1], op, ": feature '", nm,
                        "': offsets must be non-decreasing, but offsets[", b, "] = ", ov[b],
                        " > offsets[", b + 1, "] = ", ov[b + 1]);
    TORCH_CHECK_VALUE(ov[P.B] == nvals, op, ": feature '", nm, "': offsets[-1] must equal "
                      "the number of values (", nvals, "), got ", ov[P.B]);
  }
  bool found = false;
  int64_t fb = 0, ff = 0, fpos = 0, fidx = 0;
  for (int64_t f = 0; f < P.F; ++f) {
    if (none(rec[f]) || P.report_skips(f)) continue;  // warn: reported once per feature
    const int64_t i = rec[f];
    int64_t b, pos;
    if (P.mode[f] == kIds) {
      b = i / P.ncols[f];
      pos = i % P.ncols[f];
    } else {
      const at::Tensor o = P.offsets[f].to(at::kCPU).to(at::kLong);
      const int64_t* ov = o.const_data_ptr<int64_t>();
      b = static_cast<int64_t>(std::upper_bound(ov, ov + P.B + 1, i) - ov) - 1;
      b = std::min(std::max<int64_t>(b, 0), P.B - 1);
      pos = i - ov[b];
    }
    if (!found || std::tie(b, f, pos) < std::tie(fb, ff, fpos)) {
      found = true;
      fb = b;
      ff = f;
      fpos = pos;
      fidx = i;
    }
  }
  if (!found) return;
  const int64_t id = P.ids[ff].reshape({-1})[fidx].item<int64_t>();
  // the lookup's count of bad ids (record_bad_id); backward records no count
  const int64_t count = static_cast<int64_t>(static_cast<unsigned long long>(rec[2 * P.F]) + 1);
  report_bad_id(P, op, ff, id, fb, fpos, std::max<int64_t>(count, 1));
}

at::Tensor new_bad_record(const Plan& P) {
  // all ones = kNoBad for every slot: [0, F) bad ids, [F, 2F) malformed offsets, [2F] the
  // count of bad ids minus one (record_bad_id)
  return at::full({2 * P.F + 1}, -1, at::TensorOptions().dtype(at::kLong).device(P.device));
}

// ---- forward ----
void forward_impl(const Plan& P, const at::Tensor& weight, std::vector<at::Tensor>& outs,
                  const char* op) {
  const bool has_pad = P.padding_idx.has_value();
  const int64_t pad = has_pad ? *P.padding_idx : 0;
  std::vector<FeatureMeta> fm = feature_meta(P);
  std::vector<int32_t> col_f, col_t, bag_f;
  for (int64_t f = 0; f < P.F; ++f) {
    if (P.mode[f] != kIds) {
      bag_f.push_back(static_cast<int32_t>(f));
      continue;
    }
    for (int64_t t = 0; t < P.ncols[f]; ++t) {
      col_f.push_back(static_cast<int32_t>(f));
      col_t.push_back(static_cast<int32_t>(t));
    }
  }
  const int64_t w_align = 4 * static_cast<int64_t>(weight.element_size());
  const int64_t o_align = 4 * static_cast<int64_t>(outs[0].element_size());
  std::vector<MemberMeta> mm(P.M);
  bool all_vec4 = true;
  for (int64_t m = 0; m < P.M; ++m) {
    mm[m].table_base = P.table_base[m];
    mm[m].dim = P.dims[m];
    mm[m].ptr = outs[m].data_ptr();
    mm[m].vec4 = P.dims[m] % 4 == 0 && P.table_base[m] % 4 == 0 &&
                 reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % w_align == 0 &&
                 reinterpret_cast<uintptr_t>(outs[m].const_data_ptr()) % o_align == 0;
    all_vec4 = all_vec4 && mm[m].vec4;
  }
  const int64_t C = static_cast<int64_t>(col_f.size()), J = static_cast<int64_t>(bag_f.size());
  if (P.B == 0) return;
  DeviceMeta meta;
  const size_t o_f = meta.add(fm), o_m = meta.add(mm), o_cf = meta.add(col_f),
               o_ct = meta.add(col_t), o_bf = meta.add(bag_f);
  meta.upload(P.device);
  at::Tensor bad = new_bad_record(P);
  auto* bad_p = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_cuda", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    if (C > 0) {
      with_group(all_vec4 ? (P.max_dim + 3) / 4 : P.max_dim, [&](auto g) {
        constexpr int G = decltype(g)::value;
        gather_columns_kernel<scalar_t, G><<<launch_blocks(P.B * C * G), kThreads, 0, stream>>>(
            w, meta.at_offset<FeatureMeta>(o_f), meta.at_offset<MemberMeta>(o_m),
            meta.at_offset<int32_t>(o_cf), meta.at_offset<int32_t>(o_ct), P.B, C, P.N,
            static_cast<int>(P.M), has_pad, pad, bad_p, bad_p + 2 * P.F);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (J > 0) {
      with_group(P.max_dim, [&](auto g) {
        constexpr int G = decltype(g)::value;
        pool_bags_kernel<scalar_t, G><<<launch_blocks(P.B * J * G), kThreads, 0, stream>>>(
            w, meta.at_offset<FeatureMeta>(o_f), meta.at_offset<MemberMeta>(o_m),
            meta.at_offset<int32_t>(o_bf), P.B, J, P.N, static_cast<int>(P.M), P.F, has_pad,
            pad, bad_p, bad_p + 2 * P.F);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  // off: no copy, no synchronization; warn: the one copy, a warning instead of IndexError
  if (P.lookup_checks_ids()) report_bad(P, bad, op);
}

// ---- backward: entries, sort, runs, apply ----
// (sorted keys, permutation): a stable LSD radix sort (CUB) of the `bits` low bits of the
// non-negative keys, the permutation as int64 (cub takes int item counts: beyond that, at::sort).
template <typename key_t>
std::tuple<at::Tensor, at::Tensor> sort_keys(const at::Tensor& key, int bits) {
  const int64_t E = key.numel();
  if (E > std::numeric_limits<int>::max())
    return at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  using ukey_t = std::make_unsigned_t<key_t>;  // non-negative: the same bits, no sign flip
  const at::Tensor iota = at::arange(E, key.options().dtype(at::kLong));
  at::Tensor skey = at::empty_like(key), perm = at::empty_like(iota);
  const auto* kin = reinterpret_cast<const ukey_t*>(key.const_data_ptr<key_t>());
  auto* kout = reinterpret_cast<ukey_t*>(skey.data_ptr<key_t>());
  const int n = static_cast<int>(E);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, kin, kout, iota.const_data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
      n, 0, bits, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))},
                              key.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, kin, kout, iota.const_data_ptr<int64_t>(),
      perm.data_ptr<int64_t>(), n, 0, bits, stream));
  return {skey, perm};
}

template <typename key_t>
void backward_impl(const Plan& P, at::TensorList grads, const at::Tensor& weight,
                   const at::Tensor& grad_weight, const at::Tensor& state, int opt, double lr,
                   double eps, double weight_decay, const char* op) {
  const bool has_pad = P.padding_idx.has_value();
  const int64_t pad = has_pad ? *P.padding_idx : 0;
  const auto acc_dtype = at::toOpMathType(weight.scalar_type());
  const std::vector<at::Tensor> g = embedding_grads(P, grads, weight, op);
  std::vector<FeatureMeta> fm = feature_meta(P);
  std::vector<int64_t> entry_base(P.F);
  int64_t E = 0, tasks = 0;
  for (int64_t f = 0; f < P.F; ++f) {
    entry_base[f] = E;
    E += P.ids[f].numel();
    fm[f].task_base = tasks;
    tasks += P.mode[f] == kIds ? P.ids[f].numel() : P.B;
  }
  std::vector<MemberMeta> mm(P.M);
  for (int64_t m = 0; m < P.M; ++m) {
    mm[m].table_base = P.table_base[m];
    mm[m].dim = P.dims[m];
    mm[m].ptr = g[m].defined() ? g[m].data_ptr() : nullptr;
    mm[m].vec4 = 0;
  }
  if (tasks == 0) return;
  DeviceMeta meta;
  const size_t o_f = meta.add(fm), o_m = meta.add(mm), o_e = meta.add(entry_base);
  meta.upload(P.device);
  const auto dev = at::TensorOptions().device(P.device);
  const auto key_dtype = std::is_same_v<key_t, int32_t> ? at::kInt : at::kLong;
  // Keys are row keys in [0, Vtot) and the sentinel Vtot (padding and bad ids): the sort needs
  // only the bits that hold Vtot.
  const key_t sentinel = static_cast<key_t>(P.Vtot);
  const int key_bits = std::max(1, 64 - __builtin_clzll(static_cast<uint64_t>(P.Vtot)));
  // With bounds checking off nothing raises before the sort, so the entries of a malformed bag
  // (which the entries kernel skips) must hold the sentinel too.
  at::Tensor key = P.raises_on_bad_ids() ? at::empty({E}, dev.dtype(key_dtype))
                                         : at::full({E}, P.Vtot, dev.dtype(key_dtype));
  at::Tensor src = at::empty({E}, dev.dtype(at::kLong));
  at::Tensor scale = at::empty({E}, dev.dtype(acc_dtype));
  at::Tensor bad = new_bad_record(P);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_entries_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    entries_kernel<key_t, acc_t><<<launch_blocks(tasks), kThreads, 0, stream>>>(
        meta.at_offset<FeatureMeta>(o_f), static_cast<int>(P.F), tasks, P.B, P.N, has_pad, pad,
        sentinel, meta.at_offset<int64_t>(o_e), key.data_ptr<key_t>(), src.data_ptr<int64_t>(),
        scale.data_ptr<acc_t>(), reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // before anything is written; warn: not again (the lookup reported), bad ids are padding
  if (P.raises_on_bad_ids()) report_bad(P, bad, op);
  if (E == 0) return;
  // A stable radix sort of the key_bits low bits: equal keys keep their batch order, which
  // fixes the summation order.
  at::Tensor skey, perm;
  std::tie(skey, perm) = sort_keys<key_t>(key, key_bits);
  // The runs without a host synchronization: flags mark run starts, their inclusive prefix
  // count numbers the runs, starts[run] is scattered from it and the count's last element is
  // the number of runs R, which the apply kernels read on the device.
  at::Tensor flags = at::empty({E}, dev.dtype(at::kInt));
  run_flags_kernel<key_t><<<launch_blocks(E), kThreads, 0, stream>>>(
      skey.const_data_ptr<key_t>(), E, sentinel, flags.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor run_count = at::cumsum(flags, 0, at::kLong);
  at::Tensor starts = at::empty({E}, dev.dtype(at::kLong));
  run_starts_kernel<<<launch_blocks(E), kThreads, 0, stream>>>(
      flags.const_data_ptr<int32_t>(), run_count.const_data_ptr<int64_t>(), E,
      starts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t* num_runs = run_count.const_data_ptr<int64_t>() + (E - 1);
  // Long runs (> kLongRun entries) are disjoint, so there are at most E / (kLongRun + 1) of
  // them: the list's capacity. None can exist when that is 0.
  const int64_t long_cap = E / (kLongRun + 1);
  at::Tensor long_list, long_count;
  if (long_cap > 0) {
    long_list = at::empty({long_cap}, dev.dtype(at::kLong));
    long_count = at::zeros({1}, dev.dtype(at::kLong));  // an async memset, no sync
  }
  int64_t* long_list_p = long_cap > 0 ? long_list.data_ptr<int64_t>() : nullptr;
  auto* long_count_p =
      long_cap > 0 ? reinterpret_cast<unsigned long long*>(long_count.data_ptr<int64_t>())
                   : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = opt == kDense ? nullptr : weight.data_ptr<scalar_t>();
    scalar_t* gw = opt == kDense ? grad_weight.data_ptr<scalar_t>() : nullptr;
    acc_t* st = opt == kRowwiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
    // The two apply kernels take the same arguments; only their grids differ.
    auto launch = [&](auto kernel, int blocks, int threads) {
      kernel<<<blocks, threads, 0, stream>>>(
          w, gw, st, meta.at_offset<FeatureMeta>(o_f), meta.at_offset<MemberMeta>(o_m),
          static_cast<int>(P.F), static_cast<int>(P.M), P.Vtot, skey.const_data_ptr<key_t>(),
          perm.const_data_ptr<int64_t>(), src.const_data_ptr<int64_t>(),
          scale.const_data_ptr<acc_t>(), starts.const_data_ptr<int64_t>(), num_runs, E,
          static_cast<acc_t>(lr), static_cast<acc_t>(eps), static_cast<acc_t>(weight_decay),
          long_list_p, long_count_p, long_cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_optimizer(opt, [&](auto kopt) {
      constexpr int kOpt = decltype(kopt)::value;
      with_group(P.max_dim, [&](auto gsize) {
        constexpr int G = decltype(gsize)::value;
        // R is known on the device only: a grid for E runs (capped), striding over r < R
        launch(apply_runs_kernel<scalar_t, key_t, G, kOpt>, launch_blocks(E * G), kThreads);
      });
      if (long_cap == 0) return;
      // One block per long run (their number is known only on the device: a grid for the
      // capacity, capped; surplus blocks exit at once, a smaller grid strides over the list).
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int blocks =
          static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(long_cap, int64_t(sms) * 32)));
      // kLongVec dims per lane: the lanes a chunk needs for the widest member
      with_group((P.max_dim + kLongVec - 1) / kLongVec, [&](auto wsize) {
        constexpr int W = decltype(wsize)::value;
        launch(apply_long_runs_kernel<scalar_t, key_t, W, kOpt>, blocks, kLongThreads);
      });
    });
  });
}

void run_backward(const Plan& P, at::TensorList grads, const at::Tensor& weight,
                  const at::Tensor& grad_weight, const at::Tensor& state, int opt, double lr,
                  double eps, double weight_decay, const char* op) {
  // int32 keys (half the sort passes) whenever every row key and the sentinel fit
  if (P.Vtot < std::numeric_limits<int32_t>::max())
    backward_impl<int32_t>(P, grads, weight, grad_weight, state, opt, lr, eps, weight_decay, op);
  else
    backward_impl<int64_t>(P, grads, weight, grad_weight, state, opt, lr, eps, weight_decay, op);
}

}  // namespace

std::vector<at::Tensor> multi_embedding(const at::Tensor& weight, at::TensorList ids,
                                        at::TensorList offsets,
                                        at::TensorList per_sample_weights,
                                        at::IntArrayRef modes, at::IntArrayRef dims,
                                        at::IntArrayRef vocab,
                                        std::optional<int64_t> padding_idx,
                                        int64_t bounds_check,
                                        const std::string& feature_names) {
  const char* op = "cetnet::multi_embedding";
  const c10::cuda::CUDAGuard guard(weight.device());
  Plan P = make_plan(weight, ids, offsets, per_sample_weights, modes, dims, vocab, padding_idx,
                     bounds_check, feature_names, op);
  std::vector<at::Tensor> outs = embedding_outputs(P, weight);
  forward_impl(P, weight, outs, op);
  return outs;
}

at::Tensor multi_embedding_backward(at::TensorList grads, const at::Tensor& weight,
                                    at::TensorList ids, at::TensorList offsets,
                                    at::TensorList per_sample_weights, at::IntArrayRef modes,
                                    at::IntArrayRef dims, at::IntArrayRef vocab,
                                    std::optional<int64_t> padding_idx,
                                    int64_t bounds_check) {
  const char* op = "cetnet::multi_embedding_backward";
  const c10::cuda::CUDAGuard guard(weight.device());
  Plan P = make_plan(weight, ids, offsets, per_sample_weights, modes, dims, vocab, padding_idx,
                     bounds_check, "", op);
  at::Tensor grad_weight = at::zeros_like(weight);
  run_backward(P, grads, weight, grad_weight, at::Tensor(), kDense, 0.0, 0.0, 0.0, op);
  return grad_weight;
}

void multi_embedding_update(at::TensorList grads, const at::Tensor& weight,
                            const at::Tensor& state, at::TensorList ids, at::TensorList offsets,
                            at::TensorList per_sample_weights, at::IntArrayRef modes,
                            at::IntArrayRef dims, at::IntArrayRef vocab,
                            std::optional<int64_t> padding_idx, int64_t bounds_check,
                            int64_t optimizer, double lr, double eps, double weight_decay) {
  const char* op = "cetnet::multi_embedding_update";
  const c10::cuda::CUDAGuard guard(weight.device());
  Plan P = make_plan(weight, ids, offsets, per_sample_weights, modes, dims, vocab, padding_idx,
                     bounds_check, "", op);
  check_update_args(P, optimizer, state, weight, op);
  run_backward(P, grads, weight, at::Tensor(), state, static_cast<int>(optimizer), lr, eps,
               weight_decay, op);
}

}  // namespace cetnet::cuda
