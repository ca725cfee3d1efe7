"""t2t-fast: fused kernels and a drop-in Tokens-to-Token ViT (T2T-ViT) family."""
from t2t_fast.backends import backend, backends, get_backend, set_backend
from t2t_fast.ops import performer_attention, soft_split

__version__ = "0.1.0"

__all__ = [
    "backend", "backends", "get_backend", "set_backend", "soft_split", "performer_attention", "__version__",
]
