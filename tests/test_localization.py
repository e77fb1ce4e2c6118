import json
from pathlib import Path

import numpy as np
import pytest

from eval.boxes import box_iou, load_boxes_cub, load_boxes_json, load_boxes_voc, mask_boxes
from eval.discovery import attention_box, corloc, cumulative_mass_mask, lost_box
from eval.localization import MaxBoxAccV2, max_box_acc_v2


def blob_map(h, w, box, value=1.0, base=0.0):
    m = np.full((h, w), base)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = value
    return m


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[25 / 175, 1.0, 0.0]])


def test_mask_boxes_one_per_component():
    m = np.zeros((10, 10), bool)
    m[1:3, 1:4] = True
    m[6:9, 5:7] = True
    assert sorted(mask_boxes(m)) == [(1.0, 1.0, 4.0, 3.0), (5.0, 6.0, 7.0, 9.0)]


def test_maxboxacc_perfect_map_is_100():
    gt = [(8, 8, 24, 20)]
    res = max_box_acc_v2([blob_map(32, 32, gt[0])], [gt], [(32, 32)])
    assert res["maxboxaccv2"] == pytest.approx(100.0)
    assert res["per_iou"] == {0.3: 100.0, 0.5: 100.0, 0.7: 100.0}


def test_maxboxacc_all_mass_in_one_pixel():
    m = np.zeros((32, 32))
    m[2, 30] = 1.0
    far = max_box_acc_v2([m], [[(4, 4, 20, 20)]], [(32, 32)])
    assert far["maxboxaccv2"] == 0.0  # the only box is 1 px, far from the object
    hit = max_box_acc_v2([m], [[(30, 2, 31, 3)]], [(32, 32)])
    assert hit["maxboxaccv2"] == pytest.approx(100.0)


def test_maxboxacc_several_objects_any_box_counts():
    # Two bright regions; ground truth is the smaller one: the box around *all* contours still finds it.
    m = blob_map(32, 32, (0, 0, 16, 16), 0.8) + blob_map(32, 32, (24, 24, 30, 30), 1.0)
    res = max_box_acc_v2([m], [[(24, 24, 30, 30)]], [(32, 32)])
    assert res["maxboxaccv2"] == pytest.approx(100.0)
    # With ground truth on both objects, image counts once.
    res2 = max_box_acc_v2([m], [[(24, 24, 30, 30), (0, 0, 16, 16)]], [(32, 32)])
    assert res2["maxboxaccv2"] == pytest.approx(100.0) and res2["num_images"] == 1


def test_maxboxacc_mixed_images_and_sizes():
    # Image 1 (64x32 image, 4x2 map upsampled): right half hot, GT right half -> correct.
    # Image 2 (16x16): map hot on the wrong corner -> wrong at every IoU.
    m1 = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # (h=4, w=2)
    m2 = blob_map(16, 16, (0, 0, 4, 4))
    res = max_box_acc_v2([m1, m2], [[(16, 0, 32, 64)], [(10, 10, 16, 16)]], [(64, 32), (16, 16)])
    assert res["maxboxaccv2"] == pytest.approx(50.0)


def test_maxboxacc_partial_overlap_depends_on_delta():
    # Predicted region covers 12x12 of a 16x16 GT box -> IoU 144/256 = 0.5625: hit at 0.3 and 0.5, miss at 0.7.
    m = blob_map(32, 32, (0, 0, 12, 12))
    res = max_box_acc_v2([m], [[(0, 0, 16, 16)]], [(32, 32)])
    assert res["per_iou"] == {0.3: 100.0, 0.5: 100.0, 0.7: 0.0}
    assert res["maxboxaccv2"] == pytest.approx(200.0 / 3)


def test_empty_box_list_is_a_clear_error():
    with pytest.raises(ValueError, match="no ground-truth box"):
        max_box_acc_v2([np.ones((4, 4))], [[]], [(8, 8)])
    with pytest.raises(ValueError, match="no ground-truth box"):
        corloc([(0, 0, 1, 1)], [[]])
    with pytest.raises(ValueError, match="no image"):
        MaxBoxAccV2().compute()


