"""Op front doors: argument checks, backend choice, and every available backend against reference.py."""
import pytest
import torch

import t2t_fast
from t2t_fast import reference
from t2t_fast.backends import backends

AVAILABLE = [n for n, info in backends().items() if info.available]
CPU_BACKENDS = [n for n in AVAILABLE if n in ("cpu", "reference", "triton")]


def _soft_split_args(B=2, C=3, H=11, W=9, k=(3, 2), s=(2, 1), p=(1, 0), out=5, dtype=torch.float32, norm=True):
    K = C * k[0] * k[1]
    x = torch.randn(B, C, H, W, dtype=dtype)
    weight = torch.randn(out, K, dtype=dtype) * K ** -0.5
    bias = torch.randn(out, dtype=dtype)
    nw = torch.randn(K, dtype=dtype) if norm else None
    nb = torch.randn(K, dtype=dtype) if norm else None
    return x, k, s, p, weight, bias, nw, nb


def _unfold_math(x, k, s, p, weight, bias, nw, nb, eps=1e-5):
    cols = torch.nn.functional.unfold(x, k, padding=p, stride=s).transpose(1, 2)
    if nw is not None:
        mu = cols.mean(-1, keepdim=True)
        var = cols.var(-1, unbiased=False, keepdim=True)
        cols = (cols - mu) / torch.sqrt(var + eps) * nw + nb
    return cols @ weight.t() + bias


def test_reference_soft_split_is_unfold_norm_linear():
    args = _soft_split_args()
    torch.testing.assert_close(reference.soft_split(*args), _unfold_math(*args), rtol=1e-5, atol=1e-5)


def test_reference_performer_matches_spec_formula():
    q, k, v = (torch.randn(2, 7, 8) for _ in range(3))
    w = torch.randn(4, 8)

    def phi(x):
        return torch.exp(x @ w.t() - (x * x).sum(-1, keepdim=True) / 2) / 2.0  # sqrt(m) = 2

    expect = phi(q) @ (phi(k).transpose(1, 2) @ v) / (phi(q) @ phi(k).sum(1, keepdim=True).transpose(1, 2) + 1e-8)
    torch.testing.assert_close(reference.performer_attention(q, k, v, w), expect, rtol=1e-5, atol=1e-6)


def test_sinusoid_table_values():
    t = reference.sinusoid_table(5, 6)
    assert t.shape == (1, 5, 6) and t.dtype == torch.float32
    p, j = 3, 4
    assert t[0, p, j].item() == pytest.approx(torch.sin(torch.tensor(p / 10000 ** (4 / 6), dtype=torch.float64)).item())
    assert t[0, p, 5].item() == pytest.approx(torch.cos(torch.tensor(p / 10000 ** (4 / 6), dtype=torch.float64)).item())


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("norm", [True, False])
def test_soft_split_backends_fwd_bwd(name, layout, norm, poisoned):
    x, k, s, p, weight, bias, nw, nb = _soft_split_args(B=2, C=4, H=9, W=13, norm=norm)
    if layout == "tokens":  # (B, L, C) tokens seen as a (B, C, H, W) image without a copy
        x = torch.randn(2, 9 * 13, 4).transpose(1, 2).reshape(2, 4, 9, 13)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) + ((nw, nb) if norm else ())]
    x_, w_, b_ = leaves[:3]
    nw_, nb_ = leaves[3:] if norm else (None, None)
    with t2t_fast.backend(name):
        y = t2t_fast.soft_split(x_, k, s, p, w_, b_, nw_, nb_)
    y_ref = reference.soft_split(x, k, s, p, weight, bias, nw, nb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias) + ((nw, nb) if norm else ())]
    y2 = reference.soft_split(ref_leaves[0], k, s, p, ref_leaves[1], ref_leaves[2],
                              *(ref_leaves[3:] if norm else (None, None)))
    for a, b in zip(grads, torch.autograd.grad(y2, ref_leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 7, 8), (1, 2, 13, 12)])
def test_performer_backends_fwd_bwd(name, shape, poisoned):
    d = shape[-1]
    packed = torch.randn(*shape[:-1], 3 * d) * 0.5
    k, q, v = (t.detach().requires_grad_() for t in torch.split(packed, d, dim=-1))  # strided views
    w = torch.randn(5, d)
    with t2t_fast.backend(name):
        y = t2t_fast.performer_attention(q, k, v, w)
    y_ref = reference.performer_attention(q, k, v, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(y_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CPU_BACKENDS if n != "triton"])
