"""The training/evaluation DataLoader and its workers' life cycle.

Workers ignore the stop signals (SIGUSR1/SIGTERM are meant for the trainer, which saves and exits 75), so nothing may
rely on SIGTERM to end them. Python's exit path does exactly that: ``multiprocessing`` terminates daemonic children
with SIGTERM and then joins them forever. ``end_workers`` (called on every way out of training and evaluation) and
an ``atexit`` fallback stop them with the loader's own shutdown and then SIGKILL, so an error can never leave the
process hung on its workers.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def init_loader_worker(worker_id: int, nice: int = 0) -> None:  # noqa: ARG001
    """``worker_init_fn``: ignore the stop signals (the main process handles them), one torch thread per worker (the
    workers are many; the step owns the cores), and lower the worker's priority by ``nice``. On a CPU-only machine
    niced workers let the step's threads run undisturbed (benchmarks/train_step.py measures the effect)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    torch.set_num_threads(1)
    if nice:
        os.nice(nice)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, *, sampler: Sampler | None = None,
                shuffle: bool = False, drop_last: bool = False, pin_memory: bool = False, nice: int = 0,
                seed: int = 0, persistent: bool = True, collate_fn: Callable | None = None) -> DataLoader:
    """A DataLoader whose workers can always be ended (see the module docstring); ``seed`` gives it its own generator,
    so that creating an iterator never draws from the global RNG (resume identity)."""
    if num_workers > 0:
        atexit.register(end_all_workers)  # registered after multiprocessing's own exit hook, so it runs first
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=functools.partial(init_loader_worker, nice=nice) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed), collate_fn=collate_fn,
    )


def end_workers(*loaders: Any) -> None:
    """Stop the (persistent) workers of ``loaders`` now: the loader's own shutdown, then SIGKILL for any straggler."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is not None:
            _end_iterator(it)
            loader._iterator = None
    end_all_workers()


def _end_iterator(it: Any) -> None:
    """One loader iterator's workers: its own shutdown, then SIGKILL for any straggler."""
    if hasattr(it, "_shutdown_workers"):
        workers = list(getattr(it, "_workers", []))
        try:
            it._shutdown_workers()
        finally:
            _kill(workers)


def iterate_closing(loader: DataLoader):
    """Iterate a non-persistent ``loader`` once; its workers (only these) end when the loop ends or is left by an
    error, a stop or a ``break`` (the generator's close), not when the garbage collector gets to the iterator."""
    it = iter(loader)
    try:
        yield from it
    finally:
        _end_iterator(it)


def end_all_workers() -> None:
    """SIGKILL every daemonic child process still alive (loader workers ignore SIGTERM). Idempotent."""
    _kill([p for p in multiprocessing.active_children() if p.daemon])


def _kill(procs: list) -> None:
    for p in procs:
        try:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        except (OSError, ValueError, AssertionError):  # already reaped, or not our child
            pass
