"""Datasets, resumable samplers and loaders.

Datasets are indexed by ``(index, seed)`` pairs: the sampler hands each sample its augmentation seed, so an
image's augmentation depends only on (run seed, epoch, index), whatever the number of workers or processes,
and a resumed run sees exactly the images and augmentations the uninterrupted run would have.

Unreadable images (truncated, not an image, ...) are skipped: the dataset returns a ``Skipped`` marker and
``collate`` drops it and reports it with the batch, so the training loop can count and warn.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from t2t_fast.train import synthetic
from t2t_fast.train.config import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class Skipped(NamedTuple):
    """Stands in for a sample that could not be read."""

    path: str
    error: str


Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class ImageFolder(Dataset):
    """``root/<class>/**/<image>`` decoded with Pillow: ``ds[(i, seed)]`` -> (transformed image, label).

    Classes are the sorted sub-directory names (pass ``classes`` to use the train split's for val).
    """

    def __init__(self, root: str, transform: Optional[Transform], classes: Optional[list[str]] = None):
        if not os.path.isdir(root):
            raise ConfigError(f"data: {root!r} is not a directory")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise ConfigError(f"data: {root!r} has no class sub-directories (expected {root}/<class>/<images>)")
        if classes is not None and set(found) - set(classes):
            raise ConfigError(f"data: {root!r} has classes that the train split lacks: "
                             f"{sorted(set(found) - set(classes))[:5]}")
        self.root, self.transform = root, transform
        self.classes = classes if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in found:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                self.samples += [(os.path.join(dirpath, f), index[c]) for f in sorted(files)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise ConfigError(f"data: no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        path, label = self.samples[i]
        try:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # any decoding failure makes the image unreadable, not the run
            return Skipped(path, f"{type(e).__name__}: {e}")
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return self.transform(img, torch.Generator().manual_seed(seed)), label


class TensorImages(Dataset):
    """In-memory uint8 images (N, 3, H, W) and labels (N,): ``ds[(i, seed)]`` -> (transformed image, label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Transform],
                 classes: list[str]):
        self.images, self.labels, self.transform, self.classes = images, labels, transform, classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        return self.transform(self.images[i], torch.Generator().manual_seed(seed)), int(self.labels[i])


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise ConfigError(f"data: missing CIFAR file {path!r}") from None
    except Exception as e:
        raise ConfigError(f"data: cannot read CIFAR file {path!r} ({type(e).__name__}: {e})") from None


def find_cifar_dir(root: str, name: str) -> str:
    """The ``cifar-10-batches-py`` / ``cifar-100-python`` folder: ``root`` itself or inside it."""
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    for cand in (root, os.path.join(root, folder)):
        marker = "data_batch_1" if name == "cifar10" else "train"
        if os.path.isfile(os.path.join(cand, marker)):
            return cand
    raise ConfigError(f"data: no {folder} folder at {root!r} (expected {os.path.join(root, folder)} with the "
                     f"python-pickle files; download it from https://www.cs.toronto.edu/~kriz/cifar.html and "
                     "extract it there)")


