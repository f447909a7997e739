// CPU kernels of the multi-table embedding (MultiTableEmbedding, cetnet_kernels/embedding.py).
//
// Storage: one flat 1-D weight holding T = M * F tables, member-major (embedding_layout.h):
// table (m, f) is a row-major [V_f, D_m] block at element offset table_off[m * F + f]; the
// row-wise optimizer state of its rows starts at state_off[m * F + f].
//
// Forward: one parallel pass over the batch rows gathers every feature's rows of every member
// (single ids, padded sequences and pooled bags alike) into M outputs [B, N, D_m]. Ids are
// bounds-checked in that pass; a bad id is never read, it is recorded and reported after the pass.
//
// Backward: (A) per feature, in parallel over features, collect the (id, output row, scale)
// entries and stable-radix-sort them by id; (B) in parallel over the runs of equal ids, reduce
// each run in its sorted (= batch) order and write the dense gradient row or apply the optimizer
// to the row. Each row belongs to exactly one run, so there are no races and no atomics, and the
// summation order does not depend on the thread count: results are bitwise reproducible.
#include "isa.h"  // the kernels namespace: one build per vector ISA
#include "embedding_args.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>
#include <tuple>

namespace cetnet::cpu::CETNET_ISA {
namespace {

// Reads ids of either integer width without converting the tensor.
struct IdReader {
  const void* ptr = nullptr;
  bool i64 = true;
  inline int64_t operator[](int64_t i) const {
    return i64 ? static_cast<const int64_t*>(ptr)[i]
               : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[i]);
  }
};

IdReader reader_of(const at::Tensor& t) {
  IdReader r;
  r.ptr = t.const_data_ptr();
  r.i64 = t.scalar_type() == at::kLong;
  return r;
}

// The checked arguments and table layout (embedding_args.h) plus the (contiguous) inputs.
struct Layout : EmbeddingArgs {
  std::vector<at::Tensor> ids, offsets, psw;  // contiguous copies (no-ops when already so)
  std::vector<IdReader> id_r, off_r;
  std::vector<const float*> psw_f;  // per-sample weights (float32), or nullptr
};

// Validates everything but the id values and builds the layout. Offsets values are checked
// here (one cheap pass over B + 1 values per bag feature) because they bound the reads.
Layout make_layout(const at::Tensor& weight, at::TensorList ids, at::TensorList offsets,
                   at::TensorList psw, at::IntArrayRef modes, at::IntArrayRef dims,
                   at::IntArrayRef vocab, std::optional<int64_t> padding_idx,
                   int64_t bounds_check, const std::string& feature_names, const char* op) {
  Layout L;
  static_cast<EmbeddingArgs&>(L) =
      check_embedding_args(weight, ids, offsets, psw, modes, dims, vocab, padding_idx,
                           bounds_check, feature_names, at::kCPU, op);
  L.ids.resize(L.F);
  L.offsets.resize(L.F);
  L.psw.resize(L.F);
  L.id_r.resize(L.F);
  L.off_r.resize(L.F);
  L.psw_f.assign(L.F, nullptr);
  for (int64_t f = 0; f < L.F; ++f) {
    L.ids[f] = ids[f].contiguous();
    L.id_r[f] = reader_of(L.ids[f]);
    if (!is_bag(L.mode[f])) continue;
    const std::string& nm = L.name(f);
    L.offsets[f] = offsets[f].contiguous();
    L.off_r[f] = reader_of(L.offsets[f]);
    const IdReader& o = L.off_r[f];
    const int64_t nvals = L.ids[f].numel();
    TORCH_CHECK_VALUE(o[0] == 0, op, ": feature '", nm, "': offsets[0] must be 0, got ", o[0]);
    for (int64_t b = 0; b < L.B; ++b)
      TORCH_CHECK_VALUE(o[b] <= o[b + 1], op, ": feature '", nm,
                        "': offsets must be non-decreasing, but offsets[", b, "] = ", o[b],
                        " > offsets[", b + 1, "] = ", o[b + 1]);
    TORCH_CHECK_VALUE(o[L.B] == nvals, op, ": feature '", nm, "': offsets[-1] must equal "
                      "the number of values (", nvals, "), got ", o[L.B]);
    if (L.mode[f] == kBagWeightedSum) {
      L.psw[f] = psw[f].contiguous();
      L.psw_f[f] = L.psw[f].const_data_ptr<float>();
    }
  }
  return L;
}

// The first out-of-range id met (smallest batch row, then feature, then position) and how many
// there were, reported after the pass (report_bad_id: raise, or warn with bounds_check warn;
// the ids were treated as padding). Disabled (nothing recorded, no lock) where nothing is to
// be reported: bounds checking off, and backward with warn. Threads lock only for a bad id.
struct BadId {
  BadId(const Layout& L_, bool enabled_) : L(L_), enabled(enabled_) {}
  const Layout& L;
  const bool enabled;
  // With bounds_check warn, features already warned about are counted but not reported: read
  // from the registry at the first bad id (a lookup without one never asks).
  std::vector<char> skip;
  std::mutex mu;
  int64_t count = 0;
  bool found = false;
  int64_t b = 0, f = 0, pos = 0, id = 0;
  void record(int64_t b_, int64_t f_, int64_t pos_, int64_t id_) {
    if (!enabled) return;
    std::lock_guard<std::mutex> lock(mu);
    ++count;
    if (skip.empty())
      for (int64_t g = 0; g < L.F; ++g) skip.push_back(L.report_skips(g));
    if (skip[f_]) return;
    if (!found || std::tie(b_, f_, pos_) < std::tie(b, f, pos)) {
      found = true;
      b = b_;
      f = f_;
      pos = pos_;
      id = id_;
    }
  }
  void report(const char* op) const {
    if (found) report_bad_id(L, op, f, id, b, pos, count);
  }
};

// ---- row primitives (at::vec for same-type rows; a scalar loop converts 16-bit storage) ----
template <typename scalar_t, typename acc_t>
inline void copy_row(acc_t* dst, const scalar_t* src, int64_t D) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = at::vec::Vectorized<acc_t>;  // inline: a libc memcpy call per row costs more
    int64_t d = 0;
    for (; d + V::size() <= D; d += V::size()) V::loadu(src + d).store(dst + d);
    if (d < D) V::loadu(src + d, D - d).store(dst + d, D - d);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
  }
}

