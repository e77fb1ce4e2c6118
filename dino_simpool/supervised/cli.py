"""``dino-simpool-supervised`` / ``python -m dino_simpool.supervised``: supervised image classification of any backbone
with any pooling (the paper's supervised rows), with timm's recipe and the official fork's flag names (``--help``).

    torchrun --nproc_per_node=8 -m dino_simpool.supervised --config launch/recipes/supervised/vit_small_simpool_gamma1.25_ep100.yaml \\
        --data-dir /path/to/imagenet --output /path/to/run

Resumes automatically from ``--output``/checkpoint.pth. With no ``--data-dir`` it is the demo: the embedded dataset,
a tiny ViT, a few CPU minutes. Without ``--gp`` the demo trains two of them, ``--gp token`` ([CLS]) into
``<output>/token`` and ``--gp simpool`` into ``<output>/simpool``, prints each val top-1 against chance and draws
``<output>/attention.png``: input | [CLS] mean over blocks | SimPool (the paper's "attention deficit" figure). With
``--gp`` it trains that one model (and draws its maps). The demo's configuration is the ``[embedded: ...]`` values in
``--help``: a 2-block, 64-wide ViT (2 heads, patch 8 on 64 px: 8x8 tokens), 1000 train / 250 val images, batch 64,
10 epochs (150 steps), AdamW lr 3e-3 with a per-step schedule, RandAugment + erasing 0.25 + mixup 0.2 + smoothing
0.1, EMA 0.95. Measured 2026-12-01 on the shared 2-core CPU machine with ``--num_threads 1``: val top-1 [CLS]
81.6 %, SimPool 85.6 % (chance 10 %), 66 s wall for both (load ~3); an earlier run with torch's 2 threads gave
81.6 % and 84.8 % (11 min wall at a load of ~10).

Exit codes: 0 done, 75 saved after SIGUSR1/SIGTERM (requeue me), 3 non-finite loss, 2 bad options/data/checkpoint,
74 a checkpoint could not be written (disk full, read-only), 1 a crash.
"""
from __future__ import annotations

import sys
from typing import Sequence

from dino_simpool.signals import EXIT_BAD_INPUT, EXIT_IO_ERROR, EXIT_OK, PreemptionFlag

PROG = "dino-simpool-supervised"
DEMO_POOLINGS = (("token", "ViT [CLS]"), ("simpool", "ViT SimPool"))


def main(argv: Sequence[str] | None = None, hooks=None) -> int:
    # The stop handlers go in before torch is imported (2-3 s): a SIGUSR1/SIGTERM then is honoured at the first
    # iteration (save, exit 75) instead of killing the process before anything could be saved.
    stop = PreemptionFlag().install()
    try:
        return _run(argv, hooks, stop)
    finally:
        stop.restore()


def _run(argv, hooks, stop: PreemptionFlag) -> int:
    import dataclasses  # noqa: I001  (everything after the handlers: see main())
    from pathlib import Path

    from dino_simpool.checkpoint import CheckpointError, CheckpointWriteError
    from dino_simpool.cli import apply_num_threads
    from dino_simpool.supervised.config import SupervisedConfig, given_options, with_embedded_defaults
    from dino_simpool.supervised.trainer import train

    try:
        given = given_options(argv)
        cfg = SupervisedConfig.from_dict(with_embedded_defaults(given))
        apply_num_threads(cfg.num_threads)  # the flag or the recipe's value; None keeps torch's
        if cfg.data_dir is not None or "gp" in given:
            rc = train(cfg, hooks=hooks, stop=stop)
            if rc == EXIT_OK and cfg.data_dir is None and cfg.attention_images:
                _draw(cfg.output, [(f"{cfg.arch} {cfg.pooling}", Path(cfg.output))], cfg.attention_images,
                      cfg.synthetic_size)
            return rc
        print(f"{PROG}: no --data-dir and no --gp: the demo trains a [CLS] and a SimPool tiny ViT on the embedded "
              f"dataset (pass --gp to train one)", flush=True)
        runs = []
        for gp, label in DEMO_POOLINGS:
            sub = dataclasses.replace(cfg, gp=gp, output=str(Path(cfg.output) / gp))
            rc = train(sub, hooks=hooks, stop=stop)
            if rc != EXIT_OK:
                return rc
            runs.append((label, Path(sub.output)))
        if cfg.attention_images:
            _draw(cfg.output, runs, cfg.attention_images, cfg.synthetic_size)
        return EXIT_OK
    except CheckpointWriteError as e:
        _error(e)
        return EXIT_IO_ERROR
    except (ValueError, CheckpointError) as e:  # DataError is a ValueError
        _error(e)
        return EXIT_BAD_INPUT


def _draw(output: str, runs, num_images: int, synthetic_size: int) -> None:
    """Rank 0 (the process group is down by now): the val top-1 of each run against chance, and the attention
    picture of their final models."""
    from pathlib import Path

    from dino_simpool.checkpoint import load_checkpoint
    from dino_simpool.distributed import detect_env
    from dino_simpool.evaluation.attention import embedded_examples
    from dino_simpool.evaluation.compare import save_comparison
    from dino_simpool.models.weights import build_backbone_from_checkpoint

    if not detect_env().is_main:
        return
    models = []
    for label, folder in runs:
        ck = load_checkpoint(folder / "checkpoint.pth")
        val, ncls = ck["metrics"]["val"], ck["config"]["num_classes"]
        print(f"{label}: val top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}% on {val['images']} images (chance "
              f"{100 / ncls:.1f}%) [{folder / 'checkpoint.pth'}]", flush=True)
        model, _ = build_backbone_from_checkpoint(folder / "checkpoint.pth", checkpoint_key="model")
        models.append((label, model))
    path = save_comparison(models, embedded_examples(num_images, synthetic_size)[0], Path(output) / "attention.png")
    print(f"attention picture: {path}", flush=True)


def _error(e: BaseException) -> None:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
