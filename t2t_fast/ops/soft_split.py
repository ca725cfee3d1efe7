"""``soft_split``: unfold + optional LayerNorm + linear, one fused op with a backend behind it.

Every backend implements the same pair of operators (the C++ extension as ``torch.ops.t2t_fast.*``, the
Triton kernels as ``torch.ops.t2t_fast_triton.*``)::

    soft_split_forward(x, kernel_size, stride, padding, weight, bias?, norm_weight?, norm_bias?, eps)
        -> (y (B, L, out) in x.dtype, mean (B, L) fp32, rstd (B, L) fp32)   # mean/rstd are (0,) without norm
    soft_split_backward(grad_y, x, kernel_size, stride, padding, weight, norm_weight?, norm_bias?, mean, rstd,
                        compute_grad_x)
        -> (grad_x (B, C, H, W) or (0,), grad_weight, grad_bias (out,), grad_norm_weight, grad_norm_bias)
                                                                  # norm grads are fp32 (K,), or (0,) without norm

x is (B, C, H, W) with any strides; weight (out, K), K = C*kh*kw, column order c*kh*kw + i*kw + j; bias (out,)
in x.dtype; norm_weight/norm_bias (K,) fp32. This file holds their shared fake (meta) functions and autograd
formula, and the front door that checks arguments, applies autocast and picks the backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from t2t_fast import reference
from t2t_fast.backends import resolve
from t2t_fast.ops import _library
from t2t_fast.utils import IntPair, to_pair

SUPPORTED = {  # backend -> dtypes it takes
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}


def output_size(size: int, k: int, s: int, p: int) -> int:
    """Number of patch positions along one axis (as ``F.unfold``)."""
    return (size + 2 * p - k) // s + 1


# ---------------------------------------------------------------------------------------------------------
# Shared fake functions and autograd formula of the forward/backward operator pair
# ---------------------------------------------------------------------------------------------------------
def _fake_forward(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                  norm_bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, _, H, W = x.shape
    L = output_size(H, kernel_size[0], stride[0], padding[0]) * output_size(W, kernel_size[1], stride[1], padding[1])
    stats = (B, L) if norm_weight is not None else (0,)
    return (x.new_empty(B, L, weight.shape[0]), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


def _fake_backward(grad_y: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], weight: Tensor, norm_weight: Optional[Tensor],
                   norm_bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx = x.new_empty(x.shape) if compute_grad_x else x.new_empty(0)
    gn = (weight.shape[1],) if norm_weight is not None else (0,)
    return (gx, torch.empty_like(weight), weight.new_empty(weight.shape[0]),
            x.new_empty(gn, dtype=torch.float32), x.new_empty(gn, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, _ = inputs
    _, mean, rstd = output
    ctx.geometry = (kernel_size, stride, padding)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, norm_weight, norm_bias, mean, rstd)


def _make_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, norm_weight, norm_bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb, gnw, gnb = backward_op(grad_y.contiguous(), x, *ctx.geometry, weight, norm_weight, norm_bias,
                                           mean, rstd, ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None, None, None, None, gw, gb if ctx.has_bias else None,
                gnw if norm_weight is not None else None, gnb if norm_bias is not None else None, None)
    return backward


def _register(forward_op, backward_op) -> None:
    _library.register_pair(forward_op, backward_op, _fake_forward, _fake_backward, _setup_context,
                           _make_backward(backward_op))


SCHEMAS = (
    "(Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, Tensor? bias, Tensor? norm_weight, "
    "Tensor? norm_bias, float eps) -> (Tensor, Tensor, Tensor)",
    "(Tensor grad_y, Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, Tensor? norm_weight, "
    "Tensor? norm_bias, Tensor mean, Tensor rstd, bool compute_grad_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_register(*_library.triton_pair("soft_split", SCHEMAS))
if _library.extension_loaded():
    _register(torch.ops.t2t_fast.soft_split_forward.default, torch.ops.t2t_fast.soft_split_backward.default)


# ---------------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------------
def _check(x: Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], weight: Tensor,
           bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("norm_weight", norm_weight),
                    ("norm_bias", norm_bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"soft_split: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"soft_split: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"soft_split: x must be a floating-point tensor, got {x.dtype}")
    if min(k) < 1 or min(s) < 1 or min(p) < 0:
        raise ValueError(f"soft_split: need kernel_size >= 1, stride >= 1, padding >= 0, got {k}, {s}, {p}")
    B, C, H, W = x.shape
    if min(x.shape) == 0:
        raise ValueError(f"soft_split: x must not be empty, got shape {tuple(x.shape)}")
    lh, lw = output_size(H, k[0], s[0], p[0]), output_size(W, k[1], s[1], p[1])
    if lh < 1 or lw < 1:
        raise ValueError(f"soft_split: image {H}x{W} is smaller than kernel_size {k} with padding {p}")
    K = C * k[0] * k[1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"soft_split: weight must be (out, C*kh*kw) = (out, {K}) for C={C}, kernel {k}; "
                         f"got {tuple(weight.shape)} (does x have the channel count the weights expect?)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"soft_split: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if norm_bias is not None and norm_weight is None:
        raise ValueError("soft_split: norm_bias needs norm_weight (the LayerNorm runs when norm_weight is given)")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and tuple(t.shape) != (K,):
            raise ValueError(f"soft_split: {name} must be ({K},), got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"soft_split: {name} is on {t.device} but x is on {x.device}")
        if name in ("weight", "bias") and t.dtype != x.dtype:
            raise ValueError(f"soft_split: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             "(cast the model, or run under torch.autocast)")
        if not t.is_floating_point():
            raise TypeError(f"soft_split: {name} must be floating point, got {t.dtype}")


def soft_split(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Fused soft split: ``linear(layer_norm(unfold(x).transpose(1, 2)))`` without the unfolded tensor.

    x: (B, C, H, W), any strides (a (B, L, C) token tensor viewed as an image via
    ``tokens.transpose(1, 2).reshape(B, C, H, W)`` is read in place). weight: (out, C*kh*kw); bias: (out,);
    norm_weight, norm_bias: (C*kh*kw,) of the LayerNorm over each unfolded patch, which runs when
    ``norm_weight`` is given. Returns (B, L, out) in x's dtype (autocast's dtype when autocast is on, as for
    ``nn.Linear``).
    """
    k, s, p = to_pair(kernel_size, "kernel_size"), to_pair(stride, "stride"), to_pair(padding, "padding")
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check(x, k, s, p, weight, bias, norm_weight, norm_bias)
    name = resolve(x.device, "soft_split", tuple(b for b, d in SUPPORTED.items() if x.dtype in d))
    if name == "reference":
        return reference.soft_split(x, k, s, p, weight, bias, norm_weight, norm_bias, eps)
    norm_weight = norm_weight.float() if norm_weight is not None else None
    norm_bias = norm_bias.float() if norm_bias is not None else None
    return _library.forward_op("soft_split", name)(x, k, s, p, weight, bias, norm_weight, norm_bias, eps)[0]
