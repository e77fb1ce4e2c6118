"""Device decode (``--aug_pipeline device_decode``): the loader only reads bytes and draws the parameters; the
training device decodes the batch's JPEGs (``torchvision.io.decode_jpeg(list, device=...)``, nvjpeg on CUDA) and
cuts every crop there.

Stage 1 (``EncodedCropStage``) returns ``{"data": bytes, "kind": 0 (JPEG) or 1 (raw RGB), "size": (H, W),
"boxes": (ncrops, 4), "params": (ncrops, NPARAMS), "path": str}``; the default collate keeps ``data`` and ``path``
as lists. A file that is not a JPEG the device can decode (PNG, CMYK JPEG, no end-of-image marker) is decoded in the
loader and travels as raw RGB bytes: same crops, decoded on the CPU.

The crops are cut by ``antialiased_crops``: torch's antialiased bicubic resize (the filter, support and
normalisation of ``interpolate(..., mode="bicubic", antialias=True)``) written as two weight matrices per crop,
``crop = W_y @ image @ W_x^T``, so that all crops of a batch of differently sized images are a few batched matrix
products. ``torchvision.ops.roi_align(aligned=True)`` is a box filter (it averages ``sampling_ratio``^2 bilinear
samples per output pixel), not torchvision's bicubic: on a 500 x 375 photo its crops differ from the CPU path's by
0.78 levels on average (max 11), this one's by 0.002 (max 1; tests/test_augment_pipeline.py).

A JPEG the device cannot decode is decoded again on the CPU; one that no decoder reads (corrupt after its header)
is logged once and replaced by a mid-grey image (the folder's skip-to-the-next-image happens in the loader, which
here only checks the header and the end-of-image marker).
"""
from __future__ import annotations

import io
import logging
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .recipe import Recipe, sample_params
from .stage1 import ImageLoader, to_uint8_chw

logger = logging.getLogger(__name__)
KIND_JPEG, KIND_RAW = 0, 1
_warned: set[str] = set()


class EncodedJPEG(NamedTuple):
    """A JPEG file's bytes and its size, read by ``EncodedLoader`` (decoded later, on the training device)."""
    data: bytes
    height: int
    width: int
    path: str = ""


class EncodedLoader:
    """``SafeImageFolder`` loader for device decode: path -> ``EncodedJPEG`` for an RGB or greyscale JPEG that ends
    with its end-of-image marker, else the image decoded on the CPU (``ImageLoader``). Raises on a file whose
    header PIL cannot read (the folder then logs it and uses the next image)."""

    def __init__(self):
        self._cpu = ImageLoader()

    def __call__(self, path) -> EncodedJPEG | torch.Tensor:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
            with Image.open(io.BytesIO(data)) as im:  # header only: size, mode
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    return EncodedJPEG(data, im.size[1], im.size[0], str(path))
        return self._cpu(path)

    def __repr__(self):
        return "EncodedLoader()"


class EncodedCropStage:
    """Stage 1 of device decode: draws the parameters; the pixels stay encoded (or raw) for the device."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def __call__(self, img) -> dict:
        if isinstance(img, EncodedJPEG):
            h, w, data, kind, path = img.height, img.width, img.data, KIND_JPEG, img.path
        else:
            x = to_uint8_chw(img)
            h, w = x.shape[1:]
            data, kind, path = x.permute(1, 2, 0).contiguous().numpy().tobytes(), KIND_RAW, ""
        boxes, params = sample_params(self.recipe, h, w)
        return {"data": data, "kind": kind, "size": torch.tensor([h, w]), "boxes": boxes, "params": params,
                "path": path}

    def __repr__(self):
        return f"EncodedCropStage({self.recipe})"


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def decode_batch(batch: dict, device: torch.device) -> list[torch.Tensor]:
    """The batch's images as (3, H, W) uint8 tensors on ``device``: JPEGs decoded in one call there."""
    data, kinds, sizes = batch["data"], batch["kind"].tolist(), batch["size"].tolist()
    paths = batch.get("path") or [""] * len(data)
    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, k in enumerate(kinds) if k == KIND_JPEG]
    if jpeg:
        encoded = [_bytes_tensor(data[i]) for i in jpeg]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: decode one by one, then on the CPU
            decoded = [_decode_one(e, device, paths[i], sizes[i]) for e, i in zip(encoded, jpeg)]
        for i, x in zip(jpeg, decoded):
            out[i] = x
    for i, k in enumerate(kinds):
        if k == KIND_RAW:
            h, w = sizes[i]
            out[i] = _bytes_tensor(data[i]).view(h, w, 3).permute(2, 0, 1).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def _decode_one(encoded: torch.Tensor, device: torch.device, path: str, size) -> torch.Tensor:
    for dev in dict.fromkeys([torch.device(device), torch.device("cpu")]):
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=dev).to(device)
        except RuntimeError as e:
            err = e
    if path not in _warned:
        _warned.add(path)
        logger.warning("could not decode %s (%s); a grey image stands in for it in this batch", path or "a JPEG",
                       str(err).splitlines()[-1][:200])
    return torch.full((3, *size), 128, dtype=torch.uint8, device=device)


