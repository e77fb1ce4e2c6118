import colorsys
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_simpool.data import (SHAPES, DataError, IndexedDataset, SafeImageFolder, SyntheticShapes, build_dataset,
                               load_boxes_json)
from dino_simpool.data.synthetic import sample_grid
from eval.localization import max_box_acc_v2
from eval.locdata import embedded_samples




# ------------------------------------------------------------------------------------------------ SyntheticShapes
def test_determinism_and_splits():
    a = SyntheticShapes("train", image_size=32, images_per_class=3)
    b = SyntheticShapes("train", image_size=32, images_per_class=3)
    v = SyntheticShapes("val", image_size=32, images_per_class=3)
    s1 = SyntheticShapes("train", image_size=32, images_per_class=3, seed=1)
    for i in (0, 4, 29):
        x = np.asarray(a.image(i))
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8
        assert np.array_equal(x, np.asarray(b.image(i)))          # same index -> same pixels
        assert np.array_equal(x, np.asarray(a.image(i)))          # and again from the same object
        assert not np.array_equal(x, np.asarray(v.image(i)))      # other split differs
        assert not np.array_equal(x, np.asarray(s1.image(i)))     # other seed differs
    # (class, j) images do not depend on images_per_class: image j of class c is a prefix-stable function
    big = SyntheticShapes("train", image_size=32, images_per_class=5)
    assert np.array_equal(np.asarray(a.image(3 + 1)), np.asarray(big.image(5 + 1)))
    assert a.boxes[4] == big.boxes[6]


def test_same_scene_at_other_sizes():
    s = SyntheticShapes("val", image_size=32, images_per_class=2)
    l = SyntheticShapes("val", image_size=64, images_per_class=2)
    for i in range(len(s)):
        bs, bl = np.array(s.boxes[i][0]), np.array(l.boxes[i][0])
        assert np.abs(2 * bs - bl).max() <= 2


def test_api_balance_and_labels():
    ds = SyntheticShapes("train", image_size=32, images_per_class=4, num_classes=5)
    assert len(ds) == 20 and ds.classes == sorted(ds.classes) and set(ds.classes) == set(SHAPES[:5])
    assert np.bincount(ds.targets).tolist() == [4] * 5
    img, label = ds[7]
    assert isinstance(img, Image.Image) and label == ds.targets[7] == 1
    ds.transform = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)
    x, label = ds[-1]
    assert x.shape == (3, 32, 32) and label == 4
    with pytest.raises(IndexError):
        ds[20]
    assert len(SyntheticShapes("val").classes) == 10
    for bad in (dict(image_size=8), dict(images_per_class=0), dict(num_classes=11), dict(num_classes=1)):
        with pytest.raises(ValueError):
            SyntheticShapes("train", **bad)
    with pytest.raises(DataError, match="split"):
        SyntheticShapes("test")


def test_boxes_inside_and_tight():
    ds = SyntheticShapes("val", image_size=48, images_per_class=3)
    assert len(ds.boxes) == len(ds)
    for i in range(len(ds)):
        (x0, y0, x1, y1), = ds.boxes[i]
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        mask = ds.coverage(i) > 0.5
        ys, xs = np.nonzero(mask)
        # every object pixel is inside the (x1, y1 exclusive) box ...
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        # ... and the box is tight: each of its four border lines touches the object
        assert xs.min() == x0 and xs.max() == x1 - 1 and ys.min() == y0 and ys.max() == y1 - 1
        # objects are sizeable and never touch the image border
        assert (x1 - x0) * (y1 - y0) >= 0.04 * 48 * 48
        assert ds.box(i) == ds.boxes[i] and ds.render(i)[2] == ds.boxes[i][0]


def _box_crop_edges(ds, i, out=12):
    img, _, (x0, y0, x1, y1) = ds.render(i)
    g = img.astype(np.float32).mean(2)
    e = np.hypot(np.diff(g, axis=1)[:-1], np.diff(g, axis=0)[:, :-1])
    crop = e[y0:max(y1 - 1, y0 + 1), x0:max(x1 - 1, x0 + 1)]
    return np.asarray(Image.fromarray(crop).resize((out, out), Image.BILINEAR)).ravel()


