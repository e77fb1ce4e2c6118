"""eval.boxes: JSON box files are validated entry by entry; connected components for the DINO-seg box."""
import json

import numpy as np
import pytest

from dino_simpool.data import DataError
from eval.boxes import largest_component_box, load_boxes_json, load_boxes_voc, mask_boxes


def write(tmp_path, text, name="boxes.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json_flat_box_is_one_box(tmp_path):
    path = write(tmp_path, json.dumps({"x.png": [1, 2, 3, 4], "y.png": [[0, 0, 5, 5], [1.5, 1, 2, 2]], "z.png": []}))
    assert load_boxes_json(path) == {"x.png": [[1.0, 2.0, 3.0, 4.0]],
                                     "y.png": [[0.0, 0.0, 5.0, 5.0], [1.5, 1.0, 2.0, 2.0]], "z.png": []}


@pytest.mark.parametrize("entry, match", [
    ([1, 2, 3], r"box 0 is \[1, 2, 3\]"),  # 3 numbers: was a reshape error without the file or key
    ([[1, 2, 3, 4], [1, 2, 3]], r"box 1 is \[1, 2, 3\]"),
    ([[1, 2, 3, 4], 5], "box 1 is 5"),  # mixed flat / nested
    ({"x0": 1}, "expected a list of"),
    ("1 2 3 4", "expected a list of"),
    ([["1", 2, 3, 4]], "box 0 is"),
    ([True, 2, 3, 4], "box 0 is"),
    ([[5, 5, 2, 8]], r"box 0 \[5.0, 5.0, 2.0, 8.0\] is empty.*not \[x, y, w, h\]"),
])
def test_json_bad_entry_names_file_and_key(tmp_path, entry, match):
    path = write(tmp_path, json.dumps({"ok.png": [[0, 0, 1, 1]], "sub/bad.png": entry}))
    with pytest.raises(DataError, match=match) as e:
        load_boxes_json(path)
    assert str(e.value).startswith(f"{path}: sub/bad.png: ")


def test_json_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, '{"x.png": [[1, 2, 3, 4]],}')
    with pytest.raises(DataError, match=r"not valid JSON") as e:
        load_boxes_json(path)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match="expected a JSON object.*got a JSON list"):
        load_boxes_json(write(tmp_path, "[[1, 2, 3, 4]]", "list.json"))
    with pytest.raises(DataError, match="boxes file not found"):
        load_boxes_json(tmp_path / "missing.json")


def test_voc_reads_only_the_listed_ids(tmp_path):
    for i in ("000001", "000002", "000003"):
        (tmp_path / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax>"
            f"<ymax>5</ymax></bndbox></object></annotation>")
    assert sorted(load_boxes_voc(tmp_path)) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert load_boxes_voc(tmp_path, ["000003", "000001"]) == {"000003.jpg": [[0.0, 0.0, 4.0, 5.0]],
                                                             "000001.jpg": [[0.0, 0.0, 4.0, 5.0]]}
    with pytest.raises(FileNotFoundError, match="000009.xml"):
        load_boxes_voc(tmp_path, ["000001", "000009"])
    (tmp_path / "000004.xml").write_text("<annotation><filename>4.jpg</filename>")
    with pytest.raises(DataError, match="000004.xml: not valid XML"):
        load_boxes_voc(tmp_path)


def diagonal_mask():
    """Three patches touching only at corners (a diagonal), and a separate horizontal pair."""
    m = np.zeros((6, 8), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True
    m[4, 5:7] = True
    return m


def test_largest_component_connectivity_known_answer():
    m = diagonal_mask()
    assert largest_component_box(m) == (5.0, 4.0, 7.0, 5.0)  # 4-connectivity (scipy / LOST): the pair wins
    assert largest_component_box(m, connectivity=4) == (5.0, 4.0, 7.0, 5.0)
    assert largest_component_box(m, connectivity=8) == (0.0, 0.0, 3.0, 3.0)  # diagonals join: 3 patches
    assert largest_component_box(np.zeros((3, 3), bool)) is None
    with pytest.raises(ValueError, match="connectivity"):
        largest_component_box(m, connectivity=6)


def test_maxboxacc_boxes_keep_8_connectivity():
    # MaxBoxAccV2 boxes the contours cv2.findContours finds, whose borders are 8-connected
    assert sorted(mask_boxes(diagonal_mask())) == [(0.0, 0.0, 3.0, 3.0), (5.0, 4.0, 7.0, 5.0)]
