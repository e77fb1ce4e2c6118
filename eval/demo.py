"""README command 1 (``bash dev.sh demo``): pretrain a tiny SimPool ViT with DINO on the embedded dataset, on CPU, in
a few minutes; then k-NN on the val split, next to the same network at random initialisation.

    python -m eval.demo [--output_dir demo_output] [--epochs N] [--quick] [--keep] [--force]

The run is an ordinary ``dino_simpool.train`` run (the exact command is printed, and ``config.yaml``, ``log.txt``,
``tb/`` and ``checkpoint.pth`` land in ``--output_dir``); the demo only adds the before/after k-NN comparison.
A rerun replaces ``--output_dir`` only if the demo wrote it (``DEMO_MARKER``) or it is empty, else exits 2 unless
``--force``.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from dino_simpool.checkpoint import CHECKPOINT_NAME, load_checkpoint
from dino_simpool.cli import OneLineErrorParser, print_error
from dino_simpool.data import build_dataset
from dino_simpool.dino.augment import eval_transform
from dino_simpool.config import EMBEDDED_DEFAULTS, parse_config
from dino_simpool.dino.determinism import seed_all
from dino_simpool.dino.build import build_student_teacher
from dino_simpool.dino.trainer import train
from dino_simpool.evaluation.attention import embedded_examples, save_attention_pngs, stack_pictures
from dino_simpool.evaluation.knn import knn_accuracy
from dino_simpool.models.backbones import build_backbone

# The demo configuration = the embedded-dataset defaults of the training CLI (``EMBEDDED_DEFAULTS`` in
# dino_simpool/config/, what `dino-simpool-train` with no --data_path uses), minus the periodic k-NN (the demo
# runs its own before/after k-NN): a 2-block, 64-wide SimPool ViT (2 heads, patch 4: 8x8 tokens on 32 px crops),
# 2 global 32 px crops (scale 0.5-1) and 2 local 16 px crops (scale 0.2-0.5) of the 64 px images, head out_dim 64;
# AdamW, lr 0.008 at batch 256 (1e-3 at batch 32), batch 32, 25 epochs of 1000 images (100 per class): 775 steps.
# Teacher temperature 0.02 -> 0.04 over 3 epochs, momentum 0.99 (cosine to 1). Measured on the class-cue dataset
# (SyntheticShapes: class hue + texture + shape; 2 runs sharing 2 cores), k-NN top-1 k=10 / k=20, random init vs DINO:
#   this config: 32.2/32.6 -> 54.0/51.0;  same with out_dim 256 and momentum 0.996: -> 38.8/37.4;
#   15 epochs: -> 37.8/35.6 (random 31.0/33.2, a draft of the cues); the earlier 3-block 96-wide config (8 epochs of
#   2000 images, 248 steps): 37.4 -> 37.6 at k=20. With class-independent colours/textures (the earlier dataset)
#   every configuration tried stayed at chance (10-12%). Full figures: README.md, "The demo"; where the time goes
#   (data pipeline vs step): benchmarks/results/train_step.md.
DEMO_FLAGS: dict[str, object] = {**EMBEDDED_DEFAULTS, "eval_every": 0, "log_every": 10, "seed": 0}
# The demo writes this file into its --output_dir; only a folder carrying it (or an empty one) is deleted on a rerun.
DEMO_MARKER = ".dino_simpool_demo"
DEMO_KS = (10, 20)


def demo_argv(output_dir: str, **overrides) -> list[str]:
    flags = {**DEMO_FLAGS, **overrides}
    argv: list[str] = []
    for k, v in flags.items():
        argv.append(f"--{k}")
        argv.extend(str(x) for x in v) if isinstance(v, (list, tuple)) else argv.append(str(v))
    return argv + ["--output_dir", output_dir]


def knn_top1(backbone: torch.nn.Module, cfg, ks=DEMO_KS) -> dict[int, float]:
    """k-NN top-1 (percent) of ``backbone`` on the embedded val split, train split as the bank."""
    size = cfg.global_crops_size
    tf = eval_transform(resize=int(round(size * 256 / 224)), crop=size)
    train_set = build_dataset(None, "train", transform=tf, image_size=cfg.synthetic_size,
                              images_per_class=cfg.synthetic_per_class)
    val_set = build_dataset(None, "val", transform=tf, image_size=cfg.synthetic_size)
    res = knn_accuracy(backbone, train_set, val_set, ks=ks, T=cfg.temperature, batch_size=256, num_workers=0)
    return {k: float(v[0]) for k, v in res.items()}


def write_attention_maps(backbone: torch.nn.Module, cfg, out_dir: Path, num: int = 4) -> list[Path]:
    """SimPool attention-map PNGs of the trained teacher on a few embedded val images (one per class), plus one
    picture that stacks them all (``attention/all.png``)."""
    images, names = embedded_examples(num, image_size=cfg.synthetic_size)
    paths = save_attention_pngs(backbone, images, out_dir, image_size=cfg.global_crops_size, threshold=0.6,
                                names=names)
    return [*paths, stack_pictures(paths, out_dir / "all.png")]


def prepare_demo_dir(output_dir: str | Path, keep: bool = False, force: bool = False) -> Path:
    """Make ``output_dir`` a fresh demo folder (or keep it with ``keep``) and mark it with ``DEMO_MARKER``.

    An existing folder is deleted only if it carries the marker, is empty, or ``force`` is given; never the working
    directory or one of its parents. Anything else raises ValueError with a one-line message naming ``--force``."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} exists and is not a folder; pass another --output_dir")
    if out.exists() and not keep:
        ours = (out / DEMO_MARKER).is_file()
        empty = not any(out.iterdir())
        if not (ours or empty or force):
            raise ValueError(f"--output_dir {out} exists and was not written by the demo (no {DEMO_MARKER} file); "
                             f"pass another --output_dir, --keep to train in it, or --force to delete it")
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents, Path.home().resolve()):
            raise ValueError(f"--output_dir {out} is the working directory, one of its parents or the home "
                             f"folder: the demo never deletes it, even with --force; pass another --output_dir")
        shutil.rmtree(out)
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    if fresh or (out / DEMO_MARKER).is_file():
        (out / DEMO_MARKER).write_text("written by python -m eval.demo: a rerun of the demo deletes this "
                                       "folder\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = OneLineErrorParser("dino-simpool demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default="demo_output")
    ap.add_argument("--epochs", type=int, default=None, help=f"default {DEMO_FLAGS['epochs']}")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 40 images per class (a smoke test, ~1 min)")
    ap.add_argument("--keep", action="store_true", help="resume an existing demo_output instead of starting afresh")
    ap.add_num_threads_flag()
    ap.add_argument("--force", action="store_true", help="delete an existing --output_dir even if the demo did not "
                    "write it (by default only a folder with the demo's marker file, or an empty one, is replaced)")
    a = ap.parse_args(argv)
    over: dict[str, object] = {}
    if a.epochs is not None:
        over.update(epochs=a.epochs, warmup_epochs=min(int(DEMO_FLAGS["warmup_epochs"]), a.epochs),
                    warmup_teacher_temp_epochs=min(int(DEMO_FLAGS["warmup_teacher_temp_epochs"]), a.epochs))
    if a.quick:
        over.update(epochs=1, synthetic_per_class=40, warmup_epochs=0, warmup_teacher_temp_epochs=0)
    if a.num_threads is not None:  # applied when parsed; also in the printed training command, which then means the same
        over.update(num_threads=a.num_threads)
    try:
        targv = demo_argv(str(a.output_dir), **over)
        cfg = parse_config(targv)
        out = prepare_demo_dir(a.output_dir, keep=a.keep, force=a.force)
    except ValueError as e:
        print_error("dino-simpool demo", e)
        return 2
    t0 = time.perf_counter()
    print("[demo] pretraining a tiny SimPool ViT with DINO on the embedded dataset (CPU). Same as:")
    print("  python -m dino_simpool.train " + " ".join(targv), flush=True)

    # random initialisation = the teacher before the first step (same seed as the training run)
    seed_all(cfg.seed)
    _, teacher0 = build_student_teacher(cfg)
    t_knn = time.perf_counter()
    before = knn_top1(teacher0.backbone, cfg)
    t_knn = time.perf_counter() - t_knn
    print("[demo] random init: k-NN top-1 " + ", ".join(f"k={k}: {v:.1f}%" for k, v in before.items()), flush=True)

    t_train = time.perf_counter()
    rc = train(cfg)
    t_train = time.perf_counter() - t_train
    if rc != 0:
        print(f"[demo] training stopped with exit code {rc}", file=sys.stderr)
        return rc

    ck = load_checkpoint(out / CHECKPOINT_NAME)
    backbone = build_backbone(**ck["config"]["backbone"])
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")})
    after = knn_top1(backbone, cfg)
    pngs = write_attention_maps(backbone, cfg, out / "attention")
    total = time.perf_counter() - t0

    chance = 100.0 / 10
    print()
    print(f"k-NN top-1 on the embedded val split (500 images, 10 classes; chance {chance:.0f}%), "
          f"train split ({10 * cfg.synthetic_per_class} images) as the bank:")
    print(f"  {'model':<36}" + "".join(f"{'k=' + str(k):>9}" for k in before))
    print(f"  {'SimPool ViT, random init':<36}" + "".join(f"{before[k]:>8.1f}%" for k in before))
    print(f"  {f'SimPool ViT, DINO {cfg.epochs} epochs':<36}" + "".join(f"{after[k]:>8.1f}%" for k in after))
    print(f"[demo] training {t_train / 60:.1f} min, k-NN {t_knn:.0f} s per model, total {total / 60:.1f} min; "
          f"outputs in {out}/ (checkpoint.pth, log.txt, config.yaml, tb/)")
    if pngs:
        print(f"[demo] attention maps: {', '.join(str(p) for p in pngs)}")
    gain = after[20] - before[20]
    if gain <= 0:
        print(f"[demo] WARNING: the trained model does not beat random init at k=20 ({gain:+.1f} points)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
