"""t2t_vit_dense and t2t_vit_16_ghost against the published layout, and the production models against the
reference ones: the same state_dict keys and shapes for every registered model, apply_fused on the new ones.

The expected layouts are written out here from the published ``models/t2t_vit_dense.py`` and
``models/t2t_vit_ghost.py`` (layer names, widths, which layers have biases), independently of both
implementations. Shapes only: full-size models are built on the meta device.
"""
import pytest
import torch

import t2t_fast
from reference_models import models_with_same_weights, reference_model


def published_t2t_shapes(embed: int, in_chans: int = 3, token: int = 64) -> dict[str, tuple]:
    """The published performer T2T module (token_dim 64, kernel_ratio 0.5) and the class token/positions."""
    shapes = {"cls_token": (1, 1, embed), "pos_embed": (1, 197, embed),
              "tokens_to_token.project.weight": (embed, token * 9), "tokens_to_token.project.bias": (embed,)}
    for i, dim in ((1, in_chans * 49), (2, token * 9)):
        p = f"tokens_to_token.attention{i}."
        shapes.update({p + "kqv.weight": (3 * token, dim), p + "kqv.bias": (3 * token,), p + "w": (token // 2, token),
                       p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "norm2.weight": (token,),
                       p + "norm2.bias": (token,), p + "proj.weight": (token, token), p + "proj.bias": (token,)})
        for j in (0, 2):
            shapes.update({p + f"mlp.{j}.weight": (token, token), p + f"mlp.{j}.bias": (token,)})
    return shapes


def published_head_shapes(width: int, classes: int = 1000) -> dict[str, tuple]:
    return {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (classes, width), "head.bias": (classes,)}


def published_dense_shapes() -> dict[str, tuple]:
    """t2t_vit_dense: growth 64, stages (3, 6, 6, 4) from 128 wide, 8 heads, mlp ratio 2, Transition(d, d//2)."""
    shapes, index, dim = published_t2t_shapes(128), 0, 128
    for stage, count in enumerate((3, 6, 6, 4)):
        for _ in range(count):
            p = f"blocks.{index}."
            shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                           p + "attn.qkv.weight": (3 * dim, dim), p + "attn.proj.weight": (dim, dim),
                           p + "attn.proj.bias": (dim,), p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                           p + "mlp.fc1.weight": (2 * dim, dim), p + "mlp.fc1.bias": (2 * dim,),
                           p + "mlp.fc2.weight": (dim, 2 * dim), p + "mlp.fc2.bias": (dim,),
                           p + "dense_linear.weight": (64, dim), p + "dense_linear.bias": (64,)})
            index, dim = index + 1, dim + 64
        if stage < 3:
            p = f"blocks.{index}.linear."
            shapes.update({p + "weight": (dim // 2, dim), p + "bias": (dim // 2,)})
            index, dim = index + 1, dim // 2
    assert index == 22 and dim == 584
    return {**shapes, **published_head_shapes(dim)}


def published_ghost_shapes() -> dict[str, tuple]:
    """t2t_vit_16_ghost: 384 wide, 16 blocks; q/k/v Linear(384, 192) without bias, cheap ops (192, 1, 1) and
    (384, 1, 1) depthwise Conv1d weights, fc1 384 -> 384, fc2 1152 -> 384."""
    shapes = published_t2t_shapes(384)
    for i in range(16):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (384,), p + "norm1.bias": (384,), p + "attn.proj.weight": (384, 384),
                       p + "attn.proj.bias": (384,), p + "norm2.weight": (384,), p + "norm2.bias": (384,),
                       p + "mlp.fc1.weight": (384, 384), p + "mlp.fc1.bias": (384,), p + "mlp.fc2.weight": (384, 1152),
                       p + "mlp.fc2.bias": (384,), p + "mlp.cheap_operation2.weight": (384, 1, 1),
                       p + "mlp.cheap_operation3.weight": (384, 1, 1)})
        for n in "qkv":
            shapes.update({p + f"attn.{n}.weight": (192, 384), p + f"attn.cheap_operation_{n}.weight": (192, 1, 1)})
    return {**shapes, **published_head_shapes(384)}


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, expected, count", [("t2t_vit_dense", published_dense_shapes, 23_647_062),
                                                   ("t2t_vit_16_ghost", published_ghost_shapes, 16_253_262)])
def test_published_layout_and_parameter_count(name, expected, count):
    shapes = expected()
    assert sum(torch.Size(s).numel() for s in shapes.values()) == count
    with torch.device("meta"):
        model = t2t_fast.create_model(name)
    assert _shapes(model) == shapes
    assert sum(p.numel() for p in model.parameters()) == count
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}


@pytest.mark.parametrize("name", t2t_fast.list_models())
def test_production_and_reference_state_dicts_agree(name):
    with torch.device("meta"):
        ours, ref = t2t_fast.create_model(name), reference_model(name)
        unfused = t2t_fast.create_model(name, fused=False)
    assert list(_shapes(ours).items()) == list(_shapes(ref).items()) == list(_shapes(unfused).items())
    assert {n for n, p in ours.named_parameters() if not p.requires_grad} == \
        {n for n, p in ref.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", ["t2t_vit_dense", "t2t_vit_16_ghost"])
def test_new_variants_fused_unfused_reference_non_square(name):
    ref, fused, unfused = models_with_same_weights(name, img_size=(64, 32), num_classes=7)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expect = ref(x)
        torch.testing.assert_close(fused(x), expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused(x), expect, rtol=1e-5, atol=1e-5)
    assert fused.forward_features(x).shape == (2, 9, fused.num_features)
    assert fused.forward_head(fused.forward_features(x), pre_logits=True).shape == (2, fused.num_features)


@pytest.mark.parametrize("name", ["t2t_vit_dense", "t2t_vit_16_ghost"])
def test_apply_fused_on_the_new_reference_models(name):
    model = reference_model(name, img_size=32, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    assert t2t_fast.apply_fused(model) is model
    assert isinstance(model.tokens_to_token, t2t_fast.models.FusedT2TModule) and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_dense_timm_methods_use_the_final_width():
    model = t2t_fast.create_model("t2t_vit_dense", img_size=32, num_classes=5)
    assert model.num_features == 584 and model.get_classifier().in_features == 584
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # published drop-path rule: every block of stage i drops with linspace(0, rate, 12)[i]
    model = t2t_fast.create_model("t2t_vit_dense", img_size=32, drop_path_rate=0.11)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks if hasattr(b, "drop_path")]
    assert rates == pytest.approx([0.0] * 3 + [0.01] * 6 + [0.02] * 6 + [0.03] * 4)


def test_ghost_needs_mlp_ratio_3():
    with pytest.raises(ValueError, match="mlp_ratio 3"):
        t2t_fast.create_model("t2t_vit_16_ghost", img_size=32, mlp_ratio=4.0)


def test_apply_fused_turns_on_our_unfused_t2t_module():
    model = t2t_fast.create_model("t2t_vit_t_14", img_size=32, depth=1, num_classes=3, fused=False).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert not model.tokens_to_token.fused
    t2t_fast.apply_fused(model)
    assert model.tokens_to_token.fused
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
