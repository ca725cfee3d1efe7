"""TNT (Transformer iN Transformer, Han et al. 2021) on the fused soft split: ``tnt_s_patch16_224``,
``tnt_b_patch16_224``.

State_dict keys are timm's (its current, non-legacy TNT layout), so timm's checkpoints load with
``strict=True``; ``checkpoint_filter`` also renames the official TNT code's keys and resizes ``patch_pos``.
With ``fused=True`` (the default):

- pixel embedding: the per-patch Conv2d(k7, s4, p3) is one ``ops.soft_split`` over the batch of 16x16
  patches. That batch, (B*N, C, 16, 16), is one image-sized copy of the input (a contiguous image has no
  4-d strided view of it: the patch index (b, i, j) does not map to a single batch stride), in which every
  patch's zero padding is real padding; the (B*N*16, C*49) unfolded tensor never exists.
- words-to-patch projection (the stem's and every block's ``norm1_proj`` + ``proj``): one soft split with a
  1x1 kernel over the flattened words seen, without a copy, as a (B, W*c, 1, N) image; ``norm2_proj`` stays
  a LayerNorm after it.
- inner (16 words) and outer attention: ``scaled_dot_product_attention`` (no attention map in memory).

``fused=False`` runs the plain computation (a convolution per patch, LayerNorm + Linear, explicit attention
maps), to compare.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2t_fast import ops
from t2t_fast.models.layers import (Attention, Mlp, TimmModelMixin, check_image, drop_path_or_identity,
                                    init_weights, register_variants)
from t2t_fast.utils import IntPair, to_pair

TNT_MEAN = TNT_STD = (0.5, 0.5, 0.5)

# the official TNT code's key names (its checkpoints) -> timm's, one dotted component at a time
_OFFICIAL_NAMES = {
    "patch_embed": "pixel_embed", "outer_pos": "patch_pos", "inner_pos": "pixel_pos", "proj_norm1": "norm1_proj",
    "proj_norm2": "norm2_proj", "inner_norm1": "norm_in", "inner_attn": "attn_in", "inner_norm2": "norm_mlp_in",
    "inner_mlp": "mlp_in", "outer_norm1": "norm_out", "outer_attn": "attn_out", "outer_norm2": "norm_mlp",
    "outer_mlp": "mlp",
}


class TNTAttention(Attention):
    """TNT's multi-head attention: ``qk`` Linear(dim, 2*dim) (q then k) and ``v`` Linear(dim, dim), scale
    head_dim ** -0.5. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused: bool = True):
        super().__init__(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, fused=fused)

    def _make_projections(self, dim: int, bias: bool) -> None:
        self.qk = nn.Linear(dim, 2 * dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self.qk(x).chunk(2, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(self.v(x))


def words_to_patch(module: nn.Module, words: torch.Tensor, num_patches: int, fused: bool) -> torch.Tensor:
    """``module.norm2_proj(module.proj(module.norm1_proj(flattened words)))``: (B*N, W, c) -> (B, N, D).

    A patch's words are flattened word-major (column w*c + channel). Fused, norm1_proj + proj are one 1x1
    soft split over the flattened words seen (a view) as a (B, W*c, 1, N) image: its columns are the channels.
    """
    flat = words.reshape(-1, num_patches, words.shape[1] * words.shape[2])  # (B, N, W*c)
    norm, proj = module.norm1_proj, module.proj
    if fused:
        image = flat.transpose(1, 2).unsqueeze(2)
        y = ops.soft_split(image, 1, 1, 0, proj.weight, proj.bias, norm.weight, norm.bias, norm.eps)
    else:
        y = proj(norm(flat))
    return module.norm2_proj(y)


class TNTBlock(nn.Module):
    """TNT block: inner pre-norm transformer over each patch's words; the words' projection added to the patch
    tokens (not the class token); then an outer pre-norm transformer block.

    (words (B*N, W, inner_dim), tokens (B, N+1, dim)) -> the same two shapes.
    """

    def __init__(self, dim: int, inner_dim: int, num_words: int, num_heads: int, inner_num_heads: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.norm_in = nn.LayerNorm(inner_dim)
        self.attn_in = TNTAttention(inner_dim, inner_num_heads, qkv_bias, attn_drop, drop, fused)
        self.norm_mlp_in = nn.LayerNorm(inner_dim)
        self.mlp_in = Mlp(inner_dim, 4 * inner_dim, drop=drop)
        self.norm1_proj = nn.LayerNorm(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, dim, bias=False)
        self.norm2_proj = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.attn_out = TNTAttention(dim, num_heads, qkv_bias, attn_drop, drop, fused)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, words: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = words + self.drop_path(self.attn_in(self.norm_in(words)))
        words = words + self.drop_path(self.mlp_in(self.norm_mlp_in(words)))
        cls, patches = tokens[:, :1], tokens[:, 1:]
        tokens = torch.cat((cls, patches + words_to_patch(self, words, patches.shape[1], self.fused)), dim=1)
        tokens = tokens + self.drop_path(self.attn_out(self.norm_out(tokens)))
        tokens = tokens + self.drop_path(self.mlp(self.norm_mlp(tokens)))
        return words, tokens


class PixelEmbed(nn.Module):
    """Image to words: each patch x patch tile convolved by itself with ``proj`` = Conv2d(in_chans, inner_dim,
    k7, s``stride``, p3) (zero padding per patch), plus the inner position.

    (B, C, H, W), pixel_pos (1, inner_dim, h, w) -> (B*N, h*w, inner_dim), patches and words row-major.
    Fused, the convolution is one soft split over the batch of patches (see the module docstring).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, inner_dim: int = 48, stride: int = 4,
                 fused: bool = True):
        super().__init__()
        self.patch_size, self.fused = patch_size, fused
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=stride)
        side = -(-patch_size // stride)  # (patch + 2*3 - 7) // stride + 1
        self.word_grid = (side, side)

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, conv = self.patch_size, self.proj
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
        if self.fused:
            words = ops.soft_split(patches, conv.kernel_size, conv.stride, conv.padding,
                                   conv.weight.flatten(1), conv.bias)  # (B*N, h*w, inner_dim)
        else:
            words = conv(patches).flatten(2).transpose(1, 2)
        return words + pixel_pos.flatten(2).transpose(1, 2)


class TNT(TimmModelMixin, nn.Module):
    """Transformer in Transformer: (B, in_chans, H, W) -> (B, num_classes), H and W multiples of patch_size.

    Parameters (timm's names): ``pixel_embed.proj``, ``pixel_pos`` (1, inner_dim, 4, 4), the words-to-patch
    stem ``norm1_proj``/``proj``/``norm2_proj``, ``cls_token``, ``patch_pos`` (1, N+1, D), ``blocks``,
    ``norm``, ``head``. timm-style: ``forward_features`` -> (B, N+1, D) normalized tokens,
    ``forward_head(x, pre_logits)``, ``reset_classifier``, ``get_classifier``, ``no_weight_decay``,
    ``set_grad_checkpointing``, ``group_matcher``, ``forward_intermediates`` and
    ``prune_intermediate_layers`` (features: every block, stride patch_size); ``checkpoint_filter`` for
    ``load_checkpoint``.
    """

    no_weight_decay_keys = ("patch_pos", "pixel_pos", "cls_token")
    group_matcher_stem = r"^cls_token|^patch_pos|^pixel_pos|^pixel_embed|^norm[12]_proj|^proj"

    def __init__(self, img_size: IntPair = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, inner_dim: int = 48, depth: int = 12, num_heads: int = 12,
                 inner_num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, first_stride: int = 4,
                 fused: bool = True):
        super().__init__()
        size = to_pair(img_size, "img_size")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if size[0] % patch_size or size[1] % patch_size or min(size) < patch_size:
            raise ValueError(f"img_size must be a positive multiple of patch_size={patch_size} (int or (H, W)), "
                             f"got {img_size!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if inner_dim % inner_num_heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by inner_num_heads {inner_num_heads}")
        self.img_size, self.in_chans, self.fused = size, in_chans, fused
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pixel_embed = PixelEmbed(patch_size, in_chans, inner_dim, first_stride, fused)
        word_grid = self.pixel_embed.word_grid
        num_words = word_grid[0] * word_grid[1]
        self.norm1_proj = nn.LayerNorm(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, embed_dim)
        self.norm2_proj = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, *word_grid))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList(
            TNTBlock(embed_dim, inner_dim, num_words, num_heads, inner_num_heads, mlp_ratio, qkv_bias, drop_rate,
                     attn_drop_rate, rate, fused)
            for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, *size), "num_classes": num_classes, "mean": TNT_MEAN, "std": TNT_STD,
            "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
            "first_conv": "pixel_embed.proj", "classifier": "head",
        }
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.default_out_indices = (depth - 1,) if depth else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them."""
        self.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> words (B*N, W, inner_dim) and tokens (B, N+1, D) with class token and positions."""
        words = self.pixel_embed(x, self.pixel_pos)
        tokens = words_to_patch(self, words, self.num_patches, self.fused)  # the stem's proj has a bias
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return words, self.pos_drop(tokens + self.patch_pos)

    def forward_stem(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(B, C, H, W) -> no stem features, and the blocks' input (words, tokens)."""
        return [], self.embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D): normalized tokens, class token first."""
        check_image(x, self.in_chans, self.img_size, self.cls_token)
        words, tokens = self.embed(x)
        for block in self.blocks:
            words, tokens = self.run_block(block, words, tokens)
        return self.norm(tokens)

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a checkpoint to this model: the official TNT code's key names become timm's (its unused
        ``outer_tokens`` is dropped, its (1, W, c) ``inner_pos`` becomes (1, c, h, w)), and ``patch_pos`` of
        another square grid is resized to this model's grid (bicubic, antialiased, class token kept)."""
        if "patch_pos" not in state_dict and "outer_pos" in state_dict:
            state_dict = {".".join(_OFFICIAL_NAMES.get(part, part) for part in k.split(".")): v
                          for k, v in state_dict.items() if k != "outer_tokens"}
            pos = state_dict.get("pixel_pos")
            if pos is not None and pos.dim() == 3:
                state_dict["pixel_pos"] = pos.transpose(1, 2).reshape(1, pos.shape[2], *self.pixel_pos.shape[2:])
        pos = state_dict.get("patch_pos")
        if pos is not None and pos.shape != self.patch_pos.shape:
            state_dict = dict(state_dict, patch_pos=self.resize_patch_pos(pos))
        return state_dict

    def resize_patch_pos(self, pos: torch.Tensor) -> torch.Tensor:
        """(1, 1 + n*n, D) positions of an n x n patch grid -> (1, 1 + N, D) for this model's grid."""
        side = math.isqrt(pos.shape[1] - 1)
        if pos.dim() != 3 or side * side != pos.shape[1] - 1 or pos.shape[2] != self.embed_dim:
            raise ValueError(f"patch_pos: cannot resize a checkpoint's {tuple(pos.shape)} to "
                             f"{tuple(self.patch_pos.shape)} (expected (1, 1 + n*n, {self.embed_dim}) of a square "
                             "n x n patch grid)")
        grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid_size, mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, self.num_patches, -1).to(pos.dtype)
        return torch.cat((pos[:, :1], grid), dim=1)


register_variants(TNT, {
    "tnt_s_patch16_224": ("TNT-S: outer 384 (6 heads), inner 24 (4 heads), depth 12.",
                          dict(embed_dim=384, inner_dim=24, depth=12, num_heads=6, inner_num_heads=4)),
    "tnt_b_patch16_224": ("TNT-B: outer 640 (10 heads), inner 40 (4 heads), depth 12.",
                          dict(embed_dim=640, inner_dim=40, depth=12, num_heads=10, inner_num_heads=4)),
}, timm_name=False)  # timm has its own models of these names: register_timm leaves them alone
