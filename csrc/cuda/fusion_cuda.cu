// CUDA kernels: the row math of fusion_math.h run with V = float/double, one thread per row.
//
// This file only holds launch glue, the row accessors and the reductions; all the math is the
// shared, CPU-tested code of fusion_math.h (acc_t = at::opmath_type: double for double logits,
// float otherwise).
//
// Row accessors:
//   * CachedRow: each member's Elem<acc_t> (6 values derived from the logit) is computed once and
//     kept in dynamic shared memory laid out [field][k][thread], so a warp's accesses hit 32
//     consecutive words (no bank conflicts). The block size is chosen so the cache fits in 48 KB.
//   * GlobalRow: for K too large for that, elem(k) recomputes make_elem from the global logit.
// Rows are visited by a grid-stride loop with 64-bit indices; inputs may have any strides.
// Reductions over rows are deterministic: per-row values go to a [B] buffer, summed by at::sum
// in float64 (no atomics).
#include "fusion_math.h"

#include "checks.h"
#include "cuda/fusion_cuda.h"

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

constexpr int kElemFields = 6;                 // z, p, q, lsp, lsq, c
constexpr size_t kMaxSharedBytes = 48 * 1024;  // per block, without opt-in
constexpr int kMaxThreads = 256;
constexpr int kMinCachedThreads = 32;

// ---------------------------------------------------------------------------------------------
// Row accessors.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct CachedRow {
  int K;
  int T;              // blockDim.x: the distance between consecutive members of one thread
  const acc_t* base;  // this thread's column of the cache: base[(f * K + k) * T]
  __host__ __device__ __forceinline__ Elem<acc_t> elem(int k) const {
    const acc_t* s = base + k * T;
    const int fs = K * T;  // distance between fields
    Elem<acc_t> e;
    e.z = s[0];
    e.p = s[fs];
    e.q = s[2 * fs];
    e.lsp = s[3 * fs];
    e.lsq = s[4 * fs];
    e.c = s[5 * fs];
    return e;
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

// Builds the accessor of one row (filling this thread's shared-memory column if kCached) and
// calls f(row).
template <bool kCached, typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void with_row(const scalar_t* z_row, int64_t s1, int K, acc_t* cache,
                                         const F& f) {
  if constexpr (kCached) {
    const int T = static_cast<int>(blockDim.x);
    acc_t* col = cache + threadIdx.x;
    const int fs = K * T;
    for (int k = 0; k < K; ++k) {
      const Elem<acc_t> e = make_elem(static_cast<acc_t>(z_row[static_cast<int64_t>(k) * s1]));
      acc_t* s = col + k * T;
      s[0] = e.z;
      s[fs] = e.p;
      s[2 * fs] = e.q;
      s[3 * fs] = e.lsp;
      s[4 * fs] = e.lsq;
      s[5 * fs] = e.c;
    }
    f(CachedRow<acc_t>{K, T, col});
  } else {
    f(GlobalRow<scalar_t, acc_t>{K, z_row, s1});
  }
}

// The dynamic shared memory of a block, as acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t* shared_cache() {
  extern __shared__ __align__(sizeof(double)) unsigned char cetnet_smem[];
  return reinterpret_cast<acc_t*>(cetnet_smem);
}

// 1 / tau, read on the device. A non-positive or non-finite tau (rejected by the Python layer)
// gives NaN, so results are NaN rather than silently wrong.
template <typename acc_t>
__device__ __forceinline__ acc_t inverse_temperature(const double* tau) {
  const double t = *tau;
  return (t > 0.0 && t <= std::numeric_limits<double>::max())
             ? static_cast<acc_t>(1.0 / t)
             : std::numeric_limits<acc_t>::quiet_NaN();
}

