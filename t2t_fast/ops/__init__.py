"""Front doors of the fused ops: argument checks, autocast, backend choice, autograd.

``soft_split`` and ``performer_attention`` run on the backend chosen by ``t2t_fast.set_backend`` /
``t2t_fast.backend`` (``auto`` by default). Their math lives once per backend: ``t2t_fast.reference``,
``t2t_fast.kernels`` (Triton) and ``csrc/`` (the C++ extension's CPU and CUDA kernels).
"""
from t2t_fast.ops.performer import performer_attention
from t2t_fast.ops.soft_split import soft_split

__all__ = ["soft_split", "performer_attention"]
