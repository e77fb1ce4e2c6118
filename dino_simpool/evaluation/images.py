"""Pictures for a backbone: the input size rule (``--image_size`` / ``--max_size``), normalised tensors, and unique
file names for the pictures written (the attention PNGs, the localization evaluators)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dino_simpool.data.normalization import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MAX_SIZE = 480  # longest side fed to the model when no --image_size is given (DINO's visualize_attention)


def model_input_size(size: tuple[int, int], multiple: int, image_size: int | None,
                     max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """(H, W) fed to the model, rounded to the nearest multiple of ``multiple`` (the ViT patch; 1 for CNNs), at least
    one multiple: ``image_size`` x ``image_size`` when given; else the image's own size, scaled down (keeping the
    aspect ratio) so that its longest side is at most ``max_size`` (``None``/0: full size). Images are never scaled
    up."""
    m = max(int(multiple), 1)
    if image_size:
        h, w = image_size, image_size
    else:
        h, w = size
        if max_size and max(h, w) > max_size:
            s = max_size / max(h, w)
            h, w = h * s, w * s
    h, w = (max(m, int(round(v / m)) * m) for v in (h, w))
    if not image_size and max_size and max_size >= m:
        cap = max_size // m * m
        h, w = min(h, cap), min(w, cap)
    return h, w


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> normalised (3, H, W) float tensor at ``size`` = (H, W) (bicubic resize when needed)."""
    img = img.convert("RGB")
    if (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def input_multiple(model) -> int:
    return int(model.patch_size) if getattr(model, "is_vit", False) else 1


def unique_names(rel_parts: Sequence[Sequence[str]]) -> list[str]:
    """File-name-safe, unique names for relative paths given as parts (see :func:`list_images_named`)."""
    def join(parts: Sequence[str], keep_suffix: bool) -> str:
        *dirs, last = parts
        p = Path(last)
        last = f"{p.stem}_{p.suffix[1:]}" if keep_suffix and p.suffix else p.stem
        return "__".join([*dirs, last])

    names = [join(parts, False) for parts in rel_parts]
    counts = Counter(names)
    names = [join(parts, True) if counts[n] > 1 else n for n, parts in zip(names, rel_parts)]
    seen: set[str] = set()
    out = []
    for n in names:
        name, k = n, 1
        while name in seen:
            k += 1
            name = f"{n}_{k}"
        seen.add(name)
        out.append(name)
    return out
