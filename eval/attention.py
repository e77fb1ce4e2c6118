"""``dino-simpool-attention``: where does the model look? One PNG per image with the input, the attention map(s)
and an overlay.

    dino-simpool-attention --checkpoint out/checkpoint.pth --images photos/ --output_dir attn/ [--threshold 0.6]

* SimPool (and any pooling with an attention map): the pooling's attention over the patches (``Backbone.attention_maps
  (x)["pool"]``).
* cls: the last block's [CLS] attention of each head, the mean over blocks of the head-averaged [CLS] attention, and
  an overlay of the last block's head mean (DINO's picture).

Maps are upsampled to the image size (nearest, i.e. one block per patch as DINO's ``visualize_attention.py``, or
bilinear). ``--threshold m`` adds DINO's cumulative-mass mask: the highest patches that together hold a fraction m
of the map's mass. Without ``--images`` a few images of the embedded dataset's val split are used. Images keep their
aspect ratio and are scaled down to a longest side of ``--max_size`` (480, as DINO; 0 = full size) unless
``--image_size S`` asks for S x S. Each PNG is named by the image's path relative to the folder given
(``a/x.png`` -> ``a__x.png``), so same-named images in different sub-folders do not overwrite each other.

``--compare ckptA ckptB ...`` draws instead one picture, ``<output_dir>/compare.png``: input | each checkpoint's map
([CLS] mean over blocks, or the pooling's attention), one row per image: the paper's "resolving the attention
deficit" figure (``dino_simpool.attention_compare``).

Library use (the demo): ``save_attention_pngs(model, images, out_dir, threshold=0.6)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dino_simpool.attention_compare import save_comparison
from eval.discovery import cumulative_mass_mask
from eval.maps import DEFAULT_MAX_SIZE, add_model_args, add_size_args, build_model, check_size_args, input_multiple, \
    list_images_named, model_device, model_input_size, to_tensor, unique_names

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


def _panel(rgb: np.ndarray, title: str, scale: int) -> Image.Image:
    im = Image.fromarray(rgb)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    out = Image.new("RGB", (im.width, im.height + TITLE_H), (255, 255, 255))
    out.paste(im, (0, TITLE_H))
    ImageDraw.Draw(out).text((2, 1), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return out


def attention_panels(model, img: Image.Image, image_size: int | None = None, threshold: float | None = None,
                     interpolation: str = "nearest", max_size: int | None = DEFAULT_MAX_SIZE
                     ) -> tuple[list[tuple[str, np.ndarray]], tuple[int, int]]:
    """The pictures of one image as (title, uint8 RGB (H, W, 3)) pairs, all at the model input size (H, W) (see
    :func:`eval.maps.model_input_size`)."""
    size = model_input_size((img.height, img.width), input_multiple(model), image_size, max_size)
    x = to_tensor(img, size)[None].to(model_device(model))
    shown = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC))
    with torch.no_grad():
        maps = model.attention_maps(x)
    panels: list[tuple[str, np.ndarray]] = [("input", shown)]
    if "pool" in maps:
        main = maps["pool"][0].float().cpu().numpy()
        panels.append((f"{model.pooling} attention", colormap(_minmax(upsample(main, size, interpolation)))))
        main_title = model.pooling
    else:
        heads = maps["heads"][0].float().cpu().numpy()
        for i, hm in enumerate(heads):
            panels.append((f"head {i}", colormap(_minmax(upsample(hm, size, interpolation)))))
        mb = maps["mean_blocks"][0].float().cpu().numpy()
        panels.append(("mean over blocks", colormap(_minmax(upsample(mb, size, interpolation)))))
        main = heads.mean(0)
        main_title = "heads mean"
    heat = colormap(_minmax(upsample(main, size, interpolation))).astype(np.float64)
    panels.append((f"overlay ({main_title})", (0.5 * shown + 0.5 * heat).round().astype(np.uint8)))
    if threshold is not None:
        mask = cumulative_mass_mask(main, threshold).astype(np.float64)
        mask = upsample(mask, size, "nearest") > 0.5
        dim = (shown * np.where(mask[..., None], 1.0, 0.25)).round().astype(np.uint8)
        panels.append((f"mass {threshold:g}", dim))
    return panels, size


def render_attention(model, img: Image.Image, image_size: int | None = None, threshold: float | None = None,
                     interpolation: str = "nearest", min_panel: int = MIN_PANEL,
                     max_size: int | None = DEFAULT_MAX_SIZE) -> Image.Image:
    """One picture: the panels side by side, each scaled up by an integer factor to at least ``min_panel`` px."""
    panels, size = attention_panels(model, img, image_size, threshold, interpolation, max_size)
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


def save_attention_pngs(model, images: Iterable[Image.Image | str | Path], out_dir, image_size: int | None = None,
                        threshold: float | None = None, names: Sequence[str] | None = None,
                        interpolation: str = "nearest", min_panel: int = MIN_PANEL,
                        max_size: int | None = DEFAULT_MAX_SIZE) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` for each image (PIL images or paths); returns the paths.

    ``model``: a Backbone (eval mode is set here). ``image_size``: feed the model ``image_size``² (default: each
    image's own aspect ratio, longest side at most ``max_size``, ``None`` = full size; rounded to the patch size).
    ``threshold``: add DINO's cumulative-mass mask panel. ``names``: unique file stems (default: the file stems of
    paths, made unique, else ``attention_<i>``).
    """
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"--threshold is a mass fraction in (0, 1]; got {threshold}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    for name, item in zip(names, images):
        if isinstance(item, (str, Path)):
            with Image.open(item) as im:
                img = im.convert("RGB")
        else:
            img = item
        pic = render_attention(model, img, image_size, threshold, interpolation, min_panel, max_size)
        path = out / f"{name}.png"
        pic.save(path)
        written.append(path)
    return written


