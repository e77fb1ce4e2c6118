"""Boxes: IoU, reading ground-truth box files (JSON, CUB, VOC), and boxes from binary masks.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates with an exclusive end: a box around pixel columns 3..5 is
``(3, y0, 6, y1)``, so its width is ``x1 - x0``. (Choe et al.'s ``wsolevaluation`` instead treats corners as
inclusive and adds 1 to widths and heights in its IoU; LOST uses exclusive ends as here.)
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage

from dino_simpool.data import DataError

Box = tuple[float, float, float, float]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (P, 4) and b (G, 4) → (P, G); areas are (x1 - x0) · (y1 - y0), no +1 pixel."""
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


# connectivity structures for ndimage.label
FOUR = ndimage.generate_binary_structure(2, 1)  # scipy's default; LOST's dino_seg and detect_box
EIGHT = ndimage.generate_binary_structure(2, 2)  # cv2.findContours' borders (MaxBoxAccV2)


def mask_boxes(mask: np.ndarray) -> list[Box]:
    """One box around each 8-connected foreground component: the boxes around all *external* contours that
    ``cv2.findContours`` finds (MaxBoxAccV2). The reference uses ``cv2.RETR_TREE`` and so also boxes the contours of
    holes; a hole's box lies inside its component's box, so it can only add hits on a ground-truth box that fits a
    hole; that is left out here."""
    labels, n = ndimage.label(mask, structure=EIGHT)
    out = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        out.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return out


def largest_component_box(mask: np.ndarray, connectivity: int = 4) -> Box | None:
    """Box of the largest connected component of a binary mask (None when the mask is empty); ties go to the
    component met first in raster order. ``connectivity`` 4 (default: ``scipy.ndimage.label``'s, as LOST's
    ``dino_seg``) or 8 (diagonal neighbours join)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
    labels, n = ndimage.label(mask, structure=FOUR if connectivity == 4 else EIGHT)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    ys, xs = ndimage.find_objects((labels == biggest).astype(np.int32))[0]
    return (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))


def load_boxes_json(path: str | Path) -> dict[str, list[list[float]]]:
    """``{"relative/path.png": [[x0, y0, x1, y1], ...]}``, paths relative to the image root; a single box may also be
    given flat, ``{"x.png": [x0, y0, x1, y1]}``. Every entry is checked: :class:`DataError` names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"boxes file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected {{\"relative/path.png\": [[x0, y0, x1, y1], ...]}}") \
            from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping image paths to lists of [x0, y0, x1, y1]; "
                        f"got a JSON {type(data).__name__}")
    return {key: _json_boxes(value, f"{path}: {key}") for key, value in data.items()}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_boxes(value, where: str) -> list[list[float]]:
    """One image's entry: a list of [x0, y0, x1, y1] boxes, or one flat box."""
    hint = "expected a list of [x0, y0, x1, y1] boxes (pixels, x1/y1 exclusive), e.g. [[10, 20, 50, 60]]"
    if not isinstance(value, list):
        raise DataError(f"{where}: {hint}; got {json.dumps(value)[:60]}")
    if value and all(_is_number(v) for v in value):
        value = [value]  # one flat box
    out = []
    for i, b in enumerate(value):
        if not isinstance(b, list) or len(b) != 4 or not all(_is_number(v) for v in b):
            raise DataError(f"{where}: box {i} is {json.dumps(b)[:60]}; {hint}")
        b = [float(v) for v in b]
        if not all(np.isfinite(b)):
            raise DataError(f"{where}: box {i} {b} is not finite")
        if b[2] <= b[0] or b[3] <= b[1]:
            raise DataError(f"{where}: box {i} {b} is empty (needs x1 > x0 and y1 > y0; boxes are [x0, y0, x1, y1], "
                            f"not [x, y, w, h])")
        out.append(b)
    return out


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


def load_boxes_voc(annotations_dir: str | Path, ids: list[str] | None = None) -> dict[str, list[list[float]]]:
    """VOC XML annotations: one file per image; ``<filename>`` and every ``<object><bndbox>`` (1-based inclusive
    corners, converted to 0-based exclusive-end boxes, as LOST). ``ids``: read only ``<id>.xml`` of these (an image
    set's list), else every ``*.xml``."""
    annotations_dir = Path(annotations_dir)
    if ids is None:
        files = sorted(annotations_dir.glob("*.xml"))
        if not files:
            raise FileNotFoundError(f"no VOC .xml annotations in {annotations_dir}")
    else:
        files = [annotations_dir / f"{i}.xml" for i in ids]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} annotation(s) of the image set are missing from {annotations_dir} "
                                    f"(first: {missing[0].name})")
    out: dict[str, list[list[float]]] = {}
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise DataError(f"{f}: not valid XML ({e})") from None
        name = root.findtext("filename") or f.with_suffix(".jpg").name
        boxes = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            try:
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DataError(f"{f}: a <bndbox> lacks a numeric xmin/ymin/xmax/ymax") from None
            boxes.append([x0 - 1, y0 - 1, x1, y1])
        out[name] = boxes
    return out
