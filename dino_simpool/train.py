"""``dino-simpool-train`` / ``python -m dino_simpool.train``: DINO pretraining with any backbone and pooling.

Accepts the official DINO/SimPool flag names (``--help``), ``--config recipe.yaml`` (flags override it), resumes
automatically from ``--output_dir``/checkpoint.pth. Exit codes: 0 done, 75 saved after SIGUSR1/SIGTERM (requeue me),
3 non-finite loss, 2 bad flags/data/checkpoint.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.config import TrainConfig, device_warnings, parse_config, schedule_warnings
from dino_simpool.data import DataError
from dino_simpool.distributed import detect_env
from dino_simpool.dino.trainer import train
from dino_simpool.signals import EXIT_BAD_INPUT

PROG = "dino-simpool-train"


def start_up_lines(cfg: TrainConfig, world_size: int, device_type: str) -> tuple[list[str], list[str]]:
    """(information, warnings) to print once at start-up: the defaults the run took, and what looks wrong."""
    return [cfg.describe_preset()], schedule_warnings(cfg, world_size) + device_warnings(cfg, device_type)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        env = detect_env()
        if env.is_main:
            info, warnings = start_up_lines(cfg, env.world_size, "cuda" if torch.cuda.is_available() else "cpu")
            for line in info:
                print(f"{PROG}: {line}", flush=True)
            for line in warnings:
                print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
        return train(cfg)
    except (ValueError, DataError, CheckpointError) as e:  # DataError is a ValueError; listed for clarity
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
