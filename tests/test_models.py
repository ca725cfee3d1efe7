"""The T2T-ViT family: fused vs reference logits, parameter counts, checkpoints, apply_fused, bad input."""
import argparse

import pytest
import torch

import t2t_fast
from t2t_fast import reference
from t2t_fast.models import FusedT2TModule
from t2t_fast.utils import tokens_to_image
from reference_models import check_fused_on_gpu, models_with_same_weights

T2T_NAMES = [n for n in t2t_fast.list_models("t2t_vit*")]


def test_registry_lists_every_variant():
    expect = {"t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14",
              "t2t_vit_t_19", "t2t_vit_t_24", "t2t_vit_c_14", "t2t_vit_14_wide", "t2t_vit_14_resnext",
              "t2t_vit_14_se", "t2t_vit_dense", "t2t_vit_16_ghost"}
    assert expect <= set(t2t_fast.list_models())
    with pytest.raises(ValueError, match="unknown model"):
        t2t_fast.create_model("t2t_vit_99")


@pytest.mark.parametrize("name, count", [("t2t_vit_7", 4_310_222), ("t2t_vit_14", 21_545_550)])
def test_parameter_counts_exact(name, count):
    model = t2t_fast.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name, millions", [("t2t_vit_10", 5.9), ("t2t_vit_12", 6.9), ("t2t_vit_19", 39.2),
                                            ("t2t_vit_24", 64.1), ("t2t_vit_t_14", 21.5), ("t2t_vit_t_19", 39.2),
                                            ("t2t_vit_t_24", 64.1)])
def test_parameter_counts_published(name, millions):
    model = t2t_fast.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_gpu_fused_matches_reference(name):
    check_fused_on_gpu(name)


@pytest.mark.parametrize("name", T2T_NAMES)
def test_fused_matches_reference_logits(name):
    """The reference model (t2t_fast.reference) against the production model, fused and not."""
    ref, fused, unfused = models_with_same_weights(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expect = ref(x)
        torch.testing.assert_close(fused(x), expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("img_size", [384, (160, 224)])
def test_fused_matches_reference_other_sizes(img_size):
    ref, fused, unfused = models_with_same_weights("t2t_vit_7", img_size=img_size)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fused.pos_embed.shape[1] == (h // 16) * (w // 16) + 1


@pytest.mark.parametrize("name", ["t2t_vit_t_14", "t2t_vit_7", "t2t_vit_16_ghost", "t2t_vit_dense"])
def test_fused_training_step_matches_reference_grads(name):
    kw = dict(img_size=(48, 32), num_classes=10)
    if name != "t2t_vit_dense":
        kw["depth"] = 2
    models = models_with_same_weights(name, **kw)
    x = torch.randn(2, 3, 48, 32)
    for m in models:
        m.train()
        for mod in m.modules():  # dropout off so all see the same function
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m(x).logsumexp(-1).sum().backward()
    ref_params = dict(models[0].named_parameters())
    for model in models[1:]:
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def test_published_layout_state_dict_keys():
    keys = set(t2t_fast.create_model("t2t_vit_14").state_dict())
    for k in ("tokens_to_token.attention1.kqv.weight", "tokens_to_token.attention1.w", "tokens_to_token.attention1.norm1.weight",
              "tokens_to_token.attention1.mlp.0.weight", "tokens_to_token.attention1.mlp.2.bias",
              "tokens_to_token.attention2.proj.weight", "tokens_to_token.project.weight", "cls_token", "pos_embed",
              "blocks.13.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.bias"):
        assert k in keys, k
    assert "blocks.0.attn.qkv.bias" not in keys
    tkeys = set(t2t_fast.create_model("t2t_vit_t_14").state_dict())
    assert {"tokens_to_token.attention1.attn.qkv.weight", "tokens_to_token.attention1.mlp.fc1.weight"} <= tkeys
    assert "tokens_to_token.attention1.attn.qkv.bias" not in tkeys
    se = set(t2t_fast.create_model("t2t_vit_14_se").state_dict())
    assert {"blocks.0.attn.se_layer.fc.0.weight", "blocks.0.attn.se_layer.fc.2.weight"} <= se
    assert set(reference.T2TViT(tokens_type="performer", embed_dim=384, depth=14, num_heads=6,
                                mlp_ratio=3.0).state_dict()) == keys


def test_frozen_parameters_and_no_weight_decay():
    model = t2t_fast.create_model("t2t_vit_7")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert model.no_weight_decay() == {"cls_token"}
    torch.testing.assert_close(model.pos_embed, reference.sinusoid_table(197, 256))
    w = model.tokens_to_token.attention1.w  # orthogonal rows times sqrt(m)
    torch.testing.assert_close(w @ w.t(), 32.0 * torch.eye(32), rtol=1e-4, atol=1e-4)


def test_timm_style_methods():
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 5, 256)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.head
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=7)
    model.set_grad_checkpointing(True, "all")
    model(x).sum().backward()
    assert model.tokens_to_token.attention1.kqv.weight.grad is not None
    with pytest.raises(ValueError, match="modules must be"):
        model.set_grad_checkpointing(True, "heads")


def test_grad_checkpointing_gives_same_grads():
    torch.manual_seed(1)
    a = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=4, drop_rate=0.0)
    b = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=4)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    b.set_grad_checkpointing(True, "all")
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "state_dict_ema", "model", "module_prefix", "file"])
def test_checkpoint_round_trip(wrap, tmp_path):
    src = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=5).eval()
    sd = src.state_dict()
    ckpt = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "state_dict_ema": {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd},
        "model": {"model": sd, "optimizer": {}},
        "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "file": {"state_dict": sd, "args": argparse.Namespace(model="t2t_vit_7"), "epoch": 1},
    }[wrap]
    if wrap == "file":
        path = tmp_path / "ckpt.pth.tar"
        torch.save(ckpt, path)
        ckpt = str(path)
    dst = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=5).eval()
    t2t_fast.load_checkpoint(dst, ckpt)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    if wrap == "file":
        assert torch.equal(t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=5, pretrained=ckpt).head.weight,
                           src.head.weight)


