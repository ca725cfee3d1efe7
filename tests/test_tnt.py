"""TNT models: parameter counts, timm key layout, fused vs reference, checkpoints, timm-style methods, bad input.

Kept fast on CPU: full-size models are only built on the meta device; numeric tests use the real TNT-S/B
widths with few blocks at small image sizes (any multiple of 16 works, also H != W).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import t2t_fast
from t2t_fast import reference
from t2t_fast.backends import backends
from t2t_fast.models.registry import _MODELS
from t2t_fast.models.tnt import TNT, PixelEmbed
from reference_models import check_fused_on_gpu, models_with_same_weights

NAMES = ("tnt_s_patch16_224", "tnt_b_patch16_224")
SPEC_PARAMS = {"tnt_s_patch16_224": 23.8e6, "tnt_b_patch16_224": 65.6e6}
EXACT_PARAMS = {"tnt_s_patch16_224": 23_768_584, "tnt_b_patch16_224": 65_428_680}


def _soft_split_backends() -> list[str]:
    """Backends that implement soft_split here, besides auto (which picks the reference on a bare CPU)."""
    names = []
    if backends()["cpu"]:
        names.append("cpu")
    if backends()["triton"] and importlib.util.find_spec("t2t_fast.kernels.soft_split") is not None:
        names.append("triton")
    return names


@pytest.fixture(scope="module")
def small():
    """TNT-S widths, 2 blocks, 10 classes, 32x32 (2x2 patches)."""
    torch.manual_seed(1)
    return t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10).eval()


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    with torch.device("meta"):
        model = t2t_fast.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n:,} parameters")
    assert n == EXACT_PARAMS[name]
    # the paper's counts come from the official code, which also holds an unused frozen `outer_tokens`
    # (1, 196, D) parameter (timm drops it, and so do we: checkpoint_filter removes it)
    assert abs(n + 196 * model.embed_dim - SPEC_PARAMS[name]) < 0.05e6
    assert abs(n - SPEC_PARAMS[name]) < 0.2e6


def test_state_dict_is_timms_layout():
    with torch.device("meta"):
        sd = t2t_fast.create_model("tnt_s_patch16_224").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expect = {
        "cls_token": (1, 1, 384), "patch_pos": (1, 197, 384), "pixel_pos": (1, 24, 4, 4),
        "pixel_embed.proj.weight": (24, 3, 7, 7), "pixel_embed.proj.bias": (24,),
        "norm1_proj.weight": (384,), "proj.weight": (384, 384), "proj.bias": (384,), "norm2_proj.bias": (384,),
        "blocks.0.norm_in.weight": (24,), "blocks.0.attn_in.qk.weight": (48, 24), "blocks.0.attn_in.v.weight": (24, 24),
        "blocks.0.attn_in.proj.weight": (24, 24), "blocks.0.attn_in.proj.bias": (24,),
        "blocks.0.norm_mlp_in.weight": (24,), "blocks.0.mlp_in.fc1.weight": (96, 24), "blocks.0.mlp_in.fc2.weight": (24, 96),
        "blocks.0.norm1_proj.weight": (384,), "blocks.0.proj.weight": (384, 384), "blocks.0.norm2_proj.weight": (384,),
        "blocks.0.norm_out.weight": (384,), "blocks.0.attn_out.qk.weight": (768, 384),
        "blocks.0.attn_out.v.weight": (384, 384), "blocks.0.attn_out.proj.bias": (384,), "blocks.0.norm_mlp.bias": (384,),
        "blocks.0.mlp.fc1.weight": (1536, 384), "blocks.0.mlp.fc2.weight": (384, 1536), "blocks.11.mlp.fc2.bias": (384,),
        "norm.weight": (384,), "head.weight": (1000, 384), "head.bias": (1000,),
    }
    for k, shape in expect.items():
        assert shapes.get(k) == shape, k
    # no qkv biases, no bias on the blocks' words-to-patch proj; 12 blocks of 29 tensors + 15 others
    assert not any(k.endswith(("qk.bias", "attn_in.v.bias", "attn_out.v.bias")) for k in sd)
    assert "blocks.0.proj.bias" not in sd and len(sd) == 12 * 29 + 15


def test_pixel_embedding_pads_each_patch():
    """Words come from a convolution of each patch by itself: no window sees the neighbouring patch."""
    embed = reference.TNTPixelEmbed(16, 3, 8, 4)
    x, pos = torch.randn(2, 3, 32, 48), torch.randn(1, 8, 4, 4)
    words = embed(x, pos).reshape(2, 2, 3, 16, 8)
    for i in range(2):
        for j in range(3):
            patch = x[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
            expect = (embed.proj(patch) + pos).flatten(2).transpose(1, 2)
            torch.testing.assert_close(words[:, i, j], expect, rtol=1e-5, atol=1e-5)
    whole = (embed.proj(x)[:, :, 4:8, 4:8] + pos).flatten(2).transpose(1, 2)  # the whole-image conv leaks
    assert not torch.allclose(words[:, 1, 1], whole, atol=1e-3)
    for fused in (True, False):
        ours = PixelEmbed(16, 3, 8, 4, fused=fused)
        ours.load_state_dict(embed.state_dict())
        torch.testing.assert_close(ours(x, pos), embed(x, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,depth", [("tnt_s_patch16_224", 2), ("tnt_b_patch16_224", 1)])
def test_fused_matches_reference_fwd_bwd(name, depth):
    """t2t_fast.reference's TNT against the production model, fused and not: logits and every gradient."""
    ref, *ours = models_with_same_weights(name, img_size=(32, 48), depth=depth, num_classes=10)
    x = torch.randn(2, 3, 32, 48)
    out_ref = ref(x)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    ref_grads = dict(ref.named_parameters())
    for model in ours:
        out = model(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out.backward(g)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", _soft_split_backends())
def test_fused_on_soft_split_backends(backend, poisoned):
    """The fused TNT on every soft split implementation (tiny widths: Triton's CPU interpreter is slow)."""
    kw = dict(img_size=(32, 16), embed_dim=32, inner_dim=8, depth=1, num_heads=2, num_classes=5)
    fused, ref = TNT(**kw), reference.TNT(**kw)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 16)
    with t2t_fast.backend(backend):
        out = fused(x)
        out.sum().backward()
    out_ref = ref(x)
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def test_timm_style_methods(small):
    x = torch.randn(2, 3, 32, 32)
    assert small.no_weight_decay() == {"patch_pos", "pixel_pos", "cls_token"}
    assert small.get_classifier() is small.head
    feats = small.forward_features(x)
    assert feats.shape == (2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_head(feats, pre_logits=True), feats[:, 0])
        torch.testing.assert_close(small(x), small.head(feats[:, 0]))
    assert small.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and small.pretrained_cfg["first_conv"] == "pixel_embed.proj"
    for name in NAMES:
        assert _MODELS[name].timm_name is False  # timm has TNT models of these names: never re-registered
    model = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 384)


