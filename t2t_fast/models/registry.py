"""Model registry: ``create_model(name, ...)`` and ``list_models()``, with optional timm registration."""
from __future__ import annotations

import fnmatch
import os
import sys
from typing import Callable, Optional, Sequence, Union

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name (also with timm, if imported)."""
    _MODELS[fn.__name__] = fn
    if "timm" in sys.modules:
        register_timm([fn.__name__])
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching a glob pattern."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: Union[bool, str, os.PathLike, dict] = False,
                 pretrained_cfg: Optional[dict] = None, pretrained_cfg_overlay: Optional[dict] = None,
                 features_only: bool = False, out_indices: Optional[Union[int, Sequence[int]]] = None,
                 **kwargs) -> nn.Module:
    """Build a registered model, timm style.

    ``name``: a registered name, optionally with a pretrained tag (``"t2t_vit_14.in1k_384"``). The model's
    ``pretrained_cfg`` (``t2t_fast.models.pretrained``; ``pretrained_cfg`` replaces it,
    ``pretrained_cfg_overlay`` updates it) gives the defaults of ``num_classes``, ``img_size`` and
    ``qk_scale``; kwargs win (img_size, num_classes, in_chans, drop_path_rate, fused, ...).
    ``pretrained``: True loads the cfg's weights (its ``file``, else its ``url`` through torch.hub's cache);
    a checkpoint path or dict is loaded with ``load_checkpoint`` as it is.
    ``features_only``: a ``FeatureNet`` returning the feature maps at ``out_indices`` of the model's
    ``feature_info`` (None: the model's default, for T2T-ViT one map per stride 4, 8, 16), with
    ``feature_info`` (channels, reduction, module).
    """
    from t2t_fast.models.pretrained import load_pretrained, resolve_pretrained_cfg, split_model_name

    arch, tag = split_model_name(name)
    if arch not in _MODELS:
        raise ValueError(f"unknown model {arch!r}; available: {', '.join(list_models())}")
    cfg = resolve_pretrained_cfg(arch, tag, pretrained_cfg, pretrained_cfg_overlay)
    if "num_classes" in cfg:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    if "input_size" in cfg:
        kwargs.setdefault("img_size", tuple(cfg["input_size"][-2:]))
    if cfg.get("qk_scale") is not None:
        kwargs.setdefault("qk_scale", cfg["qk_scale"])
    model = _MODELS[arch](**kwargs)
    model.pretrained_cfg = model.default_cfg = {
        **getattr(model, "pretrained_cfg", {}), **cfg, "num_classes": model.num_classes,
        "input_size": (getattr(model, "in_chans", 3), *model.img_size)}
    if pretrained is True:
        load_pretrained(model, cfg)
    elif pretrained not in (None, False):
        from t2t_fast.checkpoint import load_checkpoint

        load_checkpoint(model, pretrained)
    if features_only:
        from t2t_fast.models.features import FeatureNet

        return FeatureNet(model, out_indices)
    return model


def register_timm(names: Optional[list[str]] = None) -> None:
    """Register our models with timm's ``create_model`` (imports timm; timm is optional)."""
    try:
        from timm.models import is_model, register_model as timm_register
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "timm":
            raise  # timm is there but one of its own imports failed
        raise ModuleNotFoundError("register_timm() needs timm, which is not installed: pip install timm",
                                  name="timm") from e

    for name in names or list_models():
        fn = _MODELS[name]
        if getattr(fn, "timm_name", None) is False or is_model(name):
            continue  # timm has its own model of that name (TNT)

        def build(pretrained: bool = False, _fn=fn, **kwargs):
            return _fn(**kwargs)

        build.__name__ = build.__qualname__ = name
        build.__module__ = fn.__module__
        timm_register(build)
