"""Model registry: ``create_model(name, ...)`` and ``list_models()``, with optional timm registration."""
from __future__ import annotations

import fnmatch
import os
import sys
from typing import Callable, Optional, Union

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


def create_model(name: str, pretrained: Union[None, str, os.PathLike, dict] = None, **kwargs) -> nn.Module:
    """Build a registered model; ``pretrained``: a checkpoint path or dict to load with ``load_checkpoint``.

    kwargs go to the model class (img_size, num_classes, in_chans, drop_path_rate, fused, ...).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if pretrained is True:
        raise ValueError("pretrained=True needs a download, which t2t-fast does not do: pass the path of a "
                         "checkpoint (e.g. pretrained='81.5_T2T_ViT_14.pth.tar')")
    model = _MODELS[name](**kwargs)
    if pretrained not in (None, False):
        from t2t_fast.checkpoint import load_checkpoint

        load_checkpoint(model, pretrained)
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