#define CETNET_ROW_LOOP(b, B)                                                            \
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < (B); \
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, bool kCached>
__global__ void fusion_forward_kernel(const scalar_t* __restrict__ z, int64_t s0, int64_t s1,
                                      const double* __restrict__ tau, int64_t B, int K,
                                      bool logit_space, scalar_t* __restrict__ p_out,
                                      scalar_t* __restrict__ w_out) {
  const acc_t inv_tau = inverse_temperature<acc_t>(tau);
  acc_t* cache = kCached ? shared_cache<acc_t>() : nullptr;
  CETNET_ROW_LOOP(b, B) {
    scalar_t* w_row = w_out + b * K;
    with_row<kCached>(z + b * s0, s1, K, cache, [&](const auto& row) {
      const acc_t p = fusion_forward_row<acc_t>(
          row, inv_tau, logit_space, [&](int k, acc_t w) { w_row[k] = static_cast<scalar_t>(w); });
      p_out[b] = static_cast<scalar_t>(p);
    });
  }
}

template <typename scalar_t, typename acc_t, bool kCached>
__global__ void fusion_backward_kernel(const scalar_t* __restrict__ gp, int64_t gp_s0,
                                       const scalar_t* __restrict__ gw, int64_t gw_s0,
                                       int64_t gw_s1, const scalar_t* __restrict__ z, int64_t s0,
                                       int64_t s1, const double* __restrict__ tau, int64_t B,
                                       int K, bool logit_space, bool detach_weights,
                                       scalar_t* __restrict__ gz_out, acc_t* __restrict__ gt_out) {
  const acc_t inv_tau = inverse_temperature<acc_t>(tau);
  acc_t* cache = kCached ? shared_cache<acc_t>() : nullptr;
  CETNET_ROW_LOOP(b, B) {
    const acc_t g_p = gp != nullptr ? static_cast<acc_t>(gp[b * gp_s0]) : acc_t(0);
    const scalar_t* gw_row = gw != nullptr ? gw + b * gw_s0 : nullptr;
    scalar_t* gz_row = gz_out + b * K;
    with_row<kCached>(z + b * s0, s1, K, cache, [&](const auto& row) {
      const acc_t gt = fusion_backward_row<acc_t>(
          row, inv_tau, logit_space, detach_weights, g_p,
          [&](int k) {
            return gw_row != nullptr ? static_cast<acc_t>(gw_row[static_cast<int64_t>(k) * gw_s1])
                                     : acc_t(0);
          },
          [&](int k, acc_t g) { gz_row[k] = static_cast<scalar_t>(g); });
      if (gt_out != nullptr) gt_out[b] = gt;
    });
  }
}

template <typename scalar_t, typename acc_t, bool kCached>
__global__ void collaborative_loss_kernel(
    const scalar_t* __restrict__ z, int64_t s0, int64_t s1, const acc_t* __restrict__ y,
    int64_t y_s0, const double* __restrict__ tau, int64_t B, int K, bool logit_space,
    bool detach_weights, LossWeights weights, bool compute_grad, scalar_t* __restrict__ p_out,
    scalar_t* __restrict__ gz_out, acc_t* __restrict__ loss_out, acc_t* __restrict__ gt_out) {
  const acc_t inv_tau = inverse_temperature<acc_t>(tau);
  acc_t* cache = kCached ? shared_cache<acc_t>() : nullptr;
  CETNET_ROW_LOOP(b, B) {
    const acc_t yb = y[b * y_s0];
    scalar_t* gz_row = gz_out != nullptr ? gz_out + b * K : nullptr;
    with_row<kCached>(z + b * s0, s1, K, cache, [&](const auto& row) {
      const LossRowOut<acc_t> r = collaborative_loss_row<acc_t>(
          row, yb, inv_tau, logit_space, detach_weights, weights, compute_grad,
          [&](int k, acc_t g) { gz_row[k] = static_cast<scalar_t>(g); });
      p_out[b] = static_cast<scalar_t>(r.p);
      loss_out[b] = r.loss;
      if (gt_out != nullptr) gt_out[b] = r.gtau;
    });
  }
}

#undef CETNET_ROW_LOOP

// ---------------------------------------------------------------------------------------------
// Launch configuration.
// ---------------------------------------------------------------------------------------------
struct LaunchConfig {
  bool cached;
  int threads;
  size_t smem;
  unsigned int blocks;
};

