"""Backbone forward+backward throughput and peak memory on CPU (issue #3 §7).

Rows: vit_small simpool vs cls at 224 and 96 px; resnet50 simpool vs gap at 224 px; vit_small simpool with timm's
fused attention (scaled_dot_product_attention, the default) vs explicit attention (``explicit_attention``).

Throughput: all rows are timed in this one process, round-robin (one fwd+bwd of each row per round), so machine
load hits every row alike; the median iteration time per row gives images/s, and ratios are taken against the
reference row of each pair. Peak memory: each row runs one fwd+bwd in a fresh subprocess and reports the growth of
peak RSS (VmHWM) over the RSS after building the model and the batch (activations + gradients + workspace).

    python benchmarks/backbone.py                 # batch 16, 3 timed rounds
    python benchmarks/backbone.py --threads 1     # shared/loaded machine: avoid thread oversubscription
    python benchmarks/backbone.py --rounds 1 --batch 2 --rows vit_small-simpool-96,vit_small-cls-96
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_simpool.models import build_backbone, explicit_attention  # noqa: E402

# name: (arch, pooling, size, attention)
ROWS = {
    "vit_small-simpool-224": ("vit_small", "simpool", 224, "fused"),
    "vit_small-cls-224": ("vit_small", "cls", 224, "fused"),
    "vit_small-simpool-96": ("vit_small", "simpool", 96, "fused"),
    "vit_small-cls-96": ("vit_small", "cls", 96, "fused"),
    "resnet50-simpool-224": ("resnet50", "simpool", 224, "fused"),
    "resnet50-gap-224": ("resnet50", "gap", 224, "fused"),
    "vit_small-simpool-224-explicit": ("vit_small", "simpool", 224, "explicit"),
}
# (row, reference row, what the ratio says)
PAIRS = [
    ("vit_small-simpool-224", "vit_small-cls-224", "ViT-S/16 224: SimPool vs [CLS]"),
    ("vit_small-simpool-96", "vit_small-cls-96", "ViT-S/16 96: SimPool vs [CLS]"),
    ("resnet50-simpool-224", "resnet50-gap-224", "ResNet-50 224: SimPool vs GAP"),
    ("vit_small-simpool-224", "vit_small-simpool-224-explicit", "ViT-S/16 224 SimPool: fused vs explicit attention"),
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fwd_bwd(model, x, attention: str) -> None:
    ctx = explicit_attention(model) if attention == "explicit" else nullcontext()
    with ctx:
        model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def build(row: str, batch: int):
    arch, pooling, size, attention = ROWS[row]
    torch.manual_seed(0)
    model = build_backbone(arch, pooling=pooling).train()
    x = torch.randn(batch, 3, size, size)
    return model, x, attention


def measure_memory(row: str, batch: int) -> dict:
    """Run in a fresh process: peak RSS growth of one fwd+bwd."""
    model, x, attention = build(row, batch)
    base = _rss_kib("VmRSS")
    fwd_bwd(model, x, attention)
    peak = _rss_kib("VmHWM")
    return {"row": row, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="timed fwd+bwd per row (after one warm-up)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). On a shared, loaded machine 1 avoids "
                         "oversubscription stalls")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    ap.add_argument("--_memory-row", dest="memory_row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_row:
        print(json.dumps(measure_memory(args.memory_row, args.batch)))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")

    load = os.getloadavg()
    print(f"# backbone benchmark: CPU, batch {args.batch}, {args.rounds} timed rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"load avg {load[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    built = {}
    for row in rows:
        built[row] = build(row, args.batch)
        fwd_bwd(*built[row])  # warm-up
    times: dict[str, list[float]] = {r: [] for r in rows}
    for _ in range(args.rounds):
        for row in rows:
            t0 = time.perf_counter()
            fwd_bwd(*built[row])
            times[row].append(time.perf_counter() - t0)
    del built

    memory = {}
    if not args.no_memory:
        for row in rows:
            out = subprocess.run(
                [sys.executable, __file__, "--_memory-row", row, "--batch", str(args.batch),
                 "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )
            memory[row] = json.loads(out.stdout.strip().splitlines()[-1])

    print()
    print("| row | arch | pooling | px | attention | fwd+bwd img/s | median s/iter | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|---|---|")
    ips = {}
    for row in rows:
        arch, pooling, size, attention = ROWS[row]
        med = statistics.median(times[row])
        ips[row] = args.batch / med
        mem = f"{memory[row]['delta_mib']:.0f}" if row in memory else "-"
        attention = attention if arch.startswith("vit") else "-"
        print(f"| {row} | {arch} | {pooling} | {size} | {attention} | {ips[row]:.2f} | {med:.2f} | {mem} |")
    print()
    print("| comparison | speed ratio (row / reference) | memory ratio |")
    print("|---|---|---|")
    for row, ref, what in PAIRS:
        if row in ips and ref in ips:
            mem = (f"{memory[row]['delta_mib'] / memory[ref]['delta_mib']:.2f}"
                   if row in memory and ref in memory and memory[ref]["delta_mib"] > 0 else "-")
            print(f"| {what} | {ips[row] / ips[ref]:.2f} | {mem} |")


if __name__ == "__main__":
    main()
