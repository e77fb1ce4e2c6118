"""DINO's multi-crop augmentation as one per-image transform, and the evaluation transform.

Recipe (DINO's ``DataAugmentationDINO``), every crop: RandomResizedCrop (bicubic), horizontal flip p=0.5,
colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale p=0.2, then
  * global crop 1: Gaussian blur p=1.0;
  * global crop 2: Gaussian blur p=0.1, solarization p=0.2;
  * each local crop: Gaussian blur p=0.5;
then ToTensor + Normalize (ImageNet mean/std by default).

Gaussian blur: DINO applies PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` with sigma ~ U(0.1, 2.0). PIL's radius
*is* the standard deviation, in pixels, whatever the crop size. Here the blur draws the same sigma (in pixels); its
kernel covers +-3 sigma_max: ``kernel_size = 2 * ceil(3 * sigma_max) + 1`` (13 for sigma_max = 2.0), capped at the
largest odd size that fits the crop (reflect padding needs the kernel to be smaller than twice the crop side; a
kernel wider than the crop adds nothing). ``blur_sigma`` is configurable (tiny crops may want a smaller range); the
default is DINO's.

The implementation lives in ``dino_simpool.augment`` (the two-stage pipeline that training uses); this module keeps
the per-image interface. ``backend="fast"`` (default) runs both stages on one image: uint8 crops with torchvision's
antialiased bicubic resize, then the batched colour/blur/solarize kernels of ``dino_simpool.augment.stage2`` on the
crops of each size, with per-crop decisions and factors (each kernel checked against torchvision's functional op in
tests). ``backend="v2"`` composes stock torchvision.transforms.v2 transforms (solarization threshold 128, as PIL's
``ImageOps.solarize``). Same distribution of outputs.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from dino_simpool.augment.pipeline import BACKENDS, TwoStageCrops
from dino_simpool.augment.recipe import (IMAGENET_MEAN, IMAGENET_STD, Recipe, blur_kernel_size, check_size,
                                         random_resized_crop_params)
from dino_simpool.augment.reference import V2MultiCrop
from dino_simpool.augment.stage2 import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                                         gaussian_blur, rgb_to_grayscale3, solarize)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropAugmentation", "eval_transform", "blur_kernel_size",
           "random_resized_crop_params", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "gaussian_blur", "rgb_to_grayscale3", "solarize"]


class MultiCropAugmentation:
    """``__call__(img) -> list[Tensor]``: 2 global crops (3, global_size, global_size) then ``local_crops_number``
    local crops (3, local_size, local_size), float32, normalised. ``img`` is a PIL image or a (3, H, W) tensor
    (uint8, or float in [0, 1]).

    ``backend="fast"`` (default) runs the two-stage pipeline on one image (``dino_simpool.augment``);
    ``backend="v2"`` composes the stock torchvision.transforms.v2 transforms. Randomness comes from torch's global
    generator (``SeededDataset`` seeds it per sample), as in torchvision."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=(0.1, 2.0),
                 backend="fast"):
        self.recipe = Recipe(global_crops_scale, local_crops_scale, local_crops_number, global_size, local_size,
                             mean=mean, std=std, blur_sigma=blur_sigma)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'fast' or 'v2', got {backend!r}")
        self.backend = backend
        r = self.recipe
        self.global_crops_scale, self.local_crops_scale = r.global_crops_scale, r.local_crops_scale
        self.local_crops_number, self.global_size, self.local_size = r.local_crops_number, r.global_size, r.local_size
        self.blur_sigma = r.blur_sigma
        self._impl = TwoStageCrops(r) if backend == "fast" else V2MultiCrop(r)

    @property
    def ncrops(self):
        return self.recipe.ncrops

    def __call__(self, img):
        return self._impl(img)

    def __repr__(self):
        return (f"MultiCropAugmentation(global_crops_scale={self.global_crops_scale}, "
                f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
                f"global_size={self.global_size}, local_size={self.local_size}, blur_sigma={self.blur_sigma}, "
                f"backend={self.backend!r})")


def eval_transform(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """DINO's evaluation transform: Resize(resize, bicubic) -> CenterCrop(crop) -> tensor -> Normalize."""
    resize = check_size("resize", resize)
    crop = check_size("crop", crop)
    if crop > resize:
        raise ValueError(f"eval crop ({crop}) must not exceed the resize ({resize})")
    return v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ])
