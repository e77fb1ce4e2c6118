"""Linear-probe sweep benchmark: 8 learning rates in ONE pass with many heads vs 8 separate runs, same data.

    .venv/bin/python benchmarks/linear.py                     # tiny ViT on the embedded dataset, 2 epochs
    .venv/bin/python benchmarks/linear.py --embed_dim 384 --depth 12 --patch_size 16 --crop 64 --resize 72

Every run goes through ``eval.linear.run`` (the same code path as ``dino-simpool-linear``), in this process, on the
same frozen backbone (random init: the cost does not depend on the weights), the same embedded-dataset images,
the same seed and therefore the same data order and augmentation. Rows:

  * separate : 8 runs, one head each (``--lrs <one lr>``): 8 × (data loading + backbone forward + 1 head);
  * one pass : 1 run with ``--lrs <8 lrs>``: data loading + backbone forward once, 8 heads;
  * cached   : 1 run with ``--lrs <8 lrs> --cached_features``: extract centre-crop features once, then 8 heads on
               the cached tensors (the fast sweep mode; no augmentation, so not the full protocol).

It also checks that every head's final top-1 in the one-pass run equals the same head trained alone. Wall and
process CPU time are both reported; the default ``--threads 1`` keeps them stable on a shared machine (with 2 OpenMP
threads on 2 busy cores, spin-waiting inflated both by up to 15x and made the ratios noise).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import linear  # noqa: E402

LRS = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed_dim", type=int, default=192)
    p.add_argument("--num_heads", type=int, default=3)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--pooling", default="simpool")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--resize", type=int, default=36)
    p.add_argument("--per_class", type=int, default=40, help="embedded dataset: train images per class (val: 1/4)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable timings on a shared machine; 0 = leave as is)")
    p.add_argument("--feature_set", default="last1")
    p.add_argument("--repeats", type=int, default=1, help="repeat every mode; the table gives the fastest repeat")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    common = ["--arch", a.arch, "--pooling", a.pooling, "--patch_size", str(a.patch_size), "--crop", str(a.crop),
              "--resize", str(a.resize), "--synthetic_size", str(a.resize), "--synthetic_per_class", str(a.per_class),
              "--epochs", str(a.epochs), "--batch_size_per_gpu", str(a.batch_size), "--num_workers", str(a.num_workers),
              "--val_freq", str(a.epochs), "--feature_sets", a.feature_set, "--backend", "gloo"]
    if a.arch.startswith("vit"):
        common += ["--depth", str(a.depth), "--embed_dim", str(a.embed_dim), "--num_heads", str(a.num_heads)]

    cpu: list[float] = []  # CPU seconds of this process per run (less sensitive than wall time to a shared machine)

    def timed(extra: list[str]):
        with tempfile.TemporaryDirectory() as d:
            args = linear.get_args_parser().parse_args(common + ["--output_dir", d] + extra)
            buf = io.StringIO()
            t0, c0 = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(buf):
                res = linear.run(args)
            cpu.append(time.process_time() - c0)
            return time.perf_counter() - t0, res

    lr_flags = [f"{lr:g}" for lr in LRS]
    timed(["--lrs", lr_flags[0], "--epochs", "1"])  # warm-up (imports, allocator, first-call overheads)

    sep_ts, one_ts, cached_ts, sep_top1 = [], [], [], {}
    sep_c, one_c, cached_c = [], [], []
    for _ in range(max(1, a.repeats)):
        total, total_c = 0.0, 0.0
        for lr in lr_flags:
            t, res = timed(["--lrs", lr])
            total, total_c = total + t, total_c + cpu[-1]
            sep_top1.update({k: v["top1"] for k, v in res["last"].items()})
        sep_ts.append(total)
        sep_c.append(total_c)
        t, one = timed(["--lrs", *lr_flags])
        one_ts.append(t)
        one_c.append(cpu[-1])
        t, cached = timed(["--lrs", *lr_flags, "--cached_features"])
        cached_ts.append(t)
        cached_c.append(cpu[-1])
    sep_t, one_t, cached_t = min(sep_ts), min(one_ts), min(cached_ts)
    sep_cpu, one_cpu, cached_cpu = min(sep_c), min(one_c), min(cached_c)
    diff = max(abs(one["last"][k]["top1"] - sep_top1[k]) for k in sep_top1)
    in_dim = one["heads"][0]["in_dim"]

    dev = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# linear-probe sweep: {len(LRS)} lrs, {a.arch} d={a.embed_dim} depth={a.depth} patch={a.patch_size} "
          f"pooling={a.pooling}, {a.crop}px, feature set {a.feature_set} ({in_dim}-d), embedded dataset "
          f"{a.per_class * 10} train / {max(1, a.per_class // 4) * 10} val, {a.epochs} epochs, batch {a.batch_size}")
    print(f"# {platform.node()} {platform.machine()} {dev}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; fastest of {max(1, a.repeats)} repeat(s); "
          f"load average {os.getloadavg()[0]:.1f}; all repeats (wall s): separate {[round(x, 1) for x in sep_ts]}, one pass {[round(x, 1) for x in one_ts]}, "
          f"cached {[round(x, 1) for x in cached_ts]}")
    print()
    print("| mode | runs | heads per run | wall time (s) | speed-up (wall) | CPU time (s) | speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| 8 separate runs (1 head each) | 8 | 1 | {sep_t:.1f} | 1.00x | {sep_cpu:.1f} | 1.00x |")
    print(f"| one pass, many heads | 1 | 8 | {one_t:.1f} | {sep_t / one_t:.2f}x | {one_cpu:.1f} | {sep_cpu / one_cpu:.2f}x |")
    print(f"| cached features, many heads (not the full protocol) | 1 | 8 | {cached_t:.1f} | {sep_t / cached_t:.2f}x "
          f"| {cached_cpu:.1f} | {sep_cpu / cached_cpu:.2f}x |")
    print()
    print(f"one pass / separate: wall {one_t / sep_t:.3f}, CPU {one_cpu / sep_cpu:.3f} "
          f"(the one pass saves {100 * (1 - one_cpu / sep_cpu):.0f} % of the CPU time)")
    print(f"max |top-1 difference| between a head in the one-pass run and the same head alone: {diff:.4f} points")
    print(f"best head (one pass): {one['best_head']} top-1 {one['best'][one['best_head']]['top1']:.2f}%; "
          f"cached mode best: {cached['best_head']} {cached['best'][cached['best_head']]['top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
