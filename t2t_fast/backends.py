"""Backend choice for the fused ops: which implementation runs behind ``t2t_fast.ops``.

Backends:
- ``triton``: the Triton kernels in ``t2t_fast.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is slow and meant for tests, so ``auto`` never picks it for CPU tensors).
- ``cuda``: the CUDA kernels of the C++ extension ``t2t_fast._C``.
- ``cpu``: the CPU kernels of the C++ extension.
- ``reference``: the plain PyTorch math of ``t2t_fast.reference`` (always available).
- ``auto`` (default): per call, the first backend in ``AUTO_ORDER`` for the tensors' device that is available
  here and takes the call (device, dtype and the backend's own limits, see ``t2t_fast/ops/descriptor.py``).

This module holds the selection (``set_backend``, ``backend``, ``get_backend``) and what runs in this process
(``backends``); each op's descriptor (``t2t_fast/ops/<op>.py``) declares which backends implement it and
registers itself in ``OPS``. ``docs/ops.md`` describes the whole dispatch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from t2t_fast.runtime import triton_interpret

if TYPE_CHECKING:
    from t2t_fast.ops.descriptor import OpDescriptor

NAMES = ("auto", "triton", "cuda", "cpu", "reference")
# auto's preference for each device type, fastest first; other device types get the reference
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
OPS: dict[str, OpDescriptor] = {}  # op name -> descriptor; filled as t2t_fast.ops declares each op

# Plain module state rather than a ContextVar: torch.compile reads (and guards on) globals, so a compiled
# model keeps fullgraph=True and recompiles when the backend changes.
_global = "auto"  # set_backend: process-wide
_stack: list[str] = []  # backend(): innermost block last


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here (or take an op, or a call), and why not when it cannot."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


@functools.lru_cache(maxsize=None)
def extension_error() -> str:
    """Empty when ``t2t_fast._C`` loads (registering the ``torch.ops.t2t_fast`` operators), else why not."""
    try:
        importlib.import_module("t2t_fast._C")
    except ImportError as e:
        return f"the C++ extension t2t_fast._C is not built ({e}); reinstall without T2T_FAST_SKIP_EXT=1"
    return ""


def _info(name: str) -> BackendInfo:
    if name == "reference":
        return BackendInfo(True, "plain PyTorch, always available")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendInfo(False, "triton is not installed")
        if torch.cuda.is_available():
            return BackendInfo(True, "triton and a CUDA device found")
        if triton_interpret():
            return BackendInfo(True, "TRITON_INTERPRET=1: Triton's CPU interpreter (slow, for tests)")
        return BackendInfo(False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton's CPU interpreter)")
    err = extension_error()
    if err:
        return BackendInfo(False, err)
    if name == "cpu":
        return BackendInfo(True, "C++ extension with CPU kernels loaded")
    if not importlib.import_module("t2t_fast._C").with_cuda:
        return BackendInfo(False, "the C++ extension was built without CUDA kernels")
    if not torch.cuda.is_available():
        return BackendInfo(False, "no CUDA device")
    return BackendInfo(True, "C++ extension with CUDA kernels loaded")


# probed once at import: imports, devices and TRITON_INTERPRET do not change in a process, and resolving a
# backend per call is then plain dictionary reads (traceable by torch.compile)
_AVAILABILITY: dict[str, BackendInfo] = {name: _info(name) for name in NAMES[1:]}


def available(name: str) -> bool:
    """Whether the concrete backend ``name`` can run in this process."""
    return _AVAILABILITY[name].available


def backends(op: Optional[str] = None, *args: Any, **kwargs: Any) -> dict[str, BackendInfo]:
    """Every concrete backend with whether it can run, and why (not).

    - ``backends()``: in this process (extension built, triton installed, a GPU present).
    - ``backends("soft_split")``: for one op (``t2t_fast.ops.OPS`` lists them): which backends implement it,
      and on which devices and dtypes.
    - ``backends("soft_split", x, 7, 4, 2, weight, ...)``: for one call, given as the op's front-door
      arguments (checked as the front door does): which backends take it and why the others do not (a
      device, a dtype, or a limit of the backend's kernels); the extra key ``auto`` names auto's choice.
    """
    if op is None:
        return dict(_AVAILABILITY)
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    return OPS[op].explain(*args, **kwargs) if args or kwargs else OPS[op].describe()


def set_backend(name: str) -> None:
    """Select the backend of every fused op from now on, process-wide (a ``backend()`` block overrides it)."""
    global _global
    _validate(name)
    _global = name


def get_backend() -> str:
    """The selected backend name (possibly ``auto``)."""
    return _stack[-1] if _stack else _global


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: ``with t2t_fast.backend('reference'): ...`` selects a backend inside the block."""
    _validate(name)
    _stack.append(name)
    try:
        yield
    finally:
        _stack.pop()


def _validate(name: str) -> None:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name != "auto" and not available(name):
        raise RuntimeError(f"backend {name!r} is not available here: {_AVAILABILITY[name].reason}")
