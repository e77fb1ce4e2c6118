"""SyntheticShapes: the embedded, procedurally generated default dataset.

Every image shows one object on a greyish, cluttered background. The object's *shape* is its class; position, scale
and rotation are drawn independently of the class. The object's appearance carries class cues too, with variation:

Class cues (``_class_appearance``)
    * hue: class ``c`` (its index in ``SHAPES``) is painted around hue ``c / 10`` (+-0.03, uniform), with random
      saturation (0.55..1) and value (0.6..1); the second texture colour is a darker shade of the first;
    * texture: with probability 0.75 the class texture ``TEXTURES[c % 4]``, otherwise a uniformly drawn one; the
      texture period is a fixed per-class value in [0.06, 0.16) of the image side (angle and phase stay random);
    * background: a grey level uniform in [0.3, 0.7] with a small colour tint (+-0.06 per channel), plus the
      class-independent clutter (smooth colour field, faint lines and blobs) and pixel noise.
    So colour and texture are informative but not sufficient: hues of neighbouring classes are 0.1 apart, and DINO's
    colour jitter (hue +-0.1, grayscale p=0.2) blurs that cue during pretraining, so shape still matters. These cues
    make the tiny CPU demo (``python -m eval.demo``) learnable in minutes; with class-independent colours DINO's
    k-NN accuracy stayed at chance there.

Determinism
    Image ``i`` of a dataset has class ``c = i // images_per_class`` and in-class index ``j = i % images_per_class``
    (class-major order, the same order an ImageFolder export is read back in). Its pixels are a pure function of
    ``(split, seed, c, j, image_size)``: a fresh ``numpy.random.Generator`` seeded with ``(seed, split, c, j)``
    draws the scene (resolution-independent, in normalised coordinates) and then the pixel noise. So, for a fixed
    ``images_per_class``, image ``i`` is a pure function of ``(split, seed, i, image_size)``; growing
    ``images_per_class`` keeps every earlier ``(c, j)`` image unchanged, and the same ``(c, j)`` at another
    ``image_size`` shows the same scene at another resolution. The train and val splits use different seeds.

Layouts (``layout=``)
    ``"default"``: the above; objects are large (disk radius 0.2-0.4 of the side), so a centred Gaussian map
    already scores MaxBoxAccV2 ~48 (val, 32 px). ``"cluttered"``, for localization: the same classes, class cues
    and object pixels, but the object is moved and rescaled (centre uniform over the image, disk radius log-uniform
    in 0.08-0.22, always fully inside) and painted over a full-image distractor texture (stripes, checker or dots
    in two random colours at 25-50 % opacity) and 4-8 clutter shapes (hexagon, pentagon, bar, trapezoid: never a
    class shape; random colour, size 0.04-0.14, anywhere, partly outside the image). Those draws come from a
    second generator seeded ``(seed, split, c, j, 1)``, so the default layout's random stream, images and boxes
    are bit-identical to what they were before the option existed. The box is still the object's exact box
    (clutter is painted under the object). A centred Gaussian scores MaxBoxAccV2 ~5 there (val, 32 px).

Boxes
    ``boxes[i]`` is a list with one box ``[x0, y0, x1, y1]`` (ints, pixels of the generated image). ``x0, y0`` are
    inclusive and ``x1, y1`` *exclusive* (half-open, like Python slices: the box covers ``img[y0:y1, x0:x1]``,
    width ``x1 - x0``), which equals the continuous box around the object pixels when pixel ``(x, y)`` spans
    ``[x, x+1) x [y, y+1)``. The box is the tight box of the object pixels: pixels whose anti-aliased object coverage
    is > 0.5.

Exported layout (``export_imagefolder(root)``)
    ``root/<split>/<class>/<j:05d>.png`` plus ``root/boxes.json``, a plain JSON object mapping the image path
    relative to ``root`` (forward slashes) to its list of boxes in the convention above, e.g.
    ``{"val/circle/00000.png": [[12, 20, 41, 50]], ...}``. Exporting a second split into the same root merges
    into the existing ``boxes.json``.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from functools import lru_cache

import numpy as np
from PIL import Image

from . import DataError

# The 10 shapes, in the order ``num_classes`` takes them; a dataset's ``classes`` are its shapes sorted by name
# (ImageFolder order), so an exported copy read back with SafeImageFolder has the same labels.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "ellipse", "diamond", "crescent", "lshape")
SPLITS = {"train": 0, "val": 1}
DEFAULT_IMAGES_PER_CLASS = {"train": 200, "val": 50}
TEXTURES = ("flat", "stripes", "checker", "dots")

# Scene ranges, in units of the image side.
_RADIUS = (0.20, 0.40)      # radius of the disk that contains the object
_MARGIN = 0.02              # gap between that disk and the image border
_ROTATION = math.pi / 4     # rotation uniform in [-45, 45] degrees
_MIN_COLOR_DIST = 0.35      # RGB distance (0..1 scale) between object colours and the background base colour
# Class cues (see the module docstring).
_HUE_JITTER = 0.03          # object hue = class / 10 +- this
_CLASS_TEXTURE_P = 0.75     # probability that the object wears its class texture
_BG_GREY = (0.3, 0.7)       # background grey level range
_BG_TINT = 0.06             # +- colour tint of the background, per channel
# The cluttered layout (``layout="cluttered"``, see the module docstring).
LAYOUTS = ("default", "cluttered")
_CLUTTER_RADIUS = (0.08, 0.22)        # object radius, log-uniform: small to medium objects
_CLUTTER_TEX_CONTRAST = (0.25, 0.5)   # opacity of the full-image distractor texture
_CLUTTER_N = (4, 8)                   # number of clutter shapes (inclusive)
_CLUTTER_SIZE = (0.04, 0.14)          # their radius
CLUTTER_SHAPES = ("hexagon", "pentagon", "bar", "trapezoid")  # none of them is a class shape


# ----------------------------------------------------------------------------------------------------------------
# Shapes: signed distance functions in the object's local frame (unit disk), negative inside.
def _length(u, v):
    return np.sqrt(u * u + v * v)


def _box(u, v, hx, hy):
    dx = np.abs(u) - hx
    dy = np.abs(v) - hy
    return _length(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)


def _regular_polygon(u, v, n, circumradius):
    inradius = circumradius * math.cos(math.pi / n)
    d = None
    for k in range(n):
        a = -math.pi / 2 + math.pi / n + 2 * math.pi * k / n  # edge normals; a vertex points up (negative v)
        e = u * math.cos(a) + v * math.sin(a)
        d = e if d is None else np.maximum(d, e)
    return d - inradius


_K1 = (0.809016994375, -0.587785252292)


def _star5(u, v, r=0.95, rf=0.45):
    # Inigo Quilez's exact 5-point star SDF, vectorised.
    k1x, k1y = _K1
    k2x, k2y = -k1x, k1y
    px = np.abs(u)
    py = v.copy()
    t = 2.0 * np.maximum(k1x * px + k1y * py, 0)
    px = px - t * k1x
    py = py - t * k1y
    t = 2.0 * np.maximum(k2x * px + k2y * py, 0)
    px = px - t * k2x
    py = py - t * k2y
    px = np.abs(px)
    py = py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0.0, r)
    return _length(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


def _sdf(shape, u, v):
    if shape == "circle":
        return _length(u, v) - 0.95
    if shape == "square":
        return _box(u, v, 0.67, 0.67)
    if shape == "triangle":
        return _regular_polygon(u, v, 3, 0.97)
    if shape == "star":
        return _star5(u, -v)  # iq's star points along +y; image rows grow downwards
    if shape == "cross":
        return np.minimum(_box(u, v, 0.9, 0.28), _box(u, v, 0.28, 0.9))
    if shape == "ring":
        return np.abs(_length(u, v) - 0.7) - 0.24
    if shape == "ellipse":
        a, b = 0.95, 0.48
        return (_length(u / a, v / b) - 1.0) * b
    if shape == "diamond":
        a, b = 0.52, 0.95
        return (np.abs(u) / a + np.abs(v) / b - 1.0) / math.sqrt(1 / a ** 2 + 1 / b ** 2)
    if shape == "crescent":
        return np.maximum(_length(u, v) - 0.95, 0.72 - _length(u - 0.42, v))
    if shape == "lshape":
        return np.minimum(_box(u + 0.33, v, 0.23, 0.75), _box(u - 0.05, v - 0.53, 0.61, 0.22))
    # clutter shapes (never an object)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6, 0.95)
    if shape == "pentagon":
        return _regular_polygon(u, v, 5, 0.95)
    if shape == "bar":
        return _box(u, v, 0.95, 0.16)
    if shape == "trapezoid":  # a box whose width shrinks upwards
        return np.maximum(_box(u, v, 0.9, 0.45), np.abs(u) - 0.9 + 0.5 * (0.45 - v))
    raise KeyError(shape)


# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _grid(size):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@lru_cache(maxsize=16)
def _upsample_matrix(size, k):
    """(size, k) bilinear interpolation weights from a k-point grid spanning the image to `size` pixel centres."""
    pos = ((np.arange(size) + 0.5) / size) * (k - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((size, k), np.float32)
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] = w
    return m


def _first_far_color(cands, avoid, min_dist):
    """First candidate colour at RGB distance >= min_dist from every colour in `avoid` (else the last one)."""
    ok = np.ones(len(cands), bool)
    for a in avoid:
        ok &= ((cands - a) ** 2).sum(1) >= min_dist * min_dist
    k = int(np.argmax(ok)) if ok.any() else len(cands) - 1
    return cands[k]


def _draw_scene(rng, shape):
    """All random scene parameters, in normalised coordinates: independent of the image size.

    Draws one fixed block of random numbers (fast, and the stream layout is the same for every image)."""
    u = rng.random(128)
    s = {"shape": shape}
    r = _RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * u[0]
    s["radius"] = r
    s["center"] = r + _MARGIN + (1 - 2 * (r + _MARGIN)) * u[1:3]
    s["angle"] = _ROTATION * (2 * u[3] - 1)
    s["texture"] = TEXTURES[min(int(u[4] * len(TEXTURES)), len(TEXTURES) - 1)]
    s["tex_angle"] = math.pi * u[5]
    s["tex_period"] = 0.06 + 0.10 * u[6]
    s["tex_phase"] = u[7:9]
    bg = 0.1 + 0.8 * u[9:12]
    s["bg"] = bg
    a = _first_far_color(u[12:42].reshape(10, 3), [bg], _MIN_COLOR_DIST)
    b = _first_far_color(u[42:72].reshape(10, 3), [bg, a], _MIN_COLOR_DIST * 0.8)
    s["fg"] = (a, b)
    # Clutter: a smooth low-contrast colour field, 1-3 faint lines and 1-3 faint blobs.
    s["field"] = (rng.random((6, 6, 3)) - 0.5) * 0.25
    n_lines = 1 + min(int(u[72] * 3), 2)
    s["lines"] = [(math.pi * u[73 + 6 * k], -0.2 + 1.4 * u[74 + 6 * k], 0.006 + 0.014 * u[75 + 6 * k],
                   (u[76 + 6 * k: 79 + 6 * k] - 0.5) * 0.3) for k in range(n_lines)]
    n_blobs = 1 + min(int(u[91] * 3), 2)
    s["blobs"] = [(u[92 + 6 * k: 94 + 6 * k], 0.04 + 0.08 * u[94 + 6 * k], (u[95 + 6 * k: 98 + 6 * k] - 0.5) * 0.25)
                  for k in range(n_blobs)]
    s["noise"] = 0.01 + 0.03 * u[110]
    _class_appearance(s, SHAPES.index(shape), u[111:120])
    return s


def _class_appearance(s, c, u):
    """Overwrite the scene's background, object colours and texture with the class cues of class index ``c`` (see
    the module docstring), from 9 uniform numbers ``u``. Only the scene dict changes, not the random stream."""
    s["bg"] = np.clip(_BG_GREY[0] + (_BG_GREY[1] - _BG_GREY[0]) * u[0] + (2 * u[1:4] - 1) * _BG_TINT, 0.0, 1.0)
    hue = (c / len(SHAPES) + (2 * u[4] - 1) * _HUE_JITTER) % 1.0
    a = np.array(colorsys.hsv_to_rgb(hue, 0.55 + 0.45 * u[5], 0.6 + 0.4 * u[6]))
    s["fg"] = (a, a * (0.35 + 0.2 * u[7]))
    if u[8] < _CLASS_TEXTURE_P:
        s["texture"] = TEXTURES[c % len(TEXTURES)]
    s["tex_period"] = 0.06 + 0.10 * ((c * 0.37) % 1)


def _clutter_scene(s, rng):
    """The cluttered layout: move and rescale the object (uniform position, log-uniform radius in
    ``_CLUTTER_RADIUS``, fully inside the image) and add a full-image distractor texture and clutter shapes, all
    drawn from ``rng`` (a stream of its own, so the default scene's numbers stay as they are)."""
    u = rng.random(16)
    lo, hi = _CLUTTER_RADIUS
    r = lo * (hi / lo) ** u[0]
    s["radius"] = r
    s["center"] = r + _MARGIN + (1 - 2 * (r + _MARGIN)) * u[1:3]
    s["distractor"] = dict(texture=TEXTURES[1 + min(int(u[3] * 3), 2)], angle=math.pi * u[4],
                           period=0.04 + 0.08 * u[5], phase=u[6:8], colors=(_random_color(rng), _random_color(rng)),
                           alpha=_CLUTTER_TEX_CONTRAST[0] + (_CLUTTER_TEX_CONTRAST[1] - _CLUTTER_TEX_CONTRAST[0]) * u[8])
    n = _CLUTTER_N[0] + min(int(u[9] * (_CLUTTER_N[1] - _CLUTTER_N[0] + 1)), _CLUTTER_N[1] - _CLUTTER_N[0])
    clutter = []
    for _ in range(n):
        v = rng.random(8)
        clutter.append(dict(shape=CLUTTER_SHAPES[min(int(v[0] * len(CLUTTER_SHAPES)), len(CLUTTER_SHAPES) - 1)],
                            radius=_CLUTTER_SIZE[0] + (_CLUTTER_SIZE[1] - _CLUTTER_SIZE[0]) * v[1],
                            center=v[2:4] * 1.1 - 0.05, angle=math.pi * (2 * v[4] - 1),
                            color=_random_color(rng), texture=TEXTURES[min(int(v[5] * len(TEXTURES)), 3)],
                            tex_angle=math.pi * v[6], tex_period=0.04 + 0.08 * v[7], tex_phase=(v[6], v[7])))
    s["clutter"] = clutter


def _random_color(rng):
    """An RGB colour of any hue (saturation 0.3..0.9, value 0.4..1): clutter carries no class cue."""
    h, sat, val = rng.random(3)
    return np.array(colorsys.hsv_to_rgb(h, 0.3 + 0.6 * sat, 0.4 + 0.6 * val))


def _shape_coverage(shape, center, radius, angle, size):
    """Anti-aliased coverage in [0, 1], (size, size) float32, of ``shape`` at ``center`` (normalised units)."""
    gx, gy = _grid(size)
    r = radius
    cx, cy = center
    ca, sa = math.cos(angle), math.sin(angle)
    dx = (gx - np.float32(cx)) * np.float32(1 / r)
    dy = (gy - np.float32(cy)) * np.float32(1 / r)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    d = _sdf(shape, u, v) * np.float32(r * size)  # signed distance in pixels
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32, copy=False)


