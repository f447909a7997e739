// Moving rows of [B, K] tensors in and out of the tiles the CPU kernels compute on: L =
// Vec<acc_t>::size() rows, stored member-major ([K][L], one SIMD lane per row), any input strides.
// Shared by the fusion and KDEF kernels.
#pragma once

#include "isa.h"

#include "cpu/tile_transpose.h"
#include "cpu/vec_math.h"

#include <cstdint>
#include <type_traits>

namespace cetnet::cpu {
inline namespace CETNET_ISA_NS {  // isa.h

// Gathers rows [b0, b0 + n) of a strided [B, K] tensor into buf[k * L + r] (zero-padded).
template <typename scalar_t, typename acc_t>
inline void gather_tile(const scalar_t* x, int64_t s0, int64_t s1, int64_t b0, int n, int K,
                        acc_t* buf) {
  constexpr int L = Vec<acc_t>::size();
  int k = 0;
#ifdef CETNET_HAS_TILE_TRANSPOSE
  if constexpr (kHasTileIO<scalar_t> && std::is_same_v<acc_t, float> && L == 8) {
    if (n == L && s1 == 1) k = gather_tile_vec(x + b0 * s0, s0, K, buf);
  }
#endif
  for (; k < K; ++k) {
    const scalar_t* col = x + b0 * s0 + k * s1;
    acc_t* out = buf + k * L;
    for (int r = 0; r < n; ++r) out[r] = static_cast<acc_t>(col[r * s0]);
    for (int r = n; r < L; ++r) out[r] = acc_t(0);
  }
}

// Writes buf[k * L + r] to rows [b0, b0 + n) of a contiguous [B, K] tensor.
template <typename scalar_t, typename acc_t>
inline void scatter_tile(const acc_t* buf, int64_t b0, int n, int K, scalar_t* x) {
  constexpr int L = Vec<acc_t>::size();
  int k0 = 0;
#ifdef CETNET_HAS_TILE_TRANSPOSE
  if constexpr (kHasTileIO<scalar_t> && std::is_same_v<acc_t, float> && L == 8) {
    if (n == L) k0 = scatter_tile_vec(buf, K, x + b0 * K);
  }
#endif
  for (int r = 0; r < n; ++r) {
    scalar_t* dst = x + (b0 + r) * K;
    for (int k = k0; k < K; ++k) dst[k] = static_cast<scalar_t>(buf[k * L + r]);
  }
}

// Gathers n values of a strided 1-D tensor, zero-padded to L.
template <typename scalar_t, typename acc_t>
inline Vec<acc_t> gather_rows(const scalar_t* x, int64_t s0, int64_t b0, int n) {
  constexpr int L = Vec<acc_t>::size();
  alignas(64) acc_t tmp[L];
  for (int r = 0; r < n; ++r) tmp[r] = static_cast<acc_t>(x[(b0 + r) * s0]);
  for (int r = n; r < L; ++r) tmp[r] = acc_t(0);
  return Vec<acc_t>::loadu(tmp);
}

template <typename scalar_t, typename acc_t>
inline void store_rows(const Vec<acc_t>& v, int64_t b0, int n, scalar_t* x) {
  constexpr int L = Vec<acc_t>::size();
  alignas(64) acc_t tmp[L];
  v.store(tmp);
  for (int r = 0; r < n; ++r) x[b0 + r] = static_cast<scalar_t>(tmp[r]);
}

template <typename acc_t>
inline acc_t sum_lanes(const Vec<acc_t>& v, int n) {
  constexpr int L = Vec<acc_t>::size();
  alignas(64) acc_t tmp[L];
  v.store(tmp);
  acc_t s = 0;
  for (int r = 0; r < n; ++r) s += tmp[r];
  return s;
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet::cpu