// dst += a * src
template <typename scalar_t, typename acc_t>
inline void axpy_row(acc_t* dst, acc_t a, const scalar_t* src, int64_t D) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = at::vec::Vectorized<acc_t>;
    const V va(a);
    int64_t d = 0;
    for (; d + V::size() <= D; d += V::size())
      at::vec::fmadd(va, V::loadu(src + d), V::loadu(dst + d)).store(dst + d);
    if (d < D) {
      const int64_t n = D - d;
      at::vec::fmadd(va, V::loadu(src + d, n), V::loadu(dst + d, n)).store(dst + d, n);
    }
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] += a * static_cast<acc_t>(src[d]);
  }
}

template <typename acc_t>
inline void scale_row(acc_t* x, acc_t a, int64_t D) {
  using V = at::vec::Vectorized<acc_t>;
  const V va(a);
  int64_t d = 0;
  for (; d + V::size() <= D; d += V::size()) (V::loadu(x + d) * va).store(x + d);
  for (; d < D; ++d) x[d] *= a;
}

inline int64_t forward_grain(const Layout& L) {
  // ~4k row reads per task: small batches stay on the calling thread.
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L.N * L.M));
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Every cache line of a row of `bytes` bytes (rows of D > 16 floats, or unaligned odd D, span
// several lines).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const uintptr_t first = reinterpret_cast<uintptr_t>(c) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(c + bytes - 1) & ~uintptr_t(63);
  for (uintptr_t a = first; a <= last; a += 64) __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
}

// Rows of a tile whose table-row addresses are resolved before they are copied, so that the
// copy loop can prefetch kAhead rows ahead: random row reads are latency bound, and this keeps
// several of them in flight per core.
constexpr int64_t kTile = 32;
constexpr int64_t kAhead = 32;

