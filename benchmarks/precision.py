"""Does DINO's head need fp32 logits under bf16 autocast? Loss and teacher entropy against fp32, same data and init.

    .venv/bin/python benchmarks/precision.py [--steps 200] [--write benchmarks/results/precision.md]

Three runs of the same tiny SimPool ViT from the same initial weights on the same batches (the embedded dataset,
multi-crop in this process): fp32; bf16 autocast; bf16 autocast with the head's last layer in fp32
(``DINOHead(fp32_logits=True)``). The head's bf16 logits have ~4e-3 resolution near +-1 and are divided by the
teacher temperature (0.04 here from the start), so their rounding is amplified 25x. Reported: the mean absolute
difference to the fp32 run of the loss and of the teacher entropy, over all steps and over the last quarter.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_simpool.data import build_dataset  # noqa: E402
from dino_simpool.data.loader import make_loader  # noqa: E402
from dino_simpool.dino.augment import MultiCropAugmentation  # noqa: E402
from dino_simpool.config import parse_config  # noqa: E402
from dino_simpool.data.sampling import ResumableDistributedSampler, SeededDataset  # noqa: E402
from dino_simpool.dino.determinism import seed_all, seed_step  # noqa: E402
from dino_simpool.dino.build import build_student_teacher  # noqa: E402
from dino_simpool.dino.loss import DINOLoss  # noqa: E402
from dino_simpool.dino.optim import apply_schedules, build_optimizer, param_groups  # noqa: E402
from dino_simpool.dino.step import DINOStep, StepSettings  # noqa: E402

FLAGS = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
         "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
         "--out_dim", "1024", "--batch_size_per_gpu", "8", "--clip_grad", "3.0"]


def run(precision: str, fp32_logits: bool, batches: list, steps: int) -> list[tuple[float, float]]:
    cfg = parse_config(FLAGS)
    seed_all(0)
    student, teacher = build_student_teacher(cfg)
    for m in (student, teacher):
        m.head.fp32_logits = fp32_logits
    opt = build_optimizer("adamw", param_groups(student))
    loss = DINOLoss(cfg.out_dim, cfg.ncrops, 0.04, 0.04, 0, 100)
    step = DINOStep(student, student, teacher, loss, opt, StepSettings(precision, cfg.clip_grad), torch.device("cpu"))
    step.train_mode()
    out = []
    for it in range(steps):
        seed_step(0, 0, it)
        apply_schedules(opt, 5e-4 * min(1.0, (it + 1) / 20), 0.04)
        stats = step(batches[it % len(batches)], 1, 0.996)
        out.append((float(stats[0]), float(stats[1])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", type=str, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = parse_config(FLAGS)
    tf = MultiCropAugmentation(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                               global_size=cfg.global_crops_size, local_size=cfg.local_crops_size)
    ds = build_dataset(None, "train", transform=tf, image_size=64, images_per_class=16)
    sampler = ResumableDistributedSampler(len(ds), batch_size=cfg.batch_size_per_gpu, seed=0)
    batches = [b[0] for b in make_loader(SeededDataset(ds, 0), cfg.batch_size_per_gpu, 0, sampler=sampler,
                                         drop_last=True)]
    ref = run("fp32", False, batches, a.steps)
    rows = []
    for name, prec, fp32_logits in (("bf16 autocast, bf16 logits", "bf16", False),
                                    ("bf16 autocast, fp32 last layer", "bf16", True)):
        got = run(prec, fp32_logits, batches, a.steps)
        q = a.steps * 3 // 4
        d = [(abs(g[0] - r[0]), abs(g[1] - r[1])) for g, r in zip(got, ref)]
        rows.append((name, sum(x[0] for x in d) / len(d), sum(x[0] for x in d[q:]) / len(d[q:]),
                     sum(x[1] for x in d) / len(d), sum(x[1] for x in d[q:]) / len(d[q:]), got[-1]))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["## bf16 logits in the DINO head (CPU)", "",
             f"{now}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads; {a.steps} steps of a "
             f"tiny SimPool ViT (depth 1, width 32, patch 8), out_dim {cfg.out_dim}, batch {cfg.batch_size_per_gpu}, teacher "
             f"temperature 0.04, AdamW. fp32 run at the last step: loss {ref[-1][0]:.4f}, teacher entropy "
             f"{ref[-1][1]:.4f}. Command: `.venv/bin/python benchmarks/precision.py --steps {a.steps}`.", "",
             "| run | mean abs. loss diff. to fp32 | (last quarter) | mean abs. entropy diff. | (last quarter) | "
             "last loss / entropy |", "|---|---|---|---|---|---|"]
    for name, l_all, l_q, h_all, h_q, last in rows:
        lines.append(f"| {name} | {l_all:.4f} | {l_q:.4f} | {h_all:.4f} | {h_q:.4f} | {last[0]:.4f} / {last[1]:.4f} |")
    text = "\n".join(lines)
    print(text)
    if a.write:
        Path(a.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