def _ridge_accuracy(xt, yt, xv, yv, k, lam=10.0):
    """Linear least-squares (ridge) classifier on one-hot targets: one small solve, no iterations."""
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt = np.hstack([(xt - mu) / sd, np.ones((len(xt), 1))]).astype(np.float64)
    xv = np.hstack([(xv - mu) / sd, np.ones((len(xv), 1))]).astype(np.float64)
    w = np.linalg.solve(xt.T @ xt + lam * np.eye(xt.shape[1]), xt.T @ np.eye(k)[yt])
    return float(((xv @ w).argmax(1) == yv).mean())


def _colour_features(imgs, masks=None):
    """Per-image mean colour and a coarse joint colour histogram (of the pixels in ``masks`` when given)."""
    out = []
    for k, im in enumerate(imgs):
        px = im.reshape(-1, 3) if masks is None else im[masks[k]]
        q = (px // 86).astype(np.int64)
        hist = np.bincount(q[:, 0] * 9 + q[:, 1] * 3 + q[:, 2], minlength=27) / q.shape[0]
        out.append(np.concatenate([px.mean(0) / 255, hist]))
    return np.stack(out).astype(np.float32)


def test_shape_and_appearance_are_class_signals():
    """Shape separates the classes (edge map inside the box, linear classifier); the object's colour is a class cue
    (its mean hue sits within +-0.05 of class_index / 10), while the background alone says nothing about the class."""
    tr = SyntheticShapes("train", image_size=32, images_per_class=25)
    va = SyntheticShapes("val", image_size=32, images_per_class=12)
    yt, yv = np.array(tr.targets), np.array(va.targets)
    shape_t = np.stack([_box_crop_edges(tr, i) for i in range(len(tr))]).astype(np.float32)
    shape_v = np.stack([_box_crop_edges(va, i) for i in range(len(va))]).astype(np.float32)
    acc_shape = _ridge_accuracy(shape_t, yt, shape_v, yv, 10)

    def split(ds):  # renders, background masks (object coverage < 0.5 and away from the object's rim)
        imgs = [ds.render(i)[0] for i in range(len(ds))]
        return imgs, [ds.coverage(i) < 0.01 for i in range(len(ds))]
    imgs_t, bg_t = split(tr)
    imgs_v, bg_v = split(va)
    acc_bg = _ridge_accuracy(_colour_features(imgs_t, bg_t), yt, _colour_features(imgs_v, bg_v), yv, 10)
    acc_colour = _ridge_accuracy(_colour_features(imgs_t), yt, _colour_features(imgs_v), yv, 10)

    hue_ok = []
    for i in range(len(va)):
        obj = imgs_v[i][va.coverage(i) > 0.5].astype(np.float64).mean(0) / 255
        hue = colorsys.rgb_to_hsv(*obj)[0]
        c = SHAPES.index(va.classes[va.targets[i]])
        hue_ok.append(abs((hue - c / 10 + 0.5) % 1.0 - 0.5) <= 0.05)
    print(f"linear probe accuracy: shape {acc_shape:.2f}, image colour {acc_colour:.2f}, background colour "
          f"{acc_bg:.2f}; object hue within 0.05 of its class hue: {np.mean(hue_ok):.2f}")
    assert acc_shape >= 0.35, acc_shape        # chance is 0.10
    assert acc_colour >= 0.5, acc_colour
    assert acc_bg <= 0.25, acc_bg
    assert np.mean(hue_ok) >= 0.95, np.mean(hue_ok)


# ------------------------------------------------------------------------------------------------ export / folder
def test_export_round_trip(tmp_path):
    ds = SyntheticShapes("val", image_size=32, images_per_class=3, num_classes=4)
    path = ds.export_imagefolder(tmp_path)
    tr = SyntheticShapes("train", image_size=32, images_per_class=2, num_classes=4)
    tr.export_imagefolder(tmp_path)  # merges into the same boxes.json
    boxes = load_boxes_json(path)
    assert len(boxes) == 12 + 8
    with open(path) as fh:
        raw = json.load(fh)
    assert raw["val/circle/00000.png"] == ds.boxes[0]
    back = SafeImageFolder(tmp_path / "val")
    assert back.classes == ds.classes and back.targets == ds.targets and len(back) == len(ds)
    for i in range(len(ds)):
        img, label = back[i]
        assert label == ds.targets[i]
        assert np.array_equal(np.asarray(img), np.asarray(ds.image(i)))  # PNG is lossless
        rel = os.path.relpath(back.samples[i][0], tmp_path).replace(os.sep, "/")
        assert boxes[rel] == ds.boxes[i]
    sub = SafeImageFolder(tmp_path / "val", subset=2)
    assert len(sub) == 8 and np.bincount(sub.targets).tolist() == [2, 2, 2, 2]
    assert [os.path.basename(p) for p, _ in sub.samples[:2]] == ["00000.png", "00001.png"]
    # build_dataset on a folder and on the embedded data
    f = build_dataset(str(tmp_path), "train", subset=1)
    assert isinstance(f, SafeImageFolder) and len(f) == 4
    e = build_dataset(None, "val", image_size=32, images_per_class=5, subset=3)
    assert isinstance(e, SyntheticShapes) and len(e) == 30 and e.image_size == 32
    assert len(build_dataset(None, "train", image_size=32)) == 2000
    with pytest.raises(DataError, match="test"):
        build_dataset(str(tmp_path), "test")
    with pytest.raises(ValueError):
        SafeImageFolder(tmp_path / "val", subset=0)


def _write_jpegs(root, classes=("a", "b"), n=3, size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{j}.jpg",
                                                                                      quality=90)


def test_corrupt_image_skipped_and_logged(tmp_path, caplog):
    _write_jpegs(tmp_path)
    bad = tmp_path / "a" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])          # truncated JPEG
    (tmp_path / "b" / "0.jpg").write_bytes(b"not an image at all")
    ds = IndexedDataset(SafeImageFolder(tmp_path, transform=lambda im: np.asarray(im)))
    assert ds.classes == ["a", "b"] and len(ds) == 6
    good = np.asarray(Image.open(tmp_path / "a" / "2.jpg").convert("RGB"))
    with caplog.at_level(logging.WARNING):
        img, label, idx = ds[1]
        assert idx == 1 and label == 0 and np.array_equal(img, good)   # replaced by the next sample
        ds[1]
        img, label, idx = ds[3]                                        # b/0 is garbage -> b/1
        assert label == 1 and idx == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(str(bad) in r.getMessage() for r in warnings) == 1       # once per file
    assert any(str(tmp_path / "b" / "0.jpg") in r.getMessage() for r in warnings)
    # iterate through a DataLoader: training goes on
    loader = torch.utils.data.DataLoader(SafeImageFolder(tmp_path, transform=lambda im: torch.zeros(1)),
                                         batch_size=3)
    assert sum(len(b[1]) for b in loader) == 6


