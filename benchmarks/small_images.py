"""The small-image recipe on real data that is not the embedded set: k-NN gain over random init, and its CPU cost.

    .venv/bin/python benchmarks/small_images.py                          # the recipe, held-out split, seed 0
    .venv/bin/python benchmarks/small_images.py --split tune --variants all   # every configuration tried in tuning
    .venv/bin/python benchmarks/small_images.py --list                   # the variants and what they change

Data: scikit-learn's ``load_digits`` (the UCI optical digits: 1797 real 8x8 grayscale scans of handwritten digits,
10 classes, shipped inside the scikit-learn wheel, no download), upscaled to 32 px (bicubic) and written as PNG
ImageFolders. Grayscale, so no class colour cues. A fixed, stratified split by seed (60 % train / 20 % val / 20 %
test per class) gives two ImageFolders over the same train images:

  * ``<work>/data/tune``:    train/ + val/   (val = the validation split: settings were chosen on it)
  * ``<work>/data/heldout``: train/ + val/   (val = the test split: looked at once, for the chosen recipe)

Per variant and seed, through the real command lines:

  1. random init: ``python -m dino_simpool.train --config RECIPE [variant flags] --max_iters 1 --eval_every 0``. The
     lr warm-up starts at 0, so that one iteration changes no weight (AdamW with lr 0; the teacher's EMA of an equal
     student); the script checks that the checkpoint's student and teacher backbones are equal (max |diff| <= 1e-6)
     and that its lr was 0, so the teacher is the network's step-0 weights, from the same seed as the training run;
  2. training: ``python -m dino_simpool.train --config RECIPE [variant flags] --eval_every 0``, timed (wall time and
     the CPU time of the process tree, user + sys, from ``getrusage(RUSAGE_CHILDREN)``);
  3. ``python -m eval.knn --pretrained_weights CKPT --checkpoint_key teacher --resize 32 --crop 32 --nb_knn 10 20``
     for both (the whole 32 px image, train split = the bank, val split = the queries).

Also printed, as context: k-NN on the raw pixels (the same eval transform, flattened, same weighted vote).
Every number printed is measured in this run; nothing is copied in. The table is markdown, for benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dino_simpool.data import build_dataset  # noqa: E402
from dino_simpool.dino.augment import eval_transform  # noqa: E402
from dino_simpool.evaluation.knn import knn_classify, l2_normalize  # noqa: E402

RECIPE = ROOT / "launch" / "recipes" / "small_images_32px.yaml"
KS = (10, 20)

# The values tuned, as the embedded-dataset recipe has them (the starting point, = EMBEDDED_DEFAULTS). Every variant
# passes all of them on the command line, so a variant's row does not depend on what the recipe file says.
EMBEDDED = dict(patch_size=4, depth=2, embed_dim=64, num_heads=2, out_dim=64, global_crops_scale=(0.5, 1.0),
                local_crops_number=2, local_crops_size=16, local_crops_scale=(0.2, 0.5), lr=0.008, epochs=25,
                warmup_epochs=2, momentum_teacher=0.99, warmup_teacher_temp=0.02, teacher_temp=0.04,
                warmup_teacher_temp_epochs=3, weight_decay_end=0.1, batch_size_per_gpu=32, use_bn_in_head=False,
                norm_last_layer=True, pooling="simpool")
# Every configuration tried, in the order tried (name -> (what it changes, the values)); "recipe" = the recipe file
# as written (no overrides). benchmarks/README.md has one row per entry.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "recipe": ("the recipe file as written", {}),
    "embedded": ("the embedded-dataset recipe (the demo's values)", dict(EMBEDDED)),
    # short probes (4 epochs, 132 iterations): which directions avoid the uniform teacher the embedded values reach
    "probe_embedded": ("4 epochs of the embedded values", {**EMBEDDED, "epochs": 4}),
    "probe_t02": ("4 epochs, teacher temperature 0.02 throughout",
                  {**EMBEDDED, "epochs": 4, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02}),
    "probe_t01": ("4 epochs, teacher temperature 0.01 throughout",
                  {**EMBEDDED, "epochs": 4, "warmup_teacher_temp": 0.01, "teacher_temp": 0.01}),
    "probe_t02_out1024": ("4 epochs, teacher temperature 0.02, out_dim 1024",
                          {**EMBEDDED, "epochs": 4, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02,
                           "out_dim": 1024}),
    "probe_t02_lr4x": ("4 epochs, teacher temperature 0.02, lr x4 (0.032 per 256 = 4e-3 at batch 32)",
                       {**EMBEDDED, "epochs": 4, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02, "lr": 0.032}),
    "probe_t02_p8": ("4 epochs, teacher temperature 0.02, patch 8 (16 tokens)",
                     {**EMBEDDED, "epochs": 4, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02, "patch_size": 8}),
    # 6-epoch probes (198 iterations): a slower teacher or a lower lr, so the student distils the step-0 teacher's
    # image-dependent targets before both drift to one output
    "probe6_m996": ("6 epochs, teacher momentum 0.996", {**EMBEDDED, "epochs": 6, "momentum_teacher": 0.996}),
    "probe6_m999": ("6 epochs, teacher momentum 0.999", {**EMBEDDED, "epochs": 6, "momentum_teacher": 0.999}),
    "probe6_lr002": ("6 epochs, lr 0.002 (2.5e-4 at batch 32)", {**EMBEDDED, "epochs": 6, "lr": 0.002}),
    "probe6_m996_lr002": ("6 epochs, momentum 0.996, lr 0.002",
                          {**EMBEDDED, "epochs": 6, "momentum_teacher": 0.996, "lr": 0.002}),
    # the step-0 teacher is already almost uniform at temperature 0.04 (the probes' H(teacher) ~ log(out_dim) even
    # with momentum 0.999): its pooled features differ little between images. BatchNorm in the head standardises each
    # hidden unit over the batch, so the head's outputs differ between images from the start
    "probe6_bn": ("6 epochs, BatchNorm in the head", {**EMBEDDED, "epochs": 6, "use_bn_in_head": True}),
    "probe6_t01_m996": ("6 epochs, teacher temperature 0.01 throughout, momentum 0.996",
                        {**EMBEDDED, "epochs": 6, "warmup_teacher_temp": 0.01, "teacher_temp": 0.01,
                         "momentum_teacher": 0.996}),
    # full-length runs; eval_every 5 adds the training's own k-NN every 5 epochs to log.txt (its eval transform
    # resizes to 37 px and centre-crops 32), to see how the gain grows with the epochs; its time is in the cost
    "bn50": ("50 epochs, BatchNorm in the head, k-NN every 5 epochs",
             {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "eval_every": 5}),
    # one change at a time from bn50, each within ~10 CPU minutes (fewer epochs where a step costs more)
    "bn50_out256": ("bn50 with out_dim 256", {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "out_dim": 256}),
    "bn50_p8": ("bn50 with patch 8 (16 tokens per global crop, 4 per local crop)",
                {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "patch_size": 8}),
    "bn50_scales": ("bn50 with crop scales 0.4-1 (global) and 0.1-0.4 (local)",
                    {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "global_crops_scale": (0.4, 1.0),
                     "local_crops_scale": (0.1, 0.4)}),
    "bn40_local4": ("bn50 with 4 local crops, 40 epochs (a step costs more)",
                    {**EMBEDDED, "epochs": 40, "use_bn_in_head": True, "local_crops_number": 4}),
    "bn50_lr2x": ("bn50 with lr 0.016 (2e-3 at batch 32)",
                  {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "lr": 0.016}),
    "bn50_temp07": ("bn50 with teacher temperature 0.04 -> 0.07 over 10 epochs (DINO's values, shorter warm-up)",
                    {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "warmup_teacher_temp": 0.04,
                     "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 10}),
    "bn50_m996": ("bn50 with teacher momentum 0.996",
                  {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "momentum_teacher": 0.996}),
    "bn15_wide": ("bn50's recipe with width 128, depth 4, 4 heads, 15 epochs (a step costs ~3x)",
                  {**EMBEDDED, "epochs": 15, "use_bn_in_head": True, "embed_dim": 128, "depth": 4,
                   "num_heads": 4}),
    # every change above lost to bn50: the other lr direction, a cheaper length, and bn50 without the periodic k-NN
    "bn50_lr05x": ("bn50 with lr 0.004 (5e-4 at batch 32)",
                   {**EMBEDDED, "epochs": 50, "use_bn_in_head": True, "lr": 0.004}),
    "bn30": ("bn50 with 30 epochs", {**EMBEDDED, "epochs": 30, "use_bn_in_head": True}),
    "bn50_noeval": ("bn50 without the periodic k-NN", {**EMBEDDED, "epochs": 50, "use_bn_in_head": True}),
}
# The variant the recipe file was made from (bn50 won the tune split). Its values = the recipe's; "recipe" runs the
# file itself with the training's periodic k-NN off (--eval_every 0, like every row here except bn50).
CHOSEN = "bn50"

# --linear: the linear probe of the trained teacher, three train augmentations (issue 13 §4: RandomResizedCrop with
# DINO's scale 0.08-1 crops most of a 32 px image away); the same short schedule and lr grid (one head per lr) each
LINEAR_AUGS: dict[str, list[str]] = {
    "dino_0.08": [],  # DINO's protocol: RandomResizedCrop(32, scale 0.08-1) + flip
    "dino_0.5": ["--train_crop_scale", "0.5", "1.0"],
    "none": ["--train_aug", "none"],  # the val transform (whole image), no augmentation
}
LINEAR_LRS = (0.01, 0.1, 1.0)


# ------------------------------------------------------------------------------------------------ the dataset
def split_indices(labels: np.ndarray, seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2,
                  max_per_class: int | None = None) -> dict[str, np.ndarray]:
    """A stratified split: per class, a seeded permutation; the first ``test_frac`` go to test, the next
    ``val_frac`` to val, the rest to train. Returns sorted index arrays for "train", "val", "test"."""
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 < val_frac, test_frac and val_frac + test_frac < 1; got {val_frac}, {test_frac}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n_test, n_val = max(1, round(test_frac * len(idx))), max(1, round(val_frac * len(idx)))
        if n_test + n_val >= len(idx):
            raise ValueError(f"class {c} has {len(idx)} images: too few for a train, val and test split")
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


LAYOUTS = ("placed", "centred")


def render_digit(pixels: np.ndarray, size: int, layout: str, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (values 0-16) as a ``size`` px 8-bit grayscale image.

    ``centred``: the whole 8x8 scan upscaled (bicubic) to the canvas. ``placed``: the scan upscaled to a random
    side in [size/2, 7/8 size], rotated by up to 20 degrees, its ink scaled by a random contrast in [0.5, 1], pasted at
    a random position on a dark background (level 0-0.25) with pixel noise (sigma 0.03): position, scale,
    rotation, contrast and background are drawn independently of the class, so only the shape tells it.
    """
    ink = Image.fromarray(np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8), mode="L")
    if layout == "centred":
        return ink.resize((size, size), Image.Resampling.BICUBIC)
    if layout != "placed":
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    side = int(rng.integers(size // 2, size * 7 // 8 + 1))
    glyph = ink.resize((side, side), Image.Resampling.BICUBIC).rotate(
        float(rng.uniform(-20, 20)), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    g = np.asarray(glyph, dtype=np.float32) / 255.0
    g = g[:size, :size]
    canvas = np.full((size, size), rng.uniform(0.0, 0.25), dtype=np.float32)
    y, x = (int(rng.integers(0, size - n + 1)) for n in g.shape)
    region = canvas[y:y + g.shape[0], x:x + g.shape[1]]
    np.maximum(region, g * rng.uniform(0.5, 1.0), out=region)
    canvas += rng.normal(0.0, 0.03, canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8), mode="L")


def export_digits(root: str | os.PathLike, size: int = 32, layout: str = "placed", seed: int = 0,
                  val_frac: float = 0.2, test_frac: float = 0.2, max_per_class: int | None = None) -> dict[str, Any]:
    """Write scikit-learn's digits as ImageFolders ``root/tune/{train,val}`` (val = the validation split) and
    ``root/heldout/{train,val}`` (the same train images; val = the test split), ``<class>/<sklearn index>.png``,
    8-bit grayscale ``size`` px images drawn by ``render_digit`` (each from its own generator, seeded by
    ``(seed, index)``); plus ``root/split.json`` (the settings and the indices of each split). Returns that summary.
    """
    from sklearn.datasets import load_digits  # lazy: a dev-only dependency, needed only to export the data

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) float in [0, 16], (1797,) int
    split = split_indices(labels, seed, val_frac, test_frac, max_per_class)
    root = Path(root)
    layout_dirs = {"tune": {"train": "train", "val": "val"}, "heldout": {"train": "train", "val": "test"}}
    for part in ("train", "val", "test"):
        for i in split[part]:
            img = render_digit(images[i], size, layout, np.random.default_rng((seed, int(i))))
            for folder, parts in layout_dirs.items():
                for sub, p in parts.items():
                    if p == part:
                        d = root / folder / sub / str(int(labels[i]))
                        d.mkdir(parents=True, exist_ok=True)
                        img.save(d / f"{int(i):04d}.png")
    summary = {"source": "sklearn.datasets.load_digits", "size": size, "layout": layout, "seed": seed,
               "val_frac": val_frac, "test_frac": test_frac, "max_per_class": max_per_class,
               "counts": {k: int(len(v)) for k, v in split.items()},
               "indices": {k: v.tolist() for k, v in split.items()}}
    (root / "split.json").write_text(json.dumps(summary) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ the runs
def _flags(overrides: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in overrides.items():
        out.append(f"--{k}")
        out += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return out


def _run(cmd: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); return (wall s, CPU s of the process and its children). Exits on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"failed (exit {rc}): {shlex.join(cmd)}\n  " + "\n  ".join(tail) + f"\n  (full log: {log})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def check_step0(ckpt: Path) -> float:
    """The 1-iteration checkpoint holds the step-0 network: the lr of its one step was 0 (the warm-up's start) and
    its teacher and student backbones are equal. Returns the largest teacher-student difference; exits otherwise."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    lrs = [float(g["lr"]) for g in obj["optimizer"]["param_groups"]]
    if obj.get("iteration") != 1 or any(lr != 0.0 for lr in lrs):
        sys.exit(f"{ckpt}: iteration {obj.get('iteration')}, lr {lrs}: not one step at lr 0 (warmup_epochs 0 starts "
                 f"at the peak lr), so it is not the random init")
    s = {k.removeprefix("module."): v for k, v in obj["student"].items() if "backbone." in k}
    t = {k.removeprefix("module."): v for k, v in obj["teacher"].items() if "backbone." in k}
    if not s or s.keys() != t.keys():
        sys.exit(f"{ckpt}: cannot match the student's and teacher's backbone weights")
    diff = max(float((s[k].float() - t[k].float()).abs().max()) for k in s)
    if diff > 1e-6:
        sys.exit(f"{ckpt}: teacher and student backbones differ by {diff:.2e} after 1 step at lr 0: not the init")
    return diff


def knn(ckpt: Path, data: Path, out: Path, threads: int) -> tuple[dict[int, float], float]:
    cmd = [sys.executable, "-m", "eval.knn", "--pretrained_weights", str(ckpt), "--checkpoint_key", "teacher",
           "--data_path", str(data), "--resize", "32", "--crop", "32", "--nb_knn", *map(str, KS),
           "--num_workers", "0", "--batch_size_per_gpu", "256", "--output_dir", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    wall, _ = _run(cmd, out / "knn.log", threads)
    res = json.loads((out / "knn_results.json").read_text())["results"]
    return {k: 100.0 * float(res[str(k)]["top1"]) if res[str(k)]["top1"] <= 1 else float(res[str(k)]["top1"])
            for k in KS}, wall


def linear_probes(ckpt: Path, data: Path, out: Path, threads: int, epochs: int, seed: int) -> dict[str, Any]:
    """``eval.linear`` on the frozen teacher for each of ``LINEAR_AUGS``: top-1 (%) of each lr's head after the last
    epoch, and the best of them."""
    res: dict[str, Any] = {}
    for name, flags in LINEAR_AUGS.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "eval.linear", "--pretrained_weights", str(ckpt), "--checkpoint_key", "teacher",
               "--data_path", str(data), "--resize", "32", "--crop", "32", "--epochs", str(epochs),
               "--lrs", *map(str, LINEAR_LRS), *flags, "--num_workers", "0", "--num_threads", str(threads),
               "--seed", str(seed), "--output_dir", str(d)]
        print(f"  linear probe ({name}): {shlex.join(cmd)}", flush=True)
        wall, _ = _run(cmd, d / "linear.log", threads)
        last = json.loads((d / "results.json").read_text())["last"]
        per_lr = {h: float(v["top1"]) for h, v in last.items()}
        res[name] = {"last_top1": per_lr, "best_last_top1": max(per_lr.values()), "wall_s": wall,
                     "command": shlex.join(cmd)}
    return res


def raw_pixel_knn(data: Path) -> dict[int, float]:
    """k-NN top-1 on the eval-transformed pixels themselves (a reference: what no network at all gives)."""
    tf = eval_transform(32, 32)
    feats = {}
    for split in ("train", "val"):
        ds = build_dataset(str(data), split, transform=tf)
        x = torch.stack([ds[i][0].flatten() for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        feats[split] = (l2_normalize(x), y)
    res = knn_classify(*feats["train"], *feats["val"], ks=KS, T=0.07, num_classes=10)
    return {k: float(v[0]) for k, v in res.items()}


def run_variant(name: str, overrides: Mapping[str, Any], recipe: Path, data: Path, work: Path, seed: int,
                threads: int, linear_epochs: int = 0) -> dict[str, Any]:
    base = [sys.executable, "-m", "dino_simpool.train", "--config", str(recipe), "--eval_every", "0",
            *_flags(overrides), "--data_path", str(data), "--seed", str(seed), "--num_threads", str(threads)]
    run_dir = work / "runs" / f"{data.parent.name}_{data.name}_{name}_s{seed}"
    init_dir, train_dir = run_dir / "init", run_dir / "train"
    for d in (init_dir, train_dir):
        if d.exists():
            sys.exit(f"{d} exists: pass a fresh --work folder (or delete it) so that no old run is reused")
    run_dir.mkdir(parents=True)
    print(f"[{name} seed {seed}] random init: {shlex.join(base)} --max_iters 1 --output_dir {init_dir}", flush=True)
    init_dir.mkdir()
    _run([*base, "--max_iters", "1", "--eval_every", "0", "--output_dir", str(init_dir)], run_dir / "init.log",
         threads)
    diff = check_step0(init_dir / "checkpoint.pth")
    print(f"[{name} seed {seed}] train: {shlex.join(base)} --output_dir {train_dir}", flush=True)
    train_dir.mkdir()
    load0 = os.getloadavg()[0]
    wall, cpu = _run([*base, "--output_dir", str(train_dir)], run_dir / "train.log", threads)
    load1 = os.getloadavg()[0]
    k_init, _ = knn(init_dir / "checkpoint.pth", data, run_dir / "knn_init", threads)
    k_trained, _ = knn(train_dir / "checkpoint.pth", data, run_dir / "knn_trained", threads)
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((train_dir / "config.yaml").read_text())))
    iters = None
    for line in (train_dir / "log.txt").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "done":
            iters = rec.get("iteration")
    row = {"variant": name, "seed": seed, "split": data.name, "data": data.parent.name, "overrides": dict(overrides),
           "init": k_init,
           "trained": k_trained, "gain": {k: k_trained[k] - k_init[k] for k in KS}, "wall_s": wall, "cpu_s": cpu,
           "threads": threads, "load": [load0, load1], "iterations": iters, "epochs": cfg.get("epochs"),
           "step0_max_diff": diff, "command": shlex.join([*base, "--output_dir", str(train_dir)])}
    if linear_epochs:
        row["linear"] = linear_probes(train_dir / "checkpoint.pth", data, run_dir / "linear", threads, linear_epochs,
                                      seed)
        row["linear_epochs"] = linear_epochs
    with open(work / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(format_rows([row]), flush=True)
    if linear_epochs:
        print(format_linear([row]), flush=True)
    return row


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("| variant | seed | split | init k=10 | trained k=10 | gain k=10 | init k=20 | trained k=20 | gain k=20 "
            "| iters | wall min | CPU min | load |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        i, t, g = r["init"], r["trained"], r["gain"]
        i = {int(k): v for k, v in i.items()}
        t = {int(k): v for k, v in t.items()}
        g = {int(k): v for k, v in g.items()}
        lines.append(f"| {r['variant']} | {r['seed']} | {r['split']} | {i[10]:.1f} | {t[10]:.1f} | {g[10]:+.1f} | "
                     f"{i[20]:.1f} | {t[20]:.1f} | {g[20]:+.1f} | {r['iterations']} | {r['wall_s'] / 60:.1f} | "
                     f"{r['cpu_s'] / 60:.1f} | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    return "\n".join(lines)


def format_linear(rows: Sequence[Mapping[str, Any]]) -> str:
    """The --linear rows: top-1 of each lr's head (last epoch) per train augmentation, and the k-NN beside them."""
    head = "| variant | seed | split | train aug | epochs | " + " | ".join(f"lr {lr:g}" for lr in LINEAR_LRS) + \
        " | best | k-NN k=10 | k-NN k=20 |"
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        t = {int(k): v for k, v in r["trained"].items()}
        for aug, v in r.get("linear", {}).items():
            cells = " | ".join(f"{x:.1f}" for x in v["last_top1"].values())
            lines.append(f"| {r['variant']} | {r['seed']} | {r['split']} | {aug} | {r['linear_epochs']} | {cells} | "
                         f"{v['best_last_top1']:.1f} | {t[10]:.1f} | {t[20]:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--work", default="runs/small_images", help="data, runs and results.jsonl go here")
    p.add_argument("--split", default="heldout", choices=["tune", "heldout"],
                   help="tune: val = the validation split (choose settings here); heldout: val = the test split")
    p.add_argument("--variants", nargs="+", default=["recipe"], help="names from --list, or 'all'")
    p.add_argument("--layout", default="centred", choices=LAYOUTS, help="centred: the whole scan upscaled (the "
                   "recipe was tuned on it; raw pixels already reach ~98 %%); placed: digits at a random position, "
                   "size and angle on a noisy background (the first probes: no variant gained)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (the data split is fixed)")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads of every command (1: the best choice "
                   "on a shared 2-core machine, benchmarks/README.md)")
    p.add_argument("--linear", type=int, default=0, metavar="EPOCHS",
                   help="also run the linear probe of each trained teacher for EPOCHS epochs with each train "
                   f"augmentation ({', '.join(LINEAR_AUGS)}), lrs {' '.join(map(str, LINEAR_LRS))} (0: skip)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for n, (why, ov) in VARIANTS.items():
            print(f"{n:24s} {why}: {_flags(ov) or '(none)'}")
        return 0
    if args.linear < 0:
        p.error(f"--linear takes a number of epochs >= 0; got {args.linear}")
    names = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; --list shows them")
    work = Path(args.work).resolve()
    data_root = work / f"data_{args.layout}"
    if not (data_root / "split.json").exists():
        s = export_digits(data_root, layout=args.layout)
        print(f"exported {s['counts']} images to {data_root}", flush=True)
    data = data_root / args.split
    raw = raw_pixel_knn(data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, {args.num_threads} torch thread(s) per command; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    print(f"raw-pixel k-NN on {args.split}: k=10 {raw[10]:.1f}, k=20 {raw[20]:.1f}", flush=True)
    rows = [run_variant(n, VARIANTS[n][1], Path(args.recipe).resolve(), data, work, s, args.num_threads,
                        args.linear) for n in names for s in args.seeds]
    print(f"\nk-NN top-1 (%) on {args.split} ({data}); raw pixels k=10 {raw[10]:.1f} / k=20 {raw[20]:.1f}; "
          f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    print(format_rows(rows))
    if args.linear:
        print(f"\nlinear probe top-1 (%) after {args.linear} epochs, per lr head (last epoch)")
        print(format_linear(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
