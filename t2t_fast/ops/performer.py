"""``performer_attention``: the token performer's FAVOR+ attention core as one fused op (math: docs/ops.md).

Its operator pair, implemented by the C++ extension (``torch.ops.t2t_fast.*``) and the Triton kernels
(``torch.ops.t2t_fast_triton.*``)::

    performer_forward(q, k, v, w, eps)
        -> (y (B, H, T, d) in q.dtype, kv (B, H, m, d) fp32, ksum (B, H, m) fp32, kmax (B, H) fp32,
            denom (B, H, T) fp32)
    performer_backward(grad_y, q, k, v, w, kv, ksum, kmax, denom) -> (grad_q, grad_k, grad_v)  # (B, H, T, d)

q, k, v: (B, H, T, d) with any strides (views of one packed projection included), one dtype; w: (m, d) fp32.
The statistics are those of the max-shifted (overflow-free) form of the function (docs/ops.md). With
a_tj = k_t.w_j - |k_t|^2/2, b_tj = q_t.w_j - |q_t|^2/2, kmax = max_{t,j} a_tj, qmax_t = max_j b_tj:

    kv_j   = sum_t exp(a_tj - kmax) v_t            ksum_j = sum_t exp(a_tj - kmax)
    denom_t = sum_j exp(b_tj - qmax_t) ksum_j + eps * m * exp(-qmax_t - kmax)
    y_t     = sum_j exp(b_tj - qmax_t) kv_j / denom_t

which is exactly phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k)_t + eps) (numerator and denominator both carry
the factor m * exp(-qmax_t - kmax)). The backward recomputes the features from q, k and w. This file
declares the op (``PERFORMER``: schemas, fake functions, autograd formula, argument checks, backends) and its
front door.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from t2t_fast import reference
from t2t_fast.ops.checks import check_eps, check_floating_tensor, check_same_device
from t2t_fast.ops.descriptor import OpDescriptor, every_backend
from t2t_fast.runtime import first_exceeded

SCHEMAS = (  # as csrc/ops.cpp defines them (tests/test_op_contracts.py)
    "(Tensor q, Tensor k, Tensor v, Tensor w, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor w, Tensor kv, Tensor ksum, Tensor kmax, "
    "Tensor denom) -> (Tensor, Tensor, Tensor)",
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


def _backward(backward_op, ctx, grad_y, *_grad_stats):
    gq, gk, gv = backward_op(grad_y.contiguous(), *ctx.saved_tensors)
    return gq, gk, gv, None, None


def _arguments(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float = 1e-8) -> tuple:
    """The forward operator's arguments for a front-door call, after checking them: (B, T, d) inputs get
    H = 1, w is taken as frozen float32.

    TypeError: an argument of the wrong Python type, or a tensor that is not floating point; ValueError:
    shapes, devices, dtypes that disagree, or eps negative or not finite."""
    for name, t in (("q", q), ("k", k), ("v", v), ("w", w)):
        check_floating_tensor("performer_attention", name, t)
    check_eps("performer_attention", eps)
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
    for name, t in (("k", k), ("v", v), ("w", w)):
        check_same_device("performer_attention", name, t, "q", q)
    if q.dim() == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    return q, k, v, w.detach().float(), eps


CUDA_MAX_HEAD_DIM = 128  # csrc/common.h: kCudaMaxHeadDim
CUDA_MAX_FEATURES = 64  # csrc/common.h: kCudaMaxFeatures


def cuda_verify(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float) -> Optional[str]:
    """The CUDA kernels' limits (csrc/common.h): None when they take the call, else the limit it passes."""
    return first_exceeded(("d", q.shape[-1], CUDA_MAX_HEAD_DIM), ("m", w.shape[0], CUDA_MAX_FEATURES))


PERFORMER = OpDescriptor(
    name="performer_attention", prefix="performer", schemas=SCHEMAS,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    arguments=_arguments, backends=every_backend("performer", cuda_verify),
)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float = 1e-8) -> Tensor:
    """FAVOR+ attention: ``phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k)_t + eps)``, phi computed in float32.

    q, k, v: (B, T, d) or (B, H, T, d), one dtype, any strides (e.g. ``torch.split`` views of a packed
    projection); w: (m, d) random features. Returns q's shape in q's dtype. Gradients flow to q, k, v;
    w is treated as frozen. Bad arguments raise TypeError or ValueError naming the argument (docs/ops.md).
    """
    args = _arguments(q, k, v, w, eps)
    name = PERFORMER.resolve(*args)
    if name == "reference":
        return reference.performer_attention(q, k, v, w, eps)
    y = PERFORMER.apply(name, *args)[0]
    return y.squeeze(1) if q.dim() == 3 else y
