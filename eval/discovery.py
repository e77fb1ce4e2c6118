"""Single-object discovery, CorLoc (the LOST protocol): one box per image, correct when IoU ≥ 0.5 with any
ground-truth box. Boxes come from the attention map (largest 4-connected component after DINO's cumulative-mass
threshold, LOST's ``dino_seg``) or from LOST (Siméoni et al., BMVC 2021) on the last block's patch keys.

Differences from LOST's code: ``dino_seg`` thresholds head 0 of the [CLS] attention, here the map is the pooling's
(SimPool) or the head mean (cls); LOST's ``range(max(label))`` skips the last component when picking the largest and
boxes the background when there is only one component, here every component counts. Images go in resized to a
multiple of the patch (LOST pads) and boxes are scaled back by the image/grid ratio per axis.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage

from dino_simpool.cli import OneLineErrorParser
from dino_simpool.evaluation.attention import cumulative_mass_mask
from dino_simpool.evaluation.images import DEFAULT_MAX_SIZE

from . import locdata
from .boxes import box_iou, check_gt_boxes, largest_component_box
from .maps import MAP_CHOICES, attention_map, patch_features, resolve_map_kind


def _scale_box(box, grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = grid
    H, W = image_size
    sx, sy = W / w, H / h
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def attention_box(attn, image_size: tuple[int, int], mass: float = 0.6) -> tuple[float, float, float, float]:
    """Box of the largest 4-connected component (``scipy.ndimage.label``'s default, as LOST's ``dino_seg``) of the
    thresholded (h, w) map, in pixels of an image of ``image_size`` = (H, W)."""
    attn = np.asarray(attn, dtype=np.float64)
    if attn.ndim != 2:
        raise ValueError(f"an attention map must be 2-D (h, w); got shape {attn.shape}")
    box = largest_component_box(cumulative_mass_mask(attn, mass), connectivity=4)
    return _scale_box(box, attn.shape, image_size)


def lost_box(feats, grid: tuple[int, int], image_size: tuple[int, int], k_patches: int = 100):
    """LOST on patch features (N, d) laid out row-major on ``grid`` = (h, w).

    The patch similarity graph is A = F Fᵀ. The seed is the patch with the fewest positive correlations; it is
    expanded with those of the ``k_patches`` lowest-degree patches that correlate positively with it; the mask is
    every patch whose summed similarity to that set is positive; the box is the 4-connected component of the mask
    that holds the seed. Returns (box in image pixels, seed index).
    """
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    h, w = grid
    if f.ndim != 2 or f.shape[0] != h * w:
        raise ValueError(f"LOST needs features (N, d) with N = h*w = {h * w}; got shape {tuple(f.shape)}")
    A = f @ f.T
    degree = (A > 0).sum(dim=1)
    order = torch.argsort(degree, stable=True)
    seed = int(order[0])
    potentials = order[: min(k_patches, len(order))]
    expansion = potentials[A[seed, potentials] > 0]
    if len(expansion) == 0:
        expansion = torch.tensor([seed])
    mask = (A[expansion].sum(dim=0) > 0).reshape(h, w).numpy()
    mask[seed // w, seed % w] = True
    labels, _ = ndimage.label(mask)
    comp = labels == labels[seed // w, seed % w]
    ys, xs = np.nonzero(comp)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return _scale_box(box, grid, image_size), seed


def corloc(pred_boxes, gt_boxes, iou_threshold: float = 0.5) -> float:
    """Percentage of images whose single predicted box has IoU ≥ ``iou_threshold`` with some ground-truth box."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"got {len(pred_boxes)} predicted boxes for {len(gt_boxes)} images")
    if not pred_boxes:
        raise ValueError("CorLoc: no image was evaluated")
    hits = 0
    for i, (p, g) in enumerate(zip(pred_boxes, gt_boxes)):
        gt = check_gt_boxes(g, f"image {i}")
        hits += int(box_iou(np.asarray(p, dtype=np.float64)[None], gt).max() >= iou_threshold)
    return 100.0 * hits / len(pred_boxes)


# ----------------------------------------------------------------------------------------------------------------------
# command line: python -m eval.discovery
# ----------------------------------------------------------------------------------------------------------------------
METHODS = ("attention", "lost")
RESULTS_FILE = "discovery_results.json"


