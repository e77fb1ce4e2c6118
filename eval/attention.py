"""``dino-simpool-attention``: where does the model look? One PNG per image with the input, the attention map(s)
and an overlay (the pictures: :mod:`dino_simpool.evaluation.attention`).

    dino-simpool-attention --checkpoint out/checkpoint.pth --images photos/ --output_dir attn/ [--threshold 0.6]

Without ``--images`` a few images of the embedded dataset's val split are used. Images keep their aspect ratio and
are scaled down to a longest side of ``--max_size`` (480, as DINO; 0 = full size) unless ``--image_size S`` asks for
S x S. Each PNG is named by the image's path relative to the folder given (``a/x.png`` -> ``a__x.png``), so
same-named images in different sub-folders do not overwrite each other. Beside each PNG go the raw maps as ``.npy``
(float32, patch resolution, unnormalised): ``<name>.npy`` (SimPool: (h, w); [CLS]: the last block's heads, (heads, h,
w)) and, for [CLS], ``<name>.mean_blocks.npy`` (h, w). ``--combined`` stacks the pictures with each image's name above
its row.

``--compare ckptA ckptB ...`` draws instead one picture, ``<output_dir>/compare.png``: input | each checkpoint's map
([CLS] mean over blocks, or the pooling's attention), one row per image: the paper's "resolving the attention
deficit" figure (``dino_simpool.evaluation.compare``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.cli import OneLineErrorParser, print_error
from dino_simpool.data import DataError
from dino_simpool.evaluation.attention import embedded_examples, save_attention_pngs, stack_pictures
from dino_simpool.evaluation.compare import save_comparison

from .maps import add_size_args, check_size_args, list_images_named
from .model_args import add_model_args, build_model, resolve_device


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("dino-simpool-attention", description=__doc__.split("\n\n")[0])
    add_model_args(p, device=True)
    p.add_num_threads_flag()
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
    p.add_argument("--combined", default=None,
                   help="also write all pictures stacked into this one PNG, each image's name above its row")
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
    device = resolve_device(args.device)
    models = [(label, build_model(argparse.Namespace(**{**vars(args), "pretrained_weights": ck}), device, log=log))
              for label, ck in zip(labels, args.compare)]
    return save_comparison(models, images, Path(args.output_dir) / "compare.png", image_size=args.image_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threshold is not None and not 0 < args.threshold <= 1:
            raise ValueError(f"--threshold is a mass fraction in (0, 1]; got {args.threshold}")
        check_size_args(args)
        model = build_model(args, resolve_device(args.device)) if not args.compare else None
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
        print_error("dino-simpool-attention", e)
        return 2
    for p in paths:
        print(p)
    print(f"wrote {len(paths) - bool(args.combined)} attention picture(s) and their raw maps (.npy) to "
          f"{args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
