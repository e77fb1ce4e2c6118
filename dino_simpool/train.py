"""``dino-simpool-train`` / ``python -m dino_simpool.train``: DINO pretraining with any backbone and pooling.

Accepts the official DINO/SimPool flag names (``--help``), ``--config recipe.yaml`` (flags override it), resumes
automatically from ``--output_dir``/checkpoint.pth. Exit codes: 0 done, 75 saved after SIGUSR1/SIGTERM (requeue me),
3 non-finite loss, 2 bad flags/data/checkpoint.
"""
from __future__ import annotations

import sys
from typing import Sequence

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.data import DataError
from dino_simpool.signals import EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    from dino_simpool.dino.config import parse_config
    from dino_simpool.dino.trainer import train

    try:
        cfg = parse_config(argv)
        return train(cfg)
    except (ValueError, DataError, CheckpointError) as e:  # DataError is a ValueError; listed for clarity
        msg = " ".join(str(e).split())
        print(f"dino-simpool-train: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
