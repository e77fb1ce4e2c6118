"""A small stand-in for the training job, for the launcher's real-Slurm tests.

It behaves like ``python -m dino_simpool.train`` where the launcher is concerned: ranks from
``dino_simpool.distributed`` (gloo), one all_reduce per iteration, SIGUSR1/SIGTERM -> all ranks stop at the same
iteration, rank 0 saves ``state.json`` and every rank exits 75; a later run resumes from it and logs
``resuming from <path> at iteration I``. ``--raise_at N`` raises at iteration N (a real failure).

    python tests/slurm_jobs/standin.py --output_dir D --iters 30 --sleep 0.2 [--raise_at 3] [--backend gloo]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dino_simpool import distributed as D  # noqa: E402
from dino_simpool.signals import EXIT_PREEMPTED, PreemptionFlag, any_rank  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--raise_at", type=int, default=-1)
    p.add_argument("--backend", default="gloo")
    args = p.parse_args()
    flag = PreemptionFlag().install()
    env = D.init_distributed(args.backend)
    rank, world = D.get_rank(), D.get_world_size()
    print(f"rank {rank}/{world} up ({env.source}, master {env.master_addr}:{env.master_port})", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    state_path = os.path.join(args.output_dir, "state.json")
    start = 0
    if os.path.exists(state_path):
        with open(state_path) as f:
            start = json.load(f)["iteration"]
        print(f"resuming from {state_path} at iteration {start}", flush=True)
    it = start
    while it < args.iters:
        if it == args.raise_at:
            raise RuntimeError(f"stand-in job: deliberate failure at iteration {it}")
        t = torch.tensor([float(rank + 1)])
        if dist.is_initialized():
            dist.all_reduce(t)
        expected = world * (world + 1) / 2
        assert t.item() == expected, (t.item(), expected)
        it += 1
        print(f"rank {rank} iteration {it} allreduce {t.item():g}", flush=True)
        time.sleep(args.sleep)
        if any_rank([flag.set])[0]:
            if rank == 0:
                tmp = state_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"iteration": it}, f)
                os.replace(tmp, state_path)
                print(f"saved {state_path} at iteration {it} after {flag.name or 'a peer signal'}", flush=True)
            D.barrier()
            D.cleanup()
            return EXIT_PREEMPTED
    if rank == 0:
        with open(os.path.join(args.output_dir, "done.json"), "w") as f:
            json.dump({"iteration": it, "world_size": world}, f)
    D.barrier()
    D.cleanup()
    print(f"rank {rank} done at iteration {it}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
