"""Optimizers with the paper's parameter groups, and the per-step cosine schedule with warmup and cooldown."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = (),
                 lr_scale: Optional[Callable[[str], float]] = None) -> list[dict]:
    """Parameter groups for the optimizer.

    No weight decay on 1-D parameters (norms, biases), on any ``*.bias`` and on the names in
    ``no_weight_decay`` (``cls_token``); frozen parameters (``requires_grad=False``: the performer's random
    features ``w``, the sinusoid ``pos_embed``) are left out entirely. ``lr_scale(name)`` gives a parameter's
    learning-rate multiplier (stored as the group's ``lr_scale``; the scheduler applies it).
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(".bias") and name not in skip
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale, "param_names": []})
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``adamw`` (betas and eps at their defaults, as the paper) or ``sgd`` (momentum, as the transfer recipe).

    AdamW on CUDA parameters is the fused implementation: a few launches per step instead of several per
    parameter tensor, which at T2T-ViT sizes would cost more host time than the GPU takes (as the benchmarks'
    training step runs it)."""
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, fused=True if on_cuda else None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"--opt must be 'adamw' or 'sgd', got {name!r}")


class CosineSchedule:
    """Learning rate per optimizer update: linear warmup from ``warmup_lr``, cosine from ``lr`` down to
    ``min_lr`` at the end of the main epochs, then ``min_lr`` through the cooldown.

    The state is the number of updates done, so a resumed run continues the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_lr: float,
                 warmup_steps: int, main_steps: int):
        if warmup_steps > main_steps:
            raise ValueError(f"warmup ({warmup_steps} steps) is longer than the schedule ({main_steps} steps)")
        self.optimizer, self.lr, self.min_lr, self.warmup_lr = optimizer, lr, min_lr, warmup_lr
        self.warmup_steps, self.main_steps = warmup_steps, main_steps
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if step >= self.main_steps:
            return self.min_lr
        t = (step - self.warmup_steps) / max(1, self.main_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self) -> float:
        """Set the learning rate of every group for the next update; returns the base rate."""
        lr = self.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
