"""Peak memory per rank of training's periodic k-NN on a simulated 16-rank ImageNet bank, before and after the
sharded search, COMPUTED from the code's chunk sizes (no GPU, no data: nothing is allocated).

    .venv/bin/python benchmarks/knn_memory.py                     # 16 ranks, 1 281 167 x {2048, 384}, 50 000 val
    .venv/bin/python benchmarks/knn_memory.py --ranks 8 --dims 768

* after: :func:`dino_simpool.evaluation.knn.periodic_knn_memory`, which reads the library's own constants
  (``GATHER_CHUNK``, ``BANK_BLOCK``, ``torch_query_chunk``, ``merge_chunk``, ``shard_rows`` ...), so the table
  follows the code when they change;
* before: the code of commit b2978d1 written out here (it no longer exists to import): every rank gathered the whole
  bank in steps of ``world x min(65536, rows per rank)`` rows (comm buffers on the GPU under NCCL, two host copies
  on the host), kept it, and rank 0 searched alone with faiss-cpu, whose ``IndexFlatIP`` held a
  normalised copy of the (raw) bank.

Counted: feature tensors, gather/comm buffers, search and merge buffers. Not counted: the model, its activations,
the training's own memory, allocator slack. Peak = the largest phase (val gather, bank, search, merge).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_simpool.evaluation.features import GATHER_CHUNK  # noqa: E402
from dino_simpool.evaluation.knn import (BANK_BLOCK, FAISS_QUERY_CHUNK, periodic_knn_memory,  # noqa: E402
                                         search_flops, shard_rows)

GB = 1e9
OLD_GATHER_ROWS_PER_RANK = 65536  # b2978d1 features.py: gather_chunk=65536 rows from EVERY rank per step


def before_memory(n_bank: int, n_query: int, dim: int, world: int, kmax: int) -> dict[str, int]:
    """Peak bytes per rank of b2978d1's periodic k-NN (default faiss-cpu backend), from that code's chunk sizes."""
    f32, i64 = 4, 8
    n_local, q_local = -(-n_bank // world), -(-n_query // world)

    def gather(n, n_loc):  # (host, device) of extract_features: local rows, out, per-step buffers
        c = min(OLD_GATHER_ROWS_PER_RANK, n_loc)
        comm = (world + 1) * c * dim * f32  # this rank's chunk + world chunks received (NCCL: on the GPU)
        # host per step: the .cpu() parts and their cat (the parts are freed on return), then the cat and the kept
        # rows part[k]: 2 x (world x c) rows at most
        host = n_loc * dim * f32 + n * dim * f32 + 2 * world * c * dim * f32
        return host, comm

    bank_host, bank_dev = gather(n_bank, n_local)
    val_host, val_dev = gather(n_query, q_local)
    val_host += n_bank * dim * f32  # the gathered bank is kept on every rank
    qc = min(n_query, FAISS_QUERY_CHUNK)
    rank0_search = (2 * n_bank * dim * f32  # the bank and IndexFlatIP's normalised copy
                    + n_query * dim * f32 + qc * dim * f32 + qc * kmax * (f32 + i64 + i64))
    others_search = n_bank * dim * f32 + n_query * dim * f32  # waiting in the barrier, holding the bank
    return {"rank0_host": max(bank_host, val_host, rank0_search), "other_host": max(bank_host, val_host, others_search),
            "device": max(bank_dev, val_dev)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--bank", type=int, default=1_281_167, help="train images (ImageNet-1k)")
    ap.add_argument("--queries", type=int, default=50_000, help="val images (ImageNet-1k)")
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 384], help="feature dims (ResNet-50, ViT-S)")
    ap.add_argument("--kmax", type=int, default=200, help="max k (DINO's 10 20 100 200)")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="also measure a one-process faiss-cpu search on an N-row 384-d bank against the model")
    ap.add_argument("--_measure", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._measure:
        measure(a._measure)
        return 0
    w = a.ranks
    rows = max(len(shard_rows(a.bank, w, r)) for r in range(w))
    print(f"Periodic k-NN, peak memory per rank (GB = 1e9 bytes), computed {datetime.date.today()}: {w} ranks, "
          f"bank {a.bank} x d, {a.queries} val queries, max k {a.kmax}; GATHER_CHUNK {GATHER_CHUNK} rows per step "
          f"in all, BANK_BLOCK {BANK_BLOCK} rows, largest shard {rows} rows\n")
    print("| features | bank (fp32) | before: host, rank 0 | before: host, other ranks | before: GPU (NCCL gather) "
          "| after, GPU node (NCCL, torch search on the GPU): host | after: GPU | after, CPU node (gloo, faiss-cpu): "
          "host |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in a.dims:
        b = before_memory(a.bank, a.queries, d, w, a.kmax)
        t = periodic_knn_memory(a.bank, a.queries, d, w, a.kmax, backend="torch")
        f = periodic_knn_memory(a.bank, a.queries, d, w, a.kmax, backend="faiss", nccl=False)
        name = {2048: "ResNet-50, 2048-d", 384: "ViT-S, 384-d"}.get(d, f"{d}-d")
        print(f"| {name} | {a.bank * d * 4 / GB:.2f} | {b['rank0_host'] / GB:.2f} | {b['other_host'] / GB:.2f} | "
              f"{b['device'] / GB:.2f} | {t['host'] / GB:.2f} | {t['device'] / GB:.2f} | {f['host'] / GB:.2f} |")
    print("\nPhases of the after case (GB, host / GPU), torch backend:")
    print("| features | val gather | bank shard | search | merge + vote |")
    print("|---|---|---|---|---|")
    for d in a.dims:
        t = periodic_knn_memory(a.bank, a.queries, d, w, a.kmax, backend="torch")
        cells = " | ".join(f"{t[p + '_host'] / GB:.2f} / {t[p + '_device'] / GB:.2f}"
                           for p in ("val", "bank", "search", "merge"))
        print(f"| {d}-d | {cells} |")
    print("\nSearch work (FLOP = 2 x queries x bank x d):")
    print("| features | all ranks | per rank (largest shard) | before: rank 0 alone |")
    print("|---|---:|---:|---:|")
    for d in a.dims:
        print(f"| {d}-d | {search_flops(a.queries, a.bank, d):.2e} | {search_flops(a.queries, rows, d):.2e} | "
              f"{search_flops(a.queries, a.bank, d):.2e} |")
    if a.check:
        check(a.check)
    return 0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def measure(n_bank: int, n_query: int = 5000, dim: int = 384, kmax: int = 200) -> None:
    """In this process: one faiss-cpu search + vote after a small warm-up call (libraries' one-time buffers), peak
    RSS growth (VmHWM reset through /proc/self/clear_refs, glibc's free memory trimmed first), printed with what
    periodic_knn_memory predicts for it (its search/merge phases less the val set and the bank, which exist before
    the call)."""
    import ctypes

    import torch

    from dino_simpool.evaluation.knn import BankShard, knn_classify_shard
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    bank, val = torch.randn(n_bank, dim, generator=g), torch.randn(n_query, dim, generator=g)
    labels, val_labels = torch.randint(0, 1000, (n_bank,), generator=g), torch.randint(0, 1000, (n_query,), generator=g)
    ks = (10, 20, 100, kmax)
    knn_classify_shard(BankShard(bank[:9000], torch.arange(9000), labels[:9000]), val[:300], val_labels[:300],
                       ks=ks, backend="faiss", num_classes=1000, group=False)  # warm-up
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status("VmRSS")
    knn_classify_shard(BankShard(bank, torch.arange(n_bank), labels), val, val_labels, ks=ks, backend="faiss",
                       num_classes=1000, group=False)
    grown = _status("VmHWM") - rss0
    m = periodic_knn_memory(n_bank, n_query, dim, 1, kmax, backend="faiss", nccl=False)
    predicted = max(m["search_host"], m["merge_host"]) - (n_bank + n_query) * dim * 4
    print(f"{grown / 1e6:.1f} {predicted / 1e6:.1f}")


def check(n_bank: int) -> None:
    """The model against a measurement (one process, faiss-cpu, CPU), each in a fresh process: with glibc's
    default malloc, and with a fixed mmap threshold (freed large buffers go back to the OS at once)."""
    import os
    import subprocess
    print(f"\nCheck of the model: one process, faiss-cpu, bank {n_bank} x 384, 5000 queries, max k 200, 1 thread")
    print("| malloc | peak RSS growth measured (MB) | periodic_knn_memory's prediction (MB) |")
    print("|---|---:|---:|")
    for name, extra in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        r = subprocess.run([sys.executable, __file__, "--_measure", str(n_bank)], capture_output=True, text=True,
                           env={**os.environ, **extra}, check=True)
        grown, predicted = r.stdout.split()[-2:]
        print(f"| {name} | {grown} | {predicted} |")


if __name__ == "__main__":
    sys.exit(main())
