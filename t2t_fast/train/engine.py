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
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import t2t_fast
from t2t_fast.checkpoint import CheckpointMismatchError, load_checkpoint
from t2t_fast.models.layers import layer_decay_lr_scale
from t2t_fast.train import checkpoint_io, data
from t2t_fast.train.augment import EvalTransform, MixupCutmix, TrainTransform
from t2t_fast.train.config import ConfigError, TrainConfig
from t2t_fast.train.ema import ModelEMA
from t2t_fast.train.optim import CosineSchedule, build_optimizer, param_groups
from t2t_fast.train.rundir import RunDir

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
        raise ConfigError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
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


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------
def load_pretrained(model: nn.Module, path: str, use_ema: bool, model_name: str) -> None:
    """Backbone weights from a checkpoint into ``model``, keeping ``model``'s fresh head (new classes).
    ConfigError when the file cannot be read or does not fit."""
    try:
        load_checkpoint(model, path, use_ema=use_ema, exclude=("head.",))
    except CheckpointMismatchError as e:
        raise ConfigError(f"--checkpoint {path!r} is not a {model_name} checkpoint (choose the matching --model): "
                          f"{e}") from None
    except ValueError as e:
        raise ConfigError(f"--checkpoint: {e}") from None


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


class RunState:
    """Everything a training checkpoint holds, and the one place that knows its format.

    The stateful parts (model, EMA, optimizer, GradScaler, schedule) are referenced, not copied; the run's
    progress (epoch, position in the epoch, updates, best accuracy, history, running sums) lives here.
    ``identity`` (model, num_classes, img_size) must match for a resume; ``info`` (fused, world_size,
    dataset_len, config) is recorded for information. ``rngs`` holds every rank's RNG state: the trainer gathers
    it before ``state_dict()`` (a collective) and reads it after ``load_state_dict()``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: CosineSchedule,
                 scaler: torch.amp.GradScaler, ema: Optional[ModelEMA], identity: dict[str, Any],
                 info: dict[str, Any], session_start: float):
        self.model, self.optimizer, self.schedule, self.scaler, self.ema = model, optimizer, schedule, scaler, ema
        self.identity, self.info, self.session_start = identity, info, session_start
        self.epoch = 0  # the epoch in progress (= epochs completed)
        self.samples_done = 0  # of this epoch's global order, by all ranks
        self.global_step = 0  # optimizer updates (skipped ones included)
        self.best_top1, self.best_epoch = -1.0, 0
        self.seconds_before = 0.0  # wall time of earlier sessions of this run
        self.history: list[dict] = []
        self.epoch_stats = EpochStats()
        self.rngs: list[dict] = []

    def seconds(self) -> float:
        """Wall time of the whole run, earlier sessions included."""
        return self.seconds_before + time.time() - self.session_start

    def state_dict(self) -> dict:
        """The checkpoint: weights under ``state_dict`` (and ``state_dict_ema``), so ``load_checkpoint`` reads
        it like a published one, beside everything a resume needs."""
        ema = self.ema
        return {
            "format": CHECKPOINT_FORMAT, **self.identity, **self.info,
            "state_dict": self.model.state_dict(),
            **({"state_dict_ema": ema.module.state_dict(), "ema_updates": ema.updates} if ema else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "scheduler": self.schedule.state_dict(),
            "epoch": self.epoch, "samples_done": self.samples_done, "global_step": self.global_step,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "seconds": self.seconds(),
            "history": self.history, "epoch_stats": dataclasses.asdict(self.epoch_stats), "rng": self.rngs,
        }

    def load_state_dict(self, ckpt: dict) -> list[str]:
        """Restore every part from a ``state_dict()``; returns warnings about what could not be continued exactly.
        ConfigError when the checkpoint belongs to another run (model, num_classes or img_size differ)."""
        wrong = [f"{k} {ckpt.get(k)!r} (this run: {v!r})" for k, v in self.identity.items() if ckpt.get(k) != v]
        if wrong:
            raise ConfigError("the checkpoint belongs to another run: it has " + ", ".join(wrong)
                              + "; resume with the same --model/--img-size/data, or start a new --output")
        notes = []
        load_checkpoint(self.model, {"state_dict": ckpt["state_dict"]}, use_ema=False)
        if self.ema is not None:
            if "state_dict_ema" in ckpt:
                self.ema.module.load_state_dict(ckpt["state_dict_ema"])
                self.ema.updates = int(ckpt.get("ema_updates", 0))
            else:
                notes.append("the checkpoint has no EMA weights; the EMA starts from the model's")
                self.ema.module.load_state_dict(self.model.state_dict())
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        self.epoch, self.samples_done, self.global_step = ckpt["epoch"], ckpt["samples_done"], ckpt["global_step"]
        self.best_top1, self.best_epoch = ckpt["best_top1"], ckpt["best_epoch"]
        self.seconds_before, self.history = ckpt["seconds"], ckpt["history"]
        self.epoch_stats = EpochStats(**ckpt["epoch_stats"])
        self.rngs = ckpt["rng"]
        if ckpt.get("dataset_len") != self.info["dataset_len"]:
            notes.append(f"the training set had {ckpt.get('dataset_len')} images, now {self.info['dataset_len']}: "
                         "the data order differs from the interrupted run")
        if len(self.rngs) != self.info["world_size"]:
            notes.append(f"checkpoint written by {len(self.rngs)} processes, now {self.info['world_size']}: data "
                         "position kept, random streams re-seeded (not an exact continuation)")
        return notes


def _output_dir(cfg: TrainConfig, d: Dist) -> str:
    """The run folder (not created here): --output, else the folder of --resume PATH, else a new
    output/<command>/<YYYYmmdd-HHMMSS>-<model>-<dataset> (rank 0's clock decides under DDP)."""
    if cfg.output is not None:
        return cfg.output
    if cfg.resume not in (None, "auto"):
        return os.path.dirname(os.path.abspath(cfg.resume))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _broadcast(os.path.join("output", cfg.command, f"{stamp}-{cfg.model}-{cfg.dataset}"), d)


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to OUTPUT/summary.json by rank 0)."""
    t_start = time.time()
    d = setup_distributed(cfg.device)
    try:
        with determinism(cfg.deterministic, d.device):
            trainer = Trainer(cfg, d, t_start)
            try:
                trainer.fit()
                return trainer.finish()
            finally:
                trainer.close()
    finally:
        if d.owns_group:
            dist.destroy_process_group()


class Trainer:
    """One training run: ``Trainer(cfg, d, t_start)`` builds it (restored from a checkpoint if asked), then
    ``fit()``, ``finish()`` and ``close()``.

    The build reads and checks everything first (data, model, weights to start from, the checkpoint to resume)
    and only then creates the run folder, takes its lock and prints the banner: bad input fails with a
    ConfigError before anything is written.
    """

    def __init__(self, cfg: TrainConfig, d: Dist, t_start: float):
        self.cfg, self.d = cfg, d
        self.log = Log(d.main, cfg.log_interval, d.rank)
        self._skip_warnings = 0
        self.consecutive_bad = 0
        self.run_dir = RunDir(_output_dir(cfg, d), d.main)
        resume_path = self._resume_path()
        self._build_data()
        self._build_model(load_weights=cfg.command == "finetune" and resume_path is None)
        self._build_optimization()
        self.state = RunState(self.model, self.optimizer, self.schedule, self.scaler, self.ema,
                              identity={"model": cfg.model, "num_classes": self.num_classes, "img_size": cfg.img_size},
                              info={"fused": cfg.fused, "world_size": d.world, "dataset_len": len(self.train_ds),
                                    "config": cfg.to_dict()},
                              session_start=t_start)
        notes = self._restore(resume_path) if resume_path is not None else []
        self._open_output(resume_path, notes)

    # ---- build steps ----
    def _resume_path(self) -> Optional[str]:
        """The checkpoint to continue from, or None for a new run; a new run refuses a folder holding one."""
        cfg = self.cfg
        existing = self.run_dir.latest_checkpoint()
        if cfg.resume is None:
            if existing:
                raise ConfigError(f"--output {self.run_dir.path!r} already holds a checkpoint "
                                  f"({os.path.basename(existing)}): pass --resume auto to continue that run, or "
                                  "choose another --output")
            return None
        if cfg.resume == "auto":
            return existing
        if not os.path.isfile(cfg.resume):
            raise ConfigError(f"--resume: no checkpoint file at {cfg.resume!r}")
        return cfg.resume

    def _build_data(self) -> None:
        """The datasets (transforms are attached by ``_build_model``, from the model's pretrained_cfg)."""
        cfg = self.cfg
        spec = data.DataSpec(cfg.dataset, cfg.data, cfg.num_classes, min(cfg.img_size, 64),  # builtin: <= 64 px
                             cfg.train_samples, cfg.val_samples)
        self.train_ds, self.val_ds = data.build_datasets(spec)
        self.num_classes = len(self.train_ds.classes)
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ConfigError(f"--num-classes {cfg.num_classes}, but the data has {self.num_classes} classes")

    def _build_model(self, load_weights: bool) -> None:
        """The model (identical initial weights on every rank, then per-rank randomness), the finetune weights,
        the EMA and the DDP wrapper."""
        cfg, d = self.cfg, self.d
        seed_everything(cfg.seed)
        published = load_weights and cfg.pretrained is not None
        name = cfg.model + (f".{cfg.pretrained}" if published and cfg.pretrained else "")
        try:
            model = t2t_fast.create_model(name, pretrained=published, img_size=cfg.img_size,
                                          num_classes=self.num_classes, drop_path_rate=cfg.drop_path,
                                          fused=cfg.fused)
        except (ValueError, RuntimeError) as e:
            if not published:
                raise
            raise ConfigError(f"--pretrained: {e}") from None
        if load_weights and not published:
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

    def _attach_transforms(self, pcfg: dict) -> None:
        cfg = self.cfg
        size = (cfg.img_size, cfg.img_size)
        crop_pct = cfg.crop_pct if cfg.crop_pct is not None else (pcfg["crop_pct"] if cfg.dataset == "folder"
                                                                  else 1.0)
        self.train_ds.transform = TrainTransform(size, pcfg["mean"], pcfg["std"], cfg.scale, cfg.ratio, cfg.hflip,
                                                 cfg.aa, cfg.color_jitter, cfg.reprob, cfg.interpolation)
        self.val_ds.transform = EvalTransform(size, pcfg["mean"], pcfg["std"], crop_pct, cfg.interpolation)

    def _build_optimization(self) -> None:
        """Sampler and loaders, optimizer, schedule, precision, mixup and loss."""
        cfg, d, model = self.cfg, self.d, self.model
        self.sampler = data.TrainSampler(len(self.train_ds), cfg.batch_size, d.rank, d.world, cfg.seed)
        self.updates_per_epoch = self.sampler.batches_per_epoch // cfg.accum_steps
        if self.updates_per_epoch < 1:
            raise ConfigError(f"the training set ({len(self.train_ds)} images) is smaller than one update: batch "
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
                                       round(cfg.warmup_epochs * self.updates_per_epoch),
                                       cfg.epochs * self.updates_per_epoch)
        self.total_epochs = cfg.epochs + cfg.cooldown_epochs
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
        self.mixup = MixupCutmix(self.num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.smoothing)
        self.criterion = _loss_fn(self.mixup, cfg.smoothing)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _restore(self, path: str) -> list[str]:
        """Load a training checkpoint into every part of the run (the RNG streams last, in ``_open_output``);
        returns what to tell the user."""
        ckpt = checkpoint_io.load(path)
        try:
            notes = self.state.load_state_dict(ckpt)
        except ConfigError as e:
            raise ConfigError(f"--resume {path!r}: {e}") from None
        state = self.state
        if state.epoch >= self.total_epochs:
            done = f"resumed from {path}: all {self.total_epochs} epochs are done (raise --epochs to go on)"
        else:
            done = (f"resumed from {path}: epoch {state.epoch + 1}, update {state.global_step}"
                    + (f", {state.samples_done} images into the epoch" if state.samples_done else ""))
        return [f"--resume: {n}" for n in notes] + [done]

    def _open_output(self, resume_path: Optional[str], notes: list[str]) -> None:
        """Everything is checked: create the folder and take its lock (rank 0; every rank fails if it cannot),
        print the banner, write metrics.jsonl, and set the restored RNG streams last (nothing may draw from
        them before training does)."""
        d = self.d
        error = taken_over = None
        if d.main:
            try:
                taken_over = self.run_dir.open()
            except ConfigError as e:
                error = str(e)
        error = _broadcast(error, d)
        if error is not None:
            raise ConfigError(error)
        try:
            self._banner()
            for line in ([taken_over] if taken_over else []) + notes:
                self.log.info(line)
            if self.cfg.resume == "auto" and resume_path is None:
                self.log.info(f"--resume auto: no checkpoint in {self.run_dir.path} yet, starting a new run")
            self.run_dir.write_metrics(self.state.history)
        except BaseException:
            self.run_dir.close()
            raise
        if len(self.state.rngs) == d.world:
            checkpoint_io.set_rng_state(self.state.rngs[d.rank])

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
        ema = "off"
        if self.ema:
            ema = f"{cfg.model_ema_decay:g}" + (" with warmup" if cfg.model_ema_warmup else "")
        self.log.info(f"model {cfg.model} ({n_params / 1e6:.2f}M params, img {cfg.img_size}, {ops}); {d.world} "
                      f"process(es) on {d.device.type}, {cfg.precision}; batch {cfg.batch_size} x {d.world}{accum}, "
                      f"{cfg.opt} lr {cfg.lr:g} wd {cfg.weight_decay:g}; EMA {ema}; output {self.run_dir.path}")
        warmup = self.schedule.warmup_steps
        self.log.info(f"schedule: {self.total_epochs} epochs in all ({cfg.epochs} cosine + {cfg.cooldown_epochs} "
                      f"cooldown at {cfg.min_lr:g}) of {self.updates_per_epoch} updates; warmup {cfg.warmup_epochs:g} "
                      f"epochs = {warmup} update{'s' if warmup != 1 else ''}"
                      + "".join(f"; {note}" for note in cfg.adjusted))
        if cfg.precision == "fp16" and d.device.type == "cpu":
            self.log.warn("--precision fp16 on the CPU runs far slower than fp32 (few CPU kernels are fast in "
                          "float16); use --precision bf16 (same memory savings, no GradScaler) or fp32")

    def close(self) -> None:
        """Release the run folder (its lock, TensorBoard)."""
        self.run_dir.close()

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
        """Checkpoint everything (every rank contributes its RNG state; rank 0 writes)."""
        mine = checkpoint_io.rng_state()
        rngs = [mine]
        if self.d.world > 1:
            rngs = [None] * self.d.world
            dist.all_gather_object(rngs, mine)
        self.state.rngs = rngs
        if self.d.main:
            self.run_dir.save_checkpoint(self.state.state_dict(), best)

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
            last = self.run_dir.last
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
                      skipped_images=int(_all_sum([stats.skipped_images], d)[0]), seconds=state.seconds())
        state.history.append(record)
        improved = top1 > state.best_top1
        if improved:
            state.best_top1, state.best_epoch = top1, epoch + 1
        state.epoch, state.samples_done, state.epoch_stats = epoch + 1, 0, EpochStats()
        ema_text = f"  ema_top1 {record['ema_top1']:.2f}" if self.ema is not None else ""
        self.log.info(f"epoch {epoch + 1}/{self.total_epochs}  train_loss {record['train_loss']:.4f}  top1 "
                      f"{top1:.2f}  top5 {top5:.2f}{ema_text}  lr {lr:.3g}  {record['img_per_s']:.0f} img/s  "
                      f"peak {record['peak_mem_mib']:.0f} MiB  ({record['seconds']:.0f} s)")
        self.run_dir.write_metrics(state.history)
        self.run_dir.add_scalars(record, epoch + 1)
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
            "fused": cfg.fused, "seconds": state.seconds(), "preset": cfg.preset, "dataset": cfg.dataset,
            "num_classes": self.num_classes, "img_size": cfg.img_size, "precision": cfg.precision,
            "skipped_steps": sum(r["skipped_steps"] for r in state.history),
            "skipped_images": sum(r["skipped_images"] for r in state.history), "output": self.run_dir.path,
        }
        if "ema_top1" in final:
            summary["ema_top1"], summary["ema_top5"] = final["ema_top1"], final["ema_top5"]
        self.run_dir.write_summary(summary)
        ema_text = f", EMA top-1 {summary['ema_top1']:.2f}%" if "ema_top1" in summary else ""
        self.log.info(f"done in {summary['seconds']:.0f} s: top-1 {summary['top1']:.2f}%  top-5 "
                      f"{summary['top5']:.2f}% (best {state.best_top1:.2f} at epoch {state.best_epoch}){ema_text}; "
                      f"chance is {100 / self.num_classes:.1f}%. Results in {self.run_dir.path}/summary.json")
        return summary
