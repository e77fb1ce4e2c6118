"""One supervised iteration (mixup, forward, loss, backward, clip, step, EMA) that never waits for the device.

``SupervisedStep.__call__`` returns a small device tensor ``[loss, non-finite]``; the loop makes the iteration's one
host read (the non-finite and stop flags, agreed over ranks) after ``optimizer.step()``, as the DINO step does: a
NaN step is never saved, the run stops with exit 3 and the last checkpoint on disk is the last good state.
fp16 is the exception, as in DINO: ``GradScaler.step`` reads its inf check back.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepSettings:
    precision: str = "fp32"  # fp32 | bf16 | fp16
    clip_grad: float | None = None
    clip_mode: str = "norm"  # timm's dispatch_clip_grad: norm | value | agc


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: autocast in bf16/fp16, nothing in fp32."""
    amp = AMP_DTYPES.get(precision)
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext


class SupervisedStep:
    """Model, loss, optimizer, mixup and EMA bundled into one call per iteration.

    ``model_ddp``: the (possibly DDP-wrapped) model used for the forward; ``model``: the plain module whose
    parameters are clipped and averaged into ``ema``.
    """

    def __init__(self, model: nn.Module, model_ddp: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                 settings: StepSettings, device: torch.device, mixup: Mixup | None = None,
                 ema: ModelEmaV3 | None = None):
        self.model, self.model_ddp, self.loss, self.optimizer = model, model_ddp, loss, optimizer
        self.settings, self.device, self.mixup, self.ema = settings, device, mixup, ema
        self.autocast = autocast_for(settings.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None

    def prepare(self, images, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmentation splits (a list of N batches) -> one batch of N x B, split-major, labels repeated (as timm's
        collate); then mixup/cutmix (timm's ``Mixup``: soft, smoothed targets), or the batch as it is."""
        if isinstance(images, (list, tuple)):
            images, targets = torch.cat(list(images)), targets.repeat(len(images))
        if self.mixup is not None:
            return self.mixup(images, targets)
        return images, targets

    def __call__(self, images, targets: torch.Tensor, num_updates: int,
                 poison_loss: bool = False) -> torch.Tensor:
        """One iteration; ``num_updates`` is the count after this one (the EMA's step). Returns ``[loss,
        non-finite (0/1)]`` on the device, unread. ``poison_loss``: a NaN loss (a fault injected by tests)."""
        s = self.settings
        images, targets = self.prepare(images, targets)
        with self.autocast():
            logits = self.model_ddp(images)
            loss = self.loss(logits.float(), targets)
        if poison_loss:
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if s.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(params, value=s.clip_grad, mode=s.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if s.clip_grad is not None:
                dispatch_clip_grad(params, value=s.clip_grad, mode=s.clip_mode)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=num_updates)
        detached = loss.detach().float()
        return torch.stack([detached, (~torch.isfinite(detached)).float()])
