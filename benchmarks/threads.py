"""Seconds per training iteration of the demo configuration, by torch threads and loader niceness, on this machine.

    .venv/bin/python benchmarks/threads.py [--iters 12] [--warmup 3] [--repeats 3] [--threads 1 2] [--nice 0 19]

Each (threads, loader_nice) pair runs the real training command (``dino_simpool.train`` with the demo's flags,
``eval.demo.DEMO_FLAGS``: 2 loader workers, batch 32) in a fresh subprocess for ``--warmup + --iters`` iterations
(``--max_iters``), with ``--num_threads T --loader_nice N``. An iteration's time is the wall time between two
consecutive iteration starts (the trainer's ``before_step`` hook): the step plus any wait for data. The first
``--warmup`` iterations (workers starting, first batches) are dropped. The pairs run interleaved, round after round
(``--repeats``), so a change in the machine's load reaches every pair alike; the ratio column divides each pair's
median by the median of the reference pair (the CPU defaults: torch's own thread count, loader_nice 19) over the same
rounds. The load average (1 min) is read before every run; the table gives its range.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(args: argparse.Namespace) -> int:
    """One run in this process: print the per-iteration seconds as one JSON line."""
    from dino_simpool.dino.trainer import Hooks
    from dino_simpool.train import main as train_main
    from eval.demo import demo_argv

    starts: list[float] = []
    out = tempfile.mkdtemp(prefix="dino_simpool_threads_")
    try:
        argv = demo_argv(out, max_iters=args.total_iters, loader_nice=args.nice, log_every=10**6)
        if args.threads:
            argv += ["--num_threads", str(args.threads)]
        rc = train_main(argv, hooks=Hooks(before_step=lambda it: starts.append(time.perf_counter())))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    import torch

    times = [b - a for a, b in zip(starts, starts[1:])]
    print("RESULT " + json.dumps({"rc": rc, "times": times, "torch_threads": torch.get_num_threads()}), flush=True)
    return 0


def _run_one(threads: int | None, nice: int, total_iters: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--nice", str(nice), "--total_iters",
           str(total_iters)] + (["--threads_one", str(threads)] if threads else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"run threads={threads} nice={nice} failed (exit {r.returncode}): {r.stderr[-1500:]}")
    return json.loads(line[len("RESULT "):])


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
    ap.add_argument("--iters", type=int, default=12, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=3, help="iterations dropped at the start of each run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every pair runs once per round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (--num_threads)")
    ap.add_argument("--nice", type=int, nargs="+", default=[0, 19], help="loader niceness values (--loader_nice)")
    ap.add_argument("--write", default=None, help="also write the table (markdown) to this file")
    # worker mode (one run, in a subprocess)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads_one", dest="threads_w", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--total_iters", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.threads = a.threads_w
        a.nice = a.nice[0]
        return _worker(a)

    import torch

    default_threads = torch.get_num_threads()
    pairs = [(t, n) for t in a.threads for n in a.nice]
    ref = (default_threads, 19) if (default_threads, 19) in pairs else pairs[0]
    times: dict[tuple[int, int], list[float]] = {p: [] for p in pairs}
    ratios: dict[tuple[int, int], list[float]] = {p: [] for p in pairs}
    loads: list[float] = []
    t0 = time.time()
    start = datetime.datetime.now(datetime.timezone.utc)
    for rnd in range(a.repeats):
        order = pairs if rnd % 2 == 0 else pairs[::-1]  # alternate the order: no pair always runs first
        medians = {}
        for t, n in order:
            loads.append(os.getloadavg()[0])
            res = _run_one(t, n, a.warmup + a.iters + 1)
            got = res["times"][a.warmup:]
            if res["torch_threads"] != t:
                raise RuntimeError(f"asked for {t} threads, the run used {res['torch_threads']}")
            times[(t, n)].extend(got)
            medians[(t, n)] = statistics.median(got)
            print(f"round {rnd + 1}/{a.repeats}: threads {t}, loader_nice {n}: median {medians[(t, n)]:.3f} s/it "
                  f"over {len(got)} iterations (load average {loads[-1]:.1f})", flush=True)
        for p in pairs:
            ratios[p].append(medians[p] / medians[ref])
    loads.append(os.getloadavg()[0])

    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.system()} {platform.release()}, torch {torch.__version__} (default {default_threads} threads); "
        f"{start:%Y-%m-%d %H:%M} UTC, {(time.time() - t0) / 60:.1f} min; load average (1 min) "
        f"{min(loads):.1f}-{max(loads):.1f} over the runs.",
        "",
        f"Demo config (`eval.demo.DEMO_FLAGS`: tiny SimPool ViT, batch 32, 2 loader workers), real training command in "
        f"a fresh process per run; {a.iters} timed iterations per run after {a.warmup} dropped, {a.repeats} "
        f"interleaved rounds. Ratio = the pair's median s/it over the reference's median in the same round "
        f"(reference: threads {ref[0]}, loader_nice {ref[1]}), median over rounds (min-max).",
        "",
        "| --num_threads | --loader_nice | median s/it | p10-p90 s/it | x reference (min-max) |",
        "|---|---|---|---|---|",
    ]
    for p in pairs:
        ts = sorted(times[p])
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        r = ratios[p]
        mark = " (reference)" if p == ref else ""
        lines.append(f"| {p[0]}{' (torch default)' if p[0] == default_threads else ''} | {p[1]}{mark} | "
                     f"{statistics.median(ts):.3f} | {q[0]:.3f}-{q[-1]:.3f} | {statistics.median(r):.2f} "
                     f"({min(r):.2f}-{max(r):.2f}) |")
    lines.append("")
    lines.append(f"Command: `.venv/bin/python benchmarks/threads.py --iters {a.iters} --warmup {a.warmup} "
                 f"--repeats {a.repeats} --threads {' '.join(map(str, a.threads))} --nice "
                 f"{' '.join(map(str, a.nice))}`")
    text = "\n".join(lines)
    print()
    print(text)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