def predict_boxes(model, samples, method: str = "attention", image_size=None, batch_size: int = 32,
                  mass: float = 0.6, k_patches: int = 100, map_kind: str = "auto",
                  max_size: int | None = DEFAULT_MAX_SIZE) -> list:
    """One box per sample (in its original image's pixels): ``attention`` = largest connected component of the
    cumulative-mass-thresholded map; ``lost`` = LOST on the last block's patch keys (ViT) / last map (CNN)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}; got {method!r}")
    if method == "attention":
        map_kind = resolve_map_kind(model, map_kind)
    boxes = []
    for x, meta in locdata.iterate(model, samples, image_size, batch_size, max_size):
        if method == "attention":
            maps = locdata.as_numpy(attention_map(model, x, map_kind))
            boxes += [attention_box(m, size, mass) for m, (_, size) in zip(maps, meta)]
        else:
            feats, grid = patch_features(model, x)
            feats = locdata.as_numpy(feats)
            boxes += [lost_box(f, grid, size, k_patches)[0] for f, (_, size) in zip(feats, meta)]
    return boxes


def evaluate_model(model, samples, method: str = "attention", **kw) -> dict:
    pred = predict_boxes(model, samples, method, **kw)
    return {"corloc": corloc(pred, [s.boxes for s in samples]), "method": method, "num_images": len(samples)}


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("python -m eval.discovery",
                                description="Single-object discovery, CorLoc (LOST protocol) with attention or LOST "
                                            "boxes. Default data: the embedded dataset's val split and its boxes.")
    locdata.add_box_evaluator_args(p, RESULTS_FILE)
    p.add_num_threads_flag()
    p.add_argument("--method", default="attention", choices=list(METHODS))
    p.add_argument("--data_path", default=None,
                   help="VOC-style folder (Annotations/*.xml + JPEGImages/), or an image folder with --boxes/--annotations")
    p.add_argument("--annotations", default=None, help="folder of VOC XML files (images in --data_path)")
    p.add_argument("--boxes", default=None, help="JSON boxes file {relpath: [[x0,y0,x1,y1]...]} for --data_path")
    p.add_argument("--image_set", default="trainval",
                   help="VOC: evaluate the ids of ImageSets/Main/<image_set>.txt (LOST: trainval) when the folder has "
                        "it; 'all' = every annotation")
    p.add_argument("--threshold", default=0.6, type=float, help="attention: cumulative mass kept (DINO's 0.6)")
    p.add_argument("--k_patches", default=100, type=int, help="LOST: candidate patches for the seed expansion")
    p.add_argument("--map", default="auto", choices=list(MAP_CHOICES), help="attention: which map (see eval.localization)")
    return p


def load_samples(args) -> list:
    if args.data_path is None:
        if args.boxes or args.annotations:
            raise ValueError("--boxes/--annotations need --data_path (the images they refer to)")
        samples = locdata.embedded_samples("val", args.synthetic_size, args.synthetic_per_class,
                                           layout=args.synthetic_layout)
    elif args.boxes:
        samples = locdata.folder_json_samples(args.data_path, args.boxes)
    else:
        image_set = None if args.image_set in ("", "all") else args.image_set
        samples = locdata.voc_samples(args.data_path, args.annotations, image_set)
    return locdata.check_samples(samples, args.subset)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def check() -> None:
        if not 0 < args.threshold <= 1:
            raise ValueError(f"--threshold is a mass fraction in (0, 1]; got {args.threshold}")
        if args.k_patches < 1:
            raise ValueError(f"--k_patches must be >= 1; got {args.k_patches}")

    def evaluate(model, samples) -> dict:
        return evaluate_model(model, samples, args.method, image_size=args.image_size, batch_size=args.batch_size,
                              mass=args.threshold, k_patches=args.k_patches, map_kind=args.map,
                              max_size=args.max_size)

    def summary(res: dict) -> str:
        return (f"CorLoc ({args.method}) {res['corloc']:.2f} on {res['num_images']} images "
                f"[{res['arch']}/{res['pooling']}, {res['data']}]")

    return locdata.run_box_evaluator("eval.discovery", args, check, load_samples, evaluate, summary,
                                     RESULTS_FILE)


if __name__ == "__main__":
    sys.exit(main())
