"""The localization miniature (issue 12 §3): supervised and DINO training x [CLS], GAP and SimPool, with one equal
budget, on the embedded dataset's cluttered layout, where a centre prior fails.

    python benchmarks/localization.py                      # export the data, train the 6 models, evaluate, print
    python benchmarks/localization.py --skip_train         # re-evaluate the checkpoints in --workdir
    python benchmarks/localization.py --write_results      # also write benchmarks/results/localization.md

Protocol (fixed before any result was seen; the defaults of this script are it):

* Data: ``SyntheticShapes(layout="cluttered")`` at 32 px, written once as an ImageFolder with its exact boxes
  (``boxes.json``): train 200 images per class (2,000), val 50 per class (500). Objects sit anywhere, at radius
  0.08-0.22 of the side, on a distractor texture with 4-8 clutter shapes; a centred Gaussian scores low there.
* Model: the same tiny ViT for all six (``vit_tiny``, depth 4, width 64, 4 heads, patch 4: 8 x 8 tokens), seed 0
  (``--seed``: another seed, for the same data).
* Equal budget: 30 epochs of the 2,000 train images at batch 64 (930 optimizer steps, 60,000 images) for every
  model, through the real command lines, 1 torch thread, 1 loader worker. A DINO step costs more (2 global 32 px +
  2 local 16 px crops and the teacher); the table states each run's wall and CPU time.
* Recipes: the project's embedded-dataset (demo) recipes, unchanged but for the model, the data and the epochs:
  DINO = ``dino_simpool.train``'s ``[embedded: ...]`` values (AdamW lr 0.008 per 256, out_dim 64, teacher 0.02 ->
  0.04, crops 0.5-1 / 2 x 0.2-0.5); supervised = ``dino_simpool.supervised``'s (AdamW lr 3e-3, RandAugment
  rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.2, smoothing 0.1, EMA 0.95). SimPool's gamma: 1.25 (both).
* Weights evaluated: DINO's teacher, the supervised run's EMA (each trainer's result). Random init: the same
  architecture built in this process with ``torch.manual_seed(0)`` (one row per distinct backbone config).
* Maps: each pooling's own (``--map auto``): [CLS] = the last block's [CLS] attention averaged over heads, SimPool =
  its pooling attention; GAP's own attention is uniform (it localizes nothing by construction), so its map is the
  ``similarity`` map: the cosine of each patch feature with the pooled vector. The ``similarity`` map of every model
  is a second column, for one map definition across poolings.
* Scores on the 500 val images: MaxBoxAccV2 (IoU 0.3/0.5/0.7, threshold step 0.01), CorLoc of the attention box
  (largest component of the 60 % cumulative-mass mask of the own map) and CorLoc of LOST (last block's patch keys,
  independent of the pooling); k-NN top-1 (k = 20, T = 0.07, the 2,000 train images as the bank) for every model;
  and the supervised classifier's val top-1 (EMA) from its last epoch.
* Data-only rows: a centred Gaussian (sigma = a quarter of the side) for the maps and the attention box; the whole
  image as the box for CorLoc (LOST column).
* One seed, 500 val images: a difference under ~4 points (two binomial standard errors at 30-50 %) is noise.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dino_simpool.data import SyntheticShapes, build_dataset  # noqa: E402
from dino_simpool.dino.augment import eval_transform  # noqa: E402
from dino_simpool.evaluation.features import extract_features  # noqa: E402
from dino_simpool.evaluation.knn import knn_classify  # noqa: E402
from dino_simpool.models.backbones import build_backbone  # noqa: E402
from dino_simpool.models.weights import build_backbone_from_checkpoint  # noqa: E402
from eval import discovery, localization  # noqa: E402
from eval.discovery import attention_box, corloc  # noqa: E402
from eval.locdata import folder_json_samples  # noqa: E402

POOLINGS = ("cls", "gap", "simpool")
#: added after the protocol's results (DINO learned nothing in them): the same runs with BatchNorm in the head
POSTHOC = "dino_bnhead"
GAMMA = 1.25
SIZE = 32
TRAIN_PER_CLASS, VAL_PER_CLASS = 200, 50
EPOCHS, BATCH = 30, 64
KNN_K, KNN_T = 20, 0.07

DINO_MODEL = ["--arch", "vit_tiny", "--depth", "4", "--embed_dim", "64", "--num_heads", "4", "--patch_size", "4"]
SUP_MODEL = ["--model", "vit_tiny", "--depth", "4", "--embed-dim", "64", "--num-heads", "4", "--patch-size", "4"]
# the trainers' [embedded: ...] values (their demo recipes), written out because --data_path turns them off
DINO_RECIPE = [
    "--preset", "dino", "--global_crops_size", str(SIZE), "--local_crops_size", str(SIZE // 2),
    "--local_crops_number", "2", "--global_crops_scale", "0.5", "1.0", "--local_crops_scale", "0.2", "0.5",
    "--out_dim", "64", "--use_bn_in_head", "False", "--norm_last_layer", "True", "--momentum_teacher", "0.99",
    "--warmup_teacher_temp", "0.02", "--teacher_temp", "0.04", "--warmup_teacher_temp_epochs", "3",
    "--optimizer", "adamw", "--lr", "0.008", "--min_lr", "1e-5", "--warmup_epochs", "2", "--weight_decay", "0.04",
    "--weight_decay_end", "0.1", "--clip_grad", "3.0", "--freeze_last_layer", "1", "--drop_path_rate", "0.0",
    "--batch_size_per_gpu", str(BATCH), "--eval_every", "0", "--saveckp_freq", "1000",
    "--num_workers", "1", "--num_threads", "1", "--log_every", "50",
]
SUP_RECIPE = [
    "--img-size", str(SIZE), "--crop-pct", "1.0", "--scale", "0.35", "1.0", "--aa", "rand-m9-mstd0.5-inc1",
    "--reprob", "0.25", "--mixup", "0.2", "--smoothing", "0.1", "--opt", "adamw", "--weight-decay", "0.05",
    "--lr", "3e-3", "--sched-on-updates", "--warmup-epochs", "1", "--min-lr", "1e-5", "--model-ema",
    "--model-ema-decay", "0.95", "-b", str(BATCH), "--workers", "1",
    "--num_threads", "1", "--log-interval", "50", "--attention-images", "0", "--drop-path", "0.0",
]


def export_data(root: Path) -> Path:
    """The cluttered layout as an ImageFolder (train/, val/) plus ``boxes.json``; written once."""
    done = root / "DONE"
    if not done.is_file():
        for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            SyntheticShapes(split, image_size=SIZE, images_per_class=n, layout="cluttered").export_imagefolder(root)
        done.write_text("cluttered layout, 32 px\n")
    return root


def train_command(kind: str, pooling: str, data: Path, out: Path, epochs: int = EPOCHS, seed: int = 0) -> list[str]:
    """The training command line of one run (``--epochs`` last, so that a smoke run may shorten it)."""
    if kind in ("dino", POSTHOC):
        gamma = ["--gamma", str(GAMMA)] if pooling == "simpool" else []
        recipe = list(DINO_RECIPE)
        if kind == POSTHOC:  # BatchNorm in the head: what made DINO learn on small digits (benchmarks/small_images.py)
            recipe[recipe.index("--use_bn_in_head") + 1] = "True"
        return [sys.executable, "-m", "dino_simpool.train", *DINO_MODEL, "--pooling", pooling, *gamma, *recipe,
                "--data_path", str(data), "--output_dir", str(out), "--seed", str(seed), "--epochs", str(epochs)]
    gp = {"cls": "token", "gap": "avg", "simpool": "simpool"}[pooling]
    gamma = ["--gamma", str(GAMMA)] if pooling == "simpool" else []
    return [sys.executable, "-m", "dino_simpool.supervised", *SUP_MODEL, "--gp", gp, *gamma, *SUP_RECIPE,
            "--data-dir", str(data), "--output", str(out), "--seed", str(seed), "--epochs", str(epochs)]


def run_training(cmd: list[str], out: Path) -> dict:
    """Run one training (its output to ``out``/stdout.txt); wall and CPU seconds of the process tree."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    before, t0, load0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time(), os.getloadavg()[0]
    print("$", " ".join(cmd[1:]), flush=True)
    with open(out / "stdout.txt", "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = (out / "stdout.txt").read_text().splitlines()[-5:]
        raise SystemExit(f"training failed with exit code {rc}: {' '.join(cmd[1:])}\n  " + "\n  ".join(tail))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.time() - t0, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load": [load0, os.getloadavg()[0]]}


def supervised_top1(out: Path) -> float:
    """The last epoch's EMA val top-1 from the supervised run's log.txt."""
    last = None
    for line in (out / "log.txt").read_text().splitlines():
        rec = json.loads(line)
        if "val_ema" in rec:
            last = rec["val_ema"]["top1"]
    if last is None:
        raise SystemExit(f"{out}/log.txt has no val_ema record")
    return float(last)


def knn_top1(model, data: Path) -> float:
    tf = eval_transform(SIZE, SIZE)
    bank = build_dataset(str(data), "train", transform=tf)
    query = build_dataset(str(data), "val", transform=tf)
    ftr, ltr = extract_features(model, bank, batch_size=250, num_workers=0)
    fte, lte = extract_features(model, query, batch_size=250, num_workers=0)
    return float(knn_classify(ftr, ltr, fte, lte, ks=[KNN_K], T=KNN_T, backend="torch")[KNN_K][0])


def evaluate(model, samples, data: Path) -> dict:
    model = model.eval()
    own = localization.evaluate_model(model, samples, batch_size=100)
    sim = localization.evaluate_model(model, samples, batch_size=100, map_kind="similarity")
    att = discovery.evaluate_model(model, samples, "attention", batch_size=100, mass=0.6)
    lost = discovery.evaluate_model(model, samples, "lost", batch_size=100)
    return {"map": own["map"], "maxboxaccv2": own["maxboxaccv2"], "per_iou": own["per_iou"],
            "maxboxaccv2_similarity": sim["maxboxaccv2"], "corloc_attention": att["corloc"],
            "corloc_lost": lost["corloc"], "knn_top1": knn_top1(model, data)}


def centre_prior(samples) -> dict:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    centre = np.exp(-(((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) / (2 * (SIZE / 4) ** 2)))
    gts = [s.boxes for s in samples]
    loc = localization.max_box_acc_v2([centre] * len(samples), gts, [(SIZE, SIZE)] * len(samples))
    return {"training": "-", "pooling": "-", "weights": "centre prior (whole-image box for LOST)", "map": "gaussian",
            "maxboxaccv2": loc["maxboxaccv2"], "per_iou": loc["per_iou"], "maxboxaccv2_similarity": None,
            "corloc_attention": corloc([attention_box(centre, (SIZE, SIZE), 0.6)] * len(samples), gts),
            "corloc_lost": corloc([(0, 0, SIZE, SIZE)] * len(samples), gts), "knn_top1": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/dino_simpool_bench_localization")
    p.add_argument("--skip_train", action="store_true", help="evaluate the checkpoints already in --workdir")
    p.add_argument("--only", nargs="+", default=None, help="train only these runs, e.g. dino/cls supervised/gap")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"the protocol's {EPOCHS}; fewer only to smoke-test")
    p.add_argument("--posthoc", action="store_true", help=f"also the {POSTHOC} runs: DINO with BatchNorm in the head, "
                   "added after the protocol's results showed DINO learning nothing (not part of the protocol)")
    p.add_argument("--seed", type=int, default=0, help="training and random-init seed (the protocol's: 0; the data "
                   "stay the same)")
    p.add_argument("--train_only", action="store_true", help="train (see --only) and stop; evaluate later")
    p.add_argument("--write_results", action="store_true", help="write benchmarks/results/localization.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    data = export_data(work / "data")
    kinds = ("supervised", "dino") + ((POSTHOC,) if args.posthoc else ())
    runs = [(kind, pooling) for kind in kinds for pooling in POOLINGS]
    if not args.skip_train:
        for kind, pooling in runs:
            name = f"{kind}/{pooling}"
            if args.only and name not in args.only:
                continue
            out = work / kind / pooling
            took = run_training(train_command(kind, pooling, data, out, args.epochs, args.seed), out)
            (out / "train_time.json").write_text(json.dumps(took))  # per run: parallel --only runs may share work
            print(f"{name}: {took['wall_s'] / 60:.1f} min wall, {took['cpu_s'] / 60:.1f} CPU min", flush=True)
    if args.train_only:
        return 0
    times = {}
    for kind, pooling in runs:
        f = work / kind / pooling / "train_time.json"
        if f.is_file():
            times[f"{kind}/{pooling}"] = json.loads(f.read_text())
    samples = folder_json_samples(data / "val", data / "boxes.json")
    rows = [centre_prior(samples)]
    print(json.dumps(rows[0]), flush=True)
    seen_configs: list[dict] = []
    for kind, pooling in runs:
        ckpt = work / kind / pooling / "checkpoint.pth"
        if args.only and f"{kind}/{pooling}" not in args.only:
            continue  # --only: evaluate those runs alone
        key = "model_ema" if kind == "supervised" else "teacher"
        trained, _ = build_backbone_from_checkpoint(ckpt, checkpoint_key=key)
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
        todo = []
        if trained.config not in seen_configs:
            seen_configs.append(trained.config)
            torch.manual_seed(args.seed)
            todo.append(("random init", build_backbone(**trained.config)))
        todo.append((f"trained ({meta['iteration']} it)", trained))
        for label, model in todo:
            r = evaluate(model, samples, data)
            r.update(training=kind if label != "random init" else f"({kind} config)", pooling=pooling, weights=label)
            if kind == "supervised" and label != "random init":
                r["classifier_top1"] = supervised_top1(work / kind / pooling)
            r["train"] = times.get(f"{kind}/{pooling}") if label != "random init" else None
            rows.append(r)
            print(json.dumps(r), flush=True)
    table = format_table(rows)
    print(table)
    if args.write_results:
        write_results(table, rows)
    return 0


def _f(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows) -> str:
    lines = ["| training | pooling | weights | map | MaxBoxAccV2 | IoU 0.3 / 0.5 / 0.7 | MaxBoxAccV2 (similarity) | "
             "CorLoc (attention) | CorLoc (LOST) | k-NN top-1 | classifier top-1 | train wall / CPU min |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ious = " / ".join(f"{v:.1f}" for v in r["per_iou"].values())
        t = r.get("train")
        cost = f"{t['wall_s'] / 60:.1f} / {t['cpu_s'] / 60:.1f}" if t else "-"
        lines.append(f"| {r['training']} | {r['pooling']} | {r['weights']} | {r['map']} | {r['maxboxaccv2']:.1f} | "
                     f"{ious} | {_f(r['maxboxaccv2_similarity'])} | {r['corloc_attention']:.1f} | "
                     f"{r['corloc_lost']:.1f} | {_f(r['knn_top1'])} | {_f(r.get('classifier_top1'))} | {cost} |")
    return "\n".join(lines)


def write_results(table: str, rows) -> None:
    loads = [x for r in rows if r.get("train") for x in r["train"]["load"]]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, CPU only, 1 torch thread "
               f"per run; load average {min(loads):.1f}-{max(loads):.1f} during training" if loads else "")
    text = (f"# The localization miniature (cluttered layout)\n\nEvaluated "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine} (each run's training time is in "
            f"its row; dino_bnhead rows: `--posthoc`, outside the protocol) with "
            f"`python benchmarks/localization.py --skip_train --posthoc --write_results`.\n\n{table}\n\n"
            f"Protocol (from the script's docstring, fixed before the results):\n\n{__doc__.split('Protocol')[1]}")
    out = ROOT / "benchmarks" / "results" / "localization.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
