"""The built-in dataset: procedurally generated images of lines, shapes and textures (no download).

Every image is drawn from a seed, so the dataset is the same on every machine and in every run. The class of
an image is decided by its local structure (stripe orientation, grids, dots, rings, ...), never by its colour:
colours, periods, phases, offsets and noise are random, so a model has to look at patterns to learn it.
Classes are symmetric under horizontal flips, so flip augmentation keeps labels right.
"""
from __future__ import annotations

import math

import torch

CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "rings",
           "grid lines", "squares")
TRAIN_SEED, VAL_SEED = 20210128, 20210129  # fixed: the data never depends on --seed


def _pattern(label: int, y: torch.Tensor, x: torch.Tensor, period: torch.Tensor, phase: torch.Tensor,
             g: torch.Generator) -> torch.Tensor:
    """Intensity in [0, 1] of class ``label`` on (n, H, W) pixel coordinates ``y``, ``x``."""
    two_pi = 2 * math.pi
    sharp = lambda s: 0.5 + 0.5 * torch.tanh(3.0 * s)  # noqa: E731  (soft binarization)
    n = y.shape[0]
    if label == 0:
        return sharp(torch.sin(two_pi * y / period + phase))
    if label == 1:
        return sharp(torch.sin(two_pi * x / period + phase))
    if label == 2:
        sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
        return sharp(torch.sin(two_pi * (x + sign * y) / (period * math.sqrt(2)) + phase))
    if label == 3:
        return sharp(torch.sin(two_pi * x / period + phase) * torch.sin(two_pi * y / period + phase))
    if label == 4:
        fy = torch.remainder(y / period + phase, 1.0) - 0.5
        fx = torch.remainder(x / period + phase, 1.0) - 0.5
        return sharp((0.3 - torch.sqrt(fy * fy + fx * fx)) * 8)
    if label == 5:
        cy, cx = (torch.rand(2, n, 1, 1, generator=g) - 0.5) * y.shape[1]
        return sharp(torch.sin(two_pi * torch.sqrt((y - cy) ** 2 + (x - cx) ** 2) / period + phase))
    if label == 6:
        fy = torch.remainder(y / period + phase, 1.0)
        fx = torch.remainder(x / period + phase, 1.0)
        return ((fy < 0.18) | (fx < 0.18)).float()
    # squares: a few filled axis-aligned squares of random size and position
    H, W = y.shape[1:]
    out = torch.zeros_like(y)
    for _ in range(3):
        side = (0.2 + 0.25 * torch.rand(n, 1, 1, generator=g)) * min(H, W)
        y0 = torch.rand(n, 1, 1, generator=g) * (H - side) - H / 2  # coordinates are centred
        x0 = torch.rand(n, 1, 1, generator=g) * (W - side) - W / 2
        inside = (y >= y0) & (y < y0 + side) & (x >= x0) & (x < x0 + side)
        out = torch.maximum(out, inside.float())
    return out


def generate(n: int, img_size: int, seed: int, num_classes: int = len(CLASSES)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``num_classes`` balanced classes, deterministic in ``seed``.

    Returns (images (n, 3, img_size, img_size) uint8, labels (n,) int64).
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"the built-in dataset has 2..{len(CLASSES)} classes, got num_classes={num_classes}")
    if n < 1 or img_size < 8:
        raise ValueError(f"need n >= 1 and img_size >= 8, got n={n}, img_size={img_size}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    images = torch.empty(n, 3, img_size, img_size, dtype=torch.uint8)
    coords = torch.arange(img_size, dtype=torch.float32)
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        k = idx.numel()
        if k == 0:
            continue
        # a small random rotation, scale and shift of the pixel grid, per image
        angle = (torch.rand(k, 1, 1, generator=g) - 0.5) * math.radians(16)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        yy, xx = yy - img_size / 2, xx - img_size / 2
        y = yy * torch.cos(angle) - xx * torch.sin(angle)
        x = yy * torch.sin(angle) + xx * torch.cos(angle)
        period = img_size * (0.12 + 0.16 * torch.rand(k, 1, 1, generator=g))
        phase = torch.rand(k, 1, 1, generator=g) * 2 * math.pi
        v = _pattern(c, y, x, period, phase, g).unsqueeze(1)  # (k, 1, H, W)
        bg = torch.rand(k, 3, 1, 1, generator=g)
        fg = torch.rand(k, 3, 1, 1, generator=g)
        # keep a visible contrast: push the foreground away from the background
        fg = torch.where((fg - bg).abs().mean(1, keepdim=True) < 0.3, 1.0 - bg, fg)
        img = bg + (fg - bg) * v + 0.06 * torch.randn(k, 3, img_size, img_size, generator=g)
        images[idx] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels
