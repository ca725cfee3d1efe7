"""Triton backend of performer_attention (kernels/performer.py) against t2t_fast.reference.performer_attention.

On CPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small;
the `gpu` tests run the token performer's full shapes on a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch

import t2t_fast
from t2t_fast import reference

pytest.importorskip("triton")
if not t2t_fast.backends()["triton"]:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)

from t2t_fast.kernels import performer as kernel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.float16, torch.bfloat16)


def _features(m: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """The published draw: an orthogonal (m, d) matrix times sqrt(m)."""
    return (torch.nn.init.orthogonal_(torch.randn(m, d)) * math.sqrt(m) * scale).to(DEV)


def _packed(B: int, T: int, d: int, heads: int | None, rows: torch.Tensor | None = None,
            norms: tuple[float, float] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A leaf packed projection: (B, T, 3d) for heads=None, else (B, T, 3 * heads * d). ``norms``: every
    d-wide token vector rescaled to a norm drawn uniformly from that range. ``rows``: the values themselves."""
    n = 3 * (heads or 1)
    x = torch.randn(B, T, n, d, device=DEV) if rows is None else rows.to(DEV)
    if norms is not None:
        lo, hi = norms
        x = x / x.norm(dim=-1, keepdim=True) * (lo + (hi - lo) * torch.rand(B, T, n, 1, device=DEV))
    return x.reshape(B, T, n * d).to(dtype).requires_grad_()


