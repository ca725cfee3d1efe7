"""Backend choice for the fused ops: which implementation runs behind ``t2t_fast.ops``.

Backends:
- ``triton``: the Triton kernels in ``t2t_fast.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is slow and meant for tests).
- ``cuda``: the CUDA kernels of the C++ extension ``t2t_fast._C``.
- ``cpu``: the CPU kernels of the C++ extension.
- ``reference``: the plain PyTorch math of ``t2t_fast.reference`` (always available).
- ``auto`` (default): the fastest available for the tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch

NAMES = ("auto", "triton", "cuda", "cpu", "reference")
# auto's preference for each device type, fastest first
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

# Plain module state rather than a ContextVar: torch.compile reads (and guards on) globals, so a compiled
# model keeps fullgraph=True and recompiles when the backend changes.
_global = "auto"  # set_backend: process-wide
_stack: list[str] = []  # backend(): innermost block last


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, and why not when it cannot."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def triton_interpret() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _extension_error() -> str:
    """Empty when ``t2t_fast._C`` loads (registering the ``torch.ops.t2t_fast`` operators), else why not."""
    try:
        importlib.import_module("t2t_fast._C")
    except ImportError as e:
        return f"the C++ extension t2t_fast._C is not built ({e}); reinstall without T2T_FAST_SKIP_EXT=1"
    return ""


def extension_has_cuda() -> bool:
    """True when the loaded extension registered CUDA kernels."""
    if _extension_error():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("t2t_fast::soft_split_forward", "CUDA")


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
    if name == "cpu":
        err = _extension_error()
        return BackendInfo(not err, err or "C++ extension with CPU kernels loaded")
    if name == "cuda":
        err = _extension_error()
        if err:
            return BackendInfo(False, err)
        if not extension_has_cuda():
            return BackendInfo(False, "the C++ extension was built without CUDA kernels")
        if not torch.cuda.is_available():
            return BackendInfo(False, "no CUDA device")
        return BackendInfo(True, "C++ extension with CUDA kernels loaded")
    raise ValueError(f"backend must be one of {NAMES}, got {name!r}")


_AVAILABILITY: dict[str, BackendInfo] = {}


def backends() -> dict[str, BackendInfo]:
    """Every concrete backend with whether it is available here and why (not)."""
    if not _AVAILABILITY:  # probed once: imports, devices and TRITON_INTERPRET do not change in a process
        _AVAILABILITY.update((name, _info(name)) for name in NAMES[1:])
    return dict(_AVAILABILITY)


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
    if name != "auto":
        info = backends()[name]
        if not info:
            raise RuntimeError(f"backend {name!r} is not available here: {info.reason}")


def resolve(device: torch.device, op: str, supported: tuple[str, ...]) -> str:
    """The concrete backend to run ``op`` on tensors of ``device``.

    ``supported`` lists the backends that implement ``op``. An explicit choice that cannot run on this
    device is an error; ``auto`` takes the first available in ``_AUTO_ORDER`` that ``op`` supports.
    """
    name = get_backend()
    dev = device.type
    if name == "auto":
        for cand in _AUTO_ORDER.get(dev, ("reference",)):
            if cand in supported and _AVAILABILITY[cand]:
                return cand
        return "reference"
    if name not in supported:
        raise RuntimeError(f"{op}: backend {name!r} does not implement this op (it has {supported})")
    if name == "cpu" and dev != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if name == "cuda" and dev != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and triton_interpret()):
        raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return name


backends()  # probe at import, so resolve() is plain dictionary reads (traceable by torch.compile)
