"""Stage 1 of the multi-crop pipeline (loader workers, CPU): decode, draw every parameter, cut the uint8 crops.

``CropStage(recipe)(img) -> {"crops": [uint8 (3, S, S)] * ncrops, "params": (ncrops, NPARAMS)}``; the DataLoader's
default collate turns a batch of these into ``{"crops": [(B, 3, S, S)] * ncrops, "params": (B, ncrops, NPARAMS)}``.

The crops are cut with torch's native uint8 antialiased bicubic resize (``interpolate(..., antialias=True)``), the
very kernel ``torchvision.transforms.v2.functional.resized_crop`` runs on a uint8 image: the crops are equal to it
bit for bit (tests/test_augment_pipeline.py), and within 1-2 levels of PIL's bicubic resize in DINO's code. It is
called directly because ``resized_crop``'s dispatch adds ~0.15 ms per crop, 10 crops per image.

``ImageLoader`` is the file loader for ``SafeImageFolder``: JPEGs are decoded with ``torchvision.io.decode_jpeg``
(libjpeg-turbo, the same pixels as PIL) straight into a channels-last uint8 tensor, which is what the resize kernel
is fastest on; with ``draft=True`` a big JPEG is decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain (PIL's
``Image.draft``) when even the smallest global crop would still be downscaled from the reduced image.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .recipe import Recipe, sample_params


def to_uint8_chw(img) -> torch.Tensor:
    """PIL image or (3, H, W) / (1, H, W) tensor (uint8, or float in [0, 1]) -> (3, H, W) uint8 tensor.

    A PIL image becomes a channels-last view of its pixels (no copy beyond numpy's)."""
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        with warnings.catch_warnings():  # read-only numpy view: stage 1 never writes into the source image
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"multi-crop expects a PIL image or a (3, H, W) tensor, got {type(img).__name__}")
    x = img.as_subclass(torch.Tensor)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"multi-crop expects a (3, H, W) or (1, H, W) image tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if x.dtype != torch.uint8:
        x = (x.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return x


def resized_crop_u8(x: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): torchvision's resized_crop (bicubic, antialias) without its dispatch."""
    crop = x[None, :, top:top + h, left:left + w]
    if (h, w) == (size, size):
        return crop[0].contiguous()
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True)[0]


class CropStage:
    """Stage 1: ``img`` (PIL image or tensor) -> ``{"crops": uint8 crops, "params": (ncrops, NPARAMS)}``."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def __call__(self, img) -> dict:
        x = to_uint8_chw(img)
        boxes, params = sample_params(self.recipe, x.shape[1], x.shape[2])
        crops = [resized_crop_u8(x, *b, self.recipe.crop_size(k)) for k, b in enumerate(boxes.tolist())]
        return {"crops": crops, "params": params}

    def __repr__(self):
        return f"CropStage({self.recipe})"


def draft_factor(ratio: float) -> int:
    """Largest JPEG DCT scale (1, 2, 4 or 8) that keeps every crop a downscale: ``ratio`` is the smallest crop side
    an image can get over the crop's output size (``smallest_crop_ratio``)."""
    f = 1
    while f < 8 and ratio >= 2 * f:
        f *= 2
    return f


def smallest_crop_ratio(recipe: Recipe, width: int, height: int) -> float:
    """The smallest side any crop of a ``width`` x ``height`` image can have, over that crop's output size.

    RandomResizedCrop's smallest crop has the area ``scale_min * W * H`` at aspect 3/4 or 4/3, so its short side is
    ``sqrt(scale_min * W * H * 3/4)`` (the centre-crop fallback only gives bigger crops)."""
    r = math.sqrt(recipe.global_crops_scale[0] * width * height * 0.75) / recipe.global_size
    if recipe.local_crops_number:
        r = min(r, math.sqrt(recipe.local_crops_scale[0] * width * height * 0.75) / recipe.local_size)
    return r


class ImageLoader:
    """``SafeImageFolder`` loader: path -> (3, H, W) uint8 tensor. Raises on an unreadable file (the folder then
    logs it and uses the next image). JPEG (RGB, greyscale or CMYK) through libjpeg-turbo, the rest through PIL.

    ``draft``: a JPEG whose smallest possible global crop has >= 2x the pixels it needs is decoded at reduced size
    (PIL ``draft``); never the case at ImageNet's ~500 x 375, a 4x saving at 2000 x 1500 (benchmarks/data.py)."""

    def __init__(self, recipe: Recipe | None = None, draft: bool = False):
        if draft and recipe is None:
            raise ValueError("ImageLoader(draft=True) needs the recipe (its crop sizes decide the decode scale)")
        self.recipe = recipe if draft else None

    def __call__(self, path) -> torch.Tensor:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\xff\xd8":  # JPEG
            if self.recipe is not None:
                with Image.open(path) as im:
                    f = draft_factor(smallest_crop_ratio(self.recipe, *im.size))
                    if f > 1:
                        im.draft("RGB", (im.size[0] // f, im.size[1] // f))
                        im.load()
                        return to_uint8_chw(im)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        with Image.open(path) as im:
            im.load()
            return to_uint8_chw(im.convert("RGB"))

    def __repr__(self):
        return f"ImageLoader(draft={self.recipe is not None})"
