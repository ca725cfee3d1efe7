"""The run folder: its lock, its checkpoints, ``metrics.jsonl``, ``summary.json`` and TensorBoard events.

Every file of a run is written here, by rank 0 only. A lock file (``run.lock``: owner pid, host and start time)
keeps a second run out of a folder in use; a lock left by a run that died on this host (its pid is gone) is
recognized as stale and taken over.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from typing import Any, Optional

from t2t_fast.train import checkpoint_io
from t2t_fast.train.config import ConfigError

LOCK = "run.lock"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def _write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temp file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def _describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


class RunDir:
    """The output folder of one run. Nothing is created until ``open()``; on ranks other than 0 every write is a
    no-op (``main=False``)."""

    def __init__(self, path: str, main: bool = True):
        self.path, self.main = path, main
        self.lock_path = os.path.join(path, LOCK)
        self.last = os.path.join(path, checkpoint_io.LAST)
        self.best = os.path.join(path, checkpoint_io.BEST)
        self._locked = False
        self._tb = None

    # ---- before open(): read only ----
    def latest_checkpoint(self) -> Optional[str]:
        return checkpoint_io.latest_checkpoint(self.path)

    def lock_owner(self) -> Optional[dict]:
        """The live run holding this folder's lock (its pid, host, start time), or None when the folder is free or
        the lock is stale (its pid is gone on this host). A lock that cannot be read counts as held."""
        try:
            with open(self.lock_path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
        if not isinstance(owner, dict):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
                and not _pid_alive(owner["pid"]):
            return None
        return owner

    # ---- open / close ----
    def open(self) -> Optional[str]:
        """Create the folder and take its lock (rank 0). Returns a note when a stale lock was taken over. Raises
        ConfigError when another run holds the folder."""
        if not self.main:
            return None
        os.makedirs(self.path, exist_ok=True)
        note = None
        owner = self.lock_owner()
        if owner is not None:
            raise self._busy(owner)
        if os.path.exists(self.lock_path):
            with open(self.lock_path) as f:
                note = f"took over the stale lock of a run that is gone ({_describe_owner(json.load(f))})"
            os.remove(self.lock_path)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another run started between the check and here
            raise self._busy(self.lock_owner() or {}) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.write("\n")
        self._locked = True
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            pass
        else:
            self._tb = SummaryWriter(os.path.join(self.path, "tensorboard"))
        return note

    def _busy(self, owner: dict) -> ConfigError:
        return ConfigError(f"--output {self.path!r} is in use by another run ({_describe_owner(owner)}; lock file "
                           f"{self.lock_path}). Wait for it to end or choose another --output; if that run is no "
                           "longer running, delete the lock file.")

    def close(self) -> None:
        """Flush TensorBoard and release the lock (safe to call twice)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._locked:
            self._locked = False
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass

    # ---- writes (rank 0) ----
    def save_checkpoint(self, ckpt: dict, best: bool = False) -> None:
        """``last.pth`` atomically; with ``best``, ``best.pth`` becomes a copy of it."""
        if not self.main:
            return
        checkpoint_io.atomic_save(ckpt, self.last)
        if best:
            checkpoint_io.atomic_copy(self.last, self.best)

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.jsonl``: exactly the finished epochs of the run, one JSON line each (rewritten whole, so a
        resumed run's file matches its checkpoint)."""
        if self.main:
            _write_text(os.path.join(self.path, METRICS), "".join(json.dumps(r) + "\n" for r in history))

    def add_scalars(self, record: dict, step: int) -> None:
        """One epoch's numbers to TensorBoard, when it is installed."""
        if self._tb is None:
            return
        for k, v in record.items():
            if k != "epoch":
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main:
            _write_text(os.path.join(self.path, SUMMARY), json.dumps(summary, indent=2) + "\n")
