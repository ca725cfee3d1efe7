"""The fused ops: one file per op, each declaring its descriptor and its front door.

- ``descriptor.py``: ``OpDescriptor`` and ``Backend``, the op declaration every backend shares (schemas, fake
  functions, autograd formula, argument checks) and the backend choice of each call (``resolve``).
- ``checks.py``: the argument checks the front doors share.
- ``soft_split.py``, ``performer.py``: the ops (``SOFT_SPLIT``, ``PERFORMER``) and their front doors.

The math lives once per backend: ``t2t_fast.reference`` (plain PyTorch), ``t2t_fast.kernels`` (Triton) and
``csrc/`` (the C++ extension's CPU and CUDA kernels). ``docs/ops.md`` holds the math and the contracts;
``docs/adding-an-op.md`` the files a new op touches.
"""
from t2t_fast.backends import OPS
from t2t_fast.ops.performer import PERFORMER, performer_attention
from t2t_fast.ops.soft_split import SOFT_SPLIT, soft_split

__all__ = ["soft_split", "performer_attention", "SOFT_SPLIT", "PERFORMER", "OPS"]
