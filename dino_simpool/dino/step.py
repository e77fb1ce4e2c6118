"""One DINO training iteration (forward, loss, backward, clip, step, EMA) that never waits for the device.

``DINOStep.__call__`` enqueues the whole iteration and returns a small device tensor ``[loss, entropy, kl,
non-finite]``; nothing in it reads a value back to the host, so on a GPU the CPU enqueues forward, backward, the
optimizer and the EMA without waiting. The loop then makes the iteration's one host read: the non-finite and stop
flags, agreed over ranks, after ``optimizer.step()`` (a NaN step is never saved: the run stops with exit 3 and the
last checkpoint on disk is the last good state). Logging statistics are summed on the device and read only every
``--log_every`` steps; the clip norms stay on the device.

The one exception is fp16: ``GradScaler.step`` reads its inf check back (torch's design); bf16 and fp32 need no
scaler.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dino_simpool.dino.loss import DINOLoss
from dino_simpool.dino.optim import cancel_gradients_last_layer, clip_gradients_, ema_update

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepSettings:
    precision: str = "fp32"  # fp32 | bf16 | fp16
    clip_grad: float = 0.0
    clip_grad_mode: str = "per_tensor"
    freeze_last_layer: int = 1


class DINOStep:
    """Student/teacher/loss/optimizer bundled into one call per iteration.

    ``student_ddp`` is the (possibly DDP-wrapped) student used for the forward; ``student`` the plain module whose
    parameters are clipped and copied into the teacher. ``sync_teacher_buffers``: broadcast the teacher's BatchNorm
    buffers from rank 0 after the EMA (one flat call), as DINO's DDP-wrapped teacher did; off under SyncBN, where the
    ranks already agree, and for models without buffers.
    """

    def __init__(self, student: nn.Module, student_ddp: nn.Module, teacher: nn.Module, loss: DINOLoss,
                 optimizer: torch.optim.Optimizer, settings: StepSettings, device: torch.device,
                 sync_teacher_buffers: bool = False):
        self.student, self.student_ddp, self.teacher = student, student_ddp, teacher
        self.loss, self.optimizer, self.settings, self.device = loss, optimizer, settings, device
        amp = AMP_DTYPES.get(settings.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
        self.teacher_buffers = [b for b in teacher.buffers() if b.is_floating_point() or b.dtype == torch.long] \
            if sync_teacher_buffers else []

    def train_mode(self) -> None:
        self.student_ddp.train()
        self.teacher.train()  # as DINO: the teacher's BN layers use batch statistics

    def __call__(self, images: list[torch.Tensor], epoch: int, momentum: float,
                 poison_loss: bool = False) -> torch.Tensor:
        """One iteration; returns ``[loss, teacher entropy, kl, non-finite (0/1)]`` on the device, unread.

        ``poison_loss`` makes this iteration's loss NaN (a fault injected by tests through the trainer's hooks)."""
        s = self.settings
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(images[:2])
            student_out = self.student_ddp(images)
            loss = self.loss(student_out, teacher_out, epoch)
        if poison_loss:
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if s.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                clip_gradients_(self.student, s.clip_grad, s.clip_grad_mode)
            cancel_gradients_last_layer(epoch, self.student, s.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if s.clip_grad > 0:
                clip_gradients_(self.student, s.clip_grad, s.clip_grad_mode)
            cancel_gradients_last_layer(epoch, self.student, s.freeze_last_layer)
            self.optimizer.step()
        ema_update(self.teacher, self.student, momentum)
        self._broadcast_teacher_buffers()
        st = self.loss.last_stats
        detached = loss.detach().float()
        return torch.stack([detached, st.entropy.float(), st.kl.float(), (~torch.isfinite(detached)).float()])

    def _broadcast_teacher_buffers(self) -> None:
        if not self.teacher_buffers:
            return
        # one flat call per dtype (float stats, long counter), in the buffers' order: the same on every rank (a set's
        # order is not: dtypes hash by id, and two ranks then broadcast different tensors into each other)
        for dtype in dict.fromkeys(b.dtype for b in self.teacher_buffers):
            group = [b for b in self.teacher_buffers if b.dtype == dtype]
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, 0)
            for b, v in zip(group, _unflatten_dense_tensors(flat, group)):
                b.copy_(v)


def agree(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (in place, asynchronous on NCCL); the tensor itself on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class HostReadCounter:
    """Counts the calls that read a tensor's value back to the host (``item``, ``tolist``, ``cpu``, ``numpy``,
    ``bool``/``float``/``int`` of a tensor), per training iteration. On a GPU each of them is a device sync; on CPU
    they are free, so this is how the sync budget of the step is checked without a GPU (tests, benchmarks).

    ``with HostReadCounter() as c:`` patches ``torch.Tensor`` for the block; ``c.mark()`` starts a new iteration's
    count (the trainer's ``before_step`` hook calls it); ``c.per_iteration`` is the list of counts."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.per_iteration: list[int] = []
        self._saved: dict[str, object] = {}

    def mark(self, *_args) -> None:
        self.per_iteration.append(0)

    def __enter__(self) -> "HostReadCounter":
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _orig=original, **k):
                # torch.optim reads its step counters, which live on the host even on a GPU run: not a device sync
                if self.per_iteration and "/torch/optim/" not in sys._getframe(1).f_code.co_filename:
                    self.per_iteration[-1] += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
