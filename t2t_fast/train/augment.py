"""Augmentation on tensors, no torchvision needed.

Per-image transforms take a (3, H, W) image and a ``torch.Generator`` that holds all of their randomness, so
an image's augmentation is a function of its seed alone (the same with 0 or 16 DataLoader workers, and the
same after a resume). Pixel values are float in [0, 255] until ``normalize``.

- ``TrainTransform``: random-resized-crop, horizontal flip, RandAugment (``rand-m9-mstd0.5-inc1``) or color
  jitter, normalize, random erasing.
- ``EvalTransform``: resize the shorter side to ``img_size / crop_pct``, center crop, normalize.
- ``MixupCutmix``: batch-level mixup / cutmix with label smoothing, returning soft targets.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(g: torch.Generator, n: int) -> int:
    """Uniform in [0, n)."""
    return int(torch.randint(n, (), generator=g).item())


def _gauss(g: torch.Generator, mean: float, std: float) -> float:
    return mean + std * torch.randn((), generator=g).item()


# ------------------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------------------
def resize(img: Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """(C, H, W) float -> (C, *size), antialiased when shrinking; values clamped to [0, 255]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "nearest"
    kw = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
    return F.interpolate(img.unsqueeze(0), size=size, mode=mode, **kw).squeeze(0).clamp_(0, 255)


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction ``scale`` of the area with aspect ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, height - h + 1), _randint(g, width - w + 1), h, w
    # fall back to a central crop with the aspect clamped into ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop(img: Tensor, size: tuple[int, int], crop_pct: float, interpolation: str) -> Tensor:
    """Scale so the crop of ``size`` covers ``crop_pct`` of the shorter side, then take the center crop."""
    H, W = img.shape[-2:]
    scale = max(size[0] / H, size[1] / W) / crop_pct
    new = (max(size[0], int(math.floor(H * scale + 1e-6))), max(size[1], int(math.floor(W * scale + 1e-6))))
    img = resize(img, new, interpolation)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return img[:, top:top + size[0], left:left + size[1]]


def affine(img: Tensor, matrix: Sequence[float], fill: Sequence[float]) -> Tensor:
    """Warp with an affine map from output to input pixel coordinates about the image center.

    ``matrix`` (a, b, c, d, e, f): input (x, y) = (a x + b y + c, d x + e y + f), in pixels relative to the
    center. Pixels mapped from outside the image get ``fill`` (one value per channel).
    """
    C, H, W = img.shape
    a, b, c, d, e, f = matrix
    # normalized coordinates: x_n = x / (W / 2), so the pixel matrix is conjugated by the scaling
    theta = torch.tensor([[a, b * H / W, c * 2 / W], [d * W / H, e, f * 2 / H]], dtype=img.dtype).unsqueeze(0)
    grid = F.affine_grid(theta, [1, C + 1, H, W], align_corners=False)
    src = torch.cat([img, torch.ones(1, H, W, dtype=img.dtype)]).unsqueeze(0)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(0)
    inside = out[C:]
    fill_t = torch.tensor(fill, dtype=img.dtype).view(C, 1, 1)
    return (out[:C] + (1 - inside) * fill_t).clamp_(0, 255)


# ------------------------------------------------------------------------------------------------------------
# colour
# ------------------------------------------------------------------------------------------------------------
def grayscale(img: Tensor) -> Tensor:
    """(3, H, W) -> (1, H, W) luma (ITU-R 601)."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def blend(degenerate: Tensor, img: Tensor, factor: float) -> Tensor:
    """``degenerate + factor * (img - degenerate)``, clamped: the PIL ImageEnhance rule."""
    return (degenerate + factor * (img - degenerate)).clamp_(0, 255)


def adjust_brightness(img: Tensor, f: float) -> Tensor:
    return (img * f).clamp_(0, 255)


def adjust_contrast(img: Tensor, f: float) -> Tensor:
    return blend(grayscale(img).mean().expand_as(img), img, f)


def adjust_saturation(img: Tensor, f: float) -> Tensor:
    return blend(grayscale(img).expand_as(img), img, f)


def adjust_sharpness(img: Tensor, f: float) -> Tensor:
    """Blend with a 3x3 smoothed copy (center weight 5, border pixels kept)."""
    kernel = torch.ones(3, 3, dtype=img.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(img.shape[0], 1, 3, 3)
    smooth = img.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(img.unsqueeze(0), kernel, groups=img.shape[0]).squeeze(0)
    return blend(smooth, img, f)


def autocontrast(img: Tensor) -> Tensor:
    lo = img.amin(dim=(1, 2), keepdim=True)
    hi = img.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((img - lo) * scale).clamp_(0, 255)


def equalize(img: Tensor) -> Tensor:
    """Per-channel histogram equalization of the rounded 8-bit values (the PIL ImageOps rule)."""
    out = torch.empty_like(img)
    for ch in range(img.shape[0]):
        v = img[ch].round().clamp(0, 255).long()
        hist = torch.bincount(v.flatten(), minlength=256)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            out[ch] = img[ch]
            continue
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(max=255)
        out[ch] = lut[v].to(img.dtype)
    return out


def posterize(img: Tensor, bits: int) -> Tensor:
    shift = 2 ** (8 - max(0, min(8, bits)))
    return torch.floor(img.round() / shift) * shift


def solarize(img: Tensor, threshold: float) -> Tensor:
    return torch.where(img >= threshold, 255 - img, img)


def solarize_add(img: Tensor, add: float, threshold: float = 128) -> Tensor:
    return torch.where(img < threshold, (img + add).clamp(max=255), img)


# ------------------------------------------------------------------------------------------------------------
# RandAugment
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandAugmentSpec:
    """Parsed ``rand-m9-n2-mstd0.5-inc1-mmax10``: ``num_ops`` ops per image, each applied with probability
    0.5, at magnitude ``magnitude`` (of ``magnitude_max``) plus Gaussian noise of std ``magnitude_std``."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    magnitude_max: float = 10.0


