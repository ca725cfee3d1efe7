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

``fused=False`` runs the plain modules of ``t2t_fast.reference``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast import ops, reference
from t2t_fast.models.registry import register_model
from t2t_fast.models.t2t_vit import SDPAAttention, T2TViT, check_image
from t2t_fast.reference import IntPair, to_pair

TNT_MEAN = TNT_STD = (0.5, 0.5, 0.5)

# the official TNT code's key names (its checkpoints) -> timm's, one dotted component at a time
_OFFICIAL_NAMES = {
    "patch_embed": "pixel_embed", "outer_pos": "patch_pos", "inner_pos": "pixel_pos", "proj_norm1": "norm1_proj",
    "proj_norm2": "norm2_proj", "inner_norm1": "norm_in", "inner_attn": "attn_in", "inner_norm2": "norm_mlp_in",
    "inner_mlp": "mlp_in", "outer_norm1": "norm_out", "outer_attn": "attn_out", "outer_norm2": "norm_mlp",
    "outer_mlp": "mlp",
}


class SDPATNTAttention(reference.TNTAttention):
    """``reference.TNTAttention`` with the core through ``scaled_dot_product_attention``."""

    core = SDPAAttention.core


def fused_words_to_patch(module: nn.Module, words: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``reference.tnt_words_to_patch`` with norm1_proj + proj in one soft split: (B*N, W, c) -> (B, N, D).

    The flattened words (B, N, W*c) are a (B, W*c, 1, N) image (a view); a 1x1 soft split's columns are its
    channels, in the word-major order ``reshape`` flattens them in.
    """
    image = words.reshape(-1, num_patches, words.shape[1] * words.shape[2]).transpose(1, 2).unsqueeze(2)
    norm1, proj = module.norm1_proj, module.proj
    y = ops.soft_split(image, 1, 1, 0, proj.weight, proj.bias, norm1.weight, norm1.bias, norm1.eps)
    return module.norm2_proj(y)


class FusedTNTBlock(reference.TNTBlock):
    """``reference.TNTBlock`` with the words-to-patch projection on the fused soft split."""

    def words_to_patch(self, words: torch.Tensor, num_patches: int) -> torch.Tensor:
        return fused_words_to_patch(self, words, num_patches)


class FusedTNTPixelEmbed(reference.TNTPixelEmbed):
    """``reference.TNTPixelEmbed`` as one soft split over the batch of patches (see the module docstring)."""

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, conv = self.patch_size, self.proj
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
        words = ops.soft_split(patches, conv.kernel_size, conv.stride, conv.padding,
                               conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (B*N, W, c)
        return words + pixel_pos.flatten(2).transpose(1, 2)


class TNT(reference.TNT):
    """Transformer in Transformer: (B, in_chans, H, W) -> (B, num_classes), H and W multiples of patch_size.

    timm-style: ``forward_features`` -> (B, N+1, D) normalized tokens, ``forward_head(x, pre_logits)``
    -> class-token features or logits, ``reset_classifier``, ``get_classifier``, ``no_weight_decay``,
    ``set_grad_checkpointing``; ``checkpoint_filter`` for ``load_checkpoint``.
    """

    def __init__(self, img_size: IntPair = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, inner_dim: int = 48, depth: int = 12, num_heads: int = 12,
                 inner_num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, first_stride: int = 4,
                 fused: bool = True):
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
        super().__init__(size, patch_size, in_chans, num_classes, embed_dim, inner_dim, depth, num_heads,
                         inner_num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
                         first_stride,
                         attn_layer=SDPATNTAttention if fused else reference.TNTAttention,
                         block_layer=FusedTNTBlock if fused else reference.TNTBlock,
                         embed_layer=FusedTNTPixelEmbed if fused else reference.TNTPixelEmbed)
        self.img_size, self.in_chans, self.fused = size, in_chans, fused
        self.grad_checkpointing = False
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, *size), "num_classes": num_classes, "mean": TNT_MEAN, "std": TNT_STD,
            "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
            "first_conv": "pixel_embed.proj", "classifier": "head",
        }

    get_classifier = T2TViT.get_classifier
    reset_classifier = T2TViT.reset_classifier
    forward_head = T2TViT.forward_head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them."""
        self.grad_checkpointing = enable

    def words_to_patch(self, words: torch.Tensor, num_patches: int) -> torch.Tensor:
        if self.fused:
            return fused_words_to_patch(self, words, num_patches)
        return super().words_to_patch(words, num_patches)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D): normalized tokens, class token first."""
        check_image(x, self.in_chans, self.img_size, self.cls_token)
        words, tokens = self.embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                words, tokens = torch.utils.checkpoint.checkpoint(blk, words, tokens, use_reentrant=False)
            else:
                words, tokens = blk(words, tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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


def _variant(name: str, doc: str, **cfg):
    def fn(**kwargs) -> TNT:
        return TNT(**{**cfg, **kwargs})

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.timm_name = False  # timm has its own models of these names: register_timm leaves them alone
    return register_model(fn)


tnt_s_patch16_224 = _variant("tnt_s_patch16_224", "TNT-S: outer 384 (6 heads), inner 24 (4 heads), depth 12.",
                             embed_dim=384, inner_dim=24, depth=12, num_heads=6, inner_num_heads=4)
tnt_b_patch16_224 = _variant("tnt_b_patch16_224", "TNT-B: outer 640 (10 heads), inner 40 (4 heads), depth 12.",
                             embed_dim=640, inner_dim=40, depth=12, num_heads=10, inner_num_heads=4)