// One id column of the output: feature f, position t of its [B, T] ids, output column n.
struct IdColumn {
  int64_t f, t, T, n;
};

template <typename scalar_t>
void forward_kernel(const Layout& L, const at::Tensor& weight, std::vector<at::Tensor>& outs,
                    const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  std::vector<acc_t*> out_p(L.M);
  for (int64_t m = 0; m < L.M; ++m) out_p[m] = outs[m].mutable_data_ptr<acc_t>();
  const bool has_pad = L.padding_idx.has_value();
  const int64_t pad = has_pad ? *L.padding_idx : 0;
  std::vector<IdColumn> cols;
  std::vector<int64_t> bags;
  for (int64_t f = 0; f < L.F; ++f) {
    if (is_bag(L.mode[f])) {
      bags.push_back(f);
      continue;
    }
    for (int64_t t = 0; t < L.ncols[f]; ++t) cols.push_back({f, t, L.ncols[f], L.col_start[f] + t});
  }
  const int64_t C = static_cast<int64_t>(cols.size()), M = L.M;
  BadId bad(L, L.lookup_checks_ids());
  at::parallel_for(0, L.B, forward_grain(L), [&](int64_t b0, int64_t b1) {
    // src[((b - bt) * C + c) * M + m]: the table row to copy, or nullptr for a zero row.
    std::vector<const scalar_t*> src(kTile * C * M);
    for (int64_t bt = b0; bt < b1; bt += kTile) {
      const int64_t be = std::min(bt + kTile, b1);
      // 1. resolve and bounds-check the ids of the tile, column by column (contiguous reads)
      for (int64_t c = 0; c < C; ++c) {
        const IdColumn& ic = cols[c];
        const int64_t V = L.vocab[ic.f];
        const IdReader& ids = L.id_r[ic.f];
        for (int64_t b = bt; b < be; ++b) {
          const int64_t id = ids[b * ic.T + ic.t];
          const bool valid = id >= 0 && id < V && !(has_pad && id == pad);
          if (!valid && !(has_pad && id == pad)) bad.record(b, ic.f, ic.t, id);
          const scalar_t** s = src.data() + ((b - bt) * C + c) * M;
          for (int64_t m = 0; m < M; ++m)
            s[m] = valid ? w + L.table_off[m * L.F + ic.f] + id * L.dims[m] : nullptr;
        }
      }
      // 2. copy, prefetching kAhead rows ahead
      const int64_t total = (be - bt) * C * M;
      int64_t i = 0;
      // row bytes of entry k: the member is k % M
      auto row_bytes = [&](int64_t k) { return L.dims[k % M] * int64_t(sizeof(scalar_t)); };
      for (int64_t k = 0; k < std::min(kAhead, total); ++k)
        if (src[k]) prefetch_row(src[k], row_bytes(k));
      for (int64_t b = bt; b < be; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t n = cols[c].n;
          for (int64_t m = 0; m < M; ++m, ++i) {
            if (i + kAhead < total && src[i + kAhead])
              prefetch_row(src[i + kAhead], row_bytes(i + kAhead));
            const int64_t D = L.dims[m];
            acc_t* dst = out_p[m] + (b * L.N + n) * D;
            if (src[i])
              copy_row(dst, src[i], D);
            else
              std::fill(dst, dst + D, acc_t(0));
          }
        }
      }
      // 3. pooled bags
      for (int64_t b = bt; b < be; ++b) {
        for (int64_t f : bags) {
          const int64_t V = L.vocab[f];
          const IdReader& ids = L.id_r[f];
          const int64_t n0 = L.col_start[f];
          const IdReader& off = L.off_r[f];
          const int64_t k0 = off[b], k1 = off[b + 1];
          for (int64_t m = 0; m < M; ++m) {
            acc_t* dst = out_p[m] + (b * L.N + n0) * L.dims[m];
            std::fill(dst, dst + L.dims[m], acc_t(0));
          }
          int64_t count = 0;
          for (int64_t k = k0; k < k1; ++k) {
            if (k + 2 < k1) {  // the next values' rows
              const int64_t nid = ids[k + 2];
              if (nid >= 0 && nid < V)
                for (int64_t m = 0; m < M; ++m)
                  prefetch_row(w + L.table_off[m * L.F + f] + nid * L.dims[m],
                               L.dims[m] * int64_t(sizeof(scalar_t)));
            }
            const int64_t id = ids[k];
            if (has_pad && id == pad) continue;
            if (id < 0 || id >= V) {
              bad.record(b, f, k - k0, id);
              continue;
            }
            ++count;
            const acc_t a = L.psw_f[f] ? static_cast<acc_t>(L.psw_f[f][k]) : acc_t(1);
            for (int64_t m = 0; m < M; ++m) {
              const int64_t D = L.dims[m];
              axpy_row(out_p[m] + (b * L.N + n0) * D, a,
                       w + L.table_off[m * L.F + f] + id * D, D);
            }
          }
          if (L.mode[f] == kBagMean && count > 1) {
            for (int64_t m = 0; m < M; ++m)
              scale_row(out_p[m] + (b * L.N + n0) * L.dims[m], acc_t(1) / acc_t(count),
                        L.dims[m]);
          }
        }
      }
    }
  });
  bad.report(op);
}

