"""README command 1 (``bash dev.sh demo``): pretrain a tiny SimPool ViT with DINO on the embedded dataset, on CPU, in
a few minutes; then k-NN on the val split, next to the same network at random initialisation.

    python -m dino_simpool.demo [--output_dir demo_output] [--epochs N] [--quick]

The run is an ordinary ``dino_simpool.train`` run (the exact command is printed, and ``config.yaml``, ``log.txt``,
``tb/`` and ``checkpoint.pth`` land in ``--output_dir``); the demo only adds the before/after k-NN comparison.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

# The demo configuration: a 2-block, 64-wide SimPool ViT (2 heads, patch 4: 8x8 tokens on 32 px crops), 2 global
# 32 px crops (scale 0.5-1) and 2 local 16 px crops (scale 0.2-0.5) of the 64 px images, head out_dim 64; AdamW, lr
# 0.008 at batch 256 (1e-3 at batch 32), batch 32, 25 epochs of 1000 images (100 per class): 775 steps. Many small
# steps matter more than model size here: the loader (~90-150 img/s on 2 cores) is the bottleneck, not the model.
# Teacher temperature 0.02 -> 0.04 over 3 epochs, momentum 0.99 (cosine to 1). Measured on the class-cue dataset
# (SyntheticShapes: class hue + texture + shape; 2 runs sharing 2 cores), k-NN top-1 k=10 / k=20, random init vs DINO:
#   this config: 32.2/32.6 -> 54.0/51.0;  same with out_dim 256 and momentum 0.996: -> 38.8/37.4;
#   15 epochs: -> 37.8/35.6 (random 31.0/33.2, a draft of the cues); the earlier 3-block 96-wide config (8 epochs of
#   2000 images, 248 steps): 37.4 -> 37.6 at k=20. With class-independent colours/textures (the earlier dataset)
#   every configuration tried stayed at chance (10-12%). Full figures: README.md, "The demo".
DEMO_FLAGS: dict[str, object] = {
    "arch": "vit_tiny", "depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "pooling": "simpool",
    "gamma": 1.25,
    "global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2,
    "global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.2, 0.5],
    "synthetic_size": 64, "synthetic_per_class": 100,
    "out_dim": 64, "use_bn_in_head": False, "norm_last_layer": True, "drop_path_rate": 0.0,
    "optimizer": "adamw", "lr": 0.008, "min_lr": 1e-5, "weight_decay": 0.04, "weight_decay_end": 0.1,
    "warmup_epochs": 2, "momentum_teacher": 0.99, "warmup_teacher_temp": 0.02, "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 3, "freeze_last_layer": 1, "clip_grad": 3.0,
    "batch_size_per_gpu": 32, "epochs": 25, "num_workers": 1, "eval_every": 0, "saveckp_freq": 100,
    "log_every": 10, "seed": 0,
}
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
    from dino_simpool.data import build_dataset
    from dino_simpool.dino.augment import eval_transform
    from eval.features import extract_features
    from eval.knn import knn_classify

    size = cfg.global_crops_size
    tf = eval_transform(resize=int(round(size * 256 / 224)), crop=size)
    train = build_dataset(None, "train", transform=tf, image_size=cfg.synthetic_size,
                          images_per_class=cfg.synthetic_per_class)
    val = build_dataset(None, "val", transform=tf, image_size=cfg.synthetic_size)
    tf_, tl = extract_features(backbone, train, batch_size=256, num_workers=0)
    vf, vl = extract_features(backbone, val, batch_size=256, num_workers=0)
    res = knn_classify(tf_, tl, vf, vl, ks=ks, T=cfg.temperature, num_classes=len(train.classes))
    return {k: float(v[0]) for k, v in res.items()}


def write_attention_maps(backbone: torch.nn.Module, cfg, out_dir: Path, num: int = 4) -> list[Path]:
    """SimPool attention-map PNGs of the trained teacher on a few embedded val images (one per class), plus one
    picture that stacks them all (``attention/all.png``)."""
    from eval.attention import embedded_examples, save_attention_pngs, stack_pictures

    images, names = embedded_examples(num, image_size=cfg.synthetic_size)
    paths = save_attention_pngs(backbone, images, out_dir, image_size=cfg.global_crops_size, threshold=0.6,
                                names=names)
    return [*paths, stack_pictures(paths, out_dir / "all.png")]


def main(argv: Sequence[str] | None = None) -> int:
    from dino_simpool.dino.config import parse_config
    from dino_simpool.dino.determinism import seed_all
    from dino_simpool.dino.trainer import build_student_teacher, train

    ap = argparse.ArgumentParser("dino-simpool demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default="demo_output")
    ap.add_argument("--epochs", type=int, default=None, help=f"default {DEMO_FLAGS['epochs']}")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 40 images per class (a smoke test, ~1 min)")
    ap.add_argument("--keep", action="store_true", help="resume an existing demo_output instead of starting afresh")
    a = ap.parse_args(argv)
    over = {}
    if a.epochs is not None:
        over["epochs"] = a.epochs
    if a.quick:
        over.update(epochs=1, synthetic_per_class=40, warmup_epochs=0, warmup_teacher_temp_epochs=0)
    out = Path(a.output_dir)
    if out.exists() and not a.keep:
        shutil.rmtree(out)
    targv = demo_argv(str(out), **over)
    cfg = parse_config(targv)
    t0 = time.perf_counter()
    print("[demo] pretraining a tiny SimPool ViT with DINO on the embedded dataset (CPU). Same as:")
    print("  python -m dino_simpool.train " + " ".join(targv), flush=True)

    # random initialisation = the teacher before the first step (same seed as the training run)
    seed_all(cfg.seed)
    _, teacher0 = build_student_teacher(cfg)
    t_knn = time.perf_counter()
    before = knn_top1(teacher0.backbone, cfg)
    t_knn = time.perf_counter() - t_knn
    print(f"[demo] random init: k-NN top-1 " + ", ".join(f"k={k}: {v:.1f}%" for k, v in before.items()), flush=True)

    t_train = time.perf_counter()
    rc = train(cfg)
    t_train = time.perf_counter() - t_train
    if rc != 0:
        print(f"[demo] training stopped with exit code {rc}", file=sys.stderr)
        return rc

    from dino_simpool.checkpoint import load_checkpoint
    from dino_simpool.models.backbones import build_backbone
    ck = load_checkpoint(out / "checkpoint.pth")
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
