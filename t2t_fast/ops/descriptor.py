"""The op descriptor: everything the package knows about one fused op, declared once in ``t2t_fast/ops/<op>.py``.

An op is a pair of operators, ``<prefix>_forward`` and ``<prefix>_backward``, with one schema each. Two operator
libraries implement the pairs:

- ``t2t_fast`` (``EXTENSION``): the C++ extension. ``csrc/ops.cpp`` defines the schemas (the source of truth),
  ``csrc/cpu`` and ``csrc/cuda`` register the CPU and CUDA kernels. Present when ``t2t_fast._C`` is built.
- ``t2t_fast_triton`` (``TRITON``): declared here from the descriptor's copy of the same schemas as
  ``torch.library.custom_op``s whose bodies call ``t2t_fast.kernels.<prefix>.forward`` / ``.backward``.

Both get the descriptor's fake functions and autograd formula, so torch.compile, opcheck and autograd treat
every backend alike. A ``Backend`` says where one implementation runs (device types, dtypes) and, through
``verify``, which calls it takes; ``OpDescriptor.resolve`` picks the backend of a call from that alone.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from t2t_fast.backends import AUTO_ORDER, NAMES, OPS, BackendInfo, available, backends, extension_error, \
    get_backend
from t2t_fast.runtime import triton_interpret

EXTENSION = "t2t_fast"
TRITON = "t2t_fast_triton"
# Triton kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter (tests)
TRITON_DEVICES = ("cuda", "cpu") if triton_interpret() else ("cuda",)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FLOATS_AND_DOUBLE = (torch.float64,) + FLOATS

Verify = Callable[..., Optional[str]]  # the forward operator's arguments -> None, or why the backend cannot


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``devices``: device types of the tensors it takes (None: any); ``dtypes``: dtypes of the op's first input;
    ``library``: the operator library it runs (None: the plain PyTorch reference); ``verify``: its own limits
    (kernel sizes, index widths), called with the forward operator's arguments on every call: pure Python
    on shapes, cheap, traceable by torch.compile(fullgraph=True). None means no limits.
    """

    name: str
    devices: Optional[tuple[str, ...]]
    dtypes: tuple[torch.dtype, ...]
    library: Optional[str] = None
    verify: Optional[Verify] = None

    def why_not(self, args: tuple) -> Optional[str]:
        """None when this backend takes the forward-operator call ``args``, else the reason."""
        x = args[0]
        if self.devices is not None and x.device.type not in self.devices:
            return f"takes tensors on {' or '.join(self.devices)}, got tensors on {x.device}"
        if x.dtype not in self.dtypes:
            return f"takes {_dtype_names(self.dtypes)}, got {x.dtype}"
        return self.verify(*args) if self.verify is not None else None

    def describe(self) -> str:
        where = "any device" if self.devices is None else " or ".join(self.devices) + " tensors"
        limits = "; per-call limits checked by verify" if self.verify is not None else ""
        return f"{where}; {_dtype_names(self.dtypes)}{limits}"


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def kernel_verify(prefix: str) -> Optional[Verify]:
    """``t2t_fast.kernels.<prefix>.verify`` when the triton backend can run here (this imports triton), else
    None: a backend that is not available is never asked."""
    if not available("triton"):
        return None
    return importlib.import_module(f"t2t_fast.kernels.{prefix}").verify


def every_backend(prefix: str, cuda_verify: Verify) -> tuple[Backend, ...]:
    """The backends of an op that every implementation has: the Triton kernels of ``kernels/<prefix>.py``
    (limits: their ``verify``), the extension's CUDA kernels (limits: ``cuda_verify``) and CPU kernels (float64
    too, no limits), and the reference."""
    return (
        Backend("triton", TRITON_DEVICES, FLOATS, TRITON, kernel_verify(prefix)),
        Backend("cuda", ("cuda",), FLOATS, EXTENSION, cuda_verify),
        Backend("cpu", ("cpu",), FLOATS_AND_DOUBLE, EXTENSION),
        Backend("reference", None, FLOATS_AND_DOUBLE),
    )


def _declare_triton(prefix: str, kind: str, schema: str) -> torch.library.CustomOpDef:
    module = f"t2t_fast.kernels.{prefix}"

    def impl(*args):  # imported on first call: triton is only needed when the kernels run
        return getattr(importlib.import_module(module), kind)(*args)

    return torch.library.custom_op(f"{TRITON}::{prefix}_{kind}", impl, mutates_args=(), schema=schema)


def _front_door_function(name: str, forward_op, backward_op, setup_context: Callable,
                         backward: Callable) -> type[torch.autograd.Function]:
    """The front door's autograd path over one operator pair: the registered formula (``setup_context``,
    ``backward``) as an ``autograd.Function``, whose ``forward`` calls the operator with grad mode off.

    Calling the operator with grad on goes through torch.library's generated autograd wrapper, which re-binds
    the arguments to the schema on every call: hundreds of microseconds of host time per forward + backward,
    more than the kernels take at T2T-ViT sizes. Outputs other than the first (statistics) pass no gradient
    on (``set_materialize_grads(False)``: no zero tensors, no extra launches)."""

    def forward(ctx, *args):
        output = forward_op(*args)
        ctx.set_materialize_grads(False)
        setup_context(ctx, args, output)
        return output

    def backward_fn(ctx, grad, *_grad_stats):
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(backward_op, ctx, grad)

    # forward(ctx, ...) rather than a separate setup_context: Function.apply binds the arguments of the latter
    # through inspect.signature on every call
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward_fn)})


