"""Triton kernels of the multi-table embedding (the CPU and CUDA kernels are in csrc/).

Registers four ops with the schemas and contracts of the compiled ``cetnet::multi_embedding*``
ops (see csrc/registration.cpp), under the names ``cetnet::multi_embedding_triton``,
``multi_embedding_fused_triton``, ``multi_embedding_backward_triton`` and
``multi_embedding_update_triton`` (the last one updates ``weight`` and ``state`` in place).
Their fake kernels and autograd are registered by :mod:`cetnet_kernels.embedding_ops`.

Kernels (storage as in csrc/cpu/embedding_cpu.cpp: table (m, f) is a row-major [V_f, D_m] block
at ``table_base[m] + D_m * row_base[f]``; ``row_base[f] + id`` is the "key" of a row of every
member; member m's row-wise state of key k is ``state[m * Vtot + k]``):

Every kernel is launched once per member m, with the member's output (or gradient) tensor, its
dim ``D_m`` and table base as arguments:

* ``_gather_kernel``: every single-id and sequence column in one launch, grid (row blocks of the
  [B, C] id columns); a [BLOCK_R, BLOCK_D] tile per program. Each column's vocabulary size, row
  base and output column are read by the column, so they load beside the ids. With the bounds
  check on, the first member's launch also sets a flag (an atomic max, issued only by a lane
  holding a bad id) that the host reads once.
* ``_bags_kernel``: every pooled bag (sum / mean / weighted) in one more launch, grid (tiles
  of BLOCK_BAGS bags of the [B, bag features] slots): a row of the tile per bag, step i adds
  each bag's i-th value (a bag summed in order, one chain of dependent loads per tile, as the
  backward's runs below); a bag of more than _LONG_RUN values sums the rest on its own.
* ``_runs_kernel`` and ``_long_runs_kernel``: backward. The host sorts the (key, output row,
  scale) entries of the batch (every id column in one block, bags feature by feature) by key with
  a stable ``torch.sort`` and cuts them into runs of equal keys with device-side prefix counts (no
  synchronization: the number of runs stays on the device; the grids cover the E entries, an upper
  bound, and programs past the runs do nothing). ``_runs_kernel`` takes the runs in tiles of
  BLOCK_RUNS, a row of the tile per run: step i adds each run's i-th gradient row, so every row is
  summed serially in sorted (= batch) order and a tile's chain of dependent loads serves
  BLOCK_RUNS rows (a program per run spent most of its time waiting on that chain: 7-8 % of copy
  bandwidth on an H200). A tile takes as many steps as its longest run, so runs of more than
  _LONG_RUN entries (hot rows: Zipf ids put thousands of lookups on one row) are listed once by
  ``_list_long_runs_kernel`` and summed by ``_long_runs_kernel``, a program per run in [BLOCK_E,
  BLOCK_D] tiles. Either way the summed row is written as the dense gradient or updated with SGD /
  row-wise Adagrad (FBGEMM semantics, as the CPU kernel). Each row has one program: no atomics on
  floats, a fixed summation order, bitwise reproducible.

Why a launch per member (M of them, 2 to 4 in practice) rather than one with a member axis: an
int argument divisible by 16 is specialized by Triton, so with ``D_m`` (and the table base) a
multiple of 16 every row's address is provably 16-byte aligned and rows move in 128-bit loads
and stores; a member axis has to read the dim from memory, and then every element is a 32-bit
access (seen in the sm_90 PTX: ``ld.global.v4`` against ``ld.global.b32``). It also needs no
per-call upload of the members' pointers, and each member's tile is sized to its own dim.

Index arithmetic is int64 throughout: program ids are widened before any product, every loaded
index (ids, keys, offsets, row bases) is int64 (the sorted run keys are int32 when every key
fits, a sort of half the passes, and widened on load), and the row-wise state index
``m * Vtot + key`` is formed by _state_index with m widened first (``m`` and ``Vtot`` arrive as
int32 when below 2^31, and ``(M - 1) * Vtot`` passes 2^31 for large tables). The grids are
launched in chunks of at most _MAX_GRID_X programs (CUDA's grid.x limit), the chunk's first
program id passed as ``pid0``. Only within-row column offsets (< D) stay int32, as do the
gather's (batch row, column) slots when the host knows every slot is below 2^31
(``INDEX_32``: a 64-bit division is a long emulated sequence; the bags' (batch row, bag
feature) slots likewise) and the long-run list's run
indices when there are fewer than 2^31 entries. Every launch
runs under ``torch.cuda.device(weight.device)`` (a no-op for CPU tensors in the interpreter).

Bounds check (one synchronizing read of a few flags per call): out-of-range ids other than
``padding_idx`` raise IndexError with the CPU's message, malformed offsets ValueError; the
kernels also mask every load, so nothing is ever read out of bounds. The lookup's single ids and
sequences are checked by its gather kernel (above), the bags' values and offsets by a few torch
ops over all bags at once; the flags are read after the gathers are queued and before the bags'
kernel, which needs valid offsets. The backward and update ops check everything with torch ops
before anything is written; called through autograd they get bounds check OFF while the saved
ids are unchanged since the lookup, which checked them (embedding_ops._backward_args). With
``bounds_check`` off (:class:`cetnet_kernels.codes.BoundsCheck`)
there is no check and no synchronization in forward or backward: a bad id is padding and a
bag's offsets are clamped into its values (``_Plan.bag_offsets``). With ``warn`` the lookup
checks as above but warns for bad ids (read as padding) instead of raising; backward and the
update do not check.
The host-side checks, sort and run cut are data dependent, so these are opaque
``torch.library.custom_op``s (also on GPU, unlike the fusion ops' ``triton_op``): torch.compile
calls them as they are. In eager mode ``MultiTableEmbedding`` calls their implementations
(``IMPLEMENTATIONS``) below the dispatcher (embedding_ops.EmbeddingOps). Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cetnet_kernels._host import acc_dtype, constant_tensor, device_guard, shape_only, upload
from cetnet_kernels.codes import BoundsCheck, InputMode, Optimizer
from cetnet_kernels.embedding_args import (ID_DTYPES, EmbeddingArgs, check_bag_values,
                                           check_batch_size, first_bad_id, id_columns,
                                           invalid_ids, offsets_valid, report_bad_id,
                                           warned_features)
from cetnet_kernels.layout import table_layout
from cetnet_kernels.triton.fusion import INTERPRETED  # TRITON_INTERPRET=1 at import time

__all__ = [
    "IMPLEMENTATIONS",
    "INTERPRETED",
    "multi_embedding_backward_triton",
    "multi_embedding_fused_triton",
    "multi_embedding_triton",
    "multi_embedding_update_triton",
]

# The optimizer codes as constexprs: _runs_kernel's MODE is one of them.
_MODE_DENSE = tl.constexpr(int(Optimizer.DENSE))
_MODE_ROWWISE_ADAGRAD = tl.constexpr(int(Optimizer.ROWWISE_ADAGRAD))
_INPUT_MODES = frozenset(InputMode)  # built once: tuple(InputMode) per feature was half of the
_BOUNDS_CHECKS = frozenset(BoundsCheck)  # plan's host time (~55 of 113 us at 26 features)
_TILE = 4096  # elements of one [rows, BLOCK_D] tile
_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid.x: larger first axes are launched in chunks
_INDEX_32_SLOTS = 2**31 - 1  # grids of at most this many slots index them in 32 bits
# Programs of the grid-stride loops of _list_long_runs_kernel (over the runs) and
# _long_runs_kernel (over the long runs, per member); the interpreter runs programs one by one,
# so there a few suffice.
_RUN_PROGRAMS = 16 if INTERPRETED else 65536
_LONG_PROGRAMS = 16 if INTERPRETED else 4096
# Runs (rows touched) of more entries than this go to _long_runs_kernel: _runs_kernel's tiles
# take as many steps as their longest run.
_LONG_RUN = 32
_LIST_BLOCK = 1024  # runs a program of _list_long_runs_kernel looks at in one step


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _state_index(m, Vtot, key):
    # Member m's row-wise state of key: m * Vtot + key in int64. m and Vtot (int arguments
    # below 2^31) are int32: the product is widened first, as (M-1) * Vtot can pass 2^31.
    return m.to(tl.int64) * Vtot + key


@triton.jit
def _tile_slots(pid0, C, INDEX_32: tl.constexpr, BLOCK: tl.constexpr):
    """The program's BLOCK slots r of a row-major [rows, C] grid as int64 (r, row, column).
    INDEX_32 (every slot below 2^31): row and column from a 32-bit division, as a 64-bit one
    is a long emulated instruction sequence."""
    if INDEX_32:
        r32 = (tl.program_id(0) + pid0) * BLOCK + tl.arange(0, BLOCK)
        row32 = r32 // C
        return r32.to(tl.int64), row32.to(tl.int64), (r32 - row32 * C).to(tl.int64)
    else:
        r = (tl.program_id(0).to(tl.int64) + pid0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        row = r // C
        return r, row, r - row * C


@triton.jit
def _flag_bad_ids(bad_ptr, ids, mask, V, pad, HAS_PAD: tl.constexpr):
    """Sets the call's bad-id flag (bad_ptr[0] = 1) when an id of ``ids`` under ``mask`` is
    outside [0, V) and not padding: an atomic by each lane holding one, none in the common
    case (no reduction across the program, so no barrier; setting 1 twice is harmless)."""
    bad = mask & ((ids < 0) | (ids >= V))
    if HAS_PAD:
        bad = bad & (ids != pad)
    tl.atomic_max(bad_ptr + tl.zeros_like(ids), tl.full(ids.shape, 1, tl.int32), mask=bad,
                  sem="relaxed")


@triton.jit
def _gather_kernel(
    w_ptr,          # [W] flat tables (any float dtype)
    ids_ptr,        # [B, C] int64: every id column (single ids and sequence positions)
    col_vocab_ptr,  # [C] int64: vocabulary size of each column's feature
    col_base_ptr,   # [C] int64: row_base of each column's feature
    col_n_ptr,      # [C] int64: output column of each id column
    out_ptr,        # the member's output [B, N, D] (acc dtype)
    bad_ptr,        # [1] int32: the bad-id flag, set if CHECK and an id is out of range
    D,              # the member's dim (specialized when a multiple of 16: aligned rows)
    tb,             # the member's first element in w
    BC, C, N, pad, pid0,
    HAS_PAD: tl.constexpr, INDEX_32: tl.constexpr,  # INDEX_32: every (b, c) slot < 2^31
    CHECK: tl.constexpr,  # the bounds check (one member's launch does it)
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The column's metadata is indexed by the column itself (not through its feature), so the
    # id and metadata loads are independent: one load latency before the rows' instead of two.
    r, b, c = _tile_slots(pid0, C, INDEX_32, BLOCK_R)
    rmask = r < BC
    ids = tl.load(ids_ptr + r, mask=rmask, other=0)
    V = tl.load(col_vocab_ptr + c, mask=rmask, other=1)
    rb = tl.load(col_base_ptr + c, mask=rmask, other=0)
    n = tl.load(col_n_ptr + c, mask=rmask, other=0)
    valid = rmask & (ids >= 0) & (ids < V)
    if HAS_PAD:
        valid = valid & (ids != pad)
    if CHECK:
        _flag_bad_ids(bad_ptr, ids, rmask, V, pad, HAS_PAD)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    src = w_ptr + tb + D * (rb + ids)[:, None] + d[None, :]
    rows = tl.load(src, mask=valid[:, None] & dmask[None, :], other=0.0)
    dst = out_ptr + (b * N + n)[:, None] * D + d[None, :]
    tl.store(dst, rows.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _bag_values(w_ptr, vals_ptr, psw_ptr, k, em, V, rb, D, tb, pad, d, dmask, acc_ty,
                HAS_PAD: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """The weighted table rows of bag values k (masked by em; V / rb: their feature's
    vocabulary size and row base, the shape of k) and which of them count (valid)."""
    ids = tl.load(vals_ptr + k, mask=em, other=0)
    valid = em & (ids >= 0) & (ids < V)
    if HAS_PAD:
        valid = valid & (ids != pad)
    table_rows = w_ptr + tb + D * (rb + ids)  # (as _runs_kernel's gather: Triton 3.6)
    rows = tl.load(table_rows[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :],
                   other=0.0).to(acc_ty)
    if HAS_WEIGHTS:
        rows = rows * tl.load(psw_ptr + k, mask=valid, other=0.0).to(acc_ty)[:, None]
    return rows, valid


@triton.jit
def _bags_kernel(
    w_ptr,          # [W] flat tables
    vals_ptr,       # [L] int64: every bag feature's values, concatenated
    psw_ptr,        # [L] float32: per-value weights (1 for unweighted bags); read if HAS_WEIGHTS
    offs_ptr,       # [J, B + 1] int64: bag offsets into vals (already shifted)
    bag_vocab_ptr,  # [J] int64: vocabulary size of each bag feature
    bag_base_ptr,   # [J] int64: its row_base
    bag_n_ptr,      # [J] int64: its output column
    bag_mean_ptr,   # [J] int32: 1 for mean pooling
    out_ptr, D, tb,  # the member's output, dim and first element in w (as _gather_kernel)
    BJ, B, J, N, pad, pid0,
    HAS_PAD: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    INDEX_32: tl.constexpr,  # every (b, j) slot < 2^31
    LONG_BAG: tl.constexpr,  # values a tile takes step by step (see below)
    BLOCK_BAGS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A tile of BLOCK_BAGS bags (b, j) in order r = b * J + j, a row per bag, as _runs_kernel
    # takes runs: step i adds each bag's i-th value, so a bag is summed in order with no
    # reduction across lanes and a tile makes one chain of dependent loads for all its bags.
    # A tile takes at most LONG_BAG steps; a bag with more values then sums the rest on its
    # own, in [BLOCK_L, BLOCK_D] chunks (rare in practice: one long bag must not make its tile
    # step through thousands of masked values).
    first = (tl.program_id(0).to(tl.int64) + pid0) * BLOCK_BAGS
    r, b, j = _tile_slots(pid0, J, INDEX_32, BLOCK_BAGS)
    rm = r < BJ
    V = tl.load(bag_vocab_ptr + j, mask=rm, other=1)
    rb = tl.load(bag_base_ptr + j, mask=rm, other=0)
    n = tl.load(bag_n_ptr + j, mask=rm, other=0)
    is_mean = tl.load(bag_mean_ptr + j, mask=rm, other=0) != 0
    o = j * B + j + b  # j * (B + 1) + b, in int64
    k0 = tl.load(offs_ptr + o, mask=rm, other=0)
    length = tl.load(offs_ptr + o + 1, mask=rm, other=0) - k0
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_BAGS, BLOCK_D], dtype=acc_ty)
    count = tl.zeros([BLOCK_BAGS], dtype=tl.int32)
    longest = tl.max(length, axis=0)
    for i in range(0, tl.minimum(longest, LONG_BAG)):
        rows, valid = _bag_values(w_ptr, vals_ptr, psw_ptr, k0 + i, i < length, V, rb, D, tb,
                                  pad, d, dmask, acc_ty, HAS_PAD, HAS_WEIGHTS)
        acc += rows
        count += valid.to(tl.int32)
    if longest > LONG_BAG:
        slot = tl.arange(0, BLOCK_BAGS)
        for q in range(0, BLOCK_BAGS):
            rq = first + q
            bq = rq // J
            jq = rq - bq * J
            oq = jq * B + jq + bq
            k1 = tl.load(offs_ptr + oq + 1, mask=rq < BJ, other=0)
            kq = tl.load(offs_ptr + oq, mask=rq < BJ, other=0) + LONG_BAG
            if kq < k1:
                Vq = tl.load(bag_vocab_ptr + jq)
                rbq = tl.load(bag_base_ptr + jq)
                part = tl.zeros([BLOCK_D], dtype=acc_ty)
                part_count = tl.zeros([BLOCK_L], dtype=tl.int32)
                for k in range(kq, k1, BLOCK_L):
                    kk = k + tl.arange(0, BLOCK_L).to(tl.int64)
                    rows, valid = _bag_values(w_ptr, vals_ptr, psw_ptr, kk, kk < k1, Vq, rbq, D,
                                              tb, pad, d, dmask, acc_ty, HAS_PAD, HAS_WEIGHTS)
                    part += tl.sum(rows, axis=0)
                    part_count += valid.to(tl.int32)
                mine = slot == q
                acc = tl.where(mine[:, None], acc + part[None, :], acc)
                count = tl.where(mine, count + tl.sum(part_count, axis=0), count)
    scale = tl.where(is_mean & (count > 1), 1.0 / tl.maximum(count, 1).to(acc_ty), 1.0)
    tl.store(out_ptr + (b * N + n)[:, None] * D + d[None, :], acc * scale.to(acc_ty)[:, None],
             mask=rm[:, None] & dmask[None, :])


@triton.jit
def _update_rows(w_ptr, gw_ptr, state_ptr, lr_arg, eps_arg, wd_arg, acc, row, key, live, mask,
                 D, m, Vtot, MODE: tl.constexpr, SETTINGS_BITS: tl.constexpr,
                 MANY_ROWS: tl.constexpr):
    """Writes the summed gradient ``acc`` of rows (element offsets ``row`` into w, masked by
    ``mask``) as a dense gradient, or applies SGD / row-wise Adagrad (FBGEMM semantics, as the
    CPU kernel) to them. MANY_ROWS: acc is [rows, BLOCK_D] and ``key`` / ``live`` (each row's key,
    clamped to a valid one where not live, and whether it is written) are [rows]; else acc is
    one row [BLOCK_D] and key / live are scalars."""
    if MODE == _MODE_DENSE:
        tl.store(gw_ptr + row, acc.to(gw_ptr.dtype.element_ty), mask=mask)
    else:
        if SETTINGS_BITS:  # float64 values as their int64 bit patterns (see _settings)
            lr = lr_arg.to(tl.int64).to(tl.float64, bitcast=True)
            wd = wd_arg.to(tl.int64).to(tl.float64, bitcast=True)
            eps = eps_arg.to(tl.int64).to(tl.float64, bitcast=True)
        else:
            lr = lr_arg
            wd = wd_arg
            eps = eps_arg
        cur = tl.load(w_ptr + row, mask=mask, other=0.0).to(acc.dtype)
        a = tl.where(mask, acc + wd * cur, 0.0)
        if MODE == _MODE_ROWWISE_ADAGRAD:
            si = _state_index(m, Vtot, key)
            # (D may be a constexpr: Triton specializes an int argument of 1)
            if MANY_ROWS:
                squares = tl.sum(a * a, axis=1)
            else:
                squares = tl.sum(a * a, axis=0)
            s = tl.load(state_ptr + si) + squares / D
            # every thread holds the row (the one-row path) and read the state above: on a GPU
            # a warp lagging behind the store below would read the new state and step twice
            tl.debug_barrier()
            tl.store(state_ptr + si, s, mask=live)
            step = lr / (tl.sqrt(s) + eps)
            if MANY_ROWS:
                step = step[:, None]
        else:
            step = lr
        tl.store(w_ptr + row, (cur - step * a).to(w_ptr.dtype.element_ty), mask=mask)


# m and the settings are never specialized (Triton would turn an int argument equal to 1 into a
# constexpr, which has no .to()).
@triton.jit(do_not_specialize=["m", "lr_arg", "eps_arg", "wd_arg"])
def _runs_kernel(
    w_ptr,          # [W] flat tables (updated in place by SGD / Adagrad)
    gw_ptr,         # [W] dense gradient (DENSE mode), else unused
    state_ptr,      # [M * Vtot] row-wise Adagrad state (acc dtype), else unused
    g_ptr,          # the member's gradient [B * N * D] (acc dtype; a dummy without HAS_G)
    src_ptr,        # [E] int64: output row (b * N + n) of each sorted entry
    scale_ptr,      # [E] acc dtype: factor of each sorted entry (HAS_SCALE; else all 1)
    run_start_ptr,  # [E] int64: run r's first sorted entry (r < R)
    run_end_ptr,    # [E] int64: one past its last
    run_key_ptr,    # [E] int32 or int64: row_base[f] + id; Vtot for the run of padding entries
    num_runs_ptr,   # [1] int64: R, known on the device only
    lr_arg, eps_arg, wd_arg,  # lr, eps, weight_decay: float32, or bit patterns (SETTINGS_BITS)
    D, tb,          # the member's dim and first element in w (as _gather_kernel)
    m,              # the member (its row-wise state is m * Vtot + key)
    Vtot,
    pid0,
    MODE: tl.constexpr, HAS_G: tl.constexpr,  # HAS_G: the member's gradient is not zero
    HAS_SCALE: tl.constexpr,  # some entry's factor is not 1 (mean or weighted bags)
    SETTINGS_BITS: tl.constexpr,  # float64 tables: the settings as int64 bit patterns
    LONG_RUN: tl.constexpr,  # runs of more entries are left to _long_runs_kernel
    BLOCK_RUNS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program per tile of BLOCK_RUNS consecutive runs. R is not known on the host (no
    # synchronization): the grid covers E runs (E >= R) and tiles past R do nothing. (Not a
    # grid-stride loop: Triton 3.6 fails to compile one around this tile's gather for aligned
    # rows, in TritonGPURemoveLayoutConversions.) A tile is a [BLOCK_RUNS, BLOCK_D] block, a row
    # per run: step i adds every run's i-th entry (its gradient row times its scale) to the
    # run's row, so a run's entries are summed one by one in sorted (= batch) order, with no
    # reduction across lanes, and a tile makes one chain of dependent loads for BLOCK_RUNS rows.
    # The tile takes as many steps as its longest run: runs of more than LONG_RUN entries (hot
    # rows) are left to _long_runs_kernel.
    r = (tl.program_id(0).to(tl.int64) + pid0) * BLOCK_RUNS + tl.arange(0, BLOCK_RUNS)
    rm = r < tl.load(num_runs_ptr)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc_ty = g_ptr.dtype.element_ty
    start = tl.load(run_start_ptr + r, mask=rm, other=0)
    n = tl.load(run_end_ptr + r, mask=rm, other=0) - start
    key = tl.load(run_key_ptr + r, mask=rm, other=Vtot).to(tl.int64)
    # The padding entries carry the key Vtot (past every row) and sort last: their run touches
    # nothing.
    live = rm & (key < Vtot) & (n <= LONG_RUN)
    key = tl.where(live, key, 0)
    acc = tl.zeros([BLOCK_RUNS, BLOCK_D], dtype=acc_ty)
    if HAS_G:  # else an absent gradient: no entry (the row still gets decay / the update)
        n = tl.where(live, n, 0)
        for i in range(0, tl.max(n, axis=0)):
            em = i < n
            # (each row's pointer first, then its dims: Triton 3.6 fails to compile the
            # gather written as g_ptr + src[:, None] * D + d[None, :] in this loop)
            grad_rows = g_ptr + tl.load(src_ptr + start + i, mask=em, other=0) * D
            g = tl.load(grad_rows[:, None] + d[None, :], mask=em[:, None] & dmask[None, :],
                        other=0.0)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr + start + i, mask=em, other=0.0)[:, None]
            acc += g
    row = tb + D * key[:, None] + d[None, :]
    _update_rows(w_ptr, gw_ptr, state_ptr, lr_arg, eps_arg, wd_arg, acc, row, key, live,
                 live[:, None] & dmask[None, :], D, m, Vtot, MODE, SETTINGS_BITS, True)


@triton.jit
def _list_long_runs_kernel(
    run_start_ptr, run_end_ptr, run_key_ptr, num_runs_ptr,  # as _runs_kernel
    long_ptr,       # [E // (LONG_RUN + 1)] int32 (int64 for E >= 2^31): the long runs
    num_long_ptr,   # [1] int32, zero: how many
    Vtot, programs, pid0,
    LONG_RUN: tl.constexpr, BLOCK: tl.constexpr,
):
    # The live runs of more than LONG_RUN entries, in any order (each is then summed by one
    # program on its own). A block's long runs take consecutive slots after one scalar atomic.
    pid = tl.program_id(0).to(tl.int64) + pid0
    R = tl.load(num_runs_ptr)
    for t in range(pid * BLOCK, R, programs * BLOCK):
        r = t + tl.arange(0, BLOCK).to(tl.int64)
        rm = r < R
        n = tl.load(run_end_ptr + r, mask=rm, other=0) - tl.load(run_start_ptr + r, mask=rm,
                                                                  other=0)
        key = tl.load(run_key_ptr + r, mask=rm, other=Vtot).to(tl.int64)
        is_long = (rm & (key < Vtot) & (n > LONG_RUN)).to(tl.int32)
        n_long = tl.sum(is_long, axis=0)
        if n_long > 0:
            base = tl.atomic_add(num_long_ptr, n_long)
            slot = base + tl.cumsum(is_long, axis=0) - is_long
            tl.store(long_ptr + slot, r.to(long_ptr.dtype.element_ty), mask=is_long != 0)


@triton.jit(do_not_specialize=["m", "lr_arg", "eps_arg", "wd_arg"])
def _long_runs_kernel(
    w_ptr, gw_ptr, state_ptr, g_ptr, src_ptr, scale_ptr, run_start_ptr, run_end_ptr,
    run_key_ptr, long_ptr, num_long_ptr, lr_arg, eps_arg, wd_arg, D, tb, m, Vtot,
    programs, pid0,  # as _runs_kernel
    MODE: tl.constexpr, HAS_G: tl.constexpr, HAS_SCALE: tl.constexpr,
    SETTINGS_BITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program per long run (grid-stride over the list _list_long_runs_kernel wrote; its order,
    # set by atomics, does not matter: each run is summed by one program on its own): the entries
    # in [BLOCK_E, BLOCK_D] tiles, each tile reduced over its entries in a fixed tree, the tiles
    # in order. Bitwise reproducible, though not the serial association of _runs_kernel.
    pid = tl.program_id(0).to(tl.int64) + pid0
    count = tl.load(num_long_ptr)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc_ty = g_ptr.dtype.element_ty
    for j in range(pid, count, programs):
        r = tl.load(long_ptr + j).to(tl.int64)
        start = tl.load(run_start_ptr + r)
        stop = start
        if HAS_G:  # else an absent gradient: no entry (the row still gets decay / the update)
            stop = tl.load(run_end_ptr + r)
        key = tl.load(run_key_ptr + r).to(tl.int64)
        acc = tl.zeros([BLOCK_D], dtype=acc_ty)
        for i in range(start, stop, BLOCK_E):
            ii = i + tl.arange(0, BLOCK_E).to(tl.int64)
            im = ii < stop
            src = tl.load(src_ptr + ii, mask=im, other=0)
            g = tl.load(g_ptr + src[:, None] * D + d[None, :],
                        mask=im[:, None] & dmask[None, :], other=0.0)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr + ii, mask=im, other=0.0)[:, None]
            acc += tl.sum(g, axis=0)
        _update_rows(w_ptr, gw_ptr, state_ptr, lr_arg, eps_arg, wd_arg, acc, tb + D * key + d,
                     key, key < Vtot, dmask, D, m, Vtot, MODE, SETTINGS_BITS, False)


# =============================================================================================
# Host side
# =============================================================================================
class _Plan:
    """The validated layout of one call (the checks of csrc/embedding_args.h and
    csrc/embedding_layout.h;
    the layout itself is :func:`cetnet_kernels.layout.table_layout`)."""

    def __init__(self, op: str, a: EmbeddingArgs) -> None:
        weight, ids, offsets, psw, modes, dims, vocab, padding_idx, bounds_check, \
            feature_names = a
        M, F = len(dims), len(vocab)
        if M < 1 or F < 1:
            raise ValueError(f"{op}: dims and vocab must name at least one member and feature")
        if not (len(ids) == len(offsets) == len(psw) == len(modes) == F):
            raise ValueError(f"{op}: ids, offsets, per_sample_weights and modes need one entry "
                             f"per feature ({F}), got {len(ids)}, {len(offsets)}, {len(psw)}, "
                             f"{len(modes)}")
        names = feature_names.split("\n") if feature_names else []
        self.names = names if len(names) == F else [f"#{f}" for f in range(F)]
        if any(d < 1 for d in dims):
            raise ValueError(f"{op}: dims must be >= 1, got {list(dims)}")
        if any(v < 1 for v in vocab):
            raise ValueError(f"{op}: vocabulary sizes must be >= 1, got {list(vocab)}")
        self.M, self.F = M, F
        self.dims, self.vocab, self.modes = list(dims), list(vocab), list(modes)
        self.padding_idx = padding_idx
        if bounds_check not in _BOUNDS_CHECKS:
            raise ValueError(f"{op}: bounds_check must be 0 (error), 1 (off) or 2 (warn), got "
                             f"{bounds_check}")
        self.bounds_check = bounds_check
        #: Bounds check ERROR: the ops raise for a bad id (the lookup after its gather kernel
        #: has flagged one, backward and update on the host before anything is written). Else
        #: bad ids are padding. Bags' offsets are clamped into range (:meth:`bag_offsets`)
        #: unless a check has validated them.
        self.raises = bounds_check == BoundsCheck.ERROR
        self._offsets_checked = False
        self._id_block: Optional[tuple[list[int], Optional[Tensor]]] = None
        self._bag_values: Optional[tuple[list[int], list[int], Optional[Tensor]]] = None
        self._raw_bag_offsets: Optional[Tensor] = None
        numel = table_layout(dims, vocab).weight_numel
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{op}: weight must be floating point, got {weight.dtype}")
        if weight.dim() != 1 or weight.numel() != numel:
            raise ValueError(f"{op}: weight must be 1-D with {numel} elements, got shape "
                             f"{tuple(weight.shape)}")
        if not weight.is_contiguous():
            raise ValueError(f"{op}: weight must be contiguous")
        self.device = weight.device
        B: Optional[int] = None
        self.ncols: list[int] = []
        for f in range(F):
            nm, mode, x = self.names[f], modes[f], ids[f]
            if mode not in _INPUT_MODES:
                raise ValueError(f"{op}: feature '{nm}': unknown mode {mode}")
            if x.dtype not in ID_DTYPES:
                raise TypeError(f"{op}: feature '{nm}': ids must be int32 or int64, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{op}: feature '{nm}': ids must be on {self.device}")
            if mode == InputMode.IDS:
                Bf, nc = id_columns(x, f"'{nm}'", op)
            else:
                o = offsets[f]
                check_bag_values(x, f"'{nm}'", op)
                if o.dtype not in ID_DTYPES:
                    raise TypeError(f"{op}: feature '{nm}': offsets must be int32 or int64, got "
                                    f"{o.dtype}")
                if o.dim() != 1 or o.numel() < 1:
                    raise ValueError(f"{op}: feature '{nm}': offsets must be 1-D of length B + 1, "
                                     f"got shape {tuple(o.shape)}")
                if o.device != self.device:
                    raise ValueError(f"{op}: feature '{nm}': offsets must be on {self.device}")
                if mode == InputMode.BAG_WEIGHTED_SUM:
                    p = psw[f]
                    if p.dtype != torch.float32:
                        raise TypeError(f"{op}: feature '{nm}': per_sample_weights must be "
                                        f"float32, got {p.dtype}")
                    if p.dim() != 1 or p.numel() != x.numel():
                        raise ValueError(f"{op}: feature '{nm}': per_sample_weights must have "
                                         f"shape [{x.numel()}], got {tuple(p.shape)}")
                Bf, nc = o.numel() - 1, 1
            if B is None:
                B = Bf
            else:
                check_batch_size(Bf, B, f"'{nm}'", f"'{self.names[0]}'", op)
            self.ncols.append(nc)
        assert B is not None  # F >= 1
        self.B: int = B
        self.layout = L = table_layout(dims, vocab, self.ncols)
        self.row_base, self.Vtot, self.table_base = list(L.row_base), L.rows, list(L.table_base)
        self.col_start, self.N = list(L.col_start), L.num_columns
        self.ids, self.offsets, self.psw = ids, offsets, psw

    # ------------------------------------------------------------------ checks (host, torch)
    def check(self, op: str) -> None:
        """The backward's and the update's bounds check (ERROR only; WARN and OFF do not check
        there, nor does the backward of a lookup whose saved ids are unchanged: autograd passes
        OFF, the lookup having checked them): everything at once, before anything is written.
        See :meth:`report_if_bad`."""
        if self.raises:
            self.report_if_bad(op, self.bad_flags(ids=True))

    def report_if_bad(self, op: str, flags: list[Tensor]) -> None:
        """One synchronizing read of the device ``flags`` ([1] tensors, nonzero when something
        is wrong: :meth:`bad_flags`, the lookup's kernel flag); if one is set, raises
        ValueError for malformed offsets, then reports the first bad id (by batch row, feature,
        position, as on CPU): IndexError, or with bounds check WARN a warning. The per-feature
        search for the message runs only when something is wrong. Offsets are valid
        afterwards: :meth:`bag_offsets` need not clamp."""
        self._offsets_checked = True
        if flags and bool((torch.cat(flags) if len(flags) > 1 else flags[0]).any()):
            self._report_first_bad(op)

    def bad_flags(self, ids: bool) -> list[Tensor]:
        """Device flags of what is wrong, as [1] bools, without synchronizing: the single-id
        and sequence ids (only if ``ids``: the lookup's gather kernel checks those itself), the
        bags' values, the bags' offsets. Each kind is checked at once (one concatenation of
        ids against their vocabulary sizes, one stack of offsets), so a call costs a handful of
        launches whatever the number of features."""
        def bad_of(x: Tensor, vocab: Tensor) -> Tensor:
            return invalid_ids(x, vocab, self.padding_idx).any().reshape(1)

        flags = []
        single, cols = self.id_block()
        if ids and cols is not None and self.B > 0:  # [B, C] ids against [C] vocabulary sizes
            flags.append(bad_of(cols, self.per_column(single, self.vocab)))
        bags, counts, vals = self.bag_values()
        if bags:
            n = upload(counts, torch.int64, self.device)
            if vals is not None:
                flags.append(bad_of(vals, torch.repeat_interleave(
                    self.constant([self.vocab[f] for f in bags]), n, output_size=vals.numel())))
            flags.append(~offsets_valid(self.raw_bag_offsets(), n).reshape(1))
        return flags

    def _report_first_bad(self, op: str) -> None:
        """After a flag was set: ValueError for the first malformed offsets, else the first bad
        id (first_bad_id finds it, with its count; none when WARN has warned about every
        feature with one)."""
        bags = self.bag_values()[0]
        ok = (torch.stack([offsets_valid(self.offsets[f], self.ids[f].numel()) for f in bags])
              .cpu().tolist() if bags else [])
        for f, good in zip(bags, ok):
            if not good:
                o = self.offsets[f].cpu().tolist()
                nm, nvals = self.names[f], self.ids[f].numel()
                if o[0] != 0:
                    raise ValueError(f"{op}: feature '{nm}': offsets[0] must be 0, got {o[0]}")
                for b in range(len(o) - 1):
                    if o[b] > o[b + 1]:
                        raise ValueError(f"{op}: feature '{nm}': offsets must be non-decreasing, "
                                         f"but offsets[{b}] = {o[b]} > offsets[{b + 1}] = "
                                         f"{o[b + 1]}")
                raise ValueError(f"{op}: feature '{nm}': offsets[-1] must equal the number of "
                                 f"values ({nvals}), got {o[-1]}")
        bad = first_bad_id(self.ids, self.offsets, self.modes, self.vocab, self.padding_idx,
                           warned_features(self.names, self.bounds_check))
        if bad is not None:
            f = bad.feature
            report_bad_id(op, self.names[f], bad, self.vocab[f], self.padding_idx,
                          self.bounds_check)

    def valid_mask(self, x: Tensor, vocab: int | Tensor) -> Tensor:
        """The ids of ``x`` that are looked up: in range (``vocab`` an int or a tensor that
        broadcasts, one size per column) and not padding (with bounds checking ERROR, check()
        has raised for any other id)."""
        valid = ~invalid_ids(x, vocab, None)  # in range (the one rule, embedding_args)
        return valid & (x != self.padding_idx) if self.padding_idx is not None else valid

    def bag_offsets(self, f: int) -> Tensor:
        """Bag feature f's offsets as int64. When nothing has validated them in this call
        (bounds checking off; WARN outside the lookup; the backward of a lookup, which gets
        OFF: EmbeddingArgs.trusted), they are clamped into [0, values] and made
        non-decreasing (a running maximum), first 0 and last the number of values: every bag
        then reads only its feature's values (malformed offsets give unspecified bags, never an
        out-of-range read). No sync."""
        o = self.offsets[f].to(torch.int64)
        if self._offsets_checked:
            return o
        n = self.ids[f].numel()
        o = torch.cummax(o.clamp(0, n), 0).values  # a new tensor: set its ends in place, with
        o[-1:].fill_(n)  # fill_ (o[-1] = n would copy a CPU scalar: a sync on CUDA)
        o[:1].fill_(0)  # (after the last: a single offset is 0)
        return o

    def raw_bag_offsets(self) -> Tensor:
        """The bag features' offsets as given, as one int64 block [J, B + 1] (made once per
        call: the check validates it, the kernels then use it)."""
        if self._raw_bag_offsets is None:
            self._raw_bag_offsets = torch.stack([self.offsets[f].to(torch.int64)
                                                 for f in self.bag_values()[0]])
        return self._raw_bag_offsets

    def bag_offsets_block(self) -> Tensor:
        """Every bag feature's :meth:`bag_offsets` as one int64 block [J, B + 1] (validated:
        :meth:`raw_bag_offsets`)."""
        if self._offsets_checked:
            return self.raw_bag_offsets()
        return torch.stack([self.bag_offsets(f) for f in self.bag_values()[0]])

    def bag_weights(self, dtype: torch.dtype) -> Tensor:
        """Each bag value's weight in ``dtype``, in :meth:`bag_values`' order: the
        per-sample weights of weighted bags, 1 for the others (views of one ones tensor)."""
        bags, counts, _ = self.bag_values()
        ones = torch.ones(max(counts), dtype=dtype, device=self.device)
        return torch.cat([self.psw[f].to(dtype) if self.modes[f] == InputMode.BAG_WEIGHTED_SUM
                          else ones[:n] for f, n in zip(bags, counts)])

    def bag_values(self) -> tuple[list[int], list[int], Optional[Tensor]]:
        """The bag features, their value counts, and all their values as one int64 tensor,
        feature after feature (None without any value). Made once per call (the check and the
        kernels share it)."""
        if self._bag_values is None:
            bags = [f for f in range(self.F) if self.modes[f] != InputMode.IDS]
            counts = [self.ids[f].numel() for f in bags]
            self._bag_values = (bags, counts, torch.cat([self.ids[f].to(torch.int64)
                                                         for f in bags]) if sum(counts) else None)
        return self._bag_values

    def id_block(self) -> tuple[list[int], Optional[Tensor]]:
        """The single-id and sequence features (those with columns), and all their ids as one
        int64 block [B, C], a feature's T columns side by side, features in order (None
        without any): one tensor for every such feature, so the ops on it are as many for 26
        features as for one. Made once per call (the check and the kernels share it)."""
        if self._id_block is None:
            feats = [f for f in range(self.F)
                     if self.modes[f] == InputMode.IDS and self.ncols[f] > 0]
            self._id_block = (feats, torch.cat([self.ids[f].reshape(self.B, -1).to(torch.int64)
                                                for f in feats], dim=1) if feats else None)
        return self._id_block

    def per_column(self, feats: list[int], values: list[int]) -> Tensor:
        """``values[f]`` for each column of :meth:`id_block` (int64, on the device, cached)."""
        return self.constant([values[f] for f in feats for _ in range(self.ncols[f])])

    def constant(self, values: Sequence[int | float], dtype: torch.dtype = torch.int64) -> Tensor:
        """Layout metadata on the device (cached: the same every call of a layout; read only)."""
        return constant_tensor(values, dtype, self.device)


def _into_values(o: Tensor) -> Tensor:
    """A [J, B + 1] offsets block (validated or clamped) moved to the features' values
    concatenated: each row shifted by the value counts of the rows before it, a prefix sum of
    the rows' last entries (each row's value count). On the device."""
    ends = o[:, -1]
    return o + (torch.cumsum(ends, 0) - ends)[:, None]


def _block_d(dim: int) -> int:
    return triton.next_power_of_2(dim)


def _launch(kernel, n: int, device_of: Tensor, *args, **constexprs) -> None:
    """kernel[(n,)](*args, pid0, **constexprs) on device_of's device, the grid cut into chunks of
    at most _MAX_GRID_X programs (the kernel adds pid0 to its program id)."""
    with device_guard(device_of):
        for pid0 in range(0, n, _MAX_GRID_X):
            kernel[(min(_MAX_GRID_X, n - pid0),)](*args, pid0, **constexprs)


# ------------------------------------------------------------------------------------ forward
def _multi_embedding(weight: Tensor, ids: list[Tensor], offsets: list[Tensor],
                     per_sample_weights: list[Tensor], modes: list[int], dims: list[int],
                     vocab: list[int], padding_idx: Optional[int], bounds_check: int,
                     feature_names: str) -> list[Tensor]:
    op = "cetnet::multi_embedding_triton"
    P = _Plan(op, EmbeddingArgs(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                                padding_idx, bounds_check, feature_names))
    acc = acc_dtype(weight.dtype)
    B, N = P.B, P.N
    outs = [torch.empty((B, N, dm), dtype=acc, device=P.device) for dm in dims]
    if B == 0 or shape_only(weight, *ids):
        return outs
    # The bounds check (ERROR, WARN): the first member's gather flags a bad id on the device,
    # the bags' values and offsets are checked by torch ops (no sync), and one copy of the
    # flags, after the gathers are queued, tells whether to report. The bags' kernels run
    # after it, on validated offsets.
    checking = bounds_check != BoundsCheck.OFF
    has_pad = padding_idx is not None
    pad = int(padding_idx) if padding_idx is not None else 0
    id_feats, cols = P.id_block()
    flags = []
    if cols is not None:
        no_flag = P.constant([0], torch.int32)  # (a dummy pointer: CHECK off never writes)
        bad = torch.zeros(1, dtype=torch.int32, device=P.device) if checking else no_flag
        col_vocab = P.per_column(id_feats, P.vocab)
        col_base = P.per_column(id_feats, P.row_base)
        col_n = P.constant([P.col_start[f] + t for f in id_feats for t in range(P.ncols[f])])
        C = cols.shape[1]
        cols = cols.contiguous()
        for m in range(P.M):  # one launch per member: see the module docstring
            block_d = _block_d(P.dims[m])
            block_r = max(1, min(128, _TILE // block_d))
            programs = triton.cdiv(B * C, block_r)
            index_32 = programs * block_r <= _INDEX_32_SLOTS
            check = checking and m == 0
            _launch(
                _gather_kernel, programs, weight,
                weight, cols, col_vocab, col_base, col_n, outs[m], bad if check else no_flag,
                P.dims[m], P.table_base[m], B * C, C, N, pad,
                HAS_PAD=has_pad, INDEX_32=index_32, CHECK=check, BLOCK_R=block_r,
                BLOCK_D=block_d)
        if checking:
            flags.append(bad)
    if checking:
        P.report_if_bad(op, P.bad_flags(ids=False) + flags)
    bag_feats, counts, vals_t = P.bag_values()
    if bag_feats:
        # per-value weights only when a feature has them (else no array, no loads)
        weighted = any(modes[f] == InputMode.BAG_WEIGHTED_SUM for f in bag_feats)
        if vals_t is None:
            vals_t = P.constant([0], torch.int64)  # (a dummy pointer: no bag has a value)
        psw_t = (P.bag_weights(torch.float32) if weighted and sum(counts) > 0
                 else P.constant([0.0], torch.float32))  # (else a dummy pointer)
        offs_t = _into_values(P.bag_offsets_block())  # each feature's offsets into vals_t
        J = len(bag_feats)
        bag_vocab_t = P.constant([P.vocab[f] for f in bag_feats])
        bag_base_t = P.constant([P.row_base[f] for f in bag_feats])
        bag_n_t = P.constant([P.col_start[f] for f in bag_feats])
        bag_mean_t = P.constant([int(modes[f] == InputMode.BAG_MEAN) for f in bag_feats],
                                torch.int32)
        for m in range(P.M):
            block_d = _block_d(P.dims[m])
            # half a _TILE over 8 warps: at D = 64, 64 registers on sm_90 (4 warps: 116-128,
            # and a spill with 64-value chunks for long bags)
            block_bags = max(1, min(128, _TILE // 2 // block_d))
            programs = triton.cdiv(B * J, block_bags)
            _launch(
                _bags_kernel, programs, weight,
                weight, vals_t, psw_t, offs_t, bag_vocab_t, bag_base_t, bag_n_t, bag_mean_t,
                outs[m], P.dims[m], P.table_base[m], B * J, B, J, N, pad,
                HAS_PAD=has_pad, HAS_WEIGHTS=weighted,
                INDEX_32=programs * block_bags <= _INDEX_32_SLOTS, LONG_BAG=_LONG_RUN,
                BLOCK_BAGS=block_bags, BLOCK_L=max(1, min(32, _TILE // 2 // block_d)),
                BLOCK_D=block_d, num_warps=8)
    return outs


def _multi_embedding_fused(weight: Tensor, state: Tensor, placeholder: Tensor, ids: list[Tensor],
                           offsets: list[Tensor], per_sample_weights: list[Tensor],
                           modes: list[int], dims: list[int], vocab: list[int],
                           padding_idx: Optional[int], bounds_check: int, feature_names: str,
                           optimizer: int, lr: float, eps: float,
                           weight_decay: float) -> list[Tensor]:
    # The plain lookup; the other inputs are for the fused backward (the update op).
    return _multi_embedding(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                            padding_idx, bounds_check, feature_names)


# ----------------------------------------------------------------------------------- backward
def _runs(P: _Plan, op: str, acc: torch.dtype):
    """The batch's entries sorted by key and cut into runs: (src, scale, start, end, key, number of
    runs [1]) or None when the batch has no entry; scale is None when every factor is 1 (no mean
    or weighted bag). Deterministic: a stable sort keeps equal keys in
    batch order. Padding (and, with bounds checking off, bad) entries are kept with the key P.Vtot
    (no boolean-mask indexing, which would synchronize three times per feature): they sort last and
    _runs_kernel skips their run. Nothing synchronizes: the number of runs R stays on the device (a
    [1] tensor); start, end and key have E slots, the first R of them used."""
    keys, srcs, scales = [], [], []
    B, N, dev = P.B, P.N, P.device
    scaled = any(m in (InputMode.BAG_MEAN, InputMode.BAG_WEIGHTED_SUM) for m in P.modes)
    # Every single-id / sequence column at once, [B, C] (a fixed number of ops for any number
    # of features). Row-major, so a feature's entries keep their (b, t) order: as each run holds
    # one feature's row, its summation order is the same as feature by feature.
    id_feats, cols = P.id_block()
    if cols is not None:
        valid = P.valid_mask(cols, P.per_column(id_feats, P.vocab))
        col_n = P.constant([P.col_start[f] + t for f in id_feats for t in range(P.ncols[f])])
        keys.append(torch.where(valid, cols + P.per_column(id_feats, P.row_base),
                                P.Vtot).reshape(-1))
        srcs.append((torch.arange(B, device=dev)[:, None] * N + col_n).reshape(-1))
        if scaled:
            scales.append(torch.ones(cols.numel(), dtype=acc, device=dev))
    # Every bag feature's values at once too (feature after feature, each in value order: the
    # entries, and so the sums, are those of a feature-by-feature list): a fixed number of ops
    # for any number of bag features, with each value's bag slot s = j * B + b.
    bags, _, x = P.bag_values()
    if x is not None:
        J, L = len(bags), x.numel()
        o = P.bag_offsets_block()  # [J, B + 1]
        slot = torch.repeat_interleave(torch.arange(J * B, device=dev),
                                       (o[:, 1:] - o[:, :-1]).reshape(-1), output_size=L)
        j = torch.div(slot, B, rounding_mode="floor")
        keep = P.valid_mask(x, P.constant([P.vocab[f] for f in bags])[j])
        keys.append(torch.where(keep, x + P.constant([P.row_base[f] for f in bags])[j], P.Vtot))
        srcs.append((slot - j * B) * N + P.constant([P.col_start[f] for f in bags])[j])
        if scaled:  # 1, a bag mean's 1 / (valid values of its bag), or the value's weight
            sc = torch.ones(L, dtype=acc, device=dev)
            if any(P.modes[f] == InputMode.BAG_MEAN for f in bags):
                # valid values per bag from a prefix sum over all values (exact, no atomics),
                # read at the offsets shifted to each feature's values
                cut = _into_values(o)  # [J, B + 1]
                cv = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev),
                                keep.to(torch.int64).cumsum(0)])
                count = (cv[cut[:, 1:]] - cv[cut[:, :-1]]).reshape(-1)  # [J * B], by slot
                is_mean = P.constant([int(P.modes[f] == InputMode.BAG_MEAN) for f in bags],
                                     torch.bool)[j]
                sc = torch.where(is_mean, (1.0 / count.clamp_min(1).to(acc))[slot], sc)
            if any(P.modes[f] == InputMode.BAG_WEIGHTED_SUM for f in bags):
                weight = P.bag_weights(acc)
                is_weighted = P.constant([int(P.modes[f] == InputMode.BAG_WEIGHTED_SUM)
                                          for f in bags], torch.bool)[j]
                sc = torch.where(is_weighted, weight, sc)
            scales.append(sc)
    if not keys:  # only [B, 0] sequences: no column, no entry
        return None
    key = torch.cat(keys)
    E = key.numel()
    if E == 0:
        return None
    if P.Vtot < 2**31:  # keys in [0, Vtot]: a radix sort of 4 bytes, half the passes of 8
        key = key.to(torch.int32)
    skey, perm = torch.sort(key, stable=True)
    first = torch.ones(E, dtype=torch.bool, device=dev)  # where a run starts
    first[1:] = skey[1:] != skey[:-1]
    run_of = torch.cumsum(first, 0) - 1  # non-decreasing: each entry's run
    # bounds[r] = the first entry of run r (E for r >= R): a binary search, deterministic
    bounds = torch.searchsorted(run_of, torch.arange(E + 1, device=dev))
    start, end = bounds[:E], bounds[1:]
    run_key = torch.where(start < E, skey[start.clamp(max=E - 1)], P.Vtot)
    return (torch.cat(srcs)[perm].contiguous(),
            torch.cat(scales)[perm].contiguous() if scaled else None, start, end, run_key,
            run_of[-1:] + 1)


def _apply_runs(P: _Plan, grads: Sequence[Optional[Tensor]], weight: Tensor,
                grad_weight: Optional[Tensor], state: Optional[Tensor], mode: int, lr: float,
                eps: float, wd: float, op: str) -> None:
    acc = acc_dtype(weight.dtype)
    if len(grads) != P.M:
        raise ValueError(f"{op}: expected {P.M} gradients (one per member), got {len(grads)}")
    gs: list[Optional[Tensor]] = []
    for m, g in enumerate(grads):
        if g is None or g.numel() == 0:
            gs.append(None)
            continue
        if tuple(g.shape) != (P.B, P.N, P.dims[m]):
            raise ValueError(f"{op}: grads[{m}] must have shape [{P.B}, {P.N}, {P.dims[m]}], "
                             f"got {tuple(g.shape)}")
        gs.append(g.to(acc).contiguous())
    if P.B == 0 or shape_only(weight, *P.ids):
        return
    P.check(op)  # before anything is written
    runs = _runs(P, op, acc)
    if runs is None:
        return
    src, scale, start, end, run_key, num_runs = runs
    dummy = P.constant([0.0], acc)  # a pointer for absent tensors (never read)
    # Live runs of more than _LONG_RUN entries are disjoint: at most E // (_LONG_RUN + 1) of
    # them. One launch lists them, every member's _long_runs_kernel walks the list (launch
    # order on the stream: the list is complete before the first reads it).
    E = run_key.numel()
    long_cap = E // (_LONG_RUN + 1)
    if long_cap > 0:
        num_long = torch.zeros(1, dtype=torch.int32, device=P.device)
        long_list = torch.empty(long_cap, device=P.device,
                                dtype=torch.int32 if E < 2**31 else torch.int64)
        programs = min(triton.cdiv(E, _LIST_BLOCK), _RUN_PROGRAMS)
        _launch(_list_long_runs_kernel, programs, weight, start, end, run_key, num_runs,
                long_list, num_long, P.Vtot, programs, LONG_RUN=_LONG_RUN, BLOCK=_LIST_BLOCK)
    args = (weight, grad_weight if grad_weight is not None else weight,
            state if state is not None and state.numel() > 0 else dummy)
    settings = _settings(acc, lr, eps, wd)
    consts = dict(MODE=int(mode), SETTINGS_BITS=acc == torch.float64,
                  HAS_SCALE=scale is not None)
    scale = scale if scale is not None else dummy
    for m in range(P.M):
        block_d = _block_d(P.dims[m])
        g, has_g = (gs[m], True) if gs[m] is not None else (dummy, False)
        member = (P.dims[m], P.table_base[m], m, P.Vtot)
        # half a _TILE: at D = 64, 72 registers (sm_90) against 155 for 64 runs, so more
        # programs per SM and as many row loads in flight
        block_runs = max(1, min(128, _TILE // 2 // block_d))
        _launch(_runs_kernel, triton.cdiv(E, block_runs), weight,
                *args, g, src, scale, start, end, run_key, num_runs, *settings, *member,
                HAS_G=has_g, LONG_RUN=_LONG_RUN, BLOCK_RUNS=block_runs, BLOCK_D=block_d,
                **consts)
        if long_cap > 0:
            programs = min(long_cap, _LONG_PROGRAMS)
            _launch(_long_runs_kernel, programs, weight,
                    *args, g, src, scale, start, end, run_key, long_list, num_long, *settings,
                    *member, programs, HAS_G=has_g, BLOCK_E=max(1, min(32, _TILE // block_d)),
                    BLOCK_D=block_d, **consts)


def _settings(acc: torch.dtype, lr: float, eps: float, wd: float) -> tuple:
    """lr, eps and weight_decay as kernel arguments, so that a CUDA graph keeps them and nothing
    is uploaded per call (as the CUDA backend's): Python floats (float32 arguments), or for
    float64 tables the int64 bit patterns of the float64 values (a float argument is float32;
    the kernels bitcast them back: SETTINGS_BITS)."""
    if acc != torch.float64:
        return float(lr), float(eps), float(wd)
    return tuple(struct.unpack("<q", struct.pack("<d", float(v)))[0] for v in (lr, eps, wd))


def _multi_embedding_backward(grads: list[Tensor], weight: Tensor, ids: list[Tensor],
                              offsets: list[Tensor], per_sample_weights: list[Tensor],
                              modes: list[int], dims: list[int], vocab: list[int],
                              padding_idx: Optional[int], bounds_check: int) -> Tensor:
    op = "cetnet::multi_embedding_backward_triton"
    P = _Plan(op, EmbeddingArgs(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                                padding_idx, bounds_check))
    grad_weight = torch.zeros_like(weight)
    _apply_runs(P, grads, weight, grad_weight, None, Optimizer.DENSE, 0.0, 0.0, 0.0, op)
    return grad_weight


def _multi_embedding_update(grads: list[Tensor], weight: Tensor, state: Tensor,
                            ids: list[Tensor], offsets: list[Tensor],
                            per_sample_weights: list[Tensor], modes: list[int], dims: list[int],
                            vocab: list[int], padding_idx: Optional[int], bounds_check: int,
                            optimizer: int, lr: float, eps: float, weight_decay: float) -> None:
    op = "cetnet::multi_embedding_update_triton"
    P = _Plan(op, EmbeddingArgs(weight, ids, offsets, per_sample_weights, modes, dims, vocab,
                                padding_idx, bounds_check))
    if optimizer not in (Optimizer.SGD, Optimizer.ROWWISE_ADAGRAD):
        raise ValueError(f"{op}: optimizer must be 1 (sgd) or 2 (rowwise_adagrad), got "
                         f"{optimizer}")
    if optimizer == Optimizer.ROWWISE_ADAGRAD:
        acc = acc_dtype(weight.dtype)
        if (state.dim() != 1 or state.numel() != P.M * P.Vtot or not state.is_contiguous()
                or state.dtype != acc or state.device != weight.device):
            raise ValueError(f"{op}: state must be a contiguous 1-D {acc} tensor of "
                             f"{P.M * P.Vtot} elements (one per table row) on {weight.device}, "
                             f"got {state.dtype} {tuple(state.shape)}")
    adagrad = optimizer == Optimizer.ROWWISE_ADAGRAD
    _apply_runs(P, grads, weight, None, state if adagrad else None, optimizer, lr, eps,
                weight_decay, op)


# =============================================================================================
# Registration (opaque custom ops; fake kernels and autograd: cetnet_kernels/embedding_ops.py)
# =============================================================================================
multi_embedding_triton = torch.library.custom_op(
    "cetnet::multi_embedding_triton", _multi_embedding, mutates_args=())
multi_embedding_fused_triton = torch.library.custom_op(
    "cetnet::multi_embedding_fused_triton", _multi_embedding_fused, mutates_args=())
multi_embedding_backward_triton = torch.library.custom_op(
    "cetnet::multi_embedding_backward_triton", _multi_embedding_backward, mutates_args=())
multi_embedding_update_triton = torch.library.custom_op(
    "cetnet::multi_embedding_update_triton", _multi_embedding_update,
    mutates_args=("weight", "state"))

#: Each op's implementation by name: what embedding_ops.EmbeddingOps calls in eager mode.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "multi_embedding_triton": _multi_embedding,
    "multi_embedding_fused_triton": _multi_embedding_fused,
    "multi_embedding_backward_triton": _multi_embedding_backward,
    "multi_embedding_update_triton": _multi_embedding_update,
}