def _coverage(scene, size):
    """Anti-aliased object coverage in [0, 1], (size, size) float32."""
    return _shape_coverage(scene["shape"], scene["center"], scene["radius"], scene["angle"], size)


def _pattern(tex, angle, period, phase, size):
    """Texture pattern p in {0, 1} (bool (size, size)), or None for ``flat``."""
    if tex == "flat":
        return None
    gx, gy = _grid(size)
    f32 = np.float32
    ca, sa = math.cos(angle), math.sin(angle)
    inv = 1.0 / period
    tu = gx * f32(ca * inv) + gy * f32(sa * inv) + f32(phase[0])
    if tex == "stripes":
        return (tu - np.floor(tu)) < 0.5
    tv = gx * f32(-sa * inv) + gy * f32(ca * inv) + f32(phase[1])
    if tex == "checker":
        return ((np.floor(tu) + np.floor(tv)) % 2) > 0.5
    fu = tu - np.floor(tu) - f32(0.5)
    fv = tv - np.floor(tv) - f32(0.5)
    return (fu * fu + fv * fv) < 0.09  # dots


def _add_clutter(bg, scene, size):
    """Paint the cluttered layout's distractor texture and clutter shapes onto ``bg`` (3, size, size), in place."""
    f32 = np.float32
    dis = scene["distractor"]
    p = _pattern(dis["texture"], dis["angle"], dis["period"], dis["phase"], size)
    c0, c1 = (c.astype(f32)[:, None, None] for c in dis["colors"])
    tex = c0 + p.astype(f32)[None] * (c1 - c0)
    bg += f32(dis["alpha"]) * (tex - bg)
    for cl in scene["clutter"]:
        a = _shape_coverage(cl["shape"], cl["center"], cl["radius"], cl["angle"], size)
        col = cl["color"].astype(f32)[:, None, None]
        p = _pattern(cl["texture"], cl["tex_angle"], cl["tex_period"], cl["tex_phase"], size)
        fg = col if p is None else col * (1 - f32(0.4) * p.astype(f32)[None])
        bg += a[None] * (fg - bg)


