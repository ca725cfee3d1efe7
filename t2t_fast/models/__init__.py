"""Model zoo: T2T-ViT variants (``t2t_vit``) on the fused ops, a registry, and the fused T2T module."""
from t2t_fast.models.fused import FusedT2TModule, apply_fused
from t2t_fast.models.registry import create_model, list_models, register_model, register_timm
from t2t_fast.models.t2t_vit import T2TViT
from t2t_fast.models import tnt  # noqa: F401  (registers tnt_s/tnt_b_patch16_224)

__all__ = ["T2TViT", "FusedT2TModule", "apply_fused", "create_model", "list_models", "register_model",
           "register_timm"]
