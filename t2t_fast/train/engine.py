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
from t2t_fast.checkpoint import _read as read_checkpoint_file
from t2t_fast.checkpoint import load_checkpoint, unwrap_state_dict
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
        torch.use_deterministic_algorithms(True)
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

    def warn(self, msg: str) -> None:
        """Warnings come from every rank (an unreadable file may only be seen by one)."""
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
    sd = unwrap_state_dict(read_checkpoint_file(path), use_ema)
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
            return _run(cfg, d, t_start)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: Dist, t_start: float) -> dict:
    log = Log(d.main, cfg.log_interval, d.rank)
    # ---- data (transforms are attached once the model's input config is known) ----
    # the built-in images are drawn at (at most) 64 px and resized by the transforms
    spec = data.DataSpec(cfg.dataset, cfg.data, cfg.num_classes, min(cfg.img_size, 64), cfg.train_samples,
                         cfg.val_samples)
    train_ds, val_ds = data.build_datasets(spec, None, None)
    num_classes = len(train_ds.classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"--num-classes {cfg.num_classes}, but the data has {num_classes} classes")
    out = _resolve_output(cfg, d)
    resume_path = _find_resume(cfg, out, log)

    # ---- model: identical initial weights on every rank, then per-rank randomness ----
    seed_everything(cfg.seed)
    model = t2t_fast.create_model(cfg.model, img_size=cfg.img_size, num_classes=num_classes,
                                  drop_path_rate=cfg.drop_path, fused=cfg.fused)
    if cfg.command == "finetune" and resume_path is None:
        load_pretrained(model, cfg.checkpoint, cfg.checkpoint_ema, cfg.model)
    seed_everything(cfg.seed + d.rank)
    if cfg.grad_checkpoint != "none":
        model.set_grad_checkpointing(True, cfg.grad_checkpoint)
    pcfg = model.pretrained_cfg
    size = (cfg.img_size, cfg.img_size)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else (pcfg["crop_pct"] if cfg.dataset == "folder" else 1.0)
    train_ds.transform = TrainTransform(size, pcfg["mean"], pcfg["std"], cfg.scale, cfg.ratio, cfg.hflip, cfg.aa,
                                        cfg.color_jitter, cfg.reprob, cfg.interpolation)
    val_ds.transform = EvalTransform(size, pcfg["mean"], pcfg["std"], crop_pct, cfg.interpolation)
    model.to(d.device)
    ema = ModelEMA(model, cfg.model_ema_decay, cfg.model_ema_warmup) if cfg.model_ema else None
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                  else None, gradient_as_bucket_view=True)

    # ---- loaders, optimizer, schedule ----
    sampler = data.TrainSampler(len(train_ds), cfg.batch_size, d.rank, d.world, cfg.seed)
    updates_per_epoch = sampler.batches_per_epoch // cfg.accum_steps
    if updates_per_epoch < 1:
        raise ValueError(f"the training set ({len(train_ds)} images) is smaller than one update: batch "
                         f"{cfg.batch_size} x {d.world} processes x {cfg.accum_steps} accumulation steps")
    pin = d.device.type == "cuda"
    train_loader = data.make_loader(train_ds, sampler, cfg.batch_size, cfg.workers, pin, cfg.seed)
    val_loader = data.make_loader(val_ds, data.EvalSampler(len(val_ds), d.rank, d.world), cfg.batch_size,
                                  cfg.workers, pin, cfg.seed)
    lr_scale = (lambda n: 1.0 if n.startswith("head.") else cfg.backbone_lr_scale) \
        if cfg.backbone_lr_scale != 1.0 else None
    groups = param_groups(model, cfg.weight_decay, model.no_weight_decay(), lr_scale)
    optimizer = build_optimizer(cfg.opt, groups, cfg.lr, cfg.momentum)
    schedule = CosineSchedule(optimizer, cfg.lr, cfg.min_lr, cfg.warmup_lr, cfg.warmup_epochs * updates_per_epoch,
                              cfg.epochs * updates_per_epoch)
    total_epochs = cfg.epochs + cfg.cooldown_epochs
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")

    def autocast():
        return torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    mixup = MixupCutmix(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.smoothing)
    criterion = _loss_fn(mixup, cfg.smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- resume ----
    state = RunState()
    identity = {"model": cfg.model, "num_classes": num_classes, "img_size": cfg.img_size}
    rng_states = None
    if resume_path is not None:
        ckpt = checkpoint_io.load(resume_path)
        _check_compatible(ckpt, resume_path, identity)
        load_checkpoint(model, {"state_dict": ckpt["state_dict"]}, use_ema=False)
        if ema is not None:
            if "state_dict_ema" in ckpt:
                ema.module.load_state_dict(ckpt["state_dict_ema"])
                ema.updates = int(ckpt.get("ema_updates", 0))
            else:
                log.info("--resume: the checkpoint has no EMA weights; the EMA starts from the model's")
                ema.module.load_state_dict(model.state_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        schedule.load_state_dict(ckpt["scheduler"])
        for k in ("epoch", "samples_done", "global_step", "best_top1", "best_epoch", "seconds", "history"):
            setattr(state, k, ckpt[k])
        state.epoch_stats = EpochStats(**ckpt["epoch_stats"])
        if ckpt.get("dataset_len") != len(train_ds):
            log.warn(f"--resume: the training set had {ckpt.get('dataset_len')} images, now {len(train_ds)}: "
                     "the data order differs from the interrupted run")
        if len(ckpt["rng"]) == d.world:
            rng_states = ckpt["rng"][d.rank]
        else:
            log.warn(f"--resume: checkpoint written by {len(ckpt['rng'])} processes, now {d.world}: data "
                     "position kept, random streams re-seeded (not an exact continuation)")
        del ckpt
        log.info(f"resumed from {resume_path}: epoch {state.epoch + 1}, update {state.global_step}"
                 + (f", {state.samples_done} images into the epoch" if state.samples_done else ""))
    if d.main:  # metrics.jsonl holds exactly the finished epochs of this run
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in state.history)
    tb = _tensorboard(out) if d.main else None

    # ---- banner ----
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.preset == "builtin" or (cfg.command == "finetune" and cfg.dataset == "builtin"):
        log.info(f"t2t-fast {cfg.command}: preset '{cfg.preset}' on the built-in dataset ({num_classes} classes of "
                 f"generated lines, shapes and textures; {len(train_ds)} train / {len(val_ds)} val images), sized "
                 "for a few CPU minutes. Pass --data DIR (ImageFolder) or --dataset cifar10 --data DIR for real "
                 "data and the paper's recipe.")
    else:
        log.info(f"t2t-fast {cfg.command}: preset '{cfg.preset}' (the paper's recipe) on {cfg.dataset} data at "
                 f"{cfg.data} ({num_classes} classes, {len(train_ds)} train / {len(val_ds)} val images)")
    avail = [n for n, info in t2t_fast.backends().items() if info]
    log.info(f"model {cfg.model} ({n_params / 1e6:.2f}M params, img {cfg.img_size}, "
             f"{'fused ops, backends available: ' + ', '.join(avail) if cfg.fused else 'reference path (--no-fused)'})"
             f"; {d.world} process(es) on {d.device.type}, {cfg.precision}; batch {cfg.batch_size} x {d.world}"
             f"{f' x {cfg.accum_steps} accum' if cfg.accum_steps > 1 else ''}, {cfg.opt} lr {cfg.lr:g} "
             f"wd {cfg.weight_decay:g}, {cfg.epochs}+{cfg.cooldown_epochs} epochs of {updates_per_epoch} updates; "
             f"EMA {'%g' % cfg.model_ema_decay if ema else 'off'}; output {out}")

    skipped_seen = [0]

    def on_skipped(skipped: list) -> None:
        for s in skipped:
            skipped_seen[0] += 1
            if skipped_seen[0] <= _MAX_SKIP_WARNINGS:
                log.warn(f"skipped unreadable image {s.path} ({s.error})"
                         + (" (further skips are only counted)" if skipped_seen[0] == _MAX_SKIP_WARNINGS else ""))

    def save(best: bool = False) -> None:
        rngs = [None] * d.world
        mine = checkpoint_io.rng_state()
        if d.world > 1:
            dist.all_gather_object(rngs, mine)
        else:
            rngs = [mine]
        if not d.main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT, **identity, "fused": cfg.fused,
            "state_dict": model.state_dict(),
            **({"state_dict_ema": ema.module.state_dict(), "ema_updates": ema.updates} if ema else {}),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "scheduler": schedule.state_dict(),
            "epoch": state.epoch, "samples_done": state.samples_done, "global_step": state.global_step,
            "best_top1": state.best_top1, "best_epoch": state.best_epoch,
            "seconds": state.seconds + time.time() - t_start, "history": state.history,
            "epoch_stats": dataclasses.asdict(state.epoch_stats), "rng": rngs, "world_size": d.world,
            "dataset_len": len(train_ds), "config": cfg.to_dict(),
        }
        last = os.path.join(out, checkpoint_io.LAST)
        checkpoint_io.atomic_save(ckpt, last)
        if best:
            checkpoint_io.atomic_copy(last, os.path.join(out, checkpoint_io.BEST))

    if rng_states is not None:
        checkpoint_io.set_rng_state(rng_states)

    # ---- epochs ----
    consecutive_bad = 0
    lr = schedule.lr_at(schedule.step_count)
    per_update = cfg.batch_size * d.world * cfg.accum_steps
    for epoch in range(state.epoch, total_epochs):
        sampler.set_epoch(epoch, state.samples_done)
        stats = state.epoch_stats
        net.train()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        batches = iter(train_loader)
        update = state.samples_done // per_update
        t_epoch = time.time() - stats.seconds
        while update < updates_per_epoch:
            micro_batches = [next(batches, None) for _ in range(cfg.accum_steps)]
            if micro_batches[-1] is None:  # only after a resume with another world size: the epoch ends early
                break
            lr = schedule.apply()
            loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
            counted = n_images = 0
            for micro, (x, y, skipped) in enumerate(micro_batches):
                on_skipped(skipped)
                stats.skipped_images += len(skipped)
                weight = 1.0
                if x is None:  # the whole micro-batch was unreadable: a zero-weight pass keeps DDP in step
                    x, y, weight = torch.zeros(1, 3, *size), torch.zeros(1, dtype=torch.long), 0.0
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                target = y
                if mixup.active:
                    batch_index = update * cfg.accum_steps + micro
                    rng = np.random.default_rng(data.mix_seed(cfg.seed, epoch, batch_index, d.rank))
                    x, target = mixup(x, y, rng)
                sync = net.no_sync() if d.world > 1 and micro < cfg.accum_steps - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        logits = net(x)
                    loss = criterion(logits.float(), target)
                    scaler.scale(loss * (weight / cfg.accum_steps)).backward()
                loss_sum += loss.detach() * weight
                counted += int(weight)
                n_images += int(weight) * x.shape[0]
            total_loss, total_counted, total_images = _all_sum([loss_sum.item(), counted, n_images], d)
            if not math.isfinite(total_loss):
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad += 1
                stats.bad_steps += 1
                log.warn(f"non-finite loss at epoch {epoch + 1} update {update + 1}: update skipped "
                         f"({consecutive_bad} in a row, limit --max-bad-steps {cfg.max_bad_steps})")
                if consecutive_bad >= cfg.max_bad_steps:
                    last = os.path.join(out, checkpoint_io.LAST)
                    keep = (f"the last good checkpoint is {last}" if os.path.exists(last)
                            else "no checkpoint was written yet")
                    raise TrainingDiverged(
                        f"stopped: the loss was not finite for {consecutive_bad} updates in a row (epoch {epoch + 1}, "
                        f"update {update + 1}); {keep}. Try a lower --lr, --clip-grad 1.0, or --precision bf16 "
                        "instead of fp16.")
            else:
                consecutive_bad = 0
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                if total_counted:
                    stats.loss_sum += total_loss
                    stats.loss_count += total_counted
            schedule.step()
            update += 1
            state.global_step += 1
            state.samples_done = update * per_update
            stats.images += total_images
            stats.seconds = time.time() - t_epoch
            log.progress(epoch + 1, total_epochs, update, updates_per_epoch,
                         total_loss / max(1, total_counted), lr, stats.images / max(stats.seconds, 1e-9),
                         peak_memory_mib(d.device))
            if cfg.save_every and state.global_step % cfg.save_every == 0 and consecutive_bad == 0 \
                    and update < updates_per_epoch:
                save()

        # ---- end of epoch: evaluate, record, checkpoint ----
        train_seconds = time.time() - t_epoch
        skipped_total = int(_all_sum([stats.skipped_images], d)[0])
        top1, top5 = evaluate(model, val_loader, d, autocast, cfg.channels_last, on_skipped)
        record = {"epoch": epoch + 1, "train_loss": stats.loss_sum / max(1.0, stats.loss_count),
                  "top1": top1, "top5": top5}
        if ema is not None:
            record["ema_top1"], record["ema_top5"] = evaluate(ema.module, val_loader, d, autocast,
                                                              cfg.channels_last, on_skipped)
        record.update(lr=lr, img_per_s=stats.images / max(train_seconds, 1e-9),
                      peak_mem_mib=peak_memory_mib(d.device), skipped_steps=stats.bad_steps,
                      skipped_images=skipped_total, seconds=state.seconds + time.time() - t_start)
        state.history.append(record)
        improved = top1 > state.best_top1
        if improved:
            state.best_top1, state.best_epoch = top1, epoch + 1
        state.epoch, state.samples_done, state.epoch_stats = epoch + 1, 0, EpochStats()
        ema_text = f"  ema_top1 {record['ema_top1']:.2f}" if ema is not None else ""
        log.info(f"epoch {epoch + 1}/{total_epochs}  train_loss {record['train_loss']:.4f}  top1 {top1:.2f}  "
                 f"top5 {top5:.2f}{ema_text}  lr {lr:.3g}  {record['img_per_s']:.0f} img/s  "
                 f"peak {record['peak_mem_mib']:.0f} MiB  ({record['seconds']:.0f} s)")
        if d.main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                for k, v in record.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
        if consecutive_bad == 0:
            save(best=improved)

    # ---- summary ----
    final = state.history[-1] if state.history else {}
    summary = {
        "top1": final.get("top1"), "top5": final.get("top5"), "best_top1": state.best_top1,
        "best_epoch": state.best_epoch, "epochs": state.epoch, "world_size": d.world, "model": cfg.model,
        "fused": cfg.fused, "seconds": state.seconds + time.time() - t_start, "preset": cfg.preset,
        "dataset": cfg.dataset, "num_classes": num_classes, "img_size": cfg.img_size, "precision": cfg.precision,
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in state.history),
        "skipped_images": sum(r.get("skipped_images", 0) for r in state.history), "output": out,
    }
    if ema is not None and "ema_top1" in final:
        summary["ema_top1"], summary["ema_top5"] = final["ema_top1"], final["ema_top5"]
    if d.main:
        _write_json(os.path.join(out, "summary.json"), summary)
        if tb is not None:
            tb.close()
    best = f" (best {state.best_top1:.2f} at epoch {state.best_epoch})" if state.history else ""
    ema_text = f", EMA top-1 {summary['ema_top1']:.2f}%" if "ema_top1" in summary else ""
    log.info(f"done in {summary['seconds']:.0f} s: top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%{best}"
             f"{ema_text}; chance is {100 / num_classes:.1f}%. Results in {out}/summary.json")
    return summary
