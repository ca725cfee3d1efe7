"""Crash-safe checkpoint files and the RNG state that makes a resume exact.

A checkpoint is written to ``<name>.tmp`` in the same directory, flushed and fsync'ed, then renamed over
``<name>`` (``os.replace`` is atomic) and the directory is fsync'ed: a crash at any moment leaves either the
old file or the new one, never a torn one. Stray ``.tmp`` files of a killed writer are ignored.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

from t2t_fast.checkpoint import read_checkpoint
from t2t_fast.train.config import ConfigError

LAST, BEST = "last.pth", "best.pth"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file, flush, fsync, rename, fsync the directory)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_copy(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link when the filesystem allows, else a copy)."""
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def latest_checkpoint(directory: str) -> Optional[str]:
    """The newest ``*.pth`` in ``directory`` (``last.pth`` wins a tie), or None."""
    if not os.path.isdir(directory):
        return None
    found = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".pth")]
    if not found:
        return None
    return max(found, key=lambda p: (os.path.getmtime(p), os.path.basename(p) == LAST))


def load(path: str) -> dict:
    """A training checkpoint (``weights_only`` loading); ConfigError when missing, unreadable or not ours."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from None
    if "state_dict" not in ckpt or "optimizer" not in ckpt:
        raise ConfigError(f"--resume: {path!r} is not a t2t-fast training checkpoint (no state_dict/optimizer); "
                          "to start from weights only, use `t2t-fast finetune --checkpoint`")
    return ckpt


def rng_state() -> dict:
    """Every RNG this process draws from (torch CPU and CUDA, numpy, python), in weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device() % len(cuda)])
