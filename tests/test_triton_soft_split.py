"""Triton backend of soft_split (kernels/soft_split.py) against t2t_fast.reference.soft_split.

On CPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are tiny;
the `gpu` tests run the full T2T-ViT geometries on a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

import t2t_fast
from t2t_fast import reference

pytest.importorskip("triton")
if not t2t_fast.backends()["triton"]:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)

from t2t_fast.kernels import soft_split as kernel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _inputs(B, C, H, W, k, out, tokens, norm, norm_bias, bias, dtype, device=DEV, mean=0.0, spread=1.0):
    """Leaf tensors (x, weight, bias, norm_weight, norm_bias) that require grad. ``tokens``: x is a
    (B, H*W, C) token tensor viewed as (B, C, H, W), as the T2T module re-structurizes it."""
    kh, kw = (k, k) if isinstance(k, int) else k
    K = C * kh * kw
    if tokens:
        x = (mean + spread * torch.randn(B, H * W, C, device=device)).to(dtype).transpose(1, 2).reshape(B, C, H, W)
    else:
        x = (mean + spread * torch.randn(B, C, H, W, device=device)).to(dtype)
    w = (torch.randn(out, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(out, device=device).to(dtype) if bias else None
    nw = 1 + 0.2 * torch.randn(K, device=device) if norm else None
    nb = 0.2 * torch.randn(K, device=device) if norm and norm_bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, nw, nb)]


def _close(actual, expected, tol):
    """Relative to the largest magnitude of ``expected`` (the scale the reduction's rounding works at)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    expected = expected.double()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def _check_against_reference(geometry, leaves, dtype, tol=None):
    """Forward and every gradient of the triton backend vs the float64 reference on the same (rounded) inputs."""
    tol = tol or TOL[dtype]
    k, s, p = geometry
    with t2t_fast.backend("triton"):
        y = t2t_fast.soft_split(leaves[0], k, s, p, *leaves[1:])
    grad = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(grad)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    y_ref = reference.soft_split(ref[0], k, s, p, *ref[1:])
    y_ref.backward(grad.double())
    assert y.dtype == dtype
    _close(y, y_ref.to(y.dtype), tol)
    for name, t, r in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), leaves, ref):
        if t is not None:
            assert t.grad is not None, f"no gradient for {name}"
            _close(t.grad, r.grad.to(t.grad.dtype), tol)


