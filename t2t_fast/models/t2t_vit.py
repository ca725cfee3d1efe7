"""T2T-ViT (Yuan et al., 2021) on the fused Tokens-to-Token ops: every published variant and the paper's ablations.

State_dict keys are the published code's (docs/models.md), so its checkpoints load with ``strict=True``.
``fused=True`` (the default) runs the T2T module on ``t2t_fast.ops`` and every attention through
``scaled_dot_product_attention``; ``fused=False`` runs the published computation (``nn.Unfold``, the
performer's (B, T, m) features and every attention map in memory), to compare.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from t2t_fast.models.fused import TokensToToken, performer_tail, transformer_tail
from t2t_fast.models.layers import (IMAGENET_MEAN, IMAGENET_STD, Attention, Block, Mlp, TimmModelMixin,
                                    check_image, init_weights, register_variants)
from t2t_fast.utils import IntPair, to_pair


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The published frozen position table, (1, num_positions, dim) float32: sin(p * f_i) in column 2i and
    cos(p * f_i) in column 2i+1, f_i = 10000 ** (-2i / dim); computed in float64, rounded once."""
    freqs = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float64), freqs)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, :dim]
    return table.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# Token layers and the Tokens-to-Token module
# ----------------------------------------------------------------------------------------------------------
def performer_attention_unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                                eps: float) -> torch.Tensor:
    """The FAVOR+ attention with its (B, T, m) features in memory, in float32 (float64 for float64 inputs).

    q, k, v: (B, T, d), w: (m, d) -> (B, T, d) in v's dtype; features exp(x w^T - |x|^2 / 2) / sqrt(m).
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    w = w.to(dtype)
    scale = w.shape[0] ** -0.5

    def features(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        return torch.exp(torch.matmul(x, w.t()) - 0.5 * x.square().sum(-1, keepdim=True)) * scale

    qf, kf = features(q), features(k)
    numerator = torch.matmul(qf, torch.matmul(kf.transpose(1, 2), v.to(dtype)))  # (B, T, d)
    denominator = torch.matmul(qf, kf.sum(dim=1).unsqueeze(-1))  # (B, T, 1)
    return (numerator / (denominator + eps)).to(v.dtype)


class TokenPerformer(nn.Module):
    """The published token performer, (B, T, dim) -> (B, T, emb): norm1, packed ``kqv`` (k, q, v order),
    FAVOR+ attention with the frozen random features ``w`` (m = emb * kernel_ratio rows, orthogonal times
    sqrt(m)), skip path through v, then y + mlp(norm2(y)) with ``mlp`` = Sequential(Linear, GELU, Linear,
    Dropout)."""

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, dp1: float = 0.1, dp2: float = 0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)  # the published registration order, so state_dict lists agree
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(dp2))
        self.epsilon = 1e-8
        m = int(in_dim * kernel_ratio)
        self.w = nn.Parameter(nn.init.orthogonal_(torch.empty(m, in_dim)) * math.sqrt(m), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused computation (the fused one is ``fused.performer_layer``)."""
        return performer_tail(self, self.kqv(self.norm1(x)), performer_attention_unfused)


class TokenAttention(nn.Module):
    """The token transformer's single-head attention parameters: ``qkv`` (no bias), ``proj``; scale
    dim ** -0.5 with dim the input width (the published quirk its checkpoints depend on)."""

    num_heads = 1

    def __init__(self, dim: int, in_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)


