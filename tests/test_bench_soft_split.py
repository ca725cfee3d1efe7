"""The benchmark's conv-folded reference (benchmarks/bench_soft_split.py ``conv_folded``) computes
``t2t_fast.reference.soft_split``: forward and every gradient in fp32, at the T2T-ViT stage 0 and 1 geometries."""
import os
import sys

import pytest
import torch

from t2t_fast import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_soft_split import conv_folded  # noqa: E402


# (B, C, side, kernel, stride, padding, out, token view, LayerNorm)
GEOMETRIES = {
    "stage0": (2, 3, 64, 7, 4, 2, 192, False, True),
    "stage1": (2, 64, 28, 3, 2, 1, 192, True, True),
    "stage2": (1, 64, 14, 3, 2, 1, 384, True, False),
}


@pytest.mark.parametrize("stage", list(GEOMETRIES))
def test_conv_folded_is_the_reference(stage):
    B, C, side, k, s, p, out, tokens, norm = GEOMETRIES[stage]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = rand(B, side * side, C).transpose(1, 2).reshape(B, C, side, side) if tokens else rand(B, C, side, side)
    K = C * k * k
    leaves = [x + 0.5, rand(out, K) / K**0.5, rand(out), 1 + 0.2 * rand(K) if norm else None,
              0.2 * rand(K) if norm else None]
    leaves = [t.requires_grad_() if t is not None else None for t in leaves]
    grad = rand(B, ((side + 2 * p - k) // s + 1) ** 2, out)
    results = []
    for fn in (conv_folded, reference.soft_split):
        y = fn(leaves[0], k, s, p, *leaves[1:])
        used = [t for t in leaves if t is not None]
        results.append([y.detach()] + list(torch.autograd.grad(y, used, grad)))
    for got, want in zip(*results):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)
