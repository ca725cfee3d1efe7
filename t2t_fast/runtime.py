"""What the op layer and the Triton kernels share: runtime switches, output allocation, limit messages, integer
helpers for host code.

This module imports nothing from ``t2t_fast`` (the C++ extension only lazily, to flip its poison flag), so
``t2t_fast.kernels`` can use it without importing the op layer that dispatches to them.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator, Optional, Sequence

import torch

_poison = False


def triton_interpret() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output. Under ``poisoned_outputs()`` it is NaN-filled, so an element a kernel
    forgets to write fails the tests' comparisons instead of passing by luck."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``empty`` with t's shape, dtype, device and (as ``torch.empty_like``) strides."""
    return _poisoned(torch.empty_like(t))


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if _poison else t


def _set_extension_poison(on: bool) -> None:
    try:
        extension = importlib.import_module("t2t_fast._C")
    except ImportError:  # not built: only the Triton kernels allocate through empty()
        return
    extension._set_poison(on)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Testing aid: every kernel output (Triton and C++) is NaN-filled before the kernel writes it."""
    global _poison
    _poison = True
    _set_extension_poison(True)
    try:
        yield
    finally:
        _poison = False
        _set_extension_poison(False)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (host code: ``triton.cdiv`` is a constexpr function in newer Triton, slow to call
    from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def first_exceeded(*limits: tuple[str, int, int]) -> Optional[str]:
    """For (name, value, most) triples, ``"name=value exceeds most"`` for the first value over its limit, else
    None: the reason a backend's ``verify`` gives."""
    for name, value, most in limits:
        if value > most:
            return f"{name}={value} exceeds {most}"
    return None