def test_all_corrupt_raises(tmp_path):
    _write_jpegs(tmp_path, n=2)
    for p in tmp_path.rglob("*.jpg"):
        p.write_bytes(b"\xff\xd8\xff")
    ds = SafeImageFolder(tmp_path)
    with pytest.raises(DataError, match="could be loaded"):
        ds[0]


def test_folder_errors_before_any_work(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        SafeImageFolder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="no class folders"):
        SafeImageFolder(tmp_path)
    _write_jpegs(tmp_path, n=1)
    os.makedirs(tmp_path / "c_empty")
    with pytest.raises(DataError, match="contains no images") as e:
        SafeImageFolder(tmp_path)
    assert str(tmp_path / "c_empty") in str(e.value) and "remove" in str(e.value)
    (tmp_path / "c_empty" / "notes.txt").write_text("x")             # non-image files do not count
    with pytest.raises(DataError, match="c_empty"):
        SafeImageFolder(tmp_path)
    with pytest.raises(DataError):
        SafeImageFolder(tmp_path / "a" / "0.jpg")                     # a file, not a folder
    assert issubclass(DataError, ValueError)


def test_indexed_dataset_passthrough():
    ds = IndexedDataset(SyntheticShapes("val", image_size=16, images_per_class=2, num_classes=3))
    img, label, idx = ds[5]
    assert (label, idx) == (2, 5) and len(ds) == 6 and ds.classes == ["circle", "square", "triangle"]
    assert ds.targets == [0, 0, 1, 1, 2, 2]


