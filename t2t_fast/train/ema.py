"""Exponential moving average of the model weights, evaluated beside the model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer update, over every floating-point
    entry of the state_dict (frozen parameters and buffers included, which stay equal to the model's).

    With ``warmup`` (timm's ``--model-ema-warmup`` form) the decay of update n (from 0) is capped at
    ``1 - (1 + n) ** -(2/3)``: the first update copies the weights and the average then spans about
    ``n ** (2/3)`` recent updates until the cap reaches ``decay``, so a short run's EMA is not dominated by the
    initial weights. Without it (the published recipe) the decay is ``decay`` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--model-ema-decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        if self.warmup:
            return min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        pairs = [(e, m) for e, m in zip(self.module.state_dict().values(), model.state_dict().values())
                 if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in pairs], [m.detach() for _, m in pairs], 1.0 - decay)
