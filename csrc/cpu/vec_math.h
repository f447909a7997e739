// The primitives of fusion_math.h for at::vec::Vectorized, so the same row math runs with one
// SIMD lane per row. Include this before fusion_math.h: its templates find these overloads.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace cetnet {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vexp(const Vec<T>& x) { return x.exp(); }
template <typename T>
inline Vec<T> vlog(const Vec<T>& x) { return x.log(); }
template <typename T>
inline Vec<T> vlog1p(const Vec<T>& x) { return x.log1p(); }
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

}  // namespace cetnet
