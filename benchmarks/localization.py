"""SimPool vs [CLS] localization in miniature: MaxBoxAccV2 and CorLoc (attention and LOST boxes) on the embedded val
split, for two checkpoints of the same short DINO training that differ only in ``--pooling``.

    python benchmarks/localization.py                       # train both (training CLI), evaluate, print the table
    python benchmarks/localization.py --skip_train --workdir DIR   # re-evaluate the checkpoints in DIR
    python benchmarks/localization.py --write_results       # also write benchmarks/results/localization.md

The reference run in the same process is each architecture at its random initialisation (same seed as the
training), so the table shows what the short training adds. Maps: SimPool's pooling attention; for cls the last
block's [CLS] attention averaged over heads. LOST uses the last block's patch keys for both.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from eval import discovery, localization  # noqa: E402
from eval.locdata import embedded_samples  # noqa: E402

MODEL = ["--arch", "vit_tiny", "--depth", "4", "--embed_dim", "64", "--num_heads", "4", "--patch_size", "4"]


def train_flags(args) -> list[str]:
    return MODEL + [
        "--global_crops_size", str(args.size), "--local_crops_size", str(args.size // 2), "--local_crops_number", "2",
        "--out_dim", "1024", "--use_bn_in_head", "False", "--norm_last_layer", "True", "--freeze_last_layer", "0",
        "--optimizer", "adamw", "--lr", str(args.lr), "--min_lr", "1e-5", "--warmup_epochs", "1",
        "--weight_decay", "0.04", "--weight_decay_end", "0.1", "--clip_grad", "3.0", "--momentum_teacher", "0.99",
        "--teacher_temp", "0.04", "--warmup_teacher_temp", "0.04", "--warmup_teacher_temp_epochs", "0",
        "--batch_size_per_gpu", str(args.batch_size), "--epochs", str(args.epochs),
        "--synthetic_size", str(args.size), "--synthetic_per_class", str(args.per_class),
        "--eval_every", "0", "--num_workers", "0", "--seed", "0", "--log_every", "10",
    ]


def train(pooling: str, args) -> float:
    out = Path(args.workdir) / pooling
    cmd = [sys.executable, "-m", "dino_simpool.train", *train_flags(args), "--pooling", pooling, "--output_dir", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"training {pooling} failed with exit code {rc}")
    return time.time() - t0


def evaluate(model, samples, args) -> dict:
    model = model.eval()
    t0 = time.time()
    loc = localization.evaluate_model(model, samples, batch_size=64)
    att = discovery.evaluate_model(model, samples, "attention", batch_size=64, mass=0.6)
    lost = discovery.evaluate_model(model, samples, "lost", batch_size=64)
    return {"maxboxaccv2": loc["maxboxaccv2"], "per_iou": loc["per_iou"], "corloc_attention": att["corloc"],
            "corloc_lost": lost["corloc"], "num_images": loc["num_images"], "eval_s": time.time() - t0}


def baselines(samples, size: int) -> list[dict]:
    """Data-only references: a centred Gaussian map (the centre prior) for MaxBoxAccV2 and the attention-style box;
    the whole image as the box for CorLoc."""
    import numpy as np

    from eval.discovery import attention_box, corloc
    from eval.localization import max_box_acc_v2

    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    centre = np.exp(-(((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (size / 4) ** 2)))
    gts = [s.boxes for s in samples]
    loc = max_box_acc_v2([centre] * len(samples), gts, [(size, size)] * len(samples))
    att = corloc([attention_box(centre, (size, size), 0.6)] * len(samples), gts)
    whole = corloc([(0, 0, size, size)] * len(samples), gts)
    return [{"pooling": "-", "model": "centre prior / whole-image box", "maxboxaccv2": loc["maxboxaccv2"],
             "per_iou": loc["per_iou"], "corloc_attention": att, "corloc_lost": whole, "num_images": len(samples)}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/dino_simpool_bench_localization")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per_class", type=int, default=40, help="embedded train images per class")
    p.add_argument("--size", type=int, default=32, help="image / global crop size (val split rendered at it too)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.004, help="peak lr at batch 256 (scaled by batch/256)")
    p.add_argument("--val_per_class", type=int, default=50)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--write_results", action="store_true", help="write benchmarks/results/localization.md")
    args = p.parse_args(argv)

    from dino_simpool.models.backbones import build_backbone
    from dino_simpool.models.weights import build_backbone_from_checkpoint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    times = Path(args.workdir) / "train_times.json"
    train_s = json.loads(times.read_text()) if times.is_file() else {}
    for pooling in ("simpool", "cls"):
        if not args.skip_train:
            train_s[pooling] = train(pooling, args)
            times.write_text(json.dumps(train_s))
    samples = embedded_samples("val", args.size, args.val_per_class)
    rows = baselines(samples, args.size)
    for r in rows:
        print(json.dumps(r), flush=True)
    for pooling in ("simpool", "cls"):
        ckpt = Path(args.workdir) / pooling / "checkpoint.pth"
        trained, _ = build_backbone_from_checkpoint(ckpt)
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
        torch.manual_seed(0)
        rand = build_backbone(**trained.config)
        for label, model in (("random init", rand), (f"trained ({meta['iteration']} it)", trained)):
            r = evaluate(model, samples, args)
            r.update(pooling=pooling, model=label)
            rows.append(r)
            print(json.dumps(r), flush=True)
    table = format_table(rows)
    print(table)
    if args.write_results:
        write_results(table, rows, args, train_s)
    return 0


def format_table(rows) -> str:
    lines = ["| pooling | weights | MaxBoxAccV2 | IoU 0.3 / 0.5 / 0.7 | CorLoc (attention) | CorLoc (LOST) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ious = " / ".join(f"{v:.1f}" for v in r["per_iou"].values())
        lines.append(f"| {r['pooling']} | {r['model']} | {r['maxboxaccv2']:.2f} | {ious} | {r['corloc_attention']:.2f} | "
                     f"{r['corloc_lost']:.2f} |")
    return "\n".join(lines)


def write_results(table, rows, args, train_s) -> None:
    flags = " ".join(train_flags(args))
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"
    text = f"""# Localization: SimPool vs [CLS] (embedded val split)

Measured {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine} with
`python benchmarks/localization.py --write_results` (epochs {args.epochs}, {args.per_class} train images per class,
{rows[0]['num_images']} val images at {args.size} px). Both checkpoints come from the same training command, only
`--pooling` differs; training took {', '.join(f'{k} {v / 60:.1f} min' for k, v in train_s.items()) or 'n/a (--skip_train)'}.

{table}

Training flags (plus `--pooling simpool|cls`): `{flags}`

MaxBoxAccV2 (Choe et al.): mean over IoU 0.3/0.5/0.7 of the best threshold's box accuracy, boxes around all contours
of the min-max-normalised map. CorLoc: one box per image, IoU >= 0.5 with the object box; attention = largest
component of DINO's 60 % cumulative-mass mask; LOST = seed expansion on the last block's patch keys (k = 100).
Maps: SimPool's pooling attention; cls: the last block's [CLS] attention averaged over heads.
First row, no model: a centred Gaussian map (sigma = a quarter of the side) for MaxBoxAccV2 and the attention box,
and the whole image as the box in the LOST column.
"""
    out = ROOT / "benchmarks" / "results" / "localization.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
