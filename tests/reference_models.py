"""The reference (``t2t_fast.reference``) twin of a registered production model, for the comparison tests."""
import torch.nn as nn

from t2t_fast import models, reference
from t2t_fast.models.registry import _MODELS

_TWINS = {models.T2TViT: reference.T2TViT, models.T2TViTDense: reference.T2TViTDense, models.TNT: reference.TNT}


def reference_model(name: str, **kwargs) -> nn.Module:
    """``t2t_fast.reference``'s model with the configuration of the registered ``name`` (kwargs win)."""
    fn = _MODELS[name]
    return _TWINS[fn.model_cls](**{**fn.model_args, **kwargs})


def models_with_same_weights(name: str, **kwargs) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(reference, production fused, production unfused) models of ``name`` holding the reference's weights,
    in eval mode."""
    ref = reference_model(name, **kwargs).eval()
    fused = models.create_model(name, **kwargs).eval()
    unfused = models.create_model(name, fused=False, **kwargs).eval()
    for m in (fused, unfused):
        m.load_state_dict(ref.state_dict())
    return ref, fused, unfused
