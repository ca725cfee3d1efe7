"""Backbone API, timm style: forward_intermediates, prune_intermediate_layers, features_only + feature_info,
group_matcher; T2T-ViT (token-layer outputs at strides 4 and 8, blocks at 16), the dense variant and TNT."""
import re

import pytest
import torch

import t2t_fast
from t2t_fast.models.features import feature_take_indices


def _nchw(tokens, h, w):
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return t2t_fast.create_model("t2t_vit_7", img_size=(64, 48), depth=3, num_classes=5).eval()


def test_take_indices():
    assert feature_take_indices(5) == ([0, 1, 2, 3, 4], 4)
    assert feature_take_indices(5, 2) == ([3, 4], 4)
    assert feature_take_indices(5, [0, -1]) == ([0, 4], 4)
    with pytest.raises(ValueError, match="out of range"):
        feature_take_indices(5, [5])
    with pytest.raises(ValueError, match="last 6"):
        feature_take_indices(5, 6)


def test_t2t_intermediates_shapes_and_values(small):
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, feats = small.forward_intermediates(x)
        tokens = small.forward_features(x)
        stages = small.tokens_to_token.forward_stages(x)
        normed = small.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        nlc = small.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 12), (2, 64, 8, 6)] + [(2, 256, 4, 3)] * 3
    assert [f["reduction"] for f in small.feature_info] == [4, 8, 16, 16, 16]
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(feats[0], _nchw(stages[0], 16, 12))
    torch.testing.assert_close(feats[1], _nchw(stages[1], 8, 6))
    torch.testing.assert_close(normed[0], _nchw(tokens[:, 1:], 4, 3))  # the last block, normalized
    (stage0, none), (last, cls) = nlc
    assert none is None and stage0.shape == (2, 192, 64) and last.shape == (2, 12, 256) and cls.shape == (2, 1, 256)
    with pytest.raises(ValueError, match="output_fmt"):
        small.forward_intermediates(x, output_fmt="NHWC")


def test_t2t_intermediates_fused_equals_unfused_and_stop_early():
    fused = t2t_fast.create_model("t2t_vit_t_14", img_size=32, depth=2, num_classes=3).eval()
    unfused = t2t_fast.create_model("t2t_vit_t_14", img_size=32, depth=2, num_classes=3, fused=False).eval()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = fused.forward_intermediates(x, intermediates_only=True)
        b = unfused.forward_intermediates(x, intermediates_only=True)
        early_final, early = fused.forward_intermediates(x, indices=[2], stop_early=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(early[0], a[2])
    assert early_final.shape == (1, 5, 384)


def test_prune_and_features_only(small):
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        full = small.forward_intermediates(x, intermediates_only=True)
    net = t2t_fast.create_model("t2t_vit_7", img_size=(64, 48), depth=3, num_classes=5, features_only=True,
                                out_indices=(1, 3))
    net.model.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith(("blocks.2", "head"))},
                              strict=False)
    net.eval()
    assert len(net.model.blocks) == 2 and isinstance(net.model.head, torch.nn.Identity)
    assert net.feature_info.channels() == [64, 256] and net.feature_info.reduction() == [8, 16]
    assert net.feature_info.module_name() == ["tokens_to_token.attention2", "blocks.1"]
    with torch.no_grad():
        maps = net(x)
    torch.testing.assert_close(maps[0], full[1])
    torch.testing.assert_close(maps[1], full[3])
    default = t2t_fast.create_model("t2t_vit_7", img_size=32, depth=2, features_only=True)
    assert default.feature_info.reduction() == [4, 8, 16] and len(default(torch.randn(1, 3, 32, 32))) == 3


def test_features_with_grad_checkpointing_backward():
    net = t2t_fast.create_model("t2t_vit_7", img_size=32, depth=2, features_only=True)
    net.model.set_grad_checkpointing(True, "all")
    maps = net(torch.randn(1, 3, 32, 32))
    sum(m.square().mean() for m in maps).backward()
    assert net.model.tokens_to_token.attention1.kqv.weight.grad is not None
    assert net.model.blocks[1].mlp.fc2.weight.grad is not None


def test_dense_and_tnt_features():
    dense = t2t_fast.create_model("t2t_vit_dense", img_size=32, features_only=True)
    assert dense.feature_info.channels() == [64, 64, 584]
    assert [tuple(m.shape) for m in dense(torch.randn(1, 3, 32, 32))] == [(1, 64, 8, 8), (1, 64, 4, 4), (1, 584, 2, 2)]
    tnt = t2t_fast.create_model("tnt_s_patch16_224", img_size=(32, 48), depth=2, features_only=True,
                                out_indices=(0, 1))
    assert [tuple(m.shape) for m in tnt(torch.randn(1, 3, 32, 48))] == [(1, 384, 2, 3)] * 2
    full = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=4).eval()
    with torch.no_grad():
        final, feats = full.forward_intermediates(torch.randn(1, 3, 32, 32), norm=True)
    torch.testing.assert_close(feats[-1], _nchw(final[:, 1:], 2, 2))


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_dense", "tnt_s_patch16_224"])
def test_group_matcher_covers_every_parameter_but_the_head(name):
    with torch.device("meta"):
        model = t2t_fast.create_model(name)
    groups = model.group_matcher()
    blocks = [re.compile(p) for p, _ in groups["blocks"]]
    for n, _ in model.named_parameters():
        hits = bool(re.match(groups["stem"], n)) + sum(bool(p.match(n)) for p in blocks)
        assert hits == (0 if n.startswith("head.") else 1), n
    assert re.match(model.group_matcher(coarse=True)["blocks"], "blocks.3.attn.proj.weight").group(1) == "3"


def test_feature_shapes_at_1024px():
    """Fused T2T at 1024 px (65536 tokens in the first token layer): the feature pyramid's shapes."""
    net = t2t_fast.create_model("t2t_vit_7", img_size=1024, depth=1, features_only=True).eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 1024, 1024))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 256, 256), (1, 64, 128, 128), (1, 256, 64, 64)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_layer_decay_scale():
    from t2t_fast.models.layers import layer_decay_lr_scale

    with torch.device("meta"):
        model = t2t_fast.create_model("t2t_vit_7")  # 7 blocks: layers 0 (stem) .. 8 (norm, head)
    scale = layer_decay_lr_scale(model, 0.5)
    assert scale("tokens_to_token.attention1.kqv.weight") == scale("cls_token") == 0.5 ** 8
    assert scale("blocks.0.attn.qkv.weight") == 0.5 ** 7 and scale("blocks.6.mlp.fc2.bias") == 0.5
    assert scale("norm.weight") == scale("head.weight") == 1.0
    with_base = layer_decay_lr_scale(model, 0.5, lambda n: 1.0 if n.startswith("head.") else 0.01)
    assert with_base("head.bias") == 1.0 and with_base("blocks.6.mlp.fc2.bias") == 0.005
    with pytest.raises(ValueError, match="layer decay"):
        layer_decay_lr_scale(model, 1.5)


def test_finetune_layer_decay_flag():
    from t2t_fast.train.config import resolve

    cfg = resolve(["--checkpoint", "c.pth", "--dataset", "cifar10", "--data", "/d", "--layer-decay", "0.75"],
                  "finetune")
    assert cfg.layer_decay == 0.75 and cfg.backbone_lr_scale == 0.01
    assert resolve(["--epochs", "1"]).layer_decay is None
