"""k-NN search and vote (dino_simpool/evaluation/knn.py), the dino-simpool-knn command (eval/knn.py): backends agree with a float64 hand-written vote, hand-worked cases, CLI errors."""
import argparse
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

from dino_simpool.evaluation.knn import knn_classify
from eval.features import save_features
from eval.knn import main, remap_val_labels


def ref_vote(train, train_labels, test, test_labels, ks, T, num_classes):
    """float64, one query at a time, no tricks: DINO's protocol written out."""
    tr = np.asarray(train, dtype=np.float64)
    te = np.asarray(test, dtype=np.float64)
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    out = {}
    for k in ks:
        kk = min(k, len(tr))
        c1 = c5 = 0
        for q, y in zip(te, np.asarray(test_labels)):
            sims = tr @ q
            nn = np.argsort(-sims, kind="stable")[:kk]
            scores = [0.0] * num_classes
            for j in nn:
                scores[int(train_labels[j])] += math.exp(sims[j] / T)
            order = sorted(range(num_classes), key=lambda c: (-scores[c], c))
            top = order[:min(5, k, num_classes)]
            c1 += int(top[0] == y)
            c5 += int(y in top)
        out[k] = (100.0 * c1 / len(te), 100.0 * c5 / len(te))
    return out


@pytest.mark.parametrize("num_classes,T", [(7, 0.07), (3, 0.5), (12, 0.07)])
def test_backends_match_float64_reference(num_classes, T):
    g = torch.Generator().manual_seed(num_classes)
    train = torch.randn(400, 24, generator=g)
    test = torch.randn(60, 24, generator=g)
    # labels correlated with the features so that the accuracies are not trivial
    centers = torch.randn(num_classes, 24, generator=g) * 0.6
    train_labels = torch.randint(0, num_classes, (400,), generator=g)
    test_labels = torch.randint(0, num_classes, (60,), generator=g)
    train += centers[train_labels]
    test += centers[test_labels]
    train *= 3.0  # not unit length: knn_classify must normalise
    ks = (1, 5, 10, 20, 100)
    ref = ref_vote(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), ks, T, num_classes)
    rf, pf = knn_classify(train, train_labels, test, test_labels, ks=ks, T=T, backend="faiss", return_predictions=True)
    rt, pt = knn_classify(train, train_labels, test, test_labels, ks=ks, T=T, backend="torch", return_predictions=True)
    assert rf == ref
    assert rt == ref
    for k in ks:
        assert torch.equal(pf[k], pt[k])
    assert 0 < rf[20][0] < 100  # non-trivial


def test_prenormalised_bank_zero_copy_path_agrees():
    from dino_simpool.evaluation.knn import _FaissBlocks
    g = torch.Generator().manual_seed(2)
    raw, test = torch.randn(200, 16, generator=g) * 2, torch.randn(20, 16, generator=g)
    tl, sl = torch.randint(0, 6, (200,), generator=g), torch.randint(0, 6, (20,), generator=g)
    unit = torch.nn.functional.normalize(raw, dim=1)
    assert "zero-copy" in _FaissBlocks(test, True, 8, False, False, 64).name()
    assert "block by block" in _FaissBlocks(test, False, 8, False, False, 64).name()
    ks = (1, 7, 30)
    r_unit, p_unit = knn_classify(unit, tl, test, sl, ks=ks, return_predictions=True)
    r_raw, p_raw = knn_classify(raw, tl, test, sl, ks=ks, return_predictions=True)
    r_t, p_t = knn_classify(unit, tl, test, sl, ks=ks, backend="torch", return_predictions=True)
    assert r_unit == r_raw == r_t
    assert all(torch.equal(p_unit[k], p_raw[k]) and torch.equal(p_unit[k], p_t[k]) for k in ks)


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 16, generator=g), torch.randn(37, 16, generator=g)
    tl, sl = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (37,), generator=g)
    base = knn_classify(train, tl, test, sl, ks=(3, 10), backend="faiss")
    assert knn_classify(train, tl, test, sl, ks=(3, 10), backend="faiss", query_chunk=5, bank_block=7) == base
    assert knn_classify(train, tl, test, sl, ks=(3, 10), backend="torch", query_chunk=4) == base


