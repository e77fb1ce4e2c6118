"""DINO's per-iteration schedules (learning rate, weight decay, teacher momentum) and the teacher temperature.

All functions are pure and return NumPy arrays indexed by global iteration (or epoch for the temperature), exactly
as DINO's ``utils.cosine_scheduler`` and ``DINOLoss.teacher_temp_schedule``.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_scheduler", "teacher_temp_schedule", "scaled_lr"]


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value``, then cosine decay to ``final_value``.

    Returns an array of length ``epochs * niter_per_ep``. The warm-up covers ``int(warmup_epochs * niter_per_ep)``
    iterations (``np.linspace`` including both ends, as in DINO); the cosine part starts at ``base_value`` and its
    last value is ``final_value + (base - final) * (1 + cos(pi * (n - 1) / n)) / 2`` (it approaches, but does not
    reach, ``final_value``, as in DINO).
    """
    epochs = _check_int("epochs", epochs, 1)
    niter_per_ep = _check_int("niter_per_ep", niter_per_ep, 1)
    if warmup_epochs < 0 or not math.isfinite(warmup_epochs):
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    if warmup_epochs > epochs:
        raise ValueError(
            f"warm-up ({warmup_epochs} epochs) is longer than training ({epochs} epochs): "
            f"lower --warmup_epochs or raise --epochs"
        )
    total = epochs * niter_per_ep
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.zeros(0)
    n = total - warmup_iters
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(n, 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == total
    return schedule


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)``, then constant.

    Length ``nepochs``. ``warmup_epochs == 0`` gives ``teacher_temp`` throughout.
    """
    nepochs = _check_int("nepochs", nepochs, 1)
    warmup_epochs = _check_int("warmup_teacher_temp_epochs", warmup_epochs, 0)
    if warmup_epochs > nepochs:
        raise ValueError(
            f"teacher temperature warm-up ({warmup_epochs} epochs) is longer than training ({nepochs} epochs): "
            f"lower --warmup_teacher_temp_epochs or raise --epochs"
        )
    for name, t in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp)):
        if not t > 0:
            raise ValueError(f"{name} must be > 0, got {t!r}")
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.full(nepochs - warmup_epochs, float(teacher_temp)),
        )
    )


def scaled_lr(lr: float, batch_size_global: int) -> float:
    """DINO's linear scaling rule: ``lr * batch_size_global / 256``."""
    if batch_size_global < 1:
        raise ValueError(f"batch_size_global must be >= 1, got {batch_size_global!r}")
    return lr * batch_size_global / 256.0