def test_cumulative_mass_mask_matches_definition():
    a = np.array([[0.5, 0.25], [0.125, 0.125]])  # exact in binary floating point
    assert cumulative_mass_mask(a, 0.45).tolist() == [[True, False], [False, False]]
    # 0.5 alone holds less than 0.6 of the mass: the next-highest value joins it.
    assert cumulative_mass_mask(a, 0.6).tolist() == [[True, True], [False, False]]


def test_attention_box_largest_component_scaled_to_image():
    a = np.zeros((8, 8))
    a[1:3, 1:3] = 1.0  # small blob (4 cells)
    a[4:8, 3:7] = 1.0  # big blob (16 cells)
    box = attention_box(a, image_size=(64, 64), mass=1.0)
    assert box == (24.0, 32.0, 56.0, 64.0)


def test_attention_box_non_square_map_and_image():
    # (h, w) = (4, 8) map on a (H, W) = (40, 160) image: 10 px per row, 20 px per column
    a = np.zeros((4, 8))
    a[1:3, 5:8] = 1.0
    assert attention_box(a, image_size=(40, 160), mass=1.0) == (100.0, 10.0, 160.0, 30.0)
    # swapping the axes' scales would give (50, 20, 80, 60); a square-only test could not tell
    assert corloc([attention_box(a, (40, 160), 1.0)], [[(100, 10, 160, 30)]]) == 100.0


def test_attention_box_uses_4_connectivity():
    # a diagonal of 3 patches (one component only with 8-connectivity) vs a pair of side-by-side patches
    a = np.zeros((6, 8))
    a[0, 0] = a[1, 1] = a[2, 2] = 1.0
    a[4, 5:7] = 1.0
    assert attention_box(a, image_size=(48, 64), mass=1.0) == (40.0, 32.0, 56.0, 40.0)


def test_lost_box_non_square_grid():
    h, w = 4, 6
    obj = np.zeros((h, w), bool)
    obj[1:3, 3:6] = True
    o, b = np.array([1.0, 0.0, 0.2]), np.array([-0.3, 1.0, 0.0])
    feats = np.where(obj.reshape(-1, 1), o, b) + 0.01 * np.random.default_rng(1).standard_normal((h * w, 3))
    box, seed = lost_box(feats, (h, w), image_size=(40, 120), k_patches=5)
    assert obj.reshape(-1)[seed]
    assert box == (60.0, 10.0, 120.0, 30.0)  # 20 px per column, 10 px per row


def test_corloc_several_ground_truth_boxes():
    gts = [
        [(0, 0, 10, 10), (20, 20, 40, 40), (50, 0, 60, 10)],  # the prediction hits the second box only
        [(0, 0, 10, 10), (20, 20, 40, 40), (50, 0, 60, 10)],  # covers two boxes: IoU 100/1600 and 400/1600
        [(30, 30, 34, 34), (0, 0, 16, 16)],  # hits the last box (IoU 224/256)
        [(0, 0, 8, 8), (8, 8, 16, 16)],  # covers both: IoU 64/256 with each -> miss
    ]
    preds = [(21, 21, 40, 40), (0, 0, 40, 40), (0, 0, 16, 14), (0, 0, 16, 16)]
    assert corloc(preds, gts) == 50.0
    assert corloc(preds, gts, iou_threshold=0.25) == 100.0  # IoU 0.25 exactly counts (>=)
    assert corloc(preds[:2], gts[:2]) == 50.0 and corloc(preds[2:], gts[2:]) == 50.0


def test_lost_finds_the_object_on_constructed_features():
    h, w = 8, 8
    obj = np.zeros((h, w), bool)
    obj[2:5, 3:6] = True
    rng = np.random.default_rng(0)
    o, b = np.array([1.0, 0.0, 0.2]), np.array([-0.3, 1.0, 0.0])  # o·b < 0
    feats = np.where(obj.reshape(-1, 1), o, b) + 0.01 * rng.standard_normal((h * w, 3))
    box, seed = lost_box(feats, (h, w), image_size=(128, 128), k_patches=10)
    assert obj.reshape(-1)[seed]
    assert box == (48.0, 32.0, 96.0, 80.0)
    assert corloc([box], [[(48, 32, 96, 80)]]) == 100.0