def test_front_doors_gradcheck_float64(name):
    """float64 gradients; the compiled backends hold LayerNorm parameters in float32, so those stay constant."""
    x, k, s, p, weight, bias, nw, nb = _soft_split_args(B=1, C=2, H=5, W=4, k=(2, 2), s=(1, 2), p=(1, 0), out=3,
                                                        dtype=torch.float64)
    if name != "reference":
        nw, nb = nw.float().double(), nb.float().double()
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias) + ((nw, nb) if name == "reference" else ()))
    norm = () if name == "reference" else (nw, nb)
    with t2t_fast.backend(name):
        assert torch.autograd.gradcheck(lambda *a: t2t_fast.soft_split(a[0], k, s, p, *a[1:], *norm), inputs)
        q, kk, v = (torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
        w = torch.randn(2, 3, dtype=torch.float64).float().double()
        assert torch.autograd.gradcheck(lambda a, b, c: t2t_fast.performer_attention(a, b, c, w), (q, kk, v))


def test_backend_selection():
    info = t2t_fast.backends()
    assert set(info) == {"triton", "cuda", "cpu", "reference"}
    assert info["reference"].available and all(isinstance(i.reason, str) and i.reason for i in info.values())
    assert t2t_fast.get_backend() == "auto"
    with t2t_fast.backend("reference"):
        assert t2t_fast.get_backend() == "reference"
    assert t2t_fast.get_backend() == "auto"
    t2t_fast.set_backend("reference")
    try:
        assert t2t_fast.get_backend() == "reference"
    finally:
        t2t_fast.set_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        t2t_fast.set_backend("fastest")
    if not info["cuda"].available:
        with pytest.raises(RuntimeError, match="not available"):
            with t2t_fast.backend("cuda"):
                pass


def test_auto_prefers_cpu_extension_on_cpu():
    from t2t_fast.backends import resolve

    expect = "cpu" if t2t_fast.backends()["cpu"].available else "reference"
    assert resolve(torch.device("cpu"), "soft_split", ("triton", "cpu", "reference")) == expect


@pytest.mark.parametrize("bad, err, match", [
    (dict(x=torch.randn(3, 8, 8)), ValueError, "x must be"),
    (dict(weight=torch.randn(5, 26)), ValueError, "weight must be"),
    (dict(weight=torch.randn(5, 27, dtype=torch.float64)), ValueError, "dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias must be"),
    (dict(norm_weight=torch.randn(26)), ValueError, "norm_weight must be"),
    (dict(norm_weight=None), ValueError, "norm_bias needs norm_weight"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(kernel_size=(5, 5), padding=0, x=torch.randn(1, 1, 3, 3), weight=torch.randn(5, 25)), ValueError,
     "smaller than"),
    (dict(x=torch.randint(0, 3, (2, 3, 8, 8))), TypeError, "floating"),
    (dict(x=torch.randn(0, 3, 8, 8)), ValueError, "empty"),
    (dict(x="image"), TypeError, "x must be a torch.Tensor"),
])
def test_soft_split_bad_input(bad, err, match):
    args = dict(x=torch.randn(2, 3, 8, 8), kernel_size=3, stride=2, padding=1, weight=torch.randn(5, 27),
                bias=torch.randn(5), norm_weight=torch.randn(27), norm_bias=torch.randn(27))
    args.update(bad)
    with pytest.raises(err, match=match):
        t2t_fast.soft_split(**args)


@pytest.mark.parametrize("bad, err, match", [
    (dict(q=torch.randn(7, 8)), ValueError, "q must be"),
    (dict(k=torch.randn(2, 6, 8)), ValueError, "k shape"),
    (dict(v=torch.randn(2, 7, 8, dtype=torch.float64)), ValueError, "v dtype"),
    (dict(w=torch.randn(4, 7)), ValueError, "w must be"),
    (dict(w=torch.randn(0, 8)), ValueError, "w must be"),
    (dict(q=torch.randint(0, 2, (2, 7, 8))), TypeError, "floating"),
    (dict(q=torch.randn(2, 0, 8), k=torch.randn(2, 0, 8), v=torch.randn(2, 0, 8)), ValueError, "empty"),
    (dict(w=[[1.0]]), TypeError, "w must be a torch.Tensor"),
])
def test_performer_bad_input(bad, err, match):
    args = dict(q=torch.randn(2, 7, 8), k=torch.randn(2, 7, 8), v=torch.randn(2, 7, 8), w=torch.randn(4, 8))
    args.update(bad)
    with pytest.raises(err, match=match):
        t2t_fast.performer_attention(**args)


def test_soft_split_autocast_behaves_like_linear():
    x, k, s, p, weight, bias, nw, nb = _soft_split_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.soft_split(x, k, s, p, weight, bias, nw, nb), rtol=2e-2,
                               atol=5e-2)


def test_import_without_triton_and_extension():
    """`import t2t_fast` and a fused model work with neither triton nor t2t_fast._C importable."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; sys.modules['t2t_fast._C'] = None\n"
            "import torch, t2t_fast\n"
            "info = t2t_fast.backends()\n"
            "assert not info['triton'] and not info['cpu'] and info['reference'], info\n"
            "m = t2t_fast.create_model('t2t_vit_7', img_size=32, num_classes=2)\n"
            "m(torch.randn(1, 3, 32, 32)).sum().backward()\n"
            "print(info['cpu'].reason)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout
