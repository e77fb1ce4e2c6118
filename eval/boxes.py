"""Boxes: IoU, reading ground-truth box files (JSON, CUB, VOC), and boxes from binary masks.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates with an exclusive end: a box around pixel columns 3..5 is
``(3, y0, 6, y1)``, so its width is ``x1 - x0``.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (P, 4) and b (G, 4) → (P, G)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def check_gt_boxes(boxes, what: str = "image") -> np.ndarray:
    """Validate one image's ground-truth boxes: a non-empty list of (x0, y0, x1, y1) with x1 > x0, y1 > y0."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{what} has no ground-truth box; every evaluated image needs at least one")
    arr = arr.reshape(-1, 4)
    bad = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
    if bad.any():
        raise ValueError(f"{what} has a degenerate box {arr[bad][0].tolist()}; boxes are (x0, y0, x1, y1) with x1 > x0, y1 > y0")
    return arr


def mask_boxes(mask: np.ndarray) -> list[Box]:
    """One box around each 8-connected foreground component (the boxes around all external contours)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    out = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        out.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return out


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Box of the largest 8-connected component of a binary mask (None when the mask is empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    ys, xs = ndimage.find_objects((labels == biggest).astype(np.int32))[0]
    return (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))


def load_boxes_json(path: str | Path) -> dict[str, list[list[float]]]:
    """``{"relative/path.png": [[x0, y0, x1, y1], ...]}``, paths relative to the image root."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"boxes file not found: {path}")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image paths to lists of [x0, y0, x1, y1]")
    return {k: [list(map(float, b)) for b in v] for k, v in data.items()}


def load_boxes_cub(bounding_boxes_txt: str | Path, images_txt: str | Path) -> dict[str, list[list[float]]]:
    """CUB-200-2011: ``bounding_boxes.txt`` lines ``<id> <x> <y> <w> <h>`` joined with ``images.txt`` (``<id> <path>``)."""
    id_to_path = {}
    for line in Path(images_txt).read_text().splitlines():
        if line.strip():
            i, p = line.split(maxsplit=1)
            id_to_path[i] = p.strip()
    out: dict[str, list[list[float]]] = {}
    for line in Path(bounding_boxes_txt).read_text().splitlines():
        if not line.strip():
            continue
        i, x, y, w, h = line.split()
        if i not in id_to_path:
            raise ValueError(f"{bounding_boxes_txt}: image id {i} is not in {images_txt}")
        x, y, w, h = map(float, (x, y, w, h))
        out.setdefault(id_to_path[i], []).append([x, y, x + w, y + h])
    return out


def load_boxes_voc(annotations_dir: str | Path) -> dict[str, list[list[float]]]:
    """VOC XML annotations: one file per image; ``<filename>`` and every ``<object><bndbox>`` (1-based inclusive
    corners, converted to 0-based exclusive-end boxes)."""
    annotations_dir = Path(annotations_dir)
    files = sorted(annotations_dir.glob("*.xml"))
    if not files:
        raise FileNotFoundError(f"no VOC .xml annotations in {annotations_dir}")
    out: dict[str, list[list[float]]] = {}
    for f in files:
        root = ET.parse(f).getroot()
        name = root.findtext("filename") or f.with_suffix(".jpg").name
        boxes = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x0 - 1, y0 - 1, x1, y1])
        out[name] = boxes
    return out
