"""Triton kernels of the confidence fusion and the collaborative loss (design: MATH.md §1-2).

Registers three ops, with the same contracts as the compiled ``cetnet::*`` ops
(see csrc/registration.cpp):

* ``cetnet::confidence_fusion_triton(logits, temperature, logit_space, detach_weights)
  -> (prob, weights)`` (detach_weights does not change the values)
* ``cetnet::confidence_fusion_backward_triton(grad_prob?, grad_weights?, logits, temperature,
  logit_space, detach_weights, compute_temperature_grad) -> (grad_logits, grad_temperature)``
* ``cetnet::collaborative_loss_triton(logits, labels, temperature, ensemble_weight,
  member_weight, distill_weight, mutual_weight, logit_space, detach_weights, reduction,
  compute_grad, compute_temperature_grad) -> (loss, prob, grad_logits, grad_temperature)``

The per-row algorithm mirrors csrc/fusion_math.h (make_elem, fusion_stats, fusion_backward_row,
collaborative_loss_row): everything in logit form from one exp(-|z|) and one log1p per member,
max-subtracted softmax, p, 1 - p, their logs and the ratios of the ensemble-BCE gradient from
positive sums, with log-sum-exps for a row whose sums underflow (_prob_space_logs), nothing
clamped; a NaN logit poisons only its row.
At temperature 1 (the default; a branch on the loaded value) the fusion forward, and the backward
when dL/dtau is not asked for, take the compiled kernels' path without a logarithm
(exp_confidence): one exp and one division per member fewer, and no log1p.

Instruction count: on an H200 these kernels were bound by instruction issue (Nsight Compute,
0.55-0.71 issued warps per scheduler cycle at 13-25 % of DRAM bandwidth), so instructions per row
are their cost. Besides the log-free path, contiguous inputs with K == BLOCK_K are addressed with
a constant row stride (_row_offsets): a thread then holds whole rows. sm_90 SASS at K = 4, fp32,
on the path a thread runs per row: forward 142 (tau = 1) / ~315, backward ~204 (tau = 1, no
dL/dtau), loss ~590, against 632 / 632, ~640 and ~1290 before these changes.

Layout: one program handles BLOCK_B rows as a [BLOCK_B, BLOCK_K] tile, BLOCK_K =
next_power_of_2(K); masked member slots contribute -inf to maxima / LSEs and 0 to sums. Any input
strides. Compute in float32 (float64 for float64 logits).

Index arithmetic: every element offset is int64 (_row_col_offsets, _tile_offsets): rows are int64
from the program id on, and a member column is widened before it meets an input's member stride
(a column-major [B, K] view has stride(1) = B, so col * stride can pass 2^31 while B * K fits in
memory). Integer kernel arguments below 2^31 arrive as int32, so products of two arguments or of
an argument and an int32 index would wrap. Only the within-row column index itself stays int32.

GPU accuracy (NVIDIA): Triton lowers float32 tl.exp to ex2.approx.f32, not libdevice (~2 ulp,
plus ~|x| ulp from the log2(e) scaling: harmless here, every exp argument is <= 0 and large
arguments give results far below the tolerances); float64 tl.exp / tl.log go through libdevice
(__nv_exp / __nv_log) and float64 '/' is div.rn.f64, so the float64 path is accurate to a few ulp
as on CPU. No explicit libdevice calls are needed (the interpreter has none). Results are not
bitwise those of the interpreter (numpy) or of another layout's specialization (stride-1
specialization changes vector widths and reduction trees): the tests hold GPU results to the
tolerance rule, not to bitwise equality across layouts.

Device: every launch runs under ``torch.cuda.device(<the inputs' device>)`` (_device_guard; a
no-op for CPU tensors in the interpreter and for fake tensors while tracing), so tensors on a
GPU other than the current one are launched on their own device.

Launch: on GPU the ops are ``torch.library.triton_op``s launched through ``wrap_triton`` so that
torch.compile traces into the kernels. Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit``
gives interpreted functions that cannot be traced into a graph; the ops are then plain
``torch.library.custom_op``s (same names and schemas) with a fake implementation, so
torch.compile treats them as opaque calls. Eager calls from the public functions skip the
registered ops (backends.EagerOp runs ``IMPLEMENTATIONS[name]``, whose launches go straight to
Triton: :func:`direct`), which saves the dispatcher's and the Python autograd wrapper's host time.
"""

import functools
import math
import struct
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from cetnet_kernels._host import acc_dtype as _acc_dtype
from cetnet_kernels._host import device_guard as _device_guard
from cetnet_kernels._host import shape_only
from cetnet_kernels.codes import Reduction

__all__ = [
    "IMPLEMENTATIONS",
    "direct",
    "confidence_fusion_triton",
    "confidence_fusion_backward_triton",
    "collaborative_loss_triton",
    "INTERPRETED",
]

# Tile size (elements) one program works on; BLOCK_B = TILE // BLOCK_K rows, capped.
_TILE = 2048
_MAX_BLOCK_B = 256


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _probe():
    pass


#: True when the kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = _is_interpreted(_probe)
# The interpreter casts float32 -> bfloat16 by truncation (triton 3.9); compiled Triton rounds
# to nearest even. Under the interpreter, bfloat16 outputs are rounded by hand (_to_out).
_BF16_RTNE_BY_HAND = tl.constexpr(INTERPRETED)