# Hand-worked bank (already unit length): a=(1,0) class 0, b=(.8,.6) class 1, c=(.6,.8) class 1, d=(0,1) class 0.
BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
BANK_Y = torch.tensor([0, 1, 1, 0])
Q = torch.tensor([[2.0, 0.0]])  # one test image, label 0; sims = 1, .8, .6, 0


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_hand_worked_k1_and_temperature(backend):
    # k=1: nearest is a (class 0) -> correct.
    # k=3, T=0.07: class 0 gets e^(1/.07)=1.6e6, class 1 e^(.8/.07)+e^(.6/.07)=9.7e4 -> class 0 wins.
    # k=3, T=1:    class 0 gets e^1=2.718,      class 1 e^.8+e^.6=4.048          -> class 1 wins (top-1 wrong);
    #              top-5 looks at min(5, 3, 2 classes)=2 predictions -> correct.
    r = knn_classify(BANK, BANK_Y, Q, [0], ks=(1, 3), T=0.07, backend=backend)
    assert r == {1: (100.0, 100.0), 3: (100.0, 100.0)}
    r = knn_classify(BANK, BANK_Y, Q, [0], ks=(1, 3), T=1.0, backend=backend)
    assert r == {1: (100.0, 100.0), 3: (0.0, 100.0)}


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_larger_than_bank_is_clamped_with_warning(backend):
    # k=10 > 4 train images: all 4 vote. T=1: class 0 = e^1 + e^0 = 3.718 < class 1 = 4.048 -> wrong.
    with pytest.warns(UserWarning, match="larger than the train bank"):
        r = knn_classify(BANK, BANK_Y, Q, [0], ks=(4, 10), T=1.0, backend=backend)
    assert r[10] == r[4] == (0.0, 100.0)
    assert list(r) == [4, 10]  # reported under the k that was asked for


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_above_bank_still_counts_min_5_k_predictions_in_top5(backend):
    # 3 train images of classes 3, 4, 5 out of 6; the query is class 0, which got no vote. With k=10 the vote ranks
    # the 3 voted classes first, then the 0-score classes by id (0, 1, 2): top-5 = min(5, k=10) = 5 predictions
    # reach class 0; k=3 looks at 3 predictions only (the voted classes).
    bank = torch.eye(3, 4)
    labels = [3, 4, 5]
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match="larger than the train bank"):
        r = knn_classify(bank, labels, q, [0], ks=(3, 10), T=1.0, backend=backend, num_classes=6)
    assert r == {3: (0.0, 0.0), 10: (0.0, 100.0)}
    ref = ref_vote(bank.numpy(), np.array(labels), q.numpy(), np.array([0]), (3, 10), 1.0, 6)
    assert ref == r


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_class_score_tie_goes_to_lower_class_id(backend):
    # two identical train vectors with classes 2 and 1: equal scores -> class 1 ranks first
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = knn_classify(bank, [2, 1, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]), [1, 2], ks=(2,), backend=backend)
    assert r == {2: (50.0, 100.0)}


def test_top5_counts_min_5_k_predictions_and_missing_test_classes():
    # 8 classes, test set holds only classes 0 and 3; k=2 -> top-5 looks at 2 predictions only
    bank = torch.eye(8)
    labels = torch.arange(8)
    test = torch.stack([torch.eye(8)[0] + 0.5 * torch.eye(8)[1], torch.eye(8)[3] * 0.9 + torch.eye(8)[5]])
    r = knn_classify(bank, labels, test, [1, 3], ks=(1, 2, 8), backend="faiss")
    # image 1: nn order 0, 1 -> label 1 is 2nd: top-1 no, top-5 (k=1) no, (k=2) yes
    # image 2: nn order 5, 3 -> label 3 is 2nd: same
    assert r[1] == (0.0, 0.0)
    assert r[2] == (0.0, 100.0)
    assert r[8] == (0.0, 100.0)
    assert r == knn_classify(bank, labels, test, [1, 3], ks=(1, 2, 8), backend="torch")


def test_fewer_than_5_classes_and_few_test_images_do_not_crash():
    g = torch.Generator().manual_seed(3)
    train, tl = torch.randn(50, 8, generator=g), torch.randint(0, 2, (50,), generator=g)
    with pytest.warns(UserWarning, match="larger than the train bank"):  # 2 classes, 3 test images, k > bank
        r = knn_classify(train, tl, train[:3], tl[:3], ks=(10, 20, 100, 200))
    for k, (t1, t5) in r.items():
        assert t5 == 100.0 and 0 <= t1 <= 100


def test_num_classes_argument_and_label_checks():
    r = knn_classify(BANK, BANK_Y, Q, [0], ks=(1,), num_classes=10)
    assert r == {1: (100.0, 100.0)}
    with pytest.raises(ValueError, match="not a train class"):
        knn_classify(BANK, BANK_Y, Q, [5], ks=(1,))
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(BANK, BANK_Y, Q, [0], ks=(1,), num_classes=1)


