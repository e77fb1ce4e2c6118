"""Training-step throughput on CPU for the demo configuration, against the data pipeline and a matmul peak.

    .venv/bin/python benchmarks/train_step.py [--iters 8] [--write benchmarks/results/train_step.md]

Measured in one process, in this order:
  1. fp32 matmul peak (2048^3, best of 5): the ceiling a training step can be compared with;
  2. the training step alone (student fwd+bwd on 2 global + N local crops, teacher fwd on the global crops, DINO loss,
     AdamW step, EMA) on pre-made crops: images/s and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode);
  3. the data pipeline alone (embedded dataset -> multi-crop augmentation -> DataLoader with 2 workers): images/s;
  4. the real loop (pipeline with 2 workers feeding the step): images/s;
  5. peak RSS of this process and of its (worker) children.
The pipeline is not the bottleneck when (3) is well above (2) and (4) is close to (2).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_simpool.data import build_dataset  # noqa: E402
from dino_simpool.demo import DEMO_FLAGS, demo_argv  # noqa: E402
from dino_simpool.dino.augment import MultiCropAugmentation  # noqa: E402
from dino_simpool.dino.config import parse_config  # noqa: E402
from dino_simpool.dino.determinism import ResumableDistributedSampler, SeededDataset, seed_all  # noqa: E402
from dino_simpool.dino.head import DINOHead, MultiCropWrapper  # noqa: E402,F401
from dino_simpool.dino.loss import DINOLoss  # noqa: E402
from dino_simpool.dino.optim import build_optimizer, ema_update, param_groups  # noqa: E402
from dino_simpool.dino.trainer import build_student_teacher, make_loader  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=8, help="timed training steps")
    ap.add_argument("--pipeline_batches", type=int, default=12)
    ap.add_argument("--write", type=str, default=None, help="also write the markdown table to this file")
    a = ap.parse_args(argv)

    cfg = parse_config(demo_argv("/tmp/dino_simpool_bench", num_workers=2))
    cfg.resolve("cpu")
    B = cfg.batch_size_per_gpu
    threads = torch.get_num_threads()
    peak = matmul_peak()

    # ---- 2. the step alone on pre-made crops
    seed_all(0)
    student, teacher = build_student_teacher(cfg)
    opt = build_optimizer("adamw", param_groups(student))
    for g in opt.param_groups:
        g["lr"] = 1e-4
    loss_fn = DINOLoss(cfg.out_dim, cfg.ncrops, 0.04, 0.04, 0, 10)
    crops = [torch.randn(B, 3, cfg.global_crops_size, cfg.global_crops_size) for _ in range(2)] + \
            [torch.randn(B, 3, cfg.local_crops_size, cfg.local_crops_size) for _ in range(cfg.local_crops_number)]

    def step(images):
        with torch.no_grad():
            t_out = teacher(images[:2])
        s_out = student(images)
        loss = loss_fn(s_out, t_out, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(teacher, student, 0.996)
        return loss

    from torch.utils.flop_counter import FlopCounterMode
    step(crops)  # warm-up
    with FlopCounterMode(display=False) as fc:
        step(crops)
    flops = fc.get_total_flops()
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step(crops)
        times.append(time.perf_counter() - t)
    t_step = sorted(times)[len(times) // 2]
    step_ips = B / t_step
    gflops = flops / t_step / 1e9

    # ---- 3. the pipeline alone (2 workers)
    tf = MultiCropAugmentation(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                               global_size=cfg.global_crops_size, local_size=cfg.local_crops_size)
    ds = build_dataset(None, "train", transform=tf, image_size=cfg.synthetic_size,
                       images_per_class=cfg.synthetic_per_class)
    sampler = ResumableDistributedSampler(len(ds), batch_size=B, seed=0)
    loader = make_loader(SeededDataset(ds, 0), sampler, cfg, torch.device("cpu"))
    it = iter(loader)
    next(it)  # worker start-up excluded
    t = time.perf_counter()
    n = 0
    for _ in range(a.pipeline_batches):
        next(it)
        n += B
    pipe_ips = n / (time.perf_counter() - t)
    del it

    # ---- 4. the real loop: pipeline feeding the step
    sampler.set_epoch(1)
    it = iter(loader)
    step(next(it)[0])
    t = time.perf_counter()
    n = 0
    for _ in range(min(a.iters, len(sampler) // B - 1)):
        images, _ = next(it)
        step(images)
        n += B
    loop_ips = n / (time.perf_counter() - t)
    del it, loader

    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    nparams = sum(p.numel() for p in student.parameters())
    load = os.getloadavg()

    desc = (f"tiny SimPool ViT (depth {cfg.depth}, dim {cfg.embed_dim}, patch {cfg.patch_size}; student "
            f"{nparams / 1e6:.2f} M params incl. head out_dim {cfg.out_dim}), batch {B}, 2x{cfg.global_crops_size} px "
            f"+ {cfg.local_crops_number}x{cfg.local_crops_size} px crops, fp32, AdamW (= the demo config)")
    rows = [
        ("fp32 matmul peak (2048^3)", f"{peak:.1f} GFLOP/s", "reference"),
        ("training step alone (pre-made crops)", f"{step_ips:.1f} img/s", f"{t_step * 1000:.0f} ms/step"),
        ("  FLOPs per step (student fwd+bwd, teacher fwd)", f"{flops / 1e9:.1f} GFLOP", ""),
        ("  achieved", f"{gflops:.1f} GFLOP/s", f"{100 * gflops / peak:.0f}% of the matmul peak"),
        ("data pipeline alone (2 workers)", f"{pipe_ips:.1f} img/s",
         f"{pipe_ips / step_ips:.1f}x the step's rate"),
        ("real loop (2 workers feeding the step)", f"{loop_ips:.1f} img/s", f"{100 * loop_ips / step_ips:.0f}% of the step alone"),
        ("peak RSS, main process", f"{rss_self:.0f} MiB", ""),
        ("peak RSS, largest worker", f"{rss_children:.0f} MiB", ""),
    ]
    verdict = ("the pipeline is NOT the bottleneck" if pipe_ips > 1.5 * step_ips
               else "WARNING: the pipeline is close to or below the step's rate")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Training step (CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads; "
        f"{now}; load average at the end {load[0]:.1f} (the machine is shared: absolute figures vary, the "
        f"ratios measured in one process are the claim).",
        "",
        f"Config: {desc}. Command: `.venv/bin/python benchmarks/train_step.py`.",
        "",
        "| measurement | value | note |",
        "|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows],
        "",
        f"Verdict: {verdict} (pipeline {pipe_ips:.0f} img/s vs step {step_ips:.0f} img/s).",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
