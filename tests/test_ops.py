"""Op front doors: the reference math, argument checks, backend choice, autocast, gradcheck.

Every backend against the reference, forward and backward: tests/test_op_backends.py.
"""
import dataclasses
import re

import pytest
import torch

import t2t_fast
from t2t_fast import reference
from t2t_fast.backends import AUTO_ORDER, backends
from t2t_fast.ops import SOFT_SPLIT

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


def test_auto_order_and_explicit_choice():
    """auto takes the CPU extension for CPU tensors when built (never the Triton interpreter), else the
    reference; an explicit backend that cannot take a call raises ValueError with the reason."""
    x, k, s, p, weight, bias, nw, nb = _soft_split_args()
    call = SOFT_SPLIT.arguments(x, k, s, p, weight, bias, nw, nb)
    assert SOFT_SPLIT.resolve(*call) == ("cpu" if t2t_fast.backends()["cpu"] else "reference")
    if t2t_fast.backends()["triton"] and "cpu" in SOFT_SPLIT.backends["triton"].devices:  # the interpreter
        with t2t_fast.backend("triton"):
            assert SOFT_SPLIT.resolve(*call) == "triton"
            with pytest.raises(ValueError, match=r"backend 'triton' cannot run this call: takes float32"):
                t2t_fast.soft_split(*_soft_split_args(dtype=torch.float64))
            q = torch.randn(1, 3, 8)
            with pytest.raises(ValueError, match="backend 'triton' cannot run this call: m=300 exceeds"):
                t2t_fast.performer_attention(q, q, q, torch.randn(300, 8))


def test_auto_skips_a_backend_whose_verify_rejects(monkeypatch):
    name = AUTO_ORDER["cpu"][0]
    if not t2t_fast.backends()[name]:
        pytest.skip(f"{name} is not available here")
    limited = dataclasses.replace(SOFT_SPLIT.backends[name], verify=lambda x, *args: f"C={x.shape[1]} exceeds 2")
    monkeypatch.setitem(SOFT_SPLIT.backends, name, limited)
    x, k, s, p, weight, bias, nw, nb = _soft_split_args()
    assert SOFT_SPLIT.resolve(*SOFT_SPLIT.arguments(x, k, s, p, weight, bias, nw, nb)) == "reference"
    info = t2t_fast.backends("soft_split", x, k, s, p, weight, bias, nw, nb)
    assert not info[name] and info[name].reason == "C=3 exceeds 2" and "'reference'" in info["auto"].reason
    torch.testing.assert_close(t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb),
                               reference.soft_split(x, k, s, p, weight, bias, nw, nb))
    with t2t_fast.backend(name), pytest.raises(ValueError, match=f"backend '{name}' cannot run this call: C=3"):
        t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb)


def test_backends_per_op():
    for op in ("soft_split", "performer_attention"):
        info = t2t_fast.backends(op)
        assert set(info) == {"triton", "cuda", "cpu", "reference"}
        assert info["reference"] and "float64" in info["reference"].reason
        for name, avail in t2t_fast.backends().items():
            assert bool(info[name]) == bool(avail)
    with pytest.raises(ValueError, match="op must be one of"):
        t2t_fast.backends("conv")
    with pytest.raises(ValueError, match="w must be"):  # a call's arguments are checked as the front door does
        t2t_fast.backends("performer_attention", *(torch.randn(2, 7, 8),) * 3, torch.randn(4, 7))


