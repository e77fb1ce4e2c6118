"""dino_simpool.data.loader: the workers' life cycle in one process (the crash/kill paths: test_reliability.py)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dino_simpool.data.loader import iterate_closing, make_loader


class Numbers(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


def _alive(procs) -> list:
    return [p for p in procs if p.is_alive()]


def test_iterate_closing_ends_only_its_own_workers_when_the_loop_is_left():
    """Leaving the loop early (a break, an error, a stop) ends that loader's workers at once; another loader's
    persistent workers (training's, during a periodic k-NN) keep running."""
    training = make_loader(Numbers(), 8, 2, persistent=True)
    train_it = iter(training)
    next(train_it)
    train_workers = list(train_it._workers)
    gen = iterate_closing(make_loader(Numbers(), 4, 2, persistent=False))
    first = next(gen)
    assert first.tolist() == [[0], [1], [2], [3]]
    own_workers = list(gen.gi_frame.f_locals["it"]._workers)
    assert len(_alive(own_workers)) == 2
    gen.close()  # what a break or an exception in the loop body does
    assert _alive(own_workers) == []
    assert len(_alive(train_workers)) == 2
    assert sum(len(b) for b in train_it) == 64 - 8  # the training loader still delivers
    del train_it, training


def test_iterate_closing_yields_everything_once():
    got = torch.cat(list(iterate_closing(make_loader(Numbers(), 5, 2, persistent=False)))).flatten().tolist()
    assert got == list(range(64))
