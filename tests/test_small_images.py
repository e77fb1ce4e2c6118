"""The small-image recipe (launch/recipes/small_images_32px.yaml) and the digits export of benchmarks/small_images.py.

The recipe's tuned values must be the configuration whose k-NN gain benchmarks/README.md reports (the script's
"chosen" variant), so an edit of either without re-measuring fails here. The export is checked on a few images per
class: a stratified, disjoint, deterministic split, the same train images in both folders, the held-out folder's val
= the test split, and images that ImageFolder and the trainer read.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
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

# The tuned values, written out here from the tuning table in benchmarks/README.md (bn50), not read from the recipe
TUNED = dict(
    arch="vit_tiny", pooling="simpool", gamma=1.25, precision="fp32", patch_size=4, depth=2, embed_dim=64,
    num_heads=2, out_dim=64, use_bn_in_head=True, norm_last_layer=True, epochs=50, warmup_epochs=2,
    batch_size_per_gpu=32, optimizer="adamw", lr=0.008, momentum_teacher=0.99, warmup_teacher_temp=0.02,
    teacher_temp=0.04, warmup_teacher_temp_epochs=3, weight_decay_end=0.1, global_crops_size=32,
    local_crops_size=16, local_crops_number=2, global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5),
)


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def test_recipe_loads_through_the_trainer_config_with_the_tuned_values():
    cfg = parse_config(["--config", str(RECIPE), "--data_path", "/d"])  # the trainer's own loader (train.main)
    for k, want in TUNED.items():
        assert _norm(getattr(cfg, k)) == _norm(want), f"{k} = {getattr(cfg, k)!r}, the tuned value is {want!r}"
    assert load_recipe(RECIPE).use_bn_in_head is True
    # every value the benchmark varied is written in the recipe itself, not left to config.py's defaults
    raw = yaml.safe_load(RECIPE.read_text())
    assert set(S.EMBEDDED) <= set(raw), sorted(set(S.EMBEDDED) - set(raw))


def test_chosen_variant_is_the_recipe_file():
    """The "recipe" row (no overrides) and the chosen variant's row (all tuned values given) run one configuration."""
    chosen = {k: v for k, v in S.VARIANTS[S.CHOSEN][1].items() if k != "eval_every"}  # the runs pass their own
    via_file = parse_config(["--config", str(RECIPE), "--data_path", "/d"])
    via_flags = parse_config(["--config", str(RECIPE), *S._flags(chosen), "--data_path", "/d"])
    via_file.config = via_flags.config = None
    via_file.provenance = via_flags.provenance = None
    assert via_file == via_flags


def test_recipe_comment_states_the_measured_gain_and_the_command():
    text = RECIPE.read_text()
    assert "benchmarks/small_images.py" in text
    assert "dino-simpool-train --config launch/recipes/small_images_32px.yaml" in text
    assert "dino-simpool-train=dino_simpool.train:main" in (ROOT / "setup.py").read_text()  # the name it gives
    assert "k-NN" in text and "CPU min" in text and "DRAFT" not in text


def _tiny_gray_folder(root: Path, classes: int = 3, per_class: int = 12) -> None:
    """``root/{train,val}/<class>/*.png``: 32 px 8-bit grayscale images, a bar whose angle depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                im = rng.integers(0, 60, (32, 32)).astype(np.uint8)
                im[8 + c * 6: 12 + c * 6, 4:28] = 230
                Image.fromarray(im, mode="L").save(d / f"{i}.png")


@pytest.mark.slow  # ~10 s: a real training process with the recipe's 2 loader workers and its periodic k-NN
def test_recipe_trains_on_a_grayscale_imagefolder(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _tiny_gray_folder(data)  # 36 train images, batch 32: one iteration per epoch
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "dino_simpool.train", "--config", str(RECIPE), "--data_path", str(data),
                        "--output_dir", str(out), "--max_iters", "2", "--num_threads", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["iteration"] == 2
    # the student's head has BatchNorm (use_bn_in_head) and the backbone is the recipe's 2 x 64 ViT with 4 px patches
    assert any("head" in k and "running_mean" in k for k in ck["student"])
    pe = next(v for k, v in ck["student"].items() if k.endswith("patch_embed.proj.weight"))
    assert pe.shape[0] == 64 and tuple(pe.shape[2:]) == (4, 4)
    assert sum(1 for k in ck["student"] if k.endswith(".attn.qkv.weight")) == 2
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["use_bn_in_head"] is True and cfg["epochs"] == 50 and cfg["pooling"] == "simpool"
    recs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.startswith("{")]
    losses = [rec["loss"] for rec in recs if "loss" in rec]
    assert losses and all(np.isfinite(losses))
    assert any("k-NN" in rec for rec in recs), "the periodic k-NN (eval_every 5, on val/) did not run"


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


def test_linear_option_checks_its_value_and_formats_each_augmentation(capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--linear", "-1"])
    assert e.value.code == 2 and "--linear" in capsys.readouterr().err
    per_lr = {f"last1_lr{lr:g}": 10.0 * (i + 1) for i, lr in enumerate(S.LINEAR_LRS)}
    row = {"variant": "recipe", "seed": 0, "split": "heldout", "trained": {"10": 80.0, "20": 79.0}, "linear_epochs": 3,
           "linear": {aug: {"last_top1": per_lr, "best_last_top1": max(per_lr.values())} for aug in S.LINEAR_AUGS}}
    table = S.format_linear([row]).splitlines()
    assert len(table) == 2 + len(S.LINEAR_AUGS)
    assert table[2].startswith("| recipe | 0 | heldout | dino_0.08 | 3 | 10.0 | 20.0 | 30.0 | 30.0 | 80.0 | 79.0 |")
    assert S.LINEAR_AUGS["none"] == ["--train_aug", "none"]
