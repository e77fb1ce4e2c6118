"""Attention-map pictures: the library function the demo calls, and the dino-simpool-attention command."""
import numpy as np
import pytest
import torch
from PIL import Image

from dino_simpool.export import export_backbone
from dino_simpool.models.backbones import build_backbone
from eval.attention import MIN_PANEL, TITLE_H, attention_panels, main, save_attention_pngs, upsample

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def expected_size(side_h, side_w, n_panels):
    scale = -(-MIN_PANEL // max(side_h, side_w))
    return (n_panels * side_w * scale + 4 * (n_panels - 1), side_h * scale + TITLE_H)


def test_upsample_nearest_gives_one_block_per_patch():
    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    up = upsample(m, (4, 6))
    assert up.shape == (4, 6)
    np.testing.assert_array_equal(up[:2, :3], 0.0)
    np.testing.assert_array_equal(up[2:, 3:], 3.0)


def test_simpool_png_has_input_map_overlay_and_mass_panels(tmp_path):
    model = build_backbone("vit_tiny", pooling="simpool", **TINY)
    paths = save_attention_pngs(model, [rgb(32, 32), rgb(32, 32, 1)], tmp_path, threshold=0.6, names=["a", "b"])
    assert [p.name for p in paths] == ["a.png", "b.png"]
    with Image.open(paths[0]) as im:
        assert im.size == expected_size(32, 32, 4)
    panels, size = attention_panels(model, rgb(32, 32), threshold=0.6)
    assert [t for t, _ in panels] == ["input", "simpool attention", "overlay (simpool)", "mass 0.6"]
    assert all(p.shape == (32, 32, 3) for _, p in panels)  # maps upsampled to the image size
    # the mask keeps whole patches and dims the others (to a quarter)
    mass, shown = panels[3][1].astype(float), panels[0][1].astype(float)
    kept = np.all(mass == shown, axis=-1)
    dimmed = np.all(mass == np.round(shown * 0.25), axis=-1)
    assert kept.any() and dimmed.any()
    for i in range(0, 32, 8):
        for j in range(0, 32, 8):
            assert kept[i:i + 8, j:j + 8].all() or dimmed[i:i + 8, j:j + 8].all()


def test_cls_png_has_each_head_and_mean_over_blocks(tmp_path):
    model = build_backbone("vit_tiny", pooling="cls", **TINY)
    panels, _ = attention_panels(model, rgb(40, 48))
    assert [t for t, _ in panels] == ["input", "head 0", "head 1", "mean over blocks", "overlay (heads mean)"]
    assert all(p.shape == (40, 48, 3) for _, p in panels)
    (path,) = save_attention_pngs(model, [rgb(40, 48)], tmp_path)
    with Image.open(path) as im:
        assert im.size == expected_size(40, 48, 5)


def test_cnn_png(tmp_path):
    model = build_backbone("resnet_test", pooling="simpool")
    (path,) = save_attention_pngs(model, [rgb(48, 48)], tmp_path, image_size=64)
    with Image.open(path) as im:
        assert im.size == expected_size(64, 64, 3)


def test_attention_cli_on_files_and_folders(tmp_path, capsys):
    model = build_backbone("vit_tiny", pooling="simpool", **TINY)
    export_backbone(model, tmp_path / "exp")
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rgb(32, 32).save(imgs / "one.png")
    rgb(24, 40).save(imgs / "sub" / "two.jpg")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "exp"), "--images", str(imgs), "--output_dir", str(out),
                 "--threshold", "0.6"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "two.png"]
    with Image.open(out / "two.png") as im:
        assert im.size == expected_size(24, 40, 4)
    assert main(["--checkpoint", str(tmp_path / "exp"), "--output_dir", str(tmp_path / "emb"), "--num_images", "2",
                 "--synthetic_size", "32", "--image_size", "48", "--combined", str(tmp_path / "all.png")]) == 0
    assert len(list((tmp_path / "emb").glob("val_*.png"))) == 2
    w, h = expected_size(48, 48, 3)
    with Image.open(tmp_path / "all.png") as im:
        assert im.size == (w, 2 * h + 4)
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "exp"), "--images", str(tmp_path / "none"), "--output_dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "exp"), "--output_dir", str(out), "--threshold", "1.5"]) == 2


def test_threshold_validated():
    with pytest.raises(ValueError, match="mass fraction"):
        save_attention_pngs(build_backbone("vit_tiny", pooling="simpool", **TINY), [], "unused", threshold=0.0)
