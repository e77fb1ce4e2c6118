"""k-NN evaluator benchmark: faiss path vs torch backend vs a DINO-style baseline, same features, same process.

    .venv/bin/python benchmarks/knn.py                        # 100k x 384 bank, 10k queries; then 1.28M bank
    .venv/bin/python benchmarks/knn.py --bank 20000 --queries 2000 --big_queries 0   # quick smoke run

Part 1 (100k x 384 bank, 10k queries, k in {10, 20, 100, 200}, T = 0.07, 1000 classes):
  * faiss   : ``knn_classify(backend="faiss")``: L2-normalise, faiss.knn block by block (8192 bank rows), ONE search with
              max(k) = 200, per-k vote from the sliced neighbour list (incremental scatter-add);
  * torch   : ``knn_classify(backend="torch")``: brute-force matmul + topk(max k), same vote;
  * DINO    : DINO's ``knn_classifier`` written out: for every k, 100 chunks of test images, chunk @ bankᵀ,
              topk(k), one-hot (chunk·k × C) weighted by exp(sim/T), sum, sort. (The one difference from DINO's code
              is a stable sort, so that class-score ties are broken the same way as ours and predictions can be
              compared element by element; it does not change the cost.) It gets pre-normalised features, i.e. it
              is timed without DINO's normalise copy, while the other two normalise inside.
  Reports wall time, the ratio to DINO-style, peak RSS growth during the call (VmHWM, reset before each call via
  /proc/self/clear_refs), and whether the top-min(5,k) predictions of every test image are identical.

Part 2 (1.28M x 384 bank = ImageNet-1k train size, fewer queries): the faiss path only; prints peak RSS growth
  against the bank's own size. A unit-norm bank is searched in place; a raw one is normalised one 8192-row block at
  a time (never a whole normalised copy); everything else (query chunks, neighbour lists, vote) is the "working"
  memory.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_simpool.evaluation.knn import knn_classify  # noqa: E402

MB = 2 ** 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(fn):
    """(result, seconds, peak RSS growth in bytes over the RSS at the start)."""
    reset_peak()
    base = _status("VmRSS")
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    return out, dt, _status("VmHWM") - base


def make_features(n: int, d: int, num_classes: int, centers: torch.Tensor, g: torch.Generator, chunk=65536):
    """Clustered random features (class centre + noise), L2-normalised, built in chunks into one buffer."""
    feats = torch.empty(n, d)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = torch.randn(e - s, d, generator=g)
        x += centers[labels[s:e]]
        feats[s:e] = F.normalize(x, dim=1)
    return feats, labels


@torch.no_grad()
def dino_style(train, train_labels, test, test_labels, ks, T, num_classes, num_chunks=100):
    """DINO eval_knn.knn_classifier, once per k (features already normalised). Returns ({k: (t1, t5)}, preds)."""
    results, preds = {}, {}
    train_t = train.t()
    n_test = test.shape[0]
    step = n_test // num_chunks
    for k in ks:
        top1 = top5 = 0
        retrieval_one_hot = torch.zeros(k, num_classes)
        pk = []
        for idx in range(0, n_test, step):
            feats = test[idx:min(idx + step, n_test)]
            targets = test_labels[idx:min(idx + step, n_test)]
            b = targets.shape[0]
            similarity = torch.mm(feats, train_t)
            distances, indices = similarity.topk(k, largest=True, sorted=True)
            candidates = train_labels.view(1, -1).expand(b, -1)
            retrieved_neighbors = torch.gather(candidates, 1, indices)
            retrieval_one_hot.resize_(b * k, num_classes).zero_()
            retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
            distances_transform = distances.clone().div_(T).exp_()
            probs = torch.sum(torch.mul(retrieval_one_hot.view(b, -1, num_classes), distances_transform.view(b, -1, 1)), 1)
            _, predictions = probs.sort(dim=1, descending=True, stable=True)
            correct = predictions.eq(targets.data.view(-1, 1))
            top1 += correct.narrow(1, 0, 1).sum().item()
            top5 += correct.narrow(1, 0, min(5, k)).sum().item()
            pk.append(predictions[:, :min(5, k, num_classes)].clone())
        results[k] = (100.0 * top1 / n_test, 100.0 * top5 / n_test)
        preds[k] = torch.cat(pk)
    return results, preds


def compare(pa, pb):
    """Number of test images whose top-min(5,k) prediction lists differ, per k."""
    return {k: int((pa[k] != pb[k]).any(dim=1).sum()) for k in pa}


def run_worker(args) -> dict:
    """One method in this (fresh) process, so that its peak RSS is not hidden by memory freed by another."""
    import faiss
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=g) * 0.25
    ks, method = args.ks, args.worker
    if method in ("big", "big_raw"):
        train, tl = make_features(args.big_bank, args.dim, args.classes, centers, g)
        if method == "big_raw":  # not unit-norm: knn_classify must normalise into the index (one copy)
            train.mul_(2.0)
        test, sl = make_features(args.big_queries, args.dim, args.classes, centers, g)
    else:
        train, tl = make_features(args.bank, args.dim, args.classes, centers, g)
        test, sl = make_features(args.queries, args.dim, args.classes, centers, g)
    rss0 = _status("VmRSS")
    if method == "dino":
        (r, p), t, m = measure(lambda: dino_style(train, tl, test, sl, ks, args.T, args.classes))
    else:
        backend = "torch" if method == "torch" else "faiss"
        (r, p), t, m = measure(lambda: knn_classify(train, tl, test, sl, ks=ks, T=args.T, backend=backend,
                                                   return_predictions=True))
    return {"results": r, "preds": p, "time": t, "peak": m, "rss0": rss0, "bank_bytes": train.numel() * 4,
            "threads": (torch.get_num_threads(), faiss.omp_get_max_threads())}


def spawn(args, method: str) -> dict:
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "r.pt")
        argv = [sys.executable, __file__, "--worker", method, "--out", out, "--bank", str(args.bank), "--queries",
                str(args.queries), "--dim", str(args.dim), "--classes", str(args.classes), "--T", str(args.T),
                "--big_bank", str(args.big_bank), "--big_queries", str(args.big_queries), "--threads",
                str(args.threads), "--ks", *map(str, args.ks)]
        subprocess.run(argv, check=True)
        return torch.load(out, weights_only=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    ap.add_argument("--T", type=float, default=0.07)
    ap.add_argument("--big_bank", type=int, default=1_281_167)
    ap.add_argument("--big_queries", type=int, default=1000, help="0 skips part 2")
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = library default)")
    ap.add_argument("--skip_dino", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        torch.save(run_worker(args), args.out)
        return

    import faiss
    ks = args.ks
    print(f"# k-NN benchmark  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, faiss {faiss.__version__}, CUDA: {torch.cuda.is_available()}; "
          f"each method runs in its own fresh process on the same seeded features")
    bank_mb = args.bank * args.dim * 4 / MB
    print(f"\n## Part 1: bank {args.bank} x {args.dim} fp32 ({bank_mb:.0f} MB, L2-normalised), {args.queries} queries, "
          f"k = {ks}, T = {args.T}, {args.classes} classes")
    methods = [("faiss (ours)", "faiss"), ("torch backend", "torch")]
    if not args.skip_dino:
        methods.append(("DINO-style, 100 chunks, one search per k", "dino"))
    runs = {}
    for name, m in methods:
        runs[m] = spawn(args, m)
        print(f"  ran {name}: {runs[m]['time']:.2f} s", flush=True)
    th = runs["faiss"]["threads"]
    print(f"threads: torch {th[0]}, faiss {th[1]}")
    ref = runs[methods[-1][1]]
    print(f"\n| method | time (s) | speed-up vs {methods[-1][0].split(',')[0]} | peak RSS growth (MB) | growth / bank | "
          + " | ".join(f"k={k} top-1 / top-5" for k in ks) + " |")
    print("|---|---:|---:|---:|---:|" + "---|" * len(ks))
    for name, m in methods:
        r = runs[m]
        accs = " | ".join(f"{r['results'][k][0]:.2f} / {r['results'][k][1]:.2f}" for k in ks)
        print(f"| {name} | {r['time']:.2f} | {ref['time'] / r['time']:.2f}x | {r['peak'] / MB:.0f} | "
              f"{r['peak'] / MB / bank_mb:.2f} | {accs} |")
    print("\ntest images whose top-min(5,k) prediction lists differ (out of %d):" % args.queries)
    print(f"  faiss vs torch: {compare(runs['faiss']['preds'], runs['torch']['preds'])}")
    if "dino" in runs:
        print(f"  faiss vs DINO-style: {compare(runs['faiss']['preds'], runs['dino']['preds'])}")
        same = runs["faiss"]["results"] == runs["torch"]["results"] == runs["dino"]["results"]
        print(f"  identical accuracies faiss / torch / DINO-style: {same}")
        print(f"  faiss speed-up over DINO-style: {runs['dino']['time'] / runs['faiss']['time']:.2f}x (goal >= 3x)")

    if args.big_queries > 0:
        print(f"\n## Part 2: bank {args.big_bank} x {args.dim} fp32, {args.big_queries} queries, k = {ks}, faiss path")
        print("| bank given as | bank (MB) | queries | time (s) | process RSS before (MB) | "
              "peak RSS growth in knn_classify (MB) | growth / bank |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        accs = []
        for m, label in [("big", "unit-norm fp32 (CLI, dumps): searched in place"),
                         ("big_raw", "not normalised (library call on raw features): normalised one block at a time")]:
            r = spawn(args, m)
            bank_b = r["bank_bytes"]
            print(f"| {label} | {bank_b / MB:.0f} | {args.big_queries} | {r['time']:.2f} | {r['rss0'] / MB:.0f} | "
                  f"{r['peak'] / MB:.0f} | {r['peak'] / bank_b:.3f} |", flush=True)
            accs.append(r["results"])
        print("accuracies: " + ", ".join(f"k={k}: {a:.2f} / {b:.2f}" for k, (a, b) in accs[0].items()))
        print(f"identical accuracies for the two bank forms: {accs[0] == accs[1]}")


if __name__ == "__main__":
    main()