// The most threads (a power of two in [32, 256]) whose cache fits in 48 KB; without one (K
// above 64 for float, 32 for double) the kernels recompute member values from global memory.
template <typename acc_t>
LaunchConfig launch_config(int64_t B, int K) {
  static_assert(sizeof(Elem<acc_t>) == kElemFields * sizeof(acc_t), "Elem has 6 fields");
  const size_t per_thread = kElemFields * static_cast<size_t>(K) * sizeof(acc_t);
  LaunchConfig cfg{false, kMaxThreads, 0, 1};
  for (int t = kMaxThreads; t >= kMinCachedThreads; t /= 2) {
    if (per_thread * static_cast<size_t>(t) <= kMaxSharedBytes) {
      cfg.cached = true;
      cfg.threads = t;
      cfg.smem = per_thread * static_cast<size_t>(t);
      break;
    }
  }
  // Enough blocks to fill the device once; the grid-stride loop covers the rest.
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t per_sm = std::max(1, prop->maxThreadsPerMultiProcessor / cfg.threads);
  const int64_t max_blocks = std::max<int64_t>(1, prop->multiProcessorCount * per_sm);
  const int64_t needed = (B + cfg.threads - 1) / cfg.threads;
  cfg.blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, max_blocks)));
  return cfg;
}

// The temperature as a float64 0-dim tensor on the logits' device (a device-side cast, no sync).
at::Tensor temperature_f64(const at::Tensor& temperature) {
  return temperature.to(at::kDouble);
}

// sum over rows in float64, cast to the acc dtype, as a 0-dim tensor (deterministic).
at::Tensor sum_rows(const at::Tensor& rows, at::ScalarType acc_dtype, bool mean) {
  at::Tensor total = rows.sum(at::kDouble);
  if (mean && rows.size(0) > 0) total = total.div(static_cast<double>(rows.size(0)));
  return total.to(acc_dtype);
}

// Launches KERNEL<scalar_t, acc_t, cached or not> with cfg on stream, then checks the launch.
#define CETNET_LAUNCH(KERNEL, cfg, stream, ...)                                                \
  do {                                                                                         \
    if ((cfg).cached) {                                                                        \
      KERNEL<scalar_t, acc_t, true><<<(cfg).blocks, (cfg).threads, (cfg).smem, (stream)>>>(    \
          __VA_ARGS__);                                                                        \
    } else {                                                                                   \
      KERNEL<scalar_t, acc_t, false><<<(cfg).blocks, (cfg).threads, 0, (stream)>>>(__VA_ARGS__); \
    }                                                                                          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                            \
  } while (0)

}  // namespace

std::tuple<at::Tensor, at::Tensor> confidence_fusion(const at::Tensor& logits,
                                                     const at::Tensor& temperature,
                                                     bool logit_space, bool /*detach_weights*/) {
  // detach_weights only matters to the backward: the forward values do not depend on it.
  const char* op = "cetnet::confidence_fusion";
  check_logits(logits, op);
  check_temperature(temperature, logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor weights = at::empty({B, K}, logits.options());
  if (B == 0) return {prob, weights};
  const at::Tensor tau = temperature_f64(temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LaunchConfig cfg = launch_config<acc_t>(B, K);
    CETNET_LAUNCH(fusion_forward_kernel, cfg, stream,
                  logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                  tau.const_data_ptr<double>(), B, K, logit_space,
                  prob.mutable_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>());
  });
  return {prob, weights};
}