def load_cifar(root: str, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10/100 from the python-pickle folder: (uint8 images (N, 3, 32, 32), labels (N,), class names)."""
    d = find_cifar_dir(root, name)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
    else:
        files = ["train" if split == "train" else "test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
    data, labels = [], []
    for f in files:
        batch = _unpickle(os.path.join(d, f))
        if b"data" not in batch or label_key not in batch:
            raise ConfigError(f"data: {os.path.join(d, f)!r} is not a CIFAR batch (keys {sorted(batch)[:5]})")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(batch[label_key])
    num = 10 if name == "cifar10" else 100
    meta_path = os.path.join(d, meta_file)
    classes = ([n.decode() for n in _unpickle(meta_path)[names_key]] if os.path.isfile(meta_path)
               else [str(i) for i in range(num)])
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.long), classes


@dataclass
class DataSpec:
    """What to train on: ``dataset`` is 'builtin', 'folder', 'cifar10' or 'cifar100'."""

    dataset: str
    root: Optional[str]
    num_classes: Optional[int]  # builtin only (None: all of them)
    img_size: int  # builtin only: the generated size
    train_samples: int  # builtin only
    val_samples: int  # builtin only


def build_datasets(spec: DataSpec, train_tf: Optional[Transform] = None,
                   eval_tf: Optional[Transform] = None) -> tuple[Dataset, Dataset]:
    """(train, val) datasets, each with ``classes`` and a settable ``transform``; ConfigError naming what is
    missing or wrong."""
    if spec.dataset == "builtin":
        n_cls = spec.num_classes or len(synthetic.CLASSES)
        tr = synthetic.generate(spec.train_samples, spec.img_size, synthetic.TRAIN_SEED, n_cls)
        va = synthetic.generate(spec.val_samples, spec.img_size, synthetic.VAL_SEED, n_cls)
        classes = list(synthetic.CLASSES[:n_cls])
        return TensorImages(*tr, train_tf, classes), TensorImages(*va, eval_tf, classes)
    if spec.root is None:
        raise ConfigError(f"--dataset {spec.dataset} needs --data DIR")
    if not os.path.isdir(spec.root):
        raise ConfigError(f"data: --data {spec.root!r} is not a directory")
    if spec.dataset in ("cifar10", "cifar100"):
        x, y, classes = load_cifar(spec.root, spec.dataset, "train")
        xv, yv, _ = load_cifar(spec.root, spec.dataset, "test")
        return TensorImages(x, y, train_tf, classes), TensorImages(xv, yv, eval_tf, classes)
    if spec.dataset != "folder":
        raise ConfigError(f"--dataset must be builtin, folder, cifar10 or cifar100, got {spec.dataset!r}")
    splits = {s: os.path.join(spec.root, s) for s in ("train", "val")}
    missing = [s for s, p in splits.items() if not os.path.isdir(p)]
    if missing:
        raise ConfigError(f"data: --data {spec.root!r} must hold train/ and val/ ImageFolder trees; missing: "
                         f"{', '.join(m + '/' for m in missing)}")
    train = ImageFolder(splits["train"], train_tf)
    return train, ImageFolder(splits["val"], eval_tf, classes=train.classes)


class TrainSampler(Sampler):
    """Shuffled, distributed, resumable: yields ``(index, augmentation seed)`` for this rank's full batches.

    Epoch ``e`` shuffles with seed (seed, e) and pads to a multiple of ``world`` (as DistributedSampler). The
    first ``start`` entries of that global order are skipped (already trained on, by all ranks together); of
    the rest, rank r takes every ``world``-th. With the same world size, resuming at ``start`` continues
    exactly where the uninterrupted run would be.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.padded = -(-n // world) * world
        self.batches_per_epoch = self.padded // world // batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``; skip the first ``start`` samples of its global order (a multiple of world*batch)."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        return torch.cat([perm, perm[: self.padded - self.n]]) if self.padded > self.n else perm

    def batches_left(self) -> int:
        return max(0, (self.padded - self.start) // self.world // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.order()[self.start:][self.rank::self.world][: self.batches_left() * self.batch_size]
        return ((i, mix_seed(self.seed, self.epoch, i)) for i in mine.tolist())

    def __len__(self) -> int:
        return self.batches_left() * self.batch_size


class EvalSampler(Sampler):
    """Every ``world``-th sample from ``rank`` (no padding, so distributed metrics count each image once)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, 0) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: list) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Skipped]]:
    """-> (images (B, C, H, W) or None, labels (B,) or None, skipped samples)."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if not good:
        return None, None, skipped
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.long), skipped


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool,
                seed: int) -> DataLoader:
    """A DataLoader that never touches the global RNG (its own generator), so resumes stay exact."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed),
                      prefetch_factor=4 if workers > 0 else None)
