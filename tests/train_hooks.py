"""Start ``dino_simpool.train`` with fault hooks, for tests that run the trainer as a real process.

    python tests/train_hooks.py <training flags>        (torchrun: torchrun ... tests/train_hooks.py <flags>;
                                                          Slurm: dino-simpool-launch --module tests/train_hooks.py)

The faults come from environment variables, so that every way of starting a process (subprocess, torchrun, srun)
passes them; the trainer itself reads none of them:
  DINO_SIMPOOL_TEST_NAN_AT=I        the loss of global iteration I is non-finite
  DINO_SIMPOOL_TEST_SIGNAL_AT=I     SIGTERM to this process before iteration I (the save-on-signal path)
  DINO_SIMPOOL_TEST_CRASH_AT=I      raise RuntimeError before iteration I (a crash mid-epoch)
  DINO_SIMPOOL_TEST_CRASH_RANK=R    ...only on rank R (default: every rank)
  DINO_SIMPOOL_TEST_DUMP_RANKS=1    every rank writes its final teacher to <output_dir>/teacher_rank{r}.pth
  DINO_SIMPOOL_TEST_KNN_BANK_BLOCK=B  the periodic k-NN splits its bank in blocks of B rows (a tiny bank then
                                    spreads over several ranks)
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's package

import torch  # noqa: E402

from dino_simpool.dino.trainer import Hooks  # noqa: E402
from dino_simpool.evaluation import knn  # noqa: E402
from dino_simpool.train import main  # noqa: E402


def _int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def hooks_from_env(argv: list[str]) -> Hooks:
    nan_at, signal_at, crash_at = (_int(f"DINO_SIMPOOL_TEST_{n}") for n in ("NAN_AT", "SIGNAL_AT", "CRASH_AT"))
    crash_rank = _int("DINO_SIMPOOL_TEST_CRASH_RANK")

    def before_step(it: int) -> None:
        if signal_at is not None and it == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        if crash_at is not None and it == crash_at and crash_rank in (None, rank):
            raise RuntimeError(f"test crash at iteration {it} on rank {rank}")

    def on_train_end(teacher, rank: int) -> None:
        if os.environ.get("DINO_SIMPOOL_TEST_DUMP_RANKS"):
            out = argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else "."
            torch.save(teacher.state_dict(), Path(out) / f"teacher_rank{rank}.pth")

    return Hooks(before_step=before_step, poison_loss=lambda it: nan_at is not None and it == nan_at,
                 on_train_end=on_train_end)


if __name__ == "__main__":
    if _int("DINO_SIMPOOL_TEST_KNN_BANK_BLOCK"):
        knn.BANK_BLOCK = _int("DINO_SIMPOOL_TEST_KNN_BANK_BLOCK")
    args = sys.argv[1:]
    sys.exit(main(args, hooks=hooks_from_env(args)))
