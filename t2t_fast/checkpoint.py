"""Loading published (and our own) checkpoints into t2t-fast models."""
from __future__ import annotations

import argparse
import os
from typing import Union

import torch
import torch.nn as nn

_WRAPPERS = ("state_dict", "model", "module")


def read_checkpoint(src: Union[str, os.PathLike, dict]) -> dict:
    """The checkpoint dict at a path (loaded on CPU with ``weights_only=True``; the argparse Namespace that
    timm-trained checkpoints carry is allowed), or ``src`` itself when it already is a dict."""
    if isinstance(src, dict):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(src).__name__}")
    if not os.path.isfile(src):
        raise ValueError(f"checkpoint: no file at {os.fspath(src)!r}")
    # timm-trained checkpoints (the published ones) carry their argparse Namespace beside the weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {os.fspath(src)!r} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def unwrap_state_dict(ckpt: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: under ``state_dict_ema`` (if ``use_ema``), ``state_dict``,
    ``model`` or ``module``, or the dict itself; a ``module.`` (DataParallel/DDP) prefix is removed."""
    keys = (("state_dict_ema", "model_ema") if use_ema else ()) + _WRAPPERS
    for key in keys:
        if isinstance(ckpt.get(key), dict) and ckpt[key]:
            ckpt = ckpt[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError("checkpoint: found no state_dict (tried state_dict_ema, state_dict, model, module and the "
                         f"top level; top-level keys: {sorted(ckpt)[:10]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}


def load_checkpoint(model: nn.Module, path_or_dict: Union[str, os.PathLike, dict], use_ema: bool = True,
                    strict: bool = True) -> nn.Module:
    """Load weights into ``model`` from a checkpoint path or dict (any wrapper format, see
    ``unwrap_state_dict``). The model's ``checkpoint_filter`` adapts it first (e.g. resizes ``pos_embed``
    for another img_size). With ``strict``, missing, unexpected or mis-shaped keys raise a ValueError that
    names them; without, they are skipped. Returns ``model``."""
    sd = unwrap_state_dict(read_checkpoint(path_or_dict), use_ema)
    if hasattr(model, "checkpoint_filter"):
        sd = model.checkpoint_filter(sd)
    own = model.state_dict()
    shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected or shapes):
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if shapes:
            parts.append("shape mismatches (checkpoint vs model): "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(shapes.items())))
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in sd.items() if k not in shapes}, strict=False)
    return model