def test_corloc_threshold():
    assert corloc([(0, 0, 10, 10), (0, 0, 10, 10)], [[(0, 0, 10, 19)], [(0, 0, 10, 21)]]) == 50.0


def test_box_file_formats(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"a/x.png": [[1, 2, 3, 4]]}))
    assert load_boxes_json(tmp_path / "b.json") == {"a/x.png": [[1.0, 2.0, 3.0, 4.0]]}
    (tmp_path / "images.txt").write_text("1 001.Bird/a.jpg\n2 002.Bird/b.jpg\n")
    (tmp_path / "bounding_boxes.txt").write_text("1 10.0 20.0 30.0 40.0\n2 0 0 5 5\n")
    cub = load_boxes_cub(tmp_path / "bounding_boxes.txt", tmp_path / "images.txt")
    assert cub["001.Bird/a.jpg"] == [[10.0, 20.0, 40.0, 60.0]]
    ann = tmp_path / "Annotations"
    ann.mkdir()
    (ann / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><object><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>10</xmax><ymax>20</ymax></bndbox></object><object><bndbox><xmin>5</xmin><ymin>6</ymin>"
        "<xmax>7</xmax><ymax>8</ymax></bndbox></object></annotation>"
    )
    assert load_boxes_voc(ann) == {"000001.jpg": [[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 7.0, 8.0]]}


