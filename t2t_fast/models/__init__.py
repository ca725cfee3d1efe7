"""Model zoo: the T2T-ViT variants (``t2t_vit``) and TNT (``tnt``) on the fused ops, a registry, ``apply_fused``."""
from t2t_fast.models.fused import FusedT2TModule, apply_fused
from t2t_fast.models.registry import create_model, list_models, register_model, register_timm
from t2t_fast.models.t2t_vit import T2TViT, T2TViTDense
from t2t_fast.models.tnt import TNT

__all__ = ["T2TViT", "T2TViTDense", "TNT", "FusedT2TModule", "apply_fused", "create_model", "list_models",
           "register_model", "register_timm"]