// ---- backward: entries, stable radix sort, runs ----
struct Entries {
  std::vector<int64_t> key;    // the id (row of the feature's tables)
  std::vector<int64_t> src;    // the output row b * N + n whose gradient it receives
  std::vector<double> scale;   // per-entry factor (bags: weight or 1/count); empty = all 1
  std::vector<int64_t> order;  // entry indices sorted by key, stably
  std::vector<int64_t> run;    // starts of runs of equal keys in `order`, plus the end
};

// Stable LSD radix sort of the entry indices by key (keys in [0, max_key]). Stability keeps
// equal ids in batch order, which fixes the summation order of each row's gradient.
void radix_sort(Entries& e, int64_t max_key) {
  const int64_t n = static_cast<int64_t>(e.key.size());
  e.order.resize(n);
  for (int64_t i = 0; i < n; ++i) e.order[i] = i;
  if (n < 2 || max_key <= 0) return;
  if (n <= 64) {  // tiny inputs: insertion sort beats the histogram passes
    std::stable_sort(e.order.begin(), e.order.end(),
                     [&](int64_t a, int64_t b) { return e.key[a] < e.key[b]; });
    return;
  }
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(max_key));
  const int passes = (bits + 10) / 11;
  const int radix = (bits + passes - 1) / passes;
  const int64_t nb = int64_t(1) << radix;
  std::vector<int64_t> keys(e.key), keys2(n), order2(n), count(nb);
  for (int p = 0, shift = 0; p < passes; ++p, shift += radix) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (nb - 1)];
    int64_t sum = 0;
    for (int64_t d = 0; d < nb; ++d) {
      const int64_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(keys[i] >> shift) & (nb - 1)]++;
      keys2[pos] = keys[i];
      order2[pos] = e.order[i];
    }
    keys.swap(keys2);
    e.order.swap(order2);
  }
}

