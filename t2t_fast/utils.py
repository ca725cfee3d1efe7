"""Small shape helpers shared by the ops, the models and the oracle (no dependency beyond torch)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

IntPair = Union[int, Sequence[int]]


def to_pair(v: IntPair, name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 4) -> (3, 4)``; anything else is a TypeError naming ``name``."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v
    ):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def tokens_to_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Re-structurize (B, L, C) tokens into a (B, C, H, W) image view (no copy); L must equal H*W."""
    B, L, C = x.shape
    if L != hw[0] * hw[1]:
        raise ValueError(f"tokens: expected H*W = {hw[0]}*{hw[1]} = {hw[0] * hw[1]} tokens, got {L}")
    return x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
