"""Cost of every pooling in the registry: forward+backward time and peak memory on CPU.

Setting (issue #2 §5): tokens (B, N, d) = (64, 196, 384), i.e. a ViT-S/16 at 224 px (a 14 x 14 grid for the
spatial poolings), fp32, training mode, input requires grad, loss = <pooled, fixed random weights>.

- Time: forward + backward of one step. Steps of all poolings are interleaved round by round (so a change in
  machine load hits every pooling alike); after warm-up, the median (and min) over the repeats is reported, and
  the ratio of each median to GAP's median, all measured in this process.
- Peak memory: one extra step per pooling under torch.profiler(profile_memory=True); from its memory timeline
  (``export_memory_timeline``, every tensor the CPU allocator handed out, by category) we take the peak of the
  total live bytes during the step minus the live bytes at its start (input and parameters). So it is the extra
  memory that one forward+backward needs: activations, temporaries and gradients (the input's gradient,
  64·196·384·4 B = 18.4 MiB, included); not the process RSS.

    python benchmarks/pooling.py [--repeats 15] [--warmup 3] [--threads 1] [--out benchmarks/results/pooling.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from dino_simpool.pooling import build_pooling, list_poolings

CASES = [(n, {"gamma": 1.25} if n == "simpool" else {}) for n in list_poolings()]
CASES.insert(CASES.index(("simpool", {"gamma": 1.25})) + 1, ("simpool", {"gamma": None}))


def label(name: str, options: dict) -> str:
    if name == "simpool":
        return f"simpool (gamma={options['gamma']})"
    return name


def make_step(module, x, w):
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        (module(x) * w).sum().backward()
    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def peak_memory_mib(step) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        with warnings.catch_warnings():  # deprecated in favour of a CUDA-only API; still the CPU way
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20 if totals else float("nan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier on a shared box)")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory step")
    ap.add_argument("--out", default=None, help="also write the table (markdown, with machine and date) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n, d = args.batch, args.tokens, args.dim
    steps, params = {}, {}
    for name, options in CASES:
        m = build_pooling(name, d, **options).train()
        x = torch.randn(b, n, d, requires_grad=True)
        w = torch.randn(b, d)
        key = label(name, options)
        steps[key] = make_step(m, x, w)
        params[key] = sum(p.numel() for p in m.parameters())
    times = {k: [] for k in steps}
    for r in range(args.warmup + args.repeats):
        for k, step in steps.items():
            t = timed(step)
            if r >= args.warmup:
                times[k].append(t)
    mem = {k: (float("nan") if args.no_memory else peak_memory_mib(step)) for k, step in steps.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    ref = med["gap"]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"Pooling forward+backward on CPU, B={b}, N={n} ({int(n ** 0.5)}x{int(n ** 0.5)} grid), d={d}, fp32, "
        f"training mode; measured {now:%Y-%m-%d %H:%M} UTC.",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs (shared with other jobs; load average "
        f"{os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, {args.threads} torch thread(s). "
        f"Median (and min) of {args.repeats} interleaved repeats after {args.warmup} warm-up rounds; ratio = median "
        f"/ GAP's median, same process. Peak memory = peak live tensor bytes during one step minus those at its "
        f"start, from the torch.profiler memory timeline.",
        "",
        f"| {'pooling':22s} | {'params':>9s} | {'median ms':>9s} | {'min ms':>8s} | {'x GAP':>7s} | {'peak MiB':>8s} |",
        f"|{'-' * 24}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 10}|",
    ]
    for k in steps:
        lines.append(f"| {k:22s} | {params[k]:9d} | {med[k]:9.2f} | {best[k]:8.2f} | {med[k] / ref:7.2f} | "
                     f"{mem[k]:8.1f} |")
    sp, sp0 = "simpool (gamma=1.25)", "simpool (gamma=None)"
    lines += ["", f"SimPool (gamma=1.25) costs {med[sp] / ref:.2f}x GAP's time and {mem[sp] / mem['gap']:.2f}x its peak "
                  f"memory; SimPool (gamma=None) {med[sp0] / ref:.2f}x and {mem[sp0] / mem['gap']:.2f}x."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Pooling cost (benchmarks/pooling.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