# ---------------------------------------------------------------------------------------------------------
# Bad calls: the front door raises one exception type per fault, naming the argument, on every backend
# ---------------------------------------------------------------------------------------------------------
META = dict(device="meta")  # a second device on a CPU-only machine
SOFT_SPLIT_FAULTS = [  # (arguments replaced, exception type, argument the message names)
    (dict(x=torch.randn(3, 8, 8)), ValueError, "x"),
    (dict(x=torch.randn(2, 3, 8, 8, 1)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (2, 3, 8, 8))), TypeError, "x"),
    (dict(x=torch.randn(2, 3, 8, 8, dtype=torch.complex64)), TypeError, "x"),
    (dict(x=torch.randn(0, 3, 8, 8)), ValueError, "x"),
    (dict(x="image"), TypeError, "x"),
    (dict(x=None), TypeError, "x"),
    (dict(weight=torch.randn(5, 26)), ValueError, "weight"),
    (dict(weight=torch.randn(0, 27)), ValueError, "weight"),
    (dict(weight=torch.randn(27)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 27, dtype=torch.float64)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 27, **META)), ValueError, "weight"),
    (dict(weight=torch.ones(5, 27, dtype=torch.int64)), TypeError, "weight"),
    (dict(weight=[[1.0] * 27] * 5), TypeError, "weight"),
    (dict(weight=None), TypeError, "weight"),
    (dict(bias=torch.randn(4)), ValueError, "bias"),
    (dict(bias=torch.randn(1, 5)), ValueError, "bias"),
    (dict(bias=torch.randn(5, dtype=torch.float16)), ValueError, "bias"),
    (dict(bias=torch.randn(5, **META)), ValueError, "bias"),
    (dict(bias=torch.ones(5, dtype=torch.int32)), TypeError, "bias"),
    (dict(norm_weight=torch.randn(26)), ValueError, "norm_weight"),
    (dict(norm_weight=torch.randn(3, 9)), ValueError, "norm_weight"),
    (dict(norm_weight=torch.randn(27, **META)), ValueError, "norm_weight"),
    (dict(norm_weight=torch.ones(27, dtype=torch.bool)), TypeError, "norm_weight"),
    (dict(norm_weight=None), ValueError, "norm_bias"),
    (dict(norm_bias=torch.randn(28)), ValueError, "norm_bias"),
    (dict(norm_bias=1.0), TypeError, "norm_bias"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, -1)), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(kernel_size=2.5), TypeError, "kernel_size"),
    (dict(stride=(2, 0)), ValueError, "stride"),
    (dict(stride="2"), TypeError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding=[1]), TypeError, "padding"),
    (dict(kernel_size=(5, 5), padding=0, x=torch.randn(1, 1, 3, 3), weight=torch.randn(5, 25), bias=None,
          norm_weight=None, norm_bias=None), ValueError, "kernel_size"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps="small"), TypeError, "eps"),
]
PERFORMER_FAULTS = [
    (dict(q=torch.randn(7, 8)), ValueError, "q"),
    (dict(q=torch.randn(1, 2, 2, 7, 8)), ValueError, "q"),
    (dict(q=torch.randint(0, 2, (2, 7, 8))), TypeError, "q"),
    (dict(q=torch.randn(2, 0, 8), k=torch.randn(2, 0, 8), v=torch.randn(2, 0, 8)), ValueError, "q"),
    (dict(q=None), TypeError, "q"),
    (dict(k=torch.randn(2, 6, 8)), ValueError, "k"),
    (dict(k=torch.randn(2, 7, 8, **META)), ValueError, "k"),
    (dict(k=torch.randn(2, 7, 8).numpy()), TypeError, "k"),
    (dict(v=torch.randn(2, 7, 8, dtype=torch.float64)), ValueError, "v"),
    (dict(v=torch.ones(2, 7, 8, dtype=torch.int8)), TypeError, "v"),
    (dict(w=torch.randn(4, 7)), ValueError, "w"),
    (dict(w=torch.randn(0, 8)), ValueError, "w"),
    (dict(w=torch.randn(8)), ValueError, "w"),
    (dict(w=torch.randn(4, 8, **META)), ValueError, "w"),
    (dict(w=torch.ones(4, 8, dtype=torch.int64)), TypeError, "w"),
    (dict(w=[[1.0]]), TypeError, "w"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(eps=float("inf")), ValueError, "eps"),
    (dict(eps=None), TypeError, "eps"),
]


def _faults(faults: list) -> list:
    return [pytest.param(name, bad, err, arg, id=f"{name}-{i}-{arg}")
            for name in CPU_BACKENDS for i, (bad, err, arg) in enumerate(faults)]


def _raises_naming(fn, args: dict, err: type, arg: str) -> None:
    with pytest.raises(Exception) as info:
        fn(**args)
    assert type(info.value) is err, f"{type(info.value).__name__} instead of {err.__name__}: {info.value}"
    assert re.search(rf"\b{arg}\b", str(info.value)), f"the message does not name {arg!r}: {info.value}"


@pytest.mark.parametrize("name, bad, err, arg", _faults(SOFT_SPLIT_FAULTS))
def test_soft_split_bad_call(name, bad, err, arg):
    args = dict(x=torch.randn(2, 3, 8, 8), kernel_size=3, stride=2, padding=1, weight=torch.randn(5, 27),
                bias=torch.randn(5), norm_weight=torch.randn(27), norm_bias=torch.randn(27), eps=1e-5)
    args.update(bad)
    with t2t_fast.backend(name):
        _raises_naming(t2t_fast.soft_split, args, err, arg)


@pytest.mark.parametrize("name, bad, err, arg", _faults(PERFORMER_FAULTS))
def test_performer_bad_call(name, bad, err, arg):
    args = dict(q=torch.randn(2, 7, 8), k=torch.randn(2, 7, 8), v=torch.randn(2, 7, 8), w=torch.randn(4, 8),
                eps=1e-8)
    args.update(bad)
    with t2t_fast.backend(name):
        _raises_naming(t2t_fast.performer_attention, args, err, arg)


def test_soft_split_autocast_behaves_like_linear():
    x, k, s, p, weight, bias, nw, nb = _soft_split_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.soft_split(x, k, s, p, weight, bias, nw, nb), rtol=2e-2,
                               atol=5e-2)


@pytest.mark.parametrize("name", [n for n in CPU_BACKENDS if n not in ("triton", "reference")])
def test_soft_split_output_saved_only_for_the_norm_backward_of_x(name):
    """With the LayerNorm and x needing a gradient the output is saved for the backward (its LayerNorm sums come
    from it), so modifying it in place raises autograd's error, as for torch.exp; otherwise it is not saved."""
    x, k, s, p, weight, bias, nw, nb = _soft_split_args()
    weight.requires_grad_()
    with t2t_fast.backend(name):
        t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb).mul_(2).sum().backward()
        y = t2t_fast.soft_split(x.requires_grad_(), k, s, p, weight, bias, nw, nb)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="inplace"):
            y.sum().backward()
        t2t_fast.soft_split(x, k, s, p, weight, bias).mul_(2).sum().backward()  # no norm: nothing saved
    assert x.grad is not None


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
