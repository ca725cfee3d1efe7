"""Triton kernels of ``soft_split`` (unfold + optional LayerNorm + linear), contract in ``t2t_fast/ops/soft_split.py``.

Nothing here materializes the unfolded (B, L, K = C*kh*kw) tensor:

- weight preparation (one program per weight tile): ``W^T`` in the kernels' reduction order and dot dtype, for the forward with
  the LayerNorm's gamma folded in, plus ``W @ gamma`` (of the rounded product) and ``W @ beta + b``.
- forward: an implicit GEMM. A program owns a block of tokens and a block of output columns; it gathers each
  token's patch straight from ``x`` through its strides (zero padding by masks) and accumulates
  ``(x - s) @ (gamma * W)^T`` with ``tl.dot`` and, alongside, the per-token sums of ``x - s`` and ``(x - s)^2``.
  ``s`` is one element of the token's own patch (the centre tap of channel 0), so the variance keeps its
  precision when the mean is large against the spread. The LayerNorm is applied in the epilogue:
  ``y = rstd * (acc - d * (W @ gamma)) + W @ beta + b`` with ``d = mean - s``.
- backward, kernel 1 (grid: K chunk x out chunk x token group): regathers the patches and, per program, sums
  ``dW = dy^T @ (gamma * xhat + beta)``, ``db = sum dy``, and with ``g = dy @ W``: ``dgamma = sum g * xhat``,
  ``dbeta = sum g`` and the per-token partial sums ``sum_k gamma g xhat`` and ``sum_k gamma g`` of the LayerNorm
  backward. Every program writes its own partials; ``torch.sum`` reduces them (deterministic, no atomics).
- backward, kernel 2: ``grad_x`` by gathering, per input pixel, over the patches that cover it. Pixels are
  grouped by their residue modulo the stride, so a program only visits the taps that can reach its pixels;
  for one tap, a block of pixels x a block of channels needs ``dy[tokens] @ W[:, columns]``: one ``tl.dot``.

The reduction over the K patch columns runs in chunks of BK. For channel-first images a chunk is BK consecutive
columns of the channel-major order of ``F.unfold`` (c, i, j); when channels are the densest axis of ``x`` (a
(B, L, C) token tensor viewed as an image) and C >= 16, it is one tap (i, j) and BK consecutive channels, so the
gathers read contiguous memory and the masks are per token. fp32 inputs use 3xTF32 dots on the GPU (fp32-level
accuracy); fp16/bf16 use the tensor cores with fp32 accumulation. Under the Triton interpreter every operand is
upcast to fp32 (it mishandles bf16 arithmetic).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from t2t_fast.runtime import empty, triton_interpret

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 8192  # C*kh*kw: bounds the weight-gradient partial buffers
MAX_OUT = 4096
_INT32 = 2**31 - 1  # every element offset must fit the kernels' int32 index arithmetic
_PARTIAL_BYTES = 64 * 2**20  # cap on the weight-gradient partial buffer of the backward


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk(kc, C, KW, KHW, NCC, TAP_MAJOR: tl.constexpr, BK: tl.constexpr):
    """Chunk kc of the reduction -> (q: index in the reduction order, q_ok, channel c, tap row i, tap column j,
    k = c*kh*kw + i*kw + j: column of the weight). TAP_MAJOR: one tap (i, j are scalars) and BK channels out of
    NCC = cdiv(C, BK) chunks per tap, q = (i*kw + j)*C + c; otherwise BK consecutive columns, q = k."""
    if TAP_MAJOR:
        r = kc // NCC
        c = (kc % NCC) * BK + tl.arange(0, BK)
        q_ok = c < C
        q = r * C + c
        k = c * KHW + r
    else:
        q = kc * BK + tl.arange(0, BK)
        q_ok = q < C * KHW
        c = q // KHW
        r = q % KHW
        k = q
    return q, q_ok, c, r // KW, r % KW, k


@triton.jit
def _token_rows(rows, M, L, LW, SH, SW, PH, PW, sxb, sxh, sxw):
    """Token rows (flattened B*L) -> (in range, image row and column of tap (0, 0), offset of that pixel)."""
    b = rows // L
    t = rows % L
    h0 = (t // LW) * SH - PH
    w0 = (t % LW) * SW - PW
    return rows < M, h0, w0, b * sxb + h0 * sxh + w0 * sxw


@triton.jit
def _gather(x_ptr, row_ok, h0, w0, xrow, q_ok, c, i, j, H, W, sxc, sxh, sxw, TAP_MAJOR: tl.constexpr):
    """The (rows, chunk) tile of the unfolded tensor, read from x; padding reads as 0."""
    if TAP_MAJOR:
        hh = h0 + i
        ww = w0 + j
        in_ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        m = in_ok[:, None] & q_ok[None, :]
        ptrs = x_ptr + (xrow + i * sxh + j * sxw)[:, None] + (c * sxc)[None, :]
    else:
        hh = h0[:, None] + i[None, :]
        ww = w0[:, None] + j[None, :]
        m = row_ok[:, None] & q_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        ptrs = x_ptr + xrow[:, None] + (c * sxc + i * sxh + j * sxw)[None, :]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _prepare_weight_kernel(
    w_ptr, nw_ptr, nb_ptr, b_ptr, wt_ptr, coef_ptr,
    N, C, KW, KHW, NCC, swn, swk,
    SCALE: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, TAP_MAJOR: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (out block, chunk kc): wt[q, n] = W[n, k(q)] (times gamma[k] with SCALE) in wt's dtype. With
    SCALE also the chunk's partial sums coef[kc, 0, n] = sum_q wt[q, n] (the rounded products the forward's dot
    uses) and coef[kc, 1, n] = sum_q W[n, k(q)] beta[k(q)] (+ b[n] in chunk 0)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    kc = tl.program_id(1)
    col_ok = cols < N
    q, q_ok, c, i, j, k = _chunk(kc, C, KW, KHW, NCC, TAP_MAJOR, BK)
    m = q_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + k[:, None] * swk + cols[None, :] * swn, mask=m, other=0.0).to(tl.float32)
    if SCALE:
        wg = (w * tl.load(nw_ptr + k, mask=q_ok, other=0.0).to(tl.float32)[:, None]).to(wt_ptr.dtype.element_ty)
        tl.store(coef_ptr + kc * 2 * N + cols, tl.sum(wg.to(tl.float32), axis=0), mask=col_ok)
        w_beta = tl.zeros((BN,), dtype=tl.float32)
        if HAS_NORM_BIAS:
            w_beta += tl.sum(w * tl.load(nb_ptr + k, mask=q_ok, other=0.0).to(tl.float32)[:, None], axis=0)
        if HAS_BIAS:
            if kc == 0:
                w_beta += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(coef_ptr + (kc * 2 + 1) * N + cols, w_beta, mask=col_ok)
    else:
        wg = w.to(wt_ptr.dtype.element_ty)
    tl.store(wt_ptr + q[:, None] * N + cols[None, :], wg, mask=m)


@triton.jit
def _forward_kernel(
    x_ptr, wt_ptr, coef_ptr, cvec_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, L, LW, C, H, W, N, K, KW, KHW, SH, SW, PH, PW, NCC, NUM_CHUNKS, CI, CJ,
    sxb, sxc, sxh, sxw, eps,
    HAS_NORM: tl.constexpr, HAS_CVEC: tl.constexpr, TAP_MAJOR: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """y[rows, cols]: with HAS_NORM wt holds (gamma*W)^T, coef[cols] = W @ gamma; cvec is added (W @ beta + b
    with the norm, else the bias)."""
    pid_n = tl.program_id(0)  # the programs sharing a token block run together and share its gathers in L2
    pid_m = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok, h0, w0, xrow = _token_rows(rows, M, L, LW, SH, SW, PH, PW, sxb, sxh, sxw)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_NORM:
        # the shift: tap (CI, CJ) of channel 0, an element of the token's own patch (0 where it is padding)
        hs = h0 + CI
        ws = w0 + CJ
        s_ok = row_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        shift = tl.load(x_ptr + xrow + CI * sxh + CJ * sxw, mask=s_ok, other=0.0).to(tl.float32)
        s1 = tl.zeros((BM,), dtype=tl.float32)
        s2 = tl.zeros((BM,), dtype=tl.float32)
    for kc in range(0, NUM_CHUNKS):
        q, q_ok, c, i, j, k = _chunk(kc, C, KW, KHW, NCC, TAP_MAJOR, BK)
        a = _gather(x_ptr, row_ok, h0, w0, xrow, q_ok, c, i, j, H, W, sxc, sxh, sxw, TAP_MAJOR)
        wt = tl.load(wt_ptr + q[:, None] * N + cols[None, :], mask=q_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_NORM:
            # padding zeros are patch elements too: they centre to -shift
            a = tl.where(row_ok[:, None] & q_ok[None, :], a.to(tl.float32) - shift[:, None], 0.0)
            s1 += tl.sum(a, axis=1)
            s2 += tl.sum(a * a, axis=1)
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PREC)
    out = acc
    if HAS_NORM:
        d = s1 / K
        rstd = tl.rsqrt(tl.maximum(s2 / K - d * d, 0.0) + eps)
        out = rstd[:, None] * (acc - d[:, None] * tl.load(coef_ptr + cols, mask=col_ok, other=0.0)[None, :])
        if pid_n == 0:
            tl.store(mean_ptr + rows, shift + d, mask=row_ok)
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if HAS_CVEC:
        out += tl.load(cvec_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _backward_tokens_kernel(
    x_ptr, dy_ptr, wt_ptr, nw_ptr, nb_ptr, mean_ptr, rstd_ptr, part_ptr, stat_ptr,
    M, L, LW, C, H, W, N, K, KW, KHW, SH, SW, PH, PW, NCC,
    sxb, sxc, sxh, sxw, G, PART_ROW, NUM_N, NUM_KN,
    HAS_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, NEED_STATS: tl.constexpr, TAP_MAJOR: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (k chunk, out chunk, group g) sums over token blocks g, g+G, ... and writes its partials:
    part[g] = [dW (N*K) | db (N) | dgamma per out chunk (NUM_N*K) | dbeta per out chunk (NUM_N*K)];
    stat[s, k chunk * NUM_N + out chunk, token] = sum over its columns of gamma*g*xhat (s=0), gamma*g (s=1)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)
    q, q_ok, c, i, j, k = _chunk(pid_k, C, KW, KHW, NCC, TAP_MAJOR, BK)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    dw = tl.zeros((BN, BK), dtype=tl.float32)
    db = tl.zeros((BN,), dtype=tl.float32)
    if HAS_NORM:
        gam = tl.load(nw_ptr + k, mask=q_ok, other=0.0).to(tl.float32)
        if HAS_NORM_BIAS:
            bet = tl.load(nb_ptr + k, mask=q_ok, other=0.0).to(tl.float32)
        else:
            bet = tl.zeros((BK,), dtype=tl.float32)
        w = tl.trans(tl.load(wt_ptr + q[:, None] * N + cols[None, :], mask=q_ok[:, None] & col_ok[None, :],
                             other=0.0))  # (BN, BK)
        dgam = tl.zeros((BK,), dtype=tl.float32)
        dbet = tl.zeros((BK,), dtype=tl.float32)
    for blk in range(pid_g, tl.cdiv(M, BM), G):
        rows = blk * BM + tl.arange(0, BM)
        row_ok, h0, w0, xrow = _token_rows(rows, M, L, LW, SH, SW, PH, PW, sxb, sxh, sxw)
        a = _gather(x_ptr, row_ok, h0, w0, xrow, q_ok, c, i, j, H, W, sxc, sxh, sxw, TAP_MAJOR).to(tl.float32)
        dyt = tl.load(dy_ptr + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if pid_k == 0:
            db += tl.sum(dyt.to(tl.float32), axis=0)
        dyt = dyt.to(wt_ptr.dtype.element_ty)
        if HAS_NORM:
            mu = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rs = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = (a - mu[:, None]) * rs[:, None]
            a = xhat * gam[None, :] + bet[None, :]
            g = tl.dot(dyt, w, input_precision=PREC)  # (BM, BK): gradient of the normalized patch / gamma
            dgam += tl.sum(g * xhat, axis=0)
            dbet += tl.sum(g, axis=0)
            if NEED_STATS:
                gg = g * gam[None, :]
                srow = (pid_k * NUM_N + pid_n) * M + rows
                tl.store(stat_ptr + srow, tl.sum(gg * xhat, axis=1), mask=row_ok)
                tl.store(stat_ptr + NUM_KN * M + srow, tl.sum(gg, axis=1), mask=row_ok)
        dw = tl.dot(tl.trans(dyt), a.to(dyt.dtype), dw, input_precision=PREC)
    part = part_ptr + pid_g * PART_ROW
    tl.store(part + cols[:, None] * K + k[None, :], dw, mask=col_ok[:, None] & q_ok[None, :])
    if pid_k == 0:
        tl.store(part + N * K + cols, db, mask=col_ok)
    if HAS_NORM:
        tl.store(part + N * K + N + pid_n * K + k, dgam, mask=q_ok)
        tl.store(part + N * K + N + (NUM_N + pid_n) * K + k, dbet, mask=q_ok)


@triton.jit
def _backward_input_kernel(
    dy_ptr, wt_ptr, nw_ptr, x_ptr, mean_ptr, rstd_ptr, stat_ptr, dx_ptr,
    M, L, LH, LW, C, H, W, N, K, KH, KW, KHW, SH, SW, PH, PW, QC, QR,
    sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
    HAS_NORM: tl.constexpr, PREC: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
):
    """Program (pixel block, image * stride residue, channel block): grad_x of the pixels
    (rh + SH*u, rw + SW*v) of one image, summed over the taps (i, j) = (ti + SH*a, tj + SW*e) that reach them.
    wt[c*QC + (i*kw + j)*QR, n] = W[n, c*kh*kw + i*kw + j]; stat[0/1, token] = sum_k gamma*g*xhat, sum_k gamma*g."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_r // (SH * SW)
    rh = (pid_r // SW) % SH
    rw = pid_r % SW
    wr = (W - rw + SW - 1) // SW
    hr = (H - rh + SH - 1) // SH
    p = pid_p * BP + tl.arange(0, BP)
    p_ok = p < hr * wr
    uh = p // wr
    uw = p % wr
    h = rh + SH * uh
    w = rw + SW * uw
    ch = pid_c * BC + tl.arange(0, BC)
    c_ok = ch < C
    pix_ok = p_ok[:, None] & c_ok[None, :]
    if HAS_NORM:
        xv = tl.load(x_ptr + b * sxb + (h * sxh + w * sxw)[:, None] + ch[None, :] * sxc, mask=pix_ok,
                     other=0.0).to(tl.float32)
    ti = (rh + PH) % SH
    tj = (rw + PW) % SW
    # the pixel at h is reached by tap i = ti + SH*a of token row (rh + PH) // SH + uh - a
    oh0 = (rh + PH) // SH + uh
    ow0 = (rw + PW) // SW + uw
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for a in range(0, (KH - ti + SH - 1) // SH):
        oh = oh0 - a
        for e in range(0, (KW - tj + SW - 1) // SW):
            ow = ow0 - e
            tok_ok = p_ok & (oh >= 0) & (oh < LH) & (ow >= 0) & (ow < LW)
            row = b * L + oh * LW + ow
            r = (ti + SH * a) * KW + (tj + SW * e)
            g = tl.zeros((BP, BC), dtype=tl.float32)
            for n0 in range(0, N, BN):
                n = n0 + tl.arange(0, BN)
                n_ok = n < N
                dyt = tl.load(dy_ptr + row[:, None] * N + n[None, :], mask=tok_ok[:, None] & n_ok[None, :], other=0.0)
                wt = tl.load(wt_ptr + (ch * QC + r * QR)[:, None] * N + n[None, :], mask=c_ok[:, None] & n_ok[None, :],
                             other=0.0)  # (BC, BN)
                g = tl.dot(dyt.to(wt.dtype), tl.trans(wt), g, input_precision=PREC)
            if HAS_NORM:
                gam = tl.load(nw_ptr + ch * KHW + r, mask=c_ok, other=0.0).to(tl.float32)
                mu = tl.load(mean_ptr + row, mask=tok_ok, other=0.0)
                rs = tl.load(rstd_ptr + row, mask=tok_ok, other=0.0)
                c1 = tl.load(stat_ptr + row, mask=tok_ok, other=0.0) / K
                c2 = tl.load(stat_ptr + M + row, mask=tok_ok, other=0.0) / K
                xhat = (xv - mu[:, None]) * rs[:, None]
                g = rs[:, None] * (g * gam[None, :] - c2[:, None] - xhat * c1[:, None])
            acc += tl.where(tok_ok[:, None], g, 0.0)
    tl.store(dx_ptr + b * sdb + (h * sdh + w * sdw)[:, None] + ch[None, :] * sdc, acc.to(dx_ptr.dtype.element_ty),
             mask=pix_ok)


# ---------------------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _pair(v: Sequence[int], name: str, least: int) -> tuple[int, int]:
    if len(v) != 2 or any(not isinstance(e, int) or isinstance(e, bool) for e in v):
        raise ValueError(f"soft_split (triton): {name} must be two ints, got {v!r}")
    if min(v) < least:
        raise ValueError(f"soft_split (triton): {name} must be >= {least}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _extent(t: Tensor) -> int:
    """Largest element offset a kernel adds to t's data pointer."""
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


def _check_vector(t: Optional[Tensor], name: str, n: int, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or tuple(t.shape) != (n,) or not t.is_floating_point() or t.device != x.device:
        desc = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"soft_split (triton): {name} must be a floating ({n},) tensor on {x.device}, got {desc}")


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Geometry:
    """Validated shapes of one soft split and the reduction layout shared by forward and backward."""

    def __init__(self, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                 weight: Tensor):
        for name, t in (("x", x), ("weight", weight)):
            if not isinstance(t, Tensor):
                raise TypeError(f"soft_split (triton): {name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() != 4 or x.numel() == 0:
            raise ValueError(f"soft_split (triton): x must be a non-empty (B, C, H, W) tensor, got {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"soft_split (triton): x dtype must be one of {DTYPES}, got {x.dtype}")
        if not (x.is_cuda or (x.device.type == "cpu" and triton_interpret())):
            raise ValueError(f"soft_split (triton): x must be a CUDA tensor (or a CPU tensor under "
                             f"TRITON_INTERPRET=1), got a tensor on {x.device}")
        self.k = _pair(kernel_size, "kernel_size", 1)
        self.s = _pair(stride, "stride", 1)
        self.p = _pair(padding, "padding", 0)
        self.B, self.C, self.H, self.W = x.shape
        self.LH = (self.H + 2 * self.p[0] - self.k[0]) // self.s[0] + 1
        self.LW = (self.W + 2 * self.p[1] - self.k[1]) // self.s[1] + 1
        if self.LH < 1 or self.LW < 1:
            raise ValueError(f"soft_split (triton): image {self.H}x{self.W} is smaller than kernel_size {self.k} "
                             f"with padding {self.p}")
        self.L = self.LH * self.LW
        self.M = self.B * self.L
        self.KHW = self.k[0] * self.k[1]
        self.K = self.C * self.KHW
        if weight.dim() != 2 or weight.shape[1] != self.K:
            raise ValueError(f"soft_split (triton): weight must be (out, C*kh*kw) = (out, {self.K}), "
                             f"got {tuple(weight.shape)}")
        self.N = weight.shape[0]
        if weight.dtype != x.dtype or weight.device != x.device:
            raise ValueError(f"soft_split (triton): weight must have x's dtype and device ({x.dtype}, {x.device}), "
                             f"got {weight.dtype} on {weight.device}")
        if self.K > MAX_K:
            raise ValueError(f"soft_split (triton): C*kh*kw = {self.K} exceeds this kernel's limit {MAX_K}")
        if not 1 <= self.N <= MAX_OUT:
            raise ValueError(f"soft_split (triton): weight has {self.N} output features; this kernel takes "
                             f"1 to {MAX_OUT}")
        if max(_extent(x), _extent(weight), self.M * max(self.N, self.K)) > _INT32:
            raise ValueError("soft_split (triton): tensors too large for 32-bit indexing; split the batch")
        # tap-major chunks of BK channels when channels are x's densest axis (token tensors viewed as images)
        self.tap_major = self.C >= 16 and x.stride(1) < min(x.stride(2), x.stride(3))
        # the dot operands' dtype: fp32 under the interpreter, else x's
        self.dot_dtype = torch.float32 if triton_interpret() else x.dtype
        # 3xTF32 keeps fp32 accuracy on the tensor cores; only fp32 operands on a GPU look at it
        self.prec = "tf32x3" if self.dot_dtype == torch.float32 and not triton_interpret() else "tf32"

    def block_k(self, most: int) -> int:
        """Chunk width of the reduction: at most ``most``; in tap-major order no wider than C."""
        return min(most, 1 << (self.C.bit_length() - 1)) if self.tap_major else most

    def chunks(self, bk: int) -> tuple[int, int]:
        """(chunks per tap in tap-major order, number of chunks) for chunks of width bk."""
        ncc = triton.cdiv(self.C, bk)
        return ncc, self.KHW * ncc if self.tap_major else triton.cdiv(self.K, bk)

    def args(self, bk: int) -> tuple:
        """M, L, LW, C, H, W, N, K, KW, KHW, SH, SW, PH, PW, NCC of the kernels' signatures."""
        return (self.M, self.L, self.LW, self.C, self.H, self.W, self.N, self.K, self.k[1], self.KHW,
                self.s[0], self.s[1], self.p[0], self.p[1], self.chunks(bk)[0])

    def prepare_weight(self, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                       norm_bias: Optional[Tensor], scale: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(K, N) W^T in the reduction order and dot dtype (times gamma with ``scale``), and with ``scale``
        the (2, N) fp32 coefficients [W @ gamma, W @ beta + b]."""
        BN, BK = _pow2(self.N, 16, 64), self.block_k(32)
        ncc, num_chunks = self.chunks(BK)
        wt = torch.empty((self.K, self.N), dtype=self.dot_dtype, device=weight.device)
        coef = torch.empty((num_chunks, 2, self.N), dtype=torch.float32, device=weight.device) if scale else wt
        _prepare_weight_kernel[(triton.cdiv(self.N, BN), num_chunks)](
            weight, norm_weight if scale else weight, norm_bias if norm_bias is not None else weight,
            bias if bias is not None else weight, wt, coef,
            self.N, self.C, self.k[1], self.KHW, ncc, weight.stride(0), weight.stride(1),
            SCALE=scale, HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=bias is not None, TAP_MAJOR=self.tap_major,
            BN=BN, BK=BK, num_warps=4,
        )
        return wt, coef.sum(dim=0) if scale else None


def forward(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], weight: Tensor,
            bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, C, H, W), any strides; weight (out, K); bias (out,); norm_weight, norm_bias (K,).

    Returns y (B, L, out) in x.dtype and the LayerNorm's mean, rstd (B, L) fp32 ((0,) without norm_weight).
    """
    geo = _Geometry(x, kernel_size, stride, padding, weight)
    _check_vector(bias, "bias", geo.N, x)
    _check_vector(norm_weight, "norm_weight", geo.K, x)
    _check_vector(norm_bias, "norm_bias", geo.K, x)
    if norm_bias is not None and norm_weight is None:
        raise ValueError("soft_split (triton): norm_bias needs norm_weight")
    has_norm = norm_weight is not None
    wt, coef = geo.prepare_weight(weight, bias, norm_weight, norm_bias, scale=has_norm)
    y = empty((geo.B, geo.L, geo.N), x.dtype, x.device)
    stats = (geo.B, geo.L) if has_norm else (0,)
    mean = empty(stats, torch.float32, x.device)
    rstd = empty(stats, torch.float32, x.device)
    cvec = coef[1] if has_norm else bias
    # tile sizes chosen from compiled register counts on sm_90 (no spills); not yet tuned by timing
    half = geo.dot_dtype != torch.float32
    BM, BN, BK = 64, _pow2(geo.N, 16, 64), geo.block_k(64 if half else 32)
    _forward_kernel[(triton.cdiv(geo.N, BN), triton.cdiv(geo.M, BM))](
        x, wt, coef if has_norm else wt, cvec if cvec is not None else wt, y, mean, rstd,
        *geo.args(BK), geo.chunks(BK)[1], geo.k[0] // 2, geo.k[1] // 2, *x.stride(), float(eps),
        HAS_NORM=has_norm, HAS_CVEC=cvec is not None, TAP_MAJOR=geo.tap_major, PREC=geo.prec,
        BM=BM, BN=BN, BK=BK, num_warps=4 if half and geo.tap_major else 8,
    )
    return y, mean, rstd


def backward(grad_y: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             weight: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
             compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_y (B, L, out); x, weight, norm_weight, norm_bias as in ``forward``; mean, rstd what it returned.

    Returns grad_x (B, C, H, W) in x.dtype (or (0,) when not compute_grad_x), grad_weight (out, K) and
    grad_bias (out,) in weight.dtype, grad_norm_weight and grad_norm_bias (K,) fp32 ((0,) without norm_weight).
    """
    geo = _Geometry(x, kernel_size, stride, padding, weight)
    B, C, N, K, M = geo.B, geo.C, geo.N, geo.K, geo.M
    if not isinstance(grad_y, Tensor) or tuple(grad_y.shape) != (B, geo.L, N) or grad_y.dtype not in DTYPES \
            or grad_y.device != x.device:
        desc = f"{tuple(grad_y.shape)} {grad_y.dtype}" if isinstance(grad_y, Tensor) else type(grad_y).__name__
        raise ValueError(f"soft_split (triton): grad_y must be a ({B}, {geo.L}, {N}) floating tensor on {x.device}, "
                         f"got {desc}")
    _check_vector(norm_weight, "norm_weight", K, x)
    _check_vector(norm_bias, "norm_bias", K, x)
    has_norm = norm_weight is not None
    if norm_bias is not None and not has_norm:
        raise ValueError("soft_split (triton): norm_bias needs norm_weight")
    if has_norm:
        for name, t in (("mean", mean), ("rstd", rstd)):
            if tuple(t.shape) != (B, geo.L) or t.dtype != torch.float32 or t.device != x.device:
                raise ValueError(f"soft_split (triton): {name} must be ({B}, {geo.L}) fp32 on {x.device} (as forward "
                                 f"returns it with norm_weight), got {tuple(t.shape)} {t.dtype}")
        mean, rstd = mean.contiguous(), rstd.contiguous()
    dy = grad_y.contiguous()
    wt, _ = geo.prepare_weight(weight, None, None, None, scale=False)

    half = geo.dot_dtype != torch.float32
    BM, BN, BK = 64 if half else 32, _pow2(N, 16, 64), geo.block_k(32)
    num_k, num_n = geo.chunks(BK)[1], triton.cdiv(N, BN)
    num_kn = num_k * num_n
    part_row = N * K + N + (2 * num_n * K if has_norm else 0)
    target = 4 * _num_sms(x.device.index or 0) if x.is_cuda else 8
    groups = max(1, min(triton.cdiv(M, BM), target // num_kn, _PARTIAL_BYTES // (4 * part_row)))
    need_stats = has_norm and compute_grad_x
    if 2 * num_kn * M > _INT32:
        raise ValueError("soft_split (triton): too many tokens for 32-bit indexing of the backward; split the batch")
    part = empty((groups, part_row), torch.float32, x.device)
    stat = empty((2, num_kn, M), torch.float32, x.device) if need_stats else wt
    _backward_tokens_kernel[(num_k, num_n, groups)](
        x, dy, wt, norm_weight if has_norm else wt, norm_bias if norm_bias is not None else wt,
        mean if has_norm else wt, rstd if has_norm else wt, part, stat,
        *geo.args(BK), *x.stride(), groups, part_row, num_n, num_kn,
        HAS_NORM=has_norm, HAS_NORM_BIAS=norm_bias is not None, NEED_STATS=need_stats, TAP_MAJOR=geo.tap_major,
        PREC=geo.prec, BM=BM, BN=BN, BK=BK, num_warps=8,
    )
    total = part.sum(dim=0)
    grad_weight = empty((N, K), weight.dtype, x.device)
    grad_weight.copy_(total[:N * K].view(N, K))
    grad_bias = empty((N,), weight.dtype, x.device)
    grad_bias.copy_(total[N * K:N * K + N])
    norm_shape = (K,) if has_norm else (0,)
    grad_norm_weight = empty(norm_shape, torch.float32, x.device)
    grad_norm_bias = empty(norm_shape, torch.float32, x.device)
    if has_norm:
        norm_grads = total[N * K + N:].view(2, num_n, K).sum(dim=1)
        grad_norm_weight.copy_(norm_grads[0])
        grad_norm_bias.copy_(norm_grads[1])

    if not compute_grad_x:
        return empty((0,), x.dtype, x.device), grad_weight, grad_bias, grad_norm_weight, grad_norm_bias
    grad_x = empty((B, C, geo.H, geo.W), x.dtype, x.device)
    if need_stats:
        stat = stat.sum(dim=1)  # (2, M): per token sum_k gamma*g*xhat, sum_k gamma*g
    BP, BC, BN = 64, _pow2(C, 16, 64 if half else 32), _pow2(N, 16, 64)
    sh, sw = geo.s
    qc, qr = (1, C) if geo.tap_major else (geo.KHW, 1)
    grid = (triton.cdiv(triton.cdiv(geo.H, sh) * triton.cdiv(geo.W, sw), BP), B * sh * sw, triton.cdiv(C, BC))
    _backward_input_kernel[grid](
        dy, wt, norm_weight if has_norm else wt, x, mean if has_norm else wt, rstd if has_norm else wt, stat, grad_x,
        M, geo.L, geo.LH, geo.LW, C, geo.H, geo.W, N, K, geo.k[0], geo.k[1], geo.KHW, sh, sw, geo.p[0], geo.p[1],
        qc, qr, *x.stride(), *grad_x.stride(),
        HAS_NORM=has_norm, PREC=geo.prec, BP=BP, BC=BC, BN=BN, num_warps=8,
    )
    return grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias


def verify(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], weight: Tensor,
           bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
           eps: float) -> Optional[str]:
    """None when these kernels take the ``forward`` call (and its backward), else the limit it passes.

    Shapes only (arguments already checked by the front door): no launch, no allocation, traceable."""
    out, K = weight.shape
    if K > MAX_K:
        return f"C*kh*kw={K} exceeds {MAX_K}"
    if out > MAX_OUT:
        return f"out={out} exceeds {MAX_OUT}"
    B, _, H, W = x.shape
    tokens = B * ((H + 2 * padding[0] - kernel_size[0]) // stride[0] + 1) \
        * ((W + 2 * padding[1] - kernel_size[1]) // stride[1] + 1)
    if max(_extent(x), _extent(weight), tokens * max(out, K)) > _INT32:
        return "tensors too large for 32-bit indexing"
    return None
