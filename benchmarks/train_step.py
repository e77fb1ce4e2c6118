"""Training-step throughput on CPU for the demo configuration, against the data pipeline and a matmul peak.

    .venv/bin/python benchmarks/train_step.py [--iters 8] [--write benchmarks/results/train_step.md]

Measured in one process, in this order:
  1. fp32 matmul peak (2048^3, best of 5): the ceiling a training step can be compared with;
  2. the training step alone (student fwd+bwd on 2 global + N local crops, teacher fwd on the global crops, DINO loss,
     AdamW step, EMA) on pre-made crops: images/s and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode);
  3. the data pipeline alone (embedded dataset -> multi-crop augmentation -> DataLoader with 2 workers): images/s;
  4. the real loop (the pipeline feeding the step), with the demo's own number of workers and with 2: images/s;
  5. peak RSS of this process and of its (worker) children.
The pipeline is not the bottleneck only when BOTH criteria hold: (3) is well above (2) (>= 1.5x: the loader alone
keeps up) and the real loop with the demo's workers (4) is close to (2) (>= 80%: nothing else, such as workers
competing with the step for the same cores, slows the step down). The verdict line names the criterion that fails.
"""
from __future__ import annotations

import argparse
import functools
import datetime
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_simpool.augment import PIPELINES, build_multicrop, default_pipeline  # noqa: E402
from dino_simpool.data import build_dataset  # noqa: E402
from eval.demo import demo_argv  # noqa: E402
from dino_simpool.config import parse_config  # noqa: E402
from dino_simpool.data.sampling import ResumableDistributedSampler, SeededDataset  # noqa: E402
from dino_simpool.dino.determinism import seed_all  # noqa: E402
from dino_simpool.dino.loss import DINOLoss  # noqa: E402
from dino_simpool.dino.optim import build_optimizer, param_groups  # noqa: E402
from dino_simpool.data.loader import make_loader  # noqa: E402
from dino_simpool.dino.build import build_student_teacher, place  # noqa: E402
from dino_simpool.dino.step import DINOStep, HostReadCounter, StepSettings  # noqa: E402
from dino_simpool.dino.trainer import Hooks  # noqa: E402
from dino_simpool.train import main as train_main  # noqa: E402

# Host reads per iteration of the real trainer before the step was rewritten, counted the same way (HostReadCounter,
# a new count at each seed_step call) on commit 7ccc5ad with the flags of host_reads_per_iteration (2026-12-01).
HOST_READS_BEFORE = 5


