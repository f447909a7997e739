// The primitives of fusion_math.h for at::vec::Vectorized, so the same row math runs with one
// SIMD lane per row. Include this before fusion_math.h: its templates find these overloads.
#pragma once

#include "isa.h"

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace cetnet {
inline namespace CETNET_ISA_NS {  // isa.h

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vexp(const Vec<T>& x) { return x.exp(); }
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// float exp on AVX2, about twice as fast as Sleef's expf8_u10 and as accurate (~1 ulp): the
// Cephes reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial, and 2^n applied in two
// halves so that subnormal results are rounded once, not flushed (p = sigmoid(z) keeps full
// relative precision down to z = -103). NaN propagates; x > 88.73 overflows to inf.
template <>
inline Vec<float> vexp(const Vec<float>& xv) {
  // _mm256_max/min_ps return their second operand when either is NaN: NaN passes through.
  __m256 x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-110.0f), xv));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n = 2^n1 * 2^n2 with n1 = floor(n / 2): both halves are normal floats for n in [-159, 128].
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return Vec<float>(_mm256_mul_ps(_mm256_mul_ps(y, s1), s2));
}
#endif
template <typename T>
inline Vec<T> vlog(const Vec<T>& x) { return x.log(); }
template <typename T>
inline Vec<T> vlog1p_unit(const Vec<T>& x) { return x.log1p(); }
// float: log1p(x) = 2 atanh(s), s = x / (2 + x) in [0, 1/3] for x in [0, 1], as an odd series in
// s (terms to s^15; the next is below 2^-26 relative). About a third of Sleef's general log1p,
// within 1 ulp; NaN and 0 pass through.
template <>
inline Vec<float> vlog1p_unit(const Vec<float>& x) {
  using V = Vec<float>;
  // s to within half an ulp: d = 2 + x rounds, so correct s by the exact remainder of x - s d
  // and the rounding error of d (both exact in float arithmetic: Fast2Sum and an FMA).
  const V d = V(2.0f) + x;
  const V rec = V(1.0f) / d;
  V s = x * rec;
  const V d_err = (V(2.0f) - d) + x;
  const V rem = at::vec::fmadd(-s, d, x);
  s = at::vec::fmadd(at::vec::fmadd(-s, d_err, rem), rec, s);
  const V s2 = s * s;
  V poly = V(2.0f / 15.0f);
  poly = at::vec::fmadd(poly, s2, V(2.0f / 13.0f));
  poly = at::vec::fmadd(poly, s2, V(2.0f / 11.0f));
  poly = at::vec::fmadd(poly, s2, V(2.0f / 9.0f));
  poly = at::vec::fmadd(poly, s2, V(2.0f / 7.0f));
  poly = at::vec::fmadd(poly, s2, V(2.0f / 5.0f));
  poly = at::vec::fmadd(poly, s2, V(2.0f / 3.0f));
  // 2 s exactly plus the small tail, rounded once.
  return at::vec::fmadd(s, s2 * poly, s + s);
}
template <typename T>
inline Vec<T> vabs(const Vec<T>& x) { return x.abs(); }
// IEEE maximum: propagates NaN, like the scalar vmax.
template <typename T>
inline Vec<T> vmax(const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }
template <typename T>
inline Vec<T> select_nonneg(const Vec<T>& x, const Vec<T>& a, const Vec<T>& b) {
  return Vec<T>::blendv(b, a, x >= Vec<T>(T(0)));
}

template <typename T>
inline Vec<T> select_lt(const Vec<T>& a, const Vec<T>& b, const Vec<T>& x, const Vec<T>& y) {
  return Vec<T>::blendv(y, x, a < b);
}
template <typename T>
inline bool any_lt(const Vec<T>& a, const Vec<T>& b) {
  alignas(64) T lanes[Vec<T>::size()];
  Vec<T>::blendv(Vec<T>(T(0)), Vec<T>(T(1)), a < b).store(lanes);
  for (int i = 0; i < Vec<T>::size(); ++i)
    if (lanes[i] != T(0)) return true;
  return false;
}
template <typename T>
inline Vec<T> tiny_sum(const Vec<T>&) {
  return Vec<T>(std::is_same_v<T, double> ? T(1e-290) : T(1e-30));
}

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet
