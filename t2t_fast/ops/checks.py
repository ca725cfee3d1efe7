"""Argument checks shared by the front doors: one exception type per fault, every message naming the argument.

TypeError: an argument of the wrong Python type, or a tensor that is not floating point. ValueError: a value
out of range, or shapes, sizes, devices or dtypes that do not fit together (docs/ops.md).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def check_floating_tensor(op: str, name: str, t: Any, optional: bool = False) -> None:
    """``t`` is a floating-point tensor (or None when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_eps(op: str, eps: Any) -> None:
    """``eps`` is a finite real number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