# (B, C, H, W, kernel, stride, padding, out, tokens, norm, norm_bias, bias, dtype)
CASES = [
    (2, 3, 17, 19, 7, 4, 2, 24, False, True, True, True, torch.float32),  # stage 0 geometry
    (1, 4, 10, 9, 3, 2, 1, 20, True, True, True, True, torch.float32),  # stage 1/2 geometry on a token view
    (2, 3, 20, 19, 2, 1, 0, 70, False, True, False, False, torch.float32),  # many token blocks, 2 out chunks
    (1, 3, 12, 9, 3, 3, 0, 16, True, False, False, True, torch.float32),  # no norm
    (1, 5, 9, 14, (3, 2), (2, 1), (1, 0), 18, True, True, True, False, torch.float32),  # non-square geometry
    (1, 20, 9, 8, 3, 2, 1, 24, True, True, True, True, torch.float32),  # C >= 16 token view: tap-major order
    (1, 16, 6, 7, (2, 3), (1, 2), (0, 1), 20, True, False, False, True, torch.float32),
    (2, 3, 11, 13, 3, 2, 1, 20, False, False, False, False, torch.bfloat16),
    (1, 4, 10, 9, 3, 2, 1, 20, True, True, True, True, torch.float16),
    (1, 3, 17, 15, 7, 4, 2, 24, False, True, True, True, torch.bfloat16),
    (1, 3, 17, 16, 7, 4, 2, 24, False, True, True, True, torch.float16),  # even W: every tap-row path in fp16
    (2, 32, 8, 7, 3, 2, 1, 70, True, True, True, True, torch.bfloat16),
    (1, 20, 5, 6, 3, 2, 1, 300, True, True, True, True, torch.float32),  # column groups (fp32: two of 128 + 32)
    (1, 3, 6, 5, 3, 2, 1, 520, False, False, False, True, torch.bfloat16),  # column groups (three of 128 + 64)
    (1, 3, 6, 5, 3, 2, 1, 520, False, True, True, True, torch.float32),  # norm gradients in two column blocks
    (1, 4, 5, 70, 3, 1, 1, 8, True, True, True, True, torch.float32),  # grad_x: two pixel blocks across a row
    (1, 16, 12, 23, 3, 1, 1, 24, True, True, True, True, torch.bfloat16),  # 16-bit grad_x: three of 128 pixels
    (2, 32, 6, 7, 3, 2, 1, 48, True, True, True, True, torch.bfloat16),  # 32 + 16 columns, all inside out
    (1, 64, 6, 5, 3, 2, 1, 24, True, True, True, True, torch.bfloat16),  # contiguous gathers, 2 chunks per tap
    # grad_x's unmasked blocks (columns a multiple of 64, channels of the channel block), with and without the norm
    (1, 16, 7, 6, 3, 2, 1, 64, True, True, True, True, torch.bfloat16),
    (1, 16, 6, 6, 3, 2, 1, 128, True, False, False, True, torch.float32),
    # interior tiles with every column a real one: the weight gradient's unmasked dy, mean and rstd loads
    (2, 3, 20, 19, 2, 1, 0, 32, False, True, True, True, torch.float32),
    (2, 3, 20, 19, 2, 1, 0, 48, False, True, False, True, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}-k{c[4]}s{c[5]}p{c[6]}-out{c[7]}-"
                         f"{'tok' if c[8] else 'img'}-{'norm' if c[9] else 'nonorm'}-{str(c[12])[6:]}")
def test_matches_reference(case, poisoned):
    B, C, H, W, k, s, p, out, tokens, norm, norm_bias, bias, dtype = case
    leaves = _inputs(B, C, H, W, k, out, tokens, norm, norm_bias, bias, dtype)
    _check_against_reference((k, s, p), leaves, dtype)


@pytest.mark.parametrize("tokens, padding, W", [(False, 1, 11), (True, 1, 11), (False, 2, 12)],
                         ids=["nchw", "tokens", "nchw-paired-taps"])
def test_large_mean_keeps_variance_accurate(tokens, padding, W, poisoned):
    """x = 100 + 0.01*noise: a one-pass E[x^2] - E[x]^2 in fp32 would lose about 4 digits."""
    leaves = _inputs(2, 4, 9, W, 3, 16, tokens, True, True, True, torch.float32, mean=100.0, spread=0.01)
    assert kernel._plan(leaves[0], [3, 3], [2, 2], [padding] * 2, leaves[1]).stats_rows == (padding == 2)
    x64 = leaves[0].detach().double()
    ref64 = [t.detach().double() for t in leaves[1:]]
    y, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(leaves[0].detach(), [3, 3], [2, 2], [padding] * 2,
                                                                 *[t.detach() for t in leaves[1:]], 1e-5)
    _close(y, reference.soft_split(x64, 3, 2, padding, *ref64).float(), 1e-5)
    cols = torch.nn.functional.unfold(x64, 3, padding=padding, stride=2).transpose(1, 2)
    _close(mean, cols.mean(-1).float(), 1e-6)
    _close(rstd, (cols.var(-1, unbiased=False) + 1e-5).rsqrt().float(), 1e-4)
    # the backward works from the saved fp32 mean, whose rounding (1e-5 of the spread here) bounds its accuracy
    _check_against_reference((3, 2, padding), leaves, torch.float32, tol=1e-3)