def _cubic_aa(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5), torch's antialiased bicubic filter."""
    x = x.abs()
    w1 = ((a + 2) * x - (a + 3)) * x * x + 1
    w2 = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, w1, torch.where(x < 2, w2, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(N, out_size, in_size) matrices: row i holds the weights torch's antialiased bicubic resize gives the input
    pixels when it maps ``length`` pixels from ``start`` (per crop, along one axis) to ``out_size`` pixels."""
    dev = start.device
    start, length = start.double().view(-1, 1, 1), length.double().view(-1, 1, 1)
    scale = length / out_size
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=dev, dtype=torch.float64).view(1, -1, 1) + 0.5)
    j = torch.arange(in_size, device=dev, dtype=torch.float64).view(1, 1, -1) - start  # index inside the crop
    w = _cubic_aa((j + 0.5 - center) * invscale) * ((j >= 0) & (j < length))
    return (w / w.sum(-1, keepdim=True)).float()


def antialiased_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int,
                      chunk: int = 32) -> torch.Tensor:
    """Crop k of image b: ``boxes[b, k] = (top, left, h, w)`` resized to ``size`` x ``size`` with torch's
    antialiased bicubic filter, rounded to uint8 levels after each pass -> (B, K, 3, size, size) float32 in
    [0, 255].

    Images are zero-padded to the chunk's largest size (the weights are zero outside each crop)."""
    b_all, k = boxes.shape[:2]
    dev = images[0].device
    boxes = boxes.to(dev)
    out = torch.empty(b_all, k, 3, size, size, device=dev)
    for s in range(0, b_all, chunk):
        imgs = images[s:s + chunk]
        hp, wp = max(x.shape[1] for x in imgs), max(x.shape[2] for x in imgs)
        x = torch.zeros(len(imgs), 3, hp, wp, device=dev)
        for i, im in enumerate(imgs):
            x[i, :, :im.shape[1], :im.shape[2]] = im
        bx = boxes[s:s + chunk].reshape(-1, 4)
        wy = resize_weights(bx[:, 0], bx[:, 2], size, hp).view(len(imgs), k, size, hp)
        wx = resize_weights(bx[:, 1], bx[:, 3], size, wp).view(len(imgs), k, size, wp)
        # horizontal pass, rounded and clipped to uint8 levels, then the vertical pass: the order and the
        # intermediate rounding of torch's uint8 resize, which stage 1 runs on the CPU
        y = (x.unsqueeze(1) @ wx.unsqueeze(2).transpose(-1, -2)).round_().clamp_(0, 255)   # (n, K, 3, hp, size)
        out[s:s + len(imgs)] = (wy.unsqueeze(2) @ y).round_().clamp_(0, 255)
    return out


class DeviceCrops:
    """Device side of device decode: collated stage-1 batch -> the ``ncrops`` crops, (B, 3, S, S) float32 in
    [0, 255] on ``device`` (input of ``ColorStage``)."""

    def __init__(self, recipe: Recipe, chunk: int = 32):
        self.recipe = recipe
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, batch: dict, device: torch.device) -> list[torch.Tensor]:
        r = self.recipe
        images = decode_batch(batch, device)
        boxes = batch["boxes"]
        crops = list(antialiased_crops(images, boxes[:, :2], r.global_size, self.chunk).unbind(1))
        if r.local_crops_number:
            crops += list(antialiased_crops(images, boxes[:, 2:], r.local_size, self.chunk).unbind(1))
        return crops
