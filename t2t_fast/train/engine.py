"""The training loop: one process or many (DDP under torchrun), exact resume, crash-safe checkpoints.

Randomness and resume: data order comes from (seed, epoch), each image's augmentation from (seed, epoch,
index), mixup/cutmix from (seed, epoch, batch, rank), and dropout/drop-path from the process RNG, which the
checkpoint saves for every rank. A checkpoint also holds the model, EMA, optimizer, scaler and schedule, and
the position inside the epoch, so a run resumed from it continues exactly as the uninterrupted one would
(bitwise on CPU with --deterministic, where the arithmetic itself is reproducible).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import t2t_fast
from t2t_fast.checkpoint import load_checkpoint, read_checkpoint, unwrap_state_dict
from t2t_fast.models.layers import layer_decay_lr_scale
from t2t_fast.train import checkpoint_io, data
from t2t_fast.train.augment import EvalTransform, MixupCutmix, TrainTransform
from t2t_fast.train.config import TrainConfig
from t2t_fast.train.ema import ModelEMA
from t2t_fast.train.optim import CosineSchedule, build_optimizer, param_groups

CHECKPOINT_FORMAT = "t2t-fast-train-1"
_MAX_SKIP_WARNINGS = 10


class TrainingDiverged(RuntimeError):
    """The loss was not finite for ``--max-bad-steps`` updates in a row."""


# ------------------------------------------------------------------------------------------------------------
# process setup
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Device choice and, under torchrun (WORLD_SIZE > 1), the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local, dev, owns)


def _broadcast(obj: Any, d: Dist) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device):
    """Deterministic kernels while training (restored afterwards, as this runs inside other programs too)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # on GPU some kernels (attention backward, atomics) have no deterministic version: warn, don't fail
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------
class Log:
    """Rank 0 prints; a progress bar redrawn in place on a TTY, plain lines every ``interval`` otherwise."""

    def __init__(self, enabled: bool, interval: int, rank: int = 0):
        self.enabled, self.interval, self.rank = enabled, max(1, interval), rank
        self.tty = enabled and sys.stdout.isatty()
        self._bar_open = False

    def info(self, msg: str) -> None:
        if self.enabled:
            self._close_bar()
            print(msg, flush=True)

    def warn(self, msg: str, every_rank: bool = False) -> None:
        """To stderr, from rank 0, or from every rank for what only one rank sees (an unreadable file)."""
        if not (self.enabled or every_rank):
            return
        self._close_bar()
        prefix = f"[rank {self.rank}] " if self.rank else ""
        print(f"{prefix}warning: {msg}", file=sys.stderr, flush=True)

    def progress(self, epoch: int, epochs: int, step: int, steps: int, loss: float, lr: float, img_s: float,
                 mem: float) -> None:
        if not self.enabled:
            return
        stats = f"loss {loss:.4f}  lr {lr:.3g}  {img_s:.0f} img/s  mem {mem:.0f} MiB"
        if self.tty:
            width = 24
            done = int(width * step / max(1, steps))
            bar = "#" * done + "." * (width - done)
            sys.stdout.write(f"\repoch {epoch}/{epochs} [{bar}] {step}/{steps}  {stats}  ")
            sys.stdout.flush()
            self._bar_open = True
        elif step % self.interval == 0 or step == steps:
            print(f"epoch {epoch}/{epochs} step {step}/{steps}  {stats}", flush=True)

    def _close_bar(self) -> None:
        if self._bar_open:
            sys.stdout.write("\n")
            self._bar_open = False


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensorboard(output: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(os.path.join(output, "tensorboard"))


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------
def load_pretrained(model: nn.Module, path: str, use_ema: bool, model_name: str) -> None:
    """Backbone weights from a checkpoint into ``model``, keeping ``model``'s fresh head (new classes)."""
    sd = unwrap_state_dict(read_checkpoint(path), use_ema)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        load_checkpoint(model, sd)
    except ValueError as e:
        raise ValueError(f"--checkpoint {path!r} is not a {model_name} checkpoint (choose the matching --model): "
                         f"{e}") from None


def _loss_fn(mixup: MixupCutmix, smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if mixup.active:
        return lambda logits, target: torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return lambda logits, target: F.cross_entropy(logits, target, label_smoothing=smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: Dist, autocast: Callable, channels_last: bool,
             on_skipped: Callable) -> tuple[float, float]:
    """(top-1, top-5) in percent over the whole validation set (all ranks' shards)."""
    model.eval()
    c1 = torch.zeros((), dtype=torch.float64, device=d.device)
    c5, n = c1.clone(), c1.clone()
    for x, y, skipped in loader:
        on_skipped(skipped)
        if x is None:
            continue
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        c1 += top[:, 0].sum()
        c5 += top.any(dim=1).sum()
        n += y.numel()
    total = torch.stack([c1, c5, n])
    if d.world > 1:
        dist.all_reduce(total)
    c1, c5, n = total.tolist()
    return (100.0 * c1 / n, 100.0 * c5 / n) if n else (float("nan"), float("nan"))


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------
@dataclass
class EpochStats:
    """Running sums of the current epoch (saved in mid-epoch checkpoints so resumed metrics are whole)."""

    loss_sum: float = 0.0
    loss_count: float = 0.0
    images: float = 0.0
    bad_steps: int = 0
    skipped_images: int = 0
    seconds: float = 0.0


@dataclass
class RunState:
    epoch: int = 0  # the epoch in progress (= epochs completed)
    samples_done: int = 0  # of this epoch's global order, by all ranks
    global_step: int = 0  # optimizer updates (skipped ones included)
    best_top1: float = -1.0
    best_epoch: int = 0
    seconds: float = 0.0  # wall time of earlier sessions of this run
    history: list = field(default_factory=list)
    epoch_stats: EpochStats = field(default_factory=EpochStats)


def _resolve_output(cfg: TrainConfig, d: Dist) -> str:
    out = cfg.output
    if out is None and cfg.resume not in (None, "auto"):
        out = os.path.dirname(os.path.abspath(cfg.resume))
    if out is None:
        if cfg.resume == "auto":
            raise ValueError("--resume auto needs --output DIR (the run directory to look in)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join("output", cfg.command, f"{stamp}-{cfg.model}-{cfg.dataset}")
    out = _broadcast(out, d)
    if d.main:
        os.makedirs(out, exist_ok=True)
    return out


def _find_resume(cfg: TrainConfig, out: str, log: Log) -> Optional[str]:
    if cfg.resume is None:
        existing = checkpoint_io.latest_checkpoint(out)
        if existing:
            raise ValueError(f"--output {out!r} already holds a checkpoint ({os.path.basename(existing)}): pass "
                             "--resume auto to continue that run, or choose another --output")
        return None
    if cfg.resume == "auto":
        path = checkpoint_io.latest_checkpoint(out)
        if path is None:
            log.info(f"--resume auto: no checkpoint in {out} yet, starting a new run")
        return path
    return cfg.resume


def _check_compatible(ckpt: dict, path: str, expect: dict[str, Any]) -> None:
    wrong = [f"{k} {ckpt.get(k)!r} (this run: {v!r})" for k, v in expect.items() if ckpt.get(k) != v]
    if wrong:
        raise ValueError(f"--resume {path!r} belongs to another run: checkpoint has " + ", ".join(wrong)
                         + "; resume with the same --model/--img-size/data, or start a new --output")


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to OUTPUT/summary.json by rank 0)."""
    t_start = time.time()
    d = setup_distributed(cfg.device)
    try:
        with determinism(cfg.deterministic, d.device):
            trainer = Trainer(cfg, d, t_start)
            trainer.fit()
            return trainer.finish()
    finally:
        if d.owns_group:
            dist.destroy_process_group()


class Trainer:
    """One training run: built from a config, restored from a checkpoint if asked, then ``fit`` and ``finish``."""

    def __init__(self, cfg: TrainConfig, d: Dist, t_start: float):
        self.cfg, self.d, self.t_start = cfg, d, t_start
        self.log = Log(d.main, cfg.log_interval, d.rank)
        self._skip_warnings = 0

        # data first (a missing directory fails before anything is written); transforms come from the model
        spec = data.DataSpec(cfg.dataset, cfg.data, cfg.num_classes, min(cfg.img_size, 64),  # builtin: <= 64 px
                             cfg.train_samples, cfg.val_samples)
        self.train_ds, self.val_ds = data.build_datasets(spec)
        self.num_classes = len(self.train_ds.classes)
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ValueError(f"--num-classes {cfg.num_classes}, but the data has {self.num_classes} classes")
        self.out = _resolve_output(cfg, d)
        resume_path = _find_resume(cfg, self.out, self.log)

        # the model: identical initial weights on every rank, then per-rank randomness
        seed_everything(cfg.seed)
        model = t2t_fast.create_model(cfg.model, img_size=cfg.img_size, num_classes=self.num_classes,
                                      drop_path_rate=cfg.drop_path, fused=cfg.fused)
        if cfg.command == "finetune" and resume_path is None:
            load_pretrained(model, cfg.checkpoint, cfg.checkpoint_ema, cfg.model)
        seed_everything(cfg.seed + d.rank)
        if cfg.grad_checkpoint != "none":
            model.set_grad_checkpointing(True, cfg.grad_checkpoint)
        self._attach_transforms(model.pretrained_cfg)
        self.model = model.to(d.device)
        self.ema = ModelEMA(model, cfg.model_ema_decay, cfg.model_ema_warmup) if cfg.model_ema else None
        self.net: nn.Module = model
        if d.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                gradient_as_bucket_view=True)

        # loaders, optimizer, schedule, precision
        self.sampler = data.TrainSampler(len(self.train_ds), cfg.batch_size, d.rank, d.world, cfg.seed)
        self.updates_per_epoch = self.sampler.batches_per_epoch // cfg.accum_steps
        if self.updates_per_epoch < 1:
            raise ValueError(f"the training set ({len(self.train_ds)} images) is smaller than one update: batch "
                             f"{cfg.batch_size} x {d.world} processes x {cfg.accum_steps} accumulation steps")
        self.per_update = cfg.batch_size * d.world * cfg.accum_steps  # images per update, all ranks
        pin = d.device.type == "cuda"
        self.train_loader = data.make_loader(self.train_ds, self.sampler, cfg.batch_size, cfg.workers, pin, cfg.seed)
        self.val_loader = data.make_loader(self.val_ds, data.EvalSampler(len(self.val_ds), d.rank, d.world),
                                           cfg.batch_size, cfg.workers, pin, cfg.seed)
        lr_scale = (lambda n: 1.0 if n.startswith("head.") else cfg.backbone_lr_scale) \
            if cfg.backbone_lr_scale != 1.0 else None
        if cfg.layer_decay is not None:
            lr_scale = layer_decay_lr_scale(model, cfg.layer_decay, lr_scale)
        groups = param_groups(model, cfg.weight_decay, model.no_weight_decay(), lr_scale)
        self.optimizer = build_optimizer(cfg.opt, groups, cfg.lr, cfg.momentum)
        self.schedule = CosineSchedule(self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_lr,
                                       cfg.warmup_epochs * self.updates_per_epoch,
                                       cfg.epochs * self.updates_per_epoch)
        self.total_epochs = cfg.epochs + cfg.cooldown_epochs
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
        self.mixup = MixupCutmix(self.num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.smoothing)
        self.criterion = _loss_fn(self.mixup, cfg.smoothing)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.identity = {"model": cfg.model, "num_classes": self.num_classes, "img_size": cfg.img_size}

        self._banner()
        self.state = RunState()
        self.consecutive_bad = 0
        rng = self._restore(resume_path) if resume_path is not None else None
        if d.main:  # metrics.jsonl holds exactly the finished epochs of this run
            with open(os.path.join(self.out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in self.state.history)
        self.tb = _tensorboard(self.out) if d.main else None
        if rng is not None:  # last: nothing may draw from the restored streams before training does
            checkpoint_io.set_rng_state(rng)

    # ---- setup helpers ----
    def _attach_transforms(self, pcfg: dict) -> None:
        cfg = self.cfg
        size = (cfg.img_size, cfg.img_size)
        crop_pct = cfg.crop_pct if cfg.crop_pct is not None else (pcfg["crop_pct"] if cfg.dataset == "folder"
                                                                  else 1.0)
        self.train_ds.transform = TrainTransform(size, pcfg["mean"], pcfg["std"], cfg.scale, cfg.ratio, cfg.hflip,
                                                 cfg.aa, cfg.color_jitter, cfg.reprob, cfg.interpolation)
        self.val_ds.transform = EvalTransform(size, pcfg["mean"], pcfg["std"], crop_pct, cfg.interpolation)

    def _banner(self) -> None:
        cfg, d = self.cfg, self.d
        n_train, n_val = len(self.train_ds), len(self.val_ds)
        if cfg.dataset == "builtin":
            self.log.info(f"t2t-fast {cfg.command}: preset '{cfg.preset}' on the built-in dataset ({self.num_classes} "
                          f"classes of generated lines, shapes and textures; {n_train} train / {n_val} val images), "
                          "sized for a few CPU minutes. Pass --data DIR (ImageFolder) or --dataset cifar10 --data DIR "
                          "for real data and the paper's recipe.")
        else:
            self.log.info(f"t2t-fast {cfg.command}: preset '{cfg.preset}' (the paper's recipe) on {cfg.dataset} data "
                          f"at {cfg.data} ({self.num_classes} classes, {n_train} train / {n_val} val images)")
        n_params = sum(p.numel() for p in self.model.parameters())
        avail = ", ".join(n for n, info in t2t_fast.backends().items() if info)
        ops = f"fused ops, backends available: {avail}" if cfg.fused else "reference path (--no-fused)"
        accum = f" x {cfg.accum_steps} accum" if cfg.accum_steps > 1 else ""
        ema = f"{cfg.model_ema_decay:g}" if self.ema else "off"
        self.log.info(f"model {cfg.model} ({n_params / 1e6:.2f}M params, img {cfg.img_size}, {ops}); {d.world} "
                      f"process(es) on {d.device.type}, {cfg.precision}; batch {cfg.batch_size} x {d.world}{accum}, "
                      f"{cfg.opt} lr {cfg.lr:g} wd {cfg.weight_decay:g}, {cfg.epochs}+{cfg.cooldown_epochs} epochs "
                      f"of {self.updates_per_epoch} updates; EMA {ema}; output {self.out}")

    def _restore(self, path: str) -> Optional[dict]:
        """Load a training checkpoint into every part of the run; returns this rank's RNG state (or None)."""
        ckpt = checkpoint_io.load(path)
        _check_compatible(ckpt, path, self.identity)
        load_checkpoint(self.model, {"state_dict": ckpt["state_dict"]}, use_ema=False)
        if self.ema is not None:
            if "state_dict_ema" in ckpt:
                self.ema.module.load_state_dict(ckpt["state_dict_ema"])
                self.ema.updates = int(ckpt.get("ema_updates", 0))
            else:
                self.log.info("--resume: the checkpoint has no EMA weights; the EMA starts from the model's")
                self.ema.module.load_state_dict(self.model.state_dict())
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        state = self.state
        for k in ("epoch", "samples_done", "global_step", "best_top1", "best_epoch", "seconds", "history"):
            setattr(state, k, ckpt[k])
        state.epoch_stats = EpochStats(**ckpt["epoch_stats"])
        if ckpt.get("dataset_len") != len(self.train_ds):
            self.log.warn(f"--resume: the training set had {ckpt.get('dataset_len')} images, now "
                          f"{len(self.train_ds)}: the data order differs from the interrupted run")
        if state.epoch >= self.total_epochs:
            self.log.info(f"resumed from {path}: all {self.total_epochs} epochs are done (raise --epochs to go on)")
        else:
            self.log.info(f"resumed from {path}: epoch {state.epoch + 1}, update {state.global_step}"
                          + (f", {state.samples_done} images into the epoch" if state.samples_done else ""))
        if len(ckpt["rng"]) == self.d.world:
            return ckpt["rng"][self.d.rank]
        self.log.warn(f"--resume: checkpoint written by {len(ckpt['rng'])} processes, now {self.d.world}: data "
                      "position kept, random streams re-seeded (not an exact continuation)")
        return None

    # ---- pieces of the loop ----
    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _on_skipped(self, skipped: list) -> None:
        for s in skipped:
            self._skip_warnings += 1
            if self._skip_warnings <= _MAX_SKIP_WARNINGS:
                last = self._skip_warnings == _MAX_SKIP_WARNINGS
                self.log.warn(f"skipped unreadable image {s.path} ({s.error})"
                              + (" (further skips are only counted)" if last else ""), every_rank=True)

    def save(self, best: bool = False) -> None:
        """Checkpoint everything (rank 0 writes; every rank contributes its RNG state)."""
        d, state = self.d, self.state
        mine = checkpoint_io.rng_state()
        rngs = [mine]
        if d.world > 1:
            rngs = [None] * d.world
            dist.all_gather_object(rngs, mine)
        if not d.main:
            return
        ema = self.ema
        ckpt = {
            "format": CHECKPOINT_FORMAT, **self.identity, "fused": self.cfg.fused,
            "state_dict": self.model.state_dict(),
            **({"state_dict_ema": ema.module.state_dict(), "ema_updates": ema.updates} if ema else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "scheduler": self.schedule.state_dict(),
            "epoch": state.epoch, "samples_done": state.samples_done, "global_step": state.global_step,
            "best_top1": state.best_top1, "best_epoch": state.best_epoch, "seconds": self.seconds(),
            "history": state.history, "epoch_stats": dataclasses.asdict(state.epoch_stats), "rng": rngs,
            "world_size": d.world, "dataset_len": len(self.train_ds), "config": self.cfg.to_dict(),
        }
        last = os.path.join(self.out, checkpoint_io.LAST)
        checkpoint_io.atomic_save(ckpt, last)
        if best:
            checkpoint_io.atomic_copy(last, os.path.join(self.out, checkpoint_io.BEST))

    def seconds(self) -> float:
        """Wall time of the whole run, earlier sessions included."""
        return self.state.seconds + time.time() - self.t_start

    def _forward_backward(self, epoch: int, update: int, micro_batches: list) -> tuple[float, float, float]:
        """Accumulate gradients over the micro-batches of one update; returns (loss sum, micro-batches with
        data, images) summed over ranks. The loss sum is NaN/inf when any rank's loss is."""
        cfg, d = self.cfg, self.d
        loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
        counted = n_images = 0
        for micro, (x, y, skipped) in enumerate(micro_batches):
            self._on_skipped(skipped)
            self.state.epoch_stats.skipped_images += len(skipped)
            weight = 1.0
            if x is None:  # the whole micro-batch was unreadable: a zero-weight pass keeps DDP in step
                x, y, weight = torch.zeros(1, 3, cfg.img_size, cfg.img_size), torch.zeros(1, dtype=torch.long), 0.0
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if self.mixup.active:
                rng = np.random.default_rng(data.mix_seed(cfg.seed, epoch, update * cfg.accum_steps + micro, d.rank))
                x, target = self.mixup(x, y, rng)
            last_micro = micro == cfg.accum_steps - 1
            sync = self.net.no_sync() if d.world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    logits = self.net(x)
                loss = self.criterion(logits.float(), target)
                self.scaler.scale(loss * (weight / cfg.accum_steps)).backward()
            loss_sum += loss.detach() * weight
            counted += int(weight)
            n_images += int(weight) * x.shape[0]
        return tuple(_all_sum([loss_sum.item(), counted, n_images], d))

    def _skip_update(self, epoch: int, update: int) -> None:
        """A non-finite loss: drop the gradients, count, and stop after --max-bad-steps in a row."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_bad += 1
        self.state.epoch_stats.bad_steps += 1
        self.log.warn(f"non-finite loss at epoch {epoch + 1} update {update + 1}: update skipped "
                      f"({self.consecutive_bad} in a row, limit --max-bad-steps {cfg.max_bad_steps})")
        if self.consecutive_bad >= cfg.max_bad_steps:
            last = os.path.join(self.out, checkpoint_io.LAST)
            keep = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"stopped: the loss was not finite for {self.consecutive_bad} updates in a row (epoch {epoch + 1}, "
                f"update {update + 1}); {keep}. Try a lower --lr, --clip-grad 1.0, or --precision bf16 instead of "
                "fp16.")

    def _apply_update(self) -> None:
        self.consecutive_bad = 0
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def train_epoch(self, epoch: int) -> float:
        """Train (the rest of) one epoch; returns the last learning rate used."""
        cfg, d, state = self.cfg, self.d, self.state
        stats = state.epoch_stats
        self.sampler.set_epoch(epoch, state.samples_done)
        self.net.train()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        batches = iter(self.train_loader)
        update = state.samples_done // self.per_update
        t_epoch = time.time() - stats.seconds
        lr = self.schedule.lr_at(self.schedule.step_count)
        while update < self.updates_per_epoch:
            micro_batches = [next(batches, None) for _ in range(cfg.accum_steps)]
            if micro_batches[-1] is None:  # only after a resume with another world size: the epoch ends early
                break
            lr = self.schedule.apply()
            loss, counted, images = self._forward_backward(epoch, update, micro_batches)
            if math.isfinite(loss):
                self._apply_update()
                if counted:
                    stats.loss_sum += loss
                    stats.loss_count += counted
            else:
                self._skip_update(epoch, update)
            self.schedule.step()
            update += 1
            state.global_step += 1
            state.samples_done = update * self.per_update
            stats.images += images
            stats.seconds = time.time() - t_epoch
            self.log.progress(epoch + 1, self.total_epochs, update, self.updates_per_epoch, loss / max(1, counted),
                              lr, stats.images / max(stats.seconds, 1e-9), peak_memory_mib(d.device))
            if cfg.save_every and state.global_step % cfg.save_every == 0 and self.consecutive_bad == 0 \
                    and update < self.updates_per_epoch:
                self.save()
        return lr

    def end_epoch(self, epoch: int, lr: float) -> None:
        """Evaluate the model (and EMA), record the epoch, checkpoint."""
        d, state = self.d, self.state
        stats = state.epoch_stats
        top1, top5 = evaluate(self.model, self.val_loader, d, self._autocast, self.cfg.channels_last,
                              self._on_skipped)
        record = {"epoch": epoch + 1, "train_loss": stats.loss_sum / max(1.0, stats.loss_count), "top1": top1,
                  "top5": top5}
        if self.ema is not None:
            record["ema_top1"], record["ema_top5"] = evaluate(self.ema.module, self.val_loader, d, self._autocast,
                                                              self.cfg.channels_last, self._on_skipped)
        record.update(lr=lr, img_per_s=stats.images / max(stats.seconds, 1e-9),
                      peak_mem_mib=peak_memory_mib(d.device), skipped_steps=stats.bad_steps,
                      skipped_images=int(_all_sum([stats.skipped_images], d)[0]), seconds=self.seconds())
        state.history.append(record)
        improved = top1 > state.best_top1
        if improved:
            state.best_top1, state.best_epoch = top1, epoch + 1
        state.epoch, state.samples_done, state.epoch_stats = epoch + 1, 0, EpochStats()
        ema_text = f"  ema_top1 {record['ema_top1']:.2f}" if self.ema is not None else ""
        self.log.info(f"epoch {epoch + 1}/{self.total_epochs}  train_loss {record['train_loss']:.4f}  top1 "
                      f"{top1:.2f}  top5 {top5:.2f}{ema_text}  lr {lr:.3g}  {record['img_per_s']:.0f} img/s  "
                      f"peak {record['peak_mem_mib']:.0f} MiB  ({record['seconds']:.0f} s)")
        if d.main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if k != "epoch":
                        self.tb.add_scalar(k, v, epoch + 1)
                self.tb.flush()
        if self.consecutive_bad == 0:
            self.save(best=improved)

    def fit(self) -> None:
        for epoch in range(self.state.epoch, self.total_epochs):
            lr = self.train_epoch(epoch)
            self.end_epoch(epoch, lr)

    def finish(self) -> dict:
        """Write and return the summary."""
        cfg, d, state = self.cfg, self.d, self.state
        final = state.history[-1]
        summary = {
            "top1": final["top1"], "top5": final["top5"], "best_top1": state.best_top1,
            "best_epoch": state.best_epoch, "epochs": state.epoch, "world_size": d.world, "model": cfg.model,
            "fused": cfg.fused, "seconds": self.seconds(), "preset": cfg.preset, "dataset": cfg.dataset,
            "num_classes": self.num_classes, "img_size": cfg.img_size, "precision": cfg.precision,
            "skipped_steps": sum(r["skipped_steps"] for r in state.history),
            "skipped_images": sum(r["skipped_images"] for r in state.history), "output": self.out,
        }
        if "ema_top1" in final:
            summary["ema_top1"], summary["ema_top5"] = final["ema_top1"], final["ema_top5"]
        if d.main:
            _write_json(os.path.join(self.out, "summary.json"), summary)
            if self.tb is not None:
                self.tb.close()
        ema_text = f", EMA top-1 {summary['ema_top1']:.2f}%" if "ema_top1" in summary else ""
        self.log.info(f"done in {summary['seconds']:.0f} s: top-1 {summary['top1']:.2f}%  top-5 "
                      f"{summary['top5']:.2f}% (best {state.best_top1:.2f} at epoch {state.best_epoch}){ema_text}; "
                      f"chance is {100 / self.num_classes:.1f}%. Results in {self.out}/summary.json")
        return summary
