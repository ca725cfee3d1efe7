"""create_model(name, pretrained=True): pretrained_cfg per model and tag, torch.hub's cache, hash checks, errors.

No network: the weights are checkpoints this test writes, reached through file:// URLs or a local file;
torch.hub's cache lives in the test's temporary folder.
"""
import argparse
import hashlib
import math

import pytest
import torch

import t2t_fast
from t2t_fast.models.pretrained import PRETRAINED_CFGS, RELEASES

SMALL = dict(img_size=32)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def published_file(tmp_path):
    """A t2t_vit_7 checkpoint written as the published ones are: EMA weights beside the training args."""
    src = t2t_fast.create_model("t2t_vit_7", **SMALL).eval()
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save({"state_dict_ema": src.state_dict(), "args": argparse.Namespace(model="t2t_vit_7")}, path)
    return src, path


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_url_through_the_hub_cache(hub_dir, published_file):
    src, path = published_file
    model = t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(url=path.as_uri()),
                                  **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    cached = hub_dir / "checkpoints" / path.name
    assert cached.is_file()
    path.unlink()  # the second call reads the cache
    again = t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(url=path.as_uri()),
                                  **SMALL)
    assert torch.equal(again.head.weight, src.head.weight)
    assert again.pretrained_cfg["url"] == path.as_uri() and again.pretrained_cfg["tag"] == "in1k"


def test_sha256_checked_and_corrupted_download_rejected(hub_dir, published_file, tmp_path):
    src, path = published_file
    good = t2t_fast.create_model("t2t_vit_7", pretrained=True, **SMALL,
                                 pretrained_cfg_overlay=dict(url=path.as_uri(), sha256=_sha256(path)))
    assert torch.equal(good.head.weight, src.head.weight)
    bad = tmp_path / "corrupt" / "weights.pth"
    bad.parent.mkdir()
    bad.write_bytes(path.read_bytes()[:-100] + b"x" * 100)  # a truncated / damaged download
    with pytest.raises(ValueError, match=r"SHA-256 .* expected " + _sha256(path)):
        t2t_fast.create_model("t2t_vit_7", pretrained=True, **SMALL,
                              pretrained_cfg_overlay=dict(url=bad.as_uri(), sha256=_sha256(path)))
    assert not (hub_dir / "checkpoints" / "weights.pth").exists()  # removed: the next call downloads again
    with pytest.raises(ValueError, match="could not read the checkpoint downloaded from file://"):
        t2t_fast.create_model("t2t_vit_7", pretrained=True, **SMALL, pretrained_cfg_overlay=dict(url=bad.as_uri()))


@pytest.mark.parametrize("url", ["file:///nonexistent/t2t/71.7_T2T_ViT_7.pth.tar",
                                 "http://127.0.0.1:9/71.7_T2T_ViT_7.pth.tar"])
def test_unreachable_url_names_it_and_the_manual_path(hub_dir, url):
    with pytest.raises(RuntimeError, match="could not download") as info:
        t2t_fast.create_model("t2t_vit_7", pretrained=True, **SMALL, pretrained_cfg_overlay=dict(url=url))
    assert url in str(info.value) and "t2t_fast.load_checkpoint(model, PATH)" in str(info.value)
    assert "pretrained_cfg_overlay=dict(file=PATH)" in str(info.value)


def test_local_file_overlay_and_another_head(hub_dir, published_file):
    src, path = published_file
    model = t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    five = t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 num_classes=5, **SMALL)
    assert five.head.weight.shape == (5, 256) and torch.equal(five.norm.weight, src.norm.weight)
    bare = t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 num_classes=0, **SMALL)
    assert isinstance(bare.head, torch.nn.Identity)
    assert not (hub_dir / "checkpoints").exists()  # a local file is read where it is
    with pytest.raises(ValueError, match="does not exist"):
        t2t_fast.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=path.parent / "x"))