# =============================================================================================
# Per-member and per-row helpers (fusion_math.h: make_elem, fusion_stats)
# =============================================================================================
@triton.jit
def _log1p_unit(e):
    # log1p(e) for e in [0, 1] from a correctly rounded log (Goldberg): with u = fl(1 + e),
    # log1p(e) = log(u) * e / (u - 1), and = e when u == 1. Portable to the interpreter, where
    # libdevice.log1p is not available; accurate to a few ulp.
    u = 1.0 + e
    d = u - 1.0
    small = d == 0.0
    return tl.where(small, e, tl.log(u) * (e / tl.where(small, 1.0, d)))


@triton.jit
def _to_out(x, ptr):
    # x cast to the element type of ptr, rounding to nearest even.
    ty = ptr.dtype.element_ty
    if _BF16_RTNE_BY_HAND:
        if ty == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            y = tl.where(x != x, x.to(tl.bfloat16), bits.to(tl.uint16).to(tl.bfloat16, bitcast=True))
        else:
            y = x.to(ty)
    else:
        y = x.to(ty)
    return y


@triton.jit
def _probs(z):
    # set_probs: p = sigmoid(z), q = sigmoid(-z) (exact, not 1 - p), and e = exp(-|z|) for the
    # logarithms. One exp, one division.
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
    r = 1.0 / (1.0 + e)
    er = e * r
    nonneg = z >= 0.0
    return tl.where(nonneg, r, er), tl.where(nonneg, er, r), e


@triton.jit
def _member(z):
    # make_elem: p = sigmoid(z), q = sigmoid(-z) (exact, not 1 - p), lsp = log sigmoid(z),
    # lsq = log sigmoid(-z), c = -H(p) = -(log1p(e^-|z|) + |z| sigmoid(-|z|)): two terms of one
    # sign (z p + lsq cancels for a large |z|, as in csrc/fusion_math.h). One exp, one log1p.
    p, q, e = _probs(z)
    l = _log1p_unit(e)
    lsp = -(tl.maximum(-z, 0.0) + l)
    lsq = -(tl.maximum(z, 0.0) + l)
    c = -(l + tl.abs(z) * tl.where(z >= 0.0, q, p))
    return p, q, lsp, lsq, c


@triton.jit
def _over_tau(x, tau, inv_tau):
    # x / tau: x * (1/tau) while 1/tau is finite, a true division once it overflows (tau below
    # ~1/FLT_MAX), where x * inf would turn an exact 0 into NaN. The callers divide differences
    # that are exactly 0 at the winning member and multiply by a weight before dividing, so the
    # results stay exact (and free of 0 * inf) at any tau > 0, as in csrc/fusion_math.h.
    # That tau is subnormal: both sides are scaled by 2^64 first (exact), because Triton lowers
    # an fp32 "/" to PTX's approximate div.full.f32, which need not keep subnormal operands
    # (a flushed tau would make the winner's 0 / tau a NaN); mul.f32 keeps them.
    if inv_tau < float("inf"):
        r = x * inv_tau
    else:
        r = (x * 18446744073709551616.0) / (tau * 18446744073709551616.0)
    return r


@triton.jit
def _fusion_stats(
    z,  # [BLOCK_B, BLOCK_K] logits (acc dtype)
    p,  # [BLOCK_B, BLOCK_K] sigmoid(z)
    c,  # [BLOCK_B, BLOCK_K] confidence
    kmask,  # [1, BLOCK_K] valid member slots
    tau,  # [] temperature (acc dtype)
    inv_tau,  # [] 1 / temperature
    LOGIT_SPACE: tl.constexpr,
):
    # fusion_stats: log w_k = (c_k - m)/tau - logS with m = max_k c_k (the max is subtracted
    # before scaling: the winner's exponent is exactly 0 at any tau). Returns per-row [BLOCK_B]
    # (m, logS, cbar, zf, p_fused, log p, log(1 - p)); the logs only in logit space (else zeros;
    # prob space: _prob_space_logs), prob-space p is the positive sum sum_k w_k p_k. Then the
    # softmax exponentials e_k = exp((c_k - m)/tau) ([BLOCK_B, BLOCK_K], 0 in masked slots) and
    # 1 / sum_k e_k, so that w_k = e_k / S needs no second exp.
    s = tl.where(kmask, c, float("-inf"))
    m = tl.max(s, axis=1)
    e = tl.exp(_over_tau(s - m[:, None], tau, inv_tau))  # masked slots: exp(-inf) = 0
    S = tl.sum(e, axis=1)
    invS = 1.0 / S
    logS = tl.log(S)
    cbar = tl.sum(e * c, axis=1) * invS
    zf = tl.sum(e * z, axis=1) * invS
    if LOGIT_SPACE:
        pf, qf, logp, log1mp, cf = _member(zf)
    else:
        pf = tl.sum(e * p, axis=1) * invS
        logp = tl.zeros_like(pf)
        log1mp = tl.zeros_like(pf)
    return m, logS, cbar, zf, pf, logp, log1mp, e, invS


@triton.jit
def _exp_confidence(z, p, q):
    # exp(c) without a logarithm (fusion_math.h exp_confidence): with r = sigmoid(|z|) and
    # s = sigmoid(-|z|), c = log r - |z| s, so exp(c) = r exp(-|z| s), in [exp(-0.279) / 2, 1]:
    # nothing to subtract before the softmax at tau = 1.
    nonneg = z >= 0.0
    r = tl.where(nonneg, p, q)
    s = tl.where(nonneg, q, p)
    return r * tl.exp(-tl.abs(z) * s)


