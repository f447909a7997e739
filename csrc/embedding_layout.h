// The flat layout of the multi-table embedding: one definition for the CPU and CUDA kernels
// (the Python mirror in cetnet_kernels is checked against it through _C.table_layout).
//
// One flat 1-D weight holds the T = M * F tables member-major: table (m, f) is a row-major
// [V_f, D_m] block at element table_off[m * F + f] = table_base[m] + D_m * row_base[f], where
// table_base[m] = sum_{m' < m} D_m' * Vtot and row_base[f] = sum_{f' < f} V_f'. The "key"
// row_base[f] + id names a row of every member at once (all members read the same ids). The
// row-wise optimizer state holds one value per table row: row `id` of table (m, f) is
// state[state_off[m * F + f] + id], state_off[m * F + f] = m * Vtot + row_base[f]. The outputs
// [B, N, D_m] hold feature f in the columns [col_start[f], col_start[f] + ncols[f]).
#pragma once

#include "isa.h"

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace cetnet {
inline namespace CETNET_ISA_NS {  // isa.h

// a + b and a * b of sizes computed from user values, refused when they pass int64: a wrapped
// product (vocab 2^62 x dim 4 = 16) would pass the weight-size check and index out of bounds.
inline int64_t checked_add(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::add_overflows(a, b, &out), op, ": ", what,
                    " overflows int64 (", a, " + ", b, ")");
  return out;
}
inline int64_t checked_mul(int64_t a, int64_t b, const char* what, const char* op) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(a, b, &out), op, ": ", what,
                    " overflows int64 (", a, " x ", b, ")");
  return out;
}

struct TableLayout {
  int64_t M = 0, F = 0;  // members, features
  std::vector<int64_t> dims, vocab, ncols;  // [M], [F], [F]
  int64_t Vtot = 0;          // sum of the vocabulary sizes (rows of one member's tables)
  int64_t weight_numel = 0;  // sum over members of Vtot * D_m
  int64_t state_rows = 0;    // M * Vtot: one state value per table row
  int64_t max_dim = 1;
  int64_t N = 0;             // output columns: sum of ncols
  std::vector<int64_t> row_base;    // [F]
  std::vector<int64_t> table_base;  // [M]
  std::vector<int64_t> table_off, state_off;  // [M * F], (m, f) at m * F + f
  std::vector<int64_t> col_start;  // [F]

  // Checks the member dims and vocabulary sizes (names: the F feature names, for messages) and
  // lays out the tables.
  void set_tables(c10::IntArrayRef dims_, c10::IntArrayRef vocab_,
                  const std::vector<std::string>& names, const char* op) {
    M = static_cast<int64_t>(dims_.size());
    F = static_cast<int64_t>(vocab_.size());
    TORCH_CHECK_VALUE(M >= 1, op, ": dims must name at least one member");
    TORCH_CHECK_VALUE(F >= 1, op, ": vocab must name at least one feature");
    // Kernels count members and features in int.
    TORCH_CHECK_VALUE(M <= std::numeric_limits<int>::max() &&
                          F <= std::numeric_limits<int>::max(),
                      op, ": at most ", std::numeric_limits<int>::max(),
                      " members and features, got ", M, " and ", F);
    dims.assign(dims_.begin(), dims_.end());
    vocab.assign(vocab_.begin(), vocab_.end());
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK_VALUE(dims[m] >= 1, op, ": dims[", m, "] must be >= 1, got ", dims[m]);
    row_base.resize(F);
    Vtot = 0;
    for (int64_t f = 0; f < F; ++f) {
      TORCH_CHECK_VALUE(vocab[f] >= 1, op, ": feature '", names[f],
                        "': vocabulary size must be >= 1, got ", vocab[f]);
      row_base[f] = Vtot;
      Vtot = checked_add(Vtot, vocab[f], "the total vocabulary size", op);
    }
    table_base.resize(M);
    weight_numel = 0;
    for (int64_t m = 0; m < M; ++m) {
      table_base[m] = weight_numel;
      weight_numel = checked_add(weight_numel, checked_mul(dims[m], Vtot, "vocabulary x dim", op),
                                 "the weight size (sum of vocabulary x dim over members)", op);
    }
    // Every offset below is at most weight_numel (dims >= 1): none can overflow now.
    state_rows = M * Vtot;
    max_dim = *std::max_element(dims.begin(), dims.end());
    table_off.resize(M * F);
    state_off.resize(M * F);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        table_off[m * F + f] = table_base[m] + dims[m] * row_base[f];
        state_off[m * F + f] = m * Vtot + row_base[f];
      }
  }

  // Lays out the output columns: feature f takes ncols_[f] of them (1 for a bag or single ids,
  // T for [B, T] ids).
  void set_columns(std::vector<int64_t> ncols_, const char* op) {
    ncols = std::move(ncols_);
    col_start.resize(F);
    N = 0;
    for (int64_t f = 0; f < F; ++f) {
      col_start[f] = N;
      N = checked_add(N, ncols[f], "the number of output columns", op);
    }
  }
};

}  // inline namespace CETNET_ISA_NS
}  // namespace cetnet
