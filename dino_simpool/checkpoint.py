"""Atomic checkpoint writes and safe (``weights_only``) reads."""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match what was asked for."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", allow_namespace: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with clear errors.

    ``allow_namespace`` admits ``argparse.Namespace`` only: the official DINO/SimPool training checkpoints store one
    under ``args``. Anything else that needs unpickling of arbitrary objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path; nothing was loaded)")
    try:
        if allow_namespace:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs unpickling of arbitrary Python objects, which can run code "
            f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). Re-save it as a plain state dict "
            f"or a safetensors file."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or truncated ({e})") from None


def namespace_to_dict(obj: Any) -> Any:
    """Turn an ``argparse.Namespace`` (as stored by the official code) into a plain dict."""
    return vars(obj) if isinstance(obj, argparse.Namespace) else obj
