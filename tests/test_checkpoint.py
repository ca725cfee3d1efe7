"""``load_checkpoint`` on bad files (one ValueError naming the path and what it holds) and on checkpoints of
another model (a short summary, the full lists on the exception); ``register_timm`` without timm."""
import sys

import pytest
import torch

import t2t_fast
from t2t_fast.checkpoint import CheckpointMismatchError, describe_state_dict


class NotWeights:  # pickled by torch.save, refused by weights-only loading
    pass


def _zip_checkpoint(path):
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, path)
    return path.read_bytes()


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "an empty file"),
    "garbage": (lambda p: p.write_bytes(b"\x80\x02garbage bytes"), "a Python pickle, not a PyTorch checkpoint"),
    "text": (lambda p: p.write_text("epoch,loss\n1,0.5\n"), "a text file ('epoch,loss'...), not a PyTorch"),
    "random": (lambda p: p.write_bytes(bytes(range(7, 256)) * 16), "not a PyTorch checkpoint (unrecognized"),
    "truncated": (lambda p: p.write_bytes(_zip_checkpoint(p)[:3000]), "a truncated or corrupt PyTorch checkpoint"),
    "legacy_truncated": (lambda p: (torch.save({"w": torch.randn(64, 64)}, p, _use_new_zipfile_serialization=False),
                                    p.write_bytes(p.read_bytes()[:500])),
                         "a truncated or corrupt PyTorch checkpoint (legacy format"),
    "objects": (lambda p: torch.save({"state_dict": NotWeights()}, p), "NotWeights object, which weights-only"),
    "safetensors": (lambda p: p.write_bytes((20).to_bytes(8, "little") + b'{"__metadata__":{}} ' + bytes(16)),
                    "a safetensors file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_one_value_error_naming_path_and_content(tmp_path, kind):
    write, found = BAD_FILES[kind]
    path = tmp_path / f"{kind}.pth"
    write(path)
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3)
    with pytest.raises(ValueError) as exc:
        t2t_fast.load_checkpoint(model, str(path))
    msg = str(exc.value)
    assert type(exc.value) is ValueError
    assert str(path) in msg and found in msg, msg
    assert "weights_only=False" not in msg and "weights_only" not in msg  # never advice to disable it
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no torch traceback behind it


def test_missing_path_and_directory(tmp_path):
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="no file at .*nope.pth"):
        t2t_fast.load_checkpoint(model, str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="is a directory"):
        t2t_fast.load_checkpoint(model, str(tmp_path))


def test_another_models_checkpoint_is_summarized(tmp_path):
    big = t2t_fast.create_model("t2t_vit_14")
    path = tmp_path / "t14.pth"
    torch.save({"model": "t2t_vit_14", "state_dict": big.state_dict()}, path)
    small = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=10)
    with pytest.raises(CheckpointMismatchError) as exc:
        t2t_fast.load_checkpoint(small, str(path))
    e, msg = exc.value, str(exc.value)
    assert isinstance(e, ValueError)
    assert len(msg) < 1200, len(msg)  # a summary, not every key name
    assert f"checkpoint {str(path)!r} does not fit T2TViT" in msg
    assert f"{len(e.unexpected)} unexpected keys: blocks.7." in msg and "... (" in msg
    assert f"{len(e.mismatched)} keys of another shape" in msg and "blocks.0.attn.proj.bias (384,) vs (256,)" in msg
    assert ("shapes suggest a T2T-ViT (performer tokens-to-token) with 14 blocks of width 384, 1000 classes, "
            "img_size 224 (saved for 't2t_vit_14')") in msg
    assert "the model is a T2T-ViT (performer tokens-to-token) with 7 blocks of width 256, 10 classes, img_size 32" \
        in msg
    # the full lists stay on the exception
    assert len(e.unexpected) == 7 * len([k for k in big.state_dict() if k.startswith("blocks.0.")])
    assert e.mismatched["head.weight"] == ((1000, 384), (10, 256)) and not e.missing
    # fewer blocks in the checkpoint than in the model: missing keys, natural order (blocks.7 before blocks.10)
    with pytest.raises(CheckpointMismatchError) as exc:
        t2t_fast.load_checkpoint(t2t_fast.create_model("t2t_vit_19"), big.state_dict())
    assert exc.value.missing[0].startswith("blocks.14.") and "missing keys: blocks.14." in str(exc.value)


def test_exclude_keeps_the_models_own_keys():
    src = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=8)
    dst = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3)
    head = dst.head.weight.clone()
    t2t_fast.load_checkpoint(dst, src.state_dict(), exclude=("head.",))
    assert torch.equal(dst.head.weight, head) and torch.equal(dst.cls_token, src.cls_token)


def test_describe_state_dict_tnt_and_transformer_t2t():
    tnt = t2t_fast.create_model("tnt_s_patch16_224", img_size=32, num_classes=4).state_dict()
    assert describe_state_dict(tnt) == "a TNT with 12 blocks of width 384, 4 classes, img_size 32"
    t = t2t_fast.create_model("t2t_vit_t_14", img_size=48, num_classes=5).state_dict()
    assert describe_state_dict(t).startswith("a T2T-ViT (transformer tokens-to-token) with 14 blocks of width 384")
    assert describe_state_dict({"w": torch.zeros(2)}) == "a model"


def test_register_timm_without_timm_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ModuleNotFoundError, match="pip install timm") as exc:
        t2t_fast.models.register_timm()
    assert exc.value.name == "timm"
