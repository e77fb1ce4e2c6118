"""What the user sees during training: a progress line with ETA, JSON lines in ``log.txt``, TensorBoard scalars.

Only the main process writes; the other ranks get no-op objects, so callers need no ``if rank == 0``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from dino_simpool.signals import EXIT_PREEMPTED


def format_seconds(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


def _plain(v: Any) -> Any:
    """Tensors / numpy scalars → Python numbers; NaN/inf become strings (log.txt stays valid JSON)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class JsonLog:
    """Appends one JSON object per line to ``path`` (flushed at once, so a killed run keeps its log)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_plain(dict(record))) + "\n")


def read_json_log(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


class TensorBoard:
    """Lazy ``SummaryWriter`` in ``log_dir``; ``scalars(prefix, dict, step)`` skips non-numbers."""

    def __init__(self, log_dir: str | os.PathLike | None):
        self.log_dir = None if log_dir is None else str(log_dir)
        self._w = None

    def _writer(self):
        if self._w is None and self.log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # here: tensorboard takes ~1 s to import
            except Exception as e:  # tensorboard missing: keep training, say so once
                print(f"[logs] TensorBoard disabled ({e})", file=sys.stderr)
                self.log_dir = None
                return None
            self._w = SummaryWriter(self.log_dir)
        return self._w

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        w = self._writer()
        if w is None:
            return
        for k, v in values.items():
            v = _plain(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                w.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class Progress:
    """Per-epoch progress with ETA.

    On a terminal it redraws one line (``\\r``); otherwise (Slurm logs, pipes) it prints a line every ``every``
    iterations. ``TQDM_DISABLE=1`` or ``enabled=False`` silences the per-iteration lines; the epoch summary always
    prints on the main process.
    """

    def __init__(self, total: int, epoch: int, epochs: int, start: int = 0, every: int = 10, enabled: bool = True,
                 stream=None):
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.start, self.done = start, start
        self.every = max(1, every)
        self.stream = stream or sys.stdout
        quiet = os.environ.get("TQDM_DISABLE", "").lower() in {"1", "true", "yes"}
        self.enabled = enabled and not quiet
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def eta(self) -> float:
        n = self.done - self.start
        if n <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / n * (self.total - self.done)

    def update(self, n: int = 1, **metrics: Any) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty or self.done % self.every == 0 or self.done == self.total:
            parts = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            line = (f"epoch {self.epoch}/{self.epochs} [{self.done}/{self.total}] {parts} "
                    f"eta {format_seconds(self.eta())}")
            if self.tty:
                self.stream.write("\r" + line[:200].ljust(120))
                if self.done == self.total:
                    self.stream.write("\n")
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done != self.total:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _fmt(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Logger:
    """Bundle for the trainer: ``info`` (stdout, main process), ``event`` (log.txt), ``scalars`` (TensorBoard)."""

    def __init__(self, output_dir: str | os.PathLike | None, main: bool = True, tensorboard: bool = True):
        self.main = main
        out = Path(output_dir) if output_dir is not None else None
        self.json = JsonLog(out / "log.txt" if (out is not None and main) else None)
        self.tb = TensorBoard(out / "tb" if (out is not None and main and tensorboard) else None)

    def info(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def event(self, record: Mapping[str, Any]) -> None:
        if self.main:
            self.json.write(record)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self.main:
            self.tb.scalars(prefix, values, step)

    def close(self) -> None:
        self.tb.close()


def log_stop(log: Logger, code: int, epoch: int, iteration: int, iter_in_epoch: int, path: Path, signame: str,
             max_iters: int | None, niter: int | None = None, max_iters_flag: str = "--max_iters") -> None:
    """The line and the log.txt event of a run that stopped early: by a signal (exit 75) or at ``max_iters``."""
    preempted = code == EXIT_PREEMPTED
    where = (f"at epoch {epoch} iteration {iteration} ({iter_in_epoch}/{niter} of the epoch)" if iter_in_epoch
             else f"at the end of epoch {epoch - 1}" if preempted else f"at iteration {iteration}")
    why = (f"signal {signame}" if preempted and iter_in_epoch else "a signal" if preempted
           else f"{max_iters_flag} {max_iters}")
    log.info(f"stopped by {why} {where}; saved {path}")
    log.event({"event": "preempted" if preempted else "max_iters", "epoch": epoch, "iteration": iteration,
               "iter_in_epoch": iter_in_epoch})


def summarize(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")
