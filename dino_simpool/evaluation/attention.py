"""Where does the model look? One picture per image with the input, the attention map(s) and an overlay (the demo and
``dino-simpool-attention``, ``eval/attention.py``, draw them).

* SimPool (and any pooling with an attention map): the pooling's attention over the patches (``Backbone.attention_maps
  (x)["pool"]``).
* cls: the last block's [CLS] attention of each head, the mean over blocks of the head-averaged [CLS] attention, and
  an overlay of the last block's head mean (DINO's picture).

Maps are upsampled to the image size (nearest, i.e. one block per patch as DINO's ``visualize_attention.py``, or
bilinear). ``--threshold m`` adds DINO's cumulative-mass mask: the highest patches that together hold a fraction m
of the map's mass. Images keep their aspect ratio and are scaled down to a longest side of
``max_size`` (480, as DINO; 0 = full size) unless ``image_size=S`` asks for S x S.

Beside each PNG the raw maps are saved as ``.npy`` (float32, patch resolution, unnormalised; :func:`map_files`), and
:func:`stack_pictures` writes the combined grid with each image's name above its row.

Use: ``save_attention_pngs(model, images, out_dir, threshold=0.6)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dino_simpool.data import SyntheticShapes
from dino_simpool.evaluation.features import model_device
from dino_simpool.evaluation.images import DEFAULT_MAX_SIZE, input_multiple, model_input_size, to_tensor, unique_names

# viridis, sampled at 0, .25, .5, .75, 1
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
TITLE_H = 14
MIN_PANEL = 192


def colormap(m01: np.ndarray) -> np.ndarray:
    """[0, 1] map (H, W) -> uint8 RGB (H, W, 3), viridis."""
    t = np.clip(np.asarray(m01, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return (_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).round().astype(np.uint8)


def _minmax(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(np.asarray(m, dtype=np.float64))
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def upsample(m: np.ndarray | torch.Tensor, size: tuple[int, int], interpolation: str = "nearest") -> np.ndarray:
    """(h, w) map -> (H, W) float64 map at the image size."""
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear'; got {interpolation!r}")
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    kw = {} if interpolation == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(t, size=tuple(size), mode=interpolation, **kw)[0, 0].double().numpy()


def cumulative_mass_mask(attn, mass: float = 0.6) -> np.ndarray:
    """DINO's threshold: keep the highest-valued locations that together hold ``mass`` of the map's total."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass/threshold must be in (0, 1]; got {mass}")
    a = np.clip(np.asarray(attn, dtype=np.float64), 0.0, None)
    flat = a.ravel()
    total = flat.sum()
    if total <= 0:
        return np.ones_like(a, dtype=bool)
    order = np.argsort(flat, kind="stable")  # ascending
    cum = np.cumsum(flat[order]) / total
    keep = np.zeros(flat.shape, dtype=bool)
    keep[order] = cum > (1.0 - mass)
    return keep.reshape(a.shape)


def _draw_text(im: Image.Image, xy: tuple[int, int], text: str) -> None:
    """Black text on ``im``; a name that the fallback bitmap font cannot encode is drawn with '?' for those
    characters instead of failing (image names can hold any character)."""
    draw, font = ImageDraw.Draw(im), ImageFont.load_default()
    try:
        draw.text(xy, text, fill=(0, 0, 0), font=font)
    except UnicodeEncodeError:
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), fill=(0, 0, 0), font=font)


def _panel(rgb: np.ndarray, title: str, scale: int) -> Image.Image:
    im = Image.fromarray(rgb)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    out = Image.new("RGB", (im.width, im.height + TITLE_H), (255, 255, 255))
    out.paste(im, (0, TITLE_H))
    _draw_text(out, (2, 1), title)
    return out


