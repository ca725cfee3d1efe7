"""Loading published (and our own) checkpoints into t2t-fast models."""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import zipfile
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

_WRAPPERS = ("state_dict", "model", "module")
_SHOWN = 3  # key names quoted per list in a mismatch message; the exception keeps the full lists
# the pickled magic number that opens a legacy (non-zip) torch.save file
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _what_is(path: str, error: BaseException) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused holds, in words, judged by its content."""
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:  # a readable pickle that holds objects, not only weights: loading it could run code
        return (f"a pickle that holds a {refused.group(1)} object, which weights-only loading refuses (only "
                "tensors, numbers, strings and containers of them are read)")
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"a truncated or corrupt PyTorch checkpoint (a zip archive without its directory; {size} bytes)"
        return f"a zip archive that is not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
    if head.startswith(_LEGACY_MAGIC):
        return f"a truncated or corrupt PyTorch checkpoint (legacy format; {size} bytes)"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return ("a safetensors file, not a torch.save checkpoint: read it with safetensors.torch.load_file(path) "
                "and pass the dict")
    if head.startswith(b"\x80") and isinstance(error, pickle.UnpicklingError):
        return "a Python pickle, not a PyTorch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        start = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file ({start!r}...), not a PyTorch checkpoint"
    return f"not a PyTorch checkpoint (unrecognized content, {size} bytes, starting {head[:8].hex(' ')})"


def read_checkpoint(src: Union[str, os.PathLike, dict]) -> dict:
    """The checkpoint dict at a path (loaded on CPU with ``weights_only=True``; the argparse Namespace that
    timm-trained checkpoints carry is allowed), or ``src`` itself when it already is a dict.

    A file that is missing, empty, truncated or not a PyTorch checkpoint raises one ValueError naming the path
    and what it holds."""
    if isinstance(src, dict):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(src).__name__}")
    path = os.fspath(src)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no file at {path!r}")
    try:
        # timm-trained checkpoints (the published ones) carry their argparse Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises a different type for each kind of bad file
        raise ValueError(f"checkpoint {path!r} cannot be read: it is {_what_is(path, e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def unwrap_state_dict(ckpt: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: under ``state_dict_ema`` (if ``use_ema``), ``state_dict``,
    ``model`` or ``module``, or the dict itself; a ``module.`` (DataParallel/DDP) prefix is removed."""
    keys = (("state_dict_ema", "model_ema") if use_ema else ()) + _WRAPPERS
    for key in keys:
        if isinstance(ckpt.get(key), dict) and ckpt[key]:
            ckpt = ckpt[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError("checkpoint: found no state_dict (tried state_dict_ema, state_dict, model, module and the "
                         f"top level; top-level keys: {sorted(ckpt)[:10]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}


def _natural(key: str) -> list:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """What a T2T-ViT/TNT state_dict's shapes say about the model it belongs to, in words (e.g. 'a T2T-ViT
    (performer tokens-to-token) with 14 blocks of width 384, 1000 classes, img_size 224')."""
    if "pixel_embed.proj.weight" in sd:
        kind = "a TNT"
    elif any(k.startswith("tokens_to_token.") for k in sd):
        performer = any(k.endswith("attention1.w") for k in sd)
        kind = f"a T2T-ViT ({'performer' if performer else 'transformer'} tokens-to-token)"
    else:
        kind = "a model"
    facts = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    if depth:
        facts.append(f"{depth} blocks" + (f" of width {width}" if width is not None else ""))
    if "head.weight" in sd and sd["head.weight"].dim() == 2:
        facts.append(f"{sd['head.weight'].shape[0]} classes")
    pos = sd.get("pos_embed", sd.get("patch_pos"))
    if pos is not None and pos.dim() == 3:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:  # both models have one token per 16 x 16 pixels, plus the class token
            facts.append(f"img_size {16 * side}")
    return kind + (" with " + ", ".join(facts) if facts else "")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model. The message summarizes; the full lists are
    ``missing`` and ``unexpected`` (key names) and ``mismatched`` ({key: (checkpoint shape, model shape)})."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _mismatch_error(model: nn.Module, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                    raw: dict[str, torch.Tensor], source: str,
                    saved_for: Optional[str]) -> Optional[CheckpointMismatchError]:
    """The error for loading ``sd`` (``raw`` before the model's checkpoint_filter) into ``model`` (``own`` is
    its state_dict), or None when it fits."""
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and v.shape != own[k].shape}
    missing = sorted(set(own) - set(sd), key=_natural)
    unexpected = sorted(set(sd) - set(own), key=_natural)
    if not (missing or unexpected or mismatched):
        return None

    def first(items: list[str]) -> str:
        more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
        return ", ".join(items[:_SHOWN]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
    if mismatched:
        names = sorted(mismatched, key=_natural)
        parts.append(f"{len(names)} keys of another shape (checkpoint vs model): "
                     + first([f"{k} {mismatched[k][0]} vs {mismatched[k][1]}" for k in names]))
    origin = f" (saved for {saved_for!r})" if saved_for else ""
    message = (f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + ". Its shapes suggest "
               f"{describe_state_dict(raw)}{origin}; the model is {describe_state_dict(own)}. The full lists are the "
               "exception's .missing, .unexpected and .mismatched.")
    return CheckpointMismatchError(message, missing, unexpected, mismatched)


def _saved_for(ckpt: dict) -> Optional[str]:
    """The model name a checkpoint records: ours under 'model', timm's in its argparse Namespace 'args'."""
    name = ckpt.get("model")
    if isinstance(name, str):
        return name
    name = getattr(ckpt.get("args"), "model", None)
    return name if isinstance(name, str) else None


def load_checkpoint(model: nn.Module, path_or_dict: Union[str, os.PathLike, dict], use_ema: bool = True,
                    strict: bool = True, exclude: Sequence[str] = ()) -> nn.Module:
    """Load weights into ``model`` from a checkpoint path or dict (any wrapper format, see
    ``unwrap_state_dict``). The model's ``checkpoint_filter`` adapts it first (e.g. resizes ``pos_embed``
    for another img_size). With ``strict``, missing, unexpected or mis-shaped keys raise a
    ``CheckpointMismatchError`` (a ValueError) that summarizes them and says what model the checkpoint's
    shapes suggest; without, they are skipped. Keys starting with a prefix in ``exclude`` are ignored on both
    sides (``exclude=("head.",)`` keeps the model's own classifier). Returns ``model``."""
    ckpt = read_checkpoint(path_or_dict)
    sd = raw = unwrap_state_dict(ckpt, use_ema)
    if hasattr(model, "checkpoint_filter"):
        sd = model.checkpoint_filter(sd)
    own = model.state_dict()
    if exclude:
        prefixes = tuple(exclude)
        sd = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
        own = {k: v for k, v in own.items() if not k.startswith(prefixes)}
    if strict:
        source = "checkpoint" if isinstance(path_or_dict, dict) else f"checkpoint {os.fspath(path_or_dict)!r}"
        error = _mismatch_error(model, sd, own, raw, source, _saved_for(ckpt))
        if error is not None:
            raise error
    model.load_state_dict({k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}, strict=False)
    return model
