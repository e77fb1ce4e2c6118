"""Atomic checkpoint writes and safe (``weights_only``) reads."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match what was asked for."""


CHECKPOINT_NAME = "checkpoint.pth"  # what training and the linear probe write in their --output_dir (and resume from)


def strip_module_prefix(name: str) -> str:
    """A state-dict key without DDP's ``module.`` prefixes (``module.backbone.x`` -> ``backbone.x``)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact. The file gets the mode a plain ``open`` would give (0666
    less the umask), not mkstemp's owner-only 0600, so that other users' evaluation jobs can read it as usual.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process umask, read from /proc where it can be (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", allow_namespace: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with clear errors.

    ``allow_namespace`` admits ``argparse.Namespace`` only: the official DINO/SimPool training checkpoints store one
    under ``args``. A file that needs other Python objects is refused as unsafe; a file that is not a PyTorch
    checkpoint at all (text, YAML, an image...) or is corrupt/truncated gets its own error.
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
        reason = _unpickler_reason(e)
        if _UNSAFE.search(reason):
            raise CheckpointError(
                f"refusing to load {path}: it needs unpickling of arbitrary Python objects, which can run code "
                f"(torch.load weights_only=True said: {reason}). Re-save it as a plain state dict or a safetensors "
                f"file."
            ) from None
        raise _not_a_checkpoint(path, reason) from None
    except MemoryError:
        raise
    except Exception as e:  # torch.load fails on non-checkpoints with KeyError, IndexError, EOFError, RuntimeError...
        if isinstance(e, RuntimeError) and "deserialize object on" in str(e):  # e.g. map_location="cuda", no GPU
            raise CheckpointError(f"cannot load {path} onto {map_location}: {_first_line(e)}") from None
        raise _not_a_checkpoint(path, f"{type(e).__name__}: {_first_line(e)}") from None


# weights_only refusals of a *valid* pickle (globals, classes or calls that are not allowlisted), as opposed to bytes
# that are not a pickle at all ("Unsupported operand 123" for a JSON file)
_UNSAFE = re.compile(r"global|allowlist|reduce for unrecognized", re.IGNORECASE)


def _first_sentence(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return re.split(r"(?<=\.)\s", line)[0].rstrip(".")


def _first_line(e: BaseException) -> str:
    return _first_sentence(str(e)) or ("unexpected end of file" if isinstance(e, EOFError) else repr(e))


def _unpickler_reason(e: BaseException) -> str:
    """The specific part of torch's weights_only error ("Unsupported global: ..."), without its boilerplate."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return _first_sentence(m.group(1)) if m else _first_line(e)


def _sniff(path: Path) -> str:
    """What the file looks like, for the error message ("" when unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"PK\x03\x04", "a zip archive")):
        if head.startswith(magic):
            return what
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return "a text file"


def _not_a_checkpoint(path: Path, reason: str) -> CheckpointError:
    what = _sniff(path)
    looks = f" (it looks like {what})" if what and what != "a zip archive" else ""
    return CheckpointError(
        f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is corrupt or truncated{looks}; "
        f"torch.load said: {reason}. Pass a file written by torch.save (.pth) or a .safetensors file."
    )


def namespace_to_dict(obj: Any) -> Any:
    """Turn an ``argparse.Namespace`` (as stored by the official code) into a plain dict."""
    return vars(obj) if isinstance(obj, argparse.Namespace) else obj