def attention_arrays(model, img: Image.Image, image_size: int | None = None,
                     max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int]]:
    """The model's raw maps of one image at patch resolution, float32 and unnormalised: ``{"pool": (h, w)}`` for a
    pooling with a map (SimPool), ``{"heads": (heads, h, w), "mean_blocks": (h, w)}`` for [CLS]; with the image as
    shown (uint8 (H, W, 3)) and the model input size (H, W) (see
    :func:`dino_simpool.evaluation.images.model_input_size`)."""
    size = model_input_size((img.height, img.width), input_multiple(model), image_size, max_size)
    x = to_tensor(img, size)[None].to(model_device(model))
    shown = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC))
    with torch.no_grad():
        maps = model.attention_maps(x)
    keys = ("pool",) if "pool" in maps else ("heads", "mean_blocks")
    return {k: maps[k][0].float().cpu().numpy() for k in keys}, shown, size


def panels_from_maps(maps: dict[str, np.ndarray], shown: np.ndarray, size: tuple[int, int], pooling: str,
                     threshold: float | None = None, interpolation: str = "nearest") -> list[tuple[str, np.ndarray]]:
    """The pictures of :func:`attention_arrays`' maps, as (title, uint8 RGB (H, W, 3)) pairs."""
    panels: list[tuple[str, np.ndarray]] = [("input", shown)]
    if "pool" in maps:
        main = maps["pool"]
        panels.append((f"{pooling} attention", colormap(_minmax(upsample(main, size, interpolation)))))
        main_title = pooling
    else:
        heads = maps["heads"]
        for i, hm in enumerate(heads):
            panels.append((f"head {i}", colormap(_minmax(upsample(hm, size, interpolation)))))
        panels.append(("mean over blocks", colormap(_minmax(upsample(maps["mean_blocks"], size, interpolation)))))
        main = heads.mean(0)
        main_title = "heads mean"
    heat = colormap(_minmax(upsample(main, size, interpolation))).astype(np.float64)
    panels.append((f"overlay ({main_title})", (0.5 * shown + 0.5 * heat).round().astype(np.uint8)))
    if threshold is not None:
        mask = cumulative_mass_mask(main, threshold).astype(np.float64)
        mask = upsample(mask, size, "nearest") > 0.5
        dim = (shown * np.where(mask[..., None], 1.0, 0.25)).round().astype(np.uint8)
        panels.append((f"mass {threshold:g}", dim))
    return panels


def attention_panels(model, img: Image.Image, image_size: int | None = None, threshold: float | None = None,
                     interpolation: str = "nearest", max_size: int | None = DEFAULT_MAX_SIZE
                     ) -> tuple[list[tuple[str, np.ndarray]], tuple[int, int]]:
    """The pictures of one image as (title, uint8 RGB (H, W, 3)) pairs, all at the model input size (H, W) (see
    :func:`dino_simpool.evaluation.images.model_input_size`)."""
    maps, shown, size = attention_arrays(model, img, image_size, max_size)
    return panels_from_maps(maps, shown, size, model.pooling, threshold, interpolation), size


