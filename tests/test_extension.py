"""The C++ extension t2t_fast._C's operators: their contract and what only the extension has.

The documented operator outputs (statistics, empty tensors), determinism across thread counts, the AVX-512/AVX2/
baseline micro-kernels, float16 token norms 2..6, opcheck, float64 gradcheck, a fuzz of bad calls straight to
the operators that must raise, never crash, and (with -m gpu) the CUDA kernels against the CPU ones. Forward and
backward against the reference on every backend, dtype and odd shape: tests/test_op_backends.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

try:
    import t2t_fast._C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"the C++ extension t2t_fast._C is not built ({exc}); build it with "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

import t2t_fast
from op_harness import leaves, performer_inputs, qkv_of, rel_close, soft_split_inputs
from t2t_fast import reference as R

ops = torch.ops.t2t_fast


# ---------------------------------------------------------------------------------------------------------
# soft_split
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", (True, False))
def test_soft_split_operator_outputs(norm, poisoned):
    """mean/rstd are the per-patch LayerNorm statistics, or (0,); grad_x is (0,) without compute_grad_x."""
    x, (k, s, p), weight, bias, nw, nb = soft_split_inputs((3, 2, 1), "norm+bias" if norm else "plain", "nchw",
                                                           torch.float32)
    y, mean, rstd = ops.soft_split_forward(x, list(k), list(s), list(p), weight, bias, nw, nb, 1e-5)
    if norm:
        cols = torch.nn.functional.unfold(x, k, padding=p, stride=s).transpose(1, 2)
        torch.testing.assert_close(mean, cols.mean(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rstd, (cols.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)
    else:
        assert mean.shape == rstd.shape == (0,) and mean.dtype == rstd.dtype == torch.float32
    gy = torch.randn_like(y)
    gx, gw, gb, gnw, gnb = ops.soft_split_backward(gy, x, list(k), list(s), list(p), weight, bias, nw, nb, y, mean,
                                                   rstd, False)
    assert gx.shape == (0,) and gw.shape == weight.shape and gb.shape == (weight.shape[0],)
    assert gnw.shape == gnb.shape == ((weight.shape[1],) if norm else (0,)) and gnw.dtype == torch.float32
    full = ops.soft_split_backward(gy, x, list(k), list(s), list(p), weight, bias, nw, nb, y, mean, rstd, True)
    assert full[0].shape == x.shape
    for a, b in zip((gw, gb, gnw, gnb), full[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_soft_split_rectangular_geometry_and_strided_weight(poisoned):
    """kernel (3, 2), stride (2, 1), padding (1, 0); weight given as a transposed view."""
    x = torch.randn(2, 3, 10, 7)
    weight = torch.randn(18, 5).t()  # (5, 18), non-contiguous
    nw, nb = torch.rand(18) + 0.5, torch.randn(18)
    y, _, _ = ops.soft_split_forward(x, [3, 2], [2, 1], [1, 0], weight, None, nw, nb, 1e-5)
    torch.testing.assert_close(y, R.soft_split(x, (3, 2), (2, 1), (1, 0), weight, None, nw, nb), rtol=1e-5,
                               atol=1e-5)


def test_backward_is_deterministic_across_runs_and_thread_counts():
    x, (k, s, p), weight, bias, nw, nb = soft_split_inputs((7, 4, 2), "norm+bias", "nchw", torch.float32)
    y, mean, rstd = ops.soft_split_forward(x, list(k), list(s), list(p), weight, bias, nw, nb, 1e-5)
    gy = torch.randn_like(y)
    (q, kk, v), w = performer_inputs(700, 16, 8, "bhtd", torch.float32)  # > 1 token segment
    stats = ops.performer_forward(q, kk, v, w, 1e-8)[1:]
    gq = torch.randn_like(q)

    def run():
        return (*ops.soft_split_backward(gy, x, list(k), list(s), list(p), weight, bias, nw, nb, y, mean, rstd, True),
                *ops.performer_forward(q, kk, v, w, 1e-8), *ops.performer_backward(gq, q, kk, v, w, *stats))

    threads = torch.get_num_threads()
    first = run()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for a, b in zip(first, run()):
                assert torch.equal(a, b), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# performer_attention
# ---------------------------------------------------------------------------------------------------------
def test_performer_statistics_follow_the_contract(poisoned):
    """kv, ksum, kmax, denom are the max-shifted sums documented in t2t_fast/ops/performer.py (float64 check)."""
    (q, k, v), w = performer_inputs(37, 12, 5, "bhtd", torch.float32)
    eps = 1e-3
    y, kv, ksum, kmax, denom = ops.performer_forward(q, k, v, w, eps)
    qd, kd, vd, wd = (t.double() for t in (q, k, v, w))
    a = kd @ wd.t() - (kd * kd).sum(-1, keepdim=True) / 2
    b = qd @ wd.t() - (qd * qd).sum(-1, keepdim=True) / 2
    amax = a.amax(dim=(-2, -1))
    torch.testing.assert_close(kmax.double(), amax, rtol=1e-6, atol=1e-6)
    A = torch.exp(a - kmax.double()[..., None, None])
    torch.testing.assert_close(kv.double(), A.transpose(-2, -1) @ vd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ksum.double(), A.sum(-2), rtol=1e-5, atol=1e-6)
    qmax = b.amax(-1)
    Bq = torch.exp(b - qmax[..., None])
    den = (Bq * A.sum(-2)[..., None, :]).sum(-1) + eps * w.shape[0] * torch.exp(-qmax - kmax.double()[..., None])
    torch.testing.assert_close(denom.double(), den, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y, R.performer_attention(q, k, v, w, eps), rtol=1e-5, atol=1e-6)


def test_performer_fp16_large_token_norms_stay_finite(poisoned):
    """Token norms 2..6 in float16 (the published einsums overflow there): finite and close to float32."""
    B, T, d, m = 2, 200, 64, 32
    def tokens():
        t = torch.randn(B, T, d)
        return (t / t.norm(dim=-1, keepdim=True) * torch.empty(B, T, 1).uniform_(2, 6)).half()
    q, k, v = tokens(), tokens(), tokens()
    w = torch.nn.init.orthogonal_(torch.empty(m, d)) * math.sqrt(m)
    ours = leaves([q, k, v])
    with t2t_fast.backend("cpu"):
        y = t2t_fast.performer_attention(*ours, w)
    grad = torch.randn(y.shape).half()
    y.backward(grad)
    ref = leaves([q, k, v], torch.float32)
    y_ref = R.performer_attention(*ref, w)
    y_ref.backward(grad.float())
    rel_close(y, y_ref, 2e-2, "y")
    for name, a, r in zip("qkv", ours, ref):
        rel_close(a.grad, r.grad, 3e-2, f"grad {name}")


def check_performer_eps_term_in_log_space(device: str) -> None:
    """Token norms 13..20 put qmax + kmax far below -88.7, where exp(-qmax - kmax) overflows float32: with eps = 0
    (0 * inf) or eps > 0 (inf) a direct eps * m * exp(-qmax - kmax) breaks the denominator. Forward and gradients
    against the plain function in float64 (whose range holds these features)."""
    B, T, d, m = 2, 50, 64, 32
    x = torch.randn(3, B, T, d)
    x = x / x.norm(dim=-1, keepdim=True) * torch.empty(3, B, T, 1).uniform_(13, 20)
    w = torch.nn.init.orthogonal_(torch.empty(m, d)) * math.sqrt(m)
    grad = torch.randn(B, T, d)
    for eps in (0.0, 1e-8):
        ours = leaves(list(x.to(device).unbind(0)))
        with t2t_fast.backend(device):
            y = t2t_fast.performer_attention(*ours, w.to(device), eps)
        y.backward(grad.to(device))
        ref = leaves(list(x.unbind(0)), torch.float64)
        y_ref = R.performer_attention(*ref, w.double(), eps)
        y_ref.backward(grad.double())
        rel_close(y.cpu(), y_ref, 1e-4, f"y, eps={eps}")
        for name, a, r in zip("qkv", ours, ref):
            rel_close(a.grad.cpu(), r.grad, 1e-4, f"grad {name}, eps={eps}")


def test_performer_eps_term_in_log_space(poisoned):
    check_performer_eps_term_in_log_space("cpu")


# ---------------------------------------------------------------------------------------------------------
# float64: gradcheck through the front door, opcheck on the operators
# ---------------------------------------------------------------------------------------------------------
def test_gradcheck_soft_split_float64():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 18, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    nw, nb = torch.rand(18) + 0.5, torch.randn(18)  # the operator takes float32 norm parameters

    def f(x, weight, bias):
        with t2t_fast.backend("cpu"):
            return t2t_fast.soft_split(x, 3, 2, 1, weight, bias, nw, nb)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: f(x, w, None), (x, weight))


def test_gradcheck_performer_float64():
    q, k, v = (0.5 * torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    w = torch.randn(3, 4)

    def f(q, k, v):
        with t2t_fast.backend("cpu"):
            return t2t_fast.performer_attention(q, k, v, w)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


def test_opcheck_all_operators():
    x = torch.randn(2, 3, 9, 8)
    tokens = torch.randn(2, 72, 3).transpose(1, 2).reshape(2, 3, 9, 8)  # grad_x keeps these strides
    weight, bias = torch.randn(5, 27), torch.randn(5)
    nw, nb = torch.rand(27) + 0.5, torch.randn(27)
    geometry = ([3, 3], [2, 2], [1, 1])
    for args in ((x, *geometry, weight, bias, nw, nb, 1e-5), (x, *geometry, weight, None, None, None, 1e-5),
                 (tokens, *geometry, weight, bias, nw, nb, 1e-5)):
        torch.library.opcheck(ops.soft_split_forward.default, args)
        y, mean, rstd = ops.soft_split_forward(*args)
        xg = args[0].detach()
        for compute_grad_x in (True, False):
            torch.library.opcheck(ops.soft_split_backward.default,
                                  (torch.randn_like(y), xg, *geometry, weight, *args[5:8], y, mean, rstd,
                                   compute_grad_x))
        grad_x = ops.soft_split_backward(torch.randn_like(y), xg, *geometry, weight, *args[5:8], y, mean, rstd, True)[0]
        assert grad_x.stride() == xg.stride()
    grad_args = (x.clone().requires_grad_(), *geometry, weight.clone().requires_grad_(),
                 bias.clone().requires_grad_(), nw.clone().requires_grad_(), nb.clone().requires_grad_(), 1e-5)
    torch.library.opcheck(ops.soft_split_forward.default, grad_args)

    (q, k, v), w = performer_inputs(7, 8, 5, "bhtd", torch.float32)
    torch.library.opcheck(ops.performer_forward.default, (q, k, v, w, 1e-8))
    packed = qkv_of(performer_inputs(7, 8, 5, "packed", torch.float32)[0])
    torch.library.opcheck(ops.performer_forward.default, tuple(t.unsqueeze(1) for t in packed) + (w, 1e-8))
    torch.library.opcheck(ops.performer_forward.default,
                          tuple(t.clone().requires_grad_() for t in (q, k, v)) + (w, 1e-8))
    stats = ops.performer_forward(q, k, v, w, 1e-8)[1:]
    torch.library.opcheck(ops.performer_backward.default, (torch.randn_like(q), q, k, v, w, *stats))


# ---------------------------------------------------------------------------------------------------------
# Every micro-kernel variant (AVX-512, AVX2, baseline) gives the same answers
# ---------------------------------------------------------------------------------------------------------
ISA_SCRIPT = textwrap.dedent("""
    import torch, t2t_fast
    from t2t_fast import reference as R
    torch.manual_seed(0)
    ops = torch.ops.t2t_fast
    x = torch.randn(2, 4, 11, 9)
    w, b, nw, nb = torch.randn(37, 36) / 6, torch.randn(37), torch.rand(36) + 0.5, torch.randn(36)
    y, mean, rstd = ops.soft_split_forward(x, [3, 3], [2, 2], [1, 1], w, b, nw, nb, 1e-5)
    torch.testing.assert_close(y, R.soft_split(x, 3, 2, 1, w, b, nw, nb), rtol=1e-5, atol=1e-5)
    q, k, v = (0.5 * torch.randn(2, 1, 70, 19) for _ in range(3))
    wf = torch.randn(11, 19) / 3
    torch.testing.assert_close(ops.performer_forward(q, k, v, wf, 1e-8)[0], R.performer_attention(q, k, v, wf),
                               rtol=1e-5, atol=1e-5)
    for dtype in (torch.float32, torch.float64):
        xs = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        with t2t_fast.backend("cpu"):
            t2t_fast.soft_split(xs[0], 3, 2, 1, xs[1], xs[2], nw, nb).square().sum().backward()
        rs = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        R.soft_split(rs[0], 3, 2, 1, rs[1], rs[2], nw.to(dtype), nb.to(dtype)).square().sum().backward()
        for a, r in zip(xs, rs):
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)
    print("ok")
