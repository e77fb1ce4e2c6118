"""The paper's "resolving the attention deficit" figure from any checkpoints: input | each model's attention map.

One row per image; one column per model: the [CLS] attention averaged over heads and over blocks for ``cls``
backbones (``Backbone.attention_maps(x)["mean_blocks"]``), the pooling's own attention for SimPool and every other
pooling that has one (``["pool"]``). Maps are min-max normalised per image, upsampled (nearest: one block per
patch) and coloured with viridis. ``dino-simpool-attention --compare ckptA ckptB ...`` and the supervised demo draw
it with :func:`save_comparison`.

(``colormap``/``_minmax`` are the same as eval/attention.py's, which are moving into the library on another branch;
once both are in, one of the two copies goes.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data import create_transform
from torch.nn import functional as F

from dino_simpool.evaluation.attention import _minmax, colormap
from dino_simpool.models.backbones import Backbone

TITLE_H = 14
GAP = 4


def map_title(model: Backbone) -> str:
    """What :func:`comparison_map` shows for this model, e.g. ``[CLS] mean over blocks`` or ``simpool (gamma 1.25)``."""
    if model.pooling == "cls":
        return "[CLS] mean over blocks"
    gamma = model.config.get("gamma")
    return f"{model.pooling}" + (f" (gamma {gamma:g})" if model.pooling == "simpool" and gamma is not None else "")


@torch.no_grad()
def comparison_map(model: Backbone, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w): the pooling's attention, or for ``cls`` the [CLS] attention averaged over heads and blocks."""
    maps = model.attention_maps(x)
    if "pool" in maps:
        return maps["pool"]
    return maps["mean_blocks"]


def input_size(model: Backbone, image_size: int | None = None) -> int:
    """The side fed to ``model``: ``image_size`` or the model's own (its config's ``img_size``), a multiple of the
    ViT patch."""
    size = image_size or model.config.get("img_size") or 224
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    m = int(model.patch_size) if model.is_vit else 1
    return max(m, round(size / m) * m)


def compare_attention(models: Sequence[tuple[str, Backbone]], images: Sequence[Image.Image], panel: int = 128,
                      image_size: int | None = None) -> Image.Image:
    """The figure: a header row of column titles (``input`` and each model's label), then one row per image."""
    if not models:
        raise ValueError("compare_attention needs at least one model")
    if not images:
        raise ValueError("compare_attention needs at least one image")
    font = ImageFont.load_default()
    cols = 1 + len(models)
    width = cols * panel + (cols - 1) * GAP
    canvas = Image.new("RGB", (width, 2 * TITLE_H + len(images) * (panel + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = [("input", "")] + [(label, map_title(m)) for label, m in models]
    for c, (label, what) in enumerate(titles):
        x = c * (panel + GAP)
        draw.text((x + 2, 0), _fit(draw, label, panel - 4, font), fill=(0, 0, 0), font=font)
        draw.text((x + 2, TITLE_H), _fit(draw, what, panel - 4, font), fill=(60, 60, 60), font=font)
    for label, model in models:
        model.eval()
    transforms = {id(m): create_transform(input_size(m, image_size), is_training=False, crop_pct=1.0,
                                          interpolation="bicubic") for _, m in models}
    for r, img in enumerate(images):
        img = img.convert("RGB")
        y = 2 * TITLE_H + r * (panel + GAP)
        side = min(img.size)
        square = img.crop(((img.width - side) // 2, (img.height - side) // 2,
                           (img.width - side) // 2 + side, (img.height - side) // 2 + side))
        canvas.paste(square.resize((panel, panel), Image.BICUBIC), (0, y))
        for c, (_, model) in enumerate(models, start=1):
            device = next(model.parameters()).device
            x = transforms[id(model)](img)[None].to(device)
            amap = comparison_map(model, x)[0].float()
            up = F.interpolate(amap[None, None].cpu(), size=(panel, panel), mode="nearest")[0, 0].numpy()
            canvas.paste(Image.fromarray(colormap(_minmax(up))), (c * (panel + GAP), y))
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text``, shortened (with ``...``) until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_comparison(models: Sequence[tuple[str, Backbone]], images: Sequence[Image.Image], path: str | Path,
                    panel: int = 128, image_size: int | None = None) -> Path:
    """Write :func:`compare_attention`'s figure to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compare_attention(models, images, panel, image_size).save(path)
    return path