// Phase A: every feature's entries, sorted, with their runs. Bad ids are reported before any
// write happens.
std::vector<Entries> collect_entries(const Layout& L, const char* op) {
  std::vector<Entries> E(L.F);
  const bool has_pad = L.padding_idx.has_value();
  const int64_t pad = has_pad ? *L.padding_idx : 0;
  BadId bad(L, L.raises_on_bad_ids());  // warn: the lookup has reported
  at::parallel_for(0, L.F, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      Entries& e = E[f];
      const int64_t V = L.vocab[f];
      const IdReader& ids = L.id_r[f];
      const int64_t n0 = L.col_start[f];
      if (!is_bag(L.mode[f])) {
        const int64_t T = L.ncols[f];
        e.key.reserve(L.B * T);
        e.src.reserve(L.B * T);
        for (int64_t b = 0; b < L.B; ++b) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t id = ids[b * T + t];
            if (has_pad && id == pad) continue;
            if (id < 0 || id >= V) {
              bad.record(b, f, t, id);
              continue;
            }
            e.key.push_back(id);
            e.src.push_back(b * L.N + n0 + t);
          }
        }
      } else {
        const IdReader& off = L.off_r[f];
        const float* psw = L.psw_f[f];
        const bool mean = L.mode[f] == kBagMean;
        const int64_t nvals = L.ids[f].numel();
        e.key.reserve(nvals);
        e.src.reserve(nvals);
        if (psw || mean) e.scale.reserve(nvals);
        for (int64_t b = 0; b < L.B; ++b) {
          const int64_t k0 = off[b], k1 = off[b + 1];
          int64_t count = 0;
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t id = ids[k];
            if (has_pad && id == pad) continue;
            if (id < 0 || id >= V) {
              bad.record(b, f, k - k0, id);
              continue;
            }
            ++count;
            e.key.push_back(id);
            e.src.push_back(b * L.N + n0);
            if (psw) e.scale.push_back(static_cast<double>(psw[k]));
          }
          if (mean)
            for (int64_t c = 0; c < count; ++c) e.scale.push_back(1.0 / static_cast<double>(count));
        }
      }
      radix_sort(e, V - 1);
      const int64_t n = static_cast<int64_t>(e.order.size());
      for (int64_t i = 0; i < n; ++i)
        if (i == 0 || e.key[e.order[i]] != e.key[e.order[i - 1]]) e.run.push_back(i);
      e.run.push_back(n);
    }
  });
  bad.report(op);
  return E;
}

struct Run {
  int64_t f, begin, end;  // positions in E[f].order
};

std::vector<Run> all_runs(const std::vector<Entries>& E) {
  std::vector<Run> runs;
  size_t total = 0;
  for (const auto& e : E) total += e.run.empty() ? 0 : e.run.size() - 1;
  runs.reserve(total);
  for (int64_t f = 0; f < static_cast<int64_t>(E.size()); ++f)
    for (size_t r = 0; r + 1 < E[f].run.size(); ++r)
      runs.push_back({f, E[f].run[r], E[f].run[r + 1]});
  return runs;
}

// The gradient of output rows, one contiguous acc_t tensor per member (nullptr: zero gradient).
template <typename acc_t>
std::vector<const void*> grad_pointers(const Layout& L, at::TensorList grads,
                                       const at::Tensor& weight, std::vector<at::Tensor>& keep,
                                       const char* op) {
  keep = embedding_grads(L, grads, weight, op);
  std::vector<const void*> g(L.M, nullptr);
  for (int64_t m = 0; m < L.M; ++m)
    if (keep[m].defined()) g[m] = keep[m].const_data_ptr<acc_t>();
  return g;
}

// Phase B: reduce each run of member m's table row into acc[0, D) (in sorted = batch order).
template <typename acc_t>
inline void reduce_run(const Entries& e, const Run& r, const acc_t* g, int64_t D, acc_t* acc) {
  std::fill(acc, acc + D, acc_t(0));
  if (g == nullptr) return;
  const bool scaled = !e.scale.empty();
  for (int64_t i = r.begin; i < r.end; ++i) {
    // Hot ids have long runs of gradient rows scattered over the batch: keep reads in flight.
    if (i + 8 < r.end) prefetch(g + e.src[e.order[i + 8]] * D);
    const int64_t k = e.order[i];
    const acc_t a = scaled ? static_cast<acc_t>(e.scale[k]) : acc_t(1);
    axpy_row(acc, a, g + e.src[k] * D, D);
  }
}

