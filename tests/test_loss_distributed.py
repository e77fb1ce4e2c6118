"""DINOLoss centre: all-reduced across 2 gloo ranks, so both ranks hold the global-batch EMA."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_simpool.dino.loss import DINOLoss


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        loss_fn = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
        t = torch.full((2 * (rank + 1), 4), float(rank + 1))  # rank 0: 2 rows of 1; rank 1: 4 rows of 2
        s = torch.randn(2 * (rank + 1), 4)
        loss_fn(s, t, 0)
        torch.save(loss_fn.center, os.path.join(out_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_center_all_reduced_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    c0 = torch.load(tmp_path / "center0.pt", weights_only=True)
    c1 = torch.load(tmp_path / "center1.pt", weights_only=True)
    global_mean = (2 * 1.0 + 4 * 2.0) / 6  # weighted by each rank's batch
    torch.testing.assert_close(c0, torch.full((1, 4), 0.1 * global_mean))
    torch.testing.assert_close(c0, c1)
