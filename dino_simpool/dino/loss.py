"""DINO loss: centred, sharpened teacher targets; cross-entropy over (teacher global crop, other student view) pairs.

Pure helpers (each unit-tested):
``teacher_probs`` (centre + sharpen), ``student_log_probs``, ``loss_pairs`` (which terms), ``dino_cross_entropy``,
``teacher_entropy`` (mean entropy, 0·log0 = 0), ``batch_center`` / ``center_update`` (EMA of the teacher mean).
``DINOLoss`` wires them together, holds the ``center`` buffer and all-reduces the batch centre across ranks.
Everything is computed in fp32, also under autocast.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dino_simpool import distributed as du
from dino_simpool.dino.schedules import teacher_temp_schedule

__all__ = [
    "DINOLoss", "DINOStats", "teacher_probs", "student_log_probs", "loss_pairs", "dino_cross_entropy",
    "teacher_entropy", "batch_center", "center_update",
]

N_GLOBAL = 2  # DINO: only the 2 global crops go through the teacher


class DINOStats(NamedTuple):
    """Logging statistics (detached, fp32 scalars): loss = CE, teacher entropy H, KL = CE - H."""

    loss: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


def teacher_probs(teacher_output: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centre and sharpen: ``softmax((t - center) / temp)`` over the last dim, in fp32, detached."""
    if not temp > 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp!r}")
    return F.softmax((teacher_output.detach().float() - center.float()) / temp, dim=-1)


def student_log_probs(student_output: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """``log_softmax(s / student_temp)`` over the last dim, in fp32."""
    if not student_temp > 0:
        raise ValueError(f"student temperature must be > 0, got {student_temp!r}")
    return F.log_softmax(student_output.float() / student_temp, dim=-1)


def loss_pairs(ncrops: int, n_global: int = N_GLOBAL) -> list[tuple[int, int]]:
    """The (teacher crop iq, student crop v) pairs of the loss: every iq < n_global with every v != iq."""
    return [(iq, v) for iq in range(n_global) for v in range(ncrops) if v != iq]


def dino_cross_entropy(
    student_output: torch.Tensor, teacher_p: torch.Tensor, ncrops: int, student_temp: float = 0.1
) -> torch.Tensor:
    """Mean over ``loss_pairs`` of the batch-mean ``-sum(q_iq * log p_v)``.

    ``student_output``: raw student logits, ``(ncrops * B, K)`` in crop order. ``teacher_p``: teacher
    probabilities, ``(n_global * B, K)`` (``n_global`` = 2 in DINO).
    """
    n_student = student_output.shape[0]
    if ncrops < 1 or n_student % ncrops:
        raise ValueError(f"student output has {n_student} rows, not a multiple of ncrops={ncrops}")
    batch = n_student // ncrops
    if teacher_p.shape[0] % batch or teacher_p.shape[-1] != student_output.shape[-1]:
        raise ValueError(
            f"teacher output {tuple(teacher_p.shape)} does not match student output {tuple(student_output.shape)} "
            f"(expected (n_global * {batch}, {student_output.shape[-1]}))"
        )
    n_global = teacher_p.shape[0] // batch
    pairs = loss_pairs(ncrops, n_global)
    if not pairs:
        raise ValueError(f"no loss terms with ncrops={ncrops} and {n_global} teacher crops")
    log_p = student_log_probs(student_output, student_temp).chunk(ncrops)
    q = teacher_p.float().chunk(n_global)
    total = student_output.new_zeros((), dtype=torch.float32)
    for iq, v in pairs:
        total = total + torch.sum(-q[iq] * log_p[v], dim=-1).mean()
    return total / len(pairs)


def teacher_entropy(teacher_p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(q log q)`` (0·log0 taken as 0, so no NaN for saturated targets)."""
    return -torch.special.xlogy(teacher_p.float(), teacher_p.float()).sum(dim=-1).mean()


def batch_center(teacher_output: torch.Tensor) -> torch.Tensor:
    """Mean teacher output over the global batch, ``(1, K)`` fp32; sums and counts are all-reduced across ranks."""
    t = teacher_output.detach().float()
    stats = torch.cat([t.sum(dim=0), t.new_full((1,), t.shape[0])])
    if du.is_dist():
        torch.distributed.all_reduce(stats)
    return (stats[:-1] / stats[-1]).unsqueeze(0)


def center_update(center: torch.Tensor, new_center: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA: ``center * momentum + new_center * (1 - momentum)`` (returns a new tensor)."""
    return center * momentum + new_center * (1.0 - momentum)


class DINOLoss(nn.Module):
    """DINO's loss with a teacher-temperature warm-up and an EMA centre (buffer ``center``, shape ``(1, out_dim)``).

    ``forward(student_output, teacher_output, epoch)`` returns the scalar loss and then updates the centre with the
    batch mean of ``teacher_output`` (all-reduced across ranks). Statistics for logging are in ``self.last_stats``
    (a :class:`DINOStats` of detached tensors; no device sync), or returned with ``return_stats=True``.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if ncrops < N_GLOBAL:
            raise ValueError(f"ncrops must be >= {N_GLOBAL} (2 global crops + local crops), got {ncrops}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = int(out_dim)
        self.ncrops = int(ncrops)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule: np.ndarray = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.last_stats: DINOStats | None = None

    def teacher_temp(self, epoch: int) -> float:
        """Teacher temperature at ``epoch`` (the last value after the schedule ends)."""
        return float(self.teacher_temp_schedule[min(max(int(epoch), 0), len(self.teacher_temp_schedule) - 1)])

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, DINOStats]:
        if teacher_output.shape[0] * self.ncrops != student_output.shape[0] * N_GLOBAL:
            raise ValueError(
                f"DINOLoss: teacher output has {teacher_output.shape[0]} rows and student output "
                f"{student_output.shape[0]}; expected {N_GLOBAL} * B teacher rows (global crops only) and "
                f"ncrops={self.ncrops} * B student rows"
            )
        device_type = student_output.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            q = teacher_probs(teacher_output, self.center, self.teacher_temp(epoch))
            loss = dino_cross_entropy(student_output, q, self.ncrops, self.student_temp)
            h = teacher_entropy(q)
            d = loss.detach()
            self.last_stats = DINOStats(loss=d, entropy=h, kl=d - h)
            self.update_center(teacher_output)
        return (loss, self.last_stats) if return_stats else loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA-update ``center`` with the (all-reduced) batch mean of the teacher outputs."""
        self.center.copy_(center_update(self.center, batch_center(teacher_output), self.center_momentum))
