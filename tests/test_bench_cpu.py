"""pytest-benchmark suite: the C++ CPU kernels (``cpu`` backend) against ``t2t_fast.reference`` at small shapes.

CI runs it with ``--benchmark-disable`` (every case once, as a smoke test that also checks the two agree);
compare the backends with ``pytest tests/test_bench_cpu.py --benchmark-only --benchmark-group-by=group``.
The full-size CPU benchmark of the T2T module is ``benchmarks/bench_cpu.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

try:
    import t2t_fast._C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"the C++ extension t2t_fast._C is not built ({exc})", allow_module_level=True)

import t2t_fast

IMPLS = ("cpu", "reference")


def soft_split_inputs():
    """The first soft split of T2T-ViT on a 64 px image: unfold 7/4/2 + LayerNorm(147) + Linear(147, 192)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    weight, bias = torch.randn(192, 147) / math.sqrt(147), torch.randn(192)
    return x, (weight, bias, 1 + 0.1 * torch.randn(147), 0.1 * torch.randn(147))


def performer_inputs():
    """The token performer's attention core at the second T2T layer of a 112 px image: T=196, d=64, m=32."""
    torch.manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 196, 64) for _ in range(3))
    return (q, k, v), torch.nn.init.orthogonal_(torch.empty(32, 64)) * math.sqrt(32)


def soft_split_step(impl: str, backward: bool):
    x, params = soft_split_inputs()
    params = [p.clone().requires_grad_(backward) for p in params]

    def step():
        with t2t_fast.backend(impl), torch.set_grad_enabled(backward):
            y = t2t_fast.soft_split(x, 7, 4, 2, *params)
        if backward:
            for p in params:
                p.grad = None
            y.square().sum().backward()
            return y.detach(), [p.grad for p in params]
        return y, []

    return step


def performer_step(impl: str, backward: bool):
    qkv, w = performer_inputs()
    qkv = [t.clone().requires_grad_(backward) for t in qkv]

    def step():
        with t2t_fast.backend(impl), torch.set_grad_enabled(backward):
            y = t2t_fast.performer_attention(*qkv, w)
        if backward:
            for t in qkv:
                t.grad = None
            y.square().sum().backward()
            return y.detach(), [t.grad for t in qkv]
        return y, []

    return step


def check_against_reference(make_step, result, backward: bool) -> None:
    y, grads = result
    ref_y, ref_grads = make_step("reference", backward)()
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backward", (False, True), ids=("forward", "forward+backward"))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_soft_split(benchmark, impl, backward):
    benchmark.group = f"soft_split 2x3x64x64 k7s4p2 ->192, {'fwd+bwd' if backward else 'fwd'}"
    result = benchmark(soft_split_step(impl, backward))
    if impl == "cpu":
        check_against_reference(soft_split_step, result, backward)


@pytest.mark.parametrize("backward", (False, True), ids=("forward", "forward+backward"))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_performer(benchmark, impl, backward):
    benchmark.group = f"performer_attention B2 T196 d64 m32, {'fwd+bwd' if backward else 'fwd'}"
    result = benchmark(performer_step(impl, backward))
    if impl == "cpu":
        check_against_reference(performer_step, result, backward)
