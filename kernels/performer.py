"""Triton kernels of ``performer_attention`` (contract: ``t2t_fast/ops/performer.py``).

The random features are recomputed on the fly in float32 and never written to memory. The kernels work in
base 2: with w2 = w log2(e), a_tj = (k_t.w2_j - |k_t|^2 log2(e)/2) and b_tj likewise for q (the logits of the
contract times log2(e)), every exponential is one exp2. Per (b, h), the T tokens are split into chunks (one
program each) walked in tiles of BLOCK_T tokens.

forward
  1. ``_kv_partial_kernel``: per chunk, its max of a and S^T = sum_t v_t exp2(a_t - max) (d x m, so the
     tensor-core tile's rows are the d columns of v), z = sum_t exp2(a_t - max) (m), rescaled online tile by
     tile.
  2. ``_combine_kernel``: per (b, h), kmax = max over chunks and kv, ksum = sum of the chunk partials rescaled
     to kmax (a fixed-order loop: deterministic, no atomics).
  3. ``_attend_kernel``: per chunk, qmax_t, Bq = exp2(b - qmax), y = Bq kv / denom. |q_t|^2 cancels from Bq
     (qmax holds it too), so it only enters the eps term.
backward (Bq as above, A = exp2(a - kmax); qmax and kmax cancel from the function, so they are constants).
With G = dy kv^T (T x m) the row dy.y is sum_j Bq_tj G_tj / den_t, so y is never recomputed:
  1. ``_query_grad_kernel``: r = rowsum(Bq * G), E = (G - r/den z) * Bq, dq = (E w - q rowsum(E)) / den;
     chunk partials of dS^T = dy^T (Bq / den) and dz = -sum_t Bq r / den^2.
  2. ``_combine_kernel`` sums the partials into dS, dz.
  3. ``_key_grad_kernel``: da = (v dS^T + dz) * A, dv = A dS, dk = da w - k rowsum(da).

Precision: float32 inputs run every product as three tf32 products (tf32x3), which the 1e-5 accuracy needs;
so do float16 inputs (widened to float32), whose range cannot hold every w's high and low parts. bfloat16
inputs feed the tensor cores in bf16: the logits x.w^T as two products against w split into a bf16 high and
low part, the features and the float32 statistics rounded to bf16 for the other products (float32
accumulation throughout).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from t2t_fast.runtime import cdiv, empty, first_exceeded, next_power_of_2, triton_interpret

# The largest head width, number of features and padded d x m (powers of two) whose tiles (tokens x d, tokens x m,
# w, kv) fit one sm_90 CTA without spilling (tests/test_performer_sm90.py); ``verify`` refuses the rest.
MAX_D = 128
MAX_M = 64
MAX_TILE = 4096
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COMBINE_BLOCK = 1024
# The logit products x.w^T, by input dtype: one tf32x3 product (float32, float16), or two bf16 products against
# w's high and low parts (bfloat16).
_X3, _BF16_SPLIT = 0, 1


@triton.jit
def _load_rows(ptr, stride_t, stride_d, t0, T, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows t0..t0+BLOCK_T of a (T, D) strided matrix in its dtype, zero-padded to (BLOCK_T, BLOCK_D); also the
    row mask."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    x = tl.load(ptr + t[:, None].to(tl.int64) * stride_t + d[None, :] * stride_d,
                mask=t_ok[:, None] & (d[None, :] < D), other=0.0)
    return x, t_ok


@triton.jit
def _store_rows(ptr, x, t0, T, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (BLOCK_T, BLOCK_D) tile into rows t0.. of a contiguous (T, D) matrix, in its dtype."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tl.store(ptr + t[:, None].to(tl.int64) * D + d[None, :], x.to(ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _load_mat(ptr, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              TRANS: tl.constexpr):
    """A contiguous float32 (R, C) matrix zero-padded to (BLOCK_R, BLOCK_C), or its transpose if TRANS."""
    if TRANS:
        c = tl.arange(0, BLOCK_C)[:, None]
        r = tl.arange(0, BLOCK_R)[None, :]
    else:
        r = tl.arange(0, BLOCK_R)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
    return tl.load(ptr + r * C + c, mask=(r < R) & (c < C), other=0.0)


@triton.jit
def _load_vec(ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """A contiguous float32 vector of length N padded with zeros to BLOCK."""
    return tl.load(ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < N, other=0.0)


@triton.jit
def _op(x, OP: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 x as a tensor-core operand of dtype OP. EMULATE_BF16 (the interpreter has no bf16 arithmetic):
    x rounded to bf16 (nearest even) but kept in float32, so interpreted runs see the GPU's rounding."""
    if EMULATE_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(OP)


