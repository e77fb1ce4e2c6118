"""The small-image recipe (launch/recipes/small_images_32px.yaml) and the digits export of benchmarks/small_images.py.

The recipe's tuned values must be the configuration whose k-NN gain benchmarks/README.md reports (the script's
"chosen" variant), so an edit of either without re-measuring fails here. The export is checked on a few images per
class: a stratified, disjoint, deterministic split, the same train images in both folders, the held-out folder's val
= the test split, and images that ImageFolder and the trainer read.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_simpool.config import load_recipe, parse_config
from dino_simpool.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch" / "recipes" / "small_images_32px.yaml"


def _script():
    spec = importlib.util.spec_from_file_location("small_images", ROOT / "benchmarks" / "small_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _script()

# The tuned values, written out here from the tuning table in benchmarks/README.md (not read from the recipe)
TUNED = dict(
    arch="vit_tiny", pooling="simpool", gamma=1.25, precision="fp32", global_crops_size=32,
)


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def test_recipe_parses_and_has_the_tuned_values():
    cfg = load_recipe(RECIPE)
    for k, want in {**TUNED, **S.VARIANTS["chosen"][1]}.items():
        assert _norm(getattr(cfg, k)) == _norm(want), f"{k} = {getattr(cfg, k)!r}, the tuned value is {want!r}"
    # every value the benchmark varied is written in the recipe itself, not left to config.py's defaults
    import yaml
    raw = yaml.safe_load(RECIPE.read_text())
    assert set(S.EMBEDDED) <= set(raw), sorted(set(S.EMBEDDED) - set(raw))


def test_chosen_variant_is_the_recipe_file():
    """The "recipe" row (no overrides) and the "chosen" row (all tuned values given) run the same configuration."""
    via_file = parse_config(["--config", str(RECIPE), "--data_path", "/d"])
    via_flags = parse_config(["--config", str(RECIPE), *S._flags(S.VARIANTS["chosen"][1]), "--data_path", "/d"])
    via_file.config = via_flags.config = None
    via_file.provenance = via_flags.provenance = None
    assert via_file == via_flags


def test_recipe_comment_states_the_measured_gain():
    text = RECIPE.read_text()
    assert "benchmarks/small_images.py" in text and "python -m dino_simpool.train --config" in text
    assert "k-NN" in text and "CPU min" in text


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    a = S.split_indices(labels, seed=3)
    b = S.split_indices(labels, seed=3)
    c = S.split_indices(labels, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(allidx.tolist()) == list(range(40))  # disjoint and complete
    for k, n in (("train", 6), ("val", 2), ("test", 2)):
        assert np.bincount(labels[a[k]], minlength=4).tolist() == [n] * 4
    with pytest.raises(ValueError, match="too few"):
        S.split_indices(np.repeat(np.arange(2), 2))


@pytest.mark.parametrize("layout", ["placed", "centred"])
def test_export_a_few_digits(tmp_path, layout):
    summary = S.export_digits(tmp_path, size=32, layout=layout, max_per_class=5)
    assert summary["counts"] == {"train": 30, "val": 10, "test": 10}
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["counts"] == summary["counts"] and saved["layout"] == layout

    def files(sub):
        return sorted(p.relative_to(tmp_path / sub) for p in (tmp_path / sub).rglob("*.png"))

    assert files("tune/train") == files("heldout/train")
    for sub in ("tune/train", "heldout/train"):
        assert [(tmp_path / sub / f).read_bytes() for f in files(sub)] == \
               [(tmp_path / "tune/train" / f).read_bytes() for f in files("tune/train")]
    ids = {k: sorted(int(f.stem) for f in files(sub)) for k, sub in
           (("train", "tune/train"), ("val", "tune/val"), ("test", "heldout/val"))}
    assert ids == {k: sorted(v) for k, v in saved["indices"].items()}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    digits_target = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target
    for f in files("tune/val"):  # each file sits in its true class folder
        assert int(f.parent.name) == digits_target[int(f.stem)]
    img = Image.open(tmp_path / "tune/val" / files("tune/val")[0])
    assert img.mode == "L" and img.size == (32, 32)
    ds = build_dataset(str(tmp_path / "heldout"), "val")  # what the trainer and eval.knn read
    assert ds.classes == [str(c) for c in range(10)] and len(ds) == 10
    # deterministic: a second export writes the same bytes
    S.export_digits(tmp_path / "again", size=32, layout=layout, max_per_class=5)
    assert all((tmp_path / "tune/val" / f).read_bytes() == (tmp_path / "again/tune/val" / f).read_bytes()
               for f in files("tune/val"))


def test_placed_digit_keeps_its_ink_and_varies_without_the_class():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16.0  # a "1"
    imgs = [np.asarray(S.render_digit(digit, 32, "placed", np.random.default_rng(i)), dtype=np.float32)
            for i in range(20)]
    assert all(im.shape == (32, 32) for im in imgs)
    # the stroke is visible above the background in every image, and it is not always in the same place
    assert all(im.max() - np.median(im) > 60 for im in imgs)
    centres = {tuple(np.argwhere(im > np.median(im) + 60).mean(0).round()) for im in imgs}
    assert len(centres) > 5
    centred = np.asarray(S.render_digit(digit, 32, "centred", np.random.default_rng(0)))
    assert centred.shape == (32, 32) and centred[:, :8].max() < 30  # the blank left columns stay blank
    with pytest.raises(ValueError, match="layout"):
        S.render_digit(digit, 32, "tiled", np.random.default_rng(0))
