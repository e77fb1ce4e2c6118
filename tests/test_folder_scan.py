"""The folder scan on real folders with real links (issue 11 §3) and both dataset layouts (issue 13 §1).

Each link is followed at most once, each image counted once (under the class of its real file), unreadable
sub-folders are skipped, and one warning counts what was skipped; the same scanner serves every evaluator."""
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_simpool.data import DataError, SafeImageFolder, SyntheticShapes, build_dataset
from dino_simpool.data import folder as folder_mod
from dino_simpool.data.folder import resolve_split_root, scan_class_folders, scan_images
from dino_simpool.train import main
from eval.knn import check_imagefolder
from eval.locdata import folder_json_samples
from eval.maps import list_images_named

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def make_tree(root: Path, classes=("cat_a", "cat_b", "cat_c"), top=5, nested=6) -> int:
    """``root/<class>/{0..top-1}.png`` and ``root/<class>/sub/{0..nested-1}.png``; returns the number of images."""
    for k, c in enumerate(classes):
        for j in range(top):
            _png(root / c / f"{j}.png", 10 * k + j)
        for j in range(nested):
            _png(root / c / "sub" / f"{j}.png", 100 + 10 * k + j)
    return len(classes) * (top + nested)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == folder_mod.__name__]


def real_class(path: str, root: Path) -> str:
    return Path(os.path.realpath(path)).relative_to(root.resolve()).parts[0]


# ------------------------------------------------------------------------------------------------------ link loops
def test_loop_to_parent_counts_each_image_once_with_its_own_label(tmp_path, caplog):
    """The issue's case: ``cat_b/loop -> ..`` made 33 files 1230 samples, other classes' images labelled cat_b."""
    root = tmp_path / "ds"
    n = make_tree(root)
    os.symlink("..", root / "cat_b" / "loop")
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(root)
    assert len(ds) == n == 33
    assert Counter(ds.targets) == {0: 11, 1: 11, 2: 11}
    for path, label in ds.samples:  # every image under the class where its file lies
        assert real_class(path, root) == ds.classes[label]
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == n
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "1 link loop" in msgs[0] and "cat_b/loop" in msgs[0]
    assert ds.scan_report.counts == {"loops": 1, "duplicates": 0, "unreadable": 0, "broken": 0}


def scan_in_child(root: Path, timeout: float = 60) -> dict:
    """SafeImageFolder(root) in a child process with a 1 GiB address-space limit and a timeout, so that a walk that
    follows loops (exponential in their number) fails the test instead of the machine: its length, label counts,
    skip counts, peak RSS (KiB) and stderr."""
    code = textwrap.dedent(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from collections import Counter
        from dino_simpool.data import SafeImageFolder
        ds = SafeImageFolder({str(root)!r})
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]  # peak RSS, KiB
        print(json.dumps(dict(n=len(ds), labels=Counter(ds.targets), counts=getattr(ds, "scan_report", None)
                              and ds.scan_report.counts, hwm_kib=int(hwm))))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    out["labels"] = {int(k): v for k, v in out["labels"].items()}
    out["stderr"] = r.stderr
    return out


def test_loops_to_the_root_absolute_and_above_it(tmp_path):
    root = tmp_path / "ds"
    n = make_tree(root)
    os.symlink(str(root), root / "cat_a" / "sub" / "to_root")             # absolute link to the dataset root
    os.symlink("../../..", root / "cat_c" / "sub" / "above_root")         # to the folder that holds the root
    os.symlink(str(tmp_path), root / "cat_b" / "above_abs")                 # absolute, to the same folder
    os.symlink("self_loop", root / "cat_a" / "self_loop")                   # a link that resolves to itself
    r = scan_in_child(root)
    assert r["n"] == n and r["labels"] == {0: 11, 1: 11, 2: 11}
    assert r["counts"]["loops"] == 4
    assert r["stderr"].count("scan of ") == 1 and "4 link loop" in r["stderr"]  # one warning


