"""Data pipeline throughput: SyntheticShapes generation and the DINO multi-crop augmentation, one process, one thread.

Prints a table of images/s (best of several interleaved repeats, so a busy machine hurts less). Demo-like setting:
64 px source images, 2 x 32 px global + 6 x 16 px local crops. Ratios are against the stock torchvision.transforms.v2
pipeline measured in the same process.
    python benchmarks/data.py [--n 300] [--repeats 5]
"""
import argparse
import datetime
import os
import platform
import time

import torch

from dino_simpool.data import SyntheticShapes
from dino_simpool.dino.augment import MultiCropAugmentation


def rate(fn, n):
    """-> (images per wall-clock second, images per CPU second of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.n
    ds = SyntheticShapes("train", image_size=args.size, images_per_class=max(1, n // 10 + 1))
    ds224 = SyntheticShapes("train", image_size=224, images_per_class=max(1, n // 10 + 1))
    fast = MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 6, 32, 16, backend="fast")
    ref = MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 6, 32, 16, backend="v2")
    imgs = [ds.image(i) for i in range(n)]
    cases = {
        f"generate {args.size}px (render, uint8 array)": lambda i: ds.render(i),
        f"generate {args.size}px (PIL image)": lambda i: ds.image(i),
        "generate 224px (PIL image)": lambda i: ds224.image(i),
        "boxes only (coverage mask)": lambda i: ds.box(i),
        "multi-crop fast (2x32 + 6x16)": lambda i: fast(imgs[i]),
        "multi-crop v2 reference (2x32 + 6x16)": lambda i: ref(imgs[i]),
        "generate + multi-crop fast": lambda i: fast(ds.image(i)),
    }
    best = {k: (0.0, 0.0) for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            m = n if "224" not in k else max(20, n // 5)
            w, c = rate(fn, m)
            best[k] = (max(best[k][0], w), max(best[k][1], c))
    print(f"# data pipeline throughput, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, 1 process, torch threads 1, best of {args.repeats}, load avg "
          f"{os.getloadavg()[0]:.1f}")
    print("# images/s (wall) is wall-clock; images/s (CPU) divides by this process's CPU time, which is what one")
    print("# uncontended core would give when the machine is shared")
    print(f"| {'case':45s} | {'images/s (wall)':>15s} | {'images/s (CPU)':>14s} |")
    print(f"|{'-' * 47}|{'-' * 17}|{'-' * 16}|")
    for k, (w, c) in best.items():
        print(f"| {k:45s} | {w:15.0f} | {c:14.0f} |")
    f, r = best["multi-crop fast (2x32 + 6x16)"], best["multi-crop v2 reference (2x32 + 6x16)"]
    print(f"\nfast / v2 multi-crop speed ratio: {f[0] / r[0]:.2f}x (wall), {f[1] / r[1]:.2f}x (CPU)")


if __name__ == "__main__":
    main()
