"""Pretrained weights, timm style: a ``pretrained_cfg`` per model and tag, downloads through torch.hub's cache.

``create_model("t2t_vit_14", pretrained=True)`` takes the model's default tag (the first listed),
``create_model("t2t_vit_14.in1k_384", pretrained=True)`` another one. A cfg holds where the weights are
(``url``, or a local ``file`` that wins over it), their ``sha256`` when known, what they expect (``input_size``,
``num_classes``, ``mean``/``std``, ``crop_pct``, ``interpolation``) and the backbone attention scale they need
(``qk_scale``; None: head_dim ** -0.5, with which the published checkpoints were trained and evaluated, see
docs/models.md). ``pretrained_cfg_overlay=dict(file=PATH)`` or ``dict(url="file:///...")`` points a cfg at
another copy of the weights.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import urllib.error
import urllib.parse
from typing import Any, Optional

import torch
import torch.nn as nn

from t2t_fast.models.layers import IMAGENET_MEAN, IMAGENET_STD

RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"


def _cfg(file: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    cfg = {
        "url": RELEASES + file if file else None, "file": None, "sha256": None, "num_classes": 1000,
        "input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD, "classifier": "head", "qk_scale": None,
    }
    cfg.update(kwargs)
    return cfg


# model -> tag -> cfg; the first tag is the model's default. SHA-256 digests of the published files are not
# recorded here (none was published); an overlay can give one.
PRETRAINED_CFGS: dict[str, dict[str, dict[str, Any]]] = {
    "t2t_vit_7": {"in1k": _cfg("71.7_T2T_ViT_7.pth.tar")},
    "t2t_vit_10": {"in1k": _cfg("75.2_T2T_ViT_10.pth.tar")},
    "t2t_vit_12": {"in1k": _cfg("76.5_T2T_ViT_12.pth.tar")},
    "t2t_vit_14": {
        "in1k": _cfg("81.5_T2T_ViT_14.pth.tar"),
        "in1k_384": _cfg("83.3_T2T_ViT_14.pth.tar", input_size=(3, 384, 384)),
        "cifar10": _cfg("cifar10_t2t-vit_14_98.3.pth", num_classes=10),
        "cifar100": _cfg("cirfar100_t2t-vit-14_88.4.pth", num_classes=100),  # sic: the published file name
    },
    "t2t_vit_19": {
        "in1k": _cfg("81.9_T2T_ViT_19.pth.tar"),
        "cifar10": _cfg("cifar10_t2t-vit_19_98.4.pth", num_classes=10),
        "cifar100": _cfg("cifar100_t2t-vit-19_89.0.pth", num_classes=100),
    },
    "t2t_vit_24": {
        "in1k": _cfg("82.3_T2T_ViT_24.pth.tar"),
        # trained with Token Labeling (published as 65M parameters: its file may hold more than this layout)
        "in1k_token_labeling": _cfg("84.2_T2T_ViT_24.pth.tar"),
    },
    "t2t_vit_t_14": {"in1k": _cfg("81.7_T2T_ViTt_14.pth.tar")},
    "t2t_vit_t_19": {"in1k": _cfg("82.4_T2T_ViTt_19.pth.tar")},
    "t2t_vit_t_24": {"in1k": _cfg("82.6_T2T_ViTt_24.pth.tar")},
}


def split_model_name(name: str) -> tuple[str, Optional[str]]:
    """``"t2t_vit_14.in1k_384"`` -> ``("t2t_vit_14", "in1k_384")``; no tag -> ``(name, None)``."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def resolve_pretrained_cfg(arch: str, tag: Optional[str] = None, pretrained_cfg: Optional[dict] = None,
                           overlay: Optional[dict] = None) -> dict[str, Any]:
    """The cfg of ``arch.tag`` (the default tag when None; a url-less default for a model with no published
    weights), or ``pretrained_cfg`` in its place, with ``overlay``'s items on top. Adds ``architecture``
    and ``tag``. ValueError for an unknown tag."""
    tags = PRETRAINED_CFGS.get(arch, {})
    if pretrained_cfg is not None:
        cfg = _cfg(**pretrained_cfg)
    elif tag is None:  # the default tag; a model without published weights keeps its own defaults
        tag, cfg = next(iter(tags.items()), (None, {"url": None, "file": None, "sha256": None, "qk_scale": None}))
    elif tag in tags:
        cfg = tags[tag]
    else:
        known = ", ".join(f"{arch}.{t}" for t in tags) or "none"
        raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; known: {known}")
    cfg = dict(cfg, **(overlay or {}), architecture=arch, tag=tag)
    if cfg.get("file") is not None:
        cfg["file"] = os.fspath(cfg["file"])
    return cfg


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(cfg: dict) -> str:
    name = cfg["architecture"] + (f".{cfg['tag']}" if cfg.get("tag") else "")
    return (f"download it yourself and load it with t2t_fast.load_checkpoint(model, PATH), or pass "
            f"create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")


