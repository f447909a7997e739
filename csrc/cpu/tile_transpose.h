// In-register transposes between row-major [8 rows][K] float tiles and the member-major
// [K][8 rows] layout the CPU kernels compute in (one SIMD lane per row), for AVX2.
//
// The scalar loops of fusion_cpu.cpp move one float at a time: about 0.4 ns per element each
// way, a fifth of a fusion forward + backward. Here the members of a row are read and written
// as contiguous vectors (blocks of 8, then 4 members; any row stride) and transposed with
// shuffles; members left over (K mod 4) keep the scalar path. float, bfloat16 and half tiles
// (converted to / from float on the way, rounding exactly as c10's scalar conversions do) of full
// height: the caller falls back to its scalar loop otherwise.
#pragma once

#include "isa.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#include <immintrin.h>
#define CETNET_HAS_TILE_TRANSPOSE 1

namespace cetnet::cpu {
inline namespace CETNET_ISA_NS {  // isa.h

// 8x8: in[i] holds row i's 8 members; out[k] holds member k of rows 0..7. An involution.
inline void transpose8x8(const __m256 in[8], __m256 out[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
  const __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
  const __m256 t4 = _mm256_unpacklo_ps(in[4], in[5]), t5 = _mm256_unpackhi_ps(in[4], in[5]);
  const __m256 t6 = _mm256_unpacklo_ps(in[6], in[7]), t7 = _mm256_unpackhi_ps(in[6], in[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  out[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  out[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  out[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  out[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  out[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  out[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  out[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The in-lane 4x4 transpose of four vectors (each 128-bit lane on its own). An involution.
inline void transpose4x4_lanes(const __m256 in[4], __m256 out[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
  const __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
  out[0] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  out[1] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  out[2] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  out[3] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}

// Loads and stores of 8 and 4 consecutive values of T as float vectors.
template <typename T>
struct TileIO;

template <>
struct TileIO<float> {
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static __m128 load4(const float* p) { return _mm_loadu_ps(p); }
  static void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static void store4(float* p, __m128 v) { _mm_storeu_ps(p, v); }
};

// bfloat16 -> float is exact (the high half of the bits); float -> bfloat16 rounds to nearest
// even and maps NaN to 0x7FC0, as c10::BFloat16's constructor does.
template <>
struct TileIO<c10::BFloat16> {
  static __m256 load8(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m128 load4(const c10::BFloat16* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
  static __m128i round8(__m256 v) {  // 8 bfloat16 bit patterns as 32-bit lanes
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // values fit in 16 bits: the saturating pack is exact; then undo its per-lane interleave
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    return _mm256_castsi256_si128(packed);
  }
  static void store8(c10::BFloat16* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round8(v));
  }
  static void store4(c10::BFloat16* p, __m128 v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), round8(_mm256_castps128_ps256(v)));
  }
};

// half <-> float with F16C, rounding to nearest even (c10::Half's conversion).
template <>
struct TileIO<c10::Half> {
  static __m256 load8(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128 load4(const c10::Half* p) {
    return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static void store8(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store4(c10::Half* p, __m128 v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};

template <typename T>
inline constexpr bool kHasTileIO = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                                   std::is_same_v<T, c10::Half>;

// One vector from two rows' 4-member blocks: `lo` in the low 128-bit lane, `hi` in the high.
template <typename T>
inline __m256 load_row_pair(const T* lo, const T* hi) {
  const __m256 low = _mm256_castps128_ps256(TileIO<T>::load4(lo));
  return _mm256_insertf128_ps(low, TileIO<T>::load4(hi), 1);
}

// buf[k * 8 + r] = x[r * s0 + k] for 8 rows, members [0, K) in blocks of 8 and 4; returns the
// first member not handled (the caller's scalar loop does the rest).
template <typename T>
inline int gather_tile_vec(const T* x, int64_t s0, int K, float* buf) {
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 rows[8], cols[8];
    for (int r = 0; r < 8; ++r) rows[r] = TileIO<T>::load8(x + r * s0 + k);
    transpose8x8(rows, cols);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(buf + (k + j) * 8, cols[j]);
  }
  if (k + 4 <= K) {
    // Vector i holds rows i (low lane) and i + 4 (high lane): the in-lane transpose then gives
    // member vectors with rows in lane order 0..7 directly.
    __m256 rows[4], cols[4];
    for (int r = 0; r < 4; ++r) rows[r] = load_row_pair(x + r * s0 + k, x + (r + 4) * s0 + k);
    transpose4x4_lanes(rows, cols);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(buf + (k + j) * 8, cols[j]);
    k += 4;
  }
  return k;
}

// x[r * K + k] = buf[k * 8 + r] for 8 rows of a contiguous [B, K] output (x points at row 0);
// returns the first member not handled.
template <typename T>
inline int scatter_tile_vec(const float* buf, int K, T* x) {
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 cols[8], rows[8];
    for (int j = 0; j < 8; ++j) cols[j] = _mm256_loadu_ps(buf + (k + j) * 8);
    transpose8x8(cols, rows);
    for (int r = 0; r < 8; ++r) TileIO<T>::store8(x + r * K + k, rows[r]);
  }
  if (k + 4 <= K) {
    __m256 cols[4], rows[4];
    for (int j = 0; j < 4; ++j) cols[j] = _mm256_loadu_ps(buf + (k + j) * 8);
    transpose4x4_lanes(cols, rows);  // rows[i]: row i (low lane), row i + 4 (high lane)
    for (int r = 0; r < 4; ++r) {
      TileIO<T>::store4(x + r * K + k, _mm256_castps256_ps128(rows[r]));
      TileIO<T>::store4(x + (r + 4) * K + k, _mm256_extractf128_ps(rows[r], 1));
    }
    k += 4;
  }
  return k;
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet::cpu
#endif
