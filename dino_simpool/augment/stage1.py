"""Stage 1 of the multi-crop pipeline (loader workers, CPU): decode, draw every parameter, cut the uint8 crops.

``CropStage(recipe)(img) -> {"crops": [uint8 (3, S, S)] * ncrops, "params": (ncrops, NPARAMS)}``; the DataLoader's
default collate turns a batch of these into ``{"crops": [(B, 3, S, S)] * ncrops, "params": (B, ncrops, NPARAMS)}``.

The crops are cut with torch's native uint8 antialiased bicubic resize (``interpolate(..., antialias=True)``), the
very kernel ``torchvision.transforms.v2.functional.resized_crop`` runs on a uint8 image: the crops are equal to it
bit for bit (tests/test_augment_pipeline.py). Against PIL's bicubic resize in DINO's code: 0.007 levels on average,
at most 2 except where a bicubic overshoot next to a saturated edge is clipped between the two passes (up to 9 levels
on a few pixels). It is called directly because ``resized_crop``'s dispatch adds ~0.15 ms per crop, 10 per image.

``ImageLoader`` is the file loader for ``SafeImageFolder``: JPEGs are decoded with ``torchvision.io.decode_jpeg``
(libjpeg-turbo, the same pixels as PIL) straight into a channels-last uint8 tensor, which is what the resize kernel
is fastest on.
"""
from __future__ import annotations

import io
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
    """uint8 (3, H, W) -> uint8 (3, size, size): torchvision's resized_crop (bicubic, antialias), minus dispatch."""
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


class ImageLoader:
    """``SafeImageFolder`` loader: path -> (3, H, W) uint8 tensor. Raises on an unreadable file (the folder then
    logs it and uses the next image). JPEG (RGB, greyscale or CMYK) through ``torchvision.io.decode_jpeg``
    (libjpeg-turbo: the same pixels as PIL, and a channels-last tensor, which the crop resize is fastest on); the
    rest through PIL.

    No reduced-size decode (PIL ``Image.draft``): at ImageNet's ~500 x 375 no crop of DINO's recipe allows one, and
    on a 2000 x 1500 photo the 1/2 draft the local crops allow saves 4-7 % over ``decode_jpeg`` (benchmarks/data.py)."""

    def __call__(self, path) -> torch.Tensor:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\xff\xd8":  # JPEG
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_uint8_chw(im.convert("RGB"))

    def __repr__(self):
        return "ImageLoader()"
