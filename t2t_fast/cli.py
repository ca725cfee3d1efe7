"""The ``t2t-fast`` command: ``train``, ``finetune`` and ``info``."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from typing import Optional, Sequence

EPILOG = """examples:
  t2t-fast train                                   # built-in dataset, a few CPU minutes
  t2t-fast train --data /imagenet --model t2t_vit_14 --output runs/t2t14
  torchrun --nproc_per_node 8 -m t2t_fast train --data /imagenet -b 64 --lr 5e-4 --output runs/t2t14
  t2t-fast finetune --checkpoint runs/t2t14/best.pth --dataset cifar10 --data /data --output runs/c10
  t2t-fast info
"""


def build_parser() -> argparse.ArgumentParser:
    from t2t_fast.train.config import build_parser as train_parser

    parser = argparse.ArgumentParser(prog="t2t-fast", description="Fused Tokens-to-Token ViT: train, finetune, "
                                     "inspect the installed backends.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,finetune,info}")
    train_parser("train", parser=sub.add_parser(
        "train", help="train from scratch (the paper's recipe; the quick built-in preset without data)",
        description="Train a T2T-ViT from scratch with the paper's ImageNet recipe. Without --data/--dataset it "
        "trains on the built-in generated dataset with a quick preset (t2t_vit_7 at 32 px, a few CPU minutes). "
        "Under torchrun it runs DDP (NCCL on GPU, gloo on CPU)."))
    train_parser("finetune", parser=sub.add_parser(
        "finetune", help="transfer a checkpoint to new classes (the paper's CIFAR recipe)",
        description="Fine-tune a checkpoint to a new dataset: the head is replaced for the new classes, SGD "
        "(momentum 0.9, lr 0.05, wd 5e-4, 60 epochs cosine) with the backbone at 0.01x the head's lr; "
        "pos_embed follows --img-size."))
    sub.add_parser("info", help="versions, devices and the fused-op backends available here",
                   description="Print versions, devices and which fused-op backends can run here.")
    return parser


def info() -> str:
    """Versions, devices and backends, as text."""
    import torch

    import t2t_fast

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"t2t-fast {t2t_fast.__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    lines += [f"{pkg} {version(pkg)}" for pkg in ("triton", "numpy", "pillow", "timm", "tensorboard")]
    if torch.cuda.is_available():
        lines += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        lines.append("no CUDA device")
    lines.append(f"fused-op backend selected: {t2t_fast.get_backend()}")
    for name, b in t2t_fast.backends().items():
        lines.append(f"  {name:<10} {'available' if b else 'unavailable':<12} {b.reason}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``t2t-fast``; returns the exit status (0 ok, 1 training stopped, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        print(info())
        return 0
    from t2t_fast.train import ConfigError, TrainingDiverged, finetune, train

    settings = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        (train if args.command == "train" else finetune)(settings)
    except TrainingDiverged as e:
        print(f"t2t-fast {args.command}: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # bad input; any other exception is a bug and keeps its traceback
        print(f"t2t-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
