"""What the loop reports: per-step statistics summed on the device, the epoch's record and its log lines."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dino_simpool import distributed as D
from dino_simpool.logs import Logger, Progress, format_seconds


class EpochSums:
    """Sums of ``[loss, teacher entropy, kl]`` over the epoch's steps, kept on the device (no host read per step)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0
        self.last: torch.Tensor | None = None

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats[:3].double()
        self.count += 1
        self.last = stats

    def log_step(self, log: Logger, progress: Progress, sched, it: int, every: int) -> None:
        """Progress line and TensorBoard scalars of global iteration ``it``: the one extra host read, every
        ``--log_every`` steps."""
        loss, entropy, kl = self.last[:3].tolist()
        progress.update(1, loss=loss, lr=float(sched.lr[it]))
        if (it + 1) % every == 0:
            log.scalars("train", {"loss": loss, "teacher_entropy": entropy, "kl": kl, "lr": sched.lr[it],
                                  "wd": sched.wd[it], "momentum": sched.momentum[it]}, it + 1)

    def record(self, epoch: int, iteration: int, sched, loss_fn, elapsed: float, global_batch: int) -> dict[str, Any]:
        """The epoch's means over every rank's steps (one all-reduce), with the schedules' last values."""
        totals = torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64,
                                                    device=self.sums.device)])
        D.all_reduce_mean(totals)
        loss, entropy, kl, count = totals.tolist()
        n = max(count, 1.0)
        last = max(iteration - 1, 0)
        return {
            "epoch": epoch, "iteration": iteration, "loss": loss / n, "teacher_entropy": entropy / n, "kl": kl / n,
            "lr": float(sched.lr[last]), "wd": float(sched.wd[last]), "momentum": float(sched.momentum[last]),
            "teacher_temp": loss_fn.teacher_temp(epoch), "epoch_time_s": round(elapsed, 3),
            "images_per_s": round(count * global_batch / max(elapsed, 1e-9), 2),
        }


def log_epoch(log: Logger, record: dict[str, Any], epochs: int, total_s: float) -> None:
    """log.txt, TensorBoard and the one summary line of an epoch."""
    epoch = record["epoch"]
    log.event(record)
    log.scalars("epoch", {k: v for k, v in record.items() if k != "epoch"}, epoch)
    knn = record.get("k-NN") or {}
    for k, v in knn.items():
        log.scalars("knn", {f"top1_k{k}": v["top1"], f"top5_k{k}": v["top5"]}, epoch)
    knn_txt = ""
    if knn:
        k20 = "20" if "20" in knn else next(iter(knn))
        knn_txt = f" | k-NN@{k20} top1 {knn[k20]['top1']:.2f}"
    log.info(f"epoch {epoch}/{epochs} done: loss {record['loss']:.4f} lr {record['lr']:.3g} "
             f"H(teacher) {record['teacher_entropy']:.3f} | {record['images_per_s']:.1f} img/s, "
             f"{format_seconds(record['epoch_time_s'])}{knn_txt} | total {format_seconds(total_s)}")
    log.tb.flush()


def nonfinite_message(stats: torch.Tensor, rank: int, epoch: int, i: int, niter: int, it: int, sched, cfg,
                      ckpt_path: Path) -> str:
    return (f"stopping: non-finite loss ({float(stats[0]):.4g} on rank {rank}; some rank saw a non-finite value) at "
            f"epoch {epoch}, iteration {i}/{niter} of the epoch, global step {it} (lr {sched.lr[it]:.3g}, precision "
            f"{cfg.precision}). Nothing was saved: {ckpt_path if ckpt_path.exists() else 'no checkpoint yet'} is "
            f"the last good state. Usual fixes: --precision bf16 instead of fp16 (--use_fp16 False), --clip_grad "
            f"0.3-3.0, a lower --lr (now {cfg.lr:g}), or more --warmup_epochs.")