def test_synthetic_render_cache_changes_nothing_but_time():
    import pickle

    cached = SyntheticShapes("train", image_size=32, images_per_class=3)
    plain = SyntheticShapes("train", image_size=32, images_per_class=3, cache_mib=0)
    for _ in range(2):  # second pass served from the cache
        for i in range(len(cached)):
            a, ya = cached[i]
            b, yb = plain[i]
            assert ya == yb and np.array_equal(np.asarray(a), np.asarray(b))
    assert len(cached._cache) == len(cached) and not plain._cache
    assert cached[-1][1] == cached[len(cached) - 1][1]  # negative indices map to the same cache entry
    assert len(cached._cache) == len(cached)
    # the budget is respected: room for exactly two 32 px images
    small = SyntheticShapes("train", image_size=32, images_per_class=3, cache_mib=2 * 32 * 32 * 3 / 2**20)
    for i in range(len(small)):
        small[i]
    assert len(small._cache) == 2 and small._cached_bytes == 2 * 32 * 32 * 3
    # loader workers start with an empty cache (nothing large is pickled to them)
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._cache == {} and clone._cached_bytes == 0 and np.array_equal(np.asarray(clone[0][0]),
                                                                               np.asarray(cached[0][0]))


# ------------------------------------------------------------------------------------------------ layouts
def _default_digest():
    """sha256 over a few default-layout renders (pixels, label, box) and boxes, at three sizes and both splits."""
    h = hashlib.sha256()
    for split, size, ipc in (("train", 64, 200), ("val", 32, 50), ("val", 96, 3)):
        ds = SyntheticShapes(split, image_size=size, images_per_class=ipc)
        for i in (0, 1, 17, len(ds) - 1):
            img, c, box = ds.render(i)
            h.update(img.tobytes())
            h.update(repr((c, box)).encode())
        h.update(repr(ds.boxes[:5]).encode())
    return h.hexdigest()


def test_default_layout_is_bit_identical():
    """The digest was computed with this same function on main before the cluttered layout existed (commit
    8f8f4dd); the default layout's images and boxes must not move by one bit."""
    assert _default_digest() == "a71a9af5413b21b11b2473c6ff16e9a7eaad84caf93e165ff0a31bc07d269cc2"
    assert SyntheticShapes("val").layout == "default"
    assert repr(SyntheticShapes("val", image_size=32)) == ("SyntheticShapes(split='val', image_size=32, "
                                                           "images_per_class=50, num_classes=10, seed=0)")


def test_docs_sample_grid_is_unchanged():
    """docs/images/synthetic_grid.png (the README's picture) is redrawn pixel for pixel."""
    png = Path(__file__).resolve().parents[1] / "docs" / "images" / "synthetic_grid.png"
    drawn = np.asarray(sample_grid(SyntheticShapes("train", image_size=64, images_per_class=4)).convert("RGB"))
    assert np.array_equal(drawn, np.asarray(Image.open(png).convert("RGB")))