def test_checkpoint_pos_embed_resize_and_errors():
    src = t2t_fast.create_model("t2t_vit_7", num_classes=5)
    dst = t2t_fast.create_model("t2t_vit_7", img_size=(64, 48), num_classes=5)
    t2t_fast.load_checkpoint(dst, src.state_dict())
    torch.testing.assert_close(dst.pos_embed, reference.sinusoid_table(1 + 4 * 3, 256))
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    sd = src.state_dict()
    with pytest.raises(ValueError, match="head.weight"):
        t2t_fast.load_checkpoint(t2t_fast.create_model("t2t_vit_7", num_classes=9), sd)
    with pytest.raises(ValueError, match="missing keys: .*blocks.7"):
        t2t_fast.load_checkpoint(t2t_fast.create_model("t2t_vit_10", num_classes=5), sd)
    with pytest.raises(ValueError, match="unexpected keys"):
        t2t_fast.load_checkpoint(src, dict(sd, extra=torch.zeros(1)))
    with pytest.raises(ValueError, match="no file"):
        t2t_fast.load_checkpoint(src, "/nonexistent/ckpt.pth")
    other = t2t_fast.create_model("t2t_vit_7", num_classes=9)
    t2t_fast.load_checkpoint(other, sd, strict=False)  # head skipped, the rest loaded
    torch.testing.assert_close(other.norm.weight, src.norm.weight)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_apply_fused_on_published_layout(tokens_type):
    model = reference.T2TViT(img_size=32, tokens_type=tokens_type, num_classes=4, embed_dim=64, depth=2,
                             num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    w = model.tokens_to_token.attention1.kqv.weight if tokens_type == "performer" else \
        model.tokens_to_token.attention1.attn.qkv.weight
    out = t2t_fast.apply_fused(model)
    assert out is model and isinstance(model.tokens_to_token, FusedT2TModule)
    assert list(model.state_dict()) == keys
    fused_w = model.tokens_to_token.attention1
    assert (fused_w.kqv.weight if tokens_type == "performer" else fused_w.attn.qkv.weight) is w
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert t2t_fast.apply_fused(model) is model  # idempotent
    with pytest.raises(ValueError, match="no Tokens-to-Token module"):
        t2t_fast.apply_fused(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("fused", [True, False])
def test_model_bad_input(fused):
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3, fused=fused)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="dtype"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        t2t_fast.create_model("t2t_vit_7", img_size=40)
    with pytest.raises(ValueError, match="tokens"):
        tokens_to_image(torch.randn(1, 10, 4), (3, 3))


def test_autocast_forward_runs_in_bf16():
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with torch.no_grad():
        torch.testing.assert_close(y.float(), model(x), rtol=0.1, atol=0.1)


def test_timm_registration_with_stub(monkeypatch):
    import sys
    import types

    registered = {}
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_models.register_model = lambda fn: registered.setdefault(fn.__name__, fn)
    timm_models.is_model = lambda name: False
    timm.models = timm_models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm_models)
    from t2t_fast.models import register_timm

    register_timm(["t2t_vit_7"])
    model = registered["t2t_vit_7"](pretrained=False, num_classes=2, img_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