@pytest.mark.parametrize("ks", [(0,), (10, -1), (2.5,)])
def test_bad_k_raises(ks):
    with pytest.raises(ValueError, match="positive integer"):
        knn_classify(BANK, BANK_Y, Q, [0], ks=ks)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="backend"):
        knn_classify(BANK, BANK_Y, Q, [0], backend="annoy")
    with pytest.raises(ValueError, match="dim"):
        knn_classify(BANK, BANK_Y, torch.ones(1, 3), [0])
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(BANK, BANK_Y, Q, [0], T=0)
    with pytest.raises(ValueError, match="empty"):
        knn_classify(BANK[:0], BANK_Y[:0], Q, [0])
    with pytest.raises(ValueError, match="use_gpu=True"):
        if not torch.cuda.is_available():
            knn_classify(BANK, BANK_Y, Q, [0], ks=(1,), use_gpu=True)
        else:  # pragma: no cover
            raise ValueError("use_gpu=True (skipped on a GPU machine)")


def test_remap_val_labels_by_class_name():
    # val lacks class "b": ImageFolder would number val's "c" as 1; it must become train's 2
    assert remap_val_labels(["a", "b", "c"], ["a", "c"], torch.tensor([0, 1, 1])).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="not train classes"):
        remap_val_labels(["a", "b"], ["a", "z"], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _dump(tmp_path, fmt="safetensors"):
    g = torch.Generator().manual_seed(5)
    train, tl = torch.randn(120, 16, generator=g), torch.randint(0, 4, (120,), generator=g)
    test, sl = torch.randn(30, 16, generator=g), torch.randint(0, 4, (30,), generator=g)
    d = save_features(tmp_path / "feats", train, tl, test, sl, ["w", "x", "y", "z"], fmt=fmt)
    return d, (train, tl, test, sl)


@pytest.mark.parametrize("backend", ["faiss", "torch", "gloo"])
def test_cli_load_features_prints_table_and_writes_json(tmp_path, capsys, backend):
    d, (train, tl, test, sl) = _dump(tmp_path)
    out = tmp_path / "out"
    rc = main(["--load_features", str(d), "--nb_knn", "1", "5", "20", "--output_dir", str(out),
               "--backend", backend, "--use_cuda", "false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "top-5" in text
    res = json.loads((out / "knn_results.json").read_text())
    expect = knn_classify(train, tl, test, sl, ks=(1, 5, 20), backend="torch")
    for k, (t1, t5) in expect.items():
        assert res["results"][str(k)] == {"top1": t1, "top5": t5}
    assert res["search_backend"] == ("torch" if backend == "torch" else "faiss")
    assert res["num_classes"] == 4 and res["n_test"] == 30


@pytest.mark.parametrize("argv,match", [
    (["--nb_knn", "0"], "positive integer"),
    (["--nb_knn", "10", "-5"], "positive integer"),
    (["--temperature", "0"], "temperature"),
    (["--load_features", "/nonexistent/feats"], "no such folder"),
    (["--mode", "official", "--pooling", "simpool"], "--mode official"),
])
def test_cli_bad_flags_exit_2(tmp_path, capsys, argv, match):
    rc = main(argv + ["--output_dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_cli_empty_folder_and_unknown_val_class_exit_2(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    assert main(["--data_path", str(root), "--output_dir", str(tmp_path)]) == 2
    assert "is empty" in capsys.readouterr().err
    for split, cls in [("train", "cat"), ("val", "cat"), ("val", "dog")]:
        (root / split / cls).mkdir()
        (root / split / cls / "x.png").write_bytes(b"not really a png")
    assert main(["--data_path", str(root), "--output_dir", str(tmp_path)]) == 2
    assert "['dog'] are not train classes" in capsys.readouterr().err


def test_cli_checkpoint_arch_mismatch_exit_2(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path)
    rc = main(["--pretrained_weights", str(ckpt), "--arch", "resnet_test", "--output_dir", str(tmp_path),
               "--num_workers", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_cli_key_mismatch_lists_missing_unexpected_and_mis_shaped_keys(tmp_path, capsys):
    """As training and export do: the whole report on one line, not only its first line."""
    ckpt = _tiny_checkpoint(tmp_path)  # vit_tiny, depth 1, patch 8
    rc = main(["--pretrained_weights", str(ckpt), "--depth", "2", "--patch_size", "4", "--output_dir", str(tmp_path),
               "--num_workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "missing keys" in err and "encoder.blocks.1.attn.qkv.weight" in err
    assert "unexpected keys (0)" in err
    assert "shape mismatches" in err and "encoder.patch_embed.proj.weight: checkpoint (32, 3, 8, 8)" in err


def _tiny_checkpoint(tmp_path):
    models = pytest.importorskip("dino_simpool.models")
    if not hasattr(models, "build_backbone"):
        pytest.skip("dino_simpool.models.build_backbone is not written yet")
    from dino_simpool.checkpoint import save_atomic
    m = models.build_backbone("vit_tiny", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    sd = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    return save_atomic({"teacher": sd, "config": {"backbone": m.config}}, tmp_path / "checkpoint.pth")


@pytest.mark.slow
def test_cli_end_to_end_imagefolder_dump_then_load(tmp_path, capsys):
    from PIL import Image
    ckpt = _tiny_checkpoint(tmp_path)
    root = tmp_path / "data"
    g = np.random.default_rng(0)
    # val lacks class "b": its "c" must be mapped to train's id 2
    for split, classes, n in [("train", "abc", 3), ("val", "ac", 2)]:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = (g.random((32, 32, 3)) * 255).astype("uint8")
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    common = ["--nb_knn", "1", "3", "--output_dir", str(tmp_path / "o1"), "--num_workers", "0"]
    rc = main(["--pretrained_weights", str(ckpt), "--data_path", str(root), "--resize", "32", "--crop", "32",
               "--batch_size_per_gpu", "4", "--dump_features", str(tmp_path / "f")] + common)
    assert rc == 0, capsys.readouterr().err
    first = json.loads((tmp_path / "o1" / "knn_results.json").read_text())
    assert first["n_train"] == 9 and first["n_test"] == 4 and first["num_classes"] == 3
    from eval.features import load_features
    b = load_features(tmp_path / "f")
    assert b["classes"] == ["a", "b", "c"] and b["test_labels"].tolist() == [0, 0, 2, 2]
    common[common.index(str(tmp_path / "o1"))] = str(tmp_path / "o2")
    assert main(["--load_features", str(tmp_path / "f")] + common) == 0
    second = json.loads((tmp_path / "o2" / "knn_results.json").read_text())
    assert second["results"] == first["results"]


# ------------------------------------------------------------------------------------------------ issue 13 §4
def test_cli_loads_a_dino_pth_dump(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    train, tl = torch.randn(120, 16, generator=g), torch.randint(0, 4, (120,), generator=g)
    test, sl = torch.randn(30, 16, generator=g), torch.randint(0, 4, (30,), generator=g)
    d = tmp_path / "dino"
    d.mkdir()
    for name, t in [("trainfeat", train), ("testfeat", test), ("trainlabels", tl), ("testlabels", sl)]:
        torch.save(t, d / f"{name}.pth")  # DINO's eval_knn.py --dump_features
    assert main(["--load_features", str(d), "--nb_knn", "1", "5", "--output_dir", str(tmp_path / "o"),
                 "--use_cuda", "false"]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "knn_results.json").read_text())
    expect = knn_classify(train, tl, test, sl, ks=(1, 5), backend="torch")
    assert res["results"] == {str(k): {"top1": a, "top5": b} for k, (a, b) in expect.items()}
    assert res["n_train"] == 120 and res["num_classes"] == 4


def test_cli_help_shows_every_default(capsys):
    from eval.knn import build_parser
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for want in ("(default: 128)", "(default: [10, 20, 100, 200])", "(default: 0.07)", "(default: auto)",
                 "(default: safetensors)", "(default: 0)"):
        assert want in text, want
    fmt = p.formatter_class(prog="x")
    for a in p._actions:  # every flag with a default says what it is
        if a.option_strings and a.default is not argparse.SUPPRESS and a.help is not argparse.SUPPRESS:
            assert "default" in (fmt._get_help_string(a) or "").lower(), a.option_strings


def test_cli_num_workers_default_counts_this_tasks_cpus(monkeypatch):
    from eval.knn import build_parser
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert build_parser().parse_args([]).num_workers == 1  # one CPU: not 10 workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert build_parser().parse_args([]).num_workers == 10


def test_cli_random_init_seed_and_dino_dump_format(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "data"
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray((g.random((32, 32, 3)) * 255).astype("uint8")).save(root / split / c / f"{i}.png")
    tiny = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
            "--data_path", str(root), "--resize", "32", "--crop", "32", "--num_workers", "0", "--nb_knn", "1",
            "--use_cuda", "false", "--dump_format", "dino"]

    def feats(seed, name):
        argv = tiny + ["--dump_features", str(tmp_path / name), "--output_dir", str(tmp_path / name)]
        assert main(argv + (["--seed", seed] if seed else [])) == 0, capsys.readouterr().err
        return torch.load(tmp_path / name / "trainfeat.pth", weights_only=True)

    a, b, c, default = feats("1", "a"), feats("1", "b"), feats("2", "c"), feats(None, "d")
    assert a.shape == (6, 32) and torch.equal(a, b)  # same seed, same random-init baseline
    assert not torch.allclose(a, c) and torch.equal(default, feats("0", "e"))
    assert json.loads((tmp_path / "a" / "knn_results.json").read_text())["seed"] == 1
    assert main(["--load_features", str(tmp_path / "a"), "--nb_knn", "1", "--output_dir", str(tmp_path / "f"),
                 "--use_cuda", "false"]) == 0
    assert (json.loads((tmp_path / "f" / "knn_results.json").read_text())["results"]
            == json.loads((tmp_path / "a" / "knn_results.json").read_text())["results"])
