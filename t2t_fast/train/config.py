"""Training configuration: the paper's recipe as defaults, timm-style flags, and the quick built-in preset.

A setting comes from, in order of precedence: the flag given by the user, the preset (``builtin`` when no
--data/--dataset is given, ``finetune`` for ``t2t-fast finetune``), the paper's ImageNet recipe (see
docs/training.md). A run shorter than its preset keeps the preset's warmup and cooldown in proportion (see
``resolve``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

DEFAULT_CIFAR_ROOT = "data"  # --dataset cifar10/cifar100 without --data: ./data/cifar-10-batches-py etc.

# Weight decay of the published training commands, per model family; others use 0.05.


class ConfigError(ValueError):
    """Bad input to a training run (a setting, a path, the data, a checkpoint that does not fit): the CLI prints
    the message and exits with status 2. Any other exception is a bug and keeps its traceback."""


_MODEL_WEIGHT_DECAY = {"t2t_vit_7": 0.03, "t2t_vit_10": 0.03, "t2t_vit_12": 0.03, "t2t_vit_19": 0.065,
                       "t2t_vit_24": 0.065, "t2t_vit_t_19": 0.065, "t2t_vit_t_24": 0.065}


@dataclass
class TrainConfig:
    """Every setting of a training run (field names are the flags' dest names)."""

    command: str = "train"
    preset: str = "imagenet"
    # data
    data: Optional[str] = None
    dataset: Optional[str] = None  # builtin | folder | cifar10 | cifar100 (None: folder with --data, else builtin)
    num_classes: Optional[int] = None
    train_samples: int = 8192
    val_samples: int = 1024
    workers: int = 4
    # model
    model: str = "t2t_vit_14"
    img_size: int = 224
    fused: bool = True
    grad_checkpoint: str = "none"
    channels_last: bool = False
    drop_path: float = 0.1
    checkpoint: Optional[str] = None  # finetune: the weights to start from
    pretrained: Optional[str] = None  # finetune: the published weights' tag ("" = the model's default)
    checkpoint_ema: bool = True
    # optimization
    opt: str = "adamw"
    batch_size: int = 128
    epochs: int = 300
    cooldown_epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10
    warmup_lr: float = 1e-6
    weight_decay: Optional[float] = None  # None: the published value for the model
    momentum: float = 0.9
    backbone_lr_scale: float = 1.0
    layer_decay: Optional[float] = None  # layer-wise lr decay through the model's group_matcher
    clip_grad: Optional[float] = None
    accum_steps: int = 1
    precision: str = "fp32"
    # augmentation
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    aa: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    crop_pct: Optional[float] = None  # None: the model's pretrained_cfg (0.9); 1.0 for in-memory datasets
    interpolation: str = "bicubic"
    # EMA
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    model_ema_warmup: bool = True
    # run
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"
    output: Optional[str] = None
    resume: Optional[str] = None
    save_every: int = 1000
    log_interval: int = 50
    max_bad_steps: int = 20
    # what resolve() changed from the preset for this run, in words (printed in the banner; not a setting)
    adjusted: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict[str, Any]] = {
    # `t2t-fast train` with no data: a few CPU minutes on the built-in dataset
    "builtin": dict(model="t2t_vit_7", img_size=32, num_classes=8, batch_size=64, epochs=8, cooldown_epochs=0,
                    lr=1e-3, warmup_epochs=1, drop_path=0.0, aa="none", color_jitter=0.0, reprob=0.0, mixup=0.0,
                    cutmix=0.0, scale=(0.6, 1.0), crop_pct=1.0, model_ema_decay=0.99,
                    workers=0, save_every=0, log_interval=10),
    # `t2t-fast finetune`: the paper's CIFAR transfer (SGD 0.05, wd 5e-4, 60 epochs cosine, backbone lr x0.01)
    "finetune": dict(opt="sgd", lr=0.05, weight_decay=5e-4, momentum=0.9, backbone_lr_scale=0.01, epochs=60,
                     cooldown_epochs=0, warmup_epochs=0, min_lr=0.0, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0,
                     model_ema=False, crop_pct=1.0, color_jitter=0.0),
}