def test_grad_checkpointing_same_grads():
    model = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_trainer_kwargs():
    """What ``t2t-fast train --model tnt_s_patch16_224`` passes to create_model."""
    model = t2t_fast.create_model("tnt_s_patch16_224", img_size=48, num_classes=7, drop_path_rate=0.1, in_chans=1,
                                  fused=True, depth=2).train()
    assert model.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    loss = F.cross_entropy(model(torch.randn(3, 1, 48, 48)), torch.tensor([0, 3, 6]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "state_dict_ema", "model", "module", "file"])
def test_checkpoint_round_trip(small, wrap, tmp_path):
    sd = small.state_dict()
    ckpt = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "state_dict_ema": {"state_dict_ema": sd, "state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}},
        "model": {"model": sd},
        "module": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "file": {"state_dict": sd},
    }[wrap]
    if wrap == "file":
        torch.save(ckpt, tmp_path / "tnt.pth")
        ckpt = tmp_path / "tnt.pth"
    fresh = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10, pretrained=ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), rtol=0, atol=0)


def test_official_checkpoint_names_load(small):
    """The official TNT code's keys (outer_pos, inner_pos (1, 16, c), proj_norm1, inner_attn, ...) load."""
    rename = {v: k for k, v in t2t_fast.models.tnt._OFFICIAL_NAMES.items()}
    official = {".".join(rename.get(p, p) for p in k.split(".")): v for k, v in small.state_dict().items()}
    official["inner_pos"] = official["inner_pos"].flatten(2).transpose(1, 2)
    official["outer_tokens"] = torch.zeros(1, 4, 384)
    assert "blocks.0.inner_attn.qk.weight" in official and "proj_norm1.weight" in official
    fresh = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    t2t_fast.load_checkpoint(fresh, {"state_dict": official})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), rtol=0, atol=0)


def test_patch_pos_resize(small):
    sd = dict(small.state_dict())
    sd["patch_pos"] = torch.cat((torch.randn(1, 1, 384), torch.full((1, 4, 384), 0.25)), dim=1)
    big = t2t_fast.create_model("tnt_s_patch16_224", img_size=(48, 64), depth=2, num_classes=10)
    t2t_fast.load_checkpoint(big, sd)
    assert big.patch_pos.shape == (1, 13, 384)
    torch.testing.assert_close(big.patch_pos[:, 0], sd["patch_pos"][:, 0], rtol=0, atol=0)  # class token kept
    torch.testing.assert_close(big.patch_pos[:, 1:], torch.full((1, 12, 384), 0.25))  # a constant stays constant
    assert big(torch.randn(1, 3, 48, 64)).shape == (1, 10)
    down = t2t_fast.create_model("tnt_s_patch16_224", img_size=16, depth=2, num_classes=10)
    t2t_fast.load_checkpoint(down, big.state_dict() | {"patch_pos": torch.randn(1, 10, 384)})  # 3x3 -> 1x1
    with pytest.raises(ValueError, match="patch_pos"):  # a 2x3 grid is not square: cannot tell its shape
        t2t_fast.load_checkpoint(down, big.state_dict() | {"patch_pos": torch.randn(1, 7, 384)})


def test_bad_inputs(small):
    with pytest.raises(ValueError, match="channels"):
        small(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="img_size"):
        small(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="dtype"):
        small(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="on meta"):
        small(torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        small(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        t2t_fast.create_model("tnt_s_patch16_224", img_size=40)
    with pytest.raises(ValueError, match="num_heads"):
        t2t_fast.create_model("tnt_s_patch16_224", img_size=32, num_heads=5)
    with pytest.raises(ValueError, match="inner_num_heads"):
        t2t_fast.create_model("tnt_s_patch16_224", img_size=32, inner_num_heads=5)
    with pytest.raises(ValueError, match="missing keys"):
        t2t_fast.load_checkpoint(small, {k: v for k, v in small.state_dict().items() if k != "pixel_pos"})


def test_autocast_bf16_close_to_fp32(small):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = small(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = small(x)
    torch.testing.assert_close(out.float(), expect, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_fused_matches_reference(name):
    check_fused_on_gpu(name)