def download_checkpoint(cfg: dict) -> dict:
    """The checkpoint dict at ``cfg['url']``, through ``torch.hub.load_state_dict_from_url`` (cached under
    ``torch.hub.get_dir()/checkpoints``; ``file://`` URLs work too). With ``cfg['sha256']`` the cached file
    must have that SHA-256 (a mismatching file is deleted, so the next call downloads it again).

    RuntimeError naming the URL when it cannot be fetched, ValueError on a hash mismatch or an unreadable file.
    """
    url = cfg["url"]
    file_name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pth"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    error: Optional[Exception] = None
    try:
        # the published (timm-trained) files carry an argparse Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, file_name=file_name,
                                                      weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise RuntimeError(f"could not download the weights of {cfg['architecture']} from {url}: {e}; "
                           f"{_manual_hint(cfg)}") from e
    except Exception as e:  # noqa: BLE001  (an unreadable file: the hash check below says more, if known)
        error = e
    expected = cfg.get("sha256")
    if expected:
        got = _sha256(cached)
        if got != expected.lower():
            os.remove(cached)
            raise ValueError(f"the file downloaded from {url} has SHA-256 {got}, expected {expected} (corrupted "
                             f"or changed; deleted from the cache, the next call downloads it again); "
                             f"{_manual_hint(cfg)}")
    if error is not None:
        raise ValueError(f"could not read the checkpoint downloaded from {url} (cached at {cached}): {error}; "
                         f"delete that file to download it again, or {_manual_hint(cfg)}") from error
    if not isinstance(ckpt, dict):
        raise ValueError(f"the file downloaded from {url} holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt


def load_pretrained(model: nn.Module, cfg: dict) -> nn.Module:
    """Load the weights ``cfg`` points at (``file`` if given, else ``url``) into ``model`` with
    ``load_checkpoint`` (strict). A classifier of another size than the checkpoint's is kept as built
    (fresh), as timm does when ``num_classes`` differs."""
    from t2t_fast.checkpoint import load_checkpoint, read_checkpoint, unwrap_state_dict

    if cfg.get("file"):
        if not os.path.isfile(cfg["file"]):
            raise ValueError(f"pretrained file {cfg['file']!r} does not exist")
        if cfg.get("sha256") and _sha256(cfg["file"]) != cfg["sha256"].lower():
            raise ValueError(f"pretrained file {cfg['file']!r} does not have the SHA-256 {cfg['sha256']}")
        ckpt = read_checkpoint(cfg["file"])
    elif cfg.get("url"):
        ckpt = download_checkpoint(cfg)
    else:
        raise ValueError(f"no published weights are known for {cfg['architecture']}; "
                         "pass pretrained_cfg_overlay=dict(file=PATH) or dict(url=URL)")
    state = unwrap_state_dict(ckpt)
    own = model.state_dict()
    for key in (f"{cfg.get('classifier') or 'head'}.weight", f"{cfg.get('classifier') or 'head'}.bias"):
        if key in state and key not in own:  # num_classes=0: no classifier
            del state[key]
        elif key in state and state[key].shape != own[key].shape:  # another number of classes: keep the fresh one
            state[key] = own[key]
    return load_checkpoint(model, state)
