"""One input factory and one scaled comparison per op, run against every backend present.

As pytorch/extension-cpp runs its ``sample_inputs`` on every device: each op has a list of cases (odd shapes,
strided inputs, every variant of its arguments), ``<op>_inputs(case, dtype, device)`` draws fresh random
inputs for one, and ``check_<op>(backend, case, dtype, device)`` runs the front door on that backend, forward
and backward, against ``t2t_fast.reference`` in float64 on the same (rounded) inputs, with ``rel_close``.
``backend_params()`` lists the (backend, device) pairs to run: every backend available here on the CPU (the
Triton kernels under TRITON_INTERPRET=1), and with a GPU the CUDA and Triton backends on CUDA tensors
(``-m gpu``).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import pytest
import torch

import t2t_fast
from t2t_fast import reference as R
from t2t_fast.ops import OPS

LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(max |expected|, 0.1), shapes equal, everything finite.

    Inputs are O(1), so 0.1 floors the scale of outputs that cancel to ~0 (e.g. grad q with a single token).
    """
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    scale = max(e.abs().max().item(), 0.1)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def tolerance(dtype: torch.dtype, low: float = 2e-2, fp32: float = 2e-5) -> float:
    """The tolerance of ``rel_close`` for outputs in ``dtype``. float64: 1e-6, as the operators' LayerNorm
    statistics and parameters are float32 (their contract)."""
    return {torch.float64: 1e-6, torch.float32: fp32}.get(dtype, low)


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU tensors runs in its interpreter: about 1000x slower, so it gets fewer cases."""
    return backend == "triton" and device == "cpu"


def backend_params(op: str) -> list:
    """pytest params (backend, device): every backend of ``op`` that runs here on CPU tensors, and the CUDA
    and Triton backends on CUDA tensors (``-m gpu``)."""
    params = []
    for name, info in t2t_fast.backends(op).items():
        devices = OPS[op].backends[name].devices if info else ()
        if devices is None or "cpu" in devices:
            params.append(pytest.param(name, "cpu", id=f"{name}-cpu"))
    return params + [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu)
                     for name in ("triton", "cuda")]


def skip_unless_runs(op: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """Skip a (backend, device, dtype) combination the backend does not claim."""
    if device == "cuda" and not t2t_fast.backends(op)[backend]:
        pytest.skip(t2t_fast.backends(op)[backend].reason)
    if dtype not in OPS[op].backends[backend].dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    if interpreted(backend, device) and dtype == torch.float64:
        pytest.skip("triton does not take float64")


def leaves(tensors, dtype: Optional[torch.dtype] = None) -> list:
    """Fresh leaf copies that require grad (cast to ``dtype`` if given); None stays None."""
    return [None if t is None else (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_()
            for t in tensors]


def _compare(backend: str, run, inputs: list, dtype: torch.dtype, names: tuple[str, ...], y_tol: float,
             grad_tol: float) -> None:
    """``run(impl, *inputs)`` with impl = t2t_fast on ``backend``, and with impl = t2t_fast.reference on float64
    copies of the same inputs: the outputs and the gradients of every input compared."""
    ours = leaves(inputs)
    with t2t_fast.backend(backend):
        y = run(t2t_fast, *ours)
    grad = torch.randn(y.shape, device=y.device).to(dtype)
    y.backward(grad)
    ref = leaves(inputs, torch.float64)
    y_ref = run(R, *ref)
    y_ref.backward(grad.double())
    assert y.dtype == dtype
    rel_close(y, y_ref, y_tol, "y")
    for name, a, r in zip(names, ours, ref):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            rel_close(a.grad, r.grad, grad_tol, f"grad {name}")


# ---------------------------------------------------------------------------------------------------------
# soft_split
# ---------------------------------------------------------------------------------------------------------
GEOMETRIES = {  # (kernel, stride, padding) -> (B, C, H, W)
    (7, 4, 2): (2, 3, 17, 13),
    (3, 2, 1): (1, 5, 9, 20),
    (2, 1, 0): (2, 4, 11, 10),
    ((3, 2), (2, 1), (1, 0)): (2, 4, 9, 13),  # non-square kernel, stride and padding
}
VARIANTS = ("norm+bias", "norm_weight only", "plain")
LAYOUTS = ("nchw", "tokens")
SOFT_SPLIT_CASES = list(itertools.product(GEOMETRIES, VARIANTS, LAYOUTS))
# under the interpreter: every geometry once, the variants and layouts cycling
SOFT_SPLIT_INTERPRETED = [(g, VARIANTS[i % 3], LAYOUTS[i % 2]) for i, g in enumerate(GEOMETRIES)]
# (geometry, variant, layout, shape, out) on a GPU: the three soft splits of T2T-ViT-14 at 224 px, and an odd one
SOFT_SPLIT_GPU_CASES = [
    ((7, 4, 2), "norm+bias", "tokens", (2, 3, 224, 224), 192),
    ((3, 2, 1), "norm+bias", "tokens", (2, 64, 56, 56), 192),
    ((3, 2, 1), "plain", "tokens", (2, 64, 28, 28), 384),
    ((3, 2, 1), "norm+bias", "tokens", (3, 5, 19, 13), 37),
]


def soft_split_inputs(geometry, variant: str, layout: str, dtype: torch.dtype, device: str = "cpu",
                      shape: Optional[tuple[int, int, int, int]] = None, out: int = 13) -> tuple:
    """(x, (k, s, p), weight, bias, norm_weight, norm_bias): x and the linear in dtype, the LayerNorm
    parameters float32 (the operators' contract); k, s, p as pairs. shape (B, C, H, W): GEOMETRIES' by
    default. layout 'tokens': a (B, L, C) token tensor viewed as the (B, C, H, W) image, read in place."""
    k, s, p = (R.to_pair(v) for v in geometry)
    B, C, H, W = shape or GEOMETRIES[geometry]
    if layout == "tokens":
        x = torch.randn(B, H * W, C, device=device).to(dtype).transpose(1, 2).reshape(B, C, H, W)
        assert not x.is_contiguous() or C == 1
    else:
        x = torch.randn(B, C, H, W, device=device).to(dtype)
    K = C * k[0] * k[1]
    weight = (torch.randn(out, K, device=device) / math.sqrt(K)).to(dtype)
    bias = torch.randn(out, device=device).to(dtype) if variant == "norm+bias" else None
    norm_weight = 1 + 0.3 * torch.randn(K, device=device) if variant != "plain" else None
    norm_bias = 0.2 * torch.randn(K, device=device) if variant == "norm+bias" else None
    return x, (k, s, p), weight, bias, norm_weight, norm_bias


def check_soft_split(backend: str, inputs: tuple, dtype: torch.dtype) -> None:
    """Forward and every gradient of the front door on ``backend`` against the float64 reference."""
    x, (k, s, p), *params = inputs
    gpu = x.is_cuda  # T2T-ViT's full shapes: longer fp32 reductions
    # the reference backend is PyTorch's eager LayerNorm in x's dtype: on one CPU thread its bf16 backward sums
    # the norm_weight gradient less accurately (4% of the largest value at 180 tokens; OMP_NUM_THREADS=1)
    low = 5e-2 if backend == "reference" else 3e-2
    _compare(backend, lambda impl, x, *params: impl.soft_split(x, k, s, p, *params), [x, *params], dtype,
             ("x", "weight", "bias", "norm_weight", "norm_bias"), tolerance(dtype, fp32=1e-4 if gpu else 1e-5),
             tolerance(dtype, low=low, fp32=1e-4 if gpu else 2e-5))


# ---------------------------------------------------------------------------------------------------------
# performer_attention
# ---------------------------------------------------------------------------------------------------------
PERFORMER_SHAPES = ((1, 8, 3), (7, 17, 9), (100, 64, 32), (100, 33, 7))  # (T, d, m)
PERFORMER_LAYOUTS = ("bthd", "bhtd", "packed", "packed_heads")
PERFORMER_CASES = list(itertools.product(PERFORMER_SHAPES, PERFORMER_LAYOUTS))
PERFORMER_INTERPRETED = [(shape, PERFORMER_LAYOUTS[i % 4]) for i, shape in enumerate(PERFORMER_SHAPES)]
# on a GPU: the token performer's first layer at 224 px (T=3136) and smaller, q/k/v views of one projection
PERFORMER_GPU_CASES = [((3136, 64, 32), "packed"), ((784, 64, 32), "packed"), ((7, 64, 32), "packed")]


def performer_inputs(T: int, d: int, m: int, layout: str, dtype: torch.dtype, device: str = "cpu", B: int = 2,
                     H: int = 3) -> tuple[list, torch.Tensor]:
    """(bases, w): the tensors q, k, v come from, and the random features (as TokenPerformer draws them).

    layout 'bthd': q, k, v (B, T, d); 'bhtd': (B, H, T, d); 'packed': one (B, T, 3d) projection that q, k, v are
    torch.split views of (strided, as in TokenPerformer) -- see qkv_of; 'packed_heads': the same, (B, H, T, 3d).
    """
    if layout.startswith("packed"):
        shape = (B, T, 3 * d) if layout == "packed" else (B, H, T, 3 * d)
        bases = [(0.5 * torch.randn(shape, device=device)).to(dtype)]
    else:
        shape = (B, T, d) if layout == "bthd" else (B, H, T, d)
        bases = [(0.5 * torch.randn(shape, device=device)).to(dtype) for _ in range(3)]
    w = (torch.nn.init.orthogonal_(torch.empty(m, d)) * math.sqrt(m)).to(device)
    return bases, w


def qkv_of(bases: list) -> tuple:
    """q, k, v from performer_inputs' bases (split in TokenPerformer's k, q, v order when packed)."""
    if len(bases) == 1:
        k, q, v = torch.split(bases[0], bases[0].shape[-1] // 3, dim=-1)
        return q, k, v
    return tuple(bases)


def check_performer(backend: str, inputs: tuple, dtype: torch.dtype) -> None:
    """Forward and the gradients of q, k, v through the front door on ``backend`` against float64 reference."""
    bases, w = inputs
    gpu = w.is_cuda  # T2T-ViT's full shapes: longer fp32 reductions
    _compare(backend, lambda impl, *bases: impl.performer_attention(*qkv_of(list(bases)), w), bases, dtype,
             ("q", "k", "v") if len(bases) == 3 else ("kqv",), tolerance(dtype, fp32=1e-4 if gpu else 1e-5),
             # bf16 kernels feed the tensor cores bf16 operands in the backward (as FlashAttention does); grad k
             # of one token cancels to ~0 and keeps ~0.3% of its O(1) terms' rounding
             tolerance(dtype, low=4e-2 if dtype == torch.bfloat16 else 3e-2, fp32=2e-4 if gpu else 5e-5))
