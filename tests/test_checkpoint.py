"""load_checkpoint: files that are not checkpoints, corrupt files and unsafe pickles get distinct, clear errors."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from dino_simpool.checkpoint import CheckpointError, load_checkpoint, save_atomic


class _Payload:  # unpickling it would call print: weights_only must refuse it without running it
    def __reduce__(self):
        return (print, ("this should never run",))


NOT_A_CHECKPOINT = "is not a PyTorch checkpoint, or it is corrupt or truncated"


@pytest.mark.parametrize("name, write, looks", [
    ("notes.txt", lambda p: p.write_text("hello world\n"), "a text file"),  # torch.load: KeyError 101
    ("recipe.yaml", lambda p: p.write_text("epochs: 10\nlr: [0.1, 0.2]\n"), "a text file"),  # IndexError
    ("boxes.json", lambda p: p.write_text('{"a.png": [[0, 0, 4, 4]]}'), "a text file"),  # UnpicklingError operand
    ("picture.png", lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p), "a PNG image"),
    ("empty.pth", lambda p: p.write_bytes(b""), "an empty file"),
])
def test_not_a_checkpoint_is_named_as_such(tmp_path, name, write, looks):
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert NOT_A_CHECKPOINT in msg and str(path) in msg and f"it looks like {looks}" in msg
    assert "arbitrary" not in msg and "\n" not in msg


def test_truncated_checkpoint_is_corrupt(tmp_path):
    good = save_atomic({"w": torch.randn(64, 64), "epoch": 3}, tmp_path / "good.pth")
    data = good.read_bytes()
    assert load_checkpoint(good)["epoch"] == 3
    for cut in (len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=NOT_A_CHECKPOINT) as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value) and "arbitrary" not in str(e.value)


def test_unsafe_pickle_is_refused_without_running_it(tmp_path, capsys):
    for legacy in (False, True):
        path = tmp_path / f"evil{int(legacy)}.pth"
        torch.save({"w": torch.zeros(2), "evil": _Payload()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=r"refusing to load .*arbitrary Python objects.*GLOBAL print"):
            load_checkpoint(path)
    assert "should never run" not in capsys.readouterr().out


def test_namespace_only_when_allowed(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"teacher": {"w": torch.ones(1)}, "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(CheckpointError, match="refusing.*argparse.Namespace"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_namespace=True)["args"].arch == "vit_small"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_evaluator_cli_exits_2_on_a_text_file(tmp_path, capsys):
    from eval.attention import main

    (tmp_path / "cfg.yaml").write_text("epochs: 10\n")
    assert main(["--checkpoint", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and NOT_A_CHECKPOINT in err and "cfg.yaml" in err


def test_save_atomic_gives_the_usual_file_mode_and_leaves_no_temporary(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_atomic({"w": torch.ones(2)}, tmp_path / "ck.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as torch.save/open would give, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
