"""DINO's multi-crop recipe as data, and the stage-1 sampler of every random parameter it needs.

All randomness of the two-stage pipeline is drawn here, on the CPU, from torch's global generator, which
``SeededDataset`` seeds from ``(seed, epoch, index)`` for each sample. Stage 2 (``stage2.py``) only reads the
parameters, so a resumed run sees the same crops whatever device runs stage 2.

Per crop the sampler draws exactly what torchvision's transforms draw (distributions checked against torchvision's
own samplers in tests/test_augment_pipeline.py):

* the crop box: ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``, log aspect ratio uniform in
  ``log(3/4)..log(4/3)``, 10 tries then a centre crop);
* flip with p=0.5;
* colour jitter with p=0.8: brightness and contrast factors uniform in [0.6, 1.4], saturation in [0.8, 1.2], hue in
  [-0.1, 0.1], applied in a random order (a uniform permutation of the four ops, ``ColorJitter.get_params``);
* grayscale with p=0.2;
* Gaussian blur with the crop's probability (global 1: 1.0, global 2: 0.1, local: 0.5), sigma uniform in
  ``blur_sigma`` (pixels, as PIL's radius in DINO);
* solarize with the crop's probability (global 2: 0.2, others 0).

The parameters of a crop are one row of ``NPARAMS`` float32 numbers; the column indices are the ``P_*`` constants.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from dino_simpool.data.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - the recipe's normalisation

# Columns of a crop's parameter row. Factors are the identity (1, 1, 1, 0) when the jitter is not applied.
P_FLIP, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 2, 3, 4
P_ORDER = 5  # 5..8: the op (0 brightness, 1 contrast, 2 saturation, 3 hue) at each of the 4 slots
P_JITTER, P_GRAY, P_SIGMA, P_SOLARIZE = 9, 10, 11, 12
NPARAMS = 13
_TRIES = 10  # RandomResizedCrop's tries before the centre-crop fallback
_U_DECISIONS = 10  # uniforms per crop for the decisions and factors


def check_scale(name: str, scale) -> tuple[float, float]:
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {scale!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1 (fractions of the image area), got {scale!r}")
    return lo, hi


def check_size(name: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}")
    return int(size)


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma_max, capped to fit a crop of side ``crop_size``."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    cap = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(k, cap))


@dataclass(frozen=True)
class Recipe:
    """DINO's ``DataAugmentationDINO``: 2 global crops then ``local_crops_number`` local crops, with DINO's
    probabilities and ranges (the defaults; the ranges are fields so that tests can narrow them)."""

    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    global_size: int = 224
    local_size: int = 96
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, each local
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass: normalise in place)
        set_("global_crops_scale", check_scale("global_crops_scale", self.global_crops_scale))
        set_("local_crops_scale", check_scale("local_crops_scale", self.local_crops_scale))
        n = self.local_crops_number
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"local_crops_number must be an integer >= 0, got {n!r}")
        set_("local_crops_number", int(n))
        set_("global_size", check_size("global_size", self.global_size))
        set_("local_size", check_size("local_size", self.local_size))
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std must be 3 numbers each (std > 0), got mean={self.mean!r} "
                             f"std={self.std!r}")
        set_("mean", tuple(float(m) for m in self.mean))
        set_("std", tuple(float(s) for s in self.std))
        try:
            s_lo, s_hi = (float(s) for s in self.blur_sigma)
        except (TypeError, ValueError):
            raise ValueError(f"blur_sigma must be two numbers (min, max), got {self.blur_sigma!r}") from None
        if not 0 < s_lo <= s_hi:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma!r}")
        set_("blur_sigma", (s_lo, s_hi))

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def crop_size(self, k: int) -> int:
        return self.global_size if k < 2 else self.local_size

    def crop_scale(self, k: int) -> tuple[float, float]:
        return self.global_crops_scale if k < 2 else self.local_crops_scale

    def kernel_size(self, size: int) -> int:
        return blur_kernel_size(size, self.blur_sigma[1])

    def per_crop(self, probs: tuple[float, float, float]) -> list[float]:
        """(global 1, global 2, local) probabilities -> one per crop."""
        return [probs[0], probs[1]] + [probs[2]] * self.local_crops_number


def random_resized_crop_params(height: int, width: int, scale, log_ratio=(math.log(3 / 4), math.log(4 / 3)),
                               u: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop) -> (top, left, h, w).

    ``u``: optional (10, 4) uniforms in [0, 1) (one row per try), drawn at once by the caller for speed."""
    area = height * width
    if u is None:
        u = torch.rand(_TRIES, 4)
    for a, b, c, d in u.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * b)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return min(int(c * (height - h + 1)), height - h), min(int(d * (width - w + 1)), width - w), h, w
    ratio = (math.exp(log_ratio[0]), math.exp(log_ratio[1]))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(recipe: Recipe, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every random draw for one image of ``height`` x ``width`` pixels -> (boxes, params).

    ``boxes``: (ncrops, 4) int64 ``(top, left, h, w)``; ``params``: (ncrops, NPARAMS) float32. Three calls to torch's
    global generator per image (crop tries, decisions, op order)."""
    n = recipe.ncrops
    tries = torch.rand(n, _TRIES, 4)
    u = torch.rand(n, _U_DECISIONS).double()
    order = torch.argsort(torch.rand(n, 4), dim=1)  # a uniform random permutation of the 4 jitter ops per crop
    boxes = torch.tensor([random_resized_crop_params(height, width, recipe.crop_scale(k), u=tries[k])
                          for k in range(n)], dtype=torch.int64).view(n, 4)
    p = torch.zeros(n, NPARAMS, dtype=torch.float64)
    p[:, P_FLIP] = (u[:, 0] < recipe.flip_p).double()
    jit = u[:, 1] < recipe.jitter_p
    p[:, P_JITTER] = jit.double()
    b, c, s, h = recipe.jitter
    ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
    for col, ui, (lo, hi), ident in zip((P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE), (2, 3, 4, 5), ranges,
                                        (1.0, 1.0, 1.0, 0.0)):
        p[:, col] = torch.where(jit, lo + (hi - lo) * u[:, ui], ident)
    p[:, P_ORDER:P_ORDER + 4] = order.double()
    p[:, P_GRAY] = (u[:, 6] < recipe.gray_p).double()
    blur = u[:, 7] < torch.tensor(recipe.per_crop(recipe.blur_p), dtype=torch.float64)
    lo, hi = recipe.blur_sigma
    p[:, P_SIGMA] = torch.where(blur, lo + (hi - lo) * u[:, 8], 0.0)
    p[:, P_SOLARIZE] = (u[:, 9] < torch.tensor(recipe.per_crop(recipe.solarize_p), dtype=torch.float64)).double()
    return boxes, p.float()
