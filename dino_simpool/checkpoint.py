"""Atomic checkpoint writes, safe (``weights_only``) reads, and clear errors for both.

``save_atomic`` writes to a temporary file beside the target, fsyncs and renames, so a kill or a full disk never
damages the previous checkpoint; a failed write raises ``CheckpointWriteError`` that names the errno and says that the
previous file is intact. ``load_checkpoint`` refuses pickles that would run code and tells them apart from files that
are not checkpoints at all.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dino_simpool import distributed as D

CHECKPOINT_NAME = "checkpoint.pth"  # what training and the linear probe write in their --output_dir (and resume from)
_MAX_LISTED = 25


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match what was asked for."""


def strip_module_prefix(name: str) -> str:
    """A state-dict key without DDP's ``module.`` prefixes (``module.backbone.x`` -> ``backbone.x``)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only, quota): ``errno`` says why; the old file is intact."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


class _RecordingWriter:
    """File wrapper that keeps the first OSError of ``write``: torch.save turns it into a bare RuntimeError."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, path: str | os.PathLike, resume_point: str | os.PathLike | None = None) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact; a failed write (ENOSPC, EROFS, EDQUOT...) removes the
    temporary file and raises ``CheckpointWriteError``, whose message says what is intact: ``resume_point`` (the run's
    ``checkpoint.pth`` when ``path`` is a snapshot), else ``path`` itself. The file gets the mode a plain ``open`` would give (0666 less
    the umask), not mkstemp's owner-only 0600, so that other users' evaluation jobs can read it as usual.
    """
    return write_atomic(path, lambda f: torch.save(obj, f), resume_point)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None],
                 resume_point: str | os.PathLike | None = None) -> Path:
    """:func:`save_atomic` for any content: ``write(f)`` writes it into the binary file object ``f``."""
    path = Path(path)
    tmp = None
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError) or _looks_full(path.parent):
            raise _write_error(path, cause, Path(resume_point) if resume_point else path) from None
        raise
    return path


def _looks_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _write_error(path: Path, cause: BaseException, intact: Path) -> CheckpointWriteError:
    err = getattr(cause, "errno", None)
    if err is None and _looks_full(path.parent):
        err = errno.ENOSPC
    reason = f"{os.strerror(err)} ({errno.errorcode.get(err, err)})" if err else f"{type(cause).__name__}: {cause}"
    if intact.is_file():
        st = intact.stat()
        prev = (f"the previous {intact.name} is intact ({st.st_size / 2**20:.1f} MiB, written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))})")
    else:
        prev = f"no earlier {intact.name} existed, so nothing was lost"
    return CheckpointWriteError(
        f"cannot write checkpoint {path}: {reason}; {prev}. Free space on that disk (or fix its permissions), or "
        f"pass another --output_dir, then rerun the same command to resume", err)


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...] = ()) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files that ``save_atomic`` left behind when a process was killed mid-write.

    Only our own prefix is matched: ``.<name>.`` + mkstemp's 8 characters + ``.tmp`` for each name in ``names`` and
    for the periodic ``checkpoint<NNNN>.pth`` snapshots. Call it before this run writes anything (one writer per
    folder is guaranteed by ``RunLock``)."""
    pattern = re.compile(r"^\.(checkpoint\d{4}\.pth|" + "|".join(re.escape(n) for n in names or (CHECKPOINT_NAME,))
                         + r")\.[A-Za-z0-9_]{8}\.tmp$")
    removed = []
    for p in Path(folder).iterdir():
        if pattern.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


class Checkpointer:
    """A run's checkpoints: ``checkpoint.pth`` (the resume point) and the periodic ``checkpoint{epoch:04}.pth``.

    Every rank calls ``save`` (it ends in a barrier, so nobody exits before the file is complete); rank 0 writes. A
    snapshot is written *before* the resume point that follows it: a kill between the two leaves the resume point
    before that epoch's end, so the resumed run reaches it again and writes the snapshot then. A kill can therefore
    never lose a snapshot that the schedule asked for. ``prepare`` removes the temporary files of writes that a kill
    interrupted (ours only, by their exact prefix).
    """

    def __init__(self, folder: str | os.PathLike, main: bool, snapshot_every: int = 0, name: str = CHECKPOINT_NAME):
        self.folder, self.main, self.snapshot_every, self.name = Path(folder), main, int(snapshot_every), name

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def snapshot_path(self, epoch: int) -> Path:
        return self.folder / f"checkpoint{epoch:04}.pth"

    def prepare(self) -> list[Path]:
        return remove_stale_temporaries(self.folder, (self.name,)) if self.main else []

    def save(self, state: dict | None, finished_epoch: int | None = None) -> None:
        """Write ``state`` (rank 0's; None elsewhere) as the resume point, after the epoch's snapshot when
        ``finished_epoch`` (the epoch just completed) is one the schedule keeps."""
        if self.main:
            if finished_epoch is not None and self.snapshot_every and finished_epoch % self.snapshot_every == 0:
                save_atomic(state, self.snapshot_path(finished_epoch), resume_point=self.path)
            save_atomic(state, self.path)
        D.barrier()

    def load(self, required: tuple[str, ...] = ()) -> dict | None:
        """The resume point, or None when this run starts afresh; CheckpointError if it is not one of ours."""
        if not self.path.is_file():
            return None
        ck = load_checkpoint(self.path)
        missing = [k for k in required if not isinstance(ck, dict) or k not in ck]
        if missing:
            raise CheckpointError(f"{self.path} is not a training checkpoint of this project (missing {missing}); "
                                  f"move it away or use another --output_dir")
        return ck


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
                f"refusing to load {path}: it is an unsafe checkpoint (it needs unpickling of arbitrary Python "
                f"objects, which can run code), so it was refused and nothing in it ran "
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
_UNSAFE = re.compile(r"global|allowlist|reduce for unrecognized|is blocked|unsupported class", re.IGNORECASE)


def _first_sentence(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return re.split(r"(?<=\.)\s", line)[0].rstrip(".")


def _first_line(e: BaseException) -> str:
    return _first_sentence(str(e)) or ("unexpected end of file" if isinstance(e, EOFError) else repr(e))


def _unpickler_reason(e: BaseException) -> str:
    """The specific part of torch's weights_only error ("Unsupported global: ..."), without its boilerplate."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return _first_sentence(m.group(1))
    # torch >= 2.6 words it "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    m = re.search(r"^\s*(Trying to load unsupported .+|Unsupported (global|class|operand).+)$", text, re.MULTILINE)
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


def describe_key_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any],
                          origin: Mapping[str, str] | None = None) -> str | None:
    """The missing, unexpected and mis-shaped keys of ``given`` against ``expected`` (state dicts), one block of
    lines; None when they match. BatchNorm's ``num_batches_tracked`` counters may be missing."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in given if k in expected and hasattr(given[k], "shape")
                  and tuple(given[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mis_shaped):
        return None
    origin = origin or {}

    def show(items: list[str]) -> str:
        more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        return "\n    " + "\n    ".join(items[:_MAX_LISTED]) + more if items else " none"

    unexpected = [f"{k} (from {origin[k]!r})" if origin.get(k, k) != k else k for k in unexpected]
    return (f"  missing keys ({len(missing)}):{show(missing)}\n"
            f"  unexpected keys ({len(unexpected)}):{show(unexpected)}\n"
            f"  shape mismatches ({len(mis_shaped)}):{show(mis_shaped)}")
