"""T2T-ViT (Yuan et al., 2021) with fused Tokens-to-Token ops: every published variant and the paper's ablations.

State_dict keys are the published code's, so its checkpoints load with ``strict=True``. With ``fused=True``
(the default) the T2T module runs on ``t2t_fast.ops`` and the backbone attention on
``scaled_dot_product_attention``; ``fused=False`` runs the plain modules of ``t2t_fast.reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast import reference
from t2t_fast.models.fused import FusedT2TModule
from t2t_fast.models.registry import register_model
from t2t_fast.reference import IntPair, to_pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SDPAAttention(reference.Attention):
    """``reference.Attention`` with the core through ``scaled_dot_product_attention`` (no N x N map)."""

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                              scale=self.scale)


def check_image(x: torch.Tensor, in_chans: int, img_size: tuple[int, int], param: torch.Tensor) -> None:
    """ValueError naming what is wrong with an input image batch for a model."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x has {x.shape[1]} channels, the model expects in_chans={in_chans}")
    if tuple(x.shape[-2:]) != img_size:
        raise ValueError(f"x is {x.shape[-2]}x{x.shape[-1]}, the model was built for img_size={img_size}; "
                         "create the model with that img_size (load_checkpoint resizes pos_embed)")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the model is on {param.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"x dtype {x.dtype} differs from the model's {param.dtype} "
                         "(cast one of them, or run under torch.autocast)")


class T2TViT(reference.T2TViT):
    """Tokens-to-Token ViT: (B, in_chans, H, W) -> (B, num_classes), H and W multiples of 16.

    timm-style: ``forward_features`` -> (B, N+1, D) normalized tokens, ``forward_head(x, pre_logits)``
    -> class-token features or logits, ``reset_classifier``, ``get_classifier``, ``no_weight_decay``,
    ``set_grad_checkpointing``.
    """

    def __init__(self, img_size: IntPair = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 token_dim: int = 64, se: bool = False, fused: bool = True):
        size = to_pair(img_size, "img_size")
        if size[0] % 16 or size[1] % 16 or min(size) < 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (int or (H, W)), got {img_size!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        super().__init__(size, tokens_type, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         qk_scale, drop_rate, attn_drop_rate, drop_path_rate, token_dim, se,
                         attn_layer=SDPAAttention if fused else reference.Attention)
        self.img_size, self.in_chans, self.fused = size, in_chans, fused
        self.grad_checkpointing = False
        if fused and tokens_type != "convolution":
            self.tokens_to_token = FusedT2TModule(self.tokens_to_token)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, *size), "num_classes": num_classes, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": 0.9, "interpolation": "bicubic", "classifier": "head",
        }

    def set_grad_checkpointing(self, enable: bool = True, modules: str = "blocks") -> None:
        """Recompute activations in backward: ``modules`` is 'blocks', 't2t' (fused token layers) or 'all'."""
        if modules not in ("blocks", "t2t", "all"):
            raise ValueError(f"modules must be 'blocks', 't2t' or 'all', got {modules!r}")
        if modules in ("blocks", "all"):
            self.grad_checkpointing = enable
        if modules in ("t2t", "all"):
            if not isinstance(self.tokens_to_token, FusedT2TModule):
                raise ValueError("T2T checkpointing needs the fused T2T module (fused=True, token layers)")
            self.tokens_to_token.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh (trunc-normal) one for ``num_classes`` (0: identity)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)
        self.pretrained_cfg["num_classes"] = num_classes
        if isinstance(self.head, nn.Linear):
            self.head.to(self.norm.weight.device, self.norm.weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D): normalized tokens, class token first."""
        check_image(x, self.in_chans, self.img_size, self.cls_token)
        x = self.embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N+1, D) -> (B, D) class-token features if ``pre_logits``, else (B, num_classes) logits."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a checkpoint to this model: the frozen sinusoid ``pos_embed`` is recomputed for this size."""
        pe = state_dict.get("pos_embed")
        if pe is not None and pe.shape != self.pos_embed.shape:
            state_dict = dict(state_dict, pos_embed=reference.sinusoid_table(*self.pos_embed.shape[1:]))
        return state_dict


def _variant(name: str, doc: str, **cfg):
    def fn(**kwargs) -> T2TViT:
        return T2TViT(**{**cfg, **kwargs})

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return register_model(fn)


_P, _T = "performer", "transformer"
t2t_vit_7 = _variant("t2t_vit_7", "T2T-ViT-7: performer tokens, 256 wide, depth 7.", tokens_type=_P, embed_dim=256,
                     depth=7, num_heads=4, mlp_ratio=2.0)
t2t_vit_10 = _variant("t2t_vit_10", "T2T-ViT-10.", tokens_type=_P, embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
t2t_vit_12 = _variant("t2t_vit_12", "T2T-ViT-12.", tokens_type=_P, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
t2t_vit_14 = _variant("t2t_vit_14", "T2T-ViT-14: 384 wide, depth 14.", tokens_type=_P, embed_dim=384, depth=14,
                      num_heads=6, mlp_ratio=3.0)
t2t_vit_19 = _variant("t2t_vit_19", "T2T-ViT-19.", tokens_type=_P, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
t2t_vit_24 = _variant("t2t_vit_24", "T2T-ViT-24.", tokens_type=_P, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
t2t_vit_t_14 = _variant("t2t_vit_t_14", "T2T-ViT_t-14: transformer token layers.", tokens_type=_T, embed_dim=384,
                        depth=14, num_heads=6, mlp_ratio=3.0)
t2t_vit_t_19 = _variant("t2t_vit_t_19", "T2T-ViT_t-19.", tokens_type=_T, embed_dim=448, depth=19, num_heads=7,
                        mlp_ratio=3.0)
t2t_vit_t_24 = _variant("t2t_vit_t_24", "T2T-ViT_t-24.", tokens_type=_T, embed_dim=512, depth=24, num_heads=8,
                        mlp_ratio=3.0)
t2t_vit_c_14 = _variant("t2t_vit_c_14", "Ablation: the soft splits replaced by three convolutions.",
                        tokens_type="convolution", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
t2t_vit_14_wide = _variant("t2t_vit_14_wide", "Ablation: wide-shallow backbone (768 wide, depth 4).", tokens_type=_P,
                           embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0)
t2t_vit_14_resnext = _variant("t2t_vit_14_resnext", "Ablation: ResNeXt-like, 32 heads.", tokens_type=_P,
                              embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.0)
t2t_vit_14_se = _variant("t2t_vit_14_se", "Ablation: squeeze-excitation on the attention output.", tokens_type=_P,
                         embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, se=True)