def _defaults_help(name: str, command: str) -> str:
    """'default X; builtin preset Y' for a flag's help ('' when there is nothing to say)."""
    base = TrainConfig().__dict__[name]
    parts = [] if base is None else [f"default {_fmt(base)}"]
    for preset in ("builtin", "finetune") if command == "finetune" else ("builtin",):
        if name in PRESETS[preset]:
            parts.append(f"{preset} preset {_fmt(PRESETS[preset][name])}")
    return "; ".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def build_parser(command: str = "train", prog: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The argparse parser of ``t2t-fast train`` or ``t2t-fast finetune``.

    Flags the user does not give are absent from the namespace (``SUPPRESS``), so presets can fill them.
    """
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog or f"t2t-fast {command}")
    S = argparse.SUPPRESS

    def add(group, *flags, dest: str, **kw):
        defaults = _defaults_help(dest, command)
        if defaults and kw.get("action") not in ("store_true", "store_false"):  # switches say it in words
            kw["help"] = f"{kw.get('help', '')} ({defaults})".strip()
        group.add_argument(*flags, dest=dest, default=S, **kw)

    g = parser.add_argument_group("data")
    add(g, "--data", dest="data", metavar="DIR",
        help="ImageFolder root holding train/ and val/, or the folder holding a CIFAR python-pickle folder "
        f"(CIFAR default: ./{DEFAULT_CIFAR_ROOT})")
    add(g, "--dataset", dest="dataset", choices=("builtin", "folder", "cifar10", "cifar100"),
        help="builtin: generated lines/shapes/textures, no download; default: folder when --data is given")
    add(g, "--num-classes", dest="num_classes", type=int, help="classes of the builtin dataset (2..8); for other "
        "datasets, a check against the data")
    add(g, "--train-samples", dest="train_samples", type=int, help="builtin dataset: training images")
    add(g, "--val-samples", dest="val_samples", type=int, help="builtin dataset: validation images")
    add(g, "-j", "--workers", dest="workers", type=int, help="DataLoader worker processes per GPU/process")

    g = parser.add_argument_group("model")
    add(g, "--model", dest="model", metavar="NAME", help="see t2t_fast.list_models()")
    add(g, "--img-size", dest="img_size", type=int, help="input size (a multiple of 16)")
    add(g, "--no-fused", dest="fused", action="store_false",
        help="run the reference (unfused) T2T module and attention, to compare")
    add(g, "--grad-checkpoint", dest="grad_checkpoint", choices=("none", "t2t", "blocks", "all"),
        help="recompute activations in backward to save memory")
    add(g, "--channels-last", dest="channels_last", action="store_true", help="channels-last input images")
    add(g, "--drop-path", dest="drop_path", type=float, help="stochastic depth rate")
    if command == "finetune":
        add(g, "--checkpoint", dest="checkpoint", metavar="PATH",
            help="weights to start from (a t2t-fast or published checkpoint); its head is replaced")
        add(g, "--pretrained", dest="pretrained", nargs="?", const="", metavar="TAG",
            help="start from the model's published weights instead of --checkpoint (downloaded once into "
            "torch.hub's cache); TAG picks one of several, e.g. in1k_384 (see t2t_fast.models.pretrained)")
        add(g, "--checkpoint-no-ema", dest="checkpoint_ema", action="store_false",
            help="use the checkpoint's model weights even when it holds EMA weights")

    g = parser.add_argument_group("optimization")
    add(g, "--opt", dest="opt", choices=("adamw", "sgd"))
    add(g, "-b", "--batch-size", dest="batch_size", type=int, help="per process (GPU)")
    add(g, "--epochs", dest="epochs", type=int, help="epochs of the cosine schedule (cooldown comes after)")
    add(g, "--cooldown-epochs", dest="cooldown_epochs", type=int,
        help="epochs at --min-lr after the cosine; a preset's value shrinks in proportion with a shorter --epochs")
    add(g, "--lr", dest="lr", type=float, help="peak learning rate (published: 1e-3 for 4x128 images)")
    add(g, "--min-lr", dest="min_lr", type=float)
    add(g, "--warmup-epochs", dest="warmup_epochs", type=float,
        help="linear warmup (may be fractional); a preset's value shrinks in proportion with a shorter --epochs")
    add(g, "--warmup-lr", dest="warmup_lr", type=float)
    add(g, "--weight-decay", "--wd", dest="weight_decay", type=float,
        help="None: 0.03 for t2t_vit_7/10/12, 0.065 for 19/24, else 0.05")
    add(g, "--momentum", dest="momentum", type=float, help="SGD momentum")
    add(g, "--backbone-lr-scale", dest="backbone_lr_scale", type=float,
        help="learning-rate multiplier of every parameter but the head")
    add(g, "--layer-decay", dest="layer_decay", type=float,
        help="layer-wise learning-rate decay (e.g. 0.75): block i of L gets decay ** (L - i), "
             "the stem decay ** (L + 1)")
    add(g, "--clip-grad", dest="clip_grad", type=float, help="max global gradient norm")
    add(g, "--accum-steps", dest="accum_steps", type=int, help="micro-batches per optimizer update")
    add(g, "--precision", dest="precision", choices=("fp32", "bf16", "fp16"),
        help="autocast dtype (fp16 adds a GradScaler)")

    g = parser.add_argument_group("augmentation")
    add(g, "--scale", dest="scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random-resized-crop area")
    add(g, "--ratio", dest="ratio", type=float, nargs=2, metavar=("MIN", "MAX"), help="random-resized-crop aspect")
    add(g, "--hflip", dest="hflip", type=float, help="horizontal flip probability")
    add(g, "--aa", dest="aa", metavar="SPEC", help="RandAugment 'rand-m9-mstd0.5-inc1', or 'none'")
    add(g, "--color-jitter", dest="color_jitter", type=float, help="used only with --aa none (as timm)")
    add(g, "--reprob", dest="reprob", type=float, help="random erasing probability")
    add(g, "--mixup", dest="mixup", type=float, help="mixup alpha (0: off)")
    add(g, "--cutmix", dest="cutmix", type=float, help="cutmix alpha (0: off)")
    add(g, "--mixup-switch-prob", dest="mixup_switch_prob", type=float,
        help="probability of cutmix when both are on")
    add(g, "--smoothing", dest="smoothing", type=float, help="label smoothing")
    add(g, "--crop-pct", dest="crop_pct", type=float, help="eval: center crop fraction; None: the model's (0.9)")
    add(g, "--interpolation", dest="interpolation", choices=("bilinear", "bicubic", "nearest"))

    g = parser.add_argument_group("EMA")
    add(g, "--model-ema", dest="model_ema", action="store_true",
        help="keep and evaluate an EMA of the weights (on, except for finetune)")
    add(g, "--no-model-ema", dest="model_ema", action="store_false", help="no EMA")
    add(g, "--model-ema-decay", dest="model_ema_decay", type=float)
    add(g, "--model-ema-warmup", dest="model_ema_warmup", action="store_true",
        help="cap the decay at 1 - (1+n)^(-2/3) after n updates, so short runs average recent weights (on)")
    add(g, "--no-model-ema-warmup", dest="model_ema_warmup", action="store_false",
        help="the plain decay from the first update (the published recipe)")

    g = parser.add_argument_group("run")
    add(g, "--seed", dest="seed", type=int)
    add(g, "--deterministic", dest="deterministic", action="store_true",
        help="deterministic algorithms: a resumed run reproduces the uninterrupted one (bitwise on CPU)")
    add(g, "--device", dest="device", choices=("auto", "cpu", "cuda"))
    add(g, "--output", dest="output", metavar="DIR",
        help="run directory (checkpoints, metrics.jsonl, summary.json); None: output/<command>/<time>-<model>")
    add(g, "--resume", dest="resume", metavar="PATH|auto",
        help="continue a run: a checkpoint, or 'auto' for the newest in --output (none there: start fresh)")
    add(g, "--save-every", dest="save_every", type=int, help="also checkpoint every N updates (0: epochs only)")
    add(g, "--log-interval", dest="log_interval", type=int, help="updates between log lines")
    add(g, "--max-bad-steps", dest="max_bad_steps", type=int,
        help="stop after this many non-finite losses in a row")
    return parser


def resolve(given: Union[argparse.Namespace, dict, Sequence[str], TrainConfig, None] = None,
            command: str = "train") -> TrainConfig:
    """A complete, validated ``TrainConfig`` from CLI args, a namespace, or a dict of overrides (see module doc).

    A preset's warmup and cooldown are sized for its own number of epochs (the ImageNet recipe: 10 and 10 of
    300). When --epochs is shorter and --warmup-epochs/--cooldown-epochs are not given, each keeps its share
    of the run (warmup may become fractional; cooldown is rounded down to whole epochs); ``adjusted`` says so.
    """
    if isinstance(given, TrainConfig):
        return given
    if given is None:
        given = {}
    if isinstance(given, (list, tuple)):
        given = build_parser(command).parse_args(list(given))
    if isinstance(given, argparse.Namespace):
        given = vars(given)
    if not isinstance(given, dict):
        raise TypeError(f"train: expected CLI args, an argparse.Namespace, a dict or a TrainConfig, "
                        f"got {type(given).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"adjusted"}
    unknown = sorted(set(given) - known - {"command"})
    if unknown:
        raise ConfigError(f"unknown training settings: {unknown}")
    given = {k: v for k, v in given.items() if k != "command"}
    dataset = given.get("dataset") or ("folder" if given.get("data") else "builtin")
    values: dict[str, Any] = {}
    if command == "finetune":
        preset = "finetune"
        if dataset == "builtin":
            values.update({k: v for k, v in PRESETS["builtin"].items() if k != "num_classes"})
        values.update(PRESETS["finetune"])
    elif dataset == "builtin":
        preset = "builtin"
        values.update(PRESETS["builtin"])
    else:
        preset = "imagenet"
    preset_epochs = values.get("epochs", TrainConfig.epochs)
    values.update(given)
    values.update(command=command, preset=preset, dataset=dataset)
    if dataset in ("cifar10", "cifar100") and values.get("data") is None:
        values["data"] = DEFAULT_CIFAR_ROOT
    for k in ("scale", "ratio"):
        if k in values:
            values[k] = tuple(values[k])
    cfg = TrainConfig(**values)
    if cfg.weight_decay is None:
        cfg.weight_decay = _MODEL_WEIGHT_DECAY.get(cfg.model, 0.05)
    cfg.adjusted = _fit_schedule(cfg, preset_epochs, given)
    validate(cfg)
    return cfg


def _fit_schedule(cfg: TrainConfig, preset_epochs: int, given: dict) -> tuple[str, ...]:
    """Shrink the preset's warmup and cooldown for a run shorter than the preset (in place); what changed."""
    if not 0 < cfg.epochs < preset_epochs:
        return ()
    share = cfg.epochs / preset_epochs
    changes = []
    if "warmup_epochs" not in given and cfg.warmup_epochs > 0:
        new = round(cfg.warmup_epochs * share, 3)
        changes.append(f"warmup {cfg.warmup_epochs:g} -> {new:g}")
        cfg.warmup_epochs = new
    if "cooldown_epochs" not in given and cfg.cooldown_epochs > 0:
        new = int(cfg.cooldown_epochs * share)
        changes.append(f"cooldown {cfg.cooldown_epochs} -> {new}")
        cfg.cooldown_epochs = new
    if not changes:
        return ()
    return (f"the preset's {' and '.join(changes)} epochs, scaled to --epochs {cfg.epochs} of its {preset_epochs}",)


