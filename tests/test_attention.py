"""Attention-map pictures: the library function the demo calls, and the dino-simpool-attention command."""
import numpy as np
import pytest
import torch
from PIL import Image

from dino_simpool.export import export_backbone
from dino_simpool.models.backbones import build_backbone
from dino_simpool.evaluation.attention import MIN_PANEL, TITLE_H, _minmax, attention_panels, colormap, \
    save_attention_pngs, stack_pictures, upsample
from dino_simpool.evaluation.images import to_tensor
from eval.attention import main
from eval.discovery import cumulative_mass_mask

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
    assert sorted(p.name for p in out.iterdir()) == ["one.npy", "one.png", "sub__two.npy", "sub__two.png"]
    with Image.open(out / "sub__two.png") as im:
        assert im.size == expected_size(24, 40, 4)
    assert main(["--checkpoint", str(tmp_path / "exp"), "--output_dir", str(tmp_path / "emb"), "--num_images", "2",
                 "--synthetic_size", "32", "--image_size", "48", "--combined", str(tmp_path / "all.png")]) == 0
    assert len(list((tmp_path / "emb").glob("val_*.png"))) == 2
    w, h = expected_size(48, 48, 3)
    with Image.open(tmp_path / "all.png") as im:
        assert im.size == (w, 2 * (TITLE_H + h) + 4)  # a name strip above each row
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "exp"), "--images", str(tmp_path / "none"), "--output_dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "exp"), "--output_dir", str(out), "--threshold", "1.5"]) == 2


def test_threshold_validated():
    with pytest.raises(ValueError, match="mass fraction"):
        save_attention_pngs(build_backbone("vit_tiny", pooling="simpool", **TINY), [], "unused", threshold=0.0)


def _expected_mass_panel(shown, attn, threshold, size):
    keep = upsample(cumulative_mass_mask(attn, threshold).astype(float), size, "nearest") > 0.5
    return (shown * np.where(keep[..., None], 1.0, 0.25)).round().astype(np.uint8), keep


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_simpool_panels_are_the_models_map(interpolation):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", pooling="simpool", **TINY).eval()
    img, size = rgb(40, 48, 3), (40, 48)
    panels, got_size = attention_panels(model, img, threshold=0.6, interpolation=interpolation)
    assert got_size == size
    with torch.no_grad():
        attn = model.attention_maps(to_tensor(img, size)[None])["pool"][0].numpy()
    assert attn.shape == (5, 6)
    want = colormap(_minmax(upsample(attn, size, interpolation)))
    titles = [t for t, _ in panels]
    np.testing.assert_array_equal(panels[titles.index("simpool attention")][1], want)
    shown = np.asarray(img)
    np.testing.assert_array_equal(panels[0][1], shown)
    want_mass, keep = _expected_mass_panel(shown, attn, 0.6, size)
    np.testing.assert_array_equal(panels[titles.index("mass 0.6")][1], want_mass)
    # exactly the patches of the mask are kept: whole 8x8 blocks, as many as the mask has
    assert keep[::8, ::8].sum() == cumulative_mass_mask(attn, 0.6).sum() and 0 < keep.mean() < 1


def test_cls_panels_are_each_heads_map_and_the_mean_over_blocks():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", pooling="cls", **TINY).eval()
    img, size = rgb(32, 40, 4), (32, 40)
    panels, _ = attention_panels(model, img, threshold=0.5)
    with torch.no_grad():
        maps = model.attention_maps(to_tensor(img, size)[None])
    heads, mean_blocks = maps["heads"][0].numpy(), maps["mean_blocks"][0].numpy()
    got = dict(panels)
    for i, hm in enumerate(heads):
        np.testing.assert_array_equal(got[f"head {i}"], colormap(_minmax(upsample(hm, size))))
    np.testing.assert_array_equal(got["mean over blocks"], colormap(_minmax(upsample(mean_blocks, size))))
    assert not np.array_equal(got["head 0"], got["head 1"])
    want_mass, _ = _expected_mass_panel(np.asarray(img), heads.mean(0), 0.5, size)
    np.testing.assert_array_equal(got["mass 0.5"], want_mass)  # the mask is taken on the head mean


