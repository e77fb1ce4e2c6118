"""Start ``eval.linear`` (the linear probe) with fault hooks, for tests that run it as real processes.

    python tests/linear_hooks.py <linear-probe flags>          (torchrun ... tests/linear_hooks.py <flags>)

The faults come from environment variables, so that every way of starting a process (subprocess, torchrun, srun)
passes them; the probe itself reads none of them:
  DINO_SIMPOOL_TEST_LINEAR_NAN_RANK=R   the training loss of rank R is non-finite ...
  DINO_SIMPOOL_TEST_LINEAR_NAN_STEP=S   ... at its S-th training step (1-based, counted over epochs; default 1)
  DINO_SIMPOOL_TEST_EXIT_DIR=D          each rank writes the code ``main`` returned to ``D/rank<r>.exit`` (a rank
                                        killed from outside, e.g. by torchrun's agent, writes none)
  DINO_SIMPOOL_TEST_LINGER_S=T          the poisoned rank waits T seconds before it exits (so a healthy rank that
                                        stops by itself is seen to exit first)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's package

from eval import linear  # noqa: E402
from eval.linear_heads import LinearHeads  # noqa: E402


def _int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def _rank() -> int:
    return _int("RANK", _int("SLURM_PROCID", 0))


def poison_loss(nan_rank: int, nan_step: int) -> None:
    """Make ``LinearHeads.loss`` non-finite at this process's ``nan_step``-th call, when it is rank ``nan_rank``."""
    original = LinearHeads.loss
    calls = {"n": 0}

    def loss(self, logits, labels):
        total, per_head = original(self, logits, labels)
        if self.training:
            calls["n"] += 1
            if _rank() == nan_rank and calls["n"] == nan_step:
                total, per_head = total * float("nan"), per_head * float("nan")
        return total, per_head

    LinearHeads.loss = loss


def main(argv: list[str]) -> int:
    nan_rank = _int("DINO_SIMPOOL_TEST_LINEAR_NAN_RANK")
    if nan_rank is not None:
        poison_loss(nan_rank, _int("DINO_SIMPOOL_TEST_LINEAR_NAN_STEP", 1))
    rc = linear.main(argv)
    exit_dir = os.environ.get("DINO_SIMPOOL_TEST_EXIT_DIR")
    if exit_dir:
        Path(exit_dir).mkdir(parents=True, exist_ok=True)
        (Path(exit_dir) / f"rank{_rank()}.exit").write_text(f"{rc}\n")
    if nan_rank == _rank():
        time.sleep(float(os.environ.get("DINO_SIMPOOL_TEST_LINGER_S") or 0))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