// Prefetches what run r will read: its table rows and the gradient rows of its first entries
// (most runs of a Zipf batch have one entry). Called kAhead runs early: the reads are random.
template <typename scalar_t, typename acc_t>
inline void prefetch_run(const Layout& L, const std::vector<Entries>& E, const Run& r,
                         const scalar_t* w, const std::vector<const void*>& gv) {
  const Entries& e = E[r.f];
  const int64_t id = e.key[e.order[r.begin]];
  const int64_t last = std::min(r.end, r.begin + 4);
  for (int64_t m = 0; m < L.M; ++m) {
    const int64_t D = L.dims[m];
    prefetch(w + L.table_off[m * L.F + r.f] + id * D);
    const acc_t* g = static_cast<const acc_t*>(gv[m]);
    if (g)
      for (int64_t i = r.begin; i < last; ++i) prefetch(g + e.src[e.order[i]] * D);
  }
}

inline int64_t run_grain(const Layout& L) {
  int64_t sum_d = 0;
  for (int64_t d : L.dims) sum_d += d;
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, sum_d));
}

template <typename scalar_t>
void dense_backward_kernel(const Layout& L, const std::vector<Entries>& E,
                           const std::vector<Run>& runs, const std::vector<const void*>& gv,
                           at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  const int64_t max_d = *std::max_element(L.dims.begin(), L.dims.end());
  at::parallel_for(0, static_cast<int64_t>(runs.size()), run_grain(L), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(max_d);
    for (int64_t ri = r0; ri < r1; ++ri) {
      if (ri + kAhead < r1) prefetch_run<scalar_t, acc_t>(L, E, runs[ri + kAhead], gw, gv);
      const Run& r = runs[ri];
      const Entries& e = E[r.f];
      const int64_t id = e.key[e.order[r.begin]];
      for (int64_t m = 0; m < L.M; ++m) {
        const int64_t D = L.dims[m];
        reduce_run(e, r, static_cast<const acc_t*>(gv[m]), D, acc.data());
        scalar_t* dst = gw + L.table_off[m * L.F + r.f] + id * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

template <typename scalar_t>
void update_kernel(const Layout& L, const std::vector<Entries>& E, const std::vector<Run>& runs,
                   const std::vector<const void*>& gv, const at::Tensor& weight,
                   const at::Tensor& state, int64_t optimizer, double lr, double eps,
                   double weight_decay) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* w = weight.mutable_data_ptr<scalar_t>();
  acc_t* st = optimizer == kRowwiseAdagrad ? state.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t lr_ = static_cast<acc_t>(lr), eps_ = static_cast<acc_t>(eps),
              wd = static_cast<acc_t>(weight_decay);
  const int64_t max_d = *std::max_element(L.dims.begin(), L.dims.end());
  at::parallel_for(0, static_cast<int64_t>(runs.size()), run_grain(L), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(max_d);
    for (int64_t ri = r0; ri < r1; ++ri) {
      if (ri + kAhead < r1) prefetch_run<scalar_t, acc_t>(L, E, runs[ri + kAhead], w, gv);
      const Run& r = runs[ri];
      const Entries& e = E[r.f];
      const int64_t id = e.key[e.order[r.begin]];
      for (int64_t m = 0; m < L.M; ++m) {
        const int64_t D = L.dims[m];
        const int64_t t = m * L.F + r.f;
        if (st) prefetch(st + L.state_off[t] + id);
        reduce_run(e, r, static_cast<const acc_t*>(gv[m]), D, acc.data());
        scalar_t* row = w + L.table_off[t] + id * D;
        if (wd != acc_t(0))  // L2 decay of the rows this batch touches (FBGEMM's L2 mode)
          for (int64_t d = 0; d < D; ++d) acc[d] += wd * static_cast<acc_t>(row[d]);
        acc_t step = lr_;
        if (optimizer == kRowwiseAdagrad) {
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += acc[d] * acc[d];
          acc_t& s = st[L.state_off[t] + id];
          s += sq / static_cast<acc_t>(D);
          step = lr_ / (std::sqrt(s) + eps_);
        }
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          axpy_row(row, -step, acc.data(), D);
        } else {
          for (int64_t d = 0; d < D; ++d)
            row[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) - step * acc[d]);
        }
      }
    }
  });
}

