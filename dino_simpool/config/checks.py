"""Checks of a whole configuration against its run: a resume under other flags, a rising lr schedule, slow precision.

Each returns human-readable lines for the trainer to print or to refuse with; none of them raises.
"""
from __future__ import annotations

from typing import Any, Mapping

from dino_simpool.config.fields import flag_fields, fmt, plain
from dino_simpool.config.training import TrainConfig
from dino_simpool.dino.schedules import scaled_lr


def result_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The flags that change a run's result (field metadata ``affects_result``) on which two configs differ, one
    line each (``--lr: 0.0005 in the stored run, 0.001 now``).

    Both are ``TrainConfig.to_dict()`` outputs, best after ``resolve`` (precision, workers). A flag missing from one
    side (a run written before the flag existed) counts as its default; keys that are no flags are ignored. Flags
    that do not change the result (num_workers, loader_nice, log_every, eval_every, output_dir, saveckp_freq,
    max_iters, dist_url, backend, local_rank, num_threads, config, preset, ...) may differ.
    """
    lines = []
    for f in flag_fields(TrainConfig):
        if not f.flag.affects_result:
            continue
        old, new = plain(stored.get(f.name, f.default)), plain(current.get(f.name, f.default))
        if old != new:
            lines.append(f"--{f.name}: {fmt(old) if old != '' else repr(old)} in the stored run, "
                         f"{fmt(new) if new != '' else repr(new)} now")
    return lines


def schedule_warnings(cfg: TrainConfig, world_size: int) -> list[str]:
    """A ``--min_lr`` above the scaled peak lr makes the cosine schedule rise after the warm-up instead of decaying."""
    batch = cfg.batch_size_per_gpu * world_size
    peak = scaled_lr(cfg.lr, batch)
    if cfg.min_lr > peak:
        return [f"--min_lr {cfg.min_lr:g} is larger than the peak lr {peak:g} (--lr {cfg.lr:g} x global batch {batch} "
                f"/ 256), so the lr rises after the warm-up instead of decaying; pass a --min_lr below {peak:g} "
                f"(DINO: 1e-6 with --lr 0.0005)"]
    return []


def device_warnings(cfg: TrainConfig, device_type: str) -> list[str]:
    """fp16/bf16 autocast on a CPU is several times slower than fp32 there."""
    if device_type == "cpu" and cfg.precision in ("fp16", "bf16"):
        return [f"--precision {cfg.precision} (or --use_fp16 True) on a CPU is several times slower than fp32 there; "
                f"leave --precision and --use_fp16 out for fp32 on CPU"]
    return []
