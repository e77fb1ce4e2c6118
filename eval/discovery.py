"""Single-object discovery, CorLoc (the LOST protocol): one box per image, correct when IoU ≥ 0.5 with any
ground-truth box. Boxes come from the attention map (largest connected component after DINO's cumulative-mass
threshold) or from LOST (Siméoni et al., BMVC 2021) on the last block's patch keys.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .boxes import box_iou, check_gt_boxes, largest_component_box


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


def _scale_box(box, grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = grid
    H, W = image_size
    sx, sy = W / w, H / h
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def attention_box(attn, image_size: tuple[int, int], mass: float = 0.6) -> tuple[float, float, float, float]:
    """Box of the largest connected component of the thresholded (h, w) map, in image pixels."""
    attn = np.asarray(attn, dtype=np.float64)
    if attn.ndim != 2:
        raise ValueError(f"an attention map must be 2-D (h, w); got shape {attn.shape}")
    box = largest_component_box(cumulative_mass_mask(attn, mass))
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
