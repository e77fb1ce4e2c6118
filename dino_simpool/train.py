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


def main(argv: Sequence[str] | None = None, hooks=None) -> int:
    # The stop handlers go in before torch is imported (2-3 s): a SIGUSR1/SIGTERM then is honoured at the first
    # iteration (save, exit 75) instead of killing the process with 143 before anything could be saved.
    stop = PreemptionFlag().install()
    try:
        return _run(argv, hooks, stop)
    finally:
        stop.restore()


def _run(argv, hooks, stop: PreemptionFlag) -> int:
    from dino_simpool.checkpoint import CheckpointError, CheckpointWriteError  # after the handlers: see main()
    from dino_simpool.dino.config import parse_config
    from dino_simpool.dino.trainer import train

    try:
        cfg = parse_config(argv)
        return train(cfg, hooks=hooks, stop=stop)
    except CheckpointWriteError as e:
        _error(e)
        return EXIT_IO_ERROR
    except (ValueError, CheckpointError) as e:  # DataError is a ValueError
        _error(e)
        return EXIT_BAD_INPUT


def _error(e: BaseException) -> None:
    print(f"dino-simpool-train: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