# ----------------------------------------------------------------------------------------------------------------------
# command lines on a tiny model and a tiny exported dataset
# ----------------------------------------------------------------------------------------------------------------------
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny exported SimPool ViT and the embedded val split (1 image per class, 32 px) in three layouts:
    ImageFolder + boxes.json, CUB files, VOC folder."""
    import shutil

    import torch

    from dino_simpool.data import SyntheticShapes
    from dino_simpool.export import export_backbone
    from dino_simpool.models.backbones import build_backbone

    root = tmp_path_factory.mktemp("loc")
    torch.manual_seed(0)
    for pooling in ("simpool", "cls"):
        export_backbone(build_backbone("vit_tiny", pooling=pooling, **TINY_VIT), root / f"exp_{pooling}")
    ds = SyntheticShapes("val", image_size=32, images_per_class=1)
    ds.export_imagefolder(root / "data")
    boxes = json.loads((root / "data" / "boxes.json").read_text())
    rels = sorted(k[len("val/"):] for k in boxes)
    cub = root / "cub"
    cub.mkdir()
    (cub / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    (cub / "bounding_boxes.txt").write_text("".join(
        f"{i + 1} {b[0]} {b[1]} {b[2] - b[0]} {b[3] - b[1]}\n" for i, r in enumerate(rels) for b in boxes[f"val/{r}"]))
    voc = root / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for r in rels:
        name = r.replace("/", "_")
        shutil.copy(root / "data" / "val" / r, voc / "JPEGImages" / name)
        objs = "".join(f"<object><bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax>"
                       f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes[f"val/{r}"])
        (voc / "Annotations" / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{name}</filename>{objs}</annotation>")
    return root


def _result(out_dir, name):
    return json.loads((out_dir / name).read_text())


def test_localization_cli_same_score_from_embedded_json_and_cub(tiny_setup, tmp_path):
    from eval.localization import main

    r = tiny_setup
    common = ["--pretrained_weights", str(r / "exp_simpool"), "--device", "cpu"]
    assert main(common + ["--synthetic_size", "32", "--synthetic_per_class", "1", "--output_dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--data_path", str(r / "data" / "val"), "--boxes", str(r / "data" / "boxes.json"),
                          "--output_dir", str(tmp_path / "b")]) == 0
    assert main(common + ["--data_path", str(r / "data" / "val"), "--boxes", str(r / "cub" / "bounding_boxes.txt"),
                          "--output_dir", str(tmp_path / "c")]) == 0
    a, b, c = (_result(tmp_path / d, "localization_results.json") for d in "abc")
    assert a["num_images"] == b["num_images"] == c["num_images"] == 10
    assert a["map"] == "pool" and 0.0 <= a["maxboxaccv2"] <= 100.0
    assert a["maxboxaccv2"] == b["maxboxaccv2"] == c["maxboxaccv2"]
    assert a["per_iou"] == b["per_iou"] == c["per_iou"]


def test_localization_cli_matches_library_on_model_maps(tiny_setup, capsys):
    import torch

    from dino_simpool.data import SyntheticShapes
    from dino_simpool.export import load_exported
    from dino_simpool.evaluation.images import to_tensor
    from eval.localization import main

    model = load_exported(tiny_setup / "exp_cls")
    ds = SyntheticShapes("val", image_size=32, images_per_class=1)
    with torch.no_grad():
        maps = [model.attention_maps(to_tensor(ds.image(i), (32, 32))[None])["heads"][0].mean(0).numpy() for i in range(4)]
    ref = max_box_acc_v2(maps, ds.boxes[:4], [(32, 32)] * 4)
    assert main(["--pretrained_weights", str(tiny_setup / "exp_cls"), "--synthetic_size", "32",
                 "--synthetic_per_class", "1", "--subset", "4", "--device", "cpu"]) == 0
    assert f"MaxBoxAccV2 {ref['maxboxaccv2']:.2f} on 4 images (heads_mean map)" in capsys.readouterr().out


def test_box_evaluators_read_the_cluttered_layout(tiny_setup, capsys):
    """``--synthetic_layout cluttered``: the CLIs score the cluttered images and boxes (equal to the library on
    them), not the default layout's."""
    from eval import discovery, localization
    from eval.locdata import embedded_samples
    from dino_simpool.export import load_exported

    model = load_exported(tiny_setup / "exp_cls")
    flags = ["--pretrained_weights", str(tiny_setup / "exp_cls"), "--synthetic_size", "32", "--synthetic_per_class",
             "3", "--device", "cpu"]
    for layout in ("cluttered", "default"):
        samples = embedded_samples("val", 32, 3, layout=layout)
        ref = localization.evaluate_model(model, samples)
        assert localization.main([*flags, "--synthetic_layout", layout]) == 0
        assert f"MaxBoxAccV2 {ref['maxboxaccv2']:.2f} on 30 images" in capsys.readouterr().out
        ref = discovery.evaluate_model(model, samples, "lost")
        assert discovery.main([*flags, "--synthetic_layout", layout, "--method", "lost"]) == 0
        assert f"CorLoc (lost) {ref['corloc']:.2f} on 30 images" in capsys.readouterr().out
    boxes = [embedded_samples("val", 32, 3, layout=lay)[0].boxes for lay in ("cluttered", "default")]
    assert boxes[0] != boxes[1]


@pytest.mark.parametrize("method", ["attention", "lost"])
def test_discovery_cli_same_corloc_from_embedded_json_and_voc(tiny_setup, tmp_path, method):
    from eval.discovery import main

    r = tiny_setup
    common = ["--pretrained_weights", str(r / "exp_simpool"), "--method", method, "--device", "cpu"]
    assert main(common + ["--synthetic_size", "32", "--synthetic_per_class", "1", "--output_dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--data_path", str(r / "data" / "val"), "--boxes", str(r / "data" / "boxes.json"),
                          "--output_dir", str(tmp_path / "b")]) == 0
    assert main(common + ["--data_path", str(r / "voc"), "--output_dir", str(tmp_path / "c")]) == 0
    a, b, c = (_result(tmp_path / d, "discovery_results.json") for d in "abc")
    assert a["num_images"] == b["num_images"] == c["num_images"] == 10
    assert a["corloc"] == b["corloc"] == c["corloc"] and a["method"] == method