def test_bf16_tap_pair_statistics_far_from_zero(poisoned):
    """Stage 1's statistics path (bf16 tap pairs read as int32 words, one token per thread, border and interior
    tiles) at x = 300 + 4*noise: mean and rstd as float64 computes them from the same bf16 values."""
    leaves = _inputs(2, 3, 38, 40, 7, 16, False, True, True, True, torch.bfloat16, mean=300.0, spread=4.0)
    assert kernel._plan(leaves[0], [7, 7], [4, 4], [2, 2], leaves[1]).stats_rows
    _, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(leaves[0].detach(), [7, 7], [4, 4], [2, 2],
                                                                 *[t.detach() for t in leaves[1:]], 1e-5)
    cols = torch.nn.functional.unfold(leaves[0].detach().double(), 7, padding=2, stride=4).transpose(1, 2)
    _close(mean, cols.mean(-1).float(), 1e-6)
    _close(rstd, (cols.var(-1, unbiased=False) + 1e-5).rsqrt().float(), 1e-5)


@pytest.mark.parametrize("tokens", [False, True])
def test_16bit_forward_far_from_zero(tokens, poisoned):
    """bf16 x = 100 + noise: the 16-bit forward's dots take x itself and subtract mean * (W @ gamma) after them."""
    leaves = _inputs(2, 16, 9, 11, 3, 16, tokens, True, True, True, torch.bfloat16, mean=100.0, spread=1.0)
    assert not kernel._plan(leaves[0], [3, 3], [2, 2], [1, 1], leaves[1]).shifted
    _check_against_reference((3, 2, 1), leaves, torch.bfloat16)