def test_tags_and_published_cfgs():
    with torch.device("meta"):
        m384 = t2t_fast.create_model("t2t_vit_14.in1k_384")
        cifar = t2t_fast.create_model("t2t_vit_19.cifar100")
        default = t2t_fast.create_model("t2t_vit_14")
    assert m384.img_size == (384, 384) and m384.pos_embed.shape == (1, 577, 384)
    assert m384.pretrained_cfg["url"] == RELEASES + "83.3_T2T_ViT_14.pth.tar"
    assert m384.pretrained_cfg["input_size"] == (3, 384, 384) and m384.pretrained_cfg["tag"] == "in1k_384"
    assert cifar.num_classes == 100 and cifar.pretrained_cfg["url"].endswith("cifar100_t2t-vit-19_89.0.pth")
    assert default.pretrained_cfg["url"].endswith("81.5_T2T_ViT_14.pth.tar")
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes", "qk_scale", "sha256"):
        assert key in default.pretrained_cfg, key
    files = [cfg["url"].rsplit("/", 1)[1] for tags in PRETRAINED_CFGS.values() for cfg in tags.values()]
    assert len(files) == 15 and len(set(files)) == 15
    with pytest.raises(ValueError, match="unknown pretrained tag 'in22k'.*t2t_vit_14.in1k_384"):
        t2t_fast.create_model("t2t_vit_14.in22k")
    with pytest.raises(ValueError, match="unknown model"):
        t2t_fast.create_model("t2t_vit_99.in1k")


def test_qk_scale_default_and_override():
    with torch.device("meta"):
        default = t2t_fast.create_model("t2t_vit_14")
        overlay = t2t_fast.create_model("t2t_vit_14", pretrained_cfg_overlay=dict(qk_scale=384 ** -0.5))
        kwarg = t2t_fast.create_model("t2t_vit_14", qk_scale=0.125, pretrained_cfg_overlay=dict(qk_scale=0.5))
    assert math.isclose(default.blocks[0].attn.scale, 64 ** -0.5)  # head_dim ** -0.5, as the weights were trained
    assert math.isclose(overlay.blocks[0].attn.scale, 384 ** -0.5)
    assert kwarg.blocks[0].attn.scale == 0.125


def test_model_without_published_weights(hub_dir):
    with torch.device("meta"):
        tnt = t2t_fast.create_model("tnt_s_patch16_224")
    assert tnt.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and tnt.pretrained_cfg["url"] is None
    with pytest.raises(ValueError, match="no published weights are known for tnt_s_patch16_224"):
        t2t_fast.create_model("tnt_s_patch16_224", pretrained=True, img_size=32, depth=1)


def test_finetune_from_published_weights(hub_dir, published_file, tmp_path, monkeypatch):
    """``t2t-fast finetune --pretrained [TAG]``: the published weights through the hub cache, a new head."""
    from t2t_fast.train import finetune
    from t2t_fast.train.config import ConfigError, resolve

    src, path = published_file
    monkeypatch.setitem(PRETRAINED_CFGS["t2t_vit_7"], "in1k", dict(PRETRAINED_CFGS["t2t_vit_7"]["in1k"],
                                                                  url=path.as_uri()))
    base = ["--model", "t2t_vit_7", "--img-size", "32", "--num-classes", "4", "--train-samples", "16",
            "--val-samples", "8", "-b", "8", "--epochs", "1", "--workers", "0", "--log-interval", "1000"]
    with pytest.raises(ConfigError, match="either --checkpoint PATH or --pretrained"):
        resolve(base, "finetune")
    with pytest.raises(ConfigError, match="not both"):
        resolve(base + ["--pretrained", "--checkpoint", str(path)], "finetune")
    with pytest.raises(ConfigError, match="--pretrained: unknown pretrained tag 'nope'"):
        finetune(base + ["--pretrained", "nope", "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()  # checked before the run folder is made

    out = tmp_path / "ft"
    summary = finetune(base + ["--pretrained", "--output", str(out), "--seed", "7"])
    assert summary["num_classes"] == 4 and (hub_dir / "checkpoints" / path.name).is_file()
    trained = torch.load(out / "last.pth", map_location="cpu", weights_only=False)["state_dict"]
    frozen = "tokens_to_token.attention1.w"  # never optimized: still the published file's
    assert torch.equal(trained[frozen], src.state_dict()[frozen])
