"""Every op on every backend present, forward and backward, against the float64 reference (tests/op_harness.py).

CPU tensors: the cpu and reference backends on every case, the Triton kernels under TRITON_INTERPRET=1 on a
subset (the interpreter is about 1000x slower). With ``-m gpu``: the cuda and triton backends on CUDA tensors
at T2T-ViT's shapes. Outputs are poisoned (NaN-filled) before the kernels write them.
"""
import pytest
import torch

import t2t_fast
from op_harness import (DTYPES, PERFORMER_CASES, PERFORMER_GPU_CASES, PERFORMER_INTERPRETED, SOFT_SPLIT_CASES,
                        SOFT_SPLIT_GPU_CASES, SOFT_SPLIT_INTERPRETED, backend_params, check_performer,
                        check_soft_split, interpreted, performer_inputs, skip_unless_runs, soft_split_inputs)

DTYPE_PARAMS = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPES]


def _cases(all_cases: list, interpreted_cases: list, gpu_cases: list, backend: str, device: str) -> list:
    if device == "cuda":
        return gpu_cases
    return interpreted_cases if interpreted(backend, device) else all_cases


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("backend, device", backend_params("soft_split"))
def test_soft_split(backend, device, dtype, poisoned):
    skip_unless_runs("soft_split", backend, device, dtype)
    for geometry, variant, layout, *shape_out in _cases(SOFT_SPLIT_CASES, SOFT_SPLIT_INTERPRETED,
                                                         SOFT_SPLIT_GPU_CASES, backend, device):
        inputs = soft_split_inputs(geometry, variant, layout, dtype, device, *shape_out)
        try:
            check_soft_split(backend, inputs, dtype)
        except AssertionError as e:
            raise AssertionError(f"case {geometry} {variant} {layout} {shape_out}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("backend, device", backend_params("performer_attention"))
def test_performer(backend, device, dtype, poisoned):
    skip_unless_runs("performer_attention", backend, device, dtype)
    for shape, layout in _cases(PERFORMER_CASES, PERFORMER_INTERPRETED, PERFORMER_GPU_CASES, backend, device):
        try:
            check_performer(backend, performer_inputs(*shape, layout, dtype, device), dtype)
        except AssertionError as e:
            raise AssertionError(f"case {shape} {layout}: {e}") from None


@pytest.mark.parametrize("backend, device", [p for p in backend_params("soft_split") if p.values[1] == "cpu"])
def test_front_doors_compile_fullgraph(backend, device):
    """Argument checks, backend choice (verify included) and the operators trace as one graph."""
    x, (k, s, p), weight, bias, nw, nb = soft_split_inputs((3, 2, 1), "norm+bias", "tokens", torch.float32)
    bases, w = performer_inputs(7, 8, 5, "packed", torch.float32)

    def f(x, weight, kqv):
        y = t2t_fast.soft_split(x, k, s, p, weight, bias, nw, nb)
        kk, q, v = torch.split(kqv, 8, dim=-1)
        return y.square().sum() + t2t_fast.performer_attention(q, kk, v, w).sum()

    x, weight, kqv = (t.requires_grad_() for t in (x, weight, bases[0]))
    with t2t_fast.backend(backend):
        expected = f(x, weight, kqv)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, weight, kqv)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(compiled, (x, weight, kqv)), torch.autograd.grad(expected, (x, weight, kqv))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
