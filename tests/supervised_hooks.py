"""Start ``dino_simpool.supervised`` with the fault hooks of tests/train_hooks.py (same environment variables), for
tests that run the supervised trainer as a real process (``python tests/supervised_hooks.py <flags>``, or under
torchrun). ``DINO_SIMPOOL_TEST_DUMP_RANKS=1`` makes every rank write its final model to
``<--output_dir>/model_rank{r}.pth``."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's package

import torch  # noqa: E402

from dino_simpool.supervised.cli import main  # noqa: E402
from dino_simpool.supervised.trainer import Hooks  # noqa: E402
from tests.train_hooks import hooks_from_env  # noqa: E402


def supervised_hooks(argv: list[str]) -> Hooks:
    dino = hooks_from_env(argv)
    hooks = Hooks(**{f.name: getattr(dino, f.name) for f in dataclasses.fields(Hooks)})
    out = argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else "."

    def on_train_end(model, rank: int) -> None:
        if os.environ.get("DINO_SIMPOOL_TEST_DUMP_RANKS"):
            torch.save(model.state_dict(), Path(out) / f"model_rank{rank}.pth")

    hooks.on_train_end = on_train_end
    return hooks


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args, hooks=supervised_hooks(args)))
