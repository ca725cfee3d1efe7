"""Layers and the timm-style model API shared by the production models (T2T-ViT, its ablations, TNT).

Every layer takes a ``fused`` switch, as timm's attention layers take ``fused_attn``: ``True`` runs the
attention through ``scaled_dot_product_attention`` (no (N, N) map in memory), ``False`` writes the map out
as the published code does. The state_dict keys are the published ones (docs/models.md). These classes
are independent of ``t2t_fast.reference``, which the tests compare them against.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast.models.features import Indices, feature_take_indices
from t2t_fast.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def init_weights(m: nn.Module) -> None:
    """The published initialization: Linear weights trunc-normal std 0.02 and zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
              fused: bool) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v over q, k, v of shape (..., N, d) -> (..., N, d)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(F.dropout(weights, dropout_p) if dropout_p else weights, v)


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability
    ``drop_prob`` and the kept ones are scaled by 1 / (1 - drop_prob). Any shape (B, ...)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Mlp(nn.Module):
    """``fc2(drop(gelu(fc1(x))))`` then dropout: (..., in) -> (..., out or in)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class SELayer(nn.Module):
    """Squeeze-excitation over the token axis (the ``t2t_vit_14_se`` ablation): x * gate(mean over tokens).

    (B, N, C) -> (B, N, C); ``fc`` = Linear(C, C/r), ReLU, Linear(C/r, C), Sigmoid (keys ``fc.0``, ``fc.2``).
    """

    def __init__(self, channel: int, reduction: int = 16):
        super().__init__()
        squeezed = channel // reduction
        self.fc = nn.Sequential(nn.Linear(channel, squeezed, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(squeezed, channel, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=1, keepdim=True))  # (B, 1, C)
        return x * gate


class Attention(nn.Module):
    """Multi-head self-attention, (B, N, dim) -> (B, N, dim); scale head_dim ** -0.5 unless ``qk_scale``.

    ``qkv`` = Linear(dim, 3*dim) holds q, k, v in that order; subclasses with other projections override
    ``_make_projections`` and ``heads``. ``se`` adds the squeeze-excitation gate after ``proj``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, se: bool = False, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused = fused
        self._make_projections(dim, qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.se_layer = SELayer(dim) if se else None

    def _make_projections(self, dim: int, bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads*head_dim) -> (B, heads, N, head_dim), a view."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v, each (B, heads, N, head_dim)."""
        return tuple(self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = attention(*self.heads(x), self.scale, self.attn_drop.p if self.training else 0.0, self.fused)
        y = self.proj(y.transpose(1, 2).flatten(2))
        if self.se_layer is not None:
            y = self.se_layer(y)
        return self.proj_drop(y)


class Block(nn.Module):
    """Pre-norm transformer block, (B, N, dim) -> (B, N, dim): x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``attn_layer`` / ``mlp_layer`` build the two branches (the ghost ablation swaps both).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 se: bool = False, fused: bool = True, attn_layer: Callable[..., nn.Module] = Attention,
                 mlp_layer: Callable[..., nn.Module] = Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                               proj_drop=drop, se=se, fused=fused)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def check_image(x: torch.Tensor, in_chans: int, img_size: tuple[int, int], param: torch.Tensor) -> None:
    """ValueError (TypeError for a non-tensor) naming what is wrong with an input image batch for a model."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x has {x.shape[1]} channels, the model expects in_chans={in_chans}")
    if tuple(x.shape[-2:]) != img_size:
        raise ValueError(f"x is {x.shape[-2]}x{x.shape[-1]}, the model was built for img_size={img_size}; "
                         "create the model with that img_size (load_checkpoint resizes the position table)")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the model is on {param.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"x dtype {x.dtype} differs from the model's {param.dtype} "
                         "(cast one of them, or run under torch.autocast)")


class TimmModelMixin:
    """timm's classifier API for a model with ``blocks``, ``norm``, ``head``, ``num_features``, a class token
    first in its token sequence, and a ``grad_checkpointing`` flag.

    The model's ``forward_features`` returns (B, N+1, D) normalized tokens; ``forward_head`` takes the class
    token. ``no_weight_decay_keys`` lists the parameters kept out of weight decay, ``group_matcher_stem``
    matches the parameters before the blocks. For the backbone API the model also has ``feature_info``
    (see ``t2t_fast.models.features``), ``in_chans``, ``img_size`` and ``forward_stem``.
    """

    no_weight_decay_keys: tuple[str, ...] = ("cls_token",)
    group_matcher_stem: str = r"^cls_token"
    grad_checkpointing: bool = False

    def no_weight_decay(self) -> set[str]:
        return set(self.no_weight_decay_keys)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh (trunc-normal) Linear for ``num_classes`` (0: identity)."""
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.apply(init_weights)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N+1, D) tokens -> (B, D) class-token features if ``pre_logits``, else (B, num_classes) logits."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise learning-rate decay: the ``stem`` (everything before the
        blocks), one group per block, the final norm last (the head is left to the caller, as in timm)."""
        return {"stem": self.group_matcher_stem,
                "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,))]}

    def forward_stem(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """(B, C, H, W) -> the stem's feature tokens (each (B, L, C), no class token) and the blocks' input."""
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, indices: Indices = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False) -> Any:
        """timm's backbone forward: the features at ``indices`` of ``feature_info`` (None: all, n: the last n,
        or a list), each (B, C, H/r, W/r) for ``output_fmt='NCHW'`` or (B, L, C) for 'NLC' (block outputs
        without the class token; with ``return_prefix_tokens`` each is a (features, class token or None)
        pair). ``norm`` applies the final norm to block outputs of the final width. ``stop_early`` skips the
        blocks after the last index. Returns the list if ``intermediates_only``, else (final normalized
        tokens (B, N+1, D), the list)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        check_image(x, self.in_chans, self.img_size, self.cls_token)
        H, W = x.shape[-2:]
        stem, state = self.forward_stem(x)
        found = {i: (t, None) for i, t in enumerate(stem) if i in take}
        blocks = self.blocks
        if stop_early or intermediates_only:
            blocks = blocks[:max(0, max_index + 1 - len(stem))]
        for j, block in enumerate(blocks):
            out = self.run_block(block, *state)
            state = out if isinstance(out, tuple) else (out,)
            if j + len(stem) in take:
                tokens = state[-1]
                if norm and tokens.shape[-1] == self.num_features:
                    tokens = self.norm(tokens)
                found[j + len(stem)] = (tokens[:, 1:], tokens[:, :1])
        features = []
        for i in take:
            tokens, prefix = found[i]
            if output_fmt == "NCHW":
                r = self.feature_info[i]["reduction"]
                tokens = tokens.unflatten(1, (H // r, W // r)).permute(0, 3, 1, 2).contiguous()
            features.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return features
        return self.norm(state[-1]), features

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the classifier); returns the
        indices, for ``forward_intermediates``."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        num_stem = len(self.feature_info) - len(self.blocks)
        self.blocks = self.blocks[:max(0, max_index + 1 - num_stem)]
        self.feature_info = self.feature_info[:num_stem + len(self.blocks)]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def run_block(self, block: nn.Module, *xs: torch.Tensor) -> Any:
        """``block(*xs)``, recomputed in the backward when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *xs, use_reentrant=False)
        return block(*xs)


def layer_decay_lr_scale(model: nn.Module, decay: float,
                         base: Optional[Callable[[str], float]] = None) -> Callable[[str], float]:
    """Layer-wise learning-rate decay from ``model.group_matcher()``: parameter name -> multiplier
    ``decay ** (L - layer)`` (times ``base(name)`` if given), with layer 0 the stem, i + 1 block i, and
    L = len(blocks) + 1 the final norm and the head (multiplier 1)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    groups = model.group_matcher(coarse=True)
    stem, block = re.compile(groups["stem"]), re.compile(groups["blocks"])
    top = len(model.blocks) + 1

    def scale(name: str) -> float:
        found = block.match(name)
        layer = 0 if stem.match(name) else int(found.group(1)) + 1 if found else top
        return decay ** (top - layer) * (base(name) if base else 1.0)

    return scale


def register_variants(cls: type, table: dict[str, tuple[str, dict]], **attrs: Any) -> None:
    """Register one ``create_model`` constructor per row of ``table`` (name -> (docstring, config)).

    The constructor builds ``cls(**config, **kwargs)`` (kwargs win); it carries ``model_cls`` and
    ``model_args`` (the config) and every ``attrs`` item as attributes.
    """
    for name, (doc, cfg) in table.items():
        fn = functools.partial(_build_variant, cls, cfg)
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = doc
        fn.__module__ = cls.__module__
        fn.model_cls, fn.model_args = cls, cfg
        for key, value in attrs.items():
            setattr(fn, key, value)
        register_model(fn)


def _build_variant(cls: type, cfg: dict, **kwargs: Any) -> nn.Module:
    return cls(**{**cfg, **kwargs})