def _compose(panels: list[tuple[str, np.ndarray]], size: tuple[int, int], min_panel: int) -> Image.Image:
    scale = max(1, -(-min_panel // max(size)))
    tiles = [_panel(rgb, title, scale) for title, rgb in panels]
    gap = 4
    W = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (W, tiles[0].height), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    return canvas


def render_attention(model, img: Image.Image, image_size: int | None = None, threshold: float | None = None,
                     interpolation: str = "nearest", min_panel: int = MIN_PANEL,
                     max_size: int | None = DEFAULT_MAX_SIZE) -> Image.Image:
    """One picture: the panels side by side, each scaled up by an integer factor to at least ``min_panel`` px."""
    panels, size = attention_panels(model, img, image_size, threshold, interpolation, max_size)
    return _compose(panels, size, min_panel)


def map_files(name: str, maps: Iterable[str]) -> dict[str, str]:
    """The ``.npy`` file name of each raw map of image ``name``: ``<name>.npy`` for the main map (``pool``, or
    ``heads``), ``<name>.<kind>.npy`` for the others (``mean_blocks``)."""
    return {k: f"{name}.npy" if k in ("pool", "heads") else f"{name}.{k}.npy" for k in maps}


def save_attention_pngs(model, images: Iterable[Image.Image | str | Path], out_dir, image_size: int | None = None,
                        threshold: float | None = None, names: Sequence[str] | None = None,
                        interpolation: str = "nearest", min_panel: int = MIN_PANEL,
                        max_size: int | None = DEFAULT_MAX_SIZE, save_maps: bool = True) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` for each image (PIL images or paths); returns the PNG paths.

    ``model``: a Backbone (eval mode is set here). ``image_size``: feed the model ``image_size``² (default: each
    image's own aspect ratio, longest side at most ``max_size``, ``None`` = full size; rounded to the patch size).
    ``threshold``: add DINO's cumulative-mass mask panel. ``names``: unique file stems (default: the file stems of
    paths, made unique, else ``attention_<i>``). ``save_maps``: also write the raw maps of :func:`attention_arrays`
    beside each PNG, as float32 ``.npy`` at patch resolution (:func:`map_files`): ``<name>.npy`` = SimPool's (h, w)
    map, or the last block's per-head [CLS] attention (heads, h, w), and ``<name>.mean_blocks.npy`` = the mean over
    blocks of the head-averaged [CLS] attention (h, w).
    """
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"--threshold is a mass fraction in (0, 1]; got {threshold}")
    out = Path(out_dir)
    model.eval()
    written: list[Path] = []
    images = list(images)
    if names is None:
        names = unique_names([(Path(it).name,) if isinstance(it, (str, Path)) else (f"attention_{i:03d}",)
                              for i, it in enumerate(images)])
    if len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"output names must be unique (one PNG per image); {dup!r} is given twice")
    if save_maps:  # every file this call writes has its own name: no map overwrites another image's
        files = [f for n in names for f in {f"{n}.png", *map_files(n, ("pool", "heads", "mean_blocks")).values()}]
        clash = next((f for f in files if files.count(f) > 1), None)
        if clash is not None:
            raise ValueError(f"two images would write {clash!r} (a name like 'x.mean_blocks' beside 'x'); rename one")
    out.mkdir(parents=True, exist_ok=True)
    for name, item in zip(names, images):
        if isinstance(item, (str, Path)):
            with Image.open(item) as im:
                img = im.convert("RGB")
        else:
            img = item
        maps, shown, size = attention_arrays(model, img, image_size, max_size)
        pic = _compose(panels_from_maps(maps, shown, size, model.pooling, threshold, interpolation), size, min_panel)
        path = out / f"{name}.png"
        pic.save(path)
        if save_maps:
            for kind, fname in map_files(name, maps).items():
                np.save(out / fname, maps[kind])
        written.append(path)
    return written


def stack_pictures(paths: Sequence[str | Path], out_path, labels: Sequence[str] | None = None) -> Path:
    """Stack pictures vertically (white 4-px gaps) into one PNG, e.g. for a README; each picture gets a strip above
    it with its label (default: the file stem, which is the image's name)."""
    ims = [Image.open(p).convert("RGB") for p in paths]
    if not ims:
        raise ValueError("no picture to stack")
    labels = [Path(p).stem for p in paths] if labels is None else list(labels)
    if len(labels) != len(ims):
        raise ValueError(f"got {len(labels)} labels for {len(ims)} pictures")
    gap = 4
    row_h = [TITLE_H + im.height for im in ims]
    canvas = Image.new("RGB", (max(i.width for i in ims), sum(row_h) + gap * (len(ims) - 1)), (255, 255, 255))
    y = 0
    for im, label, h in zip(ims, labels, row_h):
        _draw_text(canvas, (2, y + 1), label)
        canvas.paste(im, (0, y + TITLE_H))
        y += h + gap
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def embedded_examples(num: int, image_size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``num`` val images of the embedded dataset, one per class in turn."""
    ds = SyntheticShapes("val", image_size=image_size)
    per = ds.images_per_class
    idx = [(k % ds.num_classes) * per + k // ds.num_classes for k in range(min(num, len(ds)))]
    return [ds.image(i) for i in idx], [f"val_{ds.classes[i // per]}_{i % per:05d}" for i in idx]
