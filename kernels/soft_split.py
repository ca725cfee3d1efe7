"""Triton kernels of ``soft_split`` (unfold + optional LayerNorm + linear), contract in ``t2t_fast/ops/soft_split.py``.

Nothing here materializes the unfolded (B, L, K = C*kh*kw) tensor. Every kernel walks the reduction in the
"q order": for channel-first images q = k (channel-major, as ``F.unfold``); when channels are x's densest axis
(a (B, L, C) token tensor viewed as an image) and C >= 16, one tap (i, j) after another with the channels of a
tap contiguous (q = (i*kw + j)*CP + c, CP = C rounded up to the chunk width), so gathers read contiguous memory.
Reduction rows beyond K (or channels beyond C) are padding; the weights there are zero.

- preparation (one launch, 16-row tiles: many small programs): ``wt`` (KP, NP) = W^T in q order and the dot
  dtype, zero-padded, times the LayerNorm's gamma when there is one; per-tile sums of ``W @ gamma`` and
  ``W @ beta + b``; and the gather table of each q: its element offset in x (``koff``) and its tap's bits. With
  the table the kernels do no index arithmetic per element. 16-bit tap-major inputs whose channels are x's
  unit-stride axis and need no padding (``CONTIG``, as T2T-ViT's token views) skip the table: a chunk is
  BK channels of one tap, addressed from the chunk index, contiguous (16-byte loads), one mask per token.
- tokens are taken in 2-D tiles (TH token rows x TW token columns of one image, TH*TW = BM). In channel-major
  order a tile whose patches all lie inside the image ("interior") gathers with plain loads and only border
  tiles take the masked path (a scalar branch per tile); the mask of an element is one AND and compare of the
  token's in-image tap bits with the column's. The statistics and the weight gradient branch so; the forward
  masks every tile (a second loop cost more than the masks it saves). Tap-major gathers always take the masked
  path (one tap per chunk: the masks are per token), so there the forward and the statistics take linear tiles
  instead: BM consecutive tokens of all B*L, across rows and images (no tile cut short at an image's last row).
- LayerNorm statistics (with the norm, before the forward; few registers, many blocks per SM): per token the
  sums of ``x - s`` and ``(x - s)^2``, elementwise over the chunks in (q, tokens) tiles and reduced once along
  q. ``s`` is tap (0, 0) of channel 0, an element of the token's own patch (0 when that is padding), so the
  variance keeps its precision when the mean is large against the spread, and q-padding (whose table offset is
  0) gathers exactly ``s``. Writes mean, rstd and ``d = mean - s``. Channel-major images with even offsets along
  W (stage 1) instead take one token per thread, a tap row at a time, two taps per load, without the table: a
  token's sums never leave its thread.
- forward: an implicit GEMM. A program owns one token tile and up to 256 output columns (192 in fp32) in two
  accumulators of BN0 + BN1 columns, so at T2T-ViT's 192 columns each patch is gathered once; wider outputs
  take equal column groups on grid axis 1 (384: two of 192, which hold two blocks per SM where one program of
  384 held one). It accumulates ``x @ (gamma * W)^T`` (fp32: ``(x - s) @ ...``, see ``_forward_kernel``);
  epilogue ``y = rstd * (acc - mean * (W @ gamma)) + W @ beta + b`` (fp32: d = mean - s for the mean). With
  the statistics out of its loop it holds no elementwise sums: 8 warps, and in 16-bit at most 192 columns
  under an 80-register cap, three blocks per SM (``_Geometry``). 16-bit channel-major images with even offsets
  along W (stage 1) take the q order of the statistics' tap rows, one channel's (padded) taps per chunk, each
  tap pair one 4-byte asynchronous copy straight into shared memory: no table, no index arithmetic per element.
  A tap row padded to an even width reads one pixel past it (zero weights): a non-finite pixel there (in
  general part of the patch to the right) makes this token's output non-finite too.
- backward, weights (program = (token group, chunk of q rows, column group)): ``D = dy^T @ xhat`` (x itself
  without the norm) for its chunk and the group's output columns over its tiles; the interior tiles in one loop
  (unmasked) and the border ones in another, so no loop body holds both paths. Then, with D stored, each program
  sums dy over its share of row blocks (``db = sum dy`` as dy^T @ ones): accumulators held inside the tile loops
  cost the second block per SM (4 warps at 230 registers, or 8 at 148); after them, 8 warps at 115-127 and two
  blocks. A program steps through its tiles (every G-th) with a mixed-radix counter, not a division per tile.
  A finishing kernel (a grid of about two programs per SM over blocks of weight columns, each summing the
  groups' partials GB at a time, in a fixed order: deterministic, no atomics) applies
  ``dW = gamma * D + db beta^T``, ``dgamma = sum_n W * D``, ``dbeta = W^T db``. Where a channel's taps padded to
  powers of two fill one 64-row chunk (stage 1: 8 x 8), D's rows take the forward's tap-row order (pair loads,
  no table) and the finishing kernel maps them back to k. With ``CONTIG`` a program's chunk is one tap, so a
  row's mask is two range checks of that tap (no tap bits). When every row of every tile is a token (T2T-ViT
  at B=64), dy's loads need no row mask, nor does the sum of dy. In 16-bit the operand is ``x * rstd - mean *
  rstd``, one FMA per element.
- backward, LayerNorm sums (with the norm, only when x needs a gradient): per token ``sum_k gamma g xhat`` and
  ``sum_k gamma g`` (``g = dy @ W``), taken from the forward's output as ``dy . (y - W beta - b)`` and
  ``dy . (W gamma)``: two row dots of (tokens, out) tiles instead of a second GEMM over every patch. The same
  pass writes ``rstd * dy`` (dy's dtype; not in fp16, whose range it could pass) for grad_x, whose dots then
  need no per-tap rescaling.
- backward, grad_x (only when x needs a gradient): per input pixel, over the patches that cover it. Pixels
  are grouped by their residue modulo the stride, so a program only visits the taps that can reach its
  pixels; for one tap, a block of pixels x a block of channels needs ``dy[tokens] @ wt[columns]^T``, all taps
  into one accumulator (in fp16 with the norm, each tap's scaled by rstd after its dots).

fp32 inputs use 3xTF32 dots on the GPU (fp32-level accuracy); fp16/bf16 use the tensor cores with fp32
accumulation. Under the Triton interpreter every operand is upcast to fp32 (it mishandles bf16 arithmetic).
Offsets are int32 unless some element index can pass 2^31 (then int64, constexpr ``BIG``). The kernel geometry
(kernel size, stride, padding, chunks per tap), the token grid's size and width (L, LW), its tiling and x's
channel and row strides are constexpr in the token kernels: the divisions by them fold and a tap row's offsets
are immediates of one address (one compile per soft split, image size and x layout; T2T-ViT has three soft
splits per resolution). Tile sizes, warps and pipelining depths are chosen with
``benchmarks/static_sm90.py`` (occupancy: resident warps per SM); a launch whose shared memory a GPU cannot hold
runs again less deep (``_launch``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from t2t_fast.runtime import cdiv, empty, empty_like, first_exceeded, next_power_of_2, triton_interpret

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 8192  # C*kh*kw: bounds the weight-gradient partial buffers
MAX_OUT = 4096
_INT32 = 2**31 - 1
_BKB = 64  # q rows per backward chunk (the wgmma M of dW^T), and the table granularity
_PARTIAL_BYTES = 32 * 2**20  # cap on the weight-gradient partial buffer of the backward
_CPU_SMS = 4  # the SM count the backward's grids assume off the GPU (the interpreter)
_STATS_BLOCK = (64, 64)  # tokens x output columns per step of the LayerNorm-sums kernel
_DX_BN = 64  # output columns per step of the grad_x kernel


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _prepare_kernel(
    w_ptr, nw_ptr, nb_ptr, b_ptr, wt_ptr, coef_ptr, koff_ptr, bits_ptr,
    N, NP, C, CP, K, KH, KW, KHW, swn, swk, sxc, sxh, sxw,
    SCALE: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, TAP_MAJOR: tl.constexpr,
    ROWS: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr, BIG: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    """Program (chunk kc of BK q rows, column block): wt[q, n] = W[n, k(q)] (times gamma[k] with SCALE), 0 on
    padding; with SCALE coef[kc, 0, n] = sum_q wt[q, n] (the rounded products the forward's dot uses) and
    coef[kc, 1, n] = sum_q W[n, k(q)] beta[k(q)] (+ b[n] in chunk 0). Column block 0 writes the gather table:
    koff[q] the element offset of column q in a patch, bits[q] = 2^i | 2^(16 + j) its tap."""
    kc = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    q = kc * BK + tl.arange(0, BK)
    if TAP_MAJOR:
        r = q // CP
        c = q % CP
        q_ok = c < C
        k = c * KHW + r
    elif ROWS:  # q = (c * NI + i) * NJ + j, taps i < KH, j < KW (the forward's tap-row chunks)
        c = q // (NI * NJ)
        ti = (q // NJ) % NI
        tj = q % NJ
        q_ok = (c < C) & (ti < KH) & (tj < KW)
        r = ti * KW + tj
        k = c * KHW + r
    else:
        q_ok = q < K
        k = q
        c = q // KHW
        r = q % KHW
    i = r // KW
    j = r % KW
    col_ok = cols < N
    m = q_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + k[:, None] * swk + cols[None, :] * swn, mask=m, other=0.0).to(tl.float32)
    if SCALE:
        wg = (w * tl.load(nw_ptr + k, mask=q_ok, other=0.0).to(tl.float32)[:, None]).to(wt_ptr.dtype.element_ty)
        tl.store(coef_ptr + kc * 2 * NP + cols, tl.sum(wg.to(tl.float32), axis=0))
        w_beta = tl.zeros((BN,), dtype=tl.float32)
        if HAS_NORM_BIAS:
            w_beta += tl.sum(w * tl.load(nb_ptr + k, mask=q_ok, other=0.0).to(tl.float32)[:, None], axis=0)
        if HAS_BIAS:
            if kc == 0:
                w_beta += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(coef_ptr + (kc * 2 + 1) * NP + cols, w_beta)
    else:
        wg = w.to(wt_ptr.dtype.element_ty)
    tl.store(wt_ptr + q[:, None] * NP + cols[None, :], wg)
    if tl.program_id(1) == 0:
        # (a new name: a variable defined before a runtime `if` keeps its type inside it)
        c64 = c.to(tl.int64) if BIG else c
        # padding gathers tap (0, 0) of channel 0 (offset 0, bits of i = j = 0): a copy of the shift
        tl.store(koff_ptr + q, tl.where(q_ok, c64 * sxc + i * sxh + j * sxw, 0))
        tl.store(bits_ptr + q, tl.where(q_ok, (1 << i) | (1 << (16 + j)), 0x10001))


@triton.jit
def _udiv(a, b):
    """a // b for non-negative int32 a, b: unsigned, half the instructions of a signed division by a runtime
    value (tl.cast also takes a runtime int of 1, which Triton specializes to a constexpr without .to)."""
    return (tl.cast(a, tl.uint32) // tl.cast(b, tl.uint32)).to(tl.int32)


@triton.jit
def _tile_index(tile, TPI, TILES_W):
    """2-D tile number b*TPI + tr*TILES_W + tc -> (b, tr, tc) (non-negative: unsigned divisions)."""
    b = _udiv(tile, TPI)
    rest = tile - b * TPI
    tr = _udiv(rest, TILES_W)
    return b, tr, rest - tr * TILES_W


@triton.jit
def _tile_step(b, tr, tc, gb, gr, gc, TILES_H, TILES_W):
    """(b, tr, tc) of tile number n -> that of n + G, with (gb, gr, gc) = ``_tile_index(G)``: the digits added
    with carries (tc, gc < TILES_W and tr, gr < TILES_H), no division per step."""
    tc += gc
    tr += gr + (tc >= TILES_W)
    tc = tl.where(tc >= TILES_W, tc - TILES_W, tc)
    b += gb + (tr >= TILES_H)
    return b, tl.where(tr >= TILES_H, tr - TILES_H, tr), tc


@triton.jit
def _tile_rows(b, tr, tc, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, BIG: tl.constexpr, FULL: tl.constexpr,
               TH: tl.constexpr, TW: tl.constexpr):
    """2-D tile (tr, tc) of image b -> (b, token row and column of each row, rows in range (all with FULL: the
    tiles divide the token grid), token index (b*L + t), whether every patch of the tile lies inside the image and
    every row is a token)."""
    m = tl.arange(0, TH * TW)
    th0 = tr * TH
    tw0 = tc * TW
    if BIG:
        b = b.to(tl.int64)
    th = th0 + m // TW
    tw = tw0 + m % TW
    row_ok = tl.full((TH * TW,), 1, tl.int1) if FULL else (th < LH) & (tw < LW)
    interior = (th0 * SH >= PH) & ((th0 + TH - 1) * SH - PH + KH <= H) & (tw0 * SW >= PW) \
        & ((tw0 + TW - 1) * SW - PW + KW <= W) & (th0 + TH <= LH) & (tw0 + TW <= LW)
    return b, th, tw, row_ok, b * L + th * LW + tw, interior


@triton.jit
def _patches(b, th, tw, row_ok, H, W, KH, KW, SH, SW, PH, PW, sxb, sxh, sxw, BIG: tl.constexpr):
    """Rows (b, th, tw) -> (tap (0, 0) inside the image, its offset in x, the taps of each row inside the image:
    bit i for tap row i, bit 16 + j for tap column j; 0 for rows beyond the tokens)."""
    h0 = th * SH - PH
    w0 = tw * SW - PW
    if BIG:
        xrow = b * sxb + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    else:
        xrow = b * sxb + h0 * sxh + w0 * sxw
    hlo = tl.maximum(-h0, 0)
    hhi = tl.minimum(H - h0, KH)
    wlo = tl.maximum(-w0, 0)
    whi = tl.minimum(W - w0, KW)
    hbits = tl.where(hhi > hlo, (1 << hhi) - (1 << hlo), 0)
    wbits = tl.where(whi > wlo, (1 << whi) - (1 << wlo), 0)
    bits = tl.where(row_ok, hbits | (wbits << 16), 0)
    return (bits & 0x10001) == 0x10001, xrow, bits


@triton.jit
def _tokens(tile, TPI, TILES_W, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, BIG: tl.constexpr, LINEAR: tl.constexpr,
            FULL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Token tile -> (b, token row and column of each row, rows in range, token index (b*L + t), whether every patch
    of the tile lies inside the image and every row is a token). A tile is TH x TW tokens of one image
    (tile = b*TPI + tr*TILES_W + tc), or with LINEAR (TH = 1) TW consecutive tokens of all M = B*L, across rows and
    images (never interior). FULL: every row of every tile is a token (``_Geometry.full``), no row mask."""
    if LINEAR:  # per row: divisions by the constexpr L and LW (multiplications)
        m = tl.arange(0, TW)
        if BIG:
            t = tl.cast(tile, tl.int64) * TW + m  # (tl.cast: the interpreter passes a loop index as a Python int)
        else:
            t = tile * TW + m
        b = t // L
        row_ok = tl.full((TW,), 1, tl.int1) if FULL else t < M
        r = (t - b * L).to(tl.int32)
        th = r // LW
        tw = r - th * LW
        token = t
        interior = False
    else:
        b, tr, tc = _tile_index(tile, TPI, TILES_W)
        b, th, tw, row_ok, token, interior = _tile_rows(b, tr, tc, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, BIG,
                                                        FULL, TH, TW)
    return b, th, tw, row_ok, token, interior


@triton.jit
def _tile(tile, TPI, TILES_W, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, sxb, sxh, sxw,
          BIG: tl.constexpr, LINEAR: tl.constexpr, FULL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Token tile (``_tokens``) -> (rows in range, tap (0, 0) inside the image, its offset in x, token index
    (b*L + t), the taps of each row inside the image, whether every patch of the tile lies inside the image and
    every row is a token)."""
    b, th, tw, row_ok, token, interior = _tokens(tile, TPI, TILES_W, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW,
                                                 BIG, LINEAR, FULL, TH, TW)
    s_ok, xrow, bits = _patches(b, th, tw, row_ok, H, W, KH, KW, SH, SW, PH, PW, sxb, sxh, sxw, BIG)
    return row_ok, s_ok, xrow, token, bits, interior


@triton.jit
def _contig_tap(kc, KW, CPB, BK: tl.constexpr):
    """CONTIG chunk kc -> its tap (i, j) and its first channel ((kc % CPB) * BK): CPB chunks of BK channels per
    tap."""
    r = kc // CPB
    return r // KW, r % KW, (kc % CPB) * BK


@triton.jit
def _chunk(kc, koff_ptr, bits_ptr, KW, CPB, sxh, sxw, CONTIG: tl.constexpr, BIG: tl.constexpr, BK: tl.constexpr):
    """Offsets in x of the columns of q chunk kc (BK wide) and their taps' bits, shaped to broadcast against the
    tokens: from the gather table, or with CONTIG (tap-major, channels x's unit-stride axis, no channel padding:
    one tap per chunk) computed, so that a token's columns are contiguous (16-byte loads) under one tap."""
    if CONTIG:
        i, j, c0 = _contig_tap(kc, KW, CPB, BK)
        cb = tl.full((1, BK), 1 << i, tl.int32) | (1 << (16 + j))
        if BIG:
            i = i.to(tl.int64)
        offs = c0 + i * sxh + j * sxw + tl.arange(0, BK)
    else:
        q = kc * BK + tl.arange(0, BK)
        offs = tl.load(koff_ptr + q)
        cb = tl.load(bits_ptr + q)[None, :]
    return offs, cb


@triton.jit
def _tap_rows(b, th, tw, row_ok, kc, H, W, KW, SH, SW, PH, PW, CPB, sxb, sxh, sxw, BIG: tl.constexpr,
              BK: tl.constexpr):
    """Rows (b, th, tw) -> the offset in x of CONTIG chunk kc's first column (tap (i, j), channels
    (kc % CPB) * BK on) and, as 0/1, whether that tap lies inside the image and the row is a token: the weight
    gradient's programs keep one chunk, so a row's mask is two range checks, not the tap bits of every tap."""
    i, j, c0 = _contig_tap(kc, KW, CPB, BK)
    h = th * SH - PH + i
    w = tw * SW - PW + j
    ok = row_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    if BIG:
        xrow = b * sxb + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    else:
        xrow = b * sxb + h * sxh + w * sxw
    return xrow + c0, ok.to(tl.int32)


@triton.jit
def _pair_bit(col, NJ: tl.constexpr):
    """The tap bit that masks column col of a tap row padded to NJ (col % NJ = j): its pair's first tap,
    2 * (j // 2), whose bit the pair shares (pairs never straddle the image's edge, ``_Geometry.stats_rows``), so
    that each pair is one 4-byte load. The divisions are of col itself, which lets the compiler see that constancy
    (from col % NJ it cannot, and issues 2-byte loads)."""
    return 1 << (16 + ((col // 2) % (NJ // 2)) * 2)


@triton.jit
def _row_chunk(kc, sxc, sxh, BIG: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr):
    """Offsets in x and tap bits (as ``_chunk``) of chunk kc in tap-row order (``_Geometry.fwd_rows``, ``bwd_rows``):
    channel kc's NI x NJ taps (i, j), rows i >= KH and columns j >= KW padding, masked per tap pair
    (``_pair_bit``): each pair one 4-byte load (cp.async)."""
    col = tl.arange(0, NI * NJ)
    i = col // NJ
    cb = (1 << i) | _pair_bit(col, NJ)
    if BIG:
        kc = tl.cast(kc, tl.int64)  # (the interpreter passes a Python int)
    return kc * sxc + i * sxh + col % NJ, cb[None, :]


@triton.jit
def _gather(x_ptr, xrow, bits, offs, cb, sub, mul, MODE: tl.constexpr, MASKED: tl.constexpr,
            TRANSPOSED: tl.constexpr):
    """The (tokens, q) tile of the unfolded tensor in fp32 (columns ``offs``, ``cb`` from ``_chunk``), or with
    TRANSPOSED its (q, tokens) transpose, as is (MODE 0), minus ``sub`` per token (1) or times ``mul`` after that
    (2), or times ``mul`` plus ``sub`` (3). Padding pixels read as 0 (MASKED; interior tiles have none), rows beyond
    the tokens as 0 - sub (3: sub); q-padding gathers tap (0, 0) of channel 0, the shift of the forward."""
    # each row's pointer first, then the columns' offsets: a thread's neighbouring columns become immediate offsets
    # of one address (from the int32 sum xrow + offs every element needs its own 64-bit address)
    if TRANSPOSED:
        ptrs = (x_ptr + xrow)[None, :] + offs[:, None]
        tok = bits[None, :]
        cb = tl.trans(cb)
        sub = sub[None, :]
        mul = mul[None, :]
    else:
        ptrs = (x_ptr + xrow)[:, None] + offs[None, :]
        tok = bits[:, None]
        sub = sub[:, None]
        mul = mul[:, None]
    if MASKED:
        a = tl.load(ptrs, mask=(tok & cb) == cb, other=0.0).to(tl.float32)
    else:
        a = tl.load(ptrs).to(tl.float32)
    if MODE == 1 or MODE == 2:
        a = a - sub
    if MODE == 2:
        a = a * mul
    if MODE == 3:  # a * mul + sub: one FMA per element
        a = a * mul + sub
    return a


@triton.jit
def _stats_loop(x_ptr, koff_ptr, bits_ptr, xrow, bits, shift, NUM_CHUNKS, s1, s2, KW, CPB, sxh, sxw,
                MASKED: tl.constexpr, CONTIG: tl.constexpr, BIG: tl.constexpr, BK: tl.constexpr):
    # (q, tokens) tiles: a token's sums then reduce along the rows, within a thread and across warps, instead of
    # along a warp's lanes
    for kc in range(0, NUM_CHUNKS):
        offs, cb = _chunk(kc, koff_ptr, bits_ptr, KW, CPB, sxh, sxw, CONTIG, BIG, BK)
        # x - s: q-padding gathers s itself and rows beyond the tokens 0 - 0, both 0 here
        a = _gather(x_ptr, xrow, bits, offs, cb, shift, shift, 1, MASKED, True)
        s1 += a
        s2 += a * a
    return s1, s2


@triton.jit
def _tap_pair(p, ok, MASKED: tl.constexpr, WORDS: tl.constexpr):
    """The two taps of the pair at p in fp32 (0 where not ok, with MASKED): with WORDS (bf16) one int32 word, each
    tap's value one bit operation (not a bf16 unpack of each), else two elements."""
    if WORDS:
        v = tl.load(p, mask=ok, other=0) if MASKED else tl.load(p)
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    elif MASKED:
        lo = tl.load(p, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(p + 1, mask=ok, other=0.0).to(tl.float32)
    else:
        lo = tl.load(p).to(tl.float32)
        hi = tl.load(p + 1).to(tl.float32)
    return lo, hi


@triton.jit
def _stats_rows(x_ptr, xrow, bits, shift, KH, s1, s2, sxc: tl.constexpr, sxh: tl.constexpr, C: tl.constexpr,
                KW: tl.constexpr, MASKED: tl.constexpr):
    # one token per thread (the tile's tokens over the block's threads): a token's KW taps of a tap row are
    # contiguous in x, read a pair at a time (x's offsets are even, see _Geometry.stats_rows) under the pair's mask
    # (its first tap's bit, as _pair_bit), and every sum stays in its thread: no reduction across lanes or warps, no
    # tap padding (an odd KW's last pair adds only its first tap). Padding pixels read 0: x - s = -s, as the
    # unfolded patch has it. A trip is tap row i of the C channels: a runtime KH (a constexpr one unrolls, and the
    # masked loads of a channel's KH rows in flight spill), one row mask for the C rows, each row's pairs immediate
    # offsets.
    WORDS: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    SXC: tl.constexpr = sxc // 2 if WORDS else sxc  # in pairs' units (int32 words) with WORDS
    SXH: tl.constexpr = sxh // 2 if WORDS else sxh
    PAIR: tl.constexpr = 1 if WORDS else 2
    if WORDS:
        base = (x_ptr + tl.multiple_of(xrow, 2)).to(tl.pointer_type(tl.int32), bitcast=True)
    else:
        base = x_ptr + xrow
    for i in range(KH):
        row_in = ((bits >> i) & 1) != 0
        p = base + i * SXH
        for c in tl.static_range(C):
            for pair in tl.static_range((KW + 1) // 2):
                lo, hi = _tap_pair(p + c * SXC + pair * PAIR, row_in & ((bits & (1 << (16 + 2 * pair))) != 0),
                                   MASKED, WORDS)
                lo -= shift
                s1 += lo
                s2 += lo * lo
                if 2 * pair + 1 < KW:
                    hi -= shift
                    s1 += hi
                    s2 += hi * hi
    return s1, s2


@triton.jit
def _stats_kernel(
    x_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, d_ptr,
    TPI: tl.constexpr, TILES_W: tl.constexpr, M, L: tl.constexpr, LH, LW: tl.constexpr, H, W, KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, K, C: tl.constexpr, NUM_CHUNKS, CPB: tl.constexpr, sxb, sxc: tl.constexpr,
    sxh: tl.constexpr, sxw, eps,
    CONTIG: tl.constexpr, BIG: tl.constexpr, LINEAR: tl.constexpr, FULL: tl.constexpr, ROWS: tl.constexpr,
    STORE_D: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BK: tl.constexpr,
):
    """Program (token tile): the LayerNorm's mean and rstd of each token's patch, from the sums of x - s and
    (x - s)^2 (s: tap (0, 0) of channel 0, an element of the patch, so the variance keeps its precision when the
    mean is large against the spread), elementwise over the chunks and reduced once; with STORE_D also
    d = mean - s, for the fp32 forward (mean - s from the rounded mean would lose the digits s saved). Chunks:
    NUM_CHUNKS of BK table rows, or with ROWS NUM_CHUNKS = KH tap rows of the C channels (``_stats_rows``)."""
    row_ok, s_ok, xrow, yrow, bits, interior = _tile(tl.program_id(0), TPI, TILES_W, M, L, LH, LW, H, W, KH, KW, SH,
                                                 SW, PH, PW, sxb, sxh, sxw, BIG, LINEAR, FULL, TH, TW)
    shift = tl.load(x_ptr + xrow, mask=s_ok, other=0.0).to(tl.float32)
    if ROWS:
        t1 = tl.zeros((TH * TW,), dtype=tl.float32)
        t2 = tl.zeros((TH * TW,), dtype=tl.float32)
        if interior:
            t1, t2 = _stats_rows(x_ptr, xrow, bits, shift, NUM_CHUNKS, t1, t2, sxc, sxh, C, KW, False)
        else:
            t1, t2 = _stats_rows(x_ptr, xrow, bits, shift, NUM_CHUNKS, t1, t2, sxc, sxh, C, KW, True)
    else:
        s1 = tl.zeros((BK, TH * TW), dtype=tl.float32)
        s2 = tl.zeros((BK, TH * TW), dtype=tl.float32)
        if interior:
            s1, s2 = _stats_loop(x_ptr, koff_ptr, bits_ptr, xrow, bits, shift, NUM_CHUNKS, s1, s2, KW, CPB, sxh,
                                 sxw, False, CONTIG, BIG, BK)
        else:
            s1, s2 = _stats_loop(x_ptr, koff_ptr, bits_ptr, xrow, bits, shift, NUM_CHUNKS, s1, s2, KW, CPB, sxh,
                                 sxw, True, CONTIG, BIG, BK)
        t1 = tl.sum(s1, axis=0)
        t2 = tl.sum(s2, axis=0)
    d = t1 / K
    rstd = tl.rsqrt(tl.maximum(t2 / K - d * d, 0.0) + eps)
    tl.store(mean_ptr + yrow, shift + d, mask=row_ok)
    tl.store(rstd_ptr + yrow, rstd, mask=row_ok)
    if STORE_D:
        tl.store(d_ptr + yrow, d, mask=row_ok)


@triton.jit
def _forward_loop(x_ptr, wt_ptr, koff_ptr, bits_ptr, xrow, bits, shift, col0, NP, NUM_CHUNKS, acc0, acc1,
                  KW, CPB, sxc, sxh, sxw, SUB: tl.constexpr, HAS_N1: tl.constexpr, CONTIG: tl.constexpr,
                  ROWS: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr, BIG: tl.constexpr, PREC: tl.constexpr,
                  BN0: tl.constexpr, BN1: tl.constexpr, BK: tl.constexpr):
    if ROWS:
        xrow = tl.multiple_of(xrow, 2)
    for kc in range(0, NUM_CHUNKS):
        q = kc * BK + tl.arange(0, BK)
        if ROWS:  # x's own dtype straight into the dot (no SUB): the loads become asynchronous copies; the row's
            # pointer first, as in _gather
            offs, cb = _row_chunk(kc, sxc, sxh, BIG, NI, NJ)
            a = tl.load((x_ptr + xrow)[:, None] + offs[None, :], mask=(bits[:, None] & cb) == cb, other=0.0)
        else:
            offs, cb = _chunk(kc, koff_ptr, bits_ptr, KW, CPB, sxh, sxw, CONTIG, BIG, BK)
            # SUB: x - s (s as in _stats_kernel), see _forward_kernel
            a = _gather(x_ptr, xrow, bits, offs, cb, shift, shift, 1 if SUB else 0, True, False)
        wrow = wt_ptr + q[:, None] * NP + col0
        w0t = tl.load(wrow + tl.arange(0, BN0)[None, :])
        acc0 = tl.dot(a.to(w0t.dtype), w0t, acc0, input_precision=PREC)
        if HAS_N1:
            w1t = tl.load(wrow + BN0 + tl.arange(0, BN1)[None, :])
            acc1 = tl.dot(a.to(w1t.dtype), w1t, acc1, input_precision=PREC)
    return acc0, acc1


@triton.jit
def _forward_store(y_ptr, coef_ptr, cvec_ptr, acc, rstd, d, yrow, row_ok, cols, N, HAS_NORM: tl.constexpr,
                   HAS_CVEC: tl.constexpr, EVEN_N: tl.constexpr):
    out = acc
    if HAS_NORM:  # coef is NP long
        out = rstd[:, None] * (acc - d[:, None] * tl.load(coef_ptr + cols)[None, :])
    if HAS_CVEC:
        if EVEN_N:
            out += tl.load(cvec_ptr + cols).to(tl.float32)[None, :]
        else:
            out += tl.load(cvec_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] if EVEN_N else row_ok[:, None] & (cols < N)[None, :]
    tl.store(y_ptr + yrow[:, None] * N + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr, wt_ptr, coef_ptr, cvec_ptr, koff_ptr, bits_ptr, y_ptr, rstd_ptr, d_ptr,
    # the tile grid's TPI a constexpr like L (no division of the program id by it); TILES_W too spills at 384 px
    # (triton 3.9, two instructions)
    TPI: tl.constexpr, TILES_W, M, L: tl.constexpr, LH, LW: tl.constexpr, H, W, KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, N, NP, NUM_CHUNKS, CPB: tl.constexpr, sxb, sxc: tl.constexpr,
    sxh: tl.constexpr, sxw,
    HAS_NORM: tl.constexpr, SHIFTED: tl.constexpr, HAS_CVEC: tl.constexpr, HAS_N1: tl.constexpr,
    LINEAR: tl.constexpr, FULL: tl.constexpr, CONTIG: tl.constexpr, ROWS: tl.constexpr, NI: tl.constexpr,
    NJ: tl.constexpr,
    BIG: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BN0: tl.constexpr, BN1: tl.constexpr, BK: tl.constexpr,
):
    """Program (token tile, column group of BN0 + BN1): y of the tile. With HAS_NORM wt holds (gamma*W)^T,
    coef = W @ gamma and rstd the tokens' statistics (``_stats_kernel``), and the dots take x - s when SHIFTED
    (d_ptr then holds d = mean - s), else x itself (d_ptr holds the mean); cvec is added (W @ beta + b with the
    norm, else the bias); coef and cvec are NP long.

    SHIFTED is for fp32 inputs, whose 3xTF32 products keep their accuracy only while acc - d * coef does not
    cancel (test_large_mean_keeps_variance_accurate: mean 1e4 spreads). 16-bit operands take x itself: exact
    where x - s rounds to the operand dtype, and no subtract between the operand's load and the MMA (stage 2's
    loop: 215 -> 137 instructions per warp). Emulated at stage 1 (bf16, fp32 accumulation), the forward's error
    against float64 goes from 5e-3 of the output's scale to 2e-7 at mean 0, and is 4e-5 at mean 300 spreads;
    the fp32 cancellation in acc - mean * coef costs more only for patches whose values lie far from 0 against
    their spread (1e-2 at mean 1000 with spread 1, below bf16's resolution there)."""
    BM: tl.constexpr = TH * TW
    row_ok, s_ok, xrow, yrow, bits, _ = _tile(tl.program_id(0), TPI, TILES_W, M, L, LH, LW, H, W, KH, KW, SH, SW, PH,
                                              PW, sxb, sxh, sxw, BIG, LINEAR, FULL, TH, TW)
    col0 = tl.program_id(1) * (BN0 + BN1 * HAS_N1)
    acc0 = tl.zeros((BM, BN0), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN1), dtype=tl.float32)
    shift = tl.zeros((BM,), dtype=tl.float32)
    if HAS_NORM and SHIFTED:
        shift = tl.load(x_ptr + xrow, mask=s_ok, other=0.0).to(tl.float32)
    # every tile masked, interior ones too: a second, unmasked loop costs more than its masks save (its copy of the
    # accumulators' zeroing and of the pipeline's prologue; static model, stage 1 on triton 3.6: 82 -> 69 us)
    acc0, acc1 = _forward_loop(x_ptr, wt_ptr, koff_ptr, bits_ptr, xrow, bits, shift, col0, NP, NUM_CHUNKS, acc0, acc1,
                               KW, CPB, sxc, sxh, sxw, HAS_NORM and SHIFTED, HAS_N1, CONTIG, ROWS, NI, NJ, BIG, PREC,
                               BN0, BN1, BK)
    rstd = shift
    d = shift
    if HAS_NORM:
        rstd = tl.load(rstd_ptr + yrow, mask=row_ok, other=0.0)
        d = tl.load(d_ptr + yrow, mask=row_ok, other=0.0)
    # the second (narrower) accumulator first: under the 80-register cap the other order spills (triton 3.9 at
    # stages 1 and 2, 3.6 at stage 1)
    if HAS_N1:
        _forward_store(y_ptr, coef_ptr, cvec_ptr, acc1, rstd, d, yrow, row_ok, col0 + BN0 + tl.arange(0, BN1), N,
                       HAS_NORM, HAS_CVEC, EVEN_N)
    _forward_store(y_ptr, coef_ptr, cvec_ptr, acc0, rstd, d, yrow, row_ok, col0 + tl.arange(0, BN0), N, HAS_NORM,
                   HAS_CVEC, EVEN_N)


@triton.jit
def _operand(x_ptr, xrow, bits, row_ok, kc, koff_ptr, bits_ptr, KW, CPB, sxc, sxh, sxw, mean_ptr, rstd_ptr, yrow,
             HAS_NORM: tl.constexpr, MASKED: tl.constexpr, CONTIG: tl.constexpr, ROWS: tl.constexpr,
             NI: tl.constexpr, NJ: tl.constexpr, BIG: tl.constexpr, BK: tl.constexpr):
    """The tile's xhat (x without the norm) for q chunk kc in fp32: 0 in rows beyond the tokens, garbage in
    q-padding (it only meets zero weights or discarded rows). The chunk's columns come from ``_chunk`` here, per
    tile: the table's (L1 hits) hold no registers across the weight kernel's loop; or with ROWS from
    ``_row_chunk`` (tap pairs, 4-byte loads); with CONTIG xrow and bits are ``_tap_rows``' (the chunk's tap folded
    into xrow, bits a 0/1 row mask)."""
    if ROWS:
        offs, cb = _row_chunk(kc, sxc, sxh, BIG, NI, NJ)
        xrow = tl.multiple_of(xrow, 2)
    elif CONTIG:  # xrow and bits from _tap_rows
        offs = tl.arange(0, BK)
        cb = tl.full((1, BK), 1, tl.int32)
    else:
        offs, cb = _chunk(kc, koff_ptr, bits_ptr, KW, CPB, sxh, sxw, False, BIG, BK)
    if HAS_NORM:
        if MASKED:
            mu = tl.load(mean_ptr + yrow, mask=row_ok, other=0.0)
            rs = tl.load(rstd_ptr + yrow, mask=row_ok, other=0.0)
        else:  # interior tiles: every row a token
            mu = tl.load(mean_ptr + yrow)
            rs = tl.load(rstd_ptr + yrow)
        if x_ptr.dtype.element_ty == tl.float32:
            a = _gather(x_ptr, xrow, bits, offs, cb, mu, rs, 2, MASKED, False)
        else:  # x * rstd - mean * rstd, one FMA: off by up to |mean * rstd| * 2^-24, under the 16-bit operand's
            # rounding of a unit-scale xhat (4e-3 in bf16) even for a flat patch (rstd = eps^-1/2) at mean 1000: 3e-3
            a = _gather(x_ptr, xrow, bits, offs, cb, -mu * rs, rs, 3, MASKED, False)
    else:
        a = _gather(x_ptr, xrow, bits, offs, cb, xrow, xrow, 0, MASKED, False)
    return a


@triton.jit
def _dy_tile(dyrow, cols, row_ok, N, MASKED: tl.constexpr, EVEN_N: tl.constexpr):
    """dy of a tile's rows for columns cols (0 beyond the tokens and columns): unmasked for an interior tile
    (every row a token) when every column is one (EVEN_N)."""
    if EVEN_N:
        if MASKED:
            dy = tl.load(dyrow + cols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            dy = tl.load(dyrow + cols[None, :])
    else:
        dy = tl.load(dyrow + cols[None, :], mask=row_ok[:, None] & (cols < N)[None, :], other=0.0)
    return dy


@triton.jit
def _weight_step(x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, b, tr, tc, kc, cols0, cols1,
                 dw0, dw1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, N, CPB, sxb, sxc, sxh, sxw,
                 HAS_NORM: tl.constexpr, HAS_N1: tl.constexpr, MASKED: tl.constexpr, CONTIG: tl.constexpr,
                 LINEAR: tl.constexpr, FULL: tl.constexpr, ROWS: tl.constexpr, NI: tl.constexpr,
                 NJ: tl.constexpr, BIG: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, TH: tl.constexpr,
                 TW: tl.constexpr, BK: tl.constexpr):
    """One tile (tr, tc) of image b into the weight kernel's accumulators, or with LINEAR the linear tile b (TH = 1:
    TW consecutive tokens of all M; dy unmasked with FULL; only wt's dtype is used: the dots' operand dtype)."""
    if LINEAR:
        b, th, tw, row_ok, yrow, _ = _tokens(b, 1, 1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, BIG, True, FULL,
                                             1, TW)
    else:
        b, th, tw, row_ok, yrow, _ = _tile_rows(b, tr, tc, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, BIG, FULL, TH,
                                                TW)
    if CONTIG:
        xrow, bits = _tap_rows(b, th, tw, row_ok, kc, H, W, KW, SH, SW, PH, PW, CPB, sxb, sxh, sxw, BIG, BK)
    else:
        _, xrow, bits = _patches(b, th, tw, row_ok, H, W, KH, KW, SH, SW, PH, PW, sxb, sxh, sxw, BIG)
    a = _operand(x_ptr, xrow, bits, row_ok, kc, koff_ptr, bits_ptr, KW, CPB, sxc, sxh, sxw, mean_ptr, rstd_ptr, yrow,
                 HAS_NORM, MASKED, CONTIG, ROWS, NI, NJ, BIG, BK)
    dt = wt_ptr.dtype.element_ty
    dyrow = dy_ptr + yrow[:, None] * N
    ad = a.to(dt)
    DY_MASKED: tl.constexpr = MASKED and not FULL
    dw0 = tl.dot(tl.trans(_dy_tile(dyrow, cols0, row_ok, N, DY_MASKED, EVEN_N).to(dt)), ad, dw0,
                 input_precision=PREC)
    if HAS_N1:
        dw1 = tl.dot(tl.trans(_dy_tile(dyrow, cols1, row_ok, N, DY_MASKED, EVEN_N).to(dt)), ad, dw1,
                     input_precision=PREC)
    return dw0, dw1


@triton.jit
def _backward_weight_kernel(
    x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, part_ptr, dbp_ptr,
    TILES_H: tl.constexpr, TILES_W: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, C0: tl.constexpr,
    C1: tl.constexpr, NUM_INNER, NUM_BORDER, M, L: tl.constexpr, LH, LW: tl.constexpr, H, W,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    N, NP, KP, NKB, G, CPB: tl.constexpr, sxb, sxc: tl.constexpr, sxh: tl.constexpr, sxw,
    HAS_NORM: tl.constexpr, HAS_N1: tl.constexpr, CONTIG: tl.constexpr, ROWS: tl.constexpr, NI: tl.constexpr,
    NJ: tl.constexpr, BIG: tl.constexpr, PREC: tl.constexpr,
    INNER: tl.constexpr, LINEAR: tl.constexpr, FULL: tl.constexpr, EVEN_N: tl.constexpr, TH: tl.constexpr,
    TW: tl.constexpr, BN0: tl.constexpr, BN1: tl.constexpr, BK: tl.constexpr,
):
    """Program (group g, chunk kc of BK q rows; column group on axis 1) over its share of the tiles (every G-th):
    part[g, q, n] = sum dy[t, n] xhat[t, q] (x without the norm) for the group's columns n. With INNER
    (NUM_INNER > 0) two loops, one per gather path: the interior tiles (rows R0..R1-1, columns C0..C1-1 of each
    image's TILES_H x TILES_W tiles: NUM_INNER in all), then the border ones (NUM_BORDER), so that no loop body
    holds both paths; else one loop over every tile, masked. Interior tiles load dy, mean and rstd unmasked
    (every row a token; dy's columns too with EVEN_N); with FULL (every row of every tile a token) so do the
    border and linear tiles and the row blocks of the sum of dy. The dots are dy^T @ xhat (columns x q rows):
    dy's tile is an operand straight from shared memory, and xhat needs no transposed copy. Then
    dbp[program, n] = sum dy[t, n] over the row blocks of dy (M x N, TH*TW rows each) numbered g + kc*G modulo
    G*NKB: every block once in all."""
    g = tl.program_id(0) // NKB
    kc = tl.program_id(0) % NKB
    q = kc * BK + tl.arange(0, BK)
    col0 = tl.program_id(1) * (BN0 + BN1 * HAS_N1)
    cols0 = col0 + tl.arange(0, BN0)
    cols1 = col0 + BN0 + tl.arange(0, BN1)
    dw0 = tl.zeros((BN0, BK), dtype=tl.float32)
    dw1 = tl.zeros((BN1, BK), dtype=tl.float32)
    if INNER:
        inner_h = R1 - R0
        inner_w = C1 - C0
        inner = inner_h * inner_w  # interior tiles per image
        b, r, c = _tile_index(g, inner, inner_w)
        gb, gr, gc = _tile_index(G, inner, inner_w)
        for i in range(g, NUM_INNER, G):
            dw0, dw1 = _weight_step(x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, b, R0 + r,
                                    C0 + c, kc, cols0, cols1, dw0, dw1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW,
                                    N, CPB, sxb, sxc, sxh, sxw, HAS_NORM, HAS_N1, False, CONTIG, False, FULL, ROWS,
                                    NI, NJ, BIG, EVEN_N, PREC, TH, TW, BK)
            b, r, c = _tile_step(b, r, c, gb, gr, gc, inner_h, inner_w)
        # border tiles of an image, numbered: the rows above R0, the rows from R1, then the sides of rows R0..R1-1
        border = TILES_H * TILES_W - inner
        top = R0 * TILES_W
        bottom = (TILES_H - R1) * TILES_W
        side = max(TILES_W - inner_w, 1)  # tiles per side row: a constant, as TILES_W (no division at run time)
        for i in range(g, NUM_BORDER, G):
            b = _udiv(i, border)
            j = i - b * border
            in_top = j < top
            full_row = j < top + bottom
            k = tl.where(in_top, j, tl.where(full_row, j - top, j - top - bottom))
            width = tl.where(full_row, TILES_W, side)
            r = tl.where(full_row, k // TILES_W, k // side)
            tr = tl.where(in_top, 0, tl.where(full_row, R1, R0)) + r
            tc = k - r * width
            tc = tl.where(full_row | (tc < C0), tc, tc + inner_w)
            dw0, dw1 = _weight_step(x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, b, tr, tc, kc,
                                    cols0, cols1, dw0, dw1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, N, CPB, sxb,
                                    sxc, sxh, sxw, HAS_NORM, HAS_N1, True, CONTIG, False, FULL, ROWS, NI, NJ, BIG,
                                    EVEN_N, PREC, TH, TW, BK)
    elif LINEAR:  # no interior tiles, tap-major: TW consecutive tokens of all M per tile, masked
        for i in range(g, NUM_BORDER, G):
            dw0, dw1 = _weight_step(x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, i, 0, 0, kc, cols0,
                                    cols1, dw0, dw1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, N, CPB, sxb, sxc,
                                    sxh, sxw, HAS_NORM, HAS_N1, True, CONTIG, True, FULL, ROWS, NI, NJ, BIG, EVEN_N,
                                    PREC, TH, TW, BK)
    else:  # no interior tiles, channel-major: every tile in order, masked
        b, tr, tc = _tile_index(g, TILES_H * TILES_W, TILES_W)
        gb, gr, gc = _tile_index(G, TILES_H * TILES_W, TILES_W)
        for i in range(g, NUM_BORDER, G):
            dw0, dw1 = _weight_step(x_ptr, dy_ptr, wt_ptr, koff_ptr, bits_ptr, mean_ptr, rstd_ptr, b, tr, tc, kc,
                                    cols0, cols1, dw0, dw1, M, L, LH, LW, H, W, KH, KW, SH, SW, PH, PW, N, CPB, sxb,
                                    sxc, sxh, sxw, HAS_NORM, HAS_N1, True, CONTIG, False, FULL, ROWS, NI, NJ, BIG,
                                    EVEN_N, PREC, TH, TW, BK)
            b, tr, tc = _tile_step(b, tr, tc, gb, gr, gc, TILES_H, TILES_W)
    part = part_ptr + (g * KP + q)[None, :] * NP
    tl.store(part + cols0[:, None], dw0)
    if HAS_N1:
        tl.store(part + cols1[:, None], dw1)
    # sum dy after the tile loops, so that its accumulators never hold registers next to D's
    dt = wt_ptr.dtype.element_ty
    ones = tl.full((TH * TW, 16), 1.0, dt)
    db0 = tl.zeros((BN0, 16), dtype=tl.float32)
    db1 = tl.zeros((BN1, 16), dtype=tl.float32)
    for r0 in range((g + kc * G) * (TH * TW), M, G * NKB * (TH * TW)):
        rows = r0 + tl.arange(0, TH * TW)
        row_ok = rows < M
        if BIG:
            rows = rows.to(tl.int64)
        dyrow = dy_ptr + rows[:, None] * N
        db0 = tl.dot(tl.trans(_dy_tile(dyrow, cols0, row_ok, N, not FULL, EVEN_N).to(dt)), ones, db0,
                     input_precision=PREC)
        if HAS_N1:
            db1 = tl.dot(tl.trans(_dy_tile(dyrow, cols1, row_ok, N, not FULL, EVEN_N).to(dt)), ones, db1,
                         input_precision=PREC)
    first = tl.arange(0, 16)[None, :] == 0
    dbp = dbp_ptr + tl.program_id(0) * NP
    tl.store(dbp + cols0, tl.sum(tl.where(first, db0, 0.0), axis=1))
    if HAS_N1:
        tl.store(dbp + cols1, tl.sum(tl.where(first, db1, 0.0), axis=1))


@triton.jit
def _backward_stats_kernel(dy_ptr, y_ptr, coef_ptr, rstd_ptr, stat_ptr, dys_ptr, M, N, NP, K, SCALE_DY: tl.constexpr,
                           BIG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Program (block of BM tokens): the LayerNorm backward's sums over each token's patch, sum_k gamma g xhat
    = dy[t] . (y[t] - W beta - b) and sum_k gamma g = dy[t] . (W gamma) (g = dy @ W), from the forward's y (B*L = M
    rows of N, contiguous) and coef = [W @ gamma, W @ beta + b] (2, NP); stored as grad_x uses them:
    stat[0, t] = -rstd sum_k gamma g / K, stat[1, t] = rstd^2 sum_k gamma g xhat / K. With SCALE_DY also
    dys = rstd * dy in dy's dtype (M x N), grad_x's dot operand: rstd g = dys @ W, so grad_x holds no per-tap tile
    to scale."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    if BIG:
        rows = rows.to(tl.int64)
    rs = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    s0 = tl.zeros((BM,), dtype=tl.float32)
    s1 = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < N
        m = row_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * N + n[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * N + n[None, :], mask=m, other=0.0).to(tl.float32)
        wg = tl.load(coef_ptr + n, mask=n_ok, other=0.0)
        cv = tl.load(coef_ptr + NP + n, mask=n_ok, other=0.0)
        s0 += tl.sum(dy * (y - cv[None, :]), axis=1)
        s1 += tl.sum(dy * wg[None, :], axis=1)
        if SCALE_DY:
            tl.store(dys_ptr + rows[:, None] * N + n[None, :], (dy * rs[:, None]).to(dys_ptr.dtype.element_ty),
                     mask=m)
    tl.store(stat_ptr + rows, -rs * s1 / K, mask=row_ok)
    tl.store(stat_ptr + M + rows, rs * rs * s0 / K, mask=row_ok)


@triton.jit
def _backward_finish_kernel(
    part_ptr, db_ptr, w_ptr, nw_ptr, nb_ptr, gw_ptr, gb_ptr, gnw_ptr, gnb_ptr,
    N, NP, K, KP, CP, KHW, KW, G, swn, swk,
    HAS_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, TAP_MAJOR: tl.constexpr, ROWS: tl.constexpr,
    NI: tl.constexpr, NJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr,
):
    """Program (block of BK weight columns k, block of BN output rows n): sums the groups' partials in a fixed
    order, GB groups per step (loads in flight together), and writes grad_weight[n, k] (and grad_bias[n] = db[n],
    the fp32 sum dy, in k block 0); with the norm, the block's shares of grad_norm_weight[k] and grad_norm_bias[k] in
    gnw[n block, k] and gnb[n block, k]."""
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k_ok = k < K
    n_ok = n < N
    if TAP_MAJOR:
        q = (k % KHW) * CP + k // KHW
    elif ROWS:  # the tap-row order of _row_chunk
        r = k % KHW
        q = (k // KHW) * (NI * NJ) + (r // KW) * NJ + r % KW
    else:
        q = k
    m = k_ok[:, None] & n_ok[None, :]
    gs = tl.arange(0, GB)
    tile = part_ptr + (q[:, None] * NP + n[None, :])[None, :, :]
    acc = tl.zeros((GB, BK, BN), dtype=tl.float32)
    for g0 in range(0, G, GB):
        g = g0 + gs
        acc += tl.load(tile + (g * KP * NP)[:, None, None], mask=(g < G)[:, None, None] & m[None, :, :], other=0.0)
    d = tl.sum(acc, axis=0)
    db = tl.load(db_ptr + n, mask=n_ok, other=0.0)
    gw = d
    if HAS_NORM:
        gam = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        bet = tl.zeros((BK,), dtype=tl.float32)
        if HAS_NORM_BIAS:
            bet = tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        gw = gam[:, None] * d + bet[:, None] * db[None, :]
        w = tl.load(w_ptr + k[:, None] * swk + n[None, :] * swn, mask=m, other=0.0).to(tl.float32)
        tl.store(gnw_ptr + tl.program_id(1) * K + k, tl.sum(w * d, axis=1), mask=k_ok)
        tl.store(gnb_ptr + tl.program_id(1) * K + k, tl.sum(w * db[None, :], axis=1), mask=k_ok)
    tl.store(gw_ptr + n[None, :] * K + k[:, None], gw.to(gw_ptr.dtype.element_ty), mask=m)
    if tl.program_id(0) == 0:
        tl.store(gb_ptr + n, db.to(gb_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _backward_input_kernel(
    dy_ptr, wt_ptr, x_ptr, mean_ptr, rstd_ptr, stat_ptr, dx_ptr,
    M, L: tl.constexpr, LH: tl.constexpr, LW: tl.constexpr, C, H: tl.constexpr, W: tl.constexpr, N: tl.constexpr,
    NP: tl.constexpr, QC, QR, NUM_P,
    sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_NORM: tl.constexpr, SCALED: tl.constexpr, EVEN: tl.constexpr, BIG: tl.constexpr, PREC: tl.constexpr,
    BP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
):
    """Program (pixel block + NUM_P * (image * stride residue), channel block): grad_x of the pixels
    (rh + SH*u, rw + SW*v) of one image, summed over the taps (i, j) = (ti + SH*a, tj + SW*e) that reach them.
    wt[c*QC + (i*kw + j)*QR, n] = W[n, c*kh*kw + i*kw + j] (times gamma with the norm); with the norm, per token
    stat[0] = -rstd * sum_k gamma*g / K and stat[1] = rstd^2 * sum_k gamma*g*xhat / K (``_backward_stats_kernel``), so
    that a tap adds rstd * g + stat[0] - (x - mean) * stat[1]: rstd * g per tap, the rest per pixel once, from the
    taps' sums of stat[1] and of stat[0] + (mean - ref) * stat[1] (ref: the pixel's channel 0, near every mean
    that covers it, so that the difference keeps its digits when the mean is large against the spread). With
    SCALED (or without the norm) every tap's dot accumulates into one tile: dy is rstd * dy there (the statistics
    kernel writes it; not in fp16, where rstd * dy could pass 65504), else each tap's g is scaled by rstd after
    its dots. The geometry is constexpr: the divisions by the stride fold. EVEN: N a multiple of BN and C of BC
    (T2T-ViT's shapes), so that dy's and wt's blocks need no column or channel masks."""
    pid_r = _udiv(tl.program_id(0), NUM_P)
    pid_p = tl.program_id(0) - pid_r * NUM_P
    pid_c = tl.program_id(1)
    b = pid_r // (SH * SW)
    rh = (pid_r // SW) % SH
    rw = pid_r % SW
    if BIG:
        b = b.to(tl.int64)
    wr = (W - rw + SW - 1) // SW
    hr = (H - rh + SH - 1) // SH
    p = pid_p * BP + tl.arange(0, BP)
    p_ok = p < hr * wr
    uh = _udiv(p, wr)  # per row of every layout it is used in
    uw = p - uh * wr
    h = rh + SH * uh
    w = rw + SW * uw
    ch = pid_c * BC + tl.arange(0, BC)
    c_ok = ch < C
    pix_ok = p_ok[:, None] & c_ok[None, :]
    xpix = x_ptr + b * sxb + h * sxh + w * sxw
    if HAS_NORM:
        ref = tl.load(xpix, mask=p_ok, other=0.0).to(tl.float32)
    ti = (rh + PH) % SH
    tj = (rw + PW) % SW
    # the pixel at h is reached by tap i = ti + SH*a of token row (rh + PH) // SH + uh - a
    oh0 = (rh + PH) // SH + uh
    ow0 = (rw + PW) // SW + uw
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    bsum = tl.zeros((BP,), dtype=tl.float32)  # per pixel, over the taps: stat[0] + (mean - ref) * stat[1]
    s1sum = tl.zeros((BP,), dtype=tl.float32)  # and stat[1]
    for a in range(0, (KH - ti + SH - 1) // SH):
        oh = oh0 - a
        for e in range(0, (KW - tj + SW - 1) // SW):
            ow = ow0 - e
            tok_ok = p_ok & (oh >= 0) & (oh < LH) & (ow >= 0) & (ow < LW)
            row = b * L + oh * LW + ow
            r = (ti + SH * a) * KW + (tj + SW * e)
            g = acc if SCALED else tl.zeros((BP, BC), dtype=tl.float32)
            for n0 in range(0, N, BN):  # rows of tokens outside the image: dy 0
                n = n0 + tl.arange(0, BN)
                dyt = _dy_tile(dy_ptr + row[:, None] * N, n, tok_ok, N, True, EVEN)
                wrow = wt_ptr + (ch * QC + r * QR)[:, None] * NP + n[None, :]  # (BC, BN)
                if EVEN:  # every column and channel of the blocks exists
                    wt = tl.load(wrow)
                else:
                    wt = tl.load(wrow, mask=c_ok[:, None] & (n < N)[None, :], other=0.0)
                g = tl.dot(dyt.to(wt.dtype), tl.trans(wt), g, input_precision=PREC)
            if SCALED:
                acc = g
            else:
                acc += tl.load(rstd_ptr + row, mask=tok_ok, other=0.0)[:, None] * g
            if HAS_NORM:
                mu = tl.load(mean_ptr + row, mask=tok_ok, other=0.0)
                s0 = tl.load(stat_ptr + row, mask=tok_ok, other=0.0)
                s1 = tl.load(stat_ptr + M + row, mask=tok_ok, other=0.0)
                bsum += s0 + (mu - ref) * s1
                s1sum += s1
    if HAS_NORM:
        xv = tl.load(xpix[:, None] + ch[None, :] * sxc, mask=pix_ok, other=0.0).to(tl.float32)
        acc += bsum[:, None] - (xv - ref[:, None]) * s1sum[:, None]
    tl.store(dx_ptr + b * sdb + (h * sdh + w * sdw)[:, None] + ch[None, :] * sdc, acc.to(dx_ptr.dtype.element_ty),
             mask=pix_ok)


# ---------------------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(n)))


def _extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Largest element offset a kernel adds to the data pointer of a tensor of this shape and strides."""
    return sum((s - 1) * st for s, st in zip(shape, strides))


def _columns(n: int, cap: int) -> tuple[int, int, int]:
    """(BN0, BN1, groups): the n output columns in the fewest groups of at most cap, each covered by a program's
    two blocks of BN0 + BN1 columns (BN1 = 0: one block), powers of two."""
    groups = cdiv(n, cap)
    width = cdiv(n, groups)
    bn0 = max(16, 1 << (width.bit_length() - 1))
    rest = width - bn0
    return (bn0, 0, groups) if rest <= 0 else (bn0, _pow2(rest, 16, bn0), groups)


def _tiles(lh: int, lw: int, bm: int, interior) -> tuple[int, int]:
    """(TH, TW), TH*TW = bm: the 2-D token tile with the fewest tiles per image, then the most interior tiles
    (``interior(th, tw)`` counts them), then the widest."""
    best = None
    tw = 1
    while tw <= bm:
        th = bm // tw
        key = (cdiv(lh, th) * cdiv(lw, tw), -interior(th, tw), -tw)
        best = min(best, (key, th, tw)) if best else (key, th, tw)
        tw *= 2
    return best[1], best[2]


def _inside_range(t: int, ln: int, size: int, k: int, s: int, p: int) -> tuple[int, int]:
    """(lo, hi): the tiles lo..hi-1 of the cdiv(ln, t) tiles of t token positions along one axis are those whose
    patches all lie inside the image (a contiguous run; (0, 0) when none)."""
    inside = [r for r in range(cdiv(ln, t))
              if r * t * s >= p and ((r + 1) * t - 1) * s - p + k <= size and (r + 1) * t <= ln]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _inside(t: int, ln: int, size: int, k: int, s: int, p: int) -> int:
    """How many of the cdiv(ln, t) tiles of t token positions along one axis have every patch inside the image."""
    lo, hi = _inside_range(t, ln, size, k, s, p)
    return hi - lo


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_DEPTH: dict[tuple, int] = {}  # (kernel, geometry, launch constexprs) -> the pipelining depth that fitted
STEPPED_DOWN: dict[str, tuple[int, int]] = {}  # kernel name -> (depth asked, depth that fitted), when they differ


def _launch(kernel, grid: tuple[int, ...], geo: "_Geometry", *args, num_stages: int, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` pipelined ``num_stages`` deep, or as deep as the GPU's shared memory
    allows: Triton raises OutOfResources at the first launch of a kernel that needs more than the device has
    (compile-only checks for sm_90 find at most 112 KB of 227 at T2T-ViT shapes, but one GPU compile of an
    earlier kernel version needed 311 KB), so the depth steps down (a RuntimeWarning says so, ``STEPPED_DOWN``
    records it: slower, still correct), and the depth that fitted is remembered."""
    key = (kernel, geo, tuple(sorted(kwargs.items())))
    stages = _DEPTH.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **kwargs)
            break
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
    if key not in _DEPTH and stages != num_stages:
        name = getattr(kernel, "__name__", str(kernel))
        STEPPED_DOWN[name] = (num_stages, stages)
        warnings.warn(f"soft_split: {name} needs more shared memory than this GPU has at {num_stages} pipeline "
                      f"stages; it runs {stages} deep (slower)", RuntimeWarning, stacklevel=2)
    _DEPTH[key] = stages


def _device_guard(x: Tensor):
    """Launch on x's GPU whatever the current device is."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _plan(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
          weight: Tensor) -> "_Geometry":
    """The geometry of a call, planned once per shape (host time per call is a dictionary lookup)."""
    return _geometry(tuple(x.shape), tuple(x.stride()), x.dtype, tuple(kernel_size), tuple(stride),
                     tuple(padding), weight.shape[0], triton_interpret())


class _Geometry:
    """Shapes of one soft split (arguments checked at the front door), the q order, tiles and launch grids.

    Built from x's shape and strides, its dtype, the kernel geometry, the output width and whether Triton
    interprets (fp32 dot operands there); ``_plan`` caches one per distinct call."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype,
                 kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], out: int,
                 interpret: bool):
        self.k = (int(kernel_size[0]), int(kernel_size[1]))
        self.s = (int(stride[0]), int(stride[1]))
        self.p = (int(padding[0]), int(padding[1]))
        self.B, self.C, self.H, self.W = shape
        self.LH = (self.H + 2 * self.p[0] - self.k[0]) // self.s[0] + 1
        self.LW = (self.W + 2 * self.p[1] - self.k[1]) // self.s[1] + 1
        self.L = self.LH * self.LW
        self.M = self.B * self.L
        self.KHW = self.k[0] * self.k[1]
        self.K = self.C * self.KHW
        self.N = out
        # tap-major order when channels are x's densest axis (token tensors viewed as images)
        self.tap_major = self.C >= 16 and strides[1] < min(strides[2], strides[3])
        self.half = dtype != torch.float32  # 16-bit inputs: the larger tiles (also under the interpreter)
        self.shifted = not self.half  # the forward's dots take x - s (fp32), else x (see _forward_kernel)
        # fp32 takes half the q rows per backward chunk: its 3xTF32 operands would spill and overflow shared memory
        chunk = _BKB if self.half else _BKB // 2
        if self.tap_major:
            self.bk = min(chunk, 1 << (self.C.bit_length() - 1))  # q rows per chunk (one tap)
            self.CP = cdiv(self.C, self.bk) * self.bk
            self.KP = self.KHW * self.CP
        else:
            self.bk = chunk
            self.CP = self.C
            self.KP = cdiv(self.K, _BKB) * _BKB
        # tap-major chunks gather contiguous channels (16-byte loads, one tap each) when the channels are x's
        # unit-stride axis and need no padding to the chunk width; 16-bit inputs only (fp32 keeps the table
        # gathers, verified on the GPU at fp32 accuracy)
        self.contig = self.tap_major and self.CP == self.C and strides[1] == 1 and self.half
        self.BN0, self.BN1, self.col_groups = _columns(self.N, 256 if self.half else 192)  # fp32: 3xTF32 registers
        self.NP = self.col_groups * (self.BN0 + self.BN1)
        # the dot operands' dtype: fp32 under the interpreter, else x's
        self.dot_dtype = torch.float32 if interpret else dtype
        # 3xTF32 keeps fp32 accuracy on the tensor cores; only fp32 operands on a GPU look at it
        self.prec = "tf32x3" if self.dot_dtype == torch.float32 and not interpret else "tf32"
        # (NI, NJ): a patch's taps padded to powers of two (>= 2 wide), the tap-row order's tiles (see stats_rows)
        self.row_tile = (next_power_of_2(self.k[0]), max(2, next_power_of_2(self.k[1])))
        big = max(_extent(shape, strides), self.M * max(self.NP, self.KP), self.B * self.C * self.H * self.W)
        self.big = big > _INT32 // 2  # int64 offsets (with margin for padding and partial-buffer rows)
        # forward, 8 warps: 64 tokens per program (128 tokens held 203 registers at stage 2: one block per SM)
        self.fwd_bm = 64
        self.fwd_warps = 8
        # tap-major (every gather masked: no interior tiles to find) takes fwd_bm consecutive tokens of all B*L
        # (linear tiles): no program cut short at an image's last row (at stage 2, 784 programs, not 896)
        self.fwd_tile = self.token_tile(self.fwd_bm)
        self.stats_tile = self.token_tile(64)  # the LayerNorm statistics' tiles
        # 16-bit inputs, at most 192 columns (48 accumulator registers a thread): two stages deep under an
        # 80-register cap, three blocks of 8 warps per SM (uncapped: 103-116 registers, two blocks; tap-major three
        # stages deep: 96 KB of shared memory, two blocks). No spills with triton 3.6 or 3.9.
        capped = self.half and self.BN0 + self.BN1 <= 192
        self.fwd_maxnreg = 80 if capped else None
        # channel-major images whose taps along W are x's unit-stride axis and whose offsets are all even (as a
        # contiguous 224 or 384 px image at T2T-ViT's stage 1): each token's tap rows are read two taps at a time
        # (a pair never straddles the image's edge), addressed from the strides, in (NI, NJ) tiles of taps (powers of
        # two: rows >= kh and columns >= kw padding). The statistics always take them; the 16-bit forward (whose
        # loads then go straight into the dot as asynchronous copies) with one channel's NI * NJ taps per chunk,
        # 16 to 64 (stage 1: 8 x 8, 3 chunks where the table's order took 10 of 16 rows: 48 -> 36 us predicted)
        self.stats_rows = not self.tap_major and strides[3] == 1 and all(
            v % 2 == 0 for v in (self.W, self.s[1], self.p[1], strides[0], strides[1], strides[2]))
        self.fwd_rows = self.stats_rows and self.half and 16 <= math.prod(self.row_tile) <= 64
        # the statistics' warps: with tap rows one token per thread (their sums stay in it, see _stats_rows)
        self.stats_warps = math.prod(self.stats_tile) // 32 if self.stats_rows else 4
        # q rows per forward chunk: 16-bit tap-major inputs gather a whole tap (up to 64 channels); others 16 when
        # capped (32 spill at 80) or in fp32 (the 3xTF32 operands' registers), else 32
        if self.fwd_rows:
            self.fwd_bk = math.prod(self.row_tile)
        elif self.tap_major and self.half:
            self.fwd_bk = self.bk
        else:
            self.fwd_bk = min(self.bk, 16 if capped or not self.half else 32)
        # software-pipelining depth of the forward loop (2 in the backward): 3 only for uncapped 16-bit outputs up
        # to 256 columns; wider ones take 2 (shared memory)
        self.fwd_stages = 3 if self.half and not capped and self.BN0 + self.BN1 <= 256 else 2
        self.bwd_tile = self.tiles(64)
        # the weight kernel's tile arguments: TILES_H, TILES_W, the interior tiles' rows R0..R1-1 and columns
        # C0..C1-1 of an image, and the interior and border tiles of all images
        tpi, tiles_w = self.tile_args(self.bwd_tile)
        tiles_h = tpi // tiles_w
        r0, r1 = _inside_range(self.bwd_tile[0], self.LH, self.H, self.k[0], self.s[0], self.p[0])
        c0, c1 = _inside_range(self.bwd_tile[1], self.LW, self.W, self.k[1], self.s[1], self.p[1])
        inner = self.B * (r1 - r0) * (c1 - c0)
        self.bwd_tile_args = (tiles_h, tiles_w, r0, r1, c0, c1, inner, self.B * tpi - inner)
        # tap-major without interior tiles (every tile masked anyway): linear tiles, none cut short at a row's end
        # (B=64: 784 tiles at stage 2 where 2-D ones took 896; 196 at the final stage, not 256)
        self.bwd_linear = self.tap_major and inner == 0
        if self.bwd_linear:
            self.bwd_tile = (1, 64)
            self.bwd_tile_args = (1, 1, 0, 0, 0, 0, 0, cdiv(self.M, 64))
        # grad_x: pixels x channels per program
        # 16-bit: 128 pixels (two blocks per SM; 64 held three, at 30% more instructions: an issue floor over the
        # roofline, the same predicted time); fp32 (3xTF32 operands) 64 pixels and 32 channels
        self.dx_block = (128, _pow2(self.C, 16, 64)) if self.half else (64, _pow2(self.C, 16, 32))
        # the weight gradient's q rows: the forward's tap-row order too when a channel's taps fill one chunk (stage
        # 1: 8 x 8), the finishing kernel mapping them back to k
        self.bwd_rows = self.fwd_rows and math.prod(self.row_tile) == self.bk
        self.wkp = self.C * self.bk if self.bwd_rows else self.KP
        self.nkb = self.wkp // self.bk
        if self.fwd_rows:
            self.fwd_chunks = self.C
        else:
            self.fwd_chunks = self.KP // self.fwd_bk if self.tap_major else cdiv(self.K, self.fwd_bk)
        # the statistics kernel's chunks: at most 32 channels of a tap in tap-major order, else 16 rows (few
        # registers: many blocks per SM, with triton 3.6 as with 3.9)
        self.stats_bk = min(self.fwd_bk, 32) if self.tap_major else 16
        if self.stats_rows:
            self.stats_chunks = self.k[0]  # tap rows (of all C channels each)
        else:
            self.stats_chunks = self.KP // self.stats_bk if self.tap_major else cdiv(self.K, 16)
        # preparation programs of 16 q rows x 64 (or 16) columns: small tiles, many programs (it is latency-bound);
        # under the interpreter, whose cost is per program, a chunk of rows each
        self.prepare_block = (self.bk if interpret else 16, 64 if self.NP % 64 == 0 else 16)
        # grad_x pixel blocks per (image, stride residue)
        self.num_p = cdiv(cdiv(self.H, self.s[0]) * cdiv(self.W, self.s[1]), self.dx_block[0])
        self._grids: dict[int, dict[str, tuple[int, ...]]] = {}
        self._finish: dict[int, tuple[int, int, int]] = {}

    def tiles(self, bm: int) -> tuple[int, int]:
        def interior(th: int, tw: int) -> int:
            return (_inside(th, self.LH, self.H, self.k[0], self.s[0], self.p[0])
                    * _inside(tw, self.LW, self.W, self.k[1], self.s[1], self.p[1]))
        return _tiles(self.LH, self.LW, bm, interior)

    def token_tile(self, bm: int) -> tuple[int, int]:
        """(TH, TW) of the forward's and the statistics' bm-token tiles: linear (1, bm) in tap-major order, else
        2-D (``tiles``)."""
        return (1, bm) if self.tap_major else self.tiles(bm)

    def full(self, tile: tuple[int, int], linear: bool) -> bool:
        """Whether every row of every tile is a token: linear tiles (``LINEAR``: tile[1] consecutive tokens of all
        B*L) when B*L is a multiple of their size, 2-D tiles when they divide the token grid (T2T-ViT at B=64:
        all of them). The kernels then need no token mask (``FULL``)."""
        th, tw = tile
        return self.M % tw == 0 if linear else self.LH % th == 0 and self.LW % tw == 0

    def token_programs(self, tile: tuple[int, int]) -> int:
        """Programs over ``token_tile`` tiles: linear ones cover all B*L tokens, 2-D ones each image."""
        return cdiv(self.M, tile[1]) if self.tap_major else self.num_tiles(tile)

    def tile_args(self, tile: tuple[int, int]) -> tuple:
        """TPI, TILES_W of the kernels' tile arguments (tiles per image, per tile row; unused when linear)."""
        th, tw = tile
        tiles_w = cdiv(self.LW, tw)
        return (cdiv(self.LH, th) * tiles_w, tiles_w)

    def num_tiles(self, tile: tuple[int, int]) -> int:
        return self.B * self.tile_args(tile)[0]

    def groups(self, sms: int) -> int:
        """Token groups of the weight-gradient kernel: at most two programs per SM (the blocks an SM holds: a
        few programs more would run as a second wave of the same length), partials bounded."""
        tiles = self.bwd_tile_args[6] + self.bwd_tile_args[7]
        return max(1, min(tiles, (2 * sms) // (self.nkb * self.col_groups),
                          _PARTIAL_BYTES // (4 * self.wkp * self.NP)))

    def finish_block(self, sms: int) -> tuple[int, int, int]:
        """(BK, BN, GB) of the finishing kernel: one block of columns up to 512 (the norm gradients then come out
        whole), the most weight columns per program that still give about two programs per SM, and GB
        groups summed per step (a 4096-element tile: its loads in flight together)."""
        if sms in self._finish:
            return self._finish[sms]
        bn = min(next_power_of_2(self.N), 512)
        blocks = cdiv(self.N, bn)
        bk = 1
        while bk < 16 and cdiv(self.K, 2 * bk) * blocks >= 2 * sms:
            bk *= 2
        self._finish[sms] = bk, bn, max(1, min(next_power_of_2(self.groups(sms)), 4096 // (bk * bn)))
        return self._finish[sms]

    def grids(self, sms: int) -> dict[str, tuple[int, ...]]:
        """The launch grid of every kernel (for ``sms`` SMs); token blocks (or token groups, pixel blocks) on
        axis 0."""
        if sms not in self._grids:
            finish = self.finish_block(sms)
            self._grids[sms] = {
                "prepare": (self.KP // self.prepare_block[0], self.NP // self.prepare_block[1]),
                "stats": (self.token_programs(self.stats_tile),),
                "forward": (self.token_programs(self.fwd_tile), self.col_groups),
                "backward_weight": (self.groups(sms) * self.nkb, self.col_groups),
                "backward_finish": (cdiv(self.K, finish[0]), cdiv(self.N, finish[1])),
                "backward_stats": (cdiv(self.M, _STATS_BLOCK[0]),),
                "backward_input": (self.num_p * self.B * self.s[0] * self.s[1], cdiv(self.C, self.dx_block[1])),
            }
        return self._grids[sms]

    def prepare(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                norm_bias: Optional[Tensor], scale: bool, rows: bool = False
                ) -> tuple[Tensor, Optional[Tensor], tuple[Tensor, ...]]:
        """(KP, NP) W^T in q order and the dot dtype (times gamma with ``scale``), with ``scale`` the (2, NP)
        fp32 coefficients [W @ gamma, W @ beta + b], and the gather table (koff, bits). ``rows``: the forward's
        tap-row order instead ((C * NI * NJ, NP), see ``fwd_rows``; its table is unused)."""
        dev = weight.device
        kp = self.C * math.prod(self.row_tile) if rows else self.KP
        grid = self.grids(1)["prepare"]
        if rows:  # the channel-major grid's row blocks, or 16 rows (NI * NJ is a multiple of 16)
            grid = (kp // (self.prepare_block[0] if kp % self.prepare_block[0] == 0 else 16), grid[1])
        wt = torch.empty((kp, self.NP), dtype=self.dot_dtype, device=dev)
        coef = torch.empty((grid[0], 2, self.NP), dtype=torch.float32, device=dev) if scale else wt
        table = (torch.empty(kp, dtype=torch.int64 if self.big else torch.int32, device=dev),
                 torch.empty(kp, dtype=torch.int32, device=dev))
        _prepare_kernel[grid](
            weight, norm_weight if scale else weight, norm_bias if norm_bias is not None else weight,
            bias if bias is not None else weight, wt, coef, *table,
            self.N, self.NP, self.C, self.CP, self.K, self.k[0], self.k[1], self.KHW, weight.stride(0),
            weight.stride(1), x.stride(1), x.stride(2), x.stride(3),
            SCALE=scale, HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=bias is not None, TAP_MAJOR=self.tap_major,
            ROWS=rows, NI=self.row_tile[0], NJ=self.row_tile[1], BIG=self.big, BK=kp // grid[0],
            BN=self.NP // grid[1], num_warps=4,
        )
        return wt, coef.sum(dim=0) if scale else None, table

    def image_args(self) -> tuple:
        """L, LH, LW, H, W, KH, KW, SH, SW, PH, PW of the kernels' signatures."""
        return (self.L, self.LH, self.LW, self.H, self.W, *self.k, *self.s, *self.p)


_geometry = functools.lru_cache(maxsize=256)(_Geometry)


def verify(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], weight: Tensor,
           bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
           eps: float) -> Optional[str]:
    """None when these kernels take the ``forward`` call (and its backward), else the limit it passes.

    Shapes and dtype only (arguments already checked by the front door): no launch, no allocation, traceable.
    Large tensors are no limit: past 2^31 elements the kernels index in int64."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not one of {DTYPES}"
    out, K = weight.shape
    return first_exceeded(("C*kh*kw", K, MAX_K), ("out", out, MAX_OUT),
                          ("kernel_size (the gather table's tap bits)", max(kernel_size), 15))


def _refuse(reason: Optional[str]) -> None:
    if reason is not None:
        raise ValueError(f"soft_split (triton): {reason}")


def forward(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], weight: Tensor,
            bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, C, H, W), any strides; weight (out, K); bias (out,); norm_weight, norm_bias (K,).

    Returns y (B, L, out) in x.dtype and the LayerNorm's mean, rstd (B, L) fp32 ((0,) without norm_weight).
    """
    _refuse(verify(x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, eps))
    geo = _plan(x, kernel_size, stride, padding, weight)
    has_norm = norm_weight is not None
    with _device_guard(x):
        wt, coef, table = geo.prepare(x, weight, bias, norm_weight, norm_bias, scale=has_norm, rows=geo.fwd_rows)
        y = empty((geo.B, geo.L, geo.N), x.dtype, x.device)
        stats = (geo.B, geo.L) if has_norm else (0,)
        mean = empty(stats, torch.float32, x.device)
        rstd = empty(stats, torch.float32, x.device)
        cvec = coef[1] if has_norm else bias
        d = empty(stats, torch.float32, x.device) if geo.shifted else mean  # the fp32 forward's mean - s
        if has_norm:
            th, tw = geo.stats_tile
            _stats_kernel[geo.grids(1)["stats"]](
                x, *table, mean, rstd, d, *geo.tile_args(geo.stats_tile), geo.M, *geo.image_args(), geo.K,
                geo.C, geo.stats_chunks, max(1, geo.CP // geo.stats_bk), x.stride(0), x.stride(1), x.stride(2),
                x.stride(3), float(eps), CONTIG=geo.contig, BIG=geo.big, LINEAR=geo.tap_major,
                FULL=geo.full(geo.stats_tile, geo.tap_major), ROWS=geo.stats_rows,
                STORE_D=geo.shifted, TH=th, TW=tw, BK=geo.stats_bk, num_warps=geo.stats_warps,
            )
        th, tw = geo.fwd_tile
        _launch(
            _forward_kernel, geo.grids(1)["forward"], geo,
            x, wt, coef if has_norm else wt, cvec if cvec is not None else wt, *table, y, rstd, d,
            *geo.tile_args(geo.fwd_tile), geo.M, *geo.image_args(), geo.N, geo.NP, geo.fwd_chunks,
            max(1, geo.CP // geo.fwd_bk), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            HAS_NORM=has_norm, SHIFTED=geo.shifted, HAS_CVEC=cvec is not None, HAS_N1=geo.BN1 > 0, LINEAR=geo.tap_major,
            FULL=geo.full(geo.fwd_tile, geo.tap_major), CONTIG=geo.contig, ROWS=geo.fwd_rows, NI=geo.row_tile[0],
            NJ=geo.row_tile[1], BIG=geo.big, PREC=geo.prec,
            EVEN_N=geo.NP == geo.N, TH=th, TW=tw, BN0=geo.BN0, BN1=max(geo.BN1, 16), BK=geo.fwd_bk,
            num_warps=geo.fwd_warps, num_stages=geo.fwd_stages, maxnreg=geo.fwd_maxnreg,
        )
    return y, mean, rstd


def backward(grad_y: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
             y: Optional[Tensor], mean: Tensor, rstd: Tensor,
             compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_y (B, L, out); x, weight, bias, norm_weight, norm_bias as in ``forward``; y, mean, rstd what it
    returned (y is only read with the norm and compute_grad_x, and must be given then).

    Returns grad_x (B, C, H, W) in x.dtype with x's strides (or (0,) when not compute_grad_x), grad_weight
    (out, K) and grad_bias (out,) in weight.dtype, grad_norm_weight and grad_norm_bias (K,) fp32 ((0,) without
    norm_weight).
    """
    _refuse(verify(x, kernel_size, stride, padding, weight, None, norm_weight, norm_bias, 0.0))
    geo = _plan(x, kernel_size, stride, padding, weight)
    B, C, N, K, M = geo.B, geo.C, geo.N, geo.K, geo.M
    has_norm = norm_weight is not None
    need_stats = has_norm and compute_grad_x
    if need_stats and (y is None or tuple(y.shape) != (B, geo.L, N) or y.dtype != x.dtype):
        raise ValueError("soft_split (triton): y (the forward's output) is needed with norm_weight and "
                         f"compute_grad_x, ({B}, {geo.L}, {N}) in {x.dtype}; got "
                         f"{None if y is None else (tuple(y.shape), y.dtype)}")
    with _device_guard(x):
        if has_norm:
            mean, rstd = mean.contiguous(), rstd.contiguous()
        dy = grad_y.contiguous()
        wt, coef, table = geo.prepare(x, weight, bias, norm_weight if need_stats else None, norm_bias,
                                      scale=need_stats)
        sms = _num_sms(x.device.index or 0) if x.is_cuda else _CPU_SMS
        grids = geo.grids(sms)
        groups = grids["backward_weight"][0] // geo.nkb
        part = torch.empty((groups, geo.wkp, geo.NP), dtype=torch.float32, device=x.device)
        dbp = torch.empty((groups * geo.nkb, geo.NP), dtype=torch.float32, device=x.device)
        th, tw = geo.bwd_tile
        _launch(
            _backward_weight_kernel, grids["backward_weight"], geo,
            x, dy, wt, *table, mean if has_norm else wt, rstd if has_norm else wt, part, dbp,
            *geo.bwd_tile_args, M, *geo.image_args(), N, geo.NP, geo.wkp, geo.nkb, groups, max(1, geo.CP // geo.bk),
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            HAS_NORM=has_norm, HAS_N1=geo.BN1 > 0, CONTIG=geo.contig, ROWS=geo.bwd_rows, NI=geo.row_tile[0],
            NJ=geo.row_tile[1], BIG=geo.big, PREC=geo.prec,
            INNER=geo.bwd_tile_args[6] > 0, LINEAR=geo.bwd_linear, FULL=geo.full(geo.bwd_tile, geo.bwd_linear),
            EVEN_N=geo.NP == N, TH=th, TW=tw, BN0=geo.BN0, BN1=max(geo.BN1, 16), BK=geo.bk,
            num_warps=8, num_stages=2,
        )
        grad_weight = empty((N, K), weight.dtype, x.device)
        grad_bias = empty((N,), weight.dtype, x.device)
        col_blocks = grids["backward_finish"][1]
        # the norm gradients: written whole by a single block of columns, else one share per block, summed here
        shares = [empty((col_blocks, K) if has_norm else (1, 0), torch.float32, x.device) for _ in range(2)]
        bk, bn, gb = geo.finish_block(sms)
        # db: the weight programs' rows of sum dy, added by torch (deterministic; the finishing kernel's programs
        # would each have to add them all)
        _backward_finish_kernel[grids["backward_finish"]](
            part, dbp.sum(dim=0), weight, norm_weight if has_norm else wt,
            norm_bias if norm_bias is not None else wt,
            grad_weight, grad_bias, *shares, N, geo.NP, K, geo.wkp, geo.CP, geo.KHW, geo.k[1], groups,
            weight.stride(0), weight.stride(1), HAS_NORM=has_norm, HAS_NORM_BIAS=norm_bias is not None,
            TAP_MAJOR=geo.tap_major, ROWS=geo.bwd_rows, NI=geo.row_tile[0], NJ=geo.row_tile[1], BK=bk, BN=bn, GB=gb,
            num_warps=8,
        )
        grad_norm_weight, grad_norm_bias = (t.sum(dim=0) if col_blocks > 1 else t[0] for t in shares)
        if not compute_grad_x:
            return empty((0,), x.dtype, x.device), grad_weight, grad_bias, grad_norm_weight, grad_norm_bias
        stat, dyx = wt, dy  # grad_x's dy operand: rstd * dy with the norm (not in fp16: its range)
        scaled = not need_stats or dy.dtype != torch.float16
        if need_stats:
            stat = torch.empty((2, M), dtype=torch.float32, device=x.device)
            if scaled:
                dyx = torch.empty_like(dy)
            _backward_stats_kernel[grids["backward_stats"]](dy, y.contiguous(), coef, rstd, stat, dyx, M, N, geo.NP,
                                                             K, SCALE_DY=scaled, BIG=geo.big, BM=_STATS_BLOCK[0],
                                                             BN=_STATS_BLOCK[1], num_warps=4)
        grad_x = empty_like(x)  # x's strides: a token view's channels are contiguous (vector stores)
        sh, sw = geo.s
        bp, bc = geo.dx_block
        qc, qr = (1, geo.CP) if geo.tap_major else (geo.KHW, 1)
        _launch(
            _backward_input_kernel, grids["backward_input"], geo,
            dyx, wt, x, mean if has_norm else wt, rstd if has_norm else wt, stat, grad_x,
            M, geo.L, geo.LH, geo.LW, C, geo.H, geo.W, N, geo.NP, qc, qr, geo.num_p, *x.stride(), *grad_x.stride(),
            KH=geo.k[0], KW=geo.k[1], SH=sh, SW=sw, PH=geo.p[0], PW=geo.p[1], HAS_NORM=has_norm, SCALED=scaled,
            EVEN=N % _DX_BN == 0 and C % bc == 0, BIG=geo.big, PREC=geo.prec, BP=bp, BC=bc, BN=_DX_BN, num_warps=8,
            num_stages=3,
        )
    return grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias

