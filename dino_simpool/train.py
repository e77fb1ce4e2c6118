"""``dino-simpool-train`` / ``python -m dino_simpool.train``: DINO pretraining with any backbone and pooling.

Accepts the official DINO/SimPool flag names (``--help``), ``--config recipe.yaml`` (flags override it), resumes
automatically from ``--output_dir``/checkpoint.pth. Exit codes (docs/reliability.md): 0 done, 75 saved after
SIGUSR1/SIGTERM (requeue me), 3 non-finite loss, 2 bad flags/data/checkpoint, 74 a checkpoint could not be written
(disk full, read-only), 1 a crash.
"""
from __future__ import annotations

import sys
from typing import Sequence

from dino_simpool.signals import EXIT_BAD_INPUT, EXIT_IO_ERROR, PreemptionFlag

PROG = "dino-simpool-train"


def main(argv: Sequence[str] | None = None, hooks=None) -> int:
    # The stop handlers go in before torch is imported (2-3 s): a SIGUSR1/SIGTERM then is honoured at the first
    # iteration (save, exit 75) instead of killing the process with 143 before anything could be saved.
    stop = PreemptionFlag().install()
    try:
        return _run(argv, hooks, stop)
    finally:
        stop.restore()


def _run(argv, hooks, stop: PreemptionFlag) -> int:
    # imported after the handlers are in: see main()
    import torch

    from dino_simpool.checkpoint import CheckpointError, CheckpointWriteError
    from dino_simpool.cli import apply_num_threads
    from dino_simpool.config import parse_config
    from dino_simpool.distributed import detect_env
    from dino_simpool.dino.trainer import train

    try:
        cfg = parse_config(argv)
        apply_num_threads(cfg.num_threads)  # the flag or the YAML recipe's value; None keeps torch's
        env = detect_env()
        if env.is_main:
            info, warnings = start_up_lines(cfg, env.world_size, "cuda" if torch.cuda.is_available() else "cpu")
            for line in info:
                print(f"{PROG}: {line}", flush=True)
            for line in warnings:
                print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
        return train(cfg, hooks=hooks, stop=stop)
    except CheckpointWriteError as e:
        _error(e)
        return EXIT_IO_ERROR
    except (ValueError, CheckpointError) as e:  # DataError is a ValueError
        _error(e)
        return EXIT_BAD_INPUT


def start_up_lines(cfg, world_size: int, device_type: str) -> tuple[list[str], list[str]]:
    """(information, warnings) to print once at start-up: the defaults the run took, and what looks wrong."""
    from dino_simpool.config import device_warnings, schedule_warnings  # loaded by _run already

    return [cfg.describe_preset()], schedule_warnings(cfg, world_size) + device_warnings(cfg, device_type)


def _error(e: BaseException) -> None:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
