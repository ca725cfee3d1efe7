"""The Tokens-to-Token forward, fused or not, for our T2T module and for any module of the published layout.

A T2T module of the published layout has ``soft_split0..2`` (``nn.Unfold``), two token layers
``attention1``/``attention2`` and a Linear ``project``. ``TokensToToken`` runs one:

- fused: each token layer's ``norm1`` and ``kqv``/``attn.qkv`` projection run inside ``ops.soft_split`` (the
  unfolded tensor never exists, forward or backward), the performer core through
  ``ops.performer_attention``, the token transformer's attention through ``scaled_dot_product_attention``
  (no T x T map), and ``project`` is one more soft split;
- not fused: ``nn.Unfold`` and the layers as the published code runs them.

Token layers are recognized by their attribute names, not their classes, so ``apply_fused`` works on models
built from the published classes: same parameter objects, same state_dict keys, same logits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from t2t_fast import ops
from t2t_fast.models.layers import attention
from t2t_fast.utils import to_pair, tokens_to_image

LayerFn = Callable[[nn.Module, torch.Tensor, nn.Module], torch.Tensor]


def _geometry(unfold: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    return (to_pair(unfold.kernel_size, "kernel_size"), to_pair(unfold.stride, "stride"),
            to_pair(unfold.padding, "padding"))


def performer_tail(layer: nn.Module, kqv: torch.Tensor, core: Callable[..., torch.Tensor]) -> torch.Tensor:
    """A token performer after its packed projection: (B, T, 3*emb) -> (B, T, emb).

    Split k, q, v (that order); y = v + dp(proj(core(q, k, v, w, epsilon))); y + mlp(norm2(y)).
    """
    k, q, v = torch.split(kqv, layer.emb, dim=-1)
    y = v + layer.dp(layer.proj(core(q, k, v, layer.w, layer.epsilon)))
    return y + layer.mlp(layer.norm2(y))


def transformer_tail(layer: nn.Module, qkv: torch.Tensor, fused: bool) -> torch.Tensor:
    """A single-head token transformer after its packed projection: (B, T, 3*in_dim) -> (B, T, in_dim).

    y = v + proj(attention(q, k, v)) with the layer's own scale (dim_in ** -0.5 in the published layers);
    y + drop_path(mlp(norm2(y))).
    """
    attn = layer.attn
    q, k, v = (t.unsqueeze(1) for t in torch.split(qkv, attn.in_dim, dim=-1))  # (B, 1, T, in_dim)
    x = attention(q, k, v, attn.scale, attn.attn_drop.p if attn.training else 0.0, fused).squeeze(1)
    y = v.squeeze(1) + attn.proj_drop(attn.proj(x))
    return y + layer.drop_path(layer.mlp(layer.norm2(y)))


def _soft_split_with_norm(image: torch.Tensor, unfold: nn.Module, norm: nn.LayerNorm,
                          linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(unfold(image)^T))`` as one fused op: (B, C, H, W) -> (B, L, out)."""
    return ops.soft_split(image, *_geometry(unfold), linear.weight, linear.bias, norm.weight, norm.bias, norm.eps)


def performer_layer(layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """A token performer applied to ``unfold(image)`` on the fused ops: (B, C, H, W) -> (B, L, emb)."""
    return performer_tail(layer, _soft_split_with_norm(image, unfold, layer.norm1, layer.kqv),
                          ops.performer_attention)


def transformer_layer(layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """A single-head token transformer applied to ``unfold(image)`` on the fused ops: (B, C, H, W) ->
    (B, L, in_dim)."""
    return transformer_tail(layer, _soft_split_with_norm(image, unfold, layer.norm1, layer.attn.qkv), fused=True)


def project_layer(linear: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """``linear(unfold(image)^T)`` as one soft split: (B, C, H, W) -> (B, L, out)."""
    return ops.soft_split(image, *_geometry(unfold), linear.weight, linear.bias)


def unfolded_layer(layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
    """``layer(unfold(image)^T)``, the published computation: (B, C, H, W) -> (B, L, out)."""
    return layer(unfold(image).transpose(1, 2))


def token_layer_kind(layer: nn.Module) -> Optional[LayerFn]:
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


class TokensToToken(nn.Module):
    """The forward of a published-layout T2T module (stride 16 in total), fused or not.

    Subclasses set ``soft_split0..2``, ``attention1``, ``attention2``, ``project``, ``fused``,
    ``grad_checkpointing`` (recompute each token layer in the backward), ``img_size``, ``num_patches``.
    """

    fused: bool = True
    grad_checkpointing: bool = False

    def token_layer(self, layer: nn.Module, image: torch.Tensor, unfold: nn.Module) -> torch.Tensor:
        """``layer`` applied to the soft split ``unfold`` of ``image``: (B, C, H, W) -> (B, L, out)."""
        fn = token_layer_kind(layer) if self.fused else unfolded_layer
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, layer, image, unfold, use_reentrant=False)
        return fn(layer, image, unfold)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> the tokens after each stage: (B, H/4 * W/4, c1), (B, H/8 * W/8, c2), (B, H/16 * W/16,
        embed_dim) (c1, c2: the token layers' widths, row-major positions)."""
        H, W = x.shape[-2:]
        t1 = self.token_layer(self.attention1, x, self.soft_split0)
        t2 = self.token_layer(self.attention2, tokens_to_image(t1, (H // 4, W // 4)), self.soft_split1)
        project = project_layer if self.fused else unfolded_layer
        return [t1, t2, project(self.project, tokens_to_image(t2, (H // 8, W // 8)), self.soft_split2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W/256, embed_dim)."""
        return self.forward_stages(x)[-1]


class FusedT2TModule(TokensToToken):
    """A published-layout T2T module's submodules (shared, not copied) run on the fused ops:
    (B, C, H, W) -> (B, H*W/256, embed_dim)."""

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
        self.fused = True
        self.grad_checkpointing = False


def apply_fused(model: nn.Module) -> nn.Module:
    """Run every published-layout T2T module inside ``model`` on the fused ops, in place.

    A foreign module (e.g. from the published T2T-ViT classes, recognized by structure and attribute names) is
    replaced by a ``FusedT2TModule`` around its submodules; a t2t-fast ``TokensToToken`` gets ``fused = True``.
    Weights are kept (the same parameter objects), state_dict keys do not change, logits stay the same.
    Returns ``model`` (or the fused module when ``model`` itself is a foreign T2T module); raises ValueError
    when it holds no such module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_fused: model must be an nn.Module, got {type(model).__name__}")
    ours = [m for m in model.modules() if isinstance(m, TokensToToken)]
    targets = [(name, m) for name, m in model.named_modules() if is_t2t_module(m) and not isinstance(m, TokensToToken)]
    if not targets and not ours:
        raise ValueError("apply_fused: no Tokens-to-Token module (soft_split0..2 as nn.Unfold, attention1/2 token "
                         "layers, Linear project) found in the model")
    for m in ours:
        m.fused = True
    for name, m in targets:
        fused = FusedT2TModule(m)
        if name == "":
            return fused
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fused)
    return model
