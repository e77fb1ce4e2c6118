"""Make every random draw of training a function of (seed, epoch, index) or (seed, rank, iteration).

This is what makes resume bit-identical on CPU, at an epoch boundary and in the middle of an epoch (the data side,
``SeededDataset`` and ``ResumableDistributedSampler``, lives in ``dino_simpool.data.sampling``):

* **Order.** ``ResumableDistributedSampler`` is DINO's ``DistributedSampler`` order (a permutation from
  ``seed + epoch``), sharded by rank, and can start at batch ``start_batch`` so that a run resumed mid-epoch skips
  the batches it already trained on without loading them. It yields ``(index, epoch)`` pairs.
* **Augmentations.** ``SeededDataset`` seeds torch, numpy and ``random`` from ``(seed, epoch, index)`` just for the
  one ``__getitem__`` call, then restores the previous states. The crops of image ``i`` in epoch ``e`` are therefore
  the same whichever worker makes them, with any number of workers, and in the main process the training RNG is
  untouched.
* **Training draws** (drop-path, anything else in the step) come from ``seed_step(seed, rank, iteration)``, called
  before every step. No RNG stream has to survive a restart. (The states are still saved in the checkpoint for
  inspection and restored, see ``get_rng_state``.)
* The DataLoader gets its own ``torch.Generator``, so creating an iterator does not draw from the global RNG.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.data.sampling import mix_seed


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """Seed every generator for one training step; cheap (a few microseconds)."""
    s = mix_seed(seed, 7919, rank, iteration)
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)
    np.random.seed(s % (2**32))
    random.seed(s)


# ---------------------------------------------------------------- RNG state as plain data (weights_only-safe)
def get_rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if (torch.cuda.is_available()
                                                                 and torch.cuda.is_initialized()) else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }


def restore_position(ck: dict, path: Any, niter: int, world: int, rank: int, log: Any,
                     output_flag: str = "--output_dir") -> tuple[int, int, int]:
    """A resume point's (epoch, iteration in the epoch, global iteration), checked against ``niter`` iterations per
    epoch, with this rank's RNG state restored when the world size is the same (both trainers resume through it)."""
    epoch, iter0, iteration = int(ck["epoch"]), int(ck["iter_in_epoch"]), int(ck["iteration"])
    if iteration != epoch * niter + iter0 or iter0 >= niter:
        raise CheckpointError(
            f"{path} was written with a different number of iterations per epoch (it is at epoch {epoch}, "
            f"iteration {iteration}, {iter0} in the epoch; now an epoch has {niter}): resume with the same "
            f"batch size, number of processes and data, or use another {output_flag}")
    per_rank = (ck.get("rng") or {}).get("per_rank") or []
    if (ck.get("rng") or {}).get("world_size") == world and len(per_rank) > rank:
        set_rng_state(per_rank[rank])
    log.info(f"resuming from {path} at epoch {epoch} iteration {iteration}")
    log.event({"event": "resume", "epoch": epoch, "iteration": iteration, "iter_in_epoch": iter0,
               "path": str(path)})
    return epoch, iter0, iteration


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # a different number of GPUs: the per-step seeding makes this harmless
            pass
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def gather_rng_state() -> dict:
    """Every rank's ``get_rng_state()`` (a collective: every rank calls it), for the checkpoint."""
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "per_rank": [get_rng_state()]}
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, get_rng_state())
    return {"world_size": dist.get_world_size(), "per_rank": states}


class rng_isolated:
    """Context manager: whatever runs inside (evaluation, logging) leaves torch/numpy/random states unchanged."""

    def __enter__(self):
        self._s = get_rng_state()
        return self

    def __exit__(self, *exc):
        set_rng_state(self._s)
