"""The oracle: the two fused ops and every model, written plainly with the published code's layer names and
arithmetic (docs/models.md holds the conventions: state_dict keys, the k, q, v order, the attention scales).

Every test and benchmark compares against this file. Nothing here is optimized: soft splits materialize
the unfolded tensor (``nn.Unfold``), the token performer materializes its (B, T, m) features and every
attention its (B, heads, T, T) map, as the published code does. The only departure is that the T2T module
carries (H, W) through its re-structurizations, so non-square images work too.

This file imports nothing from the rest of the package but the shape helpers of ``t2t_fast.utils``: the
production models (``t2t_fast.models``) are a second, independent implementation with the same keys, and
the tests compare the two.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2t_fast.utils import IntPair, to_pair, tokens_to_image

# ----------------------------------------------------------------------------------------------------------
# Functional oracles of the two fused ops
# ----------------------------------------------------------------------------------------------------------
def soft_split(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Unfold, optional LayerNorm over each patch vector, linear map.

    x: (B, C, H, W); weight: (out, C*kh*kw); bias: (out,); norm_weight, norm_bias: (C*kh*kw,).
    Returns (B, L, out), L = number of patch positions. The LayerNorm runs when ``norm_weight`` is given.
    """
    cols = F.unfold(x, kernel_size, padding=padding, stride=stride).transpose(1, 2)  # (B, L, C*kh*kw)
    if norm_weight is not None:
        cols = F.layer_norm(cols, (cols.shape[-1],), norm_weight, norm_bias, eps)
    return F.linear(cols, weight, bias)