def parse_rand_augment(spec: str) -> Optional[RandAugmentSpec]:
    """``'none'``/``''`` -> None; ``'rand-m9-mstd0.5-inc1'`` -> RandAugmentSpec. ValueError otherwise."""
    if spec in (None, "", "none", "None"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"--aa must be 'none' or 'rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>][-mmax<X>]', got {spec!r}")
    fields = {}
    keys = {"m": ("magnitude", float), "n": ("num_ops", int), "mstd": ("magnitude_std", float),
            "inc": ("increasing", lambda s: bool(int(s))), "mmax": ("magnitude_max", float)}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match or match.group(1) not in keys:
            raise ValueError(f"--aa {spec!r}: cannot read {part!r} (known: m, n, mstd, inc, mmax)")
        name, conv = keys[match.group(1)]
        fields[name] = conv(match.group(2))
    return RandAugmentSpec(**fields)


class RandAugment:
    """RandAugment on (3, H, W) float images: ``num_ops`` random ops from the standard 15, each with p=0.5."""

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[float]):
        self.spec, self.fill = spec, tuple(fill)
        self.ops: list[tuple[str, Callable[[Tensor, float, torch.Generator], Tensor]]] = [
            ("auto_contrast", lambda x, m, g: autocontrast(x)),
            ("equalize", lambda x, m, g: equalize(x)),
            ("invert", lambda x, m, g: 255 - x),
            ("rotate", self._rotate),
            ("posterize", self._posterize),
            ("solarize", self._solarize),
            ("solarize_add", lambda x, m, g: solarize_add(x, int(110 * m))),
            ("color", lambda x, m, g: adjust_saturation(x, self._enhance(m, g))),
            ("contrast", lambda x, m, g: adjust_contrast(x, self._enhance(m, g))),
            ("brightness", lambda x, m, g: adjust_brightness(x, self._enhance(m, g))),
            ("sharpness", lambda x, m, g: adjust_sharpness(x, self._enhance(m, g))),
            ("shear_x", lambda x, m, g: affine(x, (1, self._signed(0.3 * m, g), 0, 0, 1, 0), self.fill)),
            ("shear_y", lambda x, m, g: affine(x, (1, 0, 0, self._signed(0.3 * m, g), 1, 0), self.fill)),
            ("translate_x", lambda x, m, g: affine(x, (1, 0, self._signed(0.45 * m, g) * x.shape[2], 0, 1, 0),
                                                    self.fill)),
            ("translate_y", lambda x, m, g: affine(x, (1, 0, 0, 0, 1, self._signed(0.45 * m, g) * x.shape[1]),
                                                    self.fill)),
        ]

    @staticmethod
    def _signed(v: float, g: torch.Generator) -> float:
        return v if _uniform(g) < 0.5 else -v

    def _enhance(self, m: float, g: torch.Generator) -> float:
        # increasing: 1 +- 0.9 m (stronger with m); original: 0.1 + 1.8 m (no sign)
        return 1.0 + self._signed(0.9 * m, g) if self.spec.increasing else 0.1 + 1.8 * m

    def _rotate(self, x: Tensor, m: float, g: torch.Generator) -> Tensor:
        a = math.radians(self._signed(30.0 * m, g))
        return affine(x, (math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0), self.fill)

    def _posterize(self, x: Tensor, m: float, g: torch.Generator) -> Tensor:
        return posterize(x, 4 - int(4 * m) if self.spec.increasing else 4 + int(4 * m))

    def _solarize(self, x: Tensor, m: float, g: torch.Generator) -> Tensor:
        return solarize(x, 256 - int(256 * m) if self.spec.increasing else int(256 * m))

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        s = self.spec
        for _ in range(s.num_ops):
            _, op = self.ops[_randint(g, len(self.ops))]
            if _uniform(g) >= 0.5:
                continue
            m = s.magnitude if s.magnitude_std <= 0 else _gauss(g, s.magnitude, s.magnitude_std)
            img = op(img, min(max(m, 0.0), s.magnitude_max) / s.magnitude_max, g)
        return img