class TokenTransformer(nn.Module):
    """The published token transformer, (B, T, dim) -> (B, T, in_dim): norm1, single-head attention with skip
    path through v, then y + mlp(norm2(y))."""

    def __init__(self, dim: int, in_dim: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused computation (the fused one is ``fused.transformer_layer``)."""
        return transformer_tail(self, self.attn.qkv(self.norm1(x)), fused=False)


class T2TModule(TokensToToken):
    """Tokens-to-Token module with token layers: (B, in_chans, H, W) -> (B, H*W/256, embed_dim).

    Soft splits k7 s4 p2, k3 s2 p1, k3 s2 p1; token layers ``tokens_type`` 'performer' or 'transformer'
    (in_chans*49 -> token_dim, token_dim*9 -> token_dim); ``project`` Linear(token_dim*9, embed_dim).
    """

    def __init__(self, img_size: tuple[int, int], tokens_type: str = "performer", in_chans: int = 3,
                 embed_dim: int = 768, token_dim: int = 64, fused: bool = True):
        super().__init__()
        self.img_size, self.tokens_type, self.fused = img_size, tokens_type, fused
        self.num_patches = (img_size[0] // 16) * (img_size[1] // 16)
        self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
        self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        widths = ((in_chans * 49, token_dim), (token_dim * 9, token_dim))
        if tokens_type == "performer":
            self.attention1, self.attention2 = (TokenPerformer(d, out, kernel_ratio=0.5) for d, out in widths)
        else:
            self.attention1, self.attention2 = (TokenTransformer(d, out) for d, out in widths)
        self.project = nn.Linear(token_dim * 9, embed_dim)


class ConvT2TModule(nn.Module):
    """The paper's convolution ablation of the T2T module: Conv2d k7 s4 p2 -> k3 s2 p1 -> k3 s2 p1 (to
    embed_dim), no token layers. (B, in_chans, H, W) -> (B, H*W/256, embed_dim)."""

    def __init__(self, img_size: tuple[int, int], in_chans: int = 3, embed_dim: int = 768, token_dim: int = 64):
        super().__init__()
        self.img_size, self.tokens_type = img_size, "convolution"
        self.num_patches = (img_size[0] // 16) * (img_size[1] // 16)
        self.soft_split0 = nn.Conv2d(in_chans, token_dim, kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Conv2d(token_dim, token_dim, kernel_size=3, stride=2, padding=1)
        self.project = nn.Conv2d(token_dim, embed_dim, kernel_size=3, stride=2, padding=1)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> tokens at strides 4, 8 and 16, each (B, L, channels), row-major positions."""
        stages, y = [], x
        for conv in (self.soft_split0, self.soft_split1, self.project):
            y = conv(y)
            stages.append(y.flatten(2).transpose(1, 2))
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.soft_split1(self.soft_split0(x))).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# The ghost ablation's layers (the published t2t_vit_ghost)
# ----------------------------------------------------------------------------------------------------------
class ChannelScale(nn.Module):
    """A depthwise 1x1 ``Conv1d`` without bias (the published ``cheap_operation``), i.e. a per-channel scale
    of (..., C) features. ``weight`` (C, 1, 1) as the Conv1d stores it, drawn as Conv1d draws it: U(-1, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, 1).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.flatten()


class GhostAttention(Attention):
    """Attention whose q, k, v are each half a Linear (``q``, ``k``, ``v``: dim -> dim/2) and half its cheap
    per-channel scale (``cheap_operation_q/k/v``). (B, N, dim) -> (B, N, dim)."""

    def _make_projections(self, dim: int, bias: bool) -> None:
        half = dim // 2
        self.q, self.k, self.v = (nn.Linear(dim, half, bias=bias) for _ in range(3))
        self.cheap_operation_q, self.cheap_operation_k, self.cheap_operation_v = (ChannelScale(half) for _ in range(3))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for linear, cheap in ((self.q, self.cheap_operation_q), (self.k, self.cheap_operation_k),
                              (self.v, self.cheap_operation_v)):
            y = linear(x)
            out.append(self.split_heads(torch.cat((y, cheap(y)), dim=-1)))
        return out[0], out[1], out[2]


class GhostMlp(nn.Module):
    """The ghost MLP, (B, N, dim) -> (B, N, dim): h = GELU(fc1(x)) (dim -> dim), then fc2 over
    [h, GELU(cheap_operation2(h)), GELU(cheap_operation3(h))] (3*dim -> dim); the hidden width must be 3*dim."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        if hidden != 3 * dim:
            raise ValueError(f"the ghost MLP needs mlp_ratio 3 (hidden width {3 * dim}), got hidden width {hidden}")
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.cheap_operation2 = ChannelScale(dim)
        self.cheap_operation3 = ChannelScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = torch.cat((h, self.act(self.cheap_operation2(h)), self.act(self.cheap_operation3(h))), dim=-1)
        return self.drop(self.fc2(self.drop(h)))