// Plain SGD (no weight decay) is linear in the gradient, so it needs no per-row reduction:
// each task owns the rows of one feature (or of one id range of it, when there are fewer
// features than threads), walks the batch in order and applies w -= lr * scale * g entry by
// entry. Row ownership makes it race-free and the batch order makes it bitwise reproducible;
// gradient rows are read sequentially and table rows are prefetched. The ids were checked
// beforehand (check_ids), so nothing is written when one is bad.
void check_ids(const Layout& L, const char* op) {
  if (!L.raises_on_bad_ids()) return;  // bad ids are skipped by the kernel
  const bool has_pad = L.padding_idx.has_value();
  const int64_t pad = has_pad ? *L.padding_idx : 0;
  BadId bad(L, true);
  at::parallel_for(0, L.F, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const IdReader& ids = L.id_r[f];
      const int64_t V = L.vocab[f];
      const int64_t n = L.ids[f].numel();
      const int64_t T = is_bag(L.mode[f]) ? 0 : L.ncols[f];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t id = ids[i];
        if ((id < 0 || id >= V) && !(has_pad && id == pad)) {
          // the batch row of a bag value: search the offsets (error path only)
          int64_t b = 0, pos = i;
          if (T > 0) {
            b = i / T;
            pos = i % T;
          } else {
            const IdReader& off = L.off_r[f];
            while (b + 1 < L.B && off[b + 1] <= i) ++b;
            pos = i - off[b];
          }
          bad.record(b, f, pos, id);
        }
      }
    }
  });
  bad.report(op);
}

template <typename scalar_t>
void sgd_direct_kernel(const Layout& L, const std::vector<const void*>& gv,
                       const at::Tensor& weight, double lr) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* w = weight.mutable_data_ptr<scalar_t>();
  const bool has_pad = L.padding_idx.has_value();
  const int64_t pad = has_pad ? *L.padding_idx : 0;
  const int64_t R = std::max<int64_t>(1, (2 * at::get_num_threads() + L.F - 1) / L.F);
  const acc_t neg_lr = static_cast<acc_t>(-lr);
  at::parallel_for(0, L.F * R, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t f = task / R, r = task % R;
      const int64_t V = L.vocab[f];
      const int64_t lo = V * r / R, hi = V * (r + 1) / R;
      const IdReader& ids = L.id_r[f];
      const int64_t n = L.ids[f].numel();
      // apply(i, b, n_out, scale): the update of entry i (id ids[i]) from output row b*N+n_out
      auto apply = [&](int64_t i, int64_t b, int64_t n_out, acc_t scale) {
        if (i + kAhead < n) {
          const int64_t nid = ids[i + kAhead];
          if (nid >= lo && nid < hi)
            for (int64_t m = 0; m < L.M; ++m)
              prefetch_row(w + L.table_off[m * L.F + f] + nid * L.dims[m],
                           L.dims[m] * int64_t(sizeof(scalar_t)));
        }
        const int64_t id = ids[i];
        if (id < lo || id >= hi || (has_pad && id == pad)) return;
        for (int64_t m = 0; m < L.M; ++m) {
          const acc_t* g = static_cast<const acc_t*>(gv[m]);
          if (g == nullptr) continue;
          const int64_t D = L.dims[m];
          scalar_t* row = w + L.table_off[m * L.F + f] + id * D;
          const acc_t* grow = g + (b * L.N + n_out) * D;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            axpy_row(row, neg_lr * scale, grow, D);
          } else {
            for (int64_t d = 0; d < D; ++d)
              row[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) +
                                             neg_lr * scale * grow[d]);
          }
        }
      };
      if (!is_bag(L.mode[f])) {
        const int64_t T = L.ncols[f];
        for (int64_t b = 0, i = 0; b < L.B; ++b) {
          // The gradient rows of one feature are N * D apart: too far for the hardware
          // prefetcher to follow across pages.
          if (b + 4 < L.B)
            for (int64_t m = 0; m < L.M; ++m)
              if (gv[m])
                prefetch_row(static_cast<const acc_t*>(gv[m]) +
                                 ((b + 4) * L.N + L.col_start[f]) * L.dims[m],
                             T * L.dims[m] * int64_t(sizeof(acc_t)));
          for (int64_t t = 0; t < T; ++t, ++i) apply(i, b, L.col_start[f] + t, acc_t(1));
        }
      } else {
        const IdReader& off = L.off_r[f];
        const float* psw = L.psw_f[f];
        for (int64_t b = 0; b < L.B; ++b) {
          if (b + 4 < L.B)
            for (int64_t m = 0; m < L.M; ++m)
              if (gv[m])
                prefetch_row(static_cast<const acc_t*>(gv[m]) +
                                 ((b + 4) * L.N + L.col_start[f]) * L.dims[m],
                             L.dims[m] * int64_t(sizeof(acc_t)));
          const int64_t k0 = off[b], k1 = off[b + 1];
          acc_t scale = acc_t(1);
          if (L.mode[f] == kBagMean) {
            int64_t count = 0;
            for (int64_t k = k0; k < k1; ++k)  // the valid values (bad ones: bounds check off)
              count += ids[k] >= 0 && ids[k] < V && !(has_pad && ids[k] == pad);
            if (count > 0) scale = acc_t(1) / static_cast<acc_t>(count);
          }
          for (int64_t k = k0; k < k1; ++k)
            apply(k, b, L.col_start[f], psw ? static_cast<acc_t>(psw[k]) : scale);
        }
      }
    }
  });
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
  Layout L = make_layout(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                         padding_idx, bounds_check, feature_names, op);
  std::vector<at::Tensor> outs = embedding_outputs(L, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_cpu",
                                  [&] { forward_kernel<scalar_t>(L, weight, outs, op); });
  return outs;
}