""")


@pytest.mark.parametrize("isa", ("base", "avx2", "avx512"))
def test_cpu_isa_variants(isa):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    needs = {"base": [], "avx2": ["avx2", "fma"], "avx512": ["avx512f"]}[isa]
    if isa != "base" and (not flags or not all(f" {f}" in flags for f in needs)):
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, T2T_FAST_CPU_ISA=isa, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Bad calls straight to the operators: must raise, never crash (run in a subprocess so a crash fails the test)
# ---------------------------------------------------------------------------------------------------------
FUZZ_SCRIPT = textwrap.dedent("""
    import json, random, torch, t2t_fast
    ops = torch.ops.t2t_fast
    rng = random.Random(0)
    torch.manual_seed(0)
    devices = ["cuda"] if torch.cuda.is_available() else []

    def ss_fwd():
        return dict(x=torch.randn(2, 3, 9, 8), kernel_size=[3, 3], stride=[2, 2], padding=[1, 1],
                    weight=torch.randn(5, 27), bias=torch.randn(5), norm_weight=torch.rand(27),
                    norm_bias=torch.randn(27), eps=1e-5)

    def ss_bwd():
        a = ss_fwd()
        y, mean, rstd = ops.soft_split_forward(*a.values())
        a.pop("eps")
        return dict(grad_y=torch.randn_like(y), **a, y=y, mean=mean, rstd=rstd, compute_grad_x=True)

    def pf_fwd():
        return dict(q=torch.randn(2, 1, 7, 8), k=torch.randn(2, 1, 7, 8), v=torch.randn(2, 1, 7, 8),
                    w=torch.randn(5, 8), eps=1e-8)

    def pf_bwd():
        a = pf_fwd()
        _, kv, ksum, kmax, denom = ops.performer_forward(*a.values())
        a.pop("eps")
        return dict(grad_y=torch.randn(2, 1, 7, 8), **a, kv=kv, ksum=ksum, kmax=kmax, denom=denom)

    def setter(key, fn):
        def mutate(a):
            a[key] = fn(a[key]) if callable(fn) else fn
        mutate.__name__ = f"{key}"
        return mutate

    def noncontig(t):  # same values, transposed storage: still a bad call when combined with another mutation
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t[::1]

    SS = [
        setter("x", lambda t: t[0]), setter("x", lambda t: t[None]), setter("x", lambda t: t.to(torch.int32)),
        setter("x", lambda t: t[:0]), setter("x", lambda t: t[:, :0]), setter("x", lambda t: t[:, :, :0]),
        setter("x", lambda t: t.to(torch.complex64)), setter("x", lambda t: t[:, :2]),
        setter("x", lambda t: t.bool()),
        setter("kernel_size", [3]), setter("kernel_size", [3, 3, 3]), setter("kernel_size", []),
        setter("kernel_size", [0, 3]), setter("kernel_size", [3, -1]), setter("kernel_size", [40, 3]),
        setter("stride", [0, 2]), setter("stride", [2, -2]), setter("stride", [2]),
        setter("padding", [-1, 1]), setter("padding", [1, 1, 1]), setter("padding", [1 << 40, 1]),
        setter("weight", lambda t: t[:, :26]), setter("weight", lambda t: t[0]), setter("weight", lambda t: t[:0]),
        setter("weight", lambda t: t.double()), setter("weight", lambda t: t.half()),
        setter("weight", lambda t: t[None]), setter("norm_weight", lambda t: t[:26]),
        setter("norm_weight", lambda t: t.double()), setter("norm_weight", None),
        setter("norm_bias", lambda t: t[None]), setter("norm_bias", lambda t: t.half()),
        setter("norm_weight", lambda t: t.reshape(3, 9)), setter("bias", lambda t: t[:4]),
        setter("bias", lambda t: t.double()), setter("bias", lambda t: t[None]),
    ]
    SS_FWD = SS + [setter("eps", -1.0), setter("eps", float("nan")), setter("eps", float("inf"))]
    SS_BWD = SS + [setter("y", None), setter("y", lambda t: t[:, :-1]), setter("y", lambda t: t.double()),
                   setter("grad_y", lambda t: t[:, :-1]), setter("grad_y", lambda t: t.double()),
                   setter("grad_y", lambda t: t[0]), setter("grad_y", lambda t: t[..., :4]),
                   setter("mean", lambda t: t[:, :-1]), setter("rstd", lambda t: t.double()),
                   setter("mean", lambda t: torch.empty(0)), setter("rstd", lambda t: t[None])]
    PF = [
        setter("q", lambda t: t[0]), setter("q", lambda t: t[None]), setter("q", lambda t: t.to(torch.int64)),
        setter("q", lambda t: t[:, :, :0]), setter("q", lambda t: t[..., :0]), setter("k", lambda t: t[..., :7]),
        setter("k", lambda t: t[:, :, :6]), setter("v", lambda t: t.double()), setter("v", lambda t: t.half()),
        setter("k", lambda t: t.to(torch.complex64)), setter("w", lambda t: t[:, :7]), setter("w", lambda t: t[:0]),
        setter("w", lambda t: t.double()), setter("w", lambda t: t[0]), setter("w", lambda t: t.half()),
        setter("q", lambda t: t.half()),
    ]
    PF_FWD = PF + [setter("eps", -1e-8), setter("eps", float("nan"))]
    PF_BWD = PF + [setter("grad_y", lambda t: t[..., :7]), setter("grad_y", lambda t: t.double()),
                   setter("kv", lambda t: t[..., :7]), setter("kv", lambda t: t.double()),
                   setter("ksum", lambda t: t[..., :4]), setter("ksum", lambda t: t.half()),
                   setter("kmax", lambda t: t[None]), setter("kmax", lambda t: t.double()),
                   setter("denom", lambda t: t[..., :6]), setter("denom", lambda t: t[0])]
    for dev in devices:
        SS_FWD += [setter("weight", lambda t: t.to(dev)), setter("norm_weight", lambda t: t.to(dev))]
        SS_BWD += [setter("grad_y", lambda t: t.to(dev)), setter("mean", lambda t: t.to(dev))]
        PF_FWD += [setter("k", lambda t: t.to(dev)), setter("w", lambda t: t.to(dev))]
        PF_BWD += [setter("kv", lambda t: t.to(dev)), setter("grad_y", lambda t: t.to(dev))]
        SS_FWD += [setter("x", lambda t: t.double().to(dev))]  # float64 is CPU-only

    OPS = [("soft_split_forward", ss_fwd, SS_FWD), ("soft_split_backward", ss_bwd, SS_BWD),
           ("performer_forward", pf_fwd, PF_FWD), ("performer_backward", pf_bwd, PF_BWD)]

    cases = []
    for name, make, mutations in OPS:
        cases += [(name, make, [m]) for m in mutations]
    while len(cases) < len(SS_FWD) + len(SS_BWD) + len(PF_FWD) + len(PF_BWD) + 60:  # random pairs
        name, make, mutations = rng.choice(OPS)
        pair = rng.sample(mutations, 2)
        if pair[0].__name__ != pair[1].__name__:  # two different arguments broken at once
            cases.append((name, make, pair))
    for _ in range(20):  # bad calls on non-contiguous inputs
        name, make, mutations = rng.choice(OPS)
        first = next(iter(make()))
        cases.append((name, make, [setter(first, noncontig), rng.choice(mutations)]))

    failures, raised = [], 0
    for i, (name, make, mutations) in enumerate(cases):
        args = make()
        for m in mutations:
            m(args)
        try:
            getattr(ops, name)(*args.values())
        except (RuntimeError, ValueError, TypeError) as e:
            raised += 1
            msg = str(e)
            if not msg.strip():
                failures.append(f"case {i} {name}: empty error message")
        except BaseException as e:
            failures.append(f"case {i} {name} {[m.__name__ for m in mutations]}: {type(e).__name__}: {e}")
        else:
            failures.append(f"case {i} {name} {[m.__name__ for m in mutations]}: did not raise")
    print(json.dumps({"cases": len(cases), "raised": raised, "failures": failures}))
