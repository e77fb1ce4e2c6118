"""MaxBoxAccV2 (Choe et al., CVPR 2020): weakly-supervised localization from attention maps.

For each image: upsample the map to the image size, normalise it min-max, and at every threshold τ take a box
around each connected foreground region (the boxes around all contours). An image is correct at IoU δ when any
box hits any ground-truth box. BoxAcc(τ, δ) is the fraction of correct images; MaxBoxAccV2 is the mean over
δ ∈ {0.3, 0.5, 0.7} of max_τ BoxAcc(τ, δ).

Thresholding follows the reference evaluator: the normalised map is quantised to 8 bits and a pixel is foreground
when its value is strictly above ``int(τ · max)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .boxes import box_iou, check_gt_boxes, mask_boxes

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0, 0.01), 2).tolist())
DEFAULT_IOUS = (0.3, 0.5, 0.7)


def upsample_map(attn, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to the image size (H, W), as a float64 array."""
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
