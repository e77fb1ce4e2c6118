"""End this rank when a peer has died or hung, instead of waiting in a collective for the process-group timeout.

gloo notices a dead peer at the next collective (its socket closes), but NCCL does not, and neither notices a peer
that is alive but stuck (a frozen node, a SIGSTOP, a deadlock): both wait for the collective timeout (30 minutes
by default in torch). ``PeerWatchdog`` is a daemon thread on every rank that bumps a counter of its own in the
process group's key-value store every ``interval`` seconds and watches the others'. A peer whose counter stands still
for ``timeout`` seconds, or a store that stops answering (rank 0, which hosts it, is gone), ends this process: one
line on stderr, the loader workers killed, exit code 1 (``EXIT_CRASH``). A rank that finished stops its watchdog
first and marks itself done, so a normal end is never taken for a failure.

Written here because torch has no such check for NCCL (its heartbeat monitor only watches its own watchdog thread).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d

from dino_simpool.data.loader import end_all_workers
from dino_simpool.signals import EXIT_CRASH

_PREFIX = "dino_simpool/heartbeat"


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    end_all_workers()
    os._exit(EXIT_CRASH)


class PeerWatchdog:
    """Heartbeats through ``store`` (the default process group's when None); ``on_lost(message)`` when a peer is
    gone (default: print, kill the loader workers, ``os._exit(1)``)."""

    def __init__(self, rank: int, world_size: int, interval: float = 1.0, timeout: float = 60.0, store=None,
                 on_lost: Callable[[str], None] = _exit_now):
        self.rank, self.world_size = rank, world_size
        self.interval, self.timeout = float(interval), float(timeout)
        self.store = store
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_process_group(cls, timeout: float, interval: float = 1.0) -> "PeerWatchdog | None":
        """A started watchdog for the default process group, or None on one process (or without a store)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        try:
            store = distributed_c10d._get_default_store()  # private, but the only handle on the group's store
        except (AttributeError, RuntimeError, ValueError):
            return None
        return cls(dist.get_rank(), dist.get_world_size(), interval, timeout, store).start()

    def start(self) -> "PeerWatchdog":
        self.store.add(f"{_PREFIX}/{self.rank}", 1)
        self._thread = threading.Thread(target=self._run, name="dino-simpool-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, finished: bool) -> None:
        """Stop watching. ``finished``: this rank ended normally, so the peers must not take its silence for a
        failure; a failing rank does not say so, and its peers end once its heartbeat stops."""
        if self._stop.is_set():
            return
        self._stop.set()
        if finished:
            try:
                self.store.add(f"{_PREFIX}/done/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store may already be gone at the end of a run
                pass
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in peers}
        store_failed_at: float | None = None
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"{_PREFIX}/{self.rank}", 1)
                counts = {r: self.store.add(f"{_PREFIX}/{r}", 0) for r in peers}
                done = {r for r in peers if self.store.add(f"{_PREFIX}/done/{r}", 0) > 0}
                store_failed_at = None
            except Exception as e:  # noqa: BLE001 - any store failure means rank 0 (its host) is gone
                store_failed_at = store_failed_at or time.monotonic()
                if time.monotonic() - store_failed_at > max(5.0, 3 * self.interval) and not self._stop.is_set():
                    self._lost(f"the process group's store (hosted by rank 0) stopped answering "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                    return
                continue
            now = time.monotonic()
            for r in peers:
                if r in done:
                    continue
                count, since = seen[r]
                if counts[r] != count:
                    seen[r] = (counts[r], now)
                elif now - since > self.timeout and not self._stop.is_set():
                    self._lost(f"rank {r} has not answered for {now - since:.0f} s (dead, frozen or stuck)")
                    return

    def _lost(self, why: str) -> None:
        self.on_lost(f"dino-simpool: rank {self.rank}: {why}; ending this rank (exit {EXIT_CRASH}) instead of "
                     f"waiting in a collective. Look for the first error in the logs of the other ranks.")