def color_jitter(img: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation each scaled by U(1 - s, 1 + s), in random order."""
    ops = [adjust_brightness, adjust_contrast, adjust_saturation]
    for i in torch.randperm(3, generator=g).tolist():
        img = ops[i](img, _uniform(g, max(0.0, 1 - strength), 1 + strength))
    return img


def random_erase(img: Tensor, prob: float, g: torch.Generator, area: tuple[float, float] = (0.02, 1 / 3),
                 log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> Tensor:
    """With probability ``prob`` replace one random rectangle of a normalized image by N(0, 1) noise."""
    if prob <= 0 or _uniform(g) >= prob:
        return img
    C, H, W = img.shape
    for _ in range(10):
        target = H * W * _uniform(g, *area)
        aspect = math.exp(_uniform(g, *log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if h < H and w < W:
            top, left = _randint(g, H - h + 1), _randint(g, W - w + 1)
            img[:, top:top + h, left:left + w] = torch.randn(C, h, w, generator=g, dtype=img.dtype)
            break
    return img


# ------------------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------------------
class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor([255.0 * m for m in mean]).view(-1, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


class TrainTransform:
    """uint8 (3, H, W) -> normalized float (3, S, S): crop, flip, RandAugment or jitter, normalize, erase.

    Like timm, color jitter is applied only when RandAugment is off.
    """

    def __init__(self, img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 aa: str = "none", color_jitter: float = 0.0, reprob: float = 0.0, interpolation: str = "bicubic"):
        self.size, self.scale, self.ratio, self.hflip = tuple(img_size), tuple(scale), tuple(ratio), hflip
        self.interpolation, self.color_jitter, self.reprob = interpolation, color_jitter, reprob
        spec = parse_rand_augment(aa)
        self.rand_augment = RandAugment(spec, [round(255 * m) for m in mean]) if spec else None
        self.normalize = Normalize(mean, std)

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        img = img.float()
        top, left, h, w = random_resized_crop_box(img.shape[1], img.shape[2], self.scale, self.ratio, g)
        img = resize(img[:, top:top + h, left:left + w], self.size, self.interpolation)
        if self.hflip > 0 and _uniform(g) < self.hflip:
            img = img.flip(-1)
        if self.rand_augment is not None:
            img = self.rand_augment(img, g)
        elif self.color_jitter > 0:
            img = color_jitter(img, self.color_jitter, g)
        return random_erase(self.normalize(img), self.reprob, g).contiguous()


class EvalTransform:
    """uint8 (3, H, W) -> normalized float (3, S, S): resize to ``S / crop_pct``, center crop, normalize."""

    def __init__(self, img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 crop_pct: float = 0.9, interpolation: str = "bicubic"):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct, self.interpolation = tuple(img_size), crop_pct, interpolation
        self.normalize = Normalize(mean, std)

    def __call__(self, img: Tensor, g: Optional[torch.Generator] = None) -> Tensor:
        img = resize_center_crop(img.float(), self.size, self.crop_pct, self.interpolation)
        return self.normalize(img).contiguous()


class MixupCutmix:
    """Batch mixup / cutmix (each sample paired with the batch reversed) and label smoothing.

    ``__call__(x, y, rng)`` -> (mixed x, soft targets (B, num_classes) float). When both alphas are positive,
    cutmix is chosen with probability ``switch_prob``. Cutmix's mixing weight is corrected to the pasted area.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.switch_prob, self.smoothing = switch_prob, smoothing

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def soft_targets(self, y: Tensor) -> Tensor:
        off = self.smoothing / self.num_classes
        t = torch.full((y.shape[0], self.num_classes), off, device=y.device)
        return t.scatter_(1, y.view(-1, 1), 1.0 - self.smoothing + off)

    def __call__(self, x: Tensor, y: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        targets = self.soft_targets(y)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            H, W = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(rng.integers(H)), int(rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
