"""Folder scan time: SafeImageFolder's scan (dino_simpool.data.folder) against os.walk(followlinks=True), the scan
it replaced, and torchvision's ImageFolder, on one synthetic tree of empty image files (no links, so all three find
the same images). Prints a markdown table. Scan only: no image is opened.

    python benchmarks/folder_scan.py --classes 100 --per_class 200
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dino_simpool.data.folder import IMG_EXTENSIONS, scan_class_folders


def make_tree(root: Path, classes: int, per_class: int) -> None:
    for c in range(classes):
        d = root / f"n{c:05d}"
        d.mkdir(parents=True)
        for j in range(per_class):
            (d / f"img_{j:06d}.jpg").touch()


def os_walk_scan(root: str) -> int:
    """The scan SafeImageFolder used before: os.walk(followlinks=True) per class folder, sorted."""
    n = 0
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames.sort()
            n += sum(1 for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return n


def torchvision_scan(root: str) -> int:
    from torchvision.datasets.folder import make_dataset, find_classes  # lazy: optional for this script

    _, class_to_idx = find_classes(root)
    return len(make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS))


def best_of(fn, root: str, repeat: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn(root)
        times.append(time.perf_counter() - t)
    return min(times), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per_class", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_tree(Path(tmp), args.classes, args.per_class)
        rows = [("os.walk(followlinks=True) (before)", os_walk_scan),
                ("dino_simpool scan_class_folders", lambda r: sum(map(len, scan_class_folders(r)[1]))),
                ("torchvision make_dataset", torchvision_scan)]
        results = [(name, *best_of(fn, tmp, args.repeat)) for name, fn in rows]
    ref = results[0][1]
    print(f"{args.classes} classes x {args.per_class} files, best of {args.repeat} (warm cache)\n")
    print("| scan | images | seconds | vs os.walk |\n|---|---:|---:|---:|")
    for name, sec, n in results:
        print(f"| {name} | {n} | {sec:.3f} | {sec / ref:.2f}x |")


if __name__ == "__main__":
    main()
