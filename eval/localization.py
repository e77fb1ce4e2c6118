"""MaxBoxAccV2 (Choe et al., CVPR 2020): weakly-supervised localization from attention maps.

For each image: upsample the map to the image size, normalise it min-max, and at every threshold τ take a box
around each connected foreground region (the boxes around all contours). An image is correct at IoU δ when any
box hits any ground-truth box. BoxAcc(τ, δ) is the fraction of correct images; MaxBoxAccV2 is the mean over
δ ∈ {0.3, 0.5, 0.7} of max_τ BoxAcc(τ, δ).

Thresholding follows the reference evaluator (Choe et al.'s ``wsolevaluation``): the normalised map is quantised to
8 bits and a pixel is foreground when its value is strictly above ``int(τ · max)``. Known differences from it:

* boxes: one per 8-connected region (the external contours); the reference takes ``cv2.RETR_TREE`` contours, which
  also box the holes inside regions (those boxes lie inside their region's box);
* IoU: exclusive-end boxes, area (x1 - x0) · (y1 - y0); the reference adds 1 pixel to widths and heights (inclusive
  corners) and clips predicted boxes to W - 1 / H - 1, so small boxes score slightly differently;
* upsampling: bilinear to the original image size; the reference resizes images (and boxes) to 224 x 224 and
  upsamples the map bicubically (``cv2.INTER_CUBIC``);
* thresholds: a step of 0.01 by default (``--threshold_step``); ``evaluate_wsol``'s default step is 0.001.

Scores are therefore close to, not identical with, the reference's on the same maps.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dino_simpool.cli import OneLineErrorParser
from dino_simpool.evaluation.images import DEFAULT_MAX_SIZE

from . import locdata
from .boxes import box_iou, check_gt_boxes, mask_boxes
from .maps import MAP_CHOICES, attention_map, resolve_map_kind

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0, 0.01), 2).tolist())
DEFAULT_IOUS = (0.3, 0.5, 0.7)
RESULTS_FILE = "localization_results.json"


def upsample_map(attn, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to the image size (H, W), as a float64 array (the reference evaluator
    upsamples bicubically, see the module docstring)."""
    t = torch.as_tensor(np.asarray(attn, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"an attention map must be 2-D (h, w); got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(size):
        t = F.interpolate(t[None, None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0, 0]
    return t.double().numpy()


def normalize_minmax(m: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant or non-finite map becomes all zeros."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = m.min(), m.max()
    if hi - lo <= 0:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def boxes_at_thresholds(map01: np.ndarray, thresholds=DEFAULT_THRESHOLDS) -> list[list[tuple]]:
    """Boxes around every connected region of ``map > τ`` (8-bit quantised as the reference does), per τ."""
    u8 = (map01 * 255).astype(np.uint8)
    peak = int(u8.max())
    out = []
    for tau in thresholds:
        mask = u8 > int(tau * peak)
        out.append(mask_boxes(mask))
    return out


@dataclass
class MaxBoxAccV2:
    """Accumulates images one at a time; ``compute()`` gives the score and its parts (in percent)."""

    thresholds: tuple = DEFAULT_THRESHOLDS
    iou_thresholds: tuple = DEFAULT_IOUS
    hits: np.ndarray = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self):
        if not self.thresholds or not self.iou_thresholds:
            raise ValueError("thresholds and iou_thresholds must be non-empty")
        self.hits = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)

    def add(self, attn, gt_boxes, image_size: tuple[int, int], name: str = "image") -> None:
        """``attn``: (h, w) map at any resolution; ``gt_boxes``: [(x0, y0, x1, y1)] in pixels of an image of
        ``image_size`` = (H, W)."""
        gt = check_gt_boxes(gt_boxes, name)
        map01 = normalize_minmax(upsample_map(attn, image_size))
        for ti, boxes in enumerate(boxes_at_thresholds(map01, self.thresholds)):
            best = box_iou(np.asarray(boxes), gt).max() if boxes else 0.0
            for di, delta in enumerate(self.iou_thresholds):
                self.hits[di, ti] += int(best >= delta)
        self.count += 1

    def compute(self) -> dict:
        if self.count == 0:
            raise ValueError("MaxBoxAccV2: no image was evaluated")
        acc = 100.0 * self.hits / self.count
        best = acc.max(axis=1)
        return {
            "maxboxaccv2": float(best.mean()),
            "per_iou": {float(d): float(b) for d, b in zip(self.iou_thresholds, best)},
            "best_threshold": {float(d): float(self.thresholds[int(acc[i].argmax())]) for i, d in enumerate(self.iou_thresholds)},
            "num_images": self.count,
        }


def max_box_acc_v2(maps, gt_boxes, image_sizes, thresholds=DEFAULT_THRESHOLDS, iou_thresholds=DEFAULT_IOUS) -> dict:
    """MaxBoxAccV2 over lists of maps, ground-truth box lists and (H, W) image sizes."""
    if not (len(maps) == len(gt_boxes) == len(image_sizes)):
        raise ValueError(f"got {len(maps)} maps, {len(gt_boxes)} box lists and {len(image_sizes)} image sizes; they must match")
    metric = MaxBoxAccV2(tuple(thresholds), tuple(iou_thresholds))
    for i, (m, b, s) in enumerate(zip(maps, gt_boxes, image_sizes)):
        metric.add(m, b, s, name=f"image {i}")
    return metric.compute()


# ----------------------------------------------------------------------------------------------------------------------
# command line: python -m eval.localization
# ----------------------------------------------------------------------------------------------------------------------
def evaluate_model(model, samples, image_size=None, batch_size=32, map_kind="auto",
                   thresholds=DEFAULT_THRESHOLDS, iou_thresholds=DEFAULT_IOUS, max_size=DEFAULT_MAX_SIZE) -> dict:
    """MaxBoxAccV2 of ``model``'s attention maps over ``samples`` (:class:`eval.locdata.BoxSample`); each map is
    upsampled to its image's original size, where the ground-truth boxes live."""
    map_kind = resolve_map_kind(model, map_kind)
    metric = MaxBoxAccV2(tuple(thresholds), tuple(iou_thresholds))
    for x, meta in locdata.iterate(model, samples, image_size, batch_size, max_size):
        maps = locdata.as_numpy(attention_map(model, x, map_kind))
        for m, (s, size) in zip(maps, meta):
            metric.add(m, s.boxes, size, name=s.name)
    out = metric.compute()
    out["map"] = map_kind
    return out


def format_result(res: dict, title: str = "") -> str:
    ious = "  ".join(f"IoU {d:g}: {v:6.2f} (tau {res['best_threshold'][d]:.2f})" for d, v in res["per_iou"].items())
    head = f"{title}: " if title else ""
    return f"{head}MaxBoxAccV2 {res['maxboxaccv2']:.2f} on {res['num_images']} images ({res['map']} map) | {ious}"


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("python -m eval.localization",
                                description="MaxBoxAccV2 (Choe et al., CVPR 2020) of a backbone's attention maps. "
                                            "Default data: the embedded dataset's val split and its boxes.")
    locdata.add_box_evaluator_args(p, RESULTS_FILE)
    p.add_num_threads_flag()
    p.add_argument("--data_path", default=None, help="image folder (an ImageFolder split or CUB's images/)")
    p.add_argument("--boxes", default=None, help="boxes file: JSON {relpath: [[x0,y0,x1,y1]...]} or CUB bounding_boxes.txt")
    p.add_argument("--boxes_format", default="auto", choices=["auto", "json", "cub"], help="auto: by suffix (.json / .txt)")
    p.add_argument("--images_txt", default=None, help="CUB images.txt (default: beside the boxes file)")
    p.add_argument("--map", default="auto", choices=list(MAP_CHOICES),
                   help="auto: the pooling's map (SimPool), the last block's [CLS] attention head mean (cls), or "
                        "similarity (gap, whose own attention is uniform). similarity: cosine of each location's "
                        "feature with the pooled vector, for any pooling")
    p.add_argument("--threshold_step", default=0.01, type=float, help="spacing of the map thresholds in [0, 1)")
    return p


def load_samples(args) -> list:
    if args.data_path is None:
        if args.boxes:
            raise ValueError("--boxes needs --data_path (the images the boxes refer to)")
        samples = locdata.embedded_samples("val", args.synthetic_size, args.synthetic_per_class,
                                           layout=args.synthetic_layout)
    else:
        if not args.boxes:
            raise ValueError("--data_path needs --boxes (a JSON or CUB bounding_boxes.txt file)")
        fmt = args.boxes_format
        if fmt == "auto":
            fmt = "json" if Path(args.boxes).suffix.lower() == ".json" else "cub"
        if fmt == "json":
            samples = locdata.folder_json_samples(args.data_path, args.boxes)
        else:
            samples = locdata.cub_samples(args.data_path, args.boxes, args.images_txt)
    return locdata.check_samples(samples, args.subset)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def check() -> None:
        if not 0 < args.threshold_step < 1:
            raise ValueError(f"--threshold_step must be in (0, 1); got {args.threshold_step}")

    def evaluate(model, samples) -> dict:
        thresholds = tuple(np.round(np.arange(0.0, 1.0, args.threshold_step), 6).tolist())
        return evaluate_model(model, samples, args.image_size, args.batch_size, args.map, thresholds,
                              max_size=args.max_size)

    return locdata.run_box_evaluator("eval.localization", args, check, load_samples, evaluate, format_result,
                                     RESULTS_FILE)


if __name__ == "__main__":
    sys.exit(main())