@triton.jit
def _fusion_weights(z, kmask, tau, inv_tau, tau_ptr, LOGIT_SPACE: tl.constexpr):
    # p, q, the weights w ([BLOCK_B, BLOCK_K], 0 in masked slots) and the fused probability: at
    # tau == 1 (a branch on the temperature, the default) from exp(c) without a logarithm as the
    # compiled kernels do, else through fusion_stats. Masked slots hold z = 0. The test is on the
    # stored temperature, as theirs (a float64 1 + 2^-30 is not 1, though it rounds to 1 in
    # float32).
    if tl.load(tau_ptr) == 1.0:
        p, q, _e = _probs(z)
        e = tl.where(kmask, _exp_confidence(z, p, q), 0.0)
        invS = 1.0 / tl.sum(e, axis=1)
        if LOGIT_SPACE:
            pf, _q, _e = _probs(tl.sum(e * z, axis=1) * invS)
        else:
            pf = tl.sum(e * p, axis=1) * invS
    else:
        p, q, lsp, lsq, c = _member(z)
        m, logS, cbar, zf, pf, logp, log1mp, e, invS = _fusion_stats(
            z, p, c, kmask, tau, inv_tau, LOGIT_SPACE)
    return p, q, e * invS[:, None], pf


@triton.jit
def _prob_space_logs(e, invS, logS, m, p, q, lsp, lsq, c, kmask, tau, inv_tau,
                     IS_FP64: tl.constexpr):
    # fusion_stats with logs in prob space, as the compiled kernels: p = Sp / S and
    # 1 - p = Sq / S from the positive sums Sp = sum_k e_k p_k and Sq = sum_k e_k q_k,
    # log p = log Sp - log S, log(1 - p) = log Sq - log S, and the ratios of the ensemble-BCE
    # gradient a_k = w_k p_k / p = e_k p_k / Sp, b_k = w_k q_k / (1 - p) = e_k q_k / Sq. A row
    # whose smaller sum is below 1e-30 (float64: 1e-290) may have lost precision to underflowed
    # terms: it takes the log-space forms (log-sum-exps of log w_k + log sigmoid(+-z_k)). That
    # is rare, so the tile computes them only when one of its rows needs them.
    Sp = tl.sum(e * p, axis=1)
    Sq = tl.sum(e * q, axis=1)
    logp = tl.log(Sp) - logS
    log1mp = tl.log(Sq) - logS
    pf = Sp * invS
    qf = Sq * invS
    a = e * p * (1.0 / Sp)[:, None]
    b = e * q * (1.0 / Sq)[:, None]
    if IS_FP64:
        tiny = 1e-290
    else:
        tiny = 1e-30
    slow = tl.minimum(Sp, Sq) < tiny
    if tl.max(slow.to(tl.int32), axis=0) > 0:
        lw = tl.where(kmask, _over_tau(c - m[:, None], tau, inv_tau) - logS[:, None],
                      float("-inf"))
        la = lw + lsp
        lb = lw + lsq
        ma = tl.max(la, axis=1)
        mb = tl.max(lb, axis=1)
        logp_s = ma + tl.log(tl.sum(tl.exp(la - ma[:, None]), axis=1))
        log1mp_s = mb + tl.log(tl.sum(tl.exp(lb - mb[:, None]), axis=1))
        logp = tl.where(slow, logp_s, logp)
        log1mp = tl.where(slow, log1mp_s, log1mp)
        pf = tl.where(slow, tl.exp(logp_s), pf)
        qf = tl.where(slow, tl.exp(log1mp_s), qf)
        a = tl.where(slow[:, None], tl.exp(la - logp_s[:, None]), a)
        b = tl.where(slow[:, None], tl.exp(lb - log1mp_s[:, None]), b)
    return pf, qf, logp, log1mp, a, b