def host_reads_per_iteration(iters: int = 10) -> int:
    """The most host reads (item/tolist/cpu/...: device syncs on a GPU) in any iteration of the real trainer but the
    epoch's last (which ends the epoch), bf16 with clipping, logging off (--log_every above the run)."""
    out = Path("/tmp/dino_simpool_bench_reads")
    args = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
            "--synthetic_size", "32", "--synthetic_per_class", str(max(1, iters * 4 // 10)), "--batch_size_per_gpu",
            "4", "--num_workers", "1", "--global_crops_size", "32", "--local_crops_size", "16",
            "--local_crops_number", "2", "--out_dim", "64", "--epochs", "1", "--warmup_epochs", "0",
            "--warmup_teacher_temp_epochs", "0", "--eval_every", "0", "--clip_grad", "3.0", "--log_every", "100000",
            "--precision", "bf16", "--output_dir", str(out)]
    if out.exists():
        shutil.rmtree(out)
    with HostReadCounter() as counter:
        train_main(args, hooks=Hooks(before_step=counter.mark))
    return max(counter.per_iteration[:-1])


def compiled_step_time(cfg, crops: list[torch.Tensor], iters: int) -> float:
    """Median seconds of the trainer's step with ``--compile`` (place(compile=True)), after two warm-up steps that
    include the compilation; the same model, data and optimizer as the eager measurement."""
    seed_all(0)
    student, teacher = build_student_teacher(cfg)
    student, teacher, fwd, _ = place(student, teacher, torch.device("cpu"), compile=True)
    opt = build_optimizer("adamw", param_groups(student))
    for g in opt.param_groups:
        g["lr"] = 1e-4
    step = DINOStep(student, fwd, teacher, DINOLoss(cfg.out_dim, cfg.ncrops, 0.04, 0.04, 0, 10), opt,
                    StepSettings("fp32", cfg.clip_grad, cfg.clip_grad_mode, cfg.freeze_last_layer),
                    torch.device("cpu"))
    for _ in range(2):
        step(crops, cfg.freeze_last_layer, 0.996)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(crops, cfg.freeze_last_layer, 0.996)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


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


def bottleneck_verdict(pipe_ips: float, step_ips: float, loop_ips: float, wait_frac: float,
                       pipe_min: float = 1.5, loop_min: float = 0.8) -> str:
    """One line from two criteria: the pipeline alone >= ``pipe_min`` x the step alone (the loader can keep up), and
    the real loop >= ``loop_min`` x the step alone (end to end, with the loader workers sharing the CPU cores with the
    step). Only when both hold is the pipeline not the bottleneck. ``wait_frac`` (time in ``next(loader)``) is
    reported, not judged: with niced workers on a CPU-only machine the step waits while the workers take their turn
    on the cores, so waiting is how the cores are shared, not a sign of a slow pipeline."""
    c1 = pipe_ips >= pipe_min * step_ips
    c2 = loop_ips >= loop_min * step_ips
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    facts = (f"pipeline alone {pipe_ips:.0f} img/s = {pipe_ips / step_ips:.2f}x the step alone ({step_ips:.0f} "
             f"img/s; needs >= {pipe_min}x: {ok(c1)}); real loop {loop_ips:.0f} img/s = "
             f"{100 * loop_ips / step_ips:.0f}% of the step alone (needs >= {100 * loop_min:.0f}%: {ok(c2)}), "
             f"{100 * wait_frac:.1f}% of it in next(loader)")
    if c1 and c2:
        return f"the data pipeline is NOT the bottleneck: {facts}."
    if not c1:
        return f"the data pipeline IS the bottleneck (the loader alone is slower than the step needs): {facts}."
    return (f"the data pipeline IS the bottleneck end to end (the loader alone keeps up, but the loop runs well "
            f"below the step alone: loader workers and the step compete for the same CPU cores): {facts}.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=15, help="timed training steps")
    ap.add_argument("--pipeline_batches", type=int, default=30)
    ap.add_argument("--write", type=str, default=None, help="also write the markdown table to this file")
    a = ap.parse_args(argv)

    cfg = parse_config(demo_argv("/tmp/dino_simpool_bench"))
    cfg.resolve("cpu")
    demo_workers, demo_nice = cfg.num_workers, cfg.loader_nice
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

    dino_step = DINOStep(student, student, teacher, loss_fn, opt,
                         StepSettings("fp32", cfg.clip_grad, cfg.clip_grad_mode, cfg.freeze_last_layer),
                         torch.device("cpu"))

    def step(images):  # the trainer's step, after the last-layer freeze (epoch = freeze_last_layer)
        return dino_step(images, cfg.freeze_last_layer, 0.996)

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
    t_compiled = compiled_step_time(cfg, crops, a.iters)

    # ---- 3. the pipeline alone (2 workers); the default multi-crop pipeline on CPU unless the row names another
    cpu = torch.device("cpu")
    default = default_pipeline("cpu")

    def loader_with(workers: int, nice: int = 0, pipeline: str = default):
        aug = build_multicrop(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                              global_size=cfg.global_crops_size, local_size=cfg.local_crops_size, pipeline=pipeline,
                              device=cpu, backend=cfg.aug_backend)
        ds = build_dataset(None, "train", transform=aug.transform, image_size=cfg.synthetic_size,
                           images_per_class=cfg.synthetic_per_class)
        cfg.num_workers, cfg.loader_nice = workers, nice
        # to_step: the main process's part (stage 2 of the device pipelines; a copy for the cpu pipeline)
        return make_loader(SeededDataset(ds, 0), cfg.batch_size_per_gpu, cfg.num_workers, sampler=sampler,
                           drop_last=True, nice=cfg.loader_nice or 0, seed=cfg.seed, collate_fn=aug.collate_fn), \
            functools.partial(aug.to_device, device=cpu)

    n_images = len(build_dataset(None, "train", image_size=cfg.synthetic_size,
                                 images_per_class=cfg.synthetic_per_class))
    sampler = ResumableDistributedSampler(n_images, batch_size=B, seed=0)
    loader, to_step = loader_with(2)
    it = iter(loader)
    next(it)  # worker start-up excluded
    t = time.perf_counter()
    n = 0
    for _ in range(a.pipeline_batches):
        to_step(next(it)[0])
        n += B
    pipe_ips = n / (time.perf_counter() - t)
    del it

    # ---- 4. the real loop: pipeline feeding the step (the demo's workers, then 2)
    def real_loop(loader_and_to_step, epoch: int) -> tuple[float, float]:
        """(images/s, fraction of the loop's time spent waiting in ``next(loader)``: the step starved of data)."""
        loader, to_step = loader_and_to_step
        sampler.set_epoch(epoch)
        it = iter(loader)
        step(to_step(next(it)[0]))  # worker start-up excluded
        t = time.perf_counter()
        n, wait = 0, 0.0
        for _ in range(min(a.iters, len(sampler) // B - 1)):
            t_wait = time.perf_counter()
            images, _ = next(it)
            wait += time.perf_counter() - t_wait
            step(to_step(images))  # the device pipelines' stage 2 counts as the main process's work
            n += B
        total = time.perf_counter() - t
        return n / total, wait / total

    del loader, to_step
    # the demo's loader (its workers, niced) and two references without nice: 1 worker, the earlier default, and 2
    loops = {}
    for epoch, (workers, nice) in enumerate([(demo_workers, demo_nice), (1, 0), (2, 0)], start=1):
        if (workers, nice) not in loops:
            loops[workers, nice] = real_loop(loader_with(workers, nice), epoch)
    loop_ips, wait = loops[demo_workers, demo_nice]
    # each multi-crop pipeline in the real loop with the demo's loader (device pipelines: stage 2 in the main process)
    by_pipeline = {pl: real_loop(loader_with(demo_workers, demo_nice, pl), 4 + k) for k, pl in enumerate(PIPELINES)}

    reads = host_reads_per_iteration()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    nparams = sum(p.numel() for p in student.parameters())
    load = os.getloadavg()

    desc = (f"tiny SimPool ViT (depth {cfg.depth}, dim {cfg.embed_dim}, patch {cfg.patch_size}; student "
            f"{nparams / 1e6:.2f} M params incl. head out_dim {cfg.out_dim}), batch {B}, 2x{cfg.global_crops_size} px "
            f"+ {cfg.local_crops_number}x{cfg.local_crops_size} px crops of {cfg.synthetic_size} px images, "
            f"{cfg.aug_backend} augmentation ({default} pipeline unless a row names another; device pipelines run "
            f"stage 2 in the main process), fp32, AdamW, {demo_workers} loader worker(s) at nice {demo_nice} "
            f"(= the demo config, `DEMO_FLAGS`)")
    rows = [
        ("fp32 matmul peak (2048^3)", f"{peak:.1f} GFLOP/s", "reference"),
        ("training step alone (pre-made crops)", f"{step_ips:.1f} img/s", f"{t_step * 1000:.0f} ms/step"),
        ("training step alone, --compile (inductor)", f"{B / t_compiled:.1f} img/s",
         f"{t_compiled * 1000:.0f} ms/step = {t_step / t_compiled:.2f}x eager (compilation excluded)"),
        ("  FLOPs per step (student fwd+bwd, teacher fwd)", f"{flops / 1e9:.1f} GFLOP", ""),
        ("  achieved", f"{gflops:.1f} GFLOP/s", f"{100 * gflops / peak:.0f}% of the matmul peak"),
        ("data pipeline alone (2 workers)", f"{pipe_ips:.1f} img/s",
         f"{pipe_ips / step_ips:.1f}x the step's rate"),
        *[(f"real loop ({w} worker(s), nice {n}{' = the demo' if (w, n) == (demo_workers, demo_nice) else ''})",
            f"{ips:.1f} img/s", f"{100 * ips / step_ips:.0f}% of the step alone; {100 * wt:.1f}% of it waiting for "
            f"data") for (w, n), (ips, wt) in loops.items()],
        *[(f"real loop, `--aug_pipeline {pl}`{' (the default on CPU)' if pl == default else ''}", f"{ips:.1f} img/s",
           f"{100 * ips / step_ips:.0f}% of the step alone; {100 * wt:.1f}% of it waiting for data")
          for pl, (ips, wt) in by_pipeline.items()],
        ("host reads per iteration (real trainer, bf16, clipping)", f"{reads}",
         f"each one a device sync on a GPU; {HOST_READS_BEFORE} before the step was rewritten (7ccc5ad)"),
        ("peak RSS, main process", f"{rss_self:.0f} MiB", ""),
        ("peak RSS, largest worker", f"{rss_children:.0f} MiB", ""),
    ]
    verdict = bottleneck_verdict(pipe_ips, step_ips, loop_ips, wait)
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
        f"Verdict: {verdict}",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