def _render(scene, rng, size):
    """-> (uint8 (size, size, 3), coverage). Works channel-first (3, H, W) float32: fast numpy broadcasting."""
    gx, gy = _grid(size)
    alpha = _coverage(scene, size)
    f32 = np.float32
    # Background: base colour + a smooth low-contrast colour field (bilinear upsampling of a 6x6 grid).
    m = _upsample_matrix(size, 6)
    field = scene["field"].astype(f32).transpose(2, 0, 1)      # (3, 6, 6)
    bg = m[None] @ field @ m.T[None]                            # (3, size, size)
    bg += scene["bg"].astype(f32)[:, None, None]
    for ang, off, width, col in scene["lines"]:
        dist = np.abs(gx * f32(math.cos(ang)) + gy * f32(math.sin(ang)) - f32(off)) * f32(size)
        w = np.clip(f32(width * size + 0.5) - dist, 0, 1)
        bg += w[None] * col.astype(f32)[:, None, None]
    for (bx, by), br, col in scene["blobs"]:
        d2 = ((gx - f32(bx)) ** 2 + (gy - f32(by)) ** 2) * f32(-1.0 / (br * br))
        bg += np.exp(d2)[None] * col.astype(f32)[:, None, None]
    if "clutter" in scene:  # the cluttered layout only; the default scene has no such key
        _add_clutter(bg, scene, size)
    # Object texture: pattern p in {0, 1} mixes the two object colours a and b.
    a, b = (c.astype(f32)[:, None, None] for c in scene["fg"])
    tex = scene["texture"]
    if tex == "flat":
        fg = a
    else:
        ca, sa = math.cos(scene["tex_angle"]), math.sin(scene["tex_angle"])
        inv = 1.0 / scene["tex_period"]
        tu = gx * f32(ca * inv) + gy * f32(sa * inv) + f32(scene["tex_phase"][0])
        if tex == "stripes":
            p = (tu - np.floor(tu)) < 0.5
        else:
            tv = gx * f32(-sa * inv) + gy * f32(ca * inv) + f32(scene["tex_phase"][1])
            if tex == "checker":
                p = ((np.floor(tu) + np.floor(tv)) % 2) > 0.5
            else:  # dots
                fu = tu - np.floor(tu) - f32(0.5)
                fv = tv - np.floor(tv) - f32(0.5)
                p = (fu * fu + fv * fv) < 0.09
        fg = a + p.astype(f32)[None] * (b - a)
    img = bg + alpha[None] * (fg - bg)
    # Pixel noise (uniform, std = scene["noise"]): drawn last, so the scene itself does not depend on the size.
    noise = rng.random((3, size, size), dtype=f32)
    img += (noise - f32(0.5)) * f32(scene["noise"] * math.sqrt(12.0))
    img *= f32(255.0)
    img += f32(0.5)
    np.clip(img, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0)), alpha