def test_same_named_images_do_not_overwrite_each_other(tmp_path, capsys):
    model = build_backbone("vit_tiny", pooling="simpool", **TINY)
    export_backbone(model, tmp_path / "exp")
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir()
    rgb(32, 32, 0).save(imgs / "a" / "x.png")
    rgb(32, 32, 1).save(imgs / "b" / "x.jpg")
    rgb(32, 32, 2).save(imgs / "x.png")
    rgb(32, 32, 3).save(imgs / "x.jpg")
    rgb(32, 32, 4).save(tmp_path / "x.png")  # a file given directly, same stem again
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "exp"), "--images", str(imgs), str(tmp_path / "x.png"),
                 "--output_dir", str(out), "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["a__x.png", "b__x.png", "x_jpg.png", "x_png.png", "x_png_2.png"]
    assert sorted(p.name for p in out.glob("*.npy")) == [n[:-4] + ".npy" for n in names]
    assert "wrote 5 attention picture(s)" in capsys.readouterr().out
    pictures = [np.asarray(Image.open(out / n)) for n in names]
    assert len({p.tobytes() for p in pictures}) == 5  # five different pictures, none overwritten
    # library use: paths with equal stems get unique names too; duplicate explicit names are refused
    paths = save_attention_pngs(model, [imgs / "a" / "x.png", imgs / "b" / "x.jpg"], tmp_path / "lib")
    assert [p.name for p in paths] == ["x_png.png", "x_jpg.png"]
    with pytest.raises(ValueError, match="unique"):
        save_attention_pngs(model, [rgb(32, 32), rgb(32, 32)], tmp_path / "dup", names=["a", "a"])


def test_large_images_are_scaled_to_max_size():
    model = build_backbone("vit_tiny", pooling="simpool", **TINY)
    img = rgb(120, 200, 5)
    _, size = attention_panels(model, img, max_size=64)
    assert size == (40, 64)  # aspect kept, longest side 64, multiples of the patch (8)
    _, size = attention_panels(model, img, max_size=None)
    assert size == (120, 200)  # full size
    _, size = attention_panels(model, rgb(24, 40), max_size=64)
    assert size == (24, 40)  # never scaled up


def test_raw_maps_are_saved_beside_the_pngs(tmp_path):
    """Issue 13 §4: the maps behind the pictures, float32 at patch resolution, exactly what the model returned."""
    img = rgb(40, 48, 7)
    simpool = build_backbone("vit_tiny", pooling="simpool", **TINY).eval()
    save_attention_pngs(simpool, [img], tmp_path / "sp", names=["a"])
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["a.npy", "a.png"]
    with torch.no_grad():
        want = simpool.attention_maps(to_tensor(img, (40, 48))[None])
    got = np.load(tmp_path / "sp" / "a.npy")
    assert got.dtype == np.float32 and got.shape == (5, 6)
    np.testing.assert_array_equal(got, want["pool"][0].numpy())

    cls = build_backbone("vit_tiny", pooling="cls", **TINY).eval()
    save_attention_pngs(cls, [img], tmp_path / "cls", names=["b"])
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == ["b.mean_blocks.npy", "b.npy", "b.png"]
    with torch.no_grad():
        want = cls.attention_maps(to_tensor(img, (40, 48))[None])
    np.testing.assert_array_equal(np.load(tmp_path / "cls" / "b.npy"), want["heads"][0].numpy())  # (heads, h, w)
    np.testing.assert_array_equal(np.load(tmp_path / "cls" / "b.mean_blocks.npy"), want["mean_blocks"][0].numpy())
    assert np.load(tmp_path / "cls" / "b.npy").shape == (2, 5, 6)
    # library callers may opt out; names whose map files would collide are refused before anything is written
    save_attention_pngs(cls, [img], tmp_path / "nomaps", names=["c"], save_maps=False)
    assert [p.name for p in (tmp_path / "nomaps").iterdir()] == ["c.png"]
    with pytest.raises(ValueError, match="would write 'x.mean_blocks.npy'"):
        save_attention_pngs(cls, [img, img], tmp_path / "clash", names=["x", "x.mean_blocks"])
    assert not (tmp_path / "clash").exists()


def test_combined_grid_names_each_row(tmp_path):
    """Each row of the combined picture carries its image's name in a strip above it (drawn text, not white)."""
    model = build_backbone("vit_tiny", pooling="simpool", **TINY)
    paths = save_attention_pngs(model, [rgb(32, 32), rgb(32, 32, 1)], tmp_path, names=["first", "图 second"])
    out = stack_pictures(paths, tmp_path / "grid" / "all.png")
    with Image.open(paths[0]) as one:
        w, h = one.size
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (2 * (TITLE_H + h) + 4, w)
    strips = [grid[:TITLE_H], grid[TITLE_H + h + 4:2 * TITLE_H + h + 4]]
    for strip in strips:
        assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on white
    np.testing.assert_array_equal(grid[TITLE_H:TITLE_H + h], np.asarray(Image.open(paths[0])))
    # the text is the label: other labels draw other pixels; no label strip stays blank
    a = np.asarray(Image.open(stack_pictures(paths[:1], tmp_path / "a.png", labels=["first"])))[:TITLE_H]
    b = np.asarray(Image.open(stack_pictures(paths[:1], tmp_path / "b.png", labels=["other"])))[:TITLE_H]
    assert not np.array_equal(a, b) and np.array_equal(a, strips[0])
    with pytest.raises(ValueError, match="2 labels for 1 pictures"):
        stack_pictures(paths[:1], tmp_path / "c.png", labels=["x", "y"])
