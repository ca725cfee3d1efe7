"""The fused Tokens-to-Token module and ``apply_fused``, the drop-in path for existing models.

``FusedT2TModule`` keeps the published submodules (``soft_split0..2``, ``attention1``, ``attention2``,
``project``), so its state_dict keys and weights are the published ones; only the computation changes:
each token layer's ``norm1`` and ``kqv``/``attn.qkv`` projection run inside the fused soft split (the unfolded
tensor never exists), the performer core runs through ``t2t_fast.ops.performer_attention`` and the token
transformer's attention through ``scaled_dot_product_attention`` (no T x T map in memory). Token layers are
recognized by their attribute names, not their classes, so the published classes work as they are.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2t_fast import ops
from t2t_fast.reference import to_pair, tokens_to_image


def _geometry(unfold: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    return (to_pair(unfold.kernel_size, "kernel_size"), to_pair(unfold.stride, "stride"),
            to_pair(unfold.padding, "padding"))


def performer_layer(layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """A token performer applied to ``unfold(image)``: (B, C, H, W) -> (B, L, emb)."""
    kqv = ops.soft_split(image, *_geometry(unfold), layer.kqv.weight, layer.kqv.bias, layer.norm1.weight,
                         layer.norm1.bias, layer.norm1.eps)
    k, q, v = torch.split(kqv, layer.emb, dim=-1)
    y = v + layer.dp(layer.proj(ops.performer_attention(q, k, v, layer.w, layer.epsilon)))
    return y + layer.mlp(layer.norm2(y))


def transformer_layer(layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """A single-head token transformer applied to ``unfold(image)``: (B, C, H, W) -> (B, L, in_dim)."""
    attn = layer.attn
    qkv = ops.soft_split(image, *_geometry(unfold), attn.qkv.weight, attn.qkv.bias, layer.norm1.weight,
                         layer.norm1.bias, layer.norm1.eps)
    q, k, v = (t.unsqueeze(1) for t in torch.split(qkv, attn.in_dim, dim=-1))  # (B, 1, L, in_dim)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                       scale=attn.scale).squeeze(1)
    y = v.squeeze(1) + attn.proj_drop(attn.proj(x))
    return y + layer.drop_path(layer.mlp(layer.norm2(y)))


def token_layer_kind(layer: nn.Module) -> Callable | None:
    """The fused forward for a token layer of the published layout, or None if it is not one."""
    has = lambda m, *names: all(hasattr(m, n) for n in names)  # noqa: E731
    if has(layer, "kqv", "w", "norm1", "norm2", "proj", "mlp", "dp", "emb", "epsilon"):
        return performer_layer
    if has(layer, "attn", "norm1", "norm2", "mlp") and has(layer.attn, "qkv", "proj", "scale", "in_dim") \
            and getattr(layer.attn, "num_heads", 1) == 1:
        return transformer_layer
    return None


def is_t2t_module(module: nn.Module) -> bool:
    """True for a Tokens-to-Token module of the published layout with token layers (not the conv ablation)."""
    if not all(isinstance(getattr(module, n, None), nn.Unfold) for n in ("soft_split0", "soft_split1",
                                                                         "soft_split2")):
        return False
    if not isinstance(getattr(module, "project", None), nn.Linear):
        return False
    return all(isinstance(getattr(module, n, None), nn.Module) and token_layer_kind(getattr(module, n)) is not None
               for n in ("attention1", "attention2"))


class FusedT2TModule(nn.Module):
    """Tokens-to-Token module on the fused ops: (B, C, H, W) -> (B, H*W/256, embed_dim).

    Built around the submodules of a published-layout T2T module (shared, not copied).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not is_t2t_module(module):
            raise ValueError("FusedT2TModule: expected a T2T module with nn.Unfold soft_split0..2, token layers "
                             "attention1/attention2 and a Linear project")
        for name in ("soft_split0", "soft_split1", "soft_split2", "attention1", "attention2", "project"):
            setattr(self, name, getattr(module, name))
        self.num_patches = getattr(module, "num_patches", None)
        self.img_size = getattr(module, "img_size", None)
        self.tokens_type = "performer" if token_layer_kind(module.attention1) is performer_layer else "transformer"
        self.grad_checkpointing = False

    def _layer(self, layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
        fn = token_layer_kind(layer)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, layer, image, unfold, use_reentrant=False)
        return fn(layer, image, unfold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = self._layer(self.attention1, x, self.soft_split0)
        x = self._layer(self.attention2, tokens_to_image(x, (H // 4, W // 4)), self.soft_split1)
        x = tokens_to_image(x, (H // 8, W // 8))
        return ops.soft_split(x, *_geometry(self.soft_split2), self.project.weight, self.project.bias)


def apply_fused(model: nn.Module) -> nn.Module:
    """Swap every published-layout T2T module inside ``model`` for a ``FusedT2TModule``, in place.

    Weights are kept (the same parameter objects), state_dict keys do not change, logits stay the same.
    Modules are recognized by structure and attribute names, so the published T2T-ViT classes work as they
    are. Returns ``model`` (or the fused module when ``model`` itself is a T2T module); raises ValueError when
    it holds no such module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_fused: model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules() if is_t2t_module(m)
               and not isinstance(m, FusedT2TModule)]
    if not targets and not any(isinstance(m, FusedT2TModule) for m in model.modules()):
        raise ValueError("apply_fused: no Tokens-to-Token module (soft_split0..2 as nn.Unfold, attention1/2 token "
                         "layers, Linear project) found in the model")
    for name, m in targets:
        fused = FusedT2TModule(m)
        if name == "":
            return fused
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fused)
    return model