def _box_from_alpha(alpha):
    mask = alpha > 0.5
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:  # cannot happen with the radius range above at image_size >= 16
        return [0, 0, alpha.shape[1], alpha.shape[0]]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


class SyntheticShapes:
    """Embedded procedural dataset: ``num_classes`` shape classes, ``images_per_class`` images each.

    Args:
        split: "train" or "val" (different random streams).
        image_size: side of the square RGB images, in pixels (>= 16).
        images_per_class: images per class; default 200 for train, 50 for val.
        num_classes: number of classes (2..10): the first ``num_classes`` of ``SHAPES``, sorted by name.
        seed: dataset seed.
        transform: applied to the PIL image in ``__getitem__``.
        layout: ``"default"`` (large objects, a faint background) or ``"cluttered"`` (small to medium objects
            anywhere, on a distractor texture with clutter shapes: see the module docstring), for localization.
        cache_mib: rendered images kept in memory by ``__getitem__``, per process (rendering is deterministic, so
            only the time changes: a 64 px image costs ~0.5 ms to render, a quarter of the demo's data pipeline).
            Images are added until the budget is full; 0 turns the cache off. It is not pickled to loader workers.
    """

    def __init__(self, split="train", image_size=64, images_per_class=None, num_classes=len(SHAPES), seed=0,
                 transform=None, cache_mib: float = 128, layout: str = "default"):
        if split not in SPLITS:
            raise DataError(f"SyntheticShapes split must be one of {sorted(SPLITS)}, got {split!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"SyntheticShapes layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        if images_per_class is None:
            images_per_class = DEFAULT_IMAGES_PER_CLASS[split]
        if int(image_size) != image_size or image_size < 16:
            raise ValueError(f"SyntheticShapes image_size must be an integer >= 16, got {image_size!r}")
        if int(images_per_class) != images_per_class or images_per_class < 1:
            raise ValueError(f"SyntheticShapes images_per_class must be a positive integer, got {images_per_class!r}")
        if int(num_classes) != num_classes or not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"SyntheticShapes num_classes must be in 2..{len(SHAPES)}, got {num_classes!r}")
        self.split = split
        self.image_size = int(image_size)
        self.images_per_class = int(images_per_class)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.layout = layout
        self.transform = transform
        self.classes = sorted(SHAPES[: self.num_classes])
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.targets = [i // self.images_per_class for i in range(len(self))]
        self._boxes = None
        self.cache_bytes = int(cache_mib * 2**20)
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = {}, 0  # each process fills its own
        return state

    def __len__(self):
        return self.num_classes * self.images_per_class

    def __repr__(self):
        layout = "" if self.layout == "default" else f", layout={self.layout!r}"
        return (f"SyntheticShapes(split={self.split!r}, image_size={self.image_size}, "
                f"images_per_class={self.images_per_class}, num_classes={self.num_classes}, seed={self.seed}{layout})")

    # -- generation --------------------------------------------------------------------------------------------
    def _check_index(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self!r} of length {n}")
        return i % n

    def _rng_scene(self, i):
        i = self._check_index(int(i))
        c, j = divmod(i, self.images_per_class)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], c, j])
        scene = _draw_scene(rng, self.classes[c])
        if self.layout == "cluttered":
            _clutter_scene(scene, np.random.default_rng([self.seed, SPLITS[self.split], c, j, 1]))
        return rng, scene, c

    def render(self, i):
        """-> (uint8 array (H, W, 3), label, box [x0, y0, x1, y1]) for image i."""
        rng, scene, c = self._rng_scene(i)
        img, alpha = _render(scene, rng, self.image_size)
        return img, c, _box_from_alpha(alpha)

    def coverage(self, i):
        """Anti-aliased object coverage map (H, W) float32 in [0, 1] of image i (the object mask)."""
        _, scene, _ = self._rng_scene(i)
        return _coverage(scene, self.image_size)

    def image(self, i):
        """Image i as an RGB PIL image."""
        return Image.fromarray(self.render(i)[0], "RGB")

    def box(self, i):
        """The boxes of image i: ``[[x0, y0, x1, y1]]`` (x1, y1 exclusive)."""
        if self._boxes is not None:
            return [list(b) for b in self._boxes[self._check_index(int(i))]]
        return [_box_from_alpha(self.coverage(i))]

    @property
    def boxes(self):
        """List (one entry per image) of lists of boxes ``[x0, y0, x1, y1]`` (x1, y1 exclusive). Computed once."""
        if self._boxes is None:
            self._boxes = [[_box_from_alpha(self.coverage(i))] for i in range(len(self))]
        return self._boxes

    def _cached_render(self, i: int) -> np.ndarray:
        arr = self._cache.get(i)
        if arr is None:
            arr = self.render(i)[0]
            if self._cached_bytes + arr.nbytes <= self.cache_bytes:
                arr.setflags(write=False)  # shared by every later call
                self._cache[i] = arr
                self._cached_bytes += arr.nbytes
        return arr

    def __getitem__(self, i):
        i = self._check_index(int(i))
        img = Image.fromarray(self._cached_render(i), "RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    # -- export ------------------------------------------------------------------------------------------------
    def export_imagefolder(self, root):
        """Write ``root/<split>/<class>/<j:05d>.png`` and merge this split's boxes into ``root/boxes.json``.

        Returns the path of ``boxes.json``. See the module docstring for the JSON format.
        """
        root = os.fspath(root)
        for cls in self.classes:
            os.makedirs(os.path.join(root, self.split, cls), exist_ok=True)
        boxes_path = os.path.join(root, "boxes.json")
        boxes = {}
        if os.path.exists(boxes_path):
            with open(boxes_path) as fh:
                boxes = json.load(fh)
        for i in range(len(self)):
            img, c, box = self.render(i)
            rel = f"{self.split}/{self.classes[c]}/{i % self.images_per_class:05d}.png"
            Image.fromarray(img, "RGB").save(os.path.join(root, *rel.split("/")))
            boxes[rel] = [box]
        tmp = boxes_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(boxes, fh, sort_keys=True)
        os.replace(tmp, boxes_path)
        return boxes_path


def load_boxes_json(path):
    """Read a ``boxes.json`` written by ``export_imagefolder``: ``{relpath: [[x0, y0, x1, y1], ...]}``."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"boxes file {path} does not exist; export it with SyntheticShapes.export_imagefolder "
                        f"or pass the right path") from None
    except json.JSONDecodeError as e:
        raise DataError(f"boxes file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"boxes file {path} must hold a JSON object {{\"<split>/<class>/<file>\": [[x0,y0,x1,y1]]}}")
    return {k: [list(map(int, b)) for b in v] for k, v in data.items()}


def sample_grid(ds, cols=4, scale=2, boxed_from=None):
    """A PIL picture: one row per class (name on the left), ``cols`` images each, upscaled ``scale``x; images from
    column ``boxed_from`` on (default: the right half) show their ground-truth box in yellow."""
    from PIL import ImageDraw

    boxed_from = cols // 2 if boxed_from is None else boxed_from
    cols = min(cols, ds.images_per_class)
    s, pad, left = ds.image_size * scale, 2, 70
    canvas = Image.new("RGB", (left + cols * (s + pad), ds.num_classes * (s + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(ds.classes):
        y = c * (s + pad)
        draw.text((4, y + s // 2 - 6), name, fill=(0, 0, 0))
        for j in range(cols):
            i = c * ds.images_per_class + j
            x = left + j * (s + pad)
            canvas.paste(ds.image(i).resize((s, s), Image.NEAREST), (x, y))
            if j >= boxed_from:
                x0, y0, x1, y1 = ds.box(i)[0]
                draw.rectangle([x + x0 * scale, y + y0 * scale, x + x1 * scale - 1, y + y1 * scale - 1],
                               outline=(255, 255, 0))
    return canvas


if __name__ == "__main__":  # python -m dino_simpool.data.synthetic docs/images/synthetic_grid.png
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_grid.png"
    sample_grid(SyntheticShapes("train", image_size=64, images_per_class=4)).save(out, optimize=True)
    print(out)