def test_many_loops_stay_bounded_in_a_real_process(tmp_path):
    """Two loops exhausted 23 GB before. Three nested loops (a walk that follows them grows exponentially): the scan
    finishes in the child within its 1 GiB address space and 60 s, with a small peak RSS."""
    root = tmp_path / "ds"
    n = make_tree(root)
    os.symlink("..", root / "cat_b" / "loop")
    os.symlink("../..", root / "cat_a" / "sub" / "loop2")
    os.symlink("..", root / "cat_c" / "sub" / "loop3")
    r = scan_in_child(root)
    assert r["n"] == n and r["counts"]["loops"] == 3
    assert r["hwm_kib"] < 200 * 1024, r["hwm_kib"]
    assert "3 link loop" in r["stderr"]


# ------------------------------------------------------------------------------------------------------ links to files
def test_link_to_another_class_image_counts_under_its_real_class(tmp_path, caplog):
    root = tmp_path / "ds"
    n = make_tree(root)
    # cat_a (scanned first) links to an image of cat_c: the image stays cat_c's, the link is a skipped duplicate
    os.symlink("../../cat_c/0.png", root / "cat_a" / "sub" / "zz_from_c.png")
    # a chain of links, through a linked folder, to an image of cat_b
    os.symlink("../cat_b", root / "cat_a" / "b_link")                     # (a duplicate folder itself)
    os.symlink("../b_link/1.png", root / "cat_a" / "sub" / "chain_1.png")
    os.symlink("chain_1.png", root / "cat_a" / "sub" / "chain_2.png")
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(root)
    assert len(ds) == n and Counter(ds.targets) == {0: 11, 1: 11, 2: 11}
    paths = {p: ds.classes[k] for p, k in ds.samples}
    assert paths[str(root / "cat_c" / "0.png")] == "cat_c" and paths[str(root / "cat_b" / "1.png")] == "cat_b"
    assert not any(name in p for p in paths for name in ("zz_from_c", "chain_", "b_link"))
    assert ds.scan_report.counts["duplicates"] == 4
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "4 duplicate" in msgs[0] and "same file as" in msgs[0]


def test_links_to_files_and_folders_outside_the_root_are_followed_once(tmp_path, caplog):
    root = tmp_path / "ds"
    n = make_tree(root)
    outside = tmp_path / "elsewhere"
    _png(outside / "x.png", 200)
    for j in range(3):
        _png(outside / "more" / f"{j}.png", 210 + j)
    os.symlink(outside / "x.png", root / "cat_a" / "linked.png")
    os.symlink(outside / "more", root / "cat_b" / "more")          # a folder outside: walked once ...
    os.symlink(outside / "more", root / "cat_c" / "more_again")    # ... not twice (another class)
    os.symlink(outside / "nothing.png", root / "cat_c" / "broken.png")
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(root)
    assert len(ds) == n + 1 + 3
    labels = {p: ds.classes[k] for p, k in ds.samples}
    assert labels[str(root / "cat_a" / "linked.png")] == "cat_a"
    assert [labels[str(root / "cat_b" / "more" / f"{j}.png")] for j in range(3)] == ["cat_b"] * 3
    assert not any("more_again" in p for p in labels)
    assert ds.scan_report.counts == {"loops": 0, "duplicates": 1, "unreadable": 0, "broken": 1}
    # os.walk order is kept: a folder's files, then its sub-folders; links in place
    cat_b = [os.path.relpath(p, root) for p, k in ds.samples if ds.classes[k] == "cat_b"]
    assert cat_b[:5] == [f"cat_b/{j}.png" for j in range(5)] and cat_b[5:8] == [f"cat_b/more/{j}.png" for j in range(3)]
    assert len(warnings_of(caplog)) == 1


