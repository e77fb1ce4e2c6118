"""``dino-simpool-export``: turn a training checkpoint into a backbone that timm, torch.hub and this project load.

    dino-simpool-export --checkpoint out/checkpoint.pth --output_dir export/ [--key teacher|student]

writes ``export/backbone.safetensors``, ``export/backbone.pth`` (a plain state dict) and ``export/config.json``.
See :mod:`dino_simpool.export` for the key layouts and the timm correspondence.
"""
from __future__ import annotations

import json
import sys

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.cli import OneLineErrorParser, print_error
from dino_simpool.export import export_checkpoint

from .model_args import add_model_args, model_overrides


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(
        "dino-simpool-export",
        description="Export the teacher (or student) backbone of a training checkpoint: backbone.safetensors, "
                    "backbone.pth and config.json. cls/gap backbones use timm's key names.",
    )
    add_model_args(p, weights_required=True)
    p.add_num_threads_flag()
    p.add_argument("--output_dir", required=True, help="folder to write the export into")
    p.add_argument("--img_size", default=None, type=int,
                   help="ViT: the position-embedding grid to store (default: the checkpoint's)")
    p.add_argument("--layout", default="auto", choices=("auto", "official"),
                   help="key names: auto (timm's for cls/gap, this project's encoder.*/pool.* otherwise) or official "
                        "(the official DINO/SimPool names, for their eval_knn.py/eval_linear.py: ViT cls/simpool, "
                        "ResNet and ConvNeXt gap/simpool)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = model_overrides(args)
        if args.img_size is not None:
            overrides["img_size"] = args.img_size
        meta = export_checkpoint(args.pretrained_weights, args.output_dir, checkpoint_key=args.checkpoint_key,
                                 layout=args.layout,
                                 **overrides)
    except (CheckpointError, ValueError, OSError) as e:
        print_error("dino-simpool-export", e)
        return 2
    spec = meta["timm"]
    kw = "".join(f", {k}={v!r}" for k, v in spec["kwargs"].items())
    print(f"exported {meta['arch']}/{meta['pooling']} ({meta['source'].get('checkpoint_key') or args.checkpoint_key}, "
          f"{meta['num_params']:,} parameters, layout {meta['layout']}) to {args.output_dir}")
    print(f"  load here:  dino_simpool.export.load_exported({args.output_dir!r})")
    if spec["complete"]:
        print(f"  load in timm: timm.create_model({spec['model_name']!r}, pretrained=True, num_classes=0{kw}, "
              f"pretrained_cfg_overlay=dict(file='{args.output_dir}/backbone.safetensors'))")
    elif "encoder" in spec:
        enc = spec["encoder"]
        kw = "".join(f", {k}={v!r}" for k, v in enc["kwargs"].items())
        print(f"  timm equivalent: timm.create_model({enc['model_name']!r}, num_classes=0{kw}) for encoder.*; "
              f"{spec['note']}")
    else:
        print(f"  official layout: {spec['note']}")
    print(f"  training config sha256: {meta['training_config_sha256']}")
    print(json.dumps({"files": meta["files"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
