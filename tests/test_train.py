"""Training: built-in data, augmentation, schedule, exact resume, crash-safe checkpoints, DDP, bad input.

Every run here is tiny (t2t_vit_7 at 32 px, a few dozen images) so the file takes well under a minute or two.
"""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import t2t_fast
from t2t_fast.train import TrainingDiverged, augment, checkpoint_io, data, engine, finetune, optim, synthetic, train
from t2t_fast.train.config import resolve

TINY = ["--train-samples", "32", "--val-samples", "16", "-b", "8", "--epochs", "1", "--no-model-ema",
        "--log-interval", "1000"]
SMALL_MODEL = ["--model", "t2t_vit_7", "--img-size", "32", "--aa", "none", "--mixup", "0", "--cutmix", "0",
               "--reprob", "0", "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "-b", "4",
               "--workers", "0", "--no-model-ema", "--log-interval", "1000"]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _write_png(path, seed, size=24):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------------
def test_builtin_dataset_is_deterministic_and_balanced():
    x1, y1 = synthetic.generate(64, 32, seed=5, num_classes=8)
    x2, y2 = synthetic.generate(64, 32, seed=5, num_classes=8)
    x3, _ = synthetic.generate(64, 32, seed=6, num_classes=8)
    assert x1.dtype == torch.uint8 and x1.shape == (64, 3, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.bincount(y1, minlength=8).tolist() == [8] * 8
    assert x1.float().std() > 20  # real patterns, not flat images
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.generate(8, 32, 0, num_classes=9)


def test_train_transform_is_a_function_of_the_seed():
    img = synthetic.generate(1, 48, 0)[0][0]
    tf = augment.TrainTransform((32, 32), (0.5,) * 3, (0.25,) * 3, aa="rand-m9-mstd0.5-inc1", reprob=0.5)
    a = tf(img, torch.Generator().manual_seed(3))
    b = tf(img, torch.Generator().manual_seed(3))
    c = tf(img, torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    ev = augment.EvalTransform((32, 32), (0.5,) * 3, (0.25,) * 3, crop_pct=0.875)(img)
    assert ev.shape == (3, 32, 32)


def test_rand_augment_ops_keep_range_and_shape():
    img = synthetic.generate(1, 32, 1)[0][0].float()
    ra = augment.RandAugment(augment.parse_rand_augment("rand-m9-mstd0.5-inc1"), (124, 116, 104))
    g = torch.Generator().manual_seed(0)
    for name, op in ra.ops:
        out = op(img.clone(), 0.9, g)
        assert out.shape == img.shape, name
        assert out.min() >= 0 and out.max() <= 255, name
    assert augment.parse_rand_augment("none") is None
    spec = augment.parse_rand_augment("rand-m7-n3-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (7, 3, 0.5, True)
    with pytest.raises(ValueError, match="--aa"):
        augment.parse_rand_augment("auto-v0")
    # equalize spreads a low-contrast image over the whole range
    flat = torch.linspace(100, 120, 32 * 32).view(1, 32, 32).expand(3, -1, -1).contiguous()
    eq = augment.equalize(flat)
    assert eq.min() < 20 and eq.max() > 230


def test_mixup_cutmix_targets():
    mix = augment.MixupCutmix(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    for seed in range(6):
        xm, t = mix(x, y, np.random.default_rng(seed))
        assert xm.shape == x.shape and t.shape == (6, 4)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
    plain = augment.MixupCutmix(4, 0.0, 0.0, smoothing=0.1).soft_targets(y)
    assert plain[0, 0].item() == pytest.approx(0.925) and plain[0, 1].item() == pytest.approx(0.025)


def test_param_groups_and_schedule():
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=3)
    groups = optim.param_groups(model, 0.05, model.no_weight_decay())
    names = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert "tokens_to_token.attention1.w" not in names and "pos_embed" not in names  # frozen
    assert names["cls_token"] == 0.0 and names["head.bias"] == 0.0 and names["norm.weight"] == 0.0
    assert names["blocks.0.attn.qkv.weight"] == 0.05 and names["head.weight"] == 0.05
    scaled = optim.param_groups(model, 0.0, lr_scale=lambda n: 1.0 if n.startswith("head.") else 0.01)
    assert {g["lr_scale"] for g in scaled} == {1.0, 0.01}

    opt = optim.build_optimizer("adamw", groups, lr=1e-3)
    assert not opt.defaults["fused"]  # CPU parameters: the default implementation (fused only on CUDA)
    sched = optim.CosineSchedule(opt, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, main_steps=110)
    assert sched.lr_at(0) == pytest.approx(1e-6)
    assert sched.lr_at(10) == pytest.approx(1e-3)
    assert sched.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert sched.lr_at(110) == pytest.approx(1e-5) and sched.lr_at(500) == pytest.approx(1e-5)  # cooldown
    lrs = [sched.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_sampler_resume_and_shards():
    s = data.TrainSampler(n=21, batch_size=2, rank=0, world=1, seed=1)
    s.set_epoch(3)
    full = list(s)
    assert len(full) == 20 and len({i for i, _ in full}) == 20
    s.set_epoch(3, start=8)
    assert list(s) == full[8:]
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in full]
    # two ranks: disjoint, together the padded epoch order
    r0, r1 = (data.TrainSampler(21, 2, r, 2, 1) for r in (0, 1))
    for r in (r0, r1):
        r.set_epoch(0)
    i0, i1 = [i for i, _ in r0], [i for i, _ in r1]
    assert len(i0) == len(i1) == 10
    order = r0.order().tolist()
    assert i0 == order[0::2][:10] and i1 == order[1::2][:10]
    ev = [list(data.EvalSampler(5, r, 2)) for r in (0, 1)]
    assert sorted(i for part in ev for i, _ in part) == list(range(5))


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    checkpoint_io.atomic_save({"step": torch.tensor(1)}, path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_io.torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        checkpoint_io.atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert os.listdir(tmp_path) == ["last.pth"]
    # a writer killed before the rename leaves a .tmp behind: it is never picked up
    (tmp_path / "last.pth.tmp").write_bytes(b"garbage")
    assert checkpoint_io.latest_checkpoint(str(tmp_path)) == path


def test_rng_state_roundtrip():
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = checkpoint_io.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint_io.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_config_presets_and_overrides():
    quick = resolve([])
    assert quick.preset == "builtin" and quick.model == "t2t_vit_7" and quick.img_size == 32
    assert quick.mixup == 0 and quick.aa == "none" and quick.weight_decay == 0.03
    paper = resolve(["--data", "/x"])
    assert paper.preset == "imagenet" and paper.dataset == "folder"
    assert (paper.model, paper.lr, paper.weight_decay, paper.epochs, paper.cooldown_epochs) == \
        ("t2t_vit_14", 1e-3, 0.05, 300, 10)
    assert (paper.mixup, paper.cutmix, paper.reprob, paper.smoothing, paper.model_ema_decay) == \
        (0.8, 1.0, 0.25, 0.1, 0.99996)
    assert paper.aa == "rand-m9-mstd0.5-inc1" and paper.warmup_epochs == 10 and paper.clip_grad is None
    assert resolve(["--data", "/x", "--model", "t2t_vit_24"]).weight_decay == 0.065
    assert resolve(["--epochs", "2", "--model", "t2t_vit_10"]).epochs == 2  # flags beat the preset
    ft = resolve(["--checkpoint", "c.pth", "--dataset", "cifar10", "--data", "/d"], "finetune")
    assert (ft.opt, ft.lr, ft.weight_decay, ft.backbone_lr_scale, ft.epochs) == ("sgd", 0.05, 5e-4, 0.01, 60)
    with pytest.raises(ValueError, match="img-size"):
        resolve(["--img-size", "40"])
    with pytest.raises(ValueError, match="unknown training settings"):
        resolve({"learning_rate": 1})


# ------------------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss(tmp_path):
    summary = train(["--num-classes", "2", "--train-samples", "256", "--val-samples", "64", "-b", "32",
                     "--epochs", "4", "--warmup-epochs", "1", "--lr", "1e-3", "--smoothing", "0",
                     "--no-model-ema", "--deterministic", "--log-interval", "1000", "--output", str(tmp_path)])
    hist = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.05
    assert hist[-1]["train_loss"] < math.log(2) - 0.02  # better than guessing
    for key in ("epoch", "train_loss", "top1", "top5", "lr", "img_per_s", "peak_mem_mib"):
        assert key in hist[-1]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["epochs"] == 4 and summary["world_size"] == 1 and summary["model"] == "t2t_vit_7"
    assert summary["fused"] is True and summary["seconds"] > 0 and 0 <= summary["top1"] <= 100
    assert summary["best_top1"] >= summary["top1"]
    assert (tmp_path / "last.pth").exists() and (tmp_path / "best.pth").exists()
    # the checkpoint loads with the library's loader (EMA-free run: the model weights)
    t2t_fast.load_checkpoint(t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=2),
                             str(tmp_path / "last.pth"))


def test_trains_tnt(tmp_path):
    summary = train(TINY + ["--model", "tnt_s_patch16_224", "--img-size", "32", "--num-classes", "4",
                            "--output", str(tmp_path)])
    assert summary["model"] == "tnt_s_patch16_224" and summary["fused"] is True
    t2t_fast.load_checkpoint(t2t_fast.create_model("tnt_s_patch16_224", img_size=32, num_classes=4),
                             str(tmp_path / "last.pth"))


RESUME = ["--train-samples", "48", "--val-samples", "16", "-b", "8", "--epochs", "2", "--accum-steps", "2",
          "--deterministic", "--save-every", "2", "--log-interval", "1000", "--aa", "rand-m9-mstd0.5-inc1",
          "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop-path", "0.1"]


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    whole = train(RESUME + ["--output", str(tmp_path / "whole")])

    real_save, saves = checkpoint_io.atomic_save, []

    def save_then_crash(obj, path):
        real_save(obj, path)
        saves.append(obj["global_step"])
        if len(saves) == 3:  # mid-epoch 2 (3 updates per epoch: saves at update 2, epoch 1 end, update 4)
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoint_io, "atomic_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(RESUME + ["--output", str(tmp_path / "crashed")])
    monkeypatch.undo()
    assert saves == [2, 3, 4]
    resumed = train(RESUME + ["--output", str(tmp_path / "crashed"), "--resume", "auto"])

    a = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "last.pth", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["global_step"] == b["global_step"] == 6
    strip = lambda h: {k: v for k, v in h.items() if k not in ("img_per_s", "seconds", "peak_mem_mib")}  # noqa
    assert [strip(h) for h in a["history"]] == [strip(h) for h in b["history"]]
    assert [strip(h) for h in _read_jsonl(tmp_path / "crashed" / "metrics.jsonl")] == [strip(h) for h in a["history"]]
    assert resumed["top1"] == whole["top1"] and resumed["epochs"] == 2


def test_non_finite_loss_is_skipped_then_stops(tmp_path, monkeypatch, capsys):
    real_loss_fn, calls = engine._loss_fn, [0]

    def nan_after_two(mixup, smoothing):
        fn = real_loss_fn(mixup, smoothing)

        def loss(logits, target):
            calls[0] += 1
            out = fn(logits, target)
            return out * float("nan") if calls[0] > 2 else out
        return loss

    monkeypatch.setattr(engine, "_loss_fn", nan_after_two)
    with pytest.raises(TrainingDiverged, match="not finite for 3 updates in a row"):
        train(TINY + ["--train-samples", "64", "--save-every", "1", "--max-bad-steps", "3", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("non-finite loss") == 3
    ckpt = checkpoint_io.load(str(tmp_path / "last.pth"))
    assert ckpt["global_step"] == 2  # the last good update; skipped updates never overwrote it
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_existing_run_and_mismatched_resume_are_refused(tmp_path):
    out = str(tmp_path / "run")
    train(TINY + ["--output", out])
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(TINY + ["--output", out])
    with pytest.raises(ValueError, match=r"num_classes 8 \(this run: 4\)"):
        train(TINY + ["--output", out, "--resume", "auto", "--num-classes", "4"])
    with pytest.raises(ValueError, match=r"model 't2t_vit_7' \(this run: 't2t_vit_10'\)"):
        train(TINY + ["--output", out, "--resume", "auto", "--model", "t2t_vit_10"])
    with pytest.raises(ValueError, match="no checkpoint file"):
        train(TINY + ["--resume", str(tmp_path / "nope.pth")])
    torn = tmp_path / "torn" / "last.pth"
    torn.parent.mkdir()
    torn.write_bytes(open(os.path.join(out, "last.pth"), "rb").read()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train(TINY + ["--resume", str(torn)])


def test_bad_data_dirs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        train(SMALL_MODEL + ["--data", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="missing: train/, val/"):
        train(SMALL_MODEL + ["--data", str(tmp_path)])
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        train(SMALL_MODEL + ["--data", str(tmp_path)])
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        train(SMALL_MODEL + ["--data", str(tmp_path)])
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        train(SMALL_MODEL + ["--dataset", "cifar10", "--data", str(tmp_path)])


def test_image_folder_skips_a_corrupt_image(tmp_path, capsys):
    seed = 0
    for split, n in (("train", 7), ("val", 2)):
        for c in ("circle", "square"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                seed += 1
                _write_png(tmp_path / split / c / f"{i}.png", seed)
    (tmp_path / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    # 15 images in batches of 5: every image, the broken one included, is drawn in the epoch
    summary = train(SMALL_MODEL + ["--data", str(tmp_path), "-b", "5", "--output", str(tmp_path / "out")])
    assert summary["skipped_images"] == 1 and summary["num_classes"] == 2 and summary["preset"] == "imagenet"
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "broken.jpg" in err


def _fake_cifar10(root, per_batch=8):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(i) for i in rng.integers(0, 10, per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return d


def test_cifar_pickle_folder(tmp_path):
    _fake_cifar10(tmp_path)
    x, y, classes = data.load_cifar(str(tmp_path), "cifar10", "train")
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (40,)
    assert classes[3] == "class3"
    xv, _, _ = data.load_cifar(str(tmp_path / "cifar-10-batches-py"), "cifar10", "test")  # the folder itself
    assert xv.shape == (8, 3, 32, 32)


def test_finetune_from_a_checkpoint_to_new_classes(tmp_path):
    _fake_cifar10(tmp_path / "data")
    source = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=8)
    torch.save({"state_dict_ema": source.state_dict()}, tmp_path / "src.pth")

    target = t2t_fast.create_model("t2t_vit_7", img_size=48, num_classes=10)
    engine.load_pretrained(target, str(tmp_path / "src.pth"), use_ema=True, model_name="t2t_vit_7")
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.head.weight.shape == (10, 256) and target.pos_embed.shape == (1, 10, 256)  # resized
    with pytest.raises(ValueError, match="is not a t2t_vit_14 checkpoint"):
        engine.load_pretrained(t2t_fast.create_model("t2t_vit_14", img_size=32, num_classes=10),
                               str(tmp_path / "src.pth"), True, "t2t_vit_14")

    out = tmp_path / "ft"
    summary = finetune(["--checkpoint", str(tmp_path / "src.pth"), "--dataset", "cifar10", "--data",
                        str(tmp_path / "data"), "--model", "t2t_vit_7", "--img-size", "32", "-b", "8", "--epochs",
                        "1", "--workers", "0", "--log-interval", "1000", "--output", str(out)])
    assert summary["num_classes"] == 10 and summary["preset"] == "finetune"
    ckpt = checkpoint_io.load(str(out / "last.pth"))
    groups = ckpt["optimizer"]["param_groups"]
    assert {g["lr_scale"] for g in groups} == {1.0, 0.01}
    assert all("momentum" in g and g["momentum"] == 0.9 for g in groups)  # SGD
    head_lr = max(g["lr"] for g in groups)
    assert min(g["lr"] for g in groups) == pytest.approx(head_lr * 0.01)


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t2t_fast",
           "train", "--train-samples", "40", "--val-samples", "10", "-b", "4", "--epochs", "1", "--log-interval",
           "1000", "--save-every", "2", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    ckpt = checkpoint_io.load(str(out / "last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["global_step"] == 5  # 40 / (4 x 2)
    assert proc.stdout.count("done in") == 1  # only rank 0 reports


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_run_with_memory_knobs(tmp_path, precision):
    summary = train(TINY + ["--device", "cuda", "--precision", precision, "--grad-checkpoint", "all",
                            "--channels-last", "--clip-grad", "1.0", "--model-ema", "--save-every", "2",
                            "--output", str(tmp_path)])
    hist = _read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isfinite(hist[-1]["train_loss"]) and hist[-1]["peak_mem_mib"] > 0 and "ema_top1" in hist[-1]
    assert summary["skipped_steps"] == 0 and summary["precision"] == precision
    ckpt = checkpoint_io.load(str(tmp_path / "last.pth"))
    assert (ckpt["scaler"] is not None) == (precision == "fp16")
    assert "cuda" in ckpt["rng"][0]
    resumed = train(TINY + ["--device", "cuda", "--precision", precision, "--epochs", "2", "--model-ema",
                            "--output", str(tmp_path), "--resume", "auto"])
    assert resumed["epochs"] == 2


# ------------------------------------------------------------------------------------------------------------
# start-up: everything checked before anything is written; the run folder's lock; short-run schedules; EMA
# ------------------------------------------------------------------------------------------------------------
def _build(args, capsys=None):
    """A Trainer built (checked, folder opened, banner printed) but not run; closed again."""
    import time

    trainer = engine.Trainer(resolve(args), engine.setup_distributed("cpu"), time.time())
    trainer.close()
    return trainer


def test_bad_input_fails_before_the_run_folder_or_the_banner(tmp_path, monkeypatch, capsys):
    from t2t_fast.train import ConfigError

    monkeypatch.chdir(tmp_path)  # the default output/train/<time>-... would be created here
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    cases = [
        (["--model", "no_such_model"], "--model 'no_such_model' is not a model here; available: .*t2t_vit_14"),
        (["--resume", str(tmp_path / "missing.pth")], "no checkpoint file"),
        (["--resume", str(garbage)], "garbage.pth.*not a PyTorch checkpoint"),
        (["--data", str(tmp_path / "nowhere")], "is not a directory"),
        (["--num-classes", "3", "--dataset", "builtin", "-b", "64", "--train-samples", "32"], "smaller than one"),
    ]
    for args, match in cases:
        with pytest.raises(ConfigError, match=match):
            train(TINY + args)
        with pytest.raises(ConfigError, match=match):  # the same with an explicit --output
            train(TINY + args + ["--output", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=r"--checkpoint: checkpoint .*garbage.pth.* cannot be read"):
        finetune(TINY + ["--checkpoint", str(garbage), "--output", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path)) == ["garbage.pth"]  # no output/ and no out/ folder
    assert capsys.readouterr().out == ""  # no banner


def test_lock_refuses_a_second_run_and_recognizes_a_stale_one(tmp_path, capsys):
    import socket

    from t2t_fast.train import ConfigError, rundir

    out = tmp_path / "run"
    out.mkdir()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (out / "run.lock").write_text(json.dumps(live))
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, "
                                          r"started 2026-01-01T00:00:00\+00:00.*delete the lock file"):
        train(TINY + ["--output", str(out)])
    assert os.listdir(out) == ["run.lock"]
    other_host = dict(live, host="elsewhere", pid=1)
    (out / "run.lock").write_text(json.dumps(other_host))
    with pytest.raises(ConfigError, match="pid 1 on elsewhere"):
        rundir.RunDir(str(out)).open()
    (out / "run.lock").write_text("{torn")
    with pytest.raises(ConfigError, match="unreadable lock file"):
        rundir.RunDir(str(out)).open()
    # a run killed on this host leaves its lock behind: its pid is gone, so the lock is stale and taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps(dict(live, pid=dead.pid)))
    d = rundir.RunDir(str(out))
    assert d.lock_owner() is None
    assert f"stale lock of a run that is gone (pid {dead.pid}" in d.open()
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="in use"):  # held now
        rundir.RunDir(str(out)).open()
    d.close()
    assert not (out / "run.lock").exists()
    # a finished run releases its lock
    train(TINY + ["--output", str(tmp_path / "done")])
    assert not (tmp_path / "done" / "run.lock").exists()


def test_short_runs_scale_the_presets_warmup_and_cooldown(tmp_path, capsys):
    short = resolve(["--data", "/x", "--epochs", "2"])
    assert (short.warmup_epochs, short.cooldown_epochs) == (0.067, 0)  # 10 x 2/300, int(10 x 2/300)
    assert "warmup 10 -> 0.067 and cooldown 10 -> 0 epochs, scaled to --epochs 2 of its 300" in short.adjusted[0]
    mid = resolve(["--data", "/x", "--epochs", "150"])
    assert (mid.warmup_epochs, mid.cooldown_epochs) == (5, 5)
    given = resolve(["--data", "/x", "--epochs", "2", "--warmup-epochs", "1", "--cooldown-epochs", "3"])
    assert (given.warmup_epochs, given.cooldown_epochs, given.adjusted) == (1, 3, ())
    full = resolve(["--data", "/x"])
    assert (full.warmup_epochs, full.cooldown_epochs, full.adjusted) == (10, 10, ())
    with pytest.raises(ValueError, match="--warmup-epochs 3 exceeds --epochs 2"):  # an explicit value is kept
        resolve(["--data", "/x", "--epochs", "2", "--warmup-epochs", "3"])
    # the banner prints the total and the warmup in updates (builtin preset: 8 epochs with 1 warmup epoch)
    trainer = _build(TINY + ["--epochs", "2", "--output", str(tmp_path)])
    banner = " ".join(capsys.readouterr().out.split())
    assert trainer.total_epochs == 2 and trainer.schedule.warmup_steps == 1  # 0.25 epochs of 4 updates
    assert "schedule: 2 epochs in all (2 cosine + 0 cooldown at 1e-05) of 4 updates; warmup 0.25 epochs = 1 update;" \
        " the preset's warmup 1 -> 0.25 epochs, scaled to --epochs 2 of its 8" in banner


def test_fp16_on_cpu_warns_and_points_to_bf16(tmp_path, capsys):
    _build(TINY + ["--precision", "fp16", "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "--precision fp16 on the CPU runs far slower" in err and "--precision bf16" in err
    _build(TINY + ["--precision", "bf16", "--output", str(tmp_path / "b")])
    assert "fp16" not in capsys.readouterr().err


def test_ema_warmup_is_on_by_default_and_follows_recent_weights():
    from t2t_fast.train.ema import ModelEMA

    assert resolve(["--data", "/x"]).model_ema_warmup and resolve([]).model_ema_warmup
    assert not resolve(["--data", "/x", "--no-model-ema-warmup"]).model_ema_warmup
    model = torch.nn.Linear(4, 4)
    ema = ModelEMA(model, decay=0.99996)
    decays = []
    for step in range(1, 301):
        decays.append(ema.current_decay())
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update(model)
    assert decays[0] == 0.0 and all(a < b for a, b in zip(decays, decays[1:])) and decays[-1] < 0.99996
    assert decays[99] == pytest.approx(1 - 100 ** (-2 / 3))
    # after 300 updates the average sits among the recent weights (~n^(2/3) = 45 updates back), far from the start
    assert 230 < ema.module.weight[0, 0].item() < 300
    plain = ModelEMA(torch.nn.Linear(4, 4), decay=0.99996, warmup=False)
    assert plain.current_decay() == 0.99996


def test_run_state_round_trip(tmp_path):
    """The checkpoint format has one owner: a state_dict loaded into another run's RunState gives it back."""
    a = _build(TINY + ["--output", str(tmp_path / "a")])
    a.state.epoch, a.state.global_step, a.state.samples_done, a.state.best_top1 = 3, 12, 16, 55.5
    a.state.history = [{"epoch": 1, "top1": 50.0}]
    a.state.epoch_stats.loss_sum = 4.5
    a.state.rngs = [checkpoint_io.rng_state()]
    sd = a.state.state_dict()
    b = _build(TINY + ["--output", str(tmp_path / "b"), "--seed", "7"])
    assert not torch.equal(b.model.cls_token, a.model.cls_token)
    assert b.state.load_state_dict(sd) == []
    again = b.state.state_dict()
    assert torch.equal(b.model.cls_token, a.model.cls_token)
    assert set(again) == set(sd)
    for key in ("epoch", "global_step", "samples_done", "best_top1", "history", "epoch_stats", "model", "img_size"):
        assert again[key] == sd[key], key
    c = _build(TINY + ["--output", str(tmp_path / "c"), "--num-classes", "4"])
    with pytest.raises(ValueError, match=r"belongs to another run: it has num_classes 8 \(this run: 4\)"):
        c.state.load_state_dict(sd)