def test_fp16_large_gradients_on_flat_patches_stay_finite(poisoned):
    """A flat patch has rstd = 1/sqrt(eps) = 316: times a gradient of 240 that is 76000, past fp16's 65504, though
    grad_x itself is not. In fp16 grad_x therefore scales each tap's dy @ W by rstd after the dots (bf16 and fp32
    take rstd * dy as their dot operand)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    tokens = torch.full((1, 49, 16), 0.75, device=DEV)
    tokens[:, :7] += torch.rand(1, 7, 16, device=DEV, generator=gen)  # image row 0: patches below it are flat
    x = tokens.half().transpose(1, 2).reshape(1, 16, 7, 7).requires_grad_()
    w = (0.25 * torch.randn(8, 144, device=DEV, generator=gen) / 12).half().requires_grad_()
    nw = (1 + 0.2 * torch.randn(144, device=DEV, generator=gen)).requires_grad_()
    with t2t_fast.backend("triton"):
        y = t2t_fast.soft_split(x, 3, 2, 1, w, None, nw)
    dy = (240 + torch.rand(y.shape, device=DEV, generator=gen)).half()
    y.backward(dy)
    x64, w64, nw64 = (t.detach().double().requires_grad_() for t in (x, w, nw))
    reference.soft_split(x64, 3, 2, 1, w64, None, nw64).backward(dy.double())
    assert torch.isfinite(x.grad).all()
    _close(x.grad, x64.grad.half(), TOL[torch.float16])


def test_operators_without_norm_and_without_grad_x(poisoned):
    x, _, b, _, _ = _inputs(1, 3, 9, 10, 3, 12, False, False, False, True, torch.float32)
    x, b = x.detach(), b.detach()
    w = torch.randn(27, 12, device=DEV).t()  # a transposed (non-contiguous) weight
    y, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(x, [3, 3], [2, 2], [1, 1], w, b, None, None, 1e-5)
    assert mean.shape == (0,) and rstd.shape == (0,) and mean.dtype == torch.float32
    _close(y, reference.soft_split(x, 3, 2, 1, w, b), 1e-5)
    gy = torch.randn_like(y)
    gx, gw, gb, gnw, gnb = torch.ops.t2t_fast_triton.soft_split_backward(gy, x, [3, 3], [2, 2], [1, 1], w, b, None,
                                                                         None, None, mean, rstd, False)
    assert gx.shape == (0,) and gnw.shape == (0,) and gnb.shape == (0,)
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)
    _close(gw, torch.einsum("bln,blk->nk", gy, cols), 1e-5)
    _close(gb, gy.sum((0, 1)), 1e-5)


def _tiny(tokens=False):
    x, w, b, nw, nb = _inputs(1, 3, 7, 8, 3, 10, tokens, True, True, True, torch.float32)
    return x, w, b, nw, nb


@pytest.mark.parametrize("tokens", [False, True], ids=["nchw", "tokens"])
def test_opcheck(tokens):
    """The fake functions match the kernels (strides included: grad_x has x's, (B, L, C)-contiguous for a token
    view; the forward's outputs do not depend on x's layout, so it is checked once)."""
    x, w, b, nw, nb = _tiny(tokens)
    if not tokens:
        torch.library.opcheck(torch.ops.t2t_fast_triton.soft_split_forward.default,
                              (x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, 1e-5))
    with torch.no_grad():
        y, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, 1e-5)
    args = (torch.randn_like(y), x.detach(), [3, 3], [2, 2], [1, 1], w.detach(), b.detach(), nw.detach(),
            nb.detach(), y, mean, rstd, True)
    torch.library.opcheck(torch.ops.t2t_fast_triton.soft_split_backward.default, args)
    assert torch.ops.t2t_fast_triton.soft_split_backward(*args)[0].stride() == x.stride()


def test_backward_needs_y_for_the_norm_sums():
    """With the LayerNorm and grad_x the backward takes its per-token sums from the forward's y: without it, a
    ValueError naming y (never a wrong gradient)."""
    x, w, b, nw, nb = (t.detach() for t in _tiny())
    y, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, 1e-5)
    args = [torch.randn_like(y), x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, None, mean, rstd, True]
    for bad in (None, y[:, :-1], y.double()):
        args[9] = bad
        with pytest.raises(ValueError, match="y .the forward's output. is needed"):
            torch.ops.t2t_fast_triton.soft_split_backward(*args)
    args[-1] = False  # no grad_x: y is not read
    assert torch.ops.t2t_fast_triton.soft_split_backward(*args)[0].shape == (0,)


def test_torch_compile():
    x, w, b, nw, nb = _tiny()

    def front_door(x, w, b, nw, nb):
        return t2t_fast.soft_split(x, 3, 2, 1, w, b, nw, nb).square().sum()

    def operator(x, w, b, nw, nb):
        return torch.ops.t2t_fast_triton.soft_split_forward(x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, 1e-5)[0]

    expected = reference.soft_split(x, 3, 2, 1, w, b, nw, nb)
    grads = torch.autograd.grad(expected.square().sum(), (x, w, b, nw, nb))
    with t2t_fast.backend("triton"):
        loss = torch.compile(front_door, backend="aot_eager")(x, w, b, nw, nb)
    for g, r in zip(torch.autograd.grad(loss, (x, w, b, nw, nb)), grads):
        _close(g, r, 1e-5)
    y = torch.compile(operator, backend="aot_eager", fullgraph=True)(x, w, b, nw, nb)
    _close(y, expected, 1e-5)
    for g, r in zip(torch.autograd.grad(y.square().sum(), (x, w, b, nw, nb)), grads):
        _close(g, r, 1e-5)


def test_autocast_returns_autocast_dtype():
    x, w, b, nw, nb = _tiny()
    device_type = torch.device(DEV).type
    with torch.autocast(device_type, dtype=torch.bfloat16), t2t_fast.backend("triton"):
        y = t2t_fast.soft_split(x, 3, 2, 1, w, b, nw, nb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    _close(y.float(), reference.soft_split(x, 3, 2, 1, w, b, nw, nb).detach(), 2e-2)


def test_verify_names_the_limits():
    x = torch.randn(1, kernel.MAX_K // 9 + 1, 3, 3, device=DEV)
    w = torch.randn(4, x.shape[1] * 9, device=DEV)
    assert "exceeds" in kernel.verify(x, [3, 3], [1, 1], [0, 0], w, None, None, None, 1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        kernel.forward(x, [3, 3], [1, 1], [0, 0], w, None, None, None, 1e-5)
    x = torch.randn(1, 2, 5, 5, device=DEV)
    w = torch.randn(kernel.MAX_OUT + 1, 18, device=DEV)
    assert "out=" in kernel.verify(x, [3, 3], [2, 2], [1, 1], w, None, None, None, 1e-5)
    x = torch.randn(1, 1, 20, 20, device=DEV)
    assert "kernel_size" in kernel.verify(x, [16, 1], [1, 1], [0, 0], torch.randn(4, 16, device=DEV), None, None,
                                          None, 1e-5)
    x = torch.randn(1, 2, 5, 5, device=DEV, dtype=torch.float64)
    assert "dtype" in kernel.verify(x, [3, 3], [2, 2], [1, 1], x.new_ones(4, 18), None, None, None, 1e-5)
    x = torch.randn(2, 3, 9, 10, device=DEV)
    assert kernel.verify(x, [3, 3], [2, 2], [1, 1], torch.randn(5, 27, device=DEV), None, None, None, 1e-5) is None


@pytest.mark.parametrize("n, cap, expected", [
    (192, 256, (128, 64, 1)),  # T2T-ViT's token layers: one program covers every column
    (384, 256, (128, 64, 2)),  # the final soft split: two groups of 192, not one program of 384
    (384, 192, (128, 64, 2)),  # fp32
    (300, 192, (128, 32, 2)),
    (100, 256, (64, 64, 1)),
    (16, 256, (16, 0, 1)),
    (4096, 256, (256, 0, 16)),
])
def test_column_groups(n, cap, expected):
    """Output columns in the fewest groups of at most cap, each a program's two power-of-two blocks, and no fewer
    padded columns than the groups need."""
    bn0, bn1, groups = kernel._columns(n, cap)
    assert (bn0, bn1, groups) == expected
    assert n <= groups * (bn0 + bn1) and bn0 + bn1 <= max(cap, 16)


@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_launch_grids_at_1024px(stage, batch):
    """No grid axis past CUDA's limits (axis 0 < 2^31, axes 1-2 <= 65535) at 1024 px; int64 offsets once an
    element index can pass 2^31. Meta tensors: nothing is allocated or launched."""
    C, down, k, s, p, out, tokens = [(3, 1, 7, 4, 2, 192, False), (64, 4, 3, 2, 1, 192, True),
                                      (64, 8, 3, 2, 1, 384, True)][stage]
    side = 1024 // down
    if tokens:
        x = torch.empty(batch, side * side, C, device="meta").transpose(1, 2).reshape(batch, C, side, side)
    else:
        x = torch.empty(batch, C, side, side, device="meta")
    geo = kernel._plan(x, [k, k], [s, s], [p, p], torch.empty(out, C * k * k, device="meta"))
    for name, grid in geo.grids(132).items():
        assert 1 <= grid[0] < 2**31 and all(1 <= g <= 65535 for g in grid[1:]), (name, grid)
    assert geo.big == (max(x.numel(), geo.M * max(geo.NP, geo.KP)) > 2**30)
    if stage == 0:
        assert geo.grids(132)["forward"][0] > 65535  # the case that failed with token blocks on axis 1


def test_interior_and_border_tiles_both_run(poisoned):
    """Interior tiles (the statistics' and the weight gradient's unmasked gathers) next to border ones; and the
    same image in tap-major order (there the forward and the statistics take linear tiles, every gather masked,
    and the weight gradient 2-D tiles of both kinds), with the table's gathers (fp32) and with contiguous ones
    (bf16)."""
    for tokens, C, dtype, H, W in ((False, 3, torch.float32, 24, 26), (True, 16, torch.float32, 26, 24),
                                   (True, 16, torch.bfloat16, 24, 24)):
        leaves = _inputs(1, C, H, W, 3, 20, tokens, True, True, True, dtype)
        geo = kernel._plan(leaves[0], [3, 3], [1, 1], [1, 1], leaves[1])
        tile = geo.bwd_tile if tokens else geo.stats_tile
        assert geo.fwd_tile[0] == 1 if tokens else geo.fwd_tile[0] > 1
        inside = kernel._inside(tile[0], geo.LH, H, 3, 1, 1) * kernel._inside(tile[1], geo.LW, W, 3, 1, 1)
        assert 0 < inside < geo.num_tiles(tile)
        assert geo.contig == (dtype == torch.bfloat16)
        _check_against_reference((3, 1, 1), leaves, dtype)


@pytest.mark.parametrize("k, s, p, H, W, dtype", [
    (7, 4, 2, 70, 72, torch.bfloat16),  # stage 1's geometry: 7 taps and a dropped eighth column per tap row
    (5, 2, 0, 38, 40, torch.float32),  # 5 taps: a last pair of one tap
    ((3, 4), (1, 2), (1, 2), 24, 40, torch.float16),  # 4 taps: no dropped column
], ids=["k7s4p2-bf16", "k5s2p0-fp32", "k3x4s1x2p1x2-fp16"])
def test_tap_rows_read_in_pairs(k, s, p, H, W, dtype, poisoned):
    """Channel-major images with even offsets along W: the statistics' tap-row path (``_Geometry.stats_rows``), its
    interior and border tiles both, and in 16-bit the forward's (``fwd_rows``) and, with 8 x 8 taps, the weight
    gradient's (``bwd_rows``); an odd width or padding takes the table's gathers."""
    leaves = _inputs(1, 3, H, W, k, 24, False, True, True, True, dtype)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    geo = kernel._plan(leaves[0], pair(k), pair(s), pair(p), leaves[1])
    assert geo.stats_rows and geo.stats_chunks == pair(k)[0]  # one trip per tap row, of the 3 channels
    assert geo.fwd_rows == (dtype != torch.float32) and (geo.fwd_chunks == 3 or not geo.fwd_rows)
    assert geo.bwd_rows == (k == 7) and geo.nkb == (3 if k == 7 else geo.KP // geo.bk)
    tile = geo.stats_tile
    inside = (kernel._inside(tile[0], geo.LH, H, geo.k[0], geo.s[0], geo.p[0])
              * kernel._inside(tile[1], geo.LW, W, geo.k[1], geo.s[1], geo.p[1]))
    assert 0 < inside < geo.num_tiles(tile)
    _check_against_reference((k, s, p), leaves, dtype)
    odd = kernel._plan(leaves[0][..., :-1], pair(k), pair(s), pair(p), leaves[1])
    assert not odd.stats_rows and not kernel._plan(leaves[0], pair(k), pair(s), (1, 1), leaves[1]).stats_rows


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the inf
def test_non_finite_pixel_reaches_the_patches_that_read_it():
    """An inf pixel makes every token whose patch holds it non-finite and no token beyond those that read it: on
    the 16-bit tap-row path, also the token whose padded eighth column reaches it (docs/ops.md)."""
    x, w, b, nw, nb = (t.detach() if t is not None else None
                       for t in _inputs(1, 3, 18, 22, 7, 16, False, True, True, True, torch.bfloat16))
    assert kernel._plan(x, [7, 7], [4, 4], [2, 2], w).fwd_rows
    x[0, 1, 9, 13] = float("inf")
    with t2t_fast.backend("triton"):
        bad = ~torch.isfinite(t2t_fast.soft_split(x, 7, 4, 2, w, b, nw, nb)).all(-1)[0]
    hit = torch.zeros(1, 1, 18, 22)
    hit[0, 0, 9, 13] = 1
    holds = torch.nn.functional.unfold(torch.nn.functional.pad(hit, (2, 2, 2, 2)), 7, stride=4).sum(1)[0] > 0
    reads = torch.nn.functional.unfold(torch.nn.functional.pad(hit, (2, 3, 2, 2)), (7, 8), stride=4).sum(1)[0] > 0
    assert holds.any() and bool((bad >= holds).all()) and bool((bad <= reads).all())


# ---------------------------------------------------------------------------------------------------------
# Full T2T-ViT geometries on a GPU (B=8, 224 px)
# ---------------------------------------------------------------------------------------------------------
# (C, H, W, kernel, stride, padding, out, tokens, norm): soft split 0 + norm1 + kqv of the token performer,
# soft split 1 + norm1 + kqv, soft split 2 + project to embed_dim 384 (t2t_vit_14)
STAGES = {
    "stage0": (3, 224, 224, 7, 4, 2, 192, False, True),
    "stage1": (64, 56, 56, 3, 2, 1, 192, True, True),
    "stage2": (64, 28, 28, 3, 2, 1, 384, True, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", list(STAGES))
def test_t2t_geometries_on_gpu(stage, dtype, poisoned):
    C, H, W, k, s, p, out, tokens, norm = STAGES[stage]
    leaves = _inputs(8, C, H, W, k, out, tokens, norm, norm, True, dtype, device="cuda")
    _check_against_reference((k, s, p), leaves, dtype, tol=1e-4 if dtype == torch.float32 else 1e-2)
    # every launch fitted the shared memory at the depth planned (compile-only checks say so; a GPU may not)
    assert not kernel.STEPPED_DOWN, kernel.STEPPED_DOWN


@pytest.mark.gpu
def test_backward_is_deterministic_on_gpu():
    C, H, W, k, s, p, out, tokens, norm = STAGES["stage1"]
    leaves = _inputs(8, C, H, W, k, out, tokens, norm, norm, True, torch.bfloat16, device="cuda")
    x = leaves[0].detach()
    params = [t.detach() for t in leaves[1:]]
    y, mean, rstd = torch.ops.t2t_fast_triton.soft_split_forward(x, [k, k], [s, s], [p, p], *params, 1e-5)
    args = (torch.randn_like(y), x, [k, k], [s, s], [p, p], *params, y, mean, rstd, True)
    first = torch.ops.t2t_fast_triton.soft_split_backward(*args)
    second = torch.ops.t2t_fast_triton.soft_split_backward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launch_steps_down_the_pipelining_depth_that_does_not_fit(monkeypatch):
    """A launch whose shared memory the GPU cannot hold (Triton's OutOfResources) runs again less deep; the depth
    that fitted is kept for the next call of the same kernel and geometry."""
    tried = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                tried.append(num_stages)
                if num_stages > 1:
                    raise kernel.OutOfResources(300 * 1024, 227 * 1024, "shared memory")
            return run

    monkeypatch.setattr(kernel, "_DEPTH", {})
    monkeypatch.setattr(kernel, "STEPPED_DOWN", {})
    k, geo = Kernel(), object()
    with pytest.warns(RuntimeWarning, match="runs 1 deep"):
        kernel._launch(k, (1,), geo, num_stages=3, BK=16)
    kernel._launch(k, (1,), geo, num_stages=3, BK=16)
    assert tried == [3, 2, 1, 1]
    assert list(kernel.STEPPED_DOWN.values()) == [(3, 1)]
    with pytest.warns(RuntimeWarning):
        kernel._launch(k, (1,), geo, num_stages=3, BK=32)  # other constexprs: a kernel of its own
    assert tried[4:] == [3, 2, 1]
    monkeypatch.setattr(Kernel, "__getitem__", lambda self, grid: lambda *a, num_stages, **kw: (_ for _ in ()).throw(
        kernel.OutOfResources(1, 0, "shared memory")))
    with pytest.raises(kernel.OutOfResources):  # not even one stage fits: the error stands
        kernel._launch(k, (1,), geo, num_stages=2, BK=64)


def test_weight_gradient_sums_many_groups(poisoned, monkeypatch):
    """The finishing kernel sums the token groups' partials GB at a time: more groups than one step takes, the
    last step partial (as at T2T-ViT shapes on 132 SMs)."""
    monkeypatch.setattr(kernel, "_CPU_SMS", 64)
    leaves = _inputs(1, 3, 20, 19, 2, 300, False, True, True, True, torch.float32)
    geo = kernel._plan(leaves[0], [2, 2], [1, 1], [0, 0], leaves[1])
    groups, gb = geo.grids(64)["backward_weight"][0] // geo.nkb, geo.finish_block(64)[2]
    assert groups > gb and groups % gb, (groups, gb)
    _check_against_reference((2, 1, 0), leaves, torch.float32)


@pytest.mark.parametrize("tokens, C, H, k, s, p, dtype", [(True, 32, 16, 3, 2, 1, torch.float32),
                                                         (True, 32, 16, 3, 2, 1, torch.bfloat16),
                                                         (False, 3, 32, 7, 4, 2, torch.bfloat16),
                                                         (False, 3, 96, 7, 4, 2, torch.bfloat16)],
                         ids=["tokens-fp32", "tokens-bf16", "nchw-tap-rows", "nchw-tap-rows-interior"])
def test_every_token_block_full(tokens, C, H, k, s, p, dtype, poisoned):
    """Every row of every token tile a token (``FULL``, as at T2T-ViT's shapes for B=64: B*L a multiple of the
    linear tiles, 2-D tiles that divide the token grid): rows, dy and the weight kernel's sum of dy take no token
    mask; the padding taps keep theirs (16-bit token views: one range check per row)."""
    leaves = _inputs(2, C, H, H, k, 40, tokens, True, True, True, dtype)
    geo = kernel._plan(leaves[0], [k, k], [s, s], [p, p], leaves[1])
    assert geo.bwd_linear == tokens and geo.contig == (tokens and dtype != torch.float32)
    assert geo.stats_rows == (not tokens)
    assert geo.full(geo.stats_tile, tokens) and geo.full(geo.fwd_tile, tokens) and geo.full(geo.bwd_tile, tokens)
    assert (geo.bwd_tile_args[6] > 0) == (H == 96)  # interior tiles: the weight gradient's two loops
    _check_against_reference((k, s, p), leaves, dtype)


@pytest.mark.parametrize("sms", [5, 20])
def test_weight_gradient_walks_every_tile_once(sms, poisoned, monkeypatch):
    """The weight kernel's programs step through their tiles (every G-th) with a mixed-radix counter, no
    division per step: several images, rows and G's that wrap across both; interior tiles with border ones, and
    the single loop of an image without interior tiles (channel-major), or its linear tiles (a token view)."""
    monkeypatch.setattr(kernel, "_CPU_SMS", sms)
    for tokens, C, H, W, inner in ((False, 3, 24, 18, True), (False, 3, 9, 60, False), (True, 16, 10, 12, False)):
        leaves = _inputs(3, C, H, W, 3, 20, tokens, True, True, True, torch.float32)
        geo = kernel._plan(leaves[0], [3, 3], [1, 1], [1, 1], leaves[1])
        tiles = geo.bwd_tile_args[6] + geo.bwd_tile_args[7]
        assert geo.groups(sms) < tiles  # G = 1 (5 SMs, a token view) steps one tile at a time
        assert (geo.bwd_tile_args[6] > 0) == inner and geo.bwd_linear == tokens
        _check_against_reference((3, 1, 1), leaves, torch.float32)


@pytest.mark.parametrize("tokens, k, s, p, W, dtype", [(False, 3, 2, 1, 11, torch.float32),
                                                       (True, 3, 2, 1, 11, torch.float32),
                                                       (True, 3, 2, 1, 11, torch.bfloat16),
                                                       (False, 7, 4, 2, 12, torch.bfloat16)],
                         ids=["nchw", "tokens", "tokens-contiguous-taps", "nchw-tap-rows"])
def test_int64_offsets(tokens, k, s, p, W, dtype, poisoned, monkeypatch):
    """The int64-offset variant (``BIG``: chosen when an element index can pass 2^31) on a small case, by
    lowering the threshold."""
    monkeypatch.setattr(kernel, "_INT32", 1000)
    leaves = _inputs(2, 16 if tokens else 3, 9, W, k, 20, tokens, True, True, True, dtype)
    geo = kernel._plan(leaves[0], [k, k], [s, s], [p, p], leaves[1])
    assert geo.big and geo.stats_rows == geo.fwd_rows == geo.bwd_rows == (p == 2)
    _check_against_reference((k, s, p), leaves, dtype)
