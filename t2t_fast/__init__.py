"""t2t-fast: fused kernels and a drop-in Tokens-to-Token ViT (T2T-ViT) family."""
from t2t_fast.backends import backend, backends, get_backend, set_backend
from t2t_fast.checkpoint import load_checkpoint
from t2t_fast.models import apply_fused, create_model, list_models
from t2t_fast.ops import performer_attention, soft_split

__version__ = "0.1.0"

__all__ = [
    "backend", "backends", "get_backend", "set_backend", "soft_split", "performer_attention", "create_model",
    "list_models", "load_checkpoint", "apply_fused", "__version__",
]
