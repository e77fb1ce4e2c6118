"""Make every random draw of training a function of (seed, epoch, index) or (seed, rank, iteration).

This is what makes resume bit-identical on CPU, at an epoch boundary and in the middle of an epoch:

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

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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


class SeededDataset(Dataset):
    """Wraps a dataset; ``ds[(index, epoch)]`` runs ``base[index]`` with all generators seeded from
    ``(seed, epoch, index)`` and restores them afterwards. A plain integer index uses epoch 0."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # .classes, .targets, ... of the base dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key):
        index, epoch = (key, 0) if not isinstance(key, (tuple, list)) else key
        s = mix_seed(self.seed, 104729, epoch, index)
        torch_state = torch.get_rng_state()
        np_state = np.random.get_state()
        py_state = random.getstate()
        try:
            torch.default_generator.manual_seed(s)
            np.random.seed(s % (2**32))
            random.seed(s)
            return self.base[index]
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)


class ResumableDistributedSampler(Sampler):
    """``DistributedSampler``'s order (shuffle by ``seed + epoch``, padded to a multiple of the world size, rank
    ``r`` takes every ``world``-th index), yielding ``(index, epoch)``, starting at batch ``start_batch``."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 batch_size: int = 1, drop_last: bool = True):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.seed, self.shuffle = int(seed), shuffle
        self.batch_size, self.drop_last = int(batch_size), drop_last
        self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        pad = self.total_size - len(idx)
        if pad > 0:
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        return idx[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices()
        end = self.batches_per_epoch * self.batch_size if self.drop_last else len(idx)
        for i in idx[self.start_batch * self.batch_size:end]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        end = self.batches_per_epoch * self.batch_size if self.drop_last else self.num_samples
        return max(0, end - self.start_batch * self.batch_size)


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
