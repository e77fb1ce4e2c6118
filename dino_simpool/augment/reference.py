"""The recipe composed of stock torchvision.transforms.v2 transforms (``backend="v2"``): the readable reference.

Randomness comes from torch's global generator inside each transform, as in torchvision. Gaussian blur:
``v2.GaussianBlur`` with the recipe's sigma range (pixels, as PIL's radius in DINO) and a kernel covering +-3 sigma_max
(``blur_kernel_size``); solarization at threshold 128 (PIL's ``ImageOps.solarize``).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from .recipe import Recipe
from .stage1 import to_uint8_chw


class _Solarize(torch.nn.Module):
    """PIL ImageOps.solarize semantics on uint8 (threshold 128) or float (threshold 0.5) tensors, with p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, img):
        if torch.rand(()) >= self.p:
            return img
        thr = 128 if img.dtype == torch.uint8 else 0.5
        return v2.functional.solarize(img, thr)


class V2MultiCrop:
    """``__call__(img) -> list[Tensor]``: the recipe's crops, float32, normalised, one stock v2 pipeline per crop."""

    def __init__(self, recipe: Recipe):
        self.recipe = r = recipe

        def flip_and_color_jitter():
            return [
                v2.RandomHorizontalFlip(p=r.flip_p),
                v2.RandomApply([v2.ColorJitter(*r.jitter)], p=r.jitter_p),
                v2.RandomGrayscale(p=r.gray_p),
            ]

        def blur_solarize(blur_p, solarize_p, size):
            ops = [v2.RandomApply([v2.GaussianBlur(kernel_size=r.kernel_size(size), sigma=r.blur_sigma)], p=blur_p)]
            return ops + ([_Solarize(solarize_p)] if solarize_p > 0 else [])

        def crop(size, scale):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                        antialias=True)

        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(r.mean), std=list(r.std)),
                     v2.ToPureTensor()]
        gs, ls = r.global_size, r.local_size
        self.global_transfo1 = v2.Compose([crop(gs, r.global_crops_scale), *flip_and_color_jitter(),
                                           *blur_solarize(r.blur_p[0], r.solarize_p[0], gs), *normalize])
        self.global_transfo2 = v2.Compose([crop(gs, r.global_crops_scale), *flip_and_color_jitter(),
                                           *blur_solarize(r.blur_p[1], r.solarize_p[1], gs), *normalize])
        self.local_transfo = v2.Compose([crop(ls, r.local_crops_scale), *flip_and_color_jitter(),
                                         *blur_solarize(r.blur_p[2], r.solarize_p[2], ls), *normalize])

    def __call__(self, img) -> list[torch.Tensor]:
        x = to_uint8_chw(img)
        crops = [self.global_transfo1(x), self.global_transfo2(x)]
        crops.extend(self.local_transfo(x) for _ in range(self.recipe.local_crops_number))
        return crops
