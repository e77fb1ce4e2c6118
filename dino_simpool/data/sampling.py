"""The data side of a bit-identical resume: a seeded dataset wrapper and a resumable distributed sampler.

* ``ResumableDistributedSampler`` is DINO's ``DistributedSampler`` order (a permutation from ``seed + epoch``, sharded
  by rank) that can start at batch ``start_batch``, so that a run resumed mid-epoch skips the batches it already trained
  on without loading them. It yields ``(index, epoch)`` pairs.
* ``SeededDataset`` seeds torch, numpy and ``random`` from ``(seed, epoch, index)`` for the one ``__getitem__`` call,
  then restores the previous states: the crops of image ``i`` in epoch ``e`` are the same whichever worker makes them.

The training side (per-step seeding, RNG state in checkpoints) is ``dino_simpool.dino.determinism``.
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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
