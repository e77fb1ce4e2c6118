"""The run's output folder: created and checked before any work, and locked so that two runs never share it.

``RunLock`` takes an exclusive ``flock`` on ``<output_dir>/.lock`` (rank 0 only; ``lock_on_rank0`` tells every rank
the outcome). The kernel releases it when the
process ends, however it ends, so a crash leaves no stale lock to clean up. The file holds the holder's PID, host and
start time, which a second run's error names. On network file systems flock is as good as the client's lock support
(Linux NFS clients map it to POSIX locks).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from dino_simpool.signals import any_rank

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live run holds the output folder."""


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed; ValueError with a one-line message if it cannot be a writable folder."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} exists and is not a folder; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output_dir {out} cannot be created ({e.strerror or type(e).__name__}); "
                         f"pass a writable folder path") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {out} is not writable; pass a writable folder path")
    return out


class RunLock:
    """Exclusive lock on an output folder for the life of this process (or until ``release``)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLockedError(
                f"--output_dir {self.path.parent} is in use by another run ({holder}); wait for it to end, stop it, "
                f"or pass another --output_dir") from None
        except OSError as e:
            os.close(fd)
            raise ValueError(f"cannot lock --output_dir {self.path.parent} ({e.strerror}); its file system does "
                             f"not support flock: pass an --output_dir on a local or lock-capable disk") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def lock_on_rank0(lock: RunLock, main: bool, device: Any = "cpu") -> None:
    """Rank 0 takes the output folder's lock; every rank learns the outcome at once and stops alike. ``device``: where
    the one flag is reduced (the process group's device: NCCL reduces CUDA tensors only)."""
    error = None
    if main:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = e
    failed = any_rank([error is not None], device)[0]
    if error is not None:
        raise error
    if failed:
        raise RunLockedError("rank 0 could not lock the output folder (another run holds it); see rank 0's message")