def stack_pictures(paths: Sequence[str | Path], out_path) -> Path:
    """Stack pictures vertically (white 4-px gaps) into one PNG, e.g. for a README."""
    ims = [Image.open(p).convert("RGB") for p in paths]
    if not ims:
        raise ValueError("no picture to stack")
    gap = 4
    canvas = Image.new("RGB", (max(i.width for i in ims), sum(i.height for i in ims) + gap * (len(ims) - 1)),
                       (255, 255, 255))
    y = 0
    for im in ims:
        canvas.paste(im, (0, y))
        y += im.height + gap
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def embedded_examples(num: int, image_size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``num`` val images of the embedded dataset, one per class in turn."""
    from dino_simpool.data import SyntheticShapes

    ds = SyntheticShapes("val", image_size=image_size)
    per = ds.images_per_class
    idx = [(k % ds.num_classes) * per + k // ds.num_classes for k in range(min(num, len(ds)))]
    return [ds.image(i) for i in idx], [f"val_{ds.classes[i // per]}_{i % per:05d}" for i in idx]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("dino-simpool-attention", description=__doc__.split("\n\n")[0])
    add_model_args(p, weights_flags=("--checkpoint", "--pretrained_weights"))
    p.add_argument("--images", nargs="*", default=None,
                   help="image files and/or folders (recursive); default: images of the embedded val split")
    p.add_argument("--output_dir", required=True, help="where the PNGs go")
    p.add_argument("--threshold", default=None, type=float,
                   help="add DINO's cumulative-mass mask keeping this fraction of the mass, e.g. 0.6")
    add_size_args(p)
    p.add_argument("--interpolation", default="nearest", choices=["nearest", "bilinear"],
                   help="map upsampling to the image size (nearest = one block per patch, as DINO)")
    p.add_argument("--num_images", default=4, type=int, help="embedded images to use when --images is not given")
    p.add_argument("--synthetic_size", default=64, type=int, help="embedded dataset image size")
    p.add_argument("--combined", default=None, help="also write all pictures stacked into this one PNG")
    p.add_argument("--compare", nargs="+", default=None, metavar="CHECKPOINT",
                   help="draw one side-by-side picture, <output_dir>/compare.png: input | each checkpoint's map "
                        "([CLS] mean over blocks, or the pooling's attention); the model flags apply to each")
    p.add_argument("--labels", nargs="+", default=None, help="--compare: one column title per checkpoint "
                                                            "(default: the checkpoint's folder name)")
    return p


def compare(args: argparse.Namespace, images, log=print) -> Path:
    """``--compare``: every checkpoint through the same model flags, then one side-by-side picture."""
    if args.labels is not None and len(args.labels) != len(args.compare):
        raise ValueError(f"--labels gives {len(args.labels)} titles for {len(args.compare)} --compare checkpoints")
    labels = args.labels or [Path(c).parent.name if Path(c).is_file() else Path(c).name for c in args.compare]
    models = [(label, build_model(argparse.Namespace(**{**vars(args), "pretrained_weights": ck}), log))
              for label, ck in zip(labels, args.compare)]
    return save_comparison(models, images, Path(args.output_dir) / "compare.png", image_size=args.image_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dino_simpool.checkpoint import CheckpointError
    from dino_simpool.data import DataError

    try:
        if args.threshold is not None and not 0 < args.threshold <= 1:
            raise ValueError(f"--threshold is a mass fraction in (0, 1]; got {args.threshold}")
        check_size_args(args)
        model = build_model(args) if not args.compare else None
        if args.images:
            images, names = map(list, zip(*list_images_named(args.images)))
        else:
            images, names = embedded_examples(args.num_images, args.synthetic_size)
        if args.compare:
            images = [Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im for im in images]
            print(compare(args, images))
            return 0
        paths = save_attention_pngs(model, images, args.output_dir, args.image_size, args.threshold, names,
                                    args.interpolation, max_size=args.max_size)
        if args.combined:
            paths.append(stack_pictures(paths, args.combined))
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"dino-simpool-attention: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    print(f"wrote {len(paths) - bool(args.combined)} attention picture(s) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