class OpDescriptor:
    """One fused op: schemas, fake functions, autograd formula, argument checks and backends.

    name: the front door's name (``t2t_fast.<name>``); prefix: of its operators ``<prefix>_forward`` /
    ``_backward`` and of its kernel file ``t2t_fast.kernels.<prefix>``; schemas: (forward, backward), each
    ``"(args) -> (returns)"`` exactly as in ``csrc/ops.cpp``; fake_forward / fake_backward: the outputs'
    shapes and dtypes (torch.library fake functions); setup_context and backward: the autograd formula, with
    ``backward(backward_op, ctx, *grads)`` getting the backward operator of the backend that ran the forward;
    arguments: the front door's argument checks, mapping its arguments to the forward operator's (raising
    TypeError/ValueError naming the argument); backends: ``Backend`` entries, one per implementation.

    Declaring a descriptor declares its Triton operators, gives both libraries' operators the fake functions
    and autograd, and registers it in ``t2t_fast.backends.OPS``.
    """

    def __init__(self, name: str, prefix: str, schemas: tuple[str, str], fake_forward: Callable,
                 fake_backward: Callable, setup_context: Callable, backward: Callable,
                 arguments: Callable[..., tuple], backends: Sequence[Backend]):
        self.name, self.prefix, self.schemas, self.arguments = name, prefix, schemas, arguments
        self.backends = {b.name: b for b in backends}
        self.operators = {TRITON: tuple(_declare_triton(prefix, kind, schema)
                                        for kind, schema in zip(("forward", "backward"), schemas))}
        if not extension_error():
            ns = getattr(torch.ops, EXTENSION)
            self.operators[EXTENSION] = (getattr(ns, f"{prefix}_forward").default,
                                         getattr(ns, f"{prefix}_backward").default)
        self.functions = {}
        for library, (forward_op, backward_op) in self.operators.items():
            torch.library.register_fake(forward_op, fake_forward)
            torch.library.register_fake(backward_op, fake_backward)
            torch.library.register_autograd(forward_op, functools.partial(backward, backward_op),
                                            setup_context=setup_context)
            self.functions[library] = _front_door_function(f"{library}_{prefix}", forward_op, backward_op,
                                                           setup_context, backward)
        OPS[name] = self

    def _missing(self, name: str) -> Optional[str]:
        """Why backend ``name`` cannot run this op at all here, or None."""
        if name not in self.backends:
            return f"{self.name} has no {name!r} backend"
        return None if available(name) else backends()[name].reason

    def why_not(self, name: str, args: tuple) -> Optional[str]:
        """None when backend ``name`` is available here and takes the forward-operator call ``args``."""
        missing = self._missing(name)
        return missing if missing is not None else self.backends[name].why_not(args)

    def resolve(self, *args: Any) -> str:
        """The backend that runs the forward-operator call ``args``: the selected one, or for ``auto`` the first
        of ``AUTO_ORDER`` for the tensors' device that takes it. An explicit choice that cannot take the call
        is a ValueError with the reason."""
        name = get_backend()
        if name == "auto":
            return self._auto(args)
        reason = self.why_not(name, args)
        if reason is not None:
            raise ValueError(f"{self.name}: backend {name!r} cannot run this call: {reason}")
        return name

    def _auto(self, args: tuple) -> str:
        order = AUTO_ORDER.get(args[0].device.type, ("reference",))
        for name in order:
            if self.why_not(name, args) is None:
                return name
        raise ValueError(f"{self.name}: no backend takes this call: "
                         + "; ".join(f"{n}: {self.why_not(n, args)}" for n in order))

    def apply(self, name: str, *args: Any) -> tuple[torch.Tensor, ...]:
        """The forward operator of backend ``name`` (not the reference) on ``args``, differentiable: what the
        front door runs."""
        return self.functions[self.backends[name].library].apply(*args)

    def describe(self) -> dict[str, BackendInfo]:
        """Per concrete backend: whether it implements this op and runs here, where and in which dtypes."""
        out = {}
        for name in NAMES[1:]:
            missing = self._missing(name)
            out[name] = BackendInfo(missing is None, missing or self.backends[name].describe())
        return out

    def explain(self, *args: Any, **kwargs: Any) -> dict[str, BackendInfo]:
        """Per concrete backend: whether it takes this front-door call, and why not; ``auto``: its choice."""
        call = self.arguments(*args, **kwargs)
        out = {}
        for name in NAMES[1:]:
            reason = self.why_not(name, call)
            out[name] = BackendInfo(reason is None, reason or "takes this call")
        out["auto"] = BackendInfo(True, f"auto picks {self._auto(call)!r}")
        return out