def performer_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """FAVOR+ positive random features in float32 (float64 for float64 x): exp(x @ w^T - |x|^2/2) / sqrt(m).

    x: (..., T, d), w: (m, d) -> (..., T, m).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    m = w.shape[0]
    wtx = torch.matmul(x, w.to(dtype).t())
    xd = (x * x).sum(dim=-1, keepdim=True) / 2
    return torch.exp(wtx - xd) / math.sqrt(m)


def performer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """The token performer's attention core in float32 (float64 for float64 inputs), output in the input dtype.

    q, k, v: (B, T, d) or (B, H, T, d); w: (m, d).
    y = phi(q) @ (phi(k)^T v) / (phi(q) . sum_t phi(k)_t + eps).
    """
    kp, qp = performer_features(k, w), performer_features(q, w)  # (..., T, m)
    denom = (qp * kp.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True)  # (..., T, 1)
    kptv = torch.matmul(kp.transpose(-2, -1), v.to(kp.dtype))  # (..., m, d)
    y = torch.matmul(qp, kptv) / (denom + eps)
    return y.to(v.dtype)


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """(1, n_position, d_hid) float32: angle(p, j) = p / 10000^(2*(j//2)/d_hid), sin on even j, cos on odd.

    Computed in float64 and rounded once, as the published numpy code does.
    """
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d_hid, dtype=torch.float64)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / d_hid)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# Backbone pieces (timm-style ViT block, as the published transformer_block.py)
# ----------------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample: zero a whole residual branch with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. (..., in) -> (..., out)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SELayer(nn.Module):
    """Squeeze-excitation over tokens (the t2t_vit_14_se ablation): (B, N, C) -> (B, N, C)."""

    def __init__(self, channel: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1)).unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with an explicit (B, heads, N, N) map. (B, N, C) -> (B, N, C).

    ``qkv`` packs q, k, v (in that order) for all heads; ``se`` adds the squeeze-excitation ablation after
    ``proj``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, se: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.make_projections(dim, qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if se:
            self.se_layer = SELayer(dim)

    def make_projections(self, dim: int, bias: bool) -> None:
        """The input projection(s) that ``qkv_heads`` reads: one packed ``qkv`` Linear(dim, 3*dim)."""
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, C / heads)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if hasattr(self, "se_layer"):
            x = self.se_layer(x)
        return self.proj_drop(x)


class GhostAttention(Attention):
    """``Attention`` of the published t2t_vit_ghost: separate ``q``, ``k``, ``v`` Linear(dim, dim/2), each
    widened back to dim by ``cheap_operation_q/k/v`` (depthwise 1x1 Conv1d, no bias). (B, N, dim) -> same."""

    def make_projections(self, dim: int, bias: bool) -> None:
        half = dim // 2
        for name in ("q", "k", "v"):
            setattr(self, name, nn.Linear(dim, half, bias=bias))
        for name in ("q", "k", "v"):
            setattr(self, f"cheap_operation_{name}", nn.Conv1d(half, half, kernel_size=1, groups=half, bias=False))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape

        def widened(name: str) -> torch.Tensor:  # [linear half, its cheap copy], split into heads
            y = getattr(self, name)(x)
            y = torch.cat((y, getattr(self, f"cheap_operation_{name}")(y.transpose(1, 2)).transpose(1, 2)), dim=2)
            return y.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

        return widened("q"), widened("k"), widened("v")


class GhostMlp(nn.Module):
    """The published Mlp_ghost: x1 = GELU(fc1(x)) (dim -> dim), x2, x3 = GELU(cheap_operation2/3(x1)) (depthwise
    1x1 Conv1d), fc2 over [x1, x2, x3] (3*dim -> dim). Only mlp_ratio 3 fits. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.cheap_operation2 = nn.Conv1d(dim, dim, kernel_size=1, groups=dim, bias=False)
        self.cheap_operation3 = nn.Conv1d(dim, dim, kernel_size=1, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.act(self.fc1(x))
        x2 = self.act(self.cheap_operation2(x1.transpose(1, 2)).transpose(1, 2))
        x3 = self.act(self.cheap_operation3(x1.transpose(1, 2)).transpose(1, 2))
        return self.drop(self.fc2(self.drop(torch.cat((x1, x2, x3), dim=2))))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, N, C) -> (B, N, C).

    ``ghost``: the ghost ablation's attention and MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 se: bool = False, ghost: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        attn = GhostAttention if ghost else Attention
        self.attn = attn(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         proj_drop=drop, se=se)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = (GhostMlp if ghost else Mlp)(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DenseBlock(Block):
    """The published t2t_vit_dense block: a ViT block whose output goes through ``dense_linear`` (dim ->
    growth) and is concatenated to its input. (B, N, dim) -> (B, N, dim + growth)."""

    def __init__(self, dim: int, growth: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.dense_linear = nn.Linear(dim, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.dense_linear(super().forward(x))), dim=2)


class Transition(nn.Module):
    """Between two dense stages: GELU(linear(x)), (B, N, in) -> (B, N, out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(x))


# ----------------------------------------------------------------------------------------------------------
# Token layers of the T2T module
# ----------------------------------------------------------------------------------------------------------
class TokenPerformer(nn.Module):
    """The published Token_performer: (B, T, dim) -> (B, T, in_dim).

    norm1 -> kqv (split k, q, v) -> FAVOR+ attention -> v + dropout(proj(y)) -> y + mlp(norm2(y)).
    """

    def __init__(self, dim: int, in_dim: int, head_cnt: int = 1, kernel_ratio: float = 0.5, dp1: float = 0.1,
                 dp2: float = 0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb), nn.Dropout(dp2)
        )
        self.m = int(self.emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.randn(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def attend(self, kqv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3*emb) packed projection -> (B, T, emb), skip path through v."""
        k, q, v = torch.split(kqv, self.emb, dim=-1)
        y = performer_attention(q, k, v, self.w, self.epsilon)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.kqv(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """The published token transformer's single-head attention, scale dim ** -0.5 (dim = input width).

    (B, T, dim) -> (B, T, in_dim), skip path through v.
    """

    def __init__(self, dim: int, in_dim: int, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.in_dim = in_dim
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3*in_dim) packed projection -> (B, T, in_dim)."""
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.in_dim)
        return v.squeeze(1) + self.proj_drop(self.proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x))


class TokenTransformer(nn.Module):
    """The published Token_transformer: (B, T, dim) -> (B, T, in_dim)."""

    def __init__(self, dim: int, in_dim: int, num_heads: int = 1, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim=in_dim, num_heads=num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), out_features=in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------
# Tokens-to-Token module and the whole model
# ----------------------------------------------------------------------------------------------------------
class T2TModule(nn.Module):
    """Tokens-to-Token module, stride 16 in total: (B, in_chans, H, W) -> (B, H*W/256, embed_dim).

    tokens_type: 'performer', 'transformer' or 'convolution' (the paper's ablation: three Conv2d).
    """

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 embed_dim: int = 768, token_dim: int = 64):
        super().__init__()
        self.img_size = to_pair(img_size, "img_size")
        self.tokens_type = tokens_type
        if tokens_type == "convolution":
            self.soft_split0 = nn.Conv2d(in_chans, token_dim, kernel_size=7, stride=4, padding=2)
            self.soft_split1 = nn.Conv2d(token_dim, token_dim, kernel_size=3, stride=2, padding=1)
            self.project = nn.Conv2d(token_dim, embed_dim, kernel_size=3, stride=2, padding=1)
        elif tokens_type in ("performer", "transformer"):
            self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
            self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
            self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
            if tokens_type == "performer":
                self.attention1 = TokenPerformer(dim=in_chans * 7 * 7, in_dim=token_dim, kernel_ratio=0.5)
                self.attention2 = TokenPerformer(dim=token_dim * 3 * 3, in_dim=token_dim, kernel_ratio=0.5)
            else:
                self.attention1 = TokenTransformer(dim=in_chans * 7 * 7, in_dim=token_dim, num_heads=1)
                self.attention2 = TokenTransformer(dim=token_dim * 3 * 3, in_dim=token_dim, num_heads=1)
            self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        else:
            raise ValueError(f"tokens_type must be 'performer', 'transformer' or 'convolution', got {tokens_type!r}")
        self.num_patches = (self.img_size[0] // 16) * (self.img_size[1] // 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.tokens_type == "convolution":
            return self.project(self.soft_split1(self.soft_split0(x))).flatten(2).transpose(1, 2)
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = tokens_to_image(x, (H // 4, W // 4))
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = tokens_to_image(x, (H // 8, W // 8))
        return self.project(self.soft_split2(x).transpose(1, 2))


class T2TViT(nn.Module):
    """The published T2T_ViT: T2T module, class token, frozen sinusoid position table, ViT blocks, head.

    (B, in_chans, H, W) -> (B, num_classes). ``se``, ``ghost``: the blocks of those ablations.
    """

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 token_dim: int = 64, se: bool = False, ghost: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], se=se,
                  ghost=ghost)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D): T2T tokens, class token, position table."""
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D), the normalized class token."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class T2TViTDense(T2TViT):
    """The published T2T_ViT_Dense: stages of ``DenseBlock`` (each adds ``growth_rate`` channels) with a
    ``Transition`` halving the width between stages, all in one ``blocks`` list; ``norm`` and ``head`` on the
    final width. Drop-path: every block of stage i gets linspace(0, drop_path_rate, 12)[i], as published.
    """

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 128, growth_rate: int = 64,
                 block_config: tuple[int, ...] = (3, 6, 6, 4), num_heads: int = 8, mlp_ratio: float = 2.0,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, token_dim: int = 64):
        super().__init__(img_size, tokens_type, in_chans, num_classes, embed_dim, 0, num_heads, mlp_ratio, qkv_bias,
                         qk_scale, drop_rate, attn_drop_rate, drop_path_rate, token_dim)
        dpr = torch.linspace(0, drop_path_rate, 12, device="cpu").tolist()
        blocks, dim = [], embed_dim
        for stage, n in enumerate(block_config):
            for _ in range(n):
                blocks.append(DenseBlock(dim, growth_rate, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                         qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                                         drop_path=dpr[stage]))
                dim += growth_rate
            if stage < len(block_config) - 1:
                blocks.append(Transition(dim, dim // 2))
                dim //= 2
        self.blocks = nn.ModuleList(blocks)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.blocks.apply(self._init_weights)
        self.head.apply(self._init_weights)


# ==========================================================================================================
# TNT (Transformer iN Transformer, Han et al. 2021), written plainly with timm's TNT layer names
# ==========================================================================================================
# Each 16x16 patch is a "sentence" of 4x4 "words" (pixel embeddings of width inner_dim); an inner transformer
# runs over the 16 words of every patch, and the flattened words are projected onto the patch's outer token
# in every block. The layout is timm's current (non-legacy) one, the official TNT code's arithmetic: the
# 7x7 stride-4 convolution runs on each patch by itself (its zero padding is per patch), and the
# words-to-patch projection is norm2_proj(proj(norm1_proj(flattened words))) with a bias-free proj in blocks.
class TNTAttention(Attention):
    """TNT's multi-head attention: separate ``qk`` (dim -> 2*dim) and ``v`` (dim -> dim) projections, scale
    head_dim ** -0.5, explicit (B, heads, N, N) map. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.head_dim = dim // num_heads

    def make_projections(self, dim: int, bias: bool) -> None:
        self.qk = nn.Linear(dim, dim * 2, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v, each (B, heads, N, head_dim); ``qk`` holds q then k."""
        B, N, _ = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return qk[0], qk[1], v


def tnt_words_to_patch(module: nn.Module, words: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``module.norm2_proj(module.proj(module.norm1_proj(flattened words)))``: (B*N, W, c) -> (B, N, D).

    The words of a patch are flattened word-major (column w*c + channel), as ``reshape`` lays them out.
    """
    flat = words.reshape(-1, num_patches, words.shape[1] * words.shape[2])
    return module.norm2_proj(module.proj(module.norm1_proj(flat)))


class TNTBlock(nn.Module):
    """TNT block: inner pre-norm transformer over each patch's words, words-to-patch projection added to the
    patch tokens (not the class token), then an outer pre-norm ViT block.

    (words (B*N, W, inner_dim), tokens (B, N+1, dim)) -> the same two shapes.
    """

    def __init__(self, dim: int, inner_dim: int, num_words: int, num_heads: int, inner_num_heads: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm_in = nn.LayerNorm(inner_dim)
        self.attn_in = TNTAttention(inner_dim, inner_num_heads, qkv_bias, attn_drop, drop)
        self.norm_mlp_in = nn.LayerNorm(inner_dim)
        self.mlp_in = Mlp(inner_dim, inner_dim * 4, drop=drop)
        self.norm1_proj = nn.LayerNorm(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, dim, bias=False)
        self.norm2_proj = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.attn_out = TNTAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, words: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = words + self.drop_path(self.attn_in(self.norm_in(words)))
        words = words + self.drop_path(self.mlp_in(self.norm_mlp_in(words)))
        patches = tokens[:, 1:] + tnt_words_to_patch(self, words, tokens.shape[1] - 1)
        tokens = torch.cat((tokens[:, :1], patches), dim=1)
        tokens = tokens + self.drop_path(self.attn_out(self.norm_out(tokens)))
        return words, tokens + self.drop_path(self.mlp(self.norm_mlp(tokens)))


class TNTPixelEmbed(nn.Module):
    """Image to words: every patch x patch tile is cut out and convolved by itself with ``proj`` =
    Conv2d(in_chans, inner_dim, k7, s``stride``, p3) (zero padding per patch: a window never sees the
    neighbouring patch), then the inner position is added.

    (B, C, H, W), pixel_pos (1, inner_dim, h, w) -> (B*N, h*w, inner_dim), patches row-major, words row-major.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, inner_dim: int = 48, stride: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=stride)
        words = (patch_size + 2 * 3 - 7) // stride + 1  # = ceil(patch_size / stride)
        self.word_grid = (words, words)

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        p, C = self.patch_size, x.shape[1]
        patches = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, C, p, p)  # (B*N, C, p, p)
        return (self.proj(patches) + pixel_pos).flatten(2).transpose(1, 2)


class TNT(nn.Module):
    """Transformer in Transformer: (B, in_chans, H, W) -> (B, num_classes), H and W multiples of patch_size.

    Parameters (timm's names): ``pixel_embed.proj``, ``pixel_pos`` (1, inner_dim, 4, 4), the words-to-patch
    stem ``norm1_proj``/``proj``/``norm2_proj``, ``cls_token``, ``patch_pos`` (1, N+1, D), ``blocks``,
    ``norm``, ``head``. Positions and linear weights trunc-normal std 0.02; the convolution keeps PyTorch's
    default initialization.
    """

    def __init__(self, img_size: IntPair = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, inner_dim: int = 48, depth: int = 12, num_heads: int = 12,
                 inner_num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, first_stride: int = 4):
        super().__init__()
        size = to_pair(img_size, "img_size")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pixel_embed = TNTPixelEmbed(patch_size, in_chans, inner_dim, first_stride)
        word_grid = self.pixel_embed.word_grid
        num_words = word_grid[0] * word_grid[1]
        self.norm1_proj = nn.LayerNorm(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, embed_dim)
        self.norm2_proj = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, *word_grid))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList([
            TNTBlock(embed_dim, inner_dim, num_words, num_heads, inner_num_heads, mlp_ratio, qkv_bias, drop_rate,
                     attn_drop_rate, dpr[i])
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(self._init_weights)

    _init_weights = staticmethod(T2TViT._init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "pixel_pos", "cls_token"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> words (B*N, W, inner_dim) and tokens (B, N+1, D) with class token and positions."""
        words = self.pixel_embed(x, self.pixel_pos)
        tokens = tnt_words_to_patch(self, words, self.num_patches)  # the stem's proj has a bias
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return words, self.pos_drop(tokens + self.patch_pos)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D), the normalized class token."""
        words, tokens = self.embed(x)
        for blk in self.blocks:
            words, tokens = blk(words, tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