at::Tensor multi_embedding_backward(at::TensorList grads, const at::Tensor& weight,
                                    at::TensorList ids, at::TensorList offsets,
                                    at::TensorList per_sample_weights, at::IntArrayRef modes,
                                    at::IntArrayRef dims, at::IntArrayRef vocab,
                                    std::optional<int64_t> padding_idx,
                                    int64_t bounds_check) {
  const char* op = "cetnet::multi_embedding_backward";
  Layout L = make_layout(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                         padding_idx, bounds_check, "", op);
  at::Tensor grad_weight = at::zeros_like(weight);
  std::vector<Entries> E = collect_entries(L, op);
  std::vector<Run> runs = all_runs(E);
  std::vector<at::Tensor> keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = grad_pointers<acc_t>(L, grads, weight, keep, op);
    dense_backward_kernel<scalar_t>(L, E, runs, g, grad_weight);
  });
  return grad_weight;
}

void multi_embedding_update(at::TensorList grads, const at::Tensor& weight,
                            const at::Tensor& state, at::TensorList ids, at::TensorList offsets,
                            at::TensorList per_sample_weights, at::IntArrayRef modes,
                            at::IntArrayRef dims, at::IntArrayRef vocab,
                            std::optional<int64_t> padding_idx, int64_t bounds_check,
                            int64_t optimizer, double lr, double eps, double weight_decay) {
  const char* op = "cetnet::multi_embedding_update";
  Layout L = make_layout(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                         padding_idx, bounds_check, "", op);
  check_update_args(L, optimizer, state, weight, op);
  std::vector<at::Tensor> keep;
  if (optimizer == kSGD && weight_decay == 0.0) {
    check_ids(L, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "cetnet_multi_embedding_sgd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto g = grad_pointers<acc_t>(L, grads, weight, keep, op);
      sgd_direct_kernel<scalar_t>(L, g, weight, lr);
    });
    return;
  }
  std::vector<Entries> E = collect_entries(L, op);
  std::vector<Run> runs = all_runs(E);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cetnet_multi_embedding_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = grad_pointers<acc_t>(L, grads, weight, keep, op);
    update_kernel<scalar_t>(L, E, runs, g, weight, state, optimizer, lr, eps, weight_decay);
  });
}

}  // namespace cetnet::cpu::CETNET_ISA
