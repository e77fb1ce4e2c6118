"""Preemption: SIGUSR1/SIGTERM only set a flag; the training loop checks it at iteration boundaries.

Slurm sends SIGUSR1 (``--signal=USR1@T``) or SIGTERM (preemption, ``scancel``, time limit) to every task. The
handler does nothing but record the signal, so a checkpoint is never written from inside a signal handler. The
ranks agree on the flag with one tiny ``all_reduce`` per iteration (``any_rank``), save the state at the same
iteration, and exit with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL), which the launcher requeues.
"""
from __future__ import annotations

import signal
import threading
from typing import Iterable

# No torch import at the top: the command lines install PreemptionFlag before torch loads (see dino_simpool/train.py).

EXIT_OK = 0
EXIT_CRASH = 1  # an uncaught error, or a peer rank that died (every process of the job ends)
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_IO_ERROR = 74  # EX_IOERR: a checkpoint could not be written (disk full, read-only); the previous one is intact
EXIT_PREEMPTED = 75

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs handlers for ``signals`` (main thread only) and remembers the first one received."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signum

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. in a notebook thread)
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def set(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


def any_rank(flags: Iterable[bool], device="cpu") -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all_reduce); local values when not distributed."""
    import torch  # here, not at the top: see the note on imports above
    import torch.distributed as dist

    flags = [bool(f) for f in flags]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]