def _split(x: torch.Tensor, d: int, heads: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of the packed projection: the token performer's k, q, v split of (B, T, 3d),
    or the ViT attention's (B, T, 3, H, d) -> (B, H, T, d) permutation."""
    if heads is None:
        k, q, v = torch.split(x, d, dim=-1)
        return q, k, v
    B, T, _ = x.shape
    q, k, v = x.reshape(B, T, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _float64(q, k, v, w, eps):
    """SPEC's function evaluated plainly in float64 (no max shifts; float64's range covers the stress cases)."""
    q, k, v, w = (t.double() for t in (q, k, v, w))

    def phi(x):
        return torch.exp(x @ w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    qp, kp = phi(q), phi(k)
    return (qp @ (kp.transpose(-2, -1) @ v)) / ((qp * kp.sum(-2, keepdim=True)).sum(-1, keepdim=True) + eps)


def _close(actual, expected, tol):
    """Relative to the largest magnitude of ``expected`` (the scale the reductions' rounding works at)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values"
    expected = expected.double()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def _run(x, d, heads, w, eps=1e-8, oracle=reference.performer_attention, oracle_dtype=torch.float32):
    """Triton forward and gradient of the packed projection, and the oracle's on a copy cast to oracle_dtype
    (the same rounded inputs), with the same output gradient."""
    with t2t_fast.backend("triton"):
        y = t2t_fast.performer_attention(*_split(x, d, heads), w, eps)
    g = torch.randn(y.shape, device=DEV)
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    xr = x.detach().to(oracle_dtype).requires_grad_()
    y_ref = oracle(*_split(xr, d, heads), w.to(oracle_dtype), eps)
    (gx_ref,) = torch.autograd.grad(y_ref, xr, g.to(y_ref.dtype))
    assert y.dtype == x.dtype and gx.dtype == x.dtype
    return y, gx, y_ref, gx_ref


# (B, T, d, m, heads): odd T, odd d and m, m > d, and the token performer's d = 64, m = 32
CASES = [
    (2, 1, 8, 12, None),
    (2, 7, 24, 20, None),
    (1, 100, 40, 12, 2),
    (2, 100, 16, 64, None),
    (1, 333, 64, 32, None),
    (2, 45, 64, 32, 3),
    (1, 20, 128, 32, None),  # the largest d, and the largest m at d = 64 (d x m tiles of at most 4096)
    (1, 20, 64, 64, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-d{c[2]}-m{c[3]}-H{c[4]}")
def test_matches_reference_fp32(case, poisoned):
    B, T, d, m, heads = case
    w = _features(m, d)
    y, gx, y_ref, gx_ref = _run(_packed(B, T, d, heads), d, heads, w)
    _close(y, y_ref, 1e-5)
    _close(gx, gx_ref, 2e-5)  # the gradients of q, k and v: three slices of the packed projection


def test_statistics_follow_the_contract(poisoned):
    """kv, ksum, kmax, denom are the max-shifted statistics documented in t2t_fast/ops/performer.py."""
    B, H, T, d, m, eps = 2, 2, 37, 24, 20, 1e-3
    q, k, v = _split(_packed(B, T, d, H).detach(), d, H)
    w = _features(m, d).t().contiguous().t()  # column-major: w is read through its strides too
    y, kv, ksum, kmax, denom = torch.ops.t2t_fast_triton.performer_forward(q, k, v, w, eps)
    q, k, v, w64 = (t.double() for t in (q, k, v, w))
    a = k @ w64.t() - (k * k).sum(-1, keepdim=True) / 2
    b = q @ w64.t() - (q * q).sum(-1, keepdim=True) / 2
    kmax_ref = a.amax(dim=(-2, -1))
    qmax = b.amax(dim=-1)
    ak = torch.exp(a - kmax_ref[..., None, None])
    ksum_ref = ak.sum(-2)
    denom_ref = (torch.exp(b - qmax[..., None]) * ksum_ref[..., None, :]).sum(-1) \
        + eps * m * torch.exp(-qmax - kmax_ref[..., None])
    _close(kmax, kmax_ref, 1e-6)
    _close(kv, ak.transpose(-2, -1) @ v, 1e-5)
    _close(ksum, ksum_ref, 1e-5)
    _close(denom, denom_ref, 1e-5)
    _close(y, _float64(q, k, v, w64, eps), 1e-5)
    assert all(t.dtype == torch.float32 for t in (kv, ksum, kmax, denom))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_token_norms_2_to_6(dtype, poisoned):
    """Half-precision inputs with token norms 2..6: finite, and within 1e-2 of the float32 reference."""
    B, T, d, m, heads = 2, 70, 64, 32, None
    w = _features(m, d)
    x = _packed(B, T, d, heads, norms=(2.0, 6.0), dtype=dtype)
    y, gx, y_ref, gx_ref = _run(x, d, heads, w)
    _close(y, y_ref, 1e-2)
    _close(gx, gx_ref, 1e-2)


# the padded rows of a last tile divide 0 by 0 here (their eps term underflows); they are never stored
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("kind", ["underflow", "overflow"])
def test_stress_matches_float64_where_float32_reference_fails(kind, poisoned):
    """underflow: token norms 20 put every feature near exp(-90..-300), eps = 0: the float32 reference is 0/0.
    overflow: tokens near (3x scaled) feature vectors put logits near 140: the float32 reference is inf/inf.
    The max-shifted kernel must match a float64 evaluation of the same function."""
    B, T, d, m = 2, 50, 64, 32
    if kind == "underflow":
        w, eps = _features(m, d), 0.0
        x = _packed(B, T, d, None, norms=(20.0, 20.0))
    else:
        w, eps = _features(m, d, scale=3.0), 1e-8
        rows = w[torch.randint(0, 2, (B, T, 3), device=DEV)] + 0.5 * torch.randn(B, T, 3, d, device=DEV)
        x = _packed(B, T, d, None, rows=rows)
    assert not torch.isfinite(reference.performer_attention(*_split(x.detach(), d, None), w, eps)).all()
    y, gx, y_ref, gx_ref = _run(x, d, None, w, eps, oracle=_float64, oracle_dtype=torch.float64)
    _close(y, y_ref, 5e-5)
    _close(gx, gx_ref, 5e-5)


@pytest.mark.parametrize("d, m", [(129, 32), (64, 257), (64, 65), (128, 64)])
def test_limits_raise_value_error(d, m):
    """Past MAX_D, MAX_M, or a d x m tile (padded to powers of two) that does not fit an sm_90 CTA."""
    q, k, v = _split(_packed(1, 3, d, None).detach(), d, None)
    with t2t_fast.backend("triton"), pytest.raises(ValueError, match="exceeds 128|exceeds 64|exceeds 4096"):
        t2t_fast.performer_attention(q, k, v, torch.randn(m, d, device=DEV))


def test_unsupported_dtype_raises_type_error():
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernel.forward(q, q, q, torch.randn(4, 8, device=DEV), 1e-8)


def test_opcheck():
    q, k, v = (t.detach().requires_grad_() for t in _split(_packed(1, 5, 8, 2).detach(), 8, 2))
    w = _features(12, 8)
    fwd, bwd = torch.ops.t2t_fast_triton.performer_forward, torch.ops.t2t_fast_triton.performer_backward
    torch.library.opcheck(fwd, (q, k, v, w, 1e-8))
    stats = fwd(q.detach(), k.detach(), v.detach(), w, 1e-8)
    torch.library.opcheck(bwd, (torch.randn_like(q), q.detach(), k.detach(), v.detach(), w, *stats[1:]))


def test_torch_compile_matches():
    d, heads = 24, None
    w = _features(20, d)

    def f(x):
        q, k, v = _split(x, d, heads)
        return t2t_fast.performer_attention(q, k, v, w) * 2

    x = _packed(2, 9, d, heads)
    with t2t_fast.backend("triton"):
        y = torch.compile(f, backend="aot_eager")(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().requires_grad_()
    y_ref = reference.performer_attention(*_split(xr, d, heads), w) * 2
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), xr)
    _close(y, y_ref, 1e-5)
    _close(gx, gx_ref, 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [None, 2])
def test_full_shape_gpu(dtype, heads, poisoned):
    """The token performer's first layer at 224 px: B=8, T=3136, d=64, m=32; deterministic (no atomics)."""
    B, T, d, m = 8, 3136, 64, 32
    w = _features(m, d)
    x = _packed(B, T, d, heads, norms=(2.0, 6.0) if dtype != torch.float32 else None, dtype=dtype)
    y, gx, y_ref, gx_ref = _run(x, d, heads, w)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    _close(y, y_ref, tol)
    _close(gx, gx_ref, tol)
    with t2t_fast.backend("triton"):
        y1, y2 = (t2t_fast.performer_attention(*_split(x, d, heads), w) for _ in range(2))
    g = torch.randn_like(y1)
    assert torch.equal(y1, y2)
    assert torch.equal(torch.autograd.grad(y1, x, g)[0], torch.autograd.grad(y2, x, g)[0])
