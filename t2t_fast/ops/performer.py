"""``performer_attention``: the token performer's FAVOR+ attention core as one fused op.

Every backend implements the same pair of operators (``torch.ops.t2t_fast.*`` from the C++ extension,
``torch.ops.t2t_fast_triton.*`` from the Triton kernels)::

    performer_forward(q, k, v, w, eps)
        -> (y (B, H, T, d) in q.dtype, kv (B, H, m, d) fp32, ksum (B, H, m) fp32, kmax (B, H) fp32,
            denom (B, H, T) fp32)
    performer_backward(grad_y, q, k, v, w, kv, ksum, kmax, denom) -> (grad_q, grad_k, grad_v)  # (B, H, T, d)

q, k, v: (B, H, T, d) with any strides (views of one packed projection included), one dtype; w: (m, d) fp32.
The statistics are those of the max-shifted (overflow-free) form of SPEC.md's function. With
a_tj = k_t.w_j - |k_t|^2/2, b_tj = q_t.w_j - |q_t|^2/2, kmax = max_{t,j} a_tj, qmax_t = max_j b_tj:

    kv_j   = sum_t exp(a_tj - kmax) v_t            ksum_j = sum_t exp(a_tj - kmax)
    denom_t = sum_j exp(b_tj - qmax_t) ksum_j + eps * m * exp(-qmax_t - kmax)
    y_t     = sum_j exp(b_tj - qmax_t) kv_j / denom_t

which is exactly phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k)_t + eps) (numerator and denominator both carry
the factor m * exp(-qmax_t - kmax)). The backward recomputes the features from q, k and w.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from t2t_fast import reference
from t2t_fast.backends import resolve
from t2t_fast.ops import _library

SUPPORTED = {  # backend -> dtypes it takes
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}
SCHEMAS = (
    "(Tensor q, Tensor k, Tensor v, Tensor w, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor w, Tensor kv, Tensor ksum, Tensor kmax, Tensor denom) "
    "-> (Tensor, Tensor, Tensor)",
)


def _fake_forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float) -> tuple[Tensor, ...]:
    B, H, T, d = q.shape
    m = w.shape[0]
    f32 = torch.float32
    return (q.new_empty(B, H, T, d), q.new_empty(B, H, m, d, dtype=f32), q.new_empty(B, H, m, dtype=f32),
            q.new_empty(B, H, dtype=f32), q.new_empty(B, H, T, dtype=f32))


def _fake_backward(grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, kv: Tensor, ksum: Tensor,
                   kmax: Tensor, denom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, w, _ = inputs
    _, kv, ksum, kmax, denom = output
    ctx.save_for_backward(q, k, v, w, kv, ksum, kmax, denom)


def _make_backward(backward_op):
    def backward(ctx, grad_y, *_grad_stats):
        gq, gk, gv = backward_op(grad_y.contiguous(), *ctx.saved_tensors)
        return gq, gk, gv, None, None
    return backward


def _register(forward_op, backward_op) -> None:
    _library.register_pair(forward_op, backward_op, _fake_forward, _fake_backward, _setup_context,
                           _make_backward(backward_op))


_register(*_library.triton_pair("performer", SCHEMAS))
if _library.extension_loaded():
    _register(torch.ops.t2t_fast.performer_forward.default, torch.ops.t2t_fast.performer_backward.default)


def _check(q: Tensor, k: Tensor, v: Tensor, w: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"performer_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"performer_attention: {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"performer_attention: {name} is on {t.device} but q is on {q.device}")
    if q.dim() not in (3, 4):
        raise ValueError(f"performer_attention: q must be (B, T, d) or (B, H, T, d), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"performer_attention: {name} shape {tuple(t.shape)} differs from q shape "
                             f"{tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"performer_attention: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
    if q.numel() == 0:
        raise ValueError(f"performer_attention: q must not be empty, got shape {tuple(q.shape)}")
    if w.dim() != 2 or w.shape[1] != q.shape[-1] or w.shape[0] == 0:
        raise ValueError(f"performer_attention: w must be (m, d) = (m, {q.shape[-1]}) with m >= 1, "
                         f"got {tuple(w.shape)}")


def performer_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float = 1e-8) -> Tensor:
    """FAVOR+ attention: ``phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k)_t + eps)``, phi computed in float32.

    q, k, v: (B, T, d) or (B, H, T, d), one dtype, any strides (e.g. ``torch.split`` views of a packed
    projection); w: (m, d) random features. Returns q's shape in q's dtype. Gradients flow to q, k, v;
    w is treated as frozen.
    """
    _check(q, k, v, w)
    name = resolve(q.device, "performer_attention", tuple(b for b, d in SUPPORTED.items() if q.dtype in d))
    if name == "reference":
        return reference.performer_attention(q, k, v, w, eps)
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    y = _library.forward_op("performer", name)(q, k, v, w.detach().float(), eps)[0]
    return y.squeeze(1) if squeeze else y


CUDA_MAX_D = 128  # kCudaMaxHeadDim in csrc/common.h
CUDA_MAX_M = 64  # kCudaMaxFeatures in csrc/common.h: the kernels' shared-memory tiles are sized for it


def cuda_verify(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float) -> Optional[str]:
    """None when the CUDA extension's performer kernels take this call (forward and backward), else the limit it
    passes. Shapes, dtype and device only: no launch, no sync (traceable by torch.compile)."""
    if q.dtype not in SUPPORTED["cuda"]:
        return f"dtype {q.dtype} is not float32, float16 or bfloat16"
    if q.shape[-1] > CUDA_MAX_D:
        return f"head width d must be <= {CUDA_MAX_D}, got {q.shape[-1]}"
    if w.shape[0] > CUDA_MAX_M:
        return f"the number of random features m (w.shape[0]) must be <= {CUDA_MAX_M}, got {w.shape[0]}"
    if q.device.type != "cuda":
        return f"device {q.device} is not a CUDA device"
    return None
