"""eval.discovery on VOC folders: only the image set's ids are evaluated (LOST: ImageSets/Main/trainval.txt)."""
import json

import numpy as np
import pytest
from PIL import Image

from dino_simpool.data import DataError
from eval.locdata import voc_samples

MODEL = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
         "--device", "cpu"]


def make_voc(root, ids=("000001", "000002", "000003", "000004"), image_sets=None):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for k, i in enumerate(ids):
        Image.fromarray(np.full((32, 40, 3), 40 * k, np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><object><bndbox><xmin>2</xmin><ymin>3</ymin>"
            f"<xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
    for name, listed in (image_sets or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in listed))
    return root


def test_voc_uses_the_image_set(tmp_path):
    root = make_voc(tmp_path / "VOC", image_sets={"trainval": ["000001", "000003"], "val": ["000004"]})
    assert [s.name for s in voc_samples(root)] == ["000001.jpg", "000003.jpg"]  # default: trainval
    assert [s.name for s in voc_samples(root, image_set="val")] == ["000004.jpg"]
    assert len(voc_samples(root, image_set=None)) == 4  # every annotation
    with pytest.raises(DataError, match="test.txt does not exist"):
        voc_samples(root, image_set="test")
    # a folder without ImageSets/ (e.g. a hand-made one) falls back to every annotation for the default
    assert len(voc_samples(make_voc(tmp_path / "plain"))) == 4
    # --annotations DIR + image folder: the image set is looked up beside DIR
    assert [s.name for s in voc_samples(root / "JPEGImages", root / "Annotations")] == ["000001.jpg", "000003.jpg"]


def test_voc_image_set_listing_a_missing_annotation(tmp_path):
    root = make_voc(tmp_path / "VOC", image_sets={"trainval": ["000001", "000042"]})
    with pytest.raises(DataError, match="000042.xml"):
        voc_samples(root)


def test_discovery_cli_image_set(tmp_path, capsys):
    from eval.discovery import main

    root = make_voc(tmp_path / "VOC", image_sets={"trainval": ["000002", "000003", "000004"]})
    assert main(MODEL + ["--data_path", str(root), "--output_dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "discovery_results.json").read_text())["num_images"] == 3
    assert main(MODEL + ["--data_path", str(root), "--image_set", "all", "--output_dir", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "discovery_results.json").read_text())["num_images"] == 4
    capsys.readouterr()
    assert main(MODEL + ["--data_path", str(root), "--image_set", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--image_set val" in err