def validate(cfg: TrainConfig) -> None:
    """ConfigError naming the first setting that cannot work (the model name included). Files and data are
    checked by the trainer, which reads them all before it creates anything."""
    positive = ("batch_size", "accum_steps", "img_size", "train_samples", "val_samples")
    for k in positive:
        if getattr(cfg, k) < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    for k in ("epochs", "cooldown_epochs", "warmup_epochs", "workers", "save_every", "max_bad_steps"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
    if cfg.epochs + cfg.cooldown_epochs < 1:
        raise ConfigError("--epochs plus --cooldown-epochs must be at least 1")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs:g} exceeds --epochs {cfg.epochs}")
    if cfg.img_size % 16:
        raise ConfigError(f"--img-size must be a multiple of 16, got {cfg.img_size}")
    for k in ("reprob", "hflip", "smoothing", "mixup_switch_prob", "drop_path"):
        if not 0.0 <= getattr(cfg, k) <= 1.0:
            raise ConfigError(f"--{k.replace('_', '-')} must be in [0, 1], got {getattr(cfg, k)}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.model_ema and not 0.0 <= cfg.model_ema_decay < 1.0:
        raise ConfigError(f"--model-ema-decay must be in [0, 1), got {cfg.model_ema_decay}")
    if cfg.dataset == "builtin" and cfg.num_classes is not None and not 2 <= cfg.num_classes <= 8:
        raise ConfigError(f"--num-classes: the builtin dataset has 2..8 classes, got {cfg.num_classes}")
    if cfg.dataset != "builtin" and cfg.data is None:
        raise ConfigError(f"--dataset {cfg.dataset} needs --data DIR")
    from t2t_fast.models import list_models

    if cfg.model not in list_models():
        raise ConfigError(f"--model {cfg.model!r} is not a model here; available: {', '.join(list_models())}")
    if cfg.command == "finetune" and (cfg.checkpoint is None) == (cfg.pretrained is None):
        raise ConfigError("finetune needs the weights to start from: either --checkpoint PATH or --pretrained "
                          "[TAG], not both")
    if cfg.resume == "auto" and cfg.output is None:
        raise ConfigError("--resume auto needs --output DIR (the run directory to look in)")
    from t2t_fast.train.augment import parse_rand_augment

    try:
        parse_rand_augment(cfg.aa)
    except ValueError as e:
        raise ConfigError(str(e)) from None
