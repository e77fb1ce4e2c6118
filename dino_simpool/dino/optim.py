"""Optimisation pieces of DINO: parameter groups, LARS, optimizer factory, gradient clipping, last-layer freezing,
the teacher EMA and the per-iteration schedule application.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dino_simpool.checkpoint import strip_module_prefix

__all__ = [
    "param_groups", "is_regularized", "LARS", "OPTIMIZERS", "build_optimizer", "clip_gradients",
    "clip_gradients_", "cancel_gradients_last_layer", "ema_update", "apply_schedules",
]

OPTIMIZERS = ("adamw", "sgd", "lars")


def is_regularized(name: str, p: torch.Tensor) -> bool:
    """DINO's rule: biases and every tensor with ndim <= 1 (norms, SimPool's beta) get no weight decay."""
    return not (name.endswith(".bias") or name == "bias" or p.ndim <= 1)


def param_groups(model: nn.Module) -> list[dict]:
    """``[{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]``; frozen params are skipped.

    Group 0 is the one that receives the weight-decay schedule (see :func:`apply_schedules`).
    """
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (reg if is_regularized(name, p) else not_reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


def _exclude_ndim_le1(p: torch.Tensor) -> bool:
    return p.ndim <= 1


class LARS(torch.optim.Optimizer):
    """LARS as in Barlow Twins / DINO (momentum SGD with a layer-wise trust ratio).

    For a parameter not excluded by the filters: ``d = g + wd * w``; ``d *= eta * ||w|| / ||d||`` (1 when either
    norm is 0); ``mu = momentum * mu + d``; ``w -= lr * mu``. A filter is a callable ``p -> bool`` returning True for
    parameters to *exclude* from weight decay / trust ratio; ``None`` (default) excludes every tensor with
    ``ndim <= 1`` (biases, norms, SimPool's beta), which then get plain momentum SGD -- DINO's behaviour.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter: Callable[[torch.Tensor], bool] | None = None,
        lars_adaptation_filter: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta < 0:
            raise ValueError(f"LARS: lr, weight_decay, momentum and eta must be >= 0 "
                             f"(got {lr}, {weight_decay}, {momentum}, {eta})")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
        super().__init__(params, defaults)
        # Kept off the param groups so that ``state_dict()`` stays plain data (loads with weights_only=True).
        self.weight_decay_filter = weight_decay_filter or _exclude_ndim_le1
        self.lars_adaptation_filter = lars_adaptation_filter or _exclude_ndim_le1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if g["weight_decay"] != 0 and not self.weight_decay_filter(p):
                    dp = dp.add(p, alpha=g["weight_decay"])
                if not self.lars_adaptation_filter(p):
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(dp)
                    one = torch.ones_like(w_norm)
                    q = torch.where(w_norm > 0, torch.where(d_norm > 0, g["eta"] * w_norm / d_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """``adamw`` (torch AdamW), ``sgd`` (momentum 0.9) or ``lars``; lr/wd start at 0 and come from the schedules.

    Extra keyword arguments go to the optimizer's constructor.
    """
    key = str(name).lower()
    if key == "adamw":
        return torch.optim.AdamW(groups, **{"lr": 0.0, **kwargs})
    if key == "sgd":
        return torch.optim.SGD(groups, **{"lr": 0.0, "momentum": 0.9, **kwargs})
    if key == "lars":
        return LARS(groups, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)} (--optimizer)")


def clip_gradients(model: nn.Module, clip: float, mode: str = "per_tensor") -> list[float]:
    """``clip_gradients_`` plus the norms as Python floats (one host sync: for logging and tests)."""
    norms = clip_gradients_(model, clip, mode)
    return norms.tolist() if norms is not None else []


def clip_gradients_(model: nn.Module, clip: float, mode: str = "per_tensor") -> torch.Tensor | None:
    """Clip gradients in place and return the gradient norms measured *before* clipping, as a tensor on the
    gradients' device (no host sync); None when no parameter has a gradient.

    ``per_tensor`` (DINO): each parameter's gradient is scaled by ``min(1, clip / (||g|| + 1e-6))``; one norm per
    parameter with a gradient. ``global``: ``torch.nn.utils.clip_grad_norm_`` over all of them; ``[total_norm]``.
    ``clip <= 0`` measures only.
    """
    if mode not in ("per_tensor", "global"):
        raise ValueError(f"clip mode must be 'per_tensor' or 'global', got {mode!r}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    if mode == "global":
        if clip > 0:
            total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        else:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        return total.reshape(1)
    device = grads[0].device
    if all(g.device == device for g in grads):
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        if clip > 0:
            coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads)])
        return norms
    out = []
    for g in grads:  # parameters on several devices: plain loop
        n = torch.linalg.vector_norm(g.float())
        if clip > 0:
            g.mul_((clip / (n + 1e-6)).clamp(max=1.0).to(g.dtype))
        out.append(n.cpu())
    return torch.stack(out)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """While ``epoch < freeze_last_layer``, drop the gradients of every parameter whose name contains ``last_layer``."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def _named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {strip_module_prefix(n): p for n, p in model.named_parameters()}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for parameters only (buffers are untouched).

    Parameters are matched by name after stripping ``module.``, so either model may be DDP-wrapped.
    """
    t_params, s_params = _named_params(teacher), _named_params(student)
    if t_params.keys() != s_params.keys():
        missing = sorted(set(s_params) - set(t_params))[:5]
        extra = sorted(set(t_params) - set(s_params))[:5]
        raise ValueError(f"ema_update: teacher and student parameters differ (only in student: {missing}, "
                         f"only in teacher: {extra}); build the teacher with the same config as the student")
    names = list(t_params)
    t = [t_params[n].data for n in names]
    s = [s_params[n].detach() for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float | None = None) -> None:
    """Set ``lr`` on every param group and ``wd`` on group 0 (the regularised one), as DINO does each iteration."""
    for i, g in enumerate(optimizer.param_groups):
        g["lr"] = lr
        if i == 0 and wd is not None:
            g["weight_decay"] = wd