def test_lost_features_are_the_last_blocks_patch_keys(tiny_setup):
    import torch

    from dino_simpool.export import load_exported
    from eval.maps import patch_features

    for pooling, prefix in (("simpool", 0), ("cls", 1)):
        model = load_exported(tiny_setup / f"exp_{pooling}")
        x = torch.randn(2, 3, 32, 48)
        keys, grid = patch_features(model, x)
        assert grid == (4, 6) and keys.shape == (2, 24, 32)
        with torch.no_grad():
            t = model._blocks(x, 2)[0]  # input of the last block
            last = model.encoder.blocks[-1]
            ref = last.attn.qkv(last.norm1(t))[:, prefix:, 32:64]
        torch.testing.assert_close(keys, ref)


def test_metric_clis_clear_errors(tiny_setup, tmp_path, capsys):
    from eval import discovery, localization

    r = tiny_setup
    w = ["--pretrained_weights", str(r / "exp_simpool")]
    assert localization.main(w + ["--data_path", str(r / "data" / "val")]) == 2
    assert "needs --boxes" in capsys.readouterr().err
    (tmp_path / "partial.json").write_text(json.dumps({"circle/00000.png": [[1, 1, 5, 5]]}))
    assert localization.main(w + ["--data_path", str(r / "data" / "val"), "--boxes", str(tmp_path / "partial.json")]) == 2
    assert "have no entry" in capsys.readouterr().err
    boxes = json.loads((r / "data" / "boxes.json").read_text())
    boxes["val/circle/00000.png"] = []
    (tmp_path / "empty.json").write_text(json.dumps(boxes))
    assert discovery.main(w + ["--data_path", str(r / "data" / "val"), "--boxes", str(tmp_path / "empty.json")]) == 2
    err = capsys.readouterr().err
    assert "no ground-truth box" in err and len(err.strip().splitlines()) == 1
    assert discovery.main(w + ["--data_path", str(r / "data")]) == 2
    assert "not a VOC folder" in capsys.readouterr().err
    boxes["val/circle/00000.png"] = [1, 2, 3]
    (tmp_path / "three.json").write_text(json.dumps(boxes))
    assert localization.main(w + ["--data_path", str(r / "data" / "val"), "--boxes", str(tmp_path / "three.json")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'three.json'}: val/circle/00000.png: box 0 is [1, 2, 3]" in err and len(err.strip().splitlines()) == 1
    assert localization.main(["--pretrained_weights", str(tmp_path / "missing.pth")]) == 2


@pytest.mark.parametrize("arch,pooling", [("vit_tiny", "gap"), ("vit_tiny", "cls"), ("vit_tiny", "simpool"),
                                          ("resnet18", "gap")])
def test_similarity_map_is_cosine_to_the_pooled_vector(arch, pooling):
    """``--map similarity``: cosine of each location's final feature with ``model(x)``, for any pooling; GAP's
    ``auto`` map is it, since GAP's own attention is uniform (min-max normalised to zeros: no box at all)."""
    import torch

    from dino_simpool.models.backbones import build_backbone
    from eval.maps import attention_map, resolve_map_kind

    torch.manual_seed(0)
    kw = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4) if arch.startswith("vit") else {}
    model = build_backbone(arch=arch, pooling=pooling, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    sim = attention_map(model, x, "similarity")
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(model(x), dim=-1)
        if model.is_vit:
            feats = model.get_intermediate_layers(x, 1)[0][:, model.num_prefix_tokens:]
        else:
            feats = model.forward_features(x).flatten(2).transpose(1, 2)
        want = torch.einsum("bnd,bd->bn", torch.nn.functional.normalize(feats, dim=-1), pooled)
    assert sim.shape == (2, *((8, 8) if model.is_vit else (1, 1)))
    torch.testing.assert_close(sim.flatten(1), want, atol=1e-5, rtol=1e-5)
    assert resolve_map_kind(model, "auto") == {"gap": "similarity", "cls": "heads_mean",
                                               "simpool": "pool"}[pooling]
    if model.is_vit:
        assert float(sim.std()) > 1e-3  # not a constant map