def test_cluttered_layout_objects_anywhere_with_exact_boxes():
    ds = SyntheticShapes("val", image_size=64, images_per_class=20, layout="cluttered")
    again = SyntheticShapes("val", image_size=64, images_per_class=20, layout="cluttered")
    plain = SyntheticShapes("val", image_size=64, images_per_class=20)
    assert ds.targets == plain.targets and ds.classes == plain.classes and "cluttered" in repr(ds)
    centres, areas = [], []
    for i in range(len(ds)):
        img, c, box = ds.render(i)
        assert np.array_equal(img, again.render(i)[0]) and c == plain.targets[i]
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and ds.boxes[i] == [box]
        ys, xs = np.nonzero(ds.coverage(i) > 0.5)  # the box is the tight box of the object pixels
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        centres.append(((x0 + x1) / 2 / 64, (y0 + y1) / 2 / 64))
        areas.append((x1 - x0) * (y1 - y0) / 64 ** 2)
    centres, areas = np.array(centres), np.array(areas)
    plain_b = np.array([b[0] for b in plain.boxes]) / 64
    plain_centres = np.stack([(plain_b[:, 0] + plain_b[:, 2]) / 2, (plain_b[:, 1] + plain_b[:, 3]) / 2], 1)
    plain_areas = (plain_b[:, 2] - plain_b[:, 0]) * (plain_b[:, 3] - plain_b[:, 1])
    print(f"box centre std (x, y): cluttered {centres.std(0).round(3)}, default {plain_centres.std(0).round(3)}; "
          f"median box area: cluttered {np.median(areas):.3f}, default {np.median(plain_areas):.3f} of the image")
    # positions spread over the image, objects smaller and of more varied size than in the default layout
    assert centres.min() < 0.2 and centres.max() > 0.8
    assert (centres.std(0) > 1.5 * plain_centres.std(0)).all()
    assert np.median(areas) < 0.5 * np.median(plain_areas) and areas.max() / areas.min() > 5
    # clutter: far more of the background differs from a smooth field (edges away from the object)
    def bg_edges(d, i):
        g = d.render(i)[0].astype(np.float32).mean(2)
        e = np.abs(np.diff(g, axis=1))
        return float((e[d.coverage(i)[:, 1:] < 0.01] > 20).mean())
    assert np.mean([bg_edges(ds, i) for i in range(0, 200, 10)]) > 3 * np.mean([bg_edges(plain, i)
                                                                                for i in range(0, 200, 10)])
    with pytest.raises(ValueError, match="layout"):
        SyntheticShapes("val", layout="messy")
    e = build_dataset(None, "val", image_size=32, images_per_class=2, layout="cluttered")
    assert e.layout == "cluttered" and len(e) == 20


def test_cluttered_layout_export_round_trip(tmp_path):
    ds = SyntheticShapes("val", image_size=32, images_per_class=2, num_classes=3, layout="cluttered")
    boxes = load_boxes_json(ds.export_imagefolder(tmp_path))
    back = SafeImageFolder(tmp_path / "val")
    for i in range(len(ds)):
        assert np.array_equal(np.asarray(back[i][0]), ds.render(i)[0])
        assert boxes[os.path.relpath(back.samples[i][0], tmp_path).replace(os.sep, "/")] == ds.boxes[i]


def test_centre_prior_scores_low_on_the_cluttered_layout():
    """A centred Gaussian map (sigma = a quarter of the side, as benchmarks/localization.py's centre-prior row)
    through eval.localization's MaxBoxAccV2: high on the default layout, low on the cluttered one."""
    size = 32
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    centre = np.exp(-(((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (size / 4) ** 2)))
    scores = {}
    for layout in ("default", "cluttered"):
        ds = SyntheticShapes("val", image_size=size, images_per_class=20, layout=layout)
        scores[layout] = max_box_acc_v2([centre] * len(ds), ds.boxes, [(size, size)] * len(ds))["maxboxaccv2"]
    print(f"centre prior MaxBoxAccV2 (val, {size} px, 200 images): default {scores['default']:.1f}, "
          f"cluttered {scores['cluttered']:.1f}")
    assert scores["default"] > 40
    assert scores["cluttered"] < 10 and scores["cluttered"] < scores["default"] / 4
    # the evaluators' embedded samples take the layout too
    samples = embedded_samples("val", size, 2, layout="cluttered")
    ds = SyntheticShapes("val", image_size=size, images_per_class=2, layout="cluttered")
    assert [s.boxes for s in samples] == ds.boxes and np.array_equal(np.asarray(samples[3].load()), ds.render(3)[0])
