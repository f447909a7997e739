"""Triton kernels of the KDEF loss (contract: the float64 reference
``cetnet_kernels.reference.kdef_loss_reference``; math in docs/MATH.md §3).

Registers ``cetnet::kdef_loss_triton(Tensor logits, Tensor labels, bool compute_grad)
-> (Tensor loss, Tensor teacher_prob, Tensor grad_logits)``: loss 0-dim in the compute ("acc")
dtype (float64 for float64 logits, else float32), teacher_prob [B] and grad_logits [B, K] (d loss /
d logits; an empty [0] tensor without compute_grad) in the logits dtype, contiguous. Labels are
not range-checked here (the Python layer does that); a NaN logit or label makes the loss NaN.

With p = sigmoid(z) (stable, q = 1 - p exact), teacher pT_b = sigmoid((1/K) sum_k z_bk):

  s_k = (1/B) sum_b (1 - |y_b - p_bk|)      M_k = (1/B) sum_b (p_bk - pT_b)^2
  N_ij = (1/B) sum_b (p_bi - p_bj)^2        Lbce = (1/(K B)) sum_{b,k} softplus(z_bk) - y_b z_bk
  a = softmax(-s), E_j = exp(s_j - max s), Z_i = sum_{l != i} E_l, b_ij = E_j / Z_i (b_ii = 0)
  R_i = sum_j b_ij N_ij,  loss = Lbce + sum_k a_k M_k + (1/K) sum_i R_i
  G_k = -a_k (M_k - sum_l a_l M_l) + (1/K) sum_{i != k} b_ik (N_ik - R_i)
  g_bk = (p - y)/(K B) + (2/B) pq [a_k d_bk + (1/K) sum_{j != k} b_kj (p_bk - p_bj)]
         + (1/B) pq sgn(y_b - p_bk) G_k,      d_bk = p_bk - pT_b

Three or four launches, no host synchronization:

1. ``_kdef_reduce_kernel``, grid (row chunks, member tiles). Program (c, t) walks the rows of
   chunk c in [BLOCK_R, BLOCK_K] tiles (the whole row: BLOCK_K = next_power_of_2(K)) and owns
   the members i of tile t (BLOCK_I of them). Per row tile it forms the pairwise squared
   differences (p_bi - p_bj)^2 as a [BLOCK_R, BLOCK_I, BLOCK_K] broadcast and sums them over the
   rows into a [BLOCK_I, BLOCK_K] float64 accumulator (the squared difference itself, never moments:
   no cancellation; N_ii = 0 and N_ij = N_ji exactly); s_k, M_k and the BCE of its members the
   same way. Small K: one member tile (BLOCK_I = BLOCK_K, the row tile is reused); larger K:
   BLOCK_I shrinks so that the accumulator stays at most _ACC_TILE elements, and the programs of
   one chunk reload its rows (from L2). The tile sums are formed in the acc dtype over at most
   BLOCK_R rows, then accumulated in float64; each chunk writes one row of a float64 partials
   buffer [chunks, K*K + 3K] (N row-major, then s, M, BCE per member). The t = 0 programs store
   the teacher. The chunking depends only on (B, K), never on the device, so results are
   bitwise reproducible; no atomics.
2. ``partials.sum(0)`` (a torch reduction in a fixed order; skipped for one chunk), then
   ``_kdef_finalize_kernel``, one program: the K-sized math (a, E, Z, b, R, G, loss) in
   float64, N in tiles of rows. The gradient coefficients go to a vector
   coef = [E (K), 2a/B (K), 2/(K B Z) (K), G/B (K), sum E, 1/(K B)] in the acc dtype. (As ~30
   small torch ops it cost ~0.2 ms of host time per call on the CI CPU, and was the likely
   reason the Triton loss took ~0.7 ms at any batch size on an H200.)
3. ``_kdef_grad_kernel`` (with compute_grad), elementwise over [BLOCK_B, BLOCK_K] row tiles:
   the S2S sum in O(K) per row as sum_j E_j (d_k - d_j) = d_k sum E - sum_j E_j d_j with the
   teacher-centred d = p - pT (the centring keeps the rounding proportional to |p - pT|).

So two passes over [B, K] (pass 1 reads each row once per member tile). K is limited to 1024
(_MAX_KDEF_K: the K x K partials and the K^2 work per row). B = 0 gives loss 0 without a launch.

Conventions as in :mod:`cetnet_kernels.triton.fusion` (helpers imported from there): int64 row
offsets and _tile_offsets for strided inputs, _member for the stable sigmoid, _to_out for the
output casts (bf16 rounding under the interpreter), _device_guard/_launch, _register (triton_op on
GPU, custom_op under TRITON_INTERPRET=1); the gradient grid is chunked at _MAX_GRID_X programs
with pid0 as in :mod:`cetnet_kernels.triton.embedding`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cetnet_kernels._host import acc_dtype as _acc_dtype
from cetnet_kernels.triton.embedding import _MAX_GRID_X
from cetnet_kernels.triton.fusion import (
    INTERPRETED,
    _blocks,
    _check_logits,
    _check_rows,
    _launch,
    _input_offsets,
    _member,
    _member_mask,
    _packing,
    _register,
    _row_offsets,
    _tile_offsets,
    _to_out,
)

__all__ = ["kdef_loss_triton", "INTERPRETED"]

_MAX_KDEF_K = 1024  # K x K partials per chunk and a K^2 pairwise tile per row
_ACC_TILE = 2048  # float64 [BLOCK_I, BLOCK_K] accumulator elements per program
_PAIR_TILE = 4096  # [BLOCK_R, BLOCK_I, BLOCK_K] pairwise-difference elements per row tile
_MAX_BLOCK_R = 64  # rows per tile of pass 1 (sums of at most this many rows in float32)
_TARGET_PROGRAMS = 1024  # pass-1 programs (chunks x member tiles), at most
_FINALIZE_TILE = 4096  # float64 [BLOCK_I, BLOCK_K] elements of N per step of the finalize loop
_MAX_PARTIALS = 1 << 22  # float64 elements of the partials buffer (chunks x (K^2 + 3K)), about


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _to_acc(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        r = x.to(tl.float64)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def _teacher(z, kmask):
    # pT = sigmoid((1/K) sum_k z_k) from a [rows, BLOCK_K] tile (masked slots hold 0). K as the
    # acc dtype from the mask (K itself may arrive as the constexpr 1).
    kf = tl.sum(tl.where(kmask, 1.0, 0.0), axis=1).to(z.dtype)
    pt, qt, lspt, lsqt, ct = _member(tl.sum(z, axis=1) / kf)
    return pt


@triton.jit
def _kdef_reduce_kernel(
    z_ptr,  # [B, K] logits, any float dtype, strides (stride_zb, stride_zk)
    y_ptr,  # [B] labels, any float dtype, stride stride_y
    t_ptr,  # [B] out teacher prob, logits dtype, contiguous
    part_ptr,  # [chunks, W] out float64 partial sums: N (K*K), s (K), M (K), BCE (K)
    B,
    K,
    stride_zb,
    stride_zk,
    stride_y,
    rows_per_chunk,  # a multiple of BLOCK_R
    W,  # K*K + 3K
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tl.arange(0, BLOCK_K)  # int32: < K
    icols = tile * BLOCK_I + tl.arange(0, BLOCK_I)  # this program's members i
    kmask = cols < K
    imask = icols < K
    row0 = chunk * rows_per_chunk  # int64
    t_rows = tl.where(tile == 0, B, 0)  # the member tile 0 programs store the teacher
    acc_n = tl.zeros([BLOCK_I, BLOCK_K], dtype=tl.float64)
    acc_s = tl.zeros([BLOCK_I], dtype=tl.float64)
    acc_m = tl.zeros([BLOCK_I], dtype=tl.float64)
    acc_l = tl.zeros([BLOCK_I], dtype=tl.float64)
    for r in range(0, rows_per_chunk, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < B
        mask = rmask[:, None] & kmask[None, :]
        z = tl.load(z_ptr + _tile_offsets(rows, cols, stride_zb, stride_zk), mask=mask, other=0.0)
        z = _to_acc(z, IS_FP64)
        y = _to_acc(tl.load(y_ptr + rows * stride_y, mask=rmask, other=0.0), IS_FP64)
        pt = _teacher(z, kmask[None, :])
        tl.store(t_ptr + rows, _to_out(pt, t_ptr), mask=rows < t_rows)
        p, q, lsp, lsq, c = _member(z)
        if BLOCK_I == BLOCK_K:
            zi = z
            pi = p
            lsqi = lsq
        else:
            imask2 = rmask[:, None] & imask[None, :]
            zi = tl.load(z_ptr + _tile_offsets(rows, icols, stride_zb, stride_zk), mask=imask2,
                         other=0.0)
            zi = _to_acc(zi, IS_FP64)
            pi, qi, lspi, lsqi, ci = _member(zi)
        m2 = rmask[:, None] & imask[None, :]
        # Rows past B hold z = 0 in every slot: their pairwise differences are exactly 0. Slots
        # j >= K (or i >= K) of the N tile are never stored.
        dif = pi[:, :, None] - p[:, None, :]
        acc_n += tl.sum(dif * dif, axis=0).to(tl.float64)
        acc_s += tl.sum(tl.where(m2, 1.0 - tl.abs(y[:, None] - pi), 0.0), axis=0).to(tl.float64)
        dt = pi - pt[:, None]
        acc_m += tl.sum(tl.where(m2, dt * dt, 0.0), axis=0).to(tl.float64)
        # softplus(z) - y z = -log sigmoid(-z) - y z
        acc_l += tl.sum(tl.where(m2, -lsqi - y[:, None] * zi, 0.0), axis=0).to(tl.float64)
    base = part_ptr + chunk * W
    kk = K * K
    tl.store(base + icols[:, None] * K + cols[None, :], acc_n, mask=imask[:, None] & kmask[None, :])
    tl.store(base + kk + icols, acc_s, mask=imask)
    tl.store(base + kk + K + icols, acc_m, mask=imask)
    tl.store(base + kk + 2 * K + icols, acc_l, mask=imask)


@triton.jit
def _kdef_finalize_kernel(
    tot_ptr,  # [K*K + 3K] float64 batch sums: N (K*K row-major), s, M, BCE (per member)
    loss_ptr,  # [] out loss, acc dtype
    coef_ptr,  # [4K + 2] out acc dtype (see _kdef_grad_kernel); unused without HAS_COEF
    B,
    K,
    HAS_COEF: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The K-sized math in float64, one program: [BLOCK_K] vectors for the members and
    # [BLOCK_I, BLOCK_K] tiles of rows i of N (all of K <= BLOCK_K columns of a row at once).
    cols = tl.arange(0, BLOCK_K)
    kmask = cols < K
    kk = K * K
    bf = tl.cast(B, tl.float64)  # (B or K may arrive as the constexpr 1)
    kf = tl.cast(K, tl.float64)
    s = tl.load(tot_ptr + kk + cols, mask=kmask, other=0.0) / bf
    m = tl.load(tot_ptr + kk + K + cols, mask=kmask, other=0.0) / bf
    lbce = tl.sum(tl.load(tot_ptr + kk + 2 * K + cols, mask=kmask, other=0.0), axis=0) / (kf * bf)
    smax = tl.max(tl.where(kmask, s, -float("inf")), axis=0)
    smin = tl.min(tl.where(kmask, s, float("inf")), axis=0)
    ea = tl.where(kmask, tl.exp(smin - s), 0.0)  # softmax(-s), unnormalized
    a = ea / tl.sum(ea, axis=0)
    e = tl.where(kmask, tl.exp(s - smax), 0.0)
    am = tl.sum(a * m, axis=0)
    sr = tl.sum(tl.zeros([BLOCK_I], dtype=tl.float64), axis=0)  # sum_i R_i
    gs = tl.zeros([BLOCK_K], dtype=tl.float64)  # sum_{i != k} (N_ik - R_i) / Z_i
    for i0 in range(0, K, BLOCK_I):
        irows = i0 + tl.arange(0, BLOCK_I)
        imask = irows < K
        m2 = imask[:, None] & kmask[None, :]
        off = m2 & (irows[:, None] != cols[None, :])
        n = tl.load(tot_ptr + irows[:, None] * K + cols[None, :], mask=m2, other=0.0) / bf
        z = tl.sum(tl.where(off, e[None, :], 0.0), axis=1)  # Z_i = sum_{l != i} E_l
        zs = tl.where(z > 0, z, 1.0)  # K = 1: Z = 0, b = 0, R = 0
        r = tl.sum(tl.where(off, e[None, :] * n, 0.0), axis=1) / zs
        sr += tl.sum(tl.where(imask, r, 0.0), axis=0)
        # N is symmetric: N_ik is column k of row i
        gs += tl.sum(tl.where(off, (n - r[:, None]) / zs[:, None], 0.0), axis=0)
        if HAS_COEF:
            cs = tl.where(z > 0, 2.0 / (kf * bf * zs), 0.0)
            tl.store(coef_ptr + 2 * K + irows, cs.to(coef_ptr.dtype.element_ty), mask=imask)
    loss = lbce + am + sr / kf
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    if HAS_COEF:
        g = -a * (m - am) + e * gs / kf
        out = coef_ptr.dtype.element_ty
        tl.store(coef_ptr + cols, e.to(out), mask=kmask)
        tl.store(coef_ptr + K + cols, (2.0 * a / bf).to(out), mask=kmask)
        tl.store(coef_ptr + 3 * K + cols, (g / bf).to(out), mask=kmask)
        tl.store(coef_ptr + 4 * K, tl.sum(e, axis=0).to(out))
        tl.store(coef_ptr + 4 * K + 1, (1.0 / (kf * bf)).to(out))


@triton.jit
def _kdef_grad_kernel(
    z_ptr,  # [B, K] logits, any float dtype, strides (stride_zb, stride_zk)
    y_ptr,  # [B] labels, any float dtype, stride stride_y
    coef_ptr,  # [4K + 2] acc dtype: E, 2a/B, 2/(K B Z), G/B, sum E, 1/(K B)
    gz_ptr,  # [B, K] out d loss / d logits, logits dtype, contiguous
    B,
    K,
    stride_zb,
    stride_zk,
    stride_y,
    pid0,  # first program id of this launch (grids above _MAX_GRID_X are launched in chunks)
    IS_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == BLOCK_K (fusion._row_offsets: a thread holds whole rows)
    Z_PACKED: tl.constexpr,  # EVEN_K and the logits contiguous
):
    pid = tl.program_id(0).to(tl.int64) + pid0
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < B
    kmask = _member_mask(cols, K, EVEN_K, BLOCK_K)
    mask = rmask[:, None] & kmask[None, :]
    z = tl.load(z_ptr + _input_offsets(rows, cols, stride_zb, stride_zk, Z_PACKED, BLOCK_K),
                mask=mask, other=0.0)
    z = _to_acc(z, IS_FP64)
    y = _to_acc(tl.load(y_ptr + rows * stride_y, mask=rmask, other=0.0), IS_FP64)[:, None]
    e = tl.load(coef_ptr + cols, mask=kmask, other=0.0)[None, :]
    ca = tl.load(coef_ptr + K + cols, mask=kmask, other=0.0)[None, :]
    cs = tl.load(coef_ptr + 2 * K + cols, mask=kmask, other=0.0)[None, :]
    cg = tl.load(coef_ptr + 3 * K + cols, mask=kmask, other=0.0)[None, :]
    esum = tl.load(coef_ptr + 4 * K)
    cbce = tl.load(coef_ptr + 4 * K + 1)

    pt = _teacher(z, kmask[None, :])
    p, q, lsp, lsq, c = _member(z)
    d = p - pt[:, None]
    # sum_{j != k} E_j (p_k - p_j) = d_k sum_j E_j - sum_j E_j d_j (the j = k term is 0)
    wd = tl.sum(tl.where(mask, e * d, 0.0), axis=1)[:, None]
    sgn = tl.where(y > p, 1.0, tl.where(y < p, -1.0, 0.0))  # sgn(0) = 0
    g = (p - y) * cbce + (p * q) * (ca * d + cs * (d * esum - wd) + sgn * cg)
    tl.store(gz_ptr + _row_offsets(rows, cols, K, EVEN_K, BLOCK_K), _to_out(g, gz_ptr), mask=mask)


# =============================================================================================
# Host side
# =============================================================================================
def _reduce_plan(B: int, K: int) -> tuple[int, int, int, int, int, int, int]:
    """(block_r, block_i, block_k, member tiles, rows per chunk, chunks, num_warps) of pass 1;
    a function of (B, K) only (the summation order must not depend on the device)."""
    block_k = triton.next_power_of_2(K)
    block_i = min(block_k, max(1, _ACC_TILE // block_k))
    block_r = max(1, min(_MAX_BLOCK_R, _PAIR_TILE // (block_i * block_k)))
    n_tiles = triton.cdiv(K, block_i)
    row_tiles = triton.cdiv(B, block_r)
    max_chunks = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n_tiles),
                            _MAX_PARTIALS // (K * K + 3 * K)))
    rows_per_chunk = triton.cdiv(row_tiles, min(row_tiles, max_chunks)) * block_r
    n_chunks = triton.cdiv(B, rows_per_chunk)
    num_warps = 8 if block_i * block_k >= 1024 else 4
    return block_r, block_i, block_k, n_tiles, rows_per_chunk, n_chunks, num_warps


def _kdef_loss(logits: Tensor, labels: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    op = "kdef_loss_triton"
    _check_logits(logits, op)
    torch._check_value(
        logits.shape[1] <= _MAX_KDEF_K,
        lambda: f"{op}: the triton backend handles at most {_MAX_KDEF_K} members (K) for the KDEF "
        f"loss (its pairwise terms take a K x K tile), got {logits.shape[1]}; use backend='cpu' "
        f"or 'cuda'")
    _check_rows(labels, logits, "labels", op)
    B, K = logits.shape
    dev = logits.device
    acc = _acc_dtype(logits.dtype)
    is_fp64 = logits.dtype == torch.float64
    compute_grad = bool(compute_grad)
    teacher = torch.empty((B,), dtype=logits.dtype, device=dev)
    grad = torch.empty((B, K) if compute_grad else (0,), dtype=logits.dtype, device=dev)
    if B == 0:
        return torch.zeros((), dtype=acc, device=dev), teacher, grad

    # Pass 1: teacher and per-chunk float64 partial sums.
    block_r, block_i, block_k, n_tiles, rows_per_chunk, n_chunks, num_warps = _reduce_plan(B, K)
    width = K * K + 3 * K
    part = torch.empty((n_chunks, width), dtype=torch.float64, device=dev)
    _launch(
        _kdef_reduce_kernel,
        (n_chunks, n_tiles),
        (logits, labels, teacher, part, B, K, logits.stride(0), logits.stride(1),
         labels.stride(0), rows_per_chunk, width),
        dict(IS_FP64=is_fp64, BLOCK_R=block_r, BLOCK_I=block_i, BLOCK_K=block_k),
        num_warps,
    )

    # The batch sums (a fixed-order torch reduction over the chunks), then the K-sized math in
    # one float64 program: the loss and the gradient coefficients.
    tot = part.sum(0) if n_chunks > 1 else part[0]
    loss = torch.empty((), dtype=acc, device=dev)
    coef = torch.empty((4 * K + 2,), dtype=acc, device=dev) if compute_grad else None
    fin_k = triton.next_power_of_2(K)
    _launch(
        _kdef_finalize_kernel,
        (1,),
        (tot, loss, coef, B, K),
        dict(HAS_COEF=compute_grad, BLOCK_I=max(1, min(fin_k, _FINALIZE_TILE // fin_k)),
             BLOCK_K=fin_k),
        4,
    )

    if compute_grad:
        block_b, block_k2, warps2 = _blocks(K)
        n = triton.cdiv(B, block_b)
        for pid0 in range(0, n, _MAX_GRID_X):
            _launch(
                _kdef_grad_kernel,
                (min(_MAX_GRID_X, n - pid0),),
                (logits, labels, coef, grad, B, K, logits.stride(0), logits.stride(1),
                 labels.stride(0), pid0),
                dict(IS_FP64=is_fp64, BLOCK_B=block_b, BLOCK_K=block_k2,
                     **_packing(K, block_k2, logits)),
                warps2,
            )
    return loss, teacher, grad


kdef_loss_triton = _register("kdef_loss_triton", _kdef_loss)