std::tuple<at::Tensor, at::Tensor> confidence_fusion_backward(
    const std::optional<at::Tensor>& grad_prob, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& logits, const std::optional<at::Tensor>& weights,
    const at::Tensor& temperature, bool logit_space, bool detach_weights,
    bool compute_temperature_grad) {
  const char* op = "cetnet::confidence_fusion_backward";
  check_logits(logits, op);
  check_temperature(temperature, logits, op);
  // The weights are checked but recomputed: on a GPU this op is memory-bound, and re-deriving
  // them from the logits costs less than reading [B, K] more bytes.
  (void)saved_weights(weights, logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  at::Tensor gp, gw;  // not structured bindings: lambdas below capture them (C++17)
  std::tie(gp, gw) = fusion_upstream_grads(grad_prob, grad_weights, logits, op);
  const bool has_gp = gp.defined(), has_gw = gw.defined();
  const bool want_gt = compute_temperature_grad && !detach_weights;
  const auto acc_dtype = acc_type_of(logits);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  at::Tensor grad_logits = at::empty({B, K}, logits.options());
  if (B == 0) return {grad_logits, at::zeros({}, acc_opts)};
  at::Tensor gt_rows = want_gt ? at::empty({B}, acc_opts) : at::Tensor();
  const at::Tensor tau = temperature_f64(temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LaunchConfig cfg = launch_config<acc_t>(B, K);
    const scalar_t* gp_ptr = has_gp ? gp.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gw_ptr = has_gw ? gw.const_data_ptr<scalar_t>() : nullptr;
    const int64_t gp_s0 = has_gp ? gp.stride(0) : 0;
    const int64_t gw_s0 = has_gw ? gw.stride(0) : 0, gw_s1 = has_gw ? gw.stride(1) : 0;
    acc_t* gt_out = want_gt ? gt_rows.mutable_data_ptr<acc_t>() : nullptr;
    CETNET_LAUNCH(fusion_backward_kernel, cfg, stream,
                  gp_ptr, gp_s0, gw_ptr, gw_s0, gw_s1,
                  logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                  tau.const_data_ptr<double>(), B, K, logit_space, detach_weights,
                  grad_logits.mutable_data_ptr<scalar_t>(), gt_out);
  });
  at::Tensor grad_temperature =
      want_gt ? sum_rows(gt_rows, acc_dtype, /*mean=*/false) : at::zeros({}, acc_opts);
  return {grad_logits, grad_temperature};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> collaborative_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    double ensemble_weight, double member_weight, double distill_weight, double mutual_weight,
    bool logit_space, bool detach_weights, int64_t reduction, bool compute_grad,
    bool compute_temperature_grad) {
  const char* op = "cetnet::collaborative_loss";
  check_logits(logits, op);
  check_rows(labels, logits, "labels", op);
  check_temperature(temperature, logits, op);
  check_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int K = static_cast<int>(logits.size(1));
  const auto acc_dtype = acc_type_of(logits);
  const auto acc_opts = logits.options().dtype(acc_dtype);
  const bool per_row = reduction == 0;
  const bool want_gt = compute_grad && compute_temperature_grad;
  const LossWeights weights{member_weight, ensemble_weight, distill_weight, mutual_weight};

  at::Tensor prob = at::empty({B}, logits.options());
  at::Tensor grad_logits =
      compute_grad ? at::empty({B, K}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor loss_rows = at::empty({B}, acc_opts);
  at::Tensor gt_rows = want_gt ? at::empty({B}, acc_opts) : at::Tensor();
  if (B > 0) {
    const at::Tensor y_t = labels.to(acc_dtype);
    const at::Tensor tau = temperature_f64(temperature);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cetnet_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const LaunchConfig cfg = launch_config<acc_t>(B, K);
      scalar_t* gz_out = compute_grad ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* gt_out = want_gt ? gt_rows.mutable_data_ptr<acc_t>() : nullptr;
      CETNET_LAUNCH(collaborative_loss_kernel, cfg, stream,
                    logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                    y_t.const_data_ptr<acc_t>(), y_t.stride(0), tau.const_data_ptr<double>(), B, K,
                    logit_space, detach_weights, weights, compute_grad,
                    prob.mutable_data_ptr<scalar_t>(), gz_out, loss_rows.mutable_data_ptr<acc_t>(),
                    gt_out);
    });
  }
  at::Tensor loss, grad_temperature;
  if (per_row) {
    loss = loss_rows;
    grad_temperature = want_gt ? gt_rows : at::zeros({}, acc_opts);
  } else {
    loss = sum_rows(loss_rows, acc_dtype, /*mean=*/reduction == 1);
    grad_temperature =
        want_gt ? sum_rows(gt_rows, acc_dtype, /*mean=*/false) : at::zeros({}, acc_opts);
  }
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