""")


def test_fuzz_bad_calls_raise():
    res = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"the fuzz process died (rc {res.returncode}): {res.stderr[-3000:]}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 50
    assert not report["failures"], "\n".join(report["failures"])


def test_errors_name_the_argument():
    x = torch.randn(1, 3, 9, 9)
    with pytest.raises(ValueError, match="weight must be"):
        ops.soft_split_forward(x, [3, 3], [2, 2], [1, 1], torch.randn(4, 26), None, None, None, 1e-5)
    with pytest.raises(TypeError, match="norm_weight must be Float"):
        ops.soft_split_forward(x, [3, 3], [2, 2], [1, 1], torch.randn(4, 27), None, torch.ones(27).double(), None,
                               1e-5)
    with pytest.raises(ValueError, match="k shape"):
        ops.performer_forward(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 4, 8),
                              torch.randn(3, 8), 1e-8)


def test_poison_switch():
    from t2t_fast.runtime import poisoned_outputs

    assert not t2t_fast._C._poison()
    with poisoned_outputs():
        assert t2t_fast._C._poison()
    assert not t2t_fast._C._poison()
    with pytest.raises(TypeError):
        t2t_fast._C._set_poison(1)


# ---------------------------------------------------------------------------------------------------------
# CUDA kernels (pytest -m gpu)
# ---------------------------------------------------------------------------------------------------------
def _cuda_ready() -> None:
    if not t2t_fast.backends()["cuda"]:
        pytest.skip(t2t_fast.backends()["cuda"].reason)


@pytest.mark.gpu
def test_cuda_performer_eps_term_in_log_space(poisoned):
    _cuda_ready()
    check_performer_eps_term_in_log_space("cuda")


@pytest.mark.gpu
def test_cuda_statistics_match_cpu_and_reject_float64(poisoned):
    _cuda_ready()
    (q, k, v), w = performer_inputs(100, 64, 32, "bhtd", torch.float32)
    cpu = ops.performer_forward(q, k, v, w, 1e-8)
    gpu = ops.performer_forward(q.cuda(), k.cuda(), v.cuda(), w.cuda(), 1e-8)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(q)
    for a, b in zip(ops.performer_backward(gy, q, k, v, w, *cpu[1:]),
                    ops.performer_backward(gy.cuda(), q.cuda(), k.cuda(), v.cuda(), w.cuda(), *gpu[1:])):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 3, 17, 13)
    params = (torch.randn(11, 27), torch.randn(11), torch.rand(27) + 0.5, torch.randn(27))
    cpu = ops.soft_split_forward(x, [3, 3], [2, 2], [1, 1], *params, 1e-5)
    gpu = ops.soft_split_forward(x.cuda(), [3, 3], [2, 2], [1, 1], *(t.cuda() for t in params), 1e-5)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(cpu[0])
    for grad_x in (True, False):
        a_all = ops.soft_split_backward(gy, x, [3, 3], [2, 2], [1, 1], *params, *cpu, grad_x)
        b_all = ops.soft_split_backward(gy.cuda(), x.cuda(), [3, 3], [2, 2], [1, 1], *(t.cuda() for t in params),
                                        *gpu, grad_x)
        for a, b in zip(a_all, b_all):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="float64"):
        ops.performer_forward(q.double().cuda(), k.double().cuda(), v.double().cuda(), w.cuda(), 1e-8)