@triton.jit
def _row_col_offsets(BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # int64: B*K may exceed 2^31
    cols = tl.arange(0, BLOCK_K)  # int32: < K
    return rows, cols


@triton.jit
def _tile_offsets(rows, cols, stride_b, stride_k):
    # [BLOCK_B, BLOCK_K] int64 element offsets of a strided [B, K] tensor. The column is widened
    # before the product: stride_k arrives as int32 when < 2^31, and col * stride_k of a
    # column-major view (stride_k = B) passes 2^31 once K * B does.
    return rows[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_k


@triton.jit
def _row_offsets(rows, cols, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # [BLOCK_B, BLOCK_K] int64 offsets of a contiguous [B, K] tensor (the outputs, and inputs
    # laid out so: Z_PACKED / GW_PACKED). EVEN_K (K == BLOCK_K): the row stride is the constant
    # BLOCK_K, so Triton knows each row's members are contiguous and aligned and gives a thread
    # whole rows: 128-bit loads and stores, row sums without cross-lane shuffles, and each row
    # quantity computed once. With the stride a runtime argument (K = 4 is not a multiple of 16,
    # the divisibility Triton specializes on) it spreads a row over K lanes, shuffles for every
    # row sum and computes each row quantity on all K lanes: at K = 4 the loss kernel ran ~1290
    # sm_90 instructions per row with 98 shuffles, about half as many without.
    return _input_offsets(rows, cols, K, 1, EVEN_K, BLOCK_K)


@triton.jit
def _input_offsets(rows, cols, stride_b, stride_k, PACKED: tl.constexpr, BLOCK_K: tl.constexpr):
    # Offsets of a [B, K] input: _row_offsets' constant stride when PACKED (contiguous with
    # K == BLOCK_K; the strides are then not read), else its strides (_tile_offsets).
    if PACKED:
        offs = rows[:, None] * BLOCK_K + cols[None, :].to(tl.int64)
    else:
        offs = _tile_offsets(rows, cols, stride_b, stride_k)
    return offs


@triton.jit
def _member_mask(cols, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # [BLOCK_K] valid member slots; a constant (all true) when K == BLOCK_K, which keeps the
    # loads and stores vectorizable (a mask must be provably uniform over a vector).
    if EVEN_K:
        kmask = cols < BLOCK_K
    else:
        kmask = cols < K
    return kmask


@triton.jit
def _logits_tile(z_ptr, tau_ptr, B, K, stride_zb, stride_zk, IS_FP64: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 Z_PACKED: tl.constexpr):
    # The common prologue of the fusion kernels: this program's rows and member columns, their
    # masks, the [BLOCK_B, BLOCK_K] logits tile in the compute dtype (masked slots hold 0), the
    # temperature in that dtype and its inverse. Z_PACKED: the logits are contiguous with
    # K == BLOCK_K (then the strides are not read).
    rows, cols = _row_col_offsets(BLOCK_B, BLOCK_K)
    row_mask = rows < B
    kmask = _member_mask(cols, K, EVEN_K, BLOCK_K)[None, :]
    mask = row_mask[:, None] & kmask
    z = tl.load(z_ptr + _input_offsets(rows, cols, stride_zb, stride_zk, Z_PACKED, BLOCK_K),
                mask=mask, other=0.0)
    if IS_FP64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    tau = tl.load(tau_ptr).to(z.dtype)
    return rows, cols, row_mask, kmask, mask, z, tau, 1.0 / tau


# =============================================================================================
# (a) confidence_fusion forward
# =============================================================================================
@triton.jit
def _confidence_fusion_fwd_kernel(
    z_ptr,  # [B, K] logits, any float dtype, strides (stride_zb, stride_zk)
    tau_ptr,  # [] temperature, any float dtype
    prob_ptr,  # [B] out, logits dtype, contiguous
    w_ptr,  # [B, K] out, logits dtype, contiguous
    B,
    K,
    stride_zb,
    stride_zk,
    LOGIT_SPACE: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == BLOCK_K
    Z_PACKED: tl.constexpr,  # EVEN_K and the logits contiguous
):
    rows, cols, row_mask, kmask, mask, z, tau, inv_tau = _logits_tile(
        z_ptr, tau_ptr, B, K, stride_zb, stride_zk, IS_FP64, BLOCK_B, BLOCK_K, EVEN_K, Z_PACKED)

    p, q, w, pf = _fusion_weights(z, kmask, tau, inv_tau, tau_ptr, LOGIT_SPACE)

    tl.store(prob_ptr + rows, _to_out(pf, prob_ptr), mask=row_mask)
    tl.store(w_ptr + _row_offsets(rows, cols, K, EVEN_K, BLOCK_K), _to_out(w, w_ptr), mask=mask)


# =============================================================================================
# (b) confidence_fusion backward (VJP)
# =============================================================================================
@triton.jit
def _confidence_fusion_bwd_kernel(
    gp_ptr,  # [B] grad of prob, any float dtype, stride stride_gp (None unless HAS_GP)
    gw_ptr,  # [B, K] grad of weights, any float dtype, strides (stride_gwb, stride_gwk) (HAS_GW)
    z_ptr,  # [B, K] logits, any float dtype, strides (stride_zb, stride_zk)
    tau_ptr,  # [] temperature, any float dtype
    gz_ptr,  # [B, K] out grad of logits, logits dtype, contiguous
    gt_ptr,  # [B] out per-row grad of temperature, acc dtype (None unless COMPUTE_TGRAD)
    B,
    K,
    stride_gp,
    stride_gwb,
    stride_gwk,
    stride_zb,
    stride_zk,
    HAS_GP: tl.constexpr,
    HAS_GW: tl.constexpr,
    LOGIT_SPACE: tl.constexpr,
    DETACH: tl.constexpr,
    COMPUTE_TGRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == BLOCK_K
    Z_PACKED: tl.constexpr,  # EVEN_K and the logits contiguous
    GW_PACKED: tl.constexpr,  # EVEN_K and grad_weights contiguous
):
    # fusion_backward_row:
    #   u_k = g_w_k + g_m m_k, m_k = p_k (prob space) or z_k (logit space)
    #   g_c_k = w_k (u_k - sum_j w_j u_j) / tau                (0 with detach_weights)
    #   g_z_k = g_m w_k dm_k/dz_k + g_c_k z_k p_k (1-p_k),  g_tau = -(1/tau) sum_k g_c_k c_k
    rows, cols, row_mask, kmask, mask, z, tau, inv_tau = _logits_tile(
        z_ptr, tau_ptr, B, K, stride_zb, stride_zk, IS_FP64, BLOCK_B, BLOCK_K, EVEN_K, Z_PACKED)

    # Masked member slots hold z = 0 and weight 0: they drop out of every sum.
    if COMPUTE_TGRAD:  # dL/dtau needs the confidences: the general path at any tau
        p, q, lsp, lsq, c = _member(z)
        m, logS, cbar, zf, pf, logp, log1mp, e, invS = _fusion_stats(
            z, p, c, kmask, tau, inv_tau, LOGIT_SPACE)
        w = e * invS[:, None]
    else:
        p, q, w, pf = _fusion_weights(z, kmask, tau, inv_tau, tau_ptr, LOGIT_SPACE)
    pq = p * q

    if HAS_GP:
        g_p = tl.load(gp_ptr + rows * stride_gp, mask=row_mask, other=0.0).to(z.dtype)
    else:
        g_p = tl.zeros_like(pf)
    # In logit space p = sigmoid(z_f): carry the upstream grad to z_f.
    if LOGIT_SPACE:
        g_m = g_p * pf * (1.0 - pf)
        gz = g_m[:, None] * w
    else:
        g_m = g_p
        gz = g_m[:, None] * w * pq

    if not DETACH:
        if LOGIT_SPACE:
            u = g_m[:, None] * z
        else:
            u = g_m[:, None] * p
        if HAS_GW:
            gw = tl.load(gw_ptr + _input_offsets(rows, cols, stride_gwb, stride_gwk, GW_PACKED,
                                                 BLOCK_K), mask=mask, other=0.0)
            u = gw.to(z.dtype) + u
        ubar = tl.sum(w * u, axis=1)
        gc = _over_tau(w * (u - ubar[:, None]), tau, inv_tau)
        gz = gz + gc * z * pq
        if COMPUTE_TGRAD:
            # sum_k g_c_k c_k = sum_k g_c_k (c_k - max c), as sum_k g_c_k = 0 (accurate at
            # small tau; see csrc/fusion_math.h).
            gt = -_over_tau(tl.sum(gc * (c - m[:, None]), axis=1), tau, inv_tau)
            tl.store(gt_ptr + rows, gt, mask=row_mask)

    tl.store(gz_ptr + _row_offsets(rows, cols, K, EVEN_K, BLOCK_K), _to_out(gz, gz_ptr),
             mask=mask)


# =============================================================================================
# (c) collaborative loss: loss, prob and (optionally) the per-row gradient in one pass
# =============================================================================================
@triton.jit
def _scalar_weight(hi, lo, IS_FP64: tl.constexpr):
    # A Python float reaches the kernel as fp32; float64 runs get it back as hi + lo (~2^-48 rel).
    # (A float argument is an fp32 scalar when compiled and a Python float when interpreted.)
    if IS_FP64:
        zero = tl.zeros((1,), dtype=tl.float64)
        return (zero + hi) + lo
    else:
        return hi


@triton.jit
def _collaborative_loss_kernel(
    z_ptr,  # [B, K] logits, any float dtype, strides (stride_zb, stride_zk)
    y_ptr,  # [B] labels, any float dtype, stride stride_y
    tau_ptr,  # [] temperature, any float dtype
    loss_ptr,  # [B] out per-row loss, acc dtype
    prob_ptr,  # [B] out fused prob, logits dtype
    gz_ptr,  # [B, K] out per-row d(row loss)/dz, logits dtype, contiguous (None unless COMPUTE_GRAD)
    gt_ptr,  # [B] out per-row d(row loss)/dtau, acc dtype (None unless COMPUTE_TGRAD)
    B,
    K,
    stride_zb,
    stride_zk,
    stride_y,
    alpha_hi,  # member BCE weight (fp32 hi part)
    alpha_lo,  # fp32 remainder
    beta_hi,  # ensemble BCE weight
    beta_lo,
    gamma_hi,  # distillation weight
    gamma_lo,
    delta_hi,  # mutual-learning weight
    delta_lo,
    USE_A: tl.constexpr,
    USE_B: tl.constexpr,
    USE_G: tl.constexpr,
    USE_D: tl.constexpr,  # delta != 0 and K > 1
    LOGIT_SPACE: tl.constexpr,
    DETACH: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COMPUTE_TGRAD: tl.constexpr,  # COMPUTE_GRAD and USE_B and not DETACH and asked for
    NEED_LOGS: tl.constexpr,  # USE_B or USE_G: form log p and log(1 - p)
    IS_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == BLOCK_K
    Z_PACKED: tl.constexpr,  # EVEN_K and the logits contiguous
):
    rows, cols, row_mask, kmask, mask, z, tau, inv_tau = _logits_tile(
        z_ptr, tau_ptr, B, K, stride_zb, stride_zk, IS_FP64, BLOCK_B, BLOCK_K, EVEN_K, Z_PACKED)
    y = tl.load(y_ptr + rows * stride_y, mask=row_mask, other=0.0).to(z.dtype)

    p, q, lsp, lsq, c = _member(z)
    m, logS, cbar, zf, pf, logp, log1mp, e, invS = _fusion_stats(
        z, p, c, kmask, tau, inv_tau, LOGIT_SPACE)
    pw = pf  # prob space: sum_k w_k p_k as summed (pf may come from exp(log p) below)
    # 1 - p, exact near p = 1 (p itself would round to 1).
    if NEED_LOGS:
        if LOGIT_SPACE:
            qf = tl.exp(log1mp)
        else:
            # a_k = w_k p_k / p, b_k = w_k q_k / (1 - p): the ensemble-BCE gradient's ratios.
            pf, qf, logp, log1mp, a, b = _prob_space_logs(e, invS, logS, m, p, q, lsp, lsq, c,
                                                          kmask, tau, inv_tau, IS_FP64)
    else:
        qf = 1.0 - pf

    loss = tl.zeros_like(pf)
    if USE_A:
        alpha = _scalar_weight(alpha_hi, alpha_lo, IS_FP64)
        # softplus(z) - y z
        loss = loss + alpha * tl.sum(tl.where(kmask, -lsq - y[:, None] * z, 0.0), axis=1)
    if USE_G:
        gamma = _scalar_weight(gamma_hi, gamma_lo, IS_FP64)
        kl = pf[:, None] * (logp[:, None] - lsp) + qf[:, None] * (log1mp[:, None] - lsq)
        loss = loss + gamma * tl.sum(tl.where(kmask, kl, 0.0), axis=1)
    if USE_B:
        beta = _scalar_weight(beta_hi, beta_lo, IS_FP64)
        loss = loss - beta * (y * logp + (1.0 - y) * log1mp)
    if USE_D:
        delta = _scalar_weight(delta_hi, delta_lo, IS_FP64)
        pm = tl.where(kmask, p, 0.0)
        P = tl.sum(pm, axis=1)
        Q = tl.sum(tl.where(kmask, q, 0.0), axis=1)
        C = tl.sum(tl.where(kmask, c, 0.0), axis=1)
        Kf = tl.sum(tl.where(kmask, 1.0, 0.0), axis=1).to(z.dtype)  # [1]: K as acc dtype
        inv_km1 = 1.0 / (Kf - 1.0)
        # sum_{j != k} KL(p_j || p_k) = (C - c_k) - (P - p_k) log p_k - (Q - q_k) log(1 - p_k)
        mut = (C[:, None] - c) - (P[:, None] - p) * lsp - (Q[:, None] - q) * lsq
        loss = loss + delta * inv_km1 * tl.sum(tl.where(kmask, mut, 0.0), axis=1)

    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(prob_ptr + rows, _to_out(pf, prob_ptr), mask=row_mask)

    if COMPUTE_GRAD:
        w = e * invS[:, None]  # 0 in masked slots
        # Temperature: only the ensemble BCE depends on tau (the gamma/delta targets are detached).
        if COMPUTE_TGRAD:
            # sum_k a_k c_k - cbar = sum_k (a_k - w_k) d_k and sum_k w_k z_k c_k - z_f cbar =
            # sum_k w_k (z_k - z_f) d_k with d_k = c_k - max c: accurate at small tau, exactly
            # 0 for one-hot weights (see csrc/fusion_math.h).
            d = c - m[:, None]
            wl = w
            if LOGIT_SPACE:
                # d BCE/dtau = (p - y) dz_f/dtau, dz_f/dtau = -(1/tau^2) sum_k w_k (z_k - z_f) d_k
                s1 = tl.sum(tl.where(kmask, wl * (z - zf[:, None]) * d, 0.0), axis=1)
                gt = -beta * (pf - y) * _over_tau(_over_tau(s1, tau, inv_tau), tau, inv_tau)
            else:
                s1 = tl.sum(tl.where(kmask, (a - wl) * d, 0.0), axis=1)
                s2 = tl.sum(tl.where(kmask, (b - wl) * d, 0.0), axis=1)
                gt = beta * _over_tau(_over_tau(y * s1 + (1.0 - y) * s2, tau, inv_tau), tau,
                                      inv_tau)
            tl.store(gt_ptr + rows, gt, mask=row_mask)

        g = tl.zeros_like(z)
        if USE_A:
            g = g + alpha * (p - y[:, None])
        if USE_G:
            g = g + gamma * (p - pf[:, None])
        if USE_D:
            g = g + delta * inv_km1 * (Kf * p - P[:, None])
        if USE_B:
            # weight x (1 + x/tau) as weight + (weight x)/tau: an underflowed weight gives 0.
            if LOGIT_SPACE:
                wl = w
                if not DETACH:
                    wl = wl + _over_tau(wl * z * p * q * (z - zf[:, None]), tau, inv_tau)
                g = g + beta * (pf - y)[:, None] * wl
            else:
                rho0 = a * q  # r_j / p
                rho1 = b * p  # r_j / (1 - p)
                rho = (1.0 - y[:, None]) * rho1 - y[:, None] * rho0
                if not DETACH:
                    # p_j - p with p as the weighted sum (pf may come from exp(log p)): exactly
                    # 0 for the winner of one-hot weights, whose 1/tau would amplify a rounding.
                    rho = rho + _over_tau(rho * z * (p - pw[:, None]), tau, inv_tau)
                g = g + beta * rho
        tl.store(gz_ptr + _row_offsets(rows, cols, K, EVEN_K, BLOCK_K), _to_out(g, gz_ptr),
                 mask=mask)


# =============================================================================================
# Launch plumbing
# =============================================================================================
def _launch(kernel, grid, args, constexprs, num_warps):
    first = next(a for a in args if isinstance(a, Tensor))
    if INTERPRETED:
        # The interpreter reads data pointers: nothing to do for fake/meta tensors (shape-only).
        if shape_only(*args):
            return
        with _device_guard(first):  # (num_warps: ignored, but recorded by the compile test)
            kernel[grid](*args, **constexprs, num_warps=num_warps)
    else:
        with _device_guard(first):
            torch.library.wrap_triton(kernel)[grid](*args, **constexprs, num_warps=num_warps)


_set_wrap_triton_enabled: Optional[Callable[[bool], Any]]
try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover (torch 2.6: eager launches then go through the wrapper)
    _set_wrap_triton_enabled = None


def direct(impl: Callable[..., Any]) -> Callable[..., Any]:
    """``impl`` (an op's implementation) made callable below torch.library in eager mode
    (backends.EagerOp): its launches go straight to Triton, as they do inside the registered
    op, instead of through torch's traceable wrapper (wrap_triton), which only tracing needs."""
    if INTERPRETED or _set_wrap_triton_enabled is None:
        return impl

    @functools.wraps(impl)
    def call(*args: Any) -> Any:
        with _set_wrap_triton_enabled(False):
            return impl(*args)
    return call


_MAX_K = getattr(tl, "TRITON_MAX_TENSOR_NUMEL", 1 << 20)


def _blocks(K: int) -> tuple[int, int, int]:
    block_k = triton.next_power_of_2(K)
    block_b = max(1, min(_MAX_BLOCK_B, _TILE // block_k))
    # Up to one row per thread (8 warps for 256 rows): with 4 warps each thread held 2 rows at
    # K <= 8 and twice the registers, which capped occupancy at 36 % / 30 % / 24 % (forward /
    # backward / loss) in Nsight Compute on an H200, with the schedulers idle 30-45 % of cycles.
    # sm_90 compile at K = 4 with packed rows (_row_offsets): 32 / 38 / 59 registers at one row
    # per thread; at two the loss needed over 100.
    num_warps = 8 if block_b * block_k >= 4096 or block_b >= 256 else 4
    return block_b, block_k, num_warps


def _packing(K: int, block_k: int, logits: Tensor) -> dict[str, bool]:
    """EVEN_K and Z_PACKED of a launch (see _row_offsets)."""
    return dict(EVEN_K=K == block_k, Z_PACKED=_packed(K, block_k, logits))


def _packed(K: int, block_k: int, t: Optional[Tensor]) -> bool:
    """Whether the [B, K] tensor t may be addressed as contiguous rows of BLOCK_K members:
    K == BLOCK_K and strides (K, 1) (a size-1 dimension's stride does not matter)."""
    if t is None or K != block_k:
        return False
    B = t.shape[0]
    return (K <= 1 or t.stride(1) == 1) and (B <= 1 or t.stride(0) == K)


def _fp32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 (hi = fl32(x)); ~48 bits of x survive."""
    x = float(x)
    hi = _fp32(x)
    lo = _fp32(x - hi) if math.isfinite(hi) else 0.0
    return hi, lo


def _check_logits(logits: Tensor, op: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [batch, members], got {logits.dim()}-D")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    torch._check_value(logits.shape[1] >= 1, lambda: f"{op}: logits needs at least one member (K >= 1)")
    # One program holds a [BLOCK_B, next_power_of_2(K)] tile: Triton's tensors end at 2^20.
    torch._check_value(logits.shape[1] <= _MAX_K, lambda: f"{op}: the triton backend handles at "
                       f"most {_MAX_K} members (K), got {logits.shape[1]}; use backend='cpu' "
                       f"or 'cuda'")


def _check_temperature(temperature: Tensor, logits: Tensor, op: str) -> None:
    if temperature.dim() != 0:
        raise ValueError(f"{op}: temperature must be a 0-dim tensor")
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"{op}: temperature must be floating point")
    if temperature.device != logits.device:
        raise ValueError(f"{op}: temperature must be on the device of logits ({logits.device}), "
                         f"got {temperature.device}")


def _check_rows(t: Tensor, logits: Tensor, name: str, op: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must have shape [{logits.shape[0]}], got {tuple(t.shape)}")
    torch._check_value(t.shape[0] == logits.shape[0],
                       lambda: f"{op}: {name} must have shape [{logits.shape[0]}], got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be floating point")
    if t.device != logits.device:
        raise ValueError(f"{op}: {name} must be on {logits.device}")


def _check_like_logits(t: Tensor, logits: Tensor, name: str, op: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must have shape {tuple(logits.shape)}, got {tuple(t.shape)}")
    torch._check_value(t.shape[0] == logits.shape[0] and t.shape[1] == logits.shape[1],
                       lambda: f"{op}: {name} must have shape {tuple(logits.shape)}, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be floating point")
    if t.device != logits.device:
        raise ValueError(f"{op}: {name} must be on {logits.device}")


# =============================================================================================
# Op implementations (also their fake implementations: shapes only, the launch is traced/skipped)
# =============================================================================================
def _confidence_fusion(
    logits: Tensor, temperature: Tensor, logit_space: bool, detach_weights: bool
) -> tuple[Tensor, Tensor]:
    # detach_weights does not change the forward values; it is in the schema for autograd.
    op = "confidence_fusion_triton"
    _check_logits(logits, op)
    _check_temperature(temperature, logits, op)
    B, K = logits.shape
    prob = torch.empty((B,), dtype=logits.dtype, device=logits.device)
    weights = torch.empty((B, K), dtype=logits.dtype, device=logits.device)
    if B > 0:
        block_b, block_k, num_warps = _blocks(K)
        _launch(
            _confidence_fusion_fwd_kernel,
            (triton.cdiv(B, block_b),),
            (logits, temperature, prob, weights, B, K, logits.stride(0), logits.stride(1)),
            dict(
                LOGIT_SPACE=bool(logit_space),
                IS_FP64=logits.dtype == torch.float64,
                BLOCK_B=block_b,
                BLOCK_K=block_k,
                **_packing(K, block_k, logits),
            ),
            num_warps,
        )
    return prob, weights


def _confidence_fusion_backward(
    grad_prob: Optional[Tensor],
    grad_weights: Optional[Tensor],
    logits: Tensor,
    temperature: Tensor,
    logit_space: bool,
    detach_weights: bool,
    compute_temperature_grad: bool,
) -> tuple[Tensor, Tensor]:
    op = "confidence_fusion_backward_triton"
    _check_logits(logits, op)
    _check_temperature(temperature, logits, op)
    if grad_prob is not None:
        _check_rows(grad_prob, logits, "grad_prob", op)
    if grad_weights is not None:
        _check_like_logits(grad_weights, logits, "grad_weights", op)
    B, K = logits.shape
    acc = _acc_dtype(logits.dtype)
    tgrad = bool(compute_temperature_grad) and not detach_weights
    grad_logits = torch.empty((B, K), dtype=logits.dtype, device=logits.device)
    gt_rows = torch.empty((B,), dtype=acc, device=logits.device) if tgrad else None
    if B > 0:
        block_b, block_k, num_warps = _blocks(K)
        # Absent inputs / unused outputs are passed as None (their pointers are never touched).
        _launch(
            _confidence_fusion_bwd_kernel,
            (triton.cdiv(B, block_b),),
            (
                grad_prob, grad_weights, logits, temperature, grad_logits, gt_rows, B, K,
                grad_prob.stride(0) if grad_prob is not None else 0,
                grad_weights.stride(0) if grad_weights is not None else 0,
                grad_weights.stride(1) if grad_weights is not None else 0,
                logits.stride(0), logits.stride(1),
            ),
            dict(
                HAS_GP=grad_prob is not None,
                HAS_GW=grad_weights is not None,
                LOGIT_SPACE=bool(logit_space),
                DETACH=bool(detach_weights),
                COMPUTE_TGRAD=tgrad,
                IS_FP64=logits.dtype == torch.float64,
                BLOCK_B=block_b,
                BLOCK_K=block_k,
                GW_PACKED=_packed(K, block_k, grad_weights),
                **_packing(K, block_k, logits),
            ),
            num_warps,
        )
    if gt_rows is not None:  # tgrad
        grad_temperature = gt_rows.sum()
    else:
        grad_temperature = torch.zeros((), dtype=acc, device=logits.device)
    return grad_logits, grad_temperature


def _collaborative_loss(
    logits: Tensor,
    labels: Tensor,
    temperature: Tensor,
    ensemble_weight: float,
    member_weight: float,
    distill_weight: float,
    mutual_weight: float,
    logit_space: bool,
    detach_weights: bool,
    reduction: int,
    compute_grad: bool,
    compute_temperature_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "collaborative_loss_triton"
    _check_logits(logits, op)
    _check_rows(labels, logits, "labels", op)
    _check_temperature(temperature, logits, op)
    if reduction not in tuple(Reduction):
        raise ValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    B, K = logits.shape
    dev = logits.device
    acc = _acc_dtype(logits.dtype)
    use_a, use_b = member_weight != 0, ensemble_weight != 0
    use_g, use_d = distill_weight != 0, mutual_weight != 0 and K > 1
    compute_grad = bool(compute_grad)
    tgrad_asked = compute_grad and bool(compute_temperature_grad)
    tgrad = tgrad_asked and use_b and not detach_weights  # else dloss/dtau is exactly 0

    loss_rows = torch.empty((B,), dtype=acc, device=dev)
    prob = torch.empty((B,), dtype=logits.dtype, device=dev)
    grad_logits = torch.empty((B, K) if compute_grad else (0,), dtype=logits.dtype, device=dev)
    # Unused outputs are passed as None (their pointers are never touched).
    gz_buf = grad_logits if compute_grad else None
    gt_rows = torch.empty((B,), dtype=acc, device=dev) if tgrad else None
    if B > 0:
        block_b, block_k, num_warps = _blocks(K)
        a_hi, a_lo = _split(member_weight)
        b_hi, b_lo = _split(ensemble_weight)
        g_hi, g_lo = _split(distill_weight)
        d_hi, d_lo = _split(mutual_weight)
        _launch(
            _collaborative_loss_kernel,
            (triton.cdiv(B, block_b),),
            (
                logits, labels, temperature, loss_rows, prob, gz_buf, gt_rows, B, K,
                logits.stride(0), logits.stride(1), labels.stride(0),
                a_hi, a_lo, b_hi, b_lo, g_hi, g_lo, d_hi, d_lo,
            ),
            dict(
                USE_A=use_a,
                USE_B=use_b,
                USE_G=use_g,
                USE_D=use_d,
                LOGIT_SPACE=bool(logit_space),
                DETACH=bool(detach_weights),
                COMPUTE_GRAD=compute_grad,
                COMPUTE_TGRAD=tgrad,
                NEED_LOGS=use_b or use_g,
                IS_FP64=logits.dtype == torch.float64,
                BLOCK_B=block_b,
                BLOCK_K=block_k,
                **_packing(K, block_k, logits),
            ),
            num_warps,
        )

    if reduction == Reduction.NONE:
        loss = loss_rows
    elif reduction == Reduction.SUM:
        loss = loss_rows.sum()
    else:
        # one reduction launch (mean), not a sum and a division
        loss = loss_rows.mean() if B > 0 else torch.zeros((), dtype=acc, device=dev)

    if gt_rows is not None:  # tgrad
        grad_temperature = gt_rows if reduction == Reduction.NONE else gt_rows.sum()
    elif tgrad_asked and reduction == Reduction.NONE:
        grad_temperature = torch.zeros((B,), dtype=acc, device=dev)
    else:
        grad_temperature = torch.zeros((), dtype=acc, device=dev)
    return loss, prob, grad_logits, grad_temperature


# =============================================================================================
# Registration
# =============================================================================================
#: The implementation of each op registered here and in kdef.py, by op name, made
#: :func:`direct`: what backends.EagerOp calls in eager mode.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}


def _register(name: str, fn):
    qualname = f"cetnet::{name}"
    IMPLEMENTATIONS[name] = direct(fn)
    if INTERPRETED:
        # Interpreted kernels cannot be captured by wrap_triton: an opaque custom op whose fake
        # implementation is the same function (the launch is skipped for fake/meta tensors).
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
    else:
        # triton_op registers `fn` itself as the fake implementation and decomposes the op into
        # the traced kernel launches under torch.compile.
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    return op


confidence_fusion_triton = _register("confidence_fusion_triton", _confidence_fusion)
confidence_fusion_backward_triton = _register(
    "confidence_fusion_backward_triton", _confidence_fusion_backward
)
collaborative_loss_triton = _register("collaborative_loss_triton", _collaborative_loss)
