"""torch.library plumbing shared by every fused op: operator declaration, fake functions, autograd.

Each op has a forward and a backward operator per implementation: the C++ extension registers
``t2t_fast::<op>_forward/_backward`` (CPU and CUDA kernels); the Triton kernels are declared here as
``t2t_fast_triton::<op>_forward/_backward`` custom ops whose bodies call ``t2t_fast.kernels.<op>.forward`` and
``.backward`` (imported on first call, so triton is only needed when they run). Both get the same fake
functions and the same autograd formula, so ``torch.compile``, ``opcheck`` and autograd treat them alike.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Callable, Iterator

import torch

from t2t_fast.backends import _extension_error


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """True when ``t2t_fast._C`` is built and its operators are registered."""
    return not _extension_error()


def triton_pair(op: str, schemas: tuple[str, str]) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Declare ``t2t_fast_triton::<op>_forward`` and ``_backward`` with the given schemas."""
    module = f"t2t_fast.kernels.{op}"

    def declare(kind: str, schema: str) -> torch.library.CustomOpDef:
        def impl(*args):
            return getattr(importlib.import_module(module), kind)(*args)

        return torch.library.custom_op(f"t2t_fast_triton::{op}_{kind}", impl, mutates_args=(), schema=schema)

    return declare("forward", schemas[0]), declare("backward", schemas[1])


def register_pair(forward_op, backward_op, fake_forward: Callable, fake_backward: Callable,
                  setup_context: Callable, backward: Callable) -> None:
    """Give a forward/backward operator pair its fake functions and its autograd formula."""
    torch.library.register_fake(forward_op, fake_forward)
    torch.library.register_fake(backward_op, fake_backward)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def forward_op(op: str, backend: str):
    """The forward operator of ``op`` for a concrete backend ('triton', 'cpu' or 'cuda')."""
    ns = torch.ops.t2t_fast_triton if backend == "triton" else torch.ops.t2t_fast
    return getattr(ns, f"{op}_forward").default


_poison = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output. Under ``poisoned_outputs()`` it is NaN-filled, so an element a kernel
    forgets to write fails the tests' comparisons instead of passing by luck."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _poison else t


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Testing aid: every kernel output (Triton and C++) is NaN-filled before the kernel writes it."""
    global _poison
    set_cpp = getattr(importlib.import_module("t2t_fast._C"), "_set_poison", None) if extension_loaded() else None
    _poison = True
    if set_cpp:
        set_cpp(True)
    try:
        yield
    finally:
        _poison = False
        if set_cpp:
            set_cpp(False)