@triton.jit
def _in_op(x, OP: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """A tile x loaded in the input dtype as a tensor-core operand of dtype OP (exact: OP is that dtype, or
    float32 under EMULATE_BF16)."""
    if EMULATE_BF16:
        return x.to(tl.float32)
    else:
        return x.to(OP)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b + acc with float32 accumulation; PREC applies to float32 operands."""
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_w(w_ptr, sw_m, sw_d, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
            LOGIT: tl.constexpr, OP: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """w * log2(e) (BLOCK_M, BLOCK_D), zero-padded, as (hi, lo) operands of the logit products (see _X3); lo is
    unused by _X3."""
    j = tl.arange(0, BLOCK_M)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    w = tl.load(w_ptr + j * sw_m + d * sw_d, mask=(j < M) & (d < D), other=0.0) * 1.4426950408889634
    if LOGIT == 1:
        hi = _op(w, OP, EMULATE_BF16)
        lo = _op(w - hi.to(tl.float32), OP, EMULATE_BF16)
    else:
        hi = w
        lo = w
    return hi, lo


@triton.jit
def _xw(x, w_hi, w_lo, LOGIT: tl.constexpr, PREC: tl.constexpr, OP: tl.constexpr, EMULATE_BF16: tl.constexpr,
        M: tl.constexpr, BLOCK_M: tl.constexpr):
    """x.w2^T (BLOCK_T, BLOCK_M) float32 of a tile x in its dtype, -inf at padded features."""
    xo = _in_op(x, OP, EMULATE_BF16)
    if LOGIT == 1:
        dot = tl.dot(xo, tl.trans(w_lo), tl.dot(xo, tl.trans(w_hi)))
    else:
        dot = tl.dot(xo, tl.trans(w_hi), input_precision=PREC)
    if M < BLOCK_M:
        dot = tl.where((tl.arange(0, BLOCK_M) < M)[None, :], dot, float("-inf"))
    return dot


@triton.jit
def _half_norm(x, row_ok, MASK_ROWS: tl.constexpr):
    """|x|^2 log2(e)/2 per row of a tile x in its dtype; +inf, when MASK_ROWS, at rows where row_ok is false."""
    xf = x.to(tl.float32)
    half_norm = 0.7213475204444817 * tl.sum(xf * xf, axis=1)
    if MASK_ROWS:
        half_norm = tl.where(row_ok, half_norm, float("inf"))
    return half_norm


@triton.jit
def _feature_grad(g, x, scale, w_hi, w_lo, LOGIT: tl.constexpr, PREC: tl.constexpr, OP: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    """((g @ w2) ln(2) - x rowsum(g)) scale (BLOCK_T, BLOCK_D) float32: the gradient through the logits
    x.w^T - |x|^2/2 of a float32 (BLOCK_T, BLOCK_M) tile g of d/dlogits, x the tile in its dtype, scale a
    (BLOCK_T,) row factor; w split as for the logits."""
    if LOGIT == 1:
        # x's term starts the products' accumulator: no second (tokens x d) float32 tile in registers
        g16 = _op(g, OP, EMULATE_BF16)
        acc = x.to(tl.float32) * (-1.4426950408889634 * tl.sum(g, axis=1))[:, None]
        return tl.dot(g16, w_lo, tl.dot(g16, w_hi, acc)) * (0.6931471805599453 * scale)[:, None]
    else:
        return tl.dot(g, w_hi, input_precision=PREC) * (0.6931471805599453 * scale)[:, None] \
            - x.to(tl.float32) * (tl.sum(g, axis=1) * scale)[:, None]


@triton.jit
def _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T: tl.constexpr):
    """Program ``pid`` -> (b, h, b*H + h) as int64, first row and tile count of its chunk of T."""
    bh = pid // n_chunks
    t_start = (pid % n_chunks) * tiles_per_chunk * BLOCK_T
    n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(T - t_start, BLOCK_T))
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), t_start, n_tiles


@triton.jit
def _store_partial(part_ptr, pid, st, z, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Row ``pid`` of a (programs, M*D + M) buffer: S (M, D) row-major from its transpose st (BLOCK_D, BLOCK_M),
    then z (M)."""
    d = tl.arange(0, BLOCK_D)[:, None]
    j = tl.arange(0, BLOCK_M)[None, :]
    base = part_ptr + pid.to(tl.int64) * (M * D + M)
    tl.store(base + j * D + d, st, mask=(j < M) & (d < D))
    tl.store(base + M * D + tl.arange(0, BLOCK_M), z, mask=tl.arange(0, BLOCK_M) < M)


@triton.jit
def _kv_partial_kernel(k_ptr, v_ptr, w_ptr, part_ptr, pmax_ptr,
                       H, T, n_chunks, tiles_per_chunk,
                       sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sw_m, sw_d,
                       D: tl.constexpr, M: tl.constexpr, LOGIT: tl.constexpr, PREC: tl.constexpr,
                       OP: tl.constexpr, EMULATE_BF16: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    b, h, _, t_start, n_tiles = _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    w_hi, w_lo = _load_w(w_ptr, sw_m, sw_d, M, D, BLOCK_M, BLOCK_D, LOGIT, OP, EMULATE_BF16)

    st = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
    z = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)  # summed over its rows once, after the loop
    run_max = tl.max(tl.full((BLOCK_M,), float("-inf"), tl.float32), axis=0)  # a -inf fp32 scalar
    for i in range(n_tiles):  # the first tile holds a valid row, so run_max is finite from then on
        t0 = t_start + i * BLOCK_T
        k, t_ok = _load_rows(k_ptr, sk_t, sk_d, t0, T, D, BLOCK_T, BLOCK_D)
        a = _xw(k, w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16, M, BLOCK_M) - _half_norm(k, t_ok, True)[:, None]
        new_max = tl.maximum(run_max, tl.max(tl.max(a, axis=1), axis=0))
        alpha = tl.exp2(run_max - new_max)
        p = tl.exp2(a - new_max)
        v = _load_rows(v_ptr, sv_t, sv_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        po = _op(p, OP, EMULATE_BF16)
        st = _dot(tl.trans(_in_op(v, OP, EMULATE_BF16)), po, st * alpha, PREC)
        z = z * alpha + po.to(tl.float32)  # the features kv sums (rounded to OP): y is exactly v for one token
        run_max = new_max

    _store_partial(part_ptr, pid, st, tl.sum(z, axis=0), M, D, BLOCK_M, BLOCK_D)
    tl.store(pmax_ptr + pid, run_max * 0.6931471805599453)


@triton.jit
def _combine_kernel(part_ptr, pmax_ptr, s_ptr, z_ptr, max_ptr, M, D, n_chunks, n_blocks,
                    SHIFTED: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the n_chunks partial rows (M*D + M) of each (b, h) in chunk order into s (M, D) and z (M).

    SHIFTED: each partial carries its own max in pmax; rescale them to the overall max, stored to max_ptr.
    """
    pid = tl.program_id(0)
    bh = pid // n_blocks
    L = M * D + M
    offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    rows = part_ptr + bh.to(tl.int64) * n_chunks * L + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if SHIFTED:
        top = tl.load(pmax_ptr + bh * n_chunks)
        for c in range(1, n_chunks):
            top = tl.maximum(top, tl.load(pmax_ptr + bh * n_chunks + c))
        for c in range(n_chunks):
            scale = tl.exp(tl.load(pmax_ptr + bh * n_chunks + c) - top)
            acc += tl.load(rows + c * L, mask=ok, other=0.0) * scale
        tl.store(max_ptr + bh, top, mask=pid % n_blocks == 0)
    else:
        for c in range(n_chunks):
            acc += tl.load(rows + c * L, mask=ok, other=0.0)
    in_s = offs < M * D
    tl.store(s_ptr + bh.to(tl.int64) * M * D + offs, acc, mask=ok & in_s)
    tl.store(z_ptr + bh.to(tl.int64) * M + offs - M * D, acc, mask=ok & ~in_s)


@triton.jit
def _attend_kernel(q_ptr, w_ptr, kv_ptr, ksum_ptr, kmax_ptr, y_ptr, den_ptr,
                   H, T, n_chunks, tiles_per_chunk, eps_log2, eps_sign,
                   sq_b, sq_h, sq_t, sq_d, sw_m, sw_d,
                   D: tl.constexpr, M: tl.constexpr, LOGIT: tl.constexpr, PREC: tl.constexpr,
                   OP: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    b, h, bh, t_start, n_tiles = _chunk(tl.program_id(0), H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    q_ptr += b * sq_b + h * sq_h
    y_ptr += bh * T * D
    den_ptr += bh * T
    w_hi, w_lo = _load_w(w_ptr, sw_m, sw_d, M, D, BLOCK_M, BLOCK_D, LOGIT, OP, EMULATE_BF16)
    s = _op(_load_mat(kv_ptr + bh * M * D, M, D, BLOCK_M, BLOCK_D, False), OP, EMULATE_BF16)
    z = _load_vec(ksum_ptr + bh * M, M, BLOCK_M)
    eps_log2 -= tl.load(kmax_ptr + bh) * 1.4426950408889634

    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        q, t_ok = _load_rows(q_ptr, sq_t, sq_d, t0, T, D, BLOCK_T, BLOCK_D)
        # the row's |q|^2 cancels from Bq = exp2(b - qmax); it stays in qmax for the eps term
        bl = _xw(q, w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16, M, BLOCK_M)
        bmax = tl.max(bl, axis=1)
        bq = tl.exp2(bl - bmax[:, None])
        den = tl.sum(bq * z[None, :], axis=1) \
            + eps_sign * tl.exp2(eps_log2 - bmax + _half_norm(q, t_ok, False))
        y = _dot(_op(bq, OP, EMULATE_BF16), s, None, PREC) * (1.0 / den)[:, None]
        _store_rows(y_ptr, y, t0, T, D, BLOCK_T, BLOCK_D)
        tl.store(den_ptr + t0 + tl.arange(0, BLOCK_T), den, mask=t_ok)


@triton.jit
def _query_grad_kernel(dy_ptr, q_ptr, w_ptr, kv_ptr, ksum_ptr, den_ptr, dq_ptr, part_ptr,
                       H, T, n_chunks, tiles_per_chunk,
                       sg_b, sg_h, sg_t, sg_d, sq_b, sq_h, sq_t, sq_d, sw_m, sw_d,
                       D: tl.constexpr, M: tl.constexpr, LOGIT: tl.constexpr, PREC: tl.constexpr,
                       OP: tl.constexpr, EMULATE_BF16: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    b, h, bh, t_start, n_tiles = _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    dy_ptr += b * sg_b + h * sg_h
    q_ptr += b * sq_b + h * sq_h
    den_ptr += bh * T
    dq_ptr += bh * T * D
    w_hi, w_lo = _load_w(w_ptr, sw_m, sw_d, M, D, BLOCK_M, BLOCK_D, LOGIT, OP, EMULATE_BF16)
    st = _op(_load_mat(kv_ptr + bh * M * D, M, D, BLOCK_M, BLOCK_D, True), OP, EMULATE_BF16)  # S^T
    z = _load_vec(ksum_ptr + bh * M, M, BLOCK_M)

    dst = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
    dz = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)  # summed over its rows once, after the loop
    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        q, t_ok = _load_rows(q_ptr, sq_t, sq_d, t0, T, D, BLOCK_T, BLOCK_D)
        bl = _xw(q, w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16, M, BLOCK_M)
        bq = tl.exp2(bl - tl.max(bl, axis=1)[:, None])  # |q|^2 cancels
        rden = 1.0 / tl.load(den_ptr + t0 + tl.arange(0, BLOCK_T), mask=t_ok, other=1.0)
        dy = _load_rows(dy_ptr, sg_t, sg_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        dyo = _in_op(dy, OP, EMULATE_BF16)
        g = _dot(dyo, st, None, PREC)  # dy kv^T
        r_den = tl.sum(bq * g, axis=1) * rden  # dy . y
        e = (g - r_den[:, None] * z[None, :]) * bq
        bq_den = bq * rden[:, None]
        dst = _dot(tl.trans(dyo), _op(bq_den, OP, EMULATE_BF16), dst, PREC)
        dz -= bq_den * r_den[:, None]
        dq = _feature_grad(e, q, rden, w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16)
        _store_rows(dq_ptr, dq, t0, T, D, BLOCK_T, BLOCK_D)

    _store_partial(part_ptr, pid, dst, tl.sum(dz, axis=0), M, D, BLOCK_M, BLOCK_D)


@triton.jit
def _key_grad_kernel(k_ptr, v_ptr, w_ptr, ds_ptr, dz_ptr, kmax_ptr, dk_ptr, dv_ptr,
                     H, T, n_chunks, tiles_per_chunk,
                     sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sw_m, sw_d,
                     D: tl.constexpr, M: tl.constexpr, LOGIT: tl.constexpr, PREC: tl.constexpr,
                     OP: tl.constexpr, EMULATE_BF16: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    b, h, bh, t_start, n_tiles = _chunk(tl.program_id(0), H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    dk_ptr += bh * T * D
    dv_ptr += bh * T * D
    w_hi, w_lo = _load_w(w_ptr, sw_m, sw_d, M, D, BLOCK_M, BLOCK_D, LOGIT, OP, EMULATE_BF16)
    ds = _op(_load_mat(ds_ptr + bh * M * D, M, D, BLOCK_M, BLOCK_D, False), OP, EMULATE_BF16)
    # da's two terms, v dS^T and dz, cancel (exactly, for one token): in bf16 dS^T enters as two operands
    dst32 = _load_mat(ds_ptr + bh * M * D, M, D, BLOCK_M, BLOCK_D, True)
    dst = _op(dst32, OP, EMULATE_BF16)
    dst_lo = _op(dst32 - dst.to(tl.float32), OP, EMULATE_BF16)
    dz = _load_vec(dz_ptr + bh * M, M, BLOCK_M)
    kmax2 = tl.load(kmax_ptr + bh) * 1.4426950408889634

    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        k, t_ok = _load_rows(k_ptr, sk_t, sk_d, t0, T, D, BLOCK_T, BLOCK_D)
        v = _load_rows(v_ptr, sv_t, sv_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        ak = tl.exp2(_xw(k, w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16, M, BLOCK_M)
                     - (_half_norm(k, t_ok, True) + kmax2)[:, None])
        _store_rows(dv_ptr, _dot(_op(ak, OP, EMULATE_BF16), ds, None, PREC), t0, T, D, BLOCK_T, BLOCK_D)
        vo = _in_op(v, OP, EMULATE_BF16)
        if LOGIT == 1:
            vds = _dot(vo, dst_lo, _dot(vo, dst, None, PREC), PREC)
        else:
            vds = _dot(vo, dst, None, PREC)
        da = (vds + dz[None, :]) * ak
        if LOGIT == 1:  # bf16: k reloaded (an L1/L2 hit) holds no registers across the products above
            k = _load_rows(k_ptr, sk_t, sk_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        dk = _feature_grad(da, k, tl.full((BLOCK_T,), 1.0, tl.float32), w_hi, w_lo, LOGIT, PREC, OP, EMULATE_BF16)
        _store_rows(dk_ptr, dk, t0, T, D, BLOCK_T, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
class _Config(NamedTuple):
    """Tile sizes, warps and CTAs per SM of one (d, m, dtype)."""
    block_t: int
    block_d: int
    block_m: int
    num_warps: int
    num_stages: int
    fwd_ctas: int  # CTAs per SM the forward kernels' registers and shared memory allow (sm_90 compile test)
    bwd_ctas: int  # the same for the query-gradient kernel (and the chunking of its dS, dz partials)
    key_ctas: int  # the same for the key-gradient kernel, which writes no partials: it chunks T by its own count


def _config(d: int, m: int, dtype: torch.dtype) -> _Config:
    """Tiles for head width d, m features, the input dtype (``verify`` refuses m past MAX_M, d x m past MAX_TILE).

    bfloat16: 64-token tiles (one warpgroup's wgmma rows) while the padded d x m is at most 2048 and d <= 64,
    32-token tiles (mma.sync) up to MAX_TILE, so that the (tokens x d) and (tokens x m) float32 tiles, w's two
    parts and kv stay within registers and shared memory. float32 and float16 (tf32x3 splits every operand in
    two): 16-token tiles, which hold them without spilling; past that a second group of warps shares them. CTAs
    per SM as compiled for sm_90 (registers, shared memory; tests/test_performer_sm90.py checks them).
    """
    block_d = max(16, next_power_of_2(d))
    block_m = max(16, next_power_of_2(m))
    small = block_d * block_m <= 2048 and block_d <= 64
    if dtype == torch.float32:
        return _Config(16, block_d, block_m, 4 if small else 8, 2, 4 if small else 2, *(3 if small else 1,) * 2)
    if dtype == torch.float16:  # widening to float32 costs registers
        return _Config(16, block_d, block_m, 4 if small else 8, 2, 3 if small else 1, *(2 if small else 1,) * 2)
    if small:
        return _Config(64, block_d, block_m, 4, 2, 4, 3, 4)
    return _Config(32, block_d, block_m, 4, 2, 3, 2, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs, but still several chunks per (b, h) so the combine is exercised


class _Grid(NamedTuple):
    """The chunking of T shared by every launch of one call: programs = bh * n_chunks on grid axis 0."""
    tiles_per_chunk: int
    n_chunks: int
    programs: int
    combine_programs: int


def _grid(bh: int, T: int, m: int, d: int, block_t: int, ctas_per_sm: int, sm_count: int) -> _Grid:
    """Chunks of T per (b, h): about one wave of programs (ctas_per_sm on every SM), never more than fit, so no
    partial second wave; at least one tile each. Programs of the token kernels and of the combine lie on grid
    axis 0 (up to 2^31 - 1), the token blocks' index inside the program id."""
    n_tiles = cdiv(T, block_t)
    chunks_wanted = max(1, (ctas_per_sm * sm_count) // bh)
    tpc = cdiv(n_tiles, min(n_tiles, chunks_wanted))
    n_chunks = cdiv(n_tiles, tpc)
    return _Grid(tpc, n_chunks, bh * n_chunks, bh * cdiv(m * d + m, _COMBINE_BLOCK))


def _modes(dtype: torch.dtype, interp: bool) -> dict:
    """The constexprs that pick the products' precision for an input dtype (see the module docstring)."""
    if dtype == torch.bfloat16:
        return dict(LOGIT=_BF16_SPLIT, PREC="ieee", OP=tl.float32 if interp else tl.bfloat16,
                    EMULATE_BF16=interp)
    return dict(LOGIT=_X3, PREC="ieee" if interp else "tf32x3", OP=tl.float32, EMULATE_BF16=False)


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float) -> Optional[str]:
    """None when these kernels take the ``forward`` call (and its backward), else the limit it passes.

    Shapes only (arguments already checked by the front door): no launch, no allocation, traceable."""
    d, m = q.shape[-1], w.shape[0]
    tile = max(16, next_power_of_2(d)) * max(16, next_power_of_2(m))
    return first_exceeded(("d", d, MAX_D), ("m", m, MAX_M), ("padded d x m", tile, MAX_TILE))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float
           ) -> tuple[int, int, int, int, int]:
    if q.dtype not in DTYPES:
        raise TypeError(f"performer triton kernels: q, k, v must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"performer triton kernels: q, k, v must be (B, H, T, d), got shape {tuple(q.shape)}")
    reason = verify(q, k, v, w, eps)
    if reason is not None:
        raise ValueError(f"performer triton kernels: {reason}")
    B, H, T, d = q.shape
    return B, H, T, d, w.shape[0]


def _combine(part: torch.Tensor, pmax: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor,
             top: torch.Tensor | None, m: int, d: int, n_chunks: int, programs: int) -> None:
    shifted = pmax is not None
    _combine_kernel[(programs,)](part, pmax if shifted else part, s, z, top if shifted else z, m, d, n_chunks,
                                 programs // part.shape[0], SHIFTED=shifted, BLOCK=_COMBINE_BLOCK)


def _constexprs(d: int, m: int, dtype: torch.dtype, interp: bool) -> dict:
    """The token kernels' constexprs and launch options (num_warps, num_stages) for head width d, m features."""
    cfg = _config(d, m, dtype)
    return dict(D=d, M=m, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_modes(dtype, interp))


def _launch_args(q: torch.Tensor, w: torch.Tensor, ctas: str) -> tuple[_Grid, dict]:
    """The chunking planned for the CTAs per SM of ``_Config`` field ``ctas``, and the kernels' constexprs and
    launch options (planned once per shape: host time per call is a dictionary lookup)."""
    return _plan(tuple(q.shape), w.shape[0], q.dtype, ctas, _sm_count(q.device), triton_interpret())


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], m: int, dtype: torch.dtype, ctas: str, sm_count: int,
          interp: bool) -> tuple[_Grid, dict]:
    B, H, T, d = shape
    cfg = _config(d, m, dtype)
    return _grid(B * H, T, m, d, cfg.block_t, getattr(cfg, ctas), sm_count), _constexprs(d, m, dtype, interp)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, H, T, d), any strides, one dtype; w: (m, d).

    Returns y (B, H, T, d) in q's dtype, kv (B, H, m, d), ksum (B, H, m), kmax (B, H), denom (B, H, T), all
    statistics float32 (see ``t2t_fast/ops/performer.py``).
    """
    B, H, T, d, m = _check(q, k, v, w, eps)
    w = w.float()
    grid, consts = _launch_args(q, w, "fwd_ctas")
    dev, f32 = q.device, torch.float32
    bh, nc, tpc = B * H, grid.n_chunks, grid.tiles_per_chunk
    # eps * m * exp(-qmax - kmax) evaluated as sign * exp2(log2|eps m| - qmax2 - kmax2): no overflow of exp alone
    eps_log2 = math.log2(abs(eps) * m) if eps != 0 else float("-inf")
    eps_sign = -1.0 if eps < 0 else 1.0
    with _device_guard(dev):
        part = empty((bh, nc, m * d + m), f32, dev)
        pmax = empty((bh, nc), f32, dev)
        _kv_partial_kernel[(grid.programs,)](k, v, w, part, pmax, H, T, nc, tpc,
                                             *k.stride(), *v.stride(), *w.stride(), **consts)
        kv = empty((B, H, m, d), f32, dev)
        ksum = empty((B, H, m), f32, dev)
        kmax = empty((B, H), f32, dev)
        _combine(part, pmax, kv, ksum, kmax, m, d, nc, grid.combine_programs)

        y = empty((B, H, T, d), q.dtype, dev)
        denom = empty((B, H, T), f32, dev)
        _attend_kernel[(grid.programs,)](q, w, kv, ksum, kmax, y, denom, H, T, nc, tpc, eps_log2, eps_sign,
                                         *q.stride(), *w.stride(), **consts)
    return y, kv, ksum, kmax, denom


def backward(grad_y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
             kv: torch.Tensor, ksum: torch.Tensor, kmax: torch.Tensor, denom: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y, q, k, v: (B, H, T, d), any strides; w (m, d); kv, ksum, kmax, denom: ``forward``'s statistics.

    Returns grad_q, grad_k, grad_v: (B, H, T, d) in q's dtype.
    """
    B, H, T, d, m = _check(q, k, v, w, 0.0)
    w = w.float()
    kv, ksum, kmax, denom = (t.float().contiguous() for t in (kv, ksum, kmax, denom))
    grid, consts = _launch_args(q, w, "bwd_ctas")
    kgrid = _launch_args(q, w, "key_ctas")[0]
    dev, f32 = q.device, torch.float32
    bh, nc, tpc = B * H, grid.n_chunks, grid.tiles_per_chunk
    with _device_guard(dev):
        grad_q = empty((B, H, T, d), q.dtype, dev)
        part = empty((bh, nc, m * d + m), f32, dev)
        _query_grad_kernel[(grid.programs,)](grad_y, q, w, kv, ksum, denom, grad_q, part, H, T, nc, tpc,
                                             *grad_y.stride(), *q.stride(), *w.stride(), **consts)
        ds = empty((B, H, m, d), f32, dev)
        dz = empty((B, H, m), f32, dev)
        _combine(part, None, ds, dz, None, m, d, nc, grid.combine_programs)

        grad_k = empty((B, H, T, d), q.dtype, dev)
        grad_v = empty((B, H, T, d), q.dtype, dev)
        _key_grad_kernel[(kgrid.programs,)](k, v, w, ds, dz, kmax, grad_k, grad_v, H, T, kgrid.n_chunks,
                                            kgrid.tiles_per_chunk, *k.stride(), *v.stride(), *w.stride(), **consts)
    return grad_q, grad_k, grad_v

