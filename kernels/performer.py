"""Triton kernels of ``performer_attention`` (contract: ``t2t_fast/ops/performer.py``).

The random features are recomputed on the fly in float32 and never written to memory. With
a_tj = k_t.w_j - |k_t|^2/2 and b_tj = q_t.w_j - |q_t|^2/2:

forward
  1. ``_kv_partial_kernel``: per (b, h) and chunk of T, the chunk's max of a and S = sum_t exp(a_t - max) v_t
     (m x d), z = sum_t exp(a_t - max) (m), rescaled online tile by tile.
  2. ``_combine_kernel``: per (b, h), kmax = max over chunks and kv, ksum = sum of the chunk partials rescaled
     to kmax (a fixed-order loop: deterministic, no atomics).
  3. ``_attend_kernel``: per (b, h) and chunk, qmax_t, Bq = exp(b - qmax), y = Bq kv / denom.
backward (Bq as above, A = exp(a - kmax); qmax and kmax cancel from the function, so they are constants)
  1. ``_query_grad_kernel``: per (b, h) and chunk, recompute y, then dnum = dy/den, dden = -(dy.y)/den,
     db = (dnum kv^T + dden ksum) * Bq, dq = db w - q rowsum(db); chunk partials of dS = Bq^T dnum and
     dz = Bq^T dden.
  2. ``_combine_kernel`` sums the partials into dS, dz.
  3. ``_key_grad_kernel``: per (b, h) and chunk, da = (v dS^T + dz) * A, dv = A dS, dk = da w - k rowsum(da).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from t2t_fast.runtime import empty

MAX_D = 128
MAX_M = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COMBINE_BLOCK = 1024
# fp32 products on tensor cores as three tf32 products (hi*hi + hi*lo + lo*hi): fp32-level accuracy, which the
# exponentials of the features need; plain fp32 ("ieee") dots run on FMA units and spill registers here.
_DOT = tl.constexpr("tf32x3")


@triton.jit
def _load_rows(ptr, stride_t, stride_d, t0, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows t0..t0+BLOCK_T of a (T, D) strided matrix as float32, zero-padded to (BLOCK_T, BLOCK_D); also the
    row mask."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    x = tl.load(ptr + t[:, None].to(tl.int64) * stride_t + d[None, :] * stride_d,
                mask=t_ok[:, None] & (d[None, :] < D), other=0.0)
    return x.to(tl.float32), t_ok


@triton.jit
def _store_rows(ptr, x, t0, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (BLOCK_T, BLOCK_D) tile into rows t0.. of a contiguous (T, D) matrix, in its dtype."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tl.store(ptr + t[:, None].to(tl.int64) * D + d[None, :], x.to(ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _load_vec(ptr, N, BLOCK: tl.constexpr):
    """A contiguous float32 vector of length N padded with zeros to BLOCK."""
    return tl.load(ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < N, other=0.0)


@triton.jit
def _logits(x, w, row_ok, M, MASK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """x w^T - |x|^2/2 for a (BLOCK_T, BLOCK_D) tile x and (BLOCK_M, BLOCK_D) w, -inf at padded features and,
    when MASK_ROWS, at padded rows (else those rows hold the finite logits of x = 0)."""
    logit = tl.dot(x, tl.trans(w), input_precision=_DOT) - 0.5 * tl.sum(x * x, axis=1)[:, None]
    ok = (tl.arange(0, BLOCK_M) < M)[None, :]
    if MASK_ROWS:
        ok = ok & row_ok[:, None]
    return tl.where(ok, logit, float("-inf"))


@triton.jit
def _query_features(x, w, row_ok, M, BLOCK_M: tl.constexpr):
    """Bq = exp(b - qmax), qmax the row max of b, zero at padded rows and features. Returns (Bq, qmax)."""
    b = _logits(x, w, row_ok, M, False, BLOCK_M)  # finite row maxes, also on padded rows
    qmax = tl.max(b, axis=1)
    bq = tl.where(row_ok[:, None], tl.exp(b - qmax[:, None]), 0.0)
    return bq, qmax


@triton.jit
def _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T: tl.constexpr):
    """Program ``pid`` -> (b, h, b*H + h) as int64, first row and tile count of its chunk of T."""
    bh = pid // n_chunks
    t_start = (pid % n_chunks) * tiles_per_chunk * BLOCK_T
    n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(T - t_start, BLOCK_T))
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), t_start, n_tiles


@triton.jit
def _kv_partial_kernel(k_ptr, v_ptr, w_ptr, part_ptr, pmax_ptr,
                       H, T, D, M, n_chunks, tiles_per_chunk,
                       sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sw_m, sw_d,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    b, h, _, t_start, n_tiles = _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    w = _load_rows(w_ptr, sw_m, sw_d, 0, M, D, BLOCK_M, BLOCK_D)[0]

    s = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_max = tl.max(tl.full((BLOCK_M,), float("-inf"), tl.float32), axis=0)  # a -inf fp32 scalar
    for i in range(n_tiles):  # the first tile holds a valid row, so run_max is finite from then on
        t0 = t_start + i * BLOCK_T
        k, t_ok = _load_rows(k_ptr, sk_t, sk_d, t0, T, D, BLOCK_T, BLOCK_D)
        a = _logits(k, w, t_ok, M, True, BLOCK_M)
        new_max = tl.maximum(run_max, tl.max(tl.max(a, axis=1), axis=0))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(a - new_max)
        v = _load_rows(v_ptr, sv_t, sv_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        s = s * alpha + tl.dot(tl.trans(p), v, input_precision=_DOT)
        z = z * alpha + tl.sum(p, axis=0)
        run_max = new_max

    _store_partial(part_ptr, pid, s, z, M, D, BLOCK_M, BLOCK_D)
    tl.store(pmax_ptr + pid, run_max)


@triton.jit
def _store_partial(part_ptr, pid, s, z, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row ``pid`` of a (programs, M*D + M) buffer: s (M, D) row-major, then z (M)."""
    j = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    base = part_ptr + pid.to(tl.int64) * (M * D + M)
    tl.store(base + j[:, None] * D + d[None, :], s, mask=(j[:, None] < M) & (d[None, :] < D))
    tl.store(base + M * D + j, z, mask=j < M)


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
                   H, T, D, M, n_chunks, tiles_per_chunk, eps_log, eps_sign,
                   sq_b, sq_h, sq_t, sq_d, sw_m, sw_d,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    b, h, bh, t_start, n_tiles = _chunk(tl.program_id(0), H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    q_ptr += b * sq_b + h * sq_h
    y_ptr += bh * T * D
    den_ptr += bh * T
    w = _load_rows(w_ptr, sw_m, sw_d, 0, M, D, BLOCK_M, BLOCK_D)[0]
    s = _load_rows(kv_ptr + bh * M * D, D, 1, 0, M, D, BLOCK_M, BLOCK_D)[0]
    z = _load_vec(ksum_ptr + bh * M, M, BLOCK_M)
    kmax = tl.load(kmax_ptr + bh)

    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        q, t_ok = _load_rows(q_ptr, sq_t, sq_d, t0, T, D, BLOCK_T, BLOCK_D)
        bq, qmax = _query_features(q, w, t_ok, M, BLOCK_M)
        den = tl.sum(bq * z[None, :], axis=1) + eps_sign * tl.exp(eps_log - qmax - kmax)
        y = tl.dot(bq, s, input_precision=_DOT) / den[:, None]
        _store_rows(y_ptr, y, t0, T, D, BLOCK_T, BLOCK_D)
        tl.store(den_ptr + t0 + tl.arange(0, BLOCK_T), den, mask=t_ok)


@triton.jit
def _query_grad_kernel(dy_ptr, q_ptr, w_ptr, kv_ptr, ksum_ptr, den_ptr, dq_ptr, part_ptr,
                       H, T, D, M, n_chunks, tiles_per_chunk,
                       sg_b, sg_h, sg_t, sg_d, sq_b, sq_h, sq_t, sq_d, sw_m, sw_d,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    b, h, bh, t_start, n_tiles = _chunk(pid, H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    dy_ptr += b * sg_b + h * sg_h
    q_ptr += b * sq_b + h * sq_h
    den_ptr += bh * T
    dq_ptr += bh * T * D
    w = _load_rows(w_ptr, sw_m, sw_d, 0, M, D, BLOCK_M, BLOCK_D)[0]
    s = _load_rows(kv_ptr + bh * M * D, D, 1, 0, M, D, BLOCK_M, BLOCK_D)[0]
    z = _load_vec(ksum_ptr + bh * M, M, BLOCK_M)

    ds = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        q, t_ok = _load_rows(q_ptr, sq_t, sq_d, t0, T, D, BLOCK_T, BLOCK_D)
        bq = _query_features(q, w, t_ok, M, BLOCK_M)[0]
        den = tl.load(den_ptr + t0 + tl.arange(0, BLOCK_T), mask=t_ok, other=1.0)
        dy = _load_rows(dy_ptr, sg_t, sg_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        y = tl.dot(bq, s, input_precision=_DOT) / den[:, None]
        dnum = dy / den[:, None]
        dden = -tl.sum(dy * y, axis=1) / den
        db = (tl.dot(dnum, tl.trans(s), input_precision=_DOT) + dden[:, None] * z[None, :]) * bq
        dq = tl.dot(db, w, input_precision=_DOT) - q * tl.sum(db, axis=1)[:, None]
        _store_rows(dq_ptr, dq, t0, T, D, BLOCK_T, BLOCK_D)
        ds += tl.dot(tl.trans(bq), dnum, input_precision=_DOT)
        dz += tl.sum(bq * dden[:, None], axis=0)

    _store_partial(part_ptr, pid, ds, dz, M, D, BLOCK_M, BLOCK_D)


@triton.jit
def _key_grad_kernel(k_ptr, v_ptr, w_ptr, ds_ptr, dz_ptr, kmax_ptr, dk_ptr, dv_ptr,
                     H, T, D, M, n_chunks, tiles_per_chunk,
                     sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sw_m, sw_d,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    b, h, bh, t_start, n_tiles = _chunk(tl.program_id(0), H, T, n_chunks, tiles_per_chunk, BLOCK_T)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    dk_ptr += bh * T * D
    dv_ptr += bh * T * D
    w = _load_rows(w_ptr, sw_m, sw_d, 0, M, D, BLOCK_M, BLOCK_D)[0]
    ds = _load_rows(ds_ptr + bh * M * D, D, 1, 0, M, D, BLOCK_M, BLOCK_D)[0]
    dz = _load_vec(dz_ptr + bh * M, M, BLOCK_M)
    kmax = tl.load(kmax_ptr + bh)

    for i in range(n_tiles):
        t0 = t_start + i * BLOCK_T
        k, t_ok = _load_rows(k_ptr, sk_t, sk_d, t0, T, D, BLOCK_T, BLOCK_D)
        v = _load_rows(v_ptr, sv_t, sv_d, t0, T, D, BLOCK_T, BLOCK_D)[0]
        ak = tl.exp(_logits(k, w, t_ok, M, True, BLOCK_M) - kmax)
        dv = tl.dot(ak, ds, input_precision=_DOT)
        da = (tl.dot(v, tl.trans(ds), input_precision=_DOT) + dz[None, :]) * ak
        dk = tl.dot(da, w, input_precision=_DOT) - k * tl.sum(da, axis=1)[:, None]
        _store_rows(dk_ptr, dk, t0, T, D, BLOCK_T, BLOCK_D)
        _store_rows(dv_ptr, dv, t0, T, D, BLOCK_T, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
def _config(d: int, m: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_M, num_warps) for head width d and m features.

    16-row tiles keep the loop-invariant w and kv (both split in two for the tf32x3 dots, and replicated in
    every warp as mma B operands) in registers without spilling at d = 64, m = 32 (sm_90, checked with
    ptxas); past 64 x 32 a second group of warps shares them.
    """
    block_d = max(16, triton.next_power_of_2(d))
    block_m = max(16, triton.next_power_of_2(m))
    return 16, block_d, block_m, 4 if block_d * block_m <= 2048 else 8


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs, but still several chunks per (b, h) so the combine is exercised


def _tiles_per_chunk(n_tiles: int, bh: int, device: torch.device) -> int:
    """T-tiles per chunk of the chunked reductions: enough chunks for ~4 programs per SM, no more."""
    chunks_wanted = triton.cdiv(4 * _sm_count(device), bh)
    return triton.cdiv(n_tiles, min(n_tiles, chunks_wanted))


def _check(q: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dtype not in DTYPES:
        raise TypeError(f"performer triton kernels: q, k, v must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"performer triton kernels: q, k, v must be (B, H, T, d), got shape {tuple(q.shape)}")
    B, H, T, d = q.shape
    m = w.shape[0]
    if d > MAX_D:
        raise ValueError(f"performer triton kernels: head width d must be <= {MAX_D}, got {d}")
    if m > MAX_M:
        raise ValueError(f"performer triton kernels: the number of random features m (w.shape[0]) must be "
                         f"<= {MAX_M}, got {m}")
    return B, H, T, d, m


def _combine(part: torch.Tensor, pmax: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor,
             top: torch.Tensor | None, m: int, d: int, n_chunks: int) -> None:
    bh = part.shape[0]
    n_blocks = triton.cdiv(m * d + m, _COMBINE_BLOCK)
    shifted = pmax is not None
    _combine_kernel[(bh * n_blocks,)](part, pmax if shifted else part, s, z, top if shifted else z, m, d,
                                      n_chunks, n_blocks, SHIFTED=shifted, BLOCK=_COMBINE_BLOCK)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, H, T, d), any strides, one dtype; w: (m, d).

    Returns y (B, H, T, d) in q's dtype, kv (B, H, m, d), ksum (B, H, m), kmax (B, H), denom (B, H, T), all
    statistics float32 (see ``t2t_fast/ops/performer.py``).
    """
    B, H, T, d, m = _check(q, w)
    w = w.float()
    block_t, block_d, block_m, warps = _config(d, m)
    dev, f32 = q.device, torch.float32
    bh = B * H
    n_tiles = triton.cdiv(T, block_t)
    tpc = _tiles_per_chunk(n_tiles, bh, dev)
    n_chunks = triton.cdiv(n_tiles, tpc)
    blocks = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=warps)

    part = empty((bh, n_chunks, m * d + m), f32, dev)
    pmax = empty((bh, n_chunks), f32, dev)
    _kv_partial_kernel[(bh * n_chunks,)](k, v, w, part, pmax, H, T, d, m, n_chunks, tpc,
                                         *k.stride(), *v.stride(), *w.stride(), **blocks)
    kv = empty((B, H, m, d), f32, dev)
    ksum = empty((B, H, m), f32, dev)
    kmax = empty((B, H), f32, dev)
    _combine(part, pmax, kv, ksum, kmax, m, d, n_chunks)

    y = empty((B, H, T, d), q.dtype, dev)
    denom = empty((B, H, T), f32, dev)
    # eps * m * exp(-qmax - kmax) evaluated as sign * exp(log|eps m| - qmax - kmax): no overflow of exp alone
    eps_log = math.log(abs(eps) * m) if eps != 0 else float("-inf")
    eps_sign = -1.0 if eps < 0 else 1.0
    _attend_kernel[(bh * n_chunks,)](q, w, kv, ksum, kmax, y, denom, H, T, d, m, n_chunks, tpc, eps_log, eps_sign,
                                     *q.stride(), *w.stride(), **blocks)
    return y, kv, ksum, kmax, denom


def backward(grad_y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
             kv: torch.Tensor, ksum: torch.Tensor, kmax: torch.Tensor, denom: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y, q, k, v: (B, H, T, d), any strides; w (m, d); kv, ksum, kmax, denom: ``forward``'s statistics.

    Returns grad_q, grad_k, grad_v: (B, H, T, d) in q's dtype.
    """
    B, H, T, d, m = _check(q, w)
    w = w.float()
    kv, ksum, kmax, denom = (t.float().contiguous() for t in (kv, ksum, kmax, denom))
    block_t, block_d, block_m, warps = _config(d, m)
    dev, f32 = q.device, torch.float32
    bh = B * H
    n_tiles = triton.cdiv(T, block_t)
    tpc = _tiles_per_chunk(n_tiles, bh, dev)
    n_chunks = triton.cdiv(n_tiles, tpc)
    blocks = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=warps)

    grad_q = empty((B, H, T, d), q.dtype, dev)
    part = empty((bh, n_chunks, m * d + m), f32, dev)
    _query_grad_kernel[(bh * n_chunks,)](grad_y, q, w, kv, ksum, denom, grad_q, part, H, T, d, m, n_chunks, tpc,
                                         *grad_y.stride(), *q.stride(), *w.stride(), **blocks)
    ds = empty((B, H, m, d), f32, dev)
    dz = empty((B, H, m), f32, dev)
    _combine(part, None, ds, dz, None, m, d, n_chunks)

    grad_k = empty((B, H, T, d), q.dtype, dev)
    grad_v = empty((B, H, T, d), q.dtype, dev)
    _key_grad_kernel[(bh * n_chunks,)](k, v, w, ds, dz, kmax, grad_k, grad_v, H, T, d, m, n_chunks, tpc,
                                       *k.stride(), *v.stride(), *w.stride(), **blocks)
    return grad_q, grad_k, grad_v


def verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float) -> str | None:
    """None when these kernels take the ``forward`` call (and its backward), else the limit it passes.

    Shapes only (arguments already checked by the front door): no launch, no allocation, traceable."""
    d, m = q.shape[-1], w.shape[0]
    if d > MAX_D:
        return f"d={d} exceeds {MAX_D}"
    if m > MAX_M:
        return f"m={m} exceeds {MAX_M}"
    return None