# ----------------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------------
class T2TViT(TimmModelMixin, nn.Module):
    """Tokens-to-Token ViT: (B, in_chans, H, W) -> (B, num_classes), H and W multiples of 16.

    T2T module (``tokens_type`` 'performer', 'transformer' or the 'convolution' ablation), class token,
    frozen sinusoid ``pos_embed``, ``depth`` pre-norm blocks (``se``, ``ghost``: those ablations' blocks),
    ``norm``, ``head``. timm-style: ``forward_features`` -> (B, N+1, D) normalized tokens,
    ``forward_head(x, pre_logits)``, ``reset_classifier``, ``get_classifier``, ``no_weight_decay``,
    ``set_grad_checkpointing``, ``group_matcher``, ``forward_intermediates``, ``prune_intermediate_layers``
    (features: the token layers' outputs at strides 4 and 8, then every block at stride 16);
    ``checkpoint_filter`` for ``load_checkpoint``.
    """

    group_matcher_stem = r"^cls_token|^pos_embed|^tokens_to_token"

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 token_dim: int = 64, se: bool = False, ghost: bool = False, fused: bool = True):
        super().__init__()
        size = to_pair(img_size, "img_size")
        if size[0] % 16 or size[1] % 16 or min(size) < 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (int or (H, W)), got {img_size!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if tokens_type in ("performer", "transformer"):
            self.tokens_to_token = T2TModule(size, tokens_type, in_chans, embed_dim, token_dim, fused)
        elif tokens_type == "convolution":
            self.tokens_to_token = ConvT2TModule(size, in_chans, embed_dim, token_dim)
        else:
            raise ValueError(f"tokens_type must be 'performer', 'transformer' or 'convolution', got {tokens_type!r}")
        self.img_size, self.in_chans, self.fused = size, in_chans, fused
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.tokens_to_token.num_patches
        self.pos_embed = nn.Parameter(sinusoid_position_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        layers = dict(attn_layer=GhostAttention, mlp_layer=GhostMlp) if ghost else {}
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate, se=se,
                  fused=fused, **layers)
            for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, *size), "num_classes": num_classes, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": 0.9, "interpolation": "bicubic", "classifier": "head",
        }
        self.set_feature_info(token_dim, [embed_dim] * depth)

    def set_feature_info(self, token_dim: int, block_widths: list[int]) -> None:
        """``feature_info``: the two token-layer outputs (strides 4 and 8), then every block (stride 16)."""
        layers = ("attention1", "attention2") if isinstance(self.tokens_to_token, TokensToToken) else \
            ("soft_split0", "soft_split1")
        self.feature_info = [dict(num_chs=token_dim, reduction=r, module=f"tokens_to_token.{name}")
                             for r, name in zip((4, 8), layers)]
        self.feature_info += [dict(num_chs=w, reduction=16, module=f"blocks.{i}") for i, w in enumerate(block_widths)]
        # features_only default: one map per stride
        self.default_out_indices = (0, 1, len(self.feature_info) - 1) if block_widths else (0, 1)

    def set_grad_checkpointing(self, enable: bool = True, modules: str = "blocks") -> None:
        """Recompute activations in the backward: ``modules`` 'blocks', 't2t' (the token layers) or 'all'."""
        if modules not in ("blocks", "t2t", "all"):
            raise ValueError(f"modules must be 'blocks', 't2t' or 'all', got {modules!r}")
        if modules in ("t2t", "all"):
            if not isinstance(self.tokens_to_token, TokensToToken):
                raise ValueError("T2T checkpointing needs token layers (not the convolution ablation)")
            self.tokens_to_token.grad_checkpointing = enable
        if modules in ("blocks", "all"):
            self.grad_checkpointing = enable

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) T2T tokens -> (B, N+1, D): class token first, position table added."""
        x = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_stem(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor]]:
        """(B, C, H, W) -> the token layers' outputs (B, H/4 * W/4, 64), (B, H/8 * W/8, 64) and the blocks'
        input (B, N+1, D)."""
        *stem, tokens = self.tokens_to_token.forward_stages(x)
        return stem, (self.embed(tokens),)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D): normalized tokens, class token first."""
        check_image(x, self.in_chans, self.img_size, self.cls_token)
        x = self.embed(self.tokens_to_token(x))
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a checkpoint to this model: the frozen sinusoid ``pos_embed`` is recomputed for this size."""
        pe = state_dict.get("pos_embed")
        if pe is not None and pe.shape != self.pos_embed.shape:
            state_dict = dict(state_dict, pos_embed=sinusoid_position_table(*self.pos_embed.shape[1:]))
        return state_dict


class DenseBlock(Block):
    """The dense variant's block: a pre-norm block at width ``dim`` whose output, mapped by ``dense_linear``
    to ``growth`` channels, is appended to its input. (B, N, dim) -> (B, N, dim + growth)."""

    def __init__(self, dim: int, growth: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.dense_linear = nn.Linear(dim, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.dense_linear(super().forward(x))), dim=-1)


class Transition(nn.Module):
    """Between dense stages: GELU(``linear``(x)), (B, N, in) -> (B, N, out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class T2TViTDense(T2TViT):
    """The published T2T-ViT-Dense: ``block_config`` stages of ``DenseBlock`` (each appends ``growth_rate``
    channels), a ``Transition`` halving the width between two stages, all in one ``blocks`` list, then
    ``norm`` and ``head`` at the final width (``num_features``). Every block of stage i drops its path
    with linspace(0, drop_path_rate, 12)[i], as the published code does.
    """

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 128, growth_rate: int = 64,
                 block_config: tuple[int, ...] = (3, 6, 6, 4), num_heads: int = 8, mlp_ratio: float = 2.0,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, token_dim: int = 64, fused: bool = True):
        super().__init__(img_size, tokens_type, in_chans, num_classes, embed_dim, 0, num_heads, mlp_ratio, qkv_bias,
                         qk_scale, drop_rate, attn_drop_rate, drop_path_rate, token_dim, fused=fused)
        stage_rates = torch.linspace(0, drop_path_rate, 12, device="cpu").tolist()
        dim, widths = embed_dim, []
        for stage, count in enumerate(block_config):
            for _ in range(count):
                self.blocks.append(DenseBlock(dim, growth_rate, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                              qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                                              drop_path=stage_rates[stage], fused=fused))
                dim += growth_rate
                widths.append(dim)
            if stage + 1 < len(block_config):
                self.blocks.append(Transition(dim, dim // 2))
                dim //= 2
                widths.append(dim)
        self.set_feature_info(token_dim, widths)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for module in (self.blocks, self.norm, self.head):
            module.apply(init_weights)


_P, _T = "performer", "transformer"
_SMALL = dict(embed_dim=256, num_heads=4, mlp_ratio=2.0)
_14 = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
_19 = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
_24 = dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
register_variants(T2TViT, {
    "t2t_vit_7": ("T2T-ViT-7: performer tokens, 256 wide, depth 7.", dict(tokens_type=_P, depth=7, **_SMALL)),
    "t2t_vit_10": ("T2T-ViT-10.", dict(tokens_type=_P, depth=10, **_SMALL)),
    "t2t_vit_12": ("T2T-ViT-12.", dict(tokens_type=_P, depth=12, **_SMALL)),
    "t2t_vit_14": ("T2T-ViT-14: 384 wide, depth 14.", dict(tokens_type=_P, **_14)),
    "t2t_vit_19": ("T2T-ViT-19.", dict(tokens_type=_P, **_19)),
    "t2t_vit_24": ("T2T-ViT-24.", dict(tokens_type=_P, **_24)),
    "t2t_vit_t_14": ("T2T-ViT_t-14: transformer token layers.", dict(tokens_type=_T, **_14)),
    "t2t_vit_t_19": ("T2T-ViT_t-19.", dict(tokens_type=_T, **_19)),
    "t2t_vit_t_24": ("T2T-ViT_t-24.", dict(tokens_type=_T, **_24)),
    "t2t_vit_c_14": ("Ablation: the soft splits replaced by three convolutions.",
                     dict(tokens_type="convolution", **_14)),
    "t2t_vit_14_wide": ("Ablation: wide-shallow backbone (768 wide, depth 4).",
                        dict(tokens_type=_P, embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0)),
    "t2t_vit_14_resnext": ("Ablation: ResNeXt-like, 32 heads.", dict(tokens_type=_P, **dict(_14, num_heads=32))),
    "t2t_vit_14_se": ("Ablation: squeeze-excitation on the attention output.", dict(tokens_type=_P, se=True, **_14)),
    "t2t_vit_16_ghost": ("Ablation: ghost attention and MLP (half of q, k, v and of the MLP's hidden width from "
                         "per-channel scales), 384 wide, depth 16.",
                         dict(tokens_type=_P, ghost=True, **dict(_14, depth=16))),
})
register_variants(T2TViTDense, {
    "t2t_vit_dense": ("Ablation: DenseNet-like backbone, stages of 3, 6, 6, 4 blocks growing by 64 channels from "
                      "128, width halved between stages.",
                      dict(tokens_type=_P, embed_dim=128, growth_rate=64, block_config=(3, 6, 6, 4), num_heads=8,
                           mlp_ratio=2.0)),
})