def test_linked_class_folders_work_and_a_duplicate_class_is_refused(tmp_path):
    store = tmp_path / "store"
    make_tree(store)
    root = tmp_path / "subset"  # an ImageNet-100 style subset: one link per class folder
    root.mkdir()
    os.symlink(store / "cat_a", root / "a")
    os.symlink(store / "cat_c", root / "c")
    ds = SafeImageFolder(root)
    assert ds.classes == ["a", "c"] and len(ds) == 22 and ds.scan_report.skipped == 0
    os.symlink(store / "cat_a", root / "b_same_as_a")
    with pytest.raises(DataError, match="are the same folder"):
        SafeImageFolder(root)


# ------------------------------------------------------------------------------------------------------ unreadable
def test_unreadable_subfolder_chmod():
    """A real chmod 000 folder, scanned in a child process. Root reads through chmod 000, so as root the child drops
    to the ``nobody`` user (uid/gid 65534) after its imports; the tree then lies in a world-readable temp folder."""
    base = Path(tempfile.mkdtemp(prefix="dino_simpool_chmod_"))
    try:
        base.chmod(0o755)
        root = base / "ds"
        n = make_tree(root)
        locked = root / "cat_b" / "sub"
        locked.chmod(0)
        drop = "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)" if IS_ROOT else ""
        code = textwrap.dedent(f"""
            import json, os
            from dino_simpool.data import SafeImageFolder
            {drop}
            ds = SafeImageFolder({str(root)!r})
            print(json.dumps(dict(n=len(ds), counts=ds.scan_report.counts)))
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if IS_ROOT and "PermissionError" in r.stderr and "setres" in r.stderr:
            pytest.skip("running as root without the right to drop to uid 65534: cannot make a folder unreadable "
                        "(test_unreadable_subfolder_simulated covers the path)")
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert out["n"] == n - 6 and out["counts"]["unreadable"] == 1
        assert r.stderr.count("scan of ") == 1 and "1 unreadable folder" in r.stderr and "cat_b/sub" in r.stderr
        assert "Permission denied" in r.stderr
    finally:
        for p in base.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base)


def test_unreadable_subfolder_simulated(tmp_path, caplog, monkeypatch):
    """The same as the chmod test for a root user: os.scandir raises the PermissionError that chmod 000 would give
    (only this one folder's listing is faked; the tree and every other listing are real)."""
    root = tmp_path / "ds"
    n = make_tree(root)
    locked = str(root / "cat_b" / "sub")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(folder_mod.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(root)
    assert len(ds) == n - 6 and Counter(ds.targets) == {0: 11, 1: 5, 2: 11}
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "1 unreadable folder" in msgs[0] and "Permission denied" in msgs[0]
    # an unreadable class folder itself is an error (dropping it would shift every later label)
    locked = str(root / "cat_c")
    with pytest.raises(DataError, match="cannot read the class folder .*cat_c.*Permission denied"):
        SafeImageFolder(root)


# ------------------------------------------------------------------------------------------------------ evaluators
def test_evaluators_read_folders_through_the_same_scan(tmp_path, caplog):
    """eval.maps (attention maps) and eval.locdata (localization, discovery) list each image once and follow links
    to folders (pathlib's rglob listed a linked image twice and skipped a linked folder)."""
    root = tmp_path / "ds"
    n = make_tree(root, classes=("a", "b"))
    outside = tmp_path / "elsewhere"
    for j in range(2):
        _png(outside / f"{j}.png", 220 + j)
    os.symlink("..", root / "b" / "loop")
    os.symlink("../a/0.png", root / "b" / "dup.png")
    os.symlink(outside, root / "b" / "linked_dir")
    with caplog.at_level(logging.WARNING):
        found = list_images_named([root])
    files = [f for f, _ in found]
    assert len(files) == n + 2 and len({os.path.realpath(f) for f in files}) == n + 2
    assert root / "b" / "linked_dir" / "0.png" in files and root / "b" / "dup.png" not in files
    assert len(warnings_of(caplog)) == 1
    boxes = {f.relative_to(root).as_posix(): [[0, 0, 4, 4]] for f in files}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    samples = folder_json_samples(root, tmp_path / "boxes.json")
    assert sorted(s.name for s in samples) == sorted(boxes)


def test_scan_images_unreadable_root_is_a_clear_error(tmp_path, monkeypatch):
    real_scandir = os.scandir
    monkeypatch.setattr(folder_mod.os, "scandir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(p))) if os.fspath(p) == str(tmp_path) else real_scandir(p))
    with pytest.raises(DataError, match="cannot read the folder .*Permission denied"):
        scan_images(tmp_path)


# ------------------------------------------------------------------------------------------------------ layouts
def test_both_dataset_layouts(tmp_path):
    """DINO: --data_path /path/to/imagenet/train (a folder of class folders); SimPool: a folder with train/, val/."""
    dino = tmp_path / "imagenet" / "train"
    make_tree(dino, classes=("n01", "n02"), top=2, nested=0)
    make_tree(tmp_path / "imagenet" / "val", classes=("n01", "n02"), top=1, nested=0)
    a = build_dataset(str(dino), "train")
    assert a.root == str(dino) and a.classes == ["n01", "n02"] and len(a) == 4
    b = build_dataset(str(tmp_path / "imagenet"), "train")
    assert b.root == str(dino) and b.classes == a.classes and b.samples == a.samples
    assert len(build_dataset(str(tmp_path / "imagenet"), "val")) == 2
    # the val split of a class-folder root: a clear error that says what to pass (and where it is here)
    with pytest.raises(DataError) as e:
        build_dataset(str(dino), "val")
    msg = str(e.value)
    assert "folder of class folders" in msg and "train/ and val/" in msg and str(tmp_path / "imagenet") in msg
    # a split root without the split asked for
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    make_tree(tmp_path / "only_train" / "train", classes=("x",), top=1, nested=0)
    with pytest.raises(DataError, match="only_train/val does not exist"):
        build_dataset(str(tmp_path / "only_train"), "val")


def test_error_message_no_longer_calls_simpools_layout_dinos(tmp_path):
    make_tree(tmp_path / "root" / "val", classes=("x",), top=1, nested=0)
    with pytest.raises(DataError) as e:
        build_dataset(str(tmp_path / "root"), "train")
    assert "DINO layout" not in str(e.value) and "train/" in str(e.value)


def test_layout_ambiguities(tmp_path, caplog):
    # a class literally named "train" whose images sit directly in it is a class (DINO layout)
    cls_root = tmp_path / "classes"
    make_tree(cls_root, classes=("dog", "train"), top=2, nested=0)
    ds = build_dataset(str(cls_root), "train")
    assert ds.classes == ["dog", "train"] and ds.root == str(cls_root)
    # a root with train/ of class folders *and* folders of images beside it: train/ wins, with a warning naming them
    mixed = tmp_path / "mixed"
    make_tree(mixed / "train", classes=("a", "b"), top=1, nested=0)
    make_tree(mixed, classes=("stray",), top=1, nested=0)
    (mixed / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(str(mixed), "train")
    assert ds.root == str(mixed / "train") and ds.classes == ["a", "b"]
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "stray" in msgs[0] and "notes" not in msgs[0]
    assert resolve_split_root(mixed, "train") == str(mixed / "train")


def test_scan_class_folders_api(tmp_path):
    make_tree(tmp_path, classes=("b", "a", ".hidden"), top=2, nested=1)
    (tmp_path / "a" / ".secret.png").write_bytes(b"")
    classes, per_class, report = scan_class_folders(tmp_path)
    assert classes == ["a", "b"] and [len(f) for f in per_class] == [3, 3] and report.skipped == 0
    assert report.summary() == ""


# ------------------------------------------------------------------------------------------------------ the trainer
TINY_TRAIN = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
              "--batch_size_per_gpu", "4", "--num_workers", "0", "--global_crops_size", "32", "--local_crops_size",
              "16", "--local_crops_number", "2", "--out_dim", "64", "--epochs", "1", "--warmup_epochs", "0",
              "--warmup_teacher_temp_epochs", "0", "--optimizer", "adamw", "--lr", "5e-4", "--min_lr", "1e-6"]


def _export(root: Path, split: str) -> None:
    SyntheticShapes(split, image_size=32, images_per_class=2, num_classes=2).export_imagefolder(root)


def test_trainer_periodic_knn_on_a_class_folder_root_says_what_to_pass(tmp_path, capsys):
    _export(tmp_path / "imagenet", "train")
    rc = main(TINY_TRAIN + ["--data_path", str(tmp_path / "imagenet" / "train"), "--eval_every", "1",
                            "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "folder of class folders" in err and "train/ and val/" in err and "--eval_every 0" in err


@pytest.mark.slow
def test_trainer_runs_dinos_command_line_layout(tmp_path):
    """DINO's README: --data_path /path/to/imagenet/train, here with the periodic k-NN off."""
    _export(tmp_path / "imagenet", "train")
    out = tmp_path / "run"
    rc = main(TINY_TRAIN + ["--data_path", str(tmp_path / "imagenet" / "train"), "--eval_every", "0",
                            "--max_iters", "1", "--output_dir", str(out)])
    assert rc == 0 and (out / "checkpoint.pth").is_file()


def test_knn_folder_check_reads_through_the_same_helpers(tmp_path, monkeypatch):
    """eval.knn's early check: linked class folders count, hidden ones do not, an unreadable split is one clear
    ValueError (simulated with a PermissionError from os.scandir, as in test_unreadable_subfolder_simulated)."""
    store = tmp_path / "store"
    make_tree(store, classes=("cat", "dog"), top=1, nested=0)
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        os.symlink(store / "cat", root / split / "cat")
    (root / "val" / ".cache").mkdir()  # hidden: not a class
    check_imagefolder(root)
    real_scandir = os.scandir
    locked = str(root / "val")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(folder_mod.os, "scandir", scandir)
    with pytest.raises(ValueError, match="cannot read .*val"):
        check_imagefolder(root)


def test_order_is_os_walks_on_trees_without_loops_or_duplicates(tmp_path):
    """Where os.walk(followlinks=True) is right (no loop, no image reached twice), the scan returns its images in
    its order: links to files sorted among the plain files, linked folders among the sub-folders."""
    root = tmp_path / "ds"
    outside = tmp_path / "outside"
    for j in (1, 3):
        _png(root / "a" / f"{j}.png")
        _png(root / "a" / "m" / f"{j}.png")
    for j in (0, 2, 4):
        _png(outside / f"f{j}.png")
        _png(outside / "tree" / f"{j}.png")
        _png(outside / "tree" / "deep" / f"{j}.png")
    os.symlink(outside / "f0.png", root / "a" / "0.png")        # sorts before 1.png
    os.symlink(outside / "f2.png", root / "a" / "2.png")        # between 1.png and 3.png
    os.symlink(outside / "f4.png", root / "a" / "m" / "2.png")
    os.symlink(outside / "tree", root / "a" / "l_tree")         # a linked folder between m/ and z/
    _png(root / "a" / "z" / "0.png")
    _png(root / "a" / "m" / "sub" / "0.png")
    expected = []
    for dirpath, dirnames, filenames in os.walk(root / "a", followlinks=True):
        dirnames.sort()
        expected += [os.path.join(dirpath, f) for f in sorted(filenames)]
    classes, per_class, report = scan_class_folders(root)
    assert classes == ["a"] and report.skipped == 0
    assert per_class[0] == expected and len(expected) == 4 + 3 + 6 + 2
