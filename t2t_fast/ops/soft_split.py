"""``soft_split``: unfold + optional LayerNorm + linear, one fused op (math and contract: docs/ops.md).

Its operator pair, implemented by the C++ extension (``torch.ops.t2t_fast.*``) and the Triton kernels
(``torch.ops.t2t_fast_triton.*``)::

    soft_split_forward(x, kernel_size, stride, padding, weight, bias?, norm_weight?, norm_bias?, eps)
        -> (y (B, L, out) in x.dtype, mean (B, L) fp32, rstd (B, L) fp32)   # mean/rstd are (0,) without norm
    soft_split_backward(grad_y, x, kernel_size, stride, padding, weight, bias?, norm_weight?, norm_bias?, y?,
                        mean, rstd, compute_grad_x)
        -> (grad_x (B, C, H, W) or (0,), grad_weight, grad_bias (out,), grad_norm_weight, grad_norm_bias)
                                                                  # norm grads are fp32 (K,), or (0,) without norm

grad_x has x's strides (as ``torch.empty_like(x)``): the gradient of a token view comes back (B, L, C)-contiguous,
and its channels are the Triton kernel's unit-stride axis.

y is the forward's output, passed (with bias) when the LayerNorm runs and grad_x is wanted: the LayerNorm
backward's per-token sums over the patch, sum_k gamma_k g_k xhat_k and sum_k gamma_k g_k (g = grad_y @ W), are
grad_y . (y - W beta - b) and grad_y . (W gamma), which a backend can take from y without gathering the patches
(the Triton one does; the C++ ones hold each token's patch anyway and sum it). So, as for ``torch.exp``, the
output is saved then: modifying it in place before the backward raises autograd's in-place error.

x is (B, C, H, W) with any strides; weight (out, K), K = C*kh*kw, column order c*kh*kw + i*kw + j; bias (out,)
in x.dtype; norm_weight/norm_bias (K,) fp32. This file declares the op (``SOFT_SPLIT``: schemas, fake
functions, autograd formula, argument checks, backends) and its front door.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from t2t_fast import reference
from t2t_fast.ops.checks import check_eps, check_floating_tensor, check_same_device
from t2t_fast.ops.descriptor import OpDescriptor, every_backend
from t2t_fast.runtime import first_exceeded
from t2t_fast.utils import IntPair, to_pair

SCHEMAS = (  # as csrc/ops.cpp defines them (tests/test_op_contracts.py)
    "(Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, Tensor? bias, "
    "Tensor? norm_weight, Tensor? norm_bias, float eps) -> (Tensor, Tensor, Tensor)",
    "(Tensor grad_y, Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, Tensor? bias, "
    "Tensor? norm_weight, Tensor? norm_bias, Tensor? y, Tensor mean, Tensor rstd, bool compute_grad_x) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def output_size(size: int, k: int, s: int, p: int) -> int:
    """Number of patch positions along one axis (as ``F.unfold``)."""
    return (size + 2 * p - k) // s + 1


# ---------------------------------------------------------------------------------------------------------
# Fake functions and autograd formula of the operator pair (shared by every backend)
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
                   padding: Sequence[int], weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                   norm_bias: Optional[Tensor], y: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx = torch.empty_like(x) if compute_grad_x else x.new_empty(0)
    gn = (weight.shape[1],) if norm_weight is not None else (0,)
    return (gx, torch.empty_like(weight), weight.new_empty(weight.shape[0]),
            x.new_empty(gn, dtype=torch.float32), x.new_empty(gn, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, _ = inputs
    y, mean, rstd = output
    ctx.geometry = (kernel_size, stride, padding)
    ctx.has_bias = bias is not None
    # y only where the backward's LayerNorm sums come from it (see the module docstring)
    keep_y = norm_weight is not None and ctx.needs_input_grad[0]
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias, y if keep_y else None, mean, rstd)


def _backward(backward_op, ctx, grad_y, *_grad_stats):
    x, weight, bias, norm_weight, norm_bias, y, mean, rstd = ctx.saved_tensors
    gx, gw, gb, gnw, gnb = backward_op(grad_y.contiguous(), x, *ctx.geometry, weight, bias, norm_weight, norm_bias,
                                       y, mean, rstd, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None, None, None, None, gw, gb if ctx.has_bias else None,
            gnw if norm_weight is not None else None, gnb if norm_bias is not None else None, None)


# ---------------------------------------------------------------------------------------------------------
# Argument checks (the front door's, once for every backend) and the backends' own limits
# ---------------------------------------------------------------------------------------------------------
def _arguments(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, weight: Tensor,
               bias: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
               norm_bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple:
    """The forward operator's arguments for a front-door call, after checking them: autocast applied, the
    LayerNorm parameters in float32.

    TypeError: an argument of the wrong Python type, or a tensor that is not floating point; ValueError:
    shapes, sizes, devices, dtypes that disagree, or eps negative or not finite."""
    k, s, p = to_pair(kernel_size, "kernel_size"), to_pair(stride, "stride"), to_pair(padding, "padding")
    for name, t in (("x", x), ("weight", weight)):
        check_floating_tensor("soft_split", name, t)
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_floating_tensor("soft_split", name, t, optional=True)
    check_eps("soft_split", eps)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dim() != 4:
        raise ValueError(f"soft_split: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    for name, pair, least in (("kernel_size", k, 1), ("stride", s, 1), ("padding", p, 0)):
        if min(pair) < least:
            raise ValueError(f"soft_split: {name} must be >= {least}, got {pair}")
    B, C, H, W = x.shape
    if min(x.shape) == 0:
        raise ValueError(f"soft_split: x must not be empty, got shape {tuple(x.shape)}")
    if output_size(H, k[0], s[0], p[0]) < 1 or output_size(W, k[1], s[1], p[1]) < 1:
        raise ValueError(f"soft_split: image {H}x{W} is smaller than kernel_size {k} with padding {p}")
    K = C * k[0] * k[1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] == 0:
        raise ValueError(f"soft_split: weight must be (out, C*kh*kw) = (out, {K}) with out >= 1 for C={C}, "
                         f"kernel {k}; got {tuple(weight.shape)} (does x have the channel count the weights "
                         "expect?)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"soft_split: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if norm_bias is not None and norm_weight is None:
        raise ValueError("soft_split: norm_bias needs norm_weight (the LayerNorm runs when norm_weight is given)")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and tuple(t.shape) != (K,):
            raise ValueError(f"soft_split: {name} must be ({K},), got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_same_device("soft_split", name, t, "x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"soft_split: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             "(cast the model, or run under torch.autocast)")
    norm_weight, norm_bias = (t.float() if t is not None else None for t in (norm_weight, norm_bias))
    return x, k, s, p, weight, bias, norm_weight, norm_bias, eps


CUDA_MAX_PATCH_LEN = 4096  # csrc/common.h: kCudaMaxPatchLen
CUDA_MAX_OUT = 4096  # csrc/common.h: kCudaMaxOut


def cuda_verify(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], weight: Tensor,
                bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                eps: float) -> Optional[str]:
    """The CUDA kernels' limits (csrc/common.h): None when they take the call, else the limit it passes."""
    out, K = weight.shape
    return first_exceeded(("C*kh*kw", K, CUDA_MAX_PATCH_LEN), ("out", out, CUDA_MAX_OUT))


SOFT_SPLIT = OpDescriptor(
    name="soft_split", prefix="soft_split", schemas=SCHEMAS,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    arguments=_arguments, backends=every_backend("soft_split", cuda_verify),
)


# ---------------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------------
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
    ``nn.Linear``). Bad arguments raise TypeError or ValueError naming the argument (docs/ops.md).
    """
    args = _arguments(x, kernel_size, stride, padding, weight, bias, norm_weight, norm_bias, eps)
    name = SOFT_SPLIT.resolve(*args)
    if name != "reference":
        return SOFT_SPLIT.apply(name, *args)[0]
    # the reference takes the LayerNorm parameters as given, in at least float32 (float64 for float64 x)
    x, k, s, p, weight, bias, _, _, eps = args
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm_weight, norm_bias = (t.to(dtype) if t is not None else None for t in (norm_weight, norm_bias))
    return reference.soft_split(x, k, s, p, weight, bias, norm_weight, norm_bias, eps)
