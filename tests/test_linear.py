"""Linear probe (eval/linear.py, eval/linear_heads.py).

Most tests use tiny stand-in backbones that implement the Backbone contract's methods (``is_vit``, ``embed_dim``,
``patch_size``, ``config``, ``pooled_layers``, ``get_intermediate_layers``) on a separable "blobs" dataset of
3×8×8 tensors, so they run in milliseconds. The tests at the end use the real backbones and the embedded dataset.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_simpool.checkpoint import CheckpointError, load_checkpoint
from dino_simpool.data import DataError
from eval import linear
from eval.linear_heads import FeatureExtractor, LinearHeads, cosine_lr, make_specs, parse_feature_set, topk_correct



# ------------------------------------------------------------------------------------------------- stand-ins
class TinyViT(nn.Module):
    """Stand-in ViT: patch conv, residual MLP blocks, final norm; [CLS] first when pooling == "cls"."""

    is_vit = True

    def __init__(self, dim=16, depth=4, patch=4, pooling="simpool"):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim, generator=g)) if pooling == "cls" else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.embed_dim, self.patch_size = dim, patch
        self.config = {"arch": "tiny_standin", "pooling": pooling, "depth": depth, "embed_dim": dim}
        with torch.no_grad():
            for name, p in self.named_parameters():  # all from the fixed generator: the same model every time
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0))

    def get_intermediate_layers(self, x, n=1):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = t + blk(t)
            if i >= len(self.blocks) - n:
                outs.append(self.norm(t))
        return outs

    def pooled_layers(self, x, n=1):
        outs = self.get_intermediate_layers(x, n)
        if self.cls_token is not None:
            return [o[:, 0] for o in outs]
        return [o.pow(2).mean(1).sqrt() for o in outs]  # some non-trivial "pooling"

    def forward(self, x):
        return self.pooled_layers(x, 1)[0]


class TinyCNN(nn.Module):
    is_vit = False

    def __init__(self, dim=12):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, 2, 1)
        self.embed_dim, self.patch_size = dim, 2
        self.config = {"arch": "tiny_cnn", "pooling": "gap"}
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def pooled_layers(self, x, n=1):
        if n != 1:
            raise ValueError("CNN: n must be 1")
        return [F.relu(self.conv(x)).mean((2, 3))]

    def forward(self, x):
        return self.pooled_layers(x)[0]


class Blobs(torch.utils.data.Dataset):
    """Separable classes: a fixed random 3×8×8 pattern per class plus noise."""

    def __init__(self, n_per_class=40, num_classes=4, noise=0.6, seed=0):
        g = torch.Generator().manual_seed(1000)
        means = torch.randn(num_classes, 3, 8, 8, generator=g)
        g = torch.Generator().manual_seed(seed)
        self.targets = [c for c in range(num_classes) for _ in range(n_per_class)]
        self.x = torch.stack([means[c] + noise * torch.randn(3, 8, 8, generator=g) for c in self.targets])
        self.classes = [f"c{i}" for i in range(num_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def _args(tmp_path, *extra):
    argv = ["--output_dir", str(tmp_path), "--epochs", "4", "--batch_size_per_gpu", "32", "--num_workers", "0",
            "--lr", "2.0", "--backend", "gloo", *map(str, extra)]
    return linear.get_args_parser().parse_args(argv)


def _data(seed_train=0, seed_val=1):
    return Blobs(seed=seed_train), Blobs(n_per_class=20, seed=seed_val)


def _run(tmp_path, *extra, model=None):
    tr, va = _data()
    return linear.run(_args(tmp_path, *extra), backbone=model or TinyViT(), train_dataset=tr, val_dataset=va)


def _heads(out_dir):
    return load_checkpoint(Path(out_dir) / "checkpoint.pth")


# ---------------------------------------------------------------------------------------------- unit pieces
def test_feature_set_names():
    assert parse_feature_set("last4_avgpool") == parse_feature_set(" last4_avgpool ")
    fs = parse_feature_set("last2")
    assert (fs.n_blocks, fs.avgpool) == (2, False)
    for bad in ("last0", "first1", "last", "last2_max"):
        with pytest.raises(ValueError, match="last<N>"):
            parse_feature_set(bad)


def test_cls_features_follow_dino():
    """cls ViT: last-n normed [CLS] (oldest first), then the mean patch token of the last block."""
    m = TinyViT(pooling="cls")
    x = torch.randn(2, 3, 8, 8)
    ex = FeatureExtractor(m, ["last1", "last2", "last2_avgpool"])
    feats = ex(x)
    inter = m.get_intermediate_layers(x, 2)
    torch.testing.assert_close(feats["last1"], inter[-1][:, 0])
    torch.testing.assert_close(feats["last2"], torch.cat([inter[0][:, 0], inter[1][:, 0]], -1))
    torch.testing.assert_close(feats["last2_avgpool"], torch.cat([inter[0][:, 0], inter[1][:, 0], inter[1][:, 1:].mean(1)], -1))
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_pooled_features_use_pooled_layers_and_flat_roundtrip():
    m = TinyViT(pooling="simpool")
    x = torch.randn(3, 3, 8, 8)
    ex = FeatureExtractor(m, ["last1", "last3", "last1_avgpool"])
    feats = ex(x)
    pooled = m.pooled_layers(x, 3)
    torch.testing.assert_close(feats["last3"], torch.cat(pooled, -1))
    torch.testing.assert_close(feats["last1_avgpool"], torch.cat([pooled[-1], m.get_intermediate_layers(x, 1)[0].mean(1)], -1))
    split = ex.split_flat(ex.flat(x), ex.piece_dims(x))
    for k in feats:
        torch.testing.assert_close(split[k], feats[k])


def test_cnn_rejects_more_blocks_and_avgpool():
    with pytest.raises(ValueError, match="--n_last_blocks 1"):
        FeatureExtractor(TinyCNN(), ["last4"])
    with pytest.raises(ValueError, match="only ViTs"):
        FeatureExtractor(TinyCNN(), ["last1_avgpool"])
    with pytest.raises(ValueError, match="only 3"):
        FeatureExtractor(TinyViT(depth=3), ["last4"])


def test_head_init_and_param_groups():
    specs = make_specs(["last1", "last2"], [0.1, 1.0], {"last1": 16, "last2": 32})
    heads = LinearHeads(specs, 5, seed=7)
    assert [s.name for s in specs] == ["last1_lr0.1", "last1_lr1", "last2_lr0.1", "last2_lr1"]
    alone = LinearHeads(specs[3:], 5, seed=7)
    torch.testing.assert_close(heads.heads[3].weight, alone.heads[0].weight)  # same init, alone or not
    w = heads.heads[2].weight
    assert abs(w.std().item() - 0.01) < 0.002 and heads.heads[2].bias.abs().max() == 0
    groups = heads.param_groups(lr_scale=0.5)
    assert [g["lr"] for g in groups] == [0.05, 0.5, 0.05, 0.5]
    assert cosine_lr(1.0, 0, 10) == 1.0 and abs(cosine_lr(1.0, 5, 10) - 0.5) < 1e-12
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 10)
    for e in range(10):  # same values as torch's scheduler stepped once per epoch
        assert abs(sched.get_last_lr()[0] - cosine_lr(1.0, e, 10)) < 1e-9
        sched.optimizer.step()
        sched.step()
    c1, c5 = topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]]), torch.tensor([1, 2]))
    assert (c1, c5) == (1, 2)  # top-5 capped at 3 classes


# --------------------------------------------------------------------------------------------- the protocol
def test_probe_reaches_accuracy_well_above_chance(tmp_path):
    res = _run(tmp_path, "--epochs", "6", "--feature_sets", "last1")
    best = res["best"]["last1_lr2"]
    assert best["top1"] >= 90.0, res  # 4 classes: chance is 25 %
    assert res["best_head"] == "last1_lr2"
    assert (tmp_path / "checkpoint.pth").is_file() and (tmp_path / "results.json").is_file()
    assert (tmp_path / "log.txt").read_text().count("\n") == 6


def test_many_heads_equal_heads_trained_alone(tmp_path):
    lrs, sets = ["0.5", "8.0"], ["last1", "last2_avgpool"]
    together = _run(tmp_path / "all", "--lrs", *lrs, "--feature_sets", *sets)
    ck_all = _heads(tmp_path / "all")
    names = [h["name"] for h in ck_all["spec"]["heads"]]
    assert len(names) == 4
    for i, name in enumerate(names):
        fs, lr = name.rsplit("_lr", 1)
        alone = _run(tmp_path / name, "--lrs", lr, "--feature_sets", fs)
        ck = _heads(tmp_path / name)
        torch.testing.assert_close(ck["heads"]["heads.0.weight"], ck_all["heads"][f"heads.{i}.weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ck["heads"]["heads.0.bias"], ck_all["heads"][f"heads.{i}.bias"], rtol=1e-5, atol=1e-6)
        assert alone["last"][name]["top1"] == pytest.approx(together["last"][name]["top1"])
        assert alone["best"][name] == pytest.approx(together["best"][name])
    assert together["best_head"] in names


def test_resume_mid_training_matches_uninterrupted(tmp_path, capsys):
    full = _run(tmp_path / "full", "--lrs", "0.5", "4.0", "--val_freq", "2")
    part = _run(tmp_path / "cut", "--lrs", "0.5", "4.0", "--val_freq", "2", "--stop_after_epochs", "3")
    assert part["stopped"] and part["epochs_done"] == 3
    resumed = _run(tmp_path / "cut", "--lrs", "0.5", "4.0", "--val_freq", "2")
    assert "resuming from" in capsys.readouterr().out
    assert resumed["last"] == full["last"] and resumed["best"] == full["best"]
    a, b = _heads(tmp_path / "full"), _heads(tmp_path / "cut")
    for k in a["heads"]:
        torch.testing.assert_close(a["heads"][k], b["heads"][k], rtol=0, atol=0)
    # a finished run resumed again trains nothing more and reports the same numbers
    again = _run(tmp_path / "cut", "--lrs", "0.5", "4.0", "--val_freq", "2")
    assert again["best"] == full["best"]


def test_evaluate_reproduces_last_epoch(tmp_path):
    trained = _run(tmp_path, "--lrs", "0.5", "2.0")
    ev = _run(tmp_path, "--lrs", "0.5", "2.0", "--evaluate")
    for name in trained["last"]:
        assert ev["last"][name]["top1"] == pytest.approx(trained["last"][name]["top1"])


def test_mismatched_head_checkpoint_is_a_clear_error(tmp_path):
    _run(tmp_path, "--lrs", "0.5")
    with pytest.raises(CheckpointError, match="does not match this run.*heads"):
        _run(tmp_path, "--lrs", "0.7")
    with pytest.raises(CheckpointError, match="input dim 16 saved vs 32 from this backbone"):
        _run(tmp_path, "--lrs", "0.5", "--evaluate", model=TinyViT(dim=32))
    with pytest.raises(CheckpointError, match="num_labels 4 saved vs 10"):  # a 10-class dataset now
        linear.run(_args(tmp_path, "--lrs", "0.5", "--evaluate"), backbone=TinyViT(),
                   train_dataset=Blobs(n_per_class=2, num_classes=10), val_dataset=Blobs(n_per_class=2, num_classes=10))
    with pytest.raises(CheckpointError, match="--epochs"):
        _run(tmp_path, "--lrs", "0.5", "--epochs", "9")
    with pytest.raises(CheckpointError, match=r"train augmentation RandomResizedCrop.*scale=\(0.08, 1\).*saved vs "
                                              r"Resize.*now \(--train_aug/--train_crop_scale\)"):
        _run(tmp_path, "--lrs", "0.5", "--train_aug", "none")
    with pytest.raises(CheckpointError, match=r"scale=\(0.5, 1\)\) \+ flip now"):
        _run(tmp_path, "--lrs", "0.5", "--train_crop_scale", "0.5", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        _run(tmp_path / "empty", "--evaluate")


def test_cnn_with_n_last_blocks_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="CNN backbone.*--n_last_blocks 1"):
        _run(tmp_path, "--n_last_blocks", "4", model=TinyCNN())
    res = _run(tmp_path / "ok", model=TinyCNN())  # default for a CNN: the single pooled vector
    assert [h["name"] for h in res["heads"]] == ["last1_lr2"]
    assert res["heads"][0]["in_dim"] == 12  # from the forward pass


def test_vit_default_is_dino_n_last_blocks_4_for_cls_and_1_for_simpool(tmp_path):
    res = _run(tmp_path / "cls", "--epochs", "1", model=TinyViT(depth=5, pooling="cls"))
    assert res["heads"][0]["feature_set"] == "last4" and res["heads"][0]["in_dim"] == 64
    res = _run(tmp_path / "sp", "--epochs", "1", model=TinyViT(depth=5, pooling="simpool"))
    assert res["heads"][0]["feature_set"] == "last1" and res["heads"][0]["in_dim"] == 16


def test_num_workers_default_counts_the_tasks_cpus_not_the_nodes(monkeypatch):
    """Issue 15 §4: under Slurm (--cpus-per-task) or taskset the task may use fewer CPUs than os.cpu_count()."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert linear.get_args_parser().parse_args([]).num_workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert linear.get_args_parser().parse_args([]).num_workers == 10


def test_local_rank_alias_of_torch_distributed_launch():
    args = linear.get_args_parser().parse_args(["--local-rank=3"])
    assert args.local_rank == 3


def test_num_labels_from_dataset_or_flag(tmp_path):
    assert _run(tmp_path / "a", "--epochs", "1")["num_labels"] == 4
    assert _run(tmp_path / "b", "--epochs", "1", "--num_labels", "4")["num_labels"] == 4
    # larger is refused (issue 13 §1): the extra outputs only steal the argmax; smaller has no output for some labels
    with pytest.raises(DataError, match="--num_labels 7 is larger than the dataset's 4 classes.*--num_labels 4"):
        _run(tmp_path / "c", "--epochs", "1", "--num_labels", "7")
    with pytest.raises(DataError, match="--num_labels 3 is smaller than the dataset's 4 classes.*--num_labels 4"):
        _run(tmp_path / "d", "--epochs", "1", "--num_labels", "3")
    assert not (tmp_path / "c" / "checkpoint.pth").exists()


def test_train_aug_flags_default_to_dino_and_are_validated(capsys):
    p = linear.get_args_parser()
    a = linear.resolve_args(p.parse_args([]))
    assert (a.train_aug, a.train_crop_scale) == ("dino", (0.08, 1.0))  # DINO's eval_linear.py
    a = linear.resolve_args(p.parse_args(["--train_crop_scale", "0.5", "1"]))
    assert (a.train_aug, a.train_crop_scale) == ("dino", (0.5, 1.0))
    assert linear.resolve_args(p.parse_args(["--train_aug", "none"])).train_aug == "none"
    assert linear.resolve_args(p.parse_args(["--cached_features"])).train_aug == "none"
    for bad, msg in ((["--train_crop_scale", "0", "1"], "0 < LOW <= HIGH <= 1"),
                     (["--train_crop_scale", "0.6", "0.2"], "0 < LOW <= HIGH <= 1"),
                     (["--train_crop_scale", "0.5", "1.5"], "0 < LOW <= HIGH <= 1"),
                     (["--train_aug", "none", "--train_crop_scale", "0.5", "1"], "has no random crop"),
                     (["--cached_features", "--train_aug", "dino"], "do not apply"),
                     (["--cached_features", "--train_crop_scale", "0.5", "1"], "do not apply")):
        assert linear.main(bad + ["--output_dir", "/tmp/never"]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, (bad, err)
    with pytest.raises(SystemExit):
        p.parse_args(["--train_aug", "rrc"])


def test_train_transform_dino_flip_and_none():
    from PIL import Image

    from dino_simpool.dino.augment import eval_transform
    from torchvision import transforms as T

    img = Image.fromarray(torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8).numpy())
    val = eval_transform(36, 32)(img)
    torch.testing.assert_close(linear.train_transform(32, 36, "none")(img), val, rtol=0, atol=0)
    flips = [linear.train_transform(32, 36, "flip")(img) for _ in range(16)]
    assert all(torch.equal(f, val) or torch.equal(f, val.flip(-1)) for f in flips)
    assert any(torch.equal(f, val) for f in flips) and any(torch.equal(f, val.flip(-1)) for f in flips)
    dino = linear.train_transform(32, 36, "dino", (0.3, 0.7))
    (rrc,) = [t for t in dino.transforms if isinstance(t, T.RandomResizedCrop)]
    assert rrc.size == (32, 32) and rrc.scale == (0.3, 0.7)
    assert linear.train_transform(32, 36).transforms[0].scale == (0.08, 1.0)  # DINO's default
    assert dino(img).shape == (3, 32, 32)


def test_train_aug_none_trains_as_cached_features(tmp_path, capsys):
    """--train_aug none feeds the train split the val transform: the image-mode probe is then the same computation as
    --cached_features (same heads, same accuracy), and the start-up line says which augmentation ran."""
    _real_modules()
    flags = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "16", "--num_heads", "2", "--patch_size", "8",
             "--resize", "36", "--crop", "32", "--synthetic_size", "32", "--synthetic_per_class", "6",
             "--num_workers", "0", "--epochs", "2", "--lr", "0.5", "--batch_size_per_gpu", "20"]
    assert linear.main(flags + ["--train_aug", "none", "--output_dir", str(tmp_path / "none")]) == 0
    assert "train augmentation: Resize(36) + CenterCrop(32)" in capsys.readouterr().out
    assert linear.main(flags + ["--cached_features", "--output_dir", str(tmp_path / "cached")]) == 0
    a, b = _heads(tmp_path / "none"), _heads(tmp_path / "cached")
    for k in a["heads"]:
        torch.testing.assert_close(a["heads"][k], b["heads"][k], rtol=1e-4, atol=1e-6)
    assert linear.main(flags + ["--train_crop_scale", "0.5", "1", "--output_dir", str(tmp_path / "rrc")]) == 0
    assert "train augmentation: RandomResizedCrop(32, scale=(0.5, 1)) + flip" in capsys.readouterr().out
    c = _heads(tmp_path / "rrc")
    assert any(not torch.allclose(a["heads"][k], c["heads"][k]) for k in a["heads"])  # the crops did change training


class MislabelledBlobs(Blobs):
    """A dataset whose class list is shorter than its labels (4 label values, 3 class names)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.classes = self.classes[:3]


@pytest.mark.parametrize("mode", ["images", "cached"])
def test_labels_outside_the_class_count_are_a_clear_error(tmp_path, mode):
    """Before: cross_entropy's deep "Target 3 is out of bounds" (a device-side assert on CUDA)."""
    extra = ["--cached_features"] if mode == "cached" else []
    args = _args(tmp_path, "--epochs", "1", *extra)
    with pytest.raises(DataError, match="the train split has label 3, outside 0..2"):
        linear.run(args, backbone=TinyViT(), train_dataset=MislabelledBlobs(), val_dataset=MislabelledBlobs(seed=1))


def test_train_and_val_with_different_classes_are_refused(tmp_path):
    va = Blobs(n_per_class=5, seed=1)
    va.classes = ["c0", "c1", "c2", "other"]
    with pytest.raises(DataError, match=r"different classes \(4 vs 4: only in train: \['c3'\]; only in val: "
                                        r"\['other'\]\).*same class folders"):
        linear.run(_args(tmp_path, "--epochs", "1"), backbone=TinyViT(), train_dataset=Blobs(), val_dataset=va)


def test_cli_num_labels_mismatch_exits_2_with_one_line(tmp_path, capsys):
    _real_modules()
    base = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "16", "--num_heads", "2", "--patch_size", "8",
            "--resize", "36", "--crop", "32", "--synthetic_size", "32", "--synthetic_per_class", "2",
            "--num_workers", "0", "--epochs", "1", "--output_dir", str(tmp_path)]
    for n, word in (("1000", "larger"), ("5", "smaller")):
        assert linear.main(base + ["--num_labels", n]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"dino-simpool-linear: error: --num_labels {n} is {word} than "
                                                       f"the dataset's 10 classes"), err


@pytest.fixture
def features_module(monkeypatch):
    """dino_simpool.evaluation.features if it is there; else a minimal stand-in with the contract's signature."""
    try:
        importlib.import_module("dino_simpool.evaluation.features")
        return "real"
    except ImportError:
        mod = types.ModuleType("dino_simpool.evaluation.features")

        @torch.no_grad()
        def extract_features(model, dataset, batch_size=128, num_workers=2, device=None, desc=""):
            xs, ys = [], []
            for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
                xs.append(model(x).float())
                ys.append(torch.as_tensor(y))
            return torch.cat(xs), torch.cat(ys).long()

        mod.extract_features = extract_features
        monkeypatch.setitem(sys.modules, "dino_simpool.evaluation.features", mod)
        return "stand-in"


def test_cached_features_match_image_mode_without_augmentation(tmp_path, capsys, features_module):
    """With a deterministic dataset (no augmentation), training on cached features is the same computation."""
    img = _run(tmp_path / "img", "--lrs", "0.5", "2.0", "--feature_sets", "last1", "last2_avgpool")
    cached = _run(tmp_path / "cached", "--lrs", "0.5", "2.0", "--feature_sets", "last1", "last2_avgpool",
                  "--cached_features")
    assert "not the full DINO linear protocol" in capsys.readouterr().out
    for name in img["last"]:
        assert cached["last"][name]["top1"] == pytest.approx(img["last"][name]["top1"])
    a, b = _heads(tmp_path / "img"), _heads(tmp_path / "cached")
    for k in a["heads"]:
        torch.testing.assert_close(a["heads"][k], b["heads"][k], rtol=1e-4, atol=1e-6)
    with pytest.raises(CheckpointError, match="--cached_features"):  # resume across modes is refused
        _run(tmp_path / "img", "--lrs", "0.5", "2.0", "--feature_sets", "last1", "last2_avgpool", "--cached_features")


def test_bad_flags_exit_2_with_one_line(capsys):
    assert linear.main(["--lrs", "0.1", "-1", "--output_dir", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "positive" in err
    assert linear.main(["--feature_sets", "last4_max"]) == 2
    assert "last<N>" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        linear.main(["--epochs", "many"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


# ------------------------------------------------------------------------------------------- distributed
def _dist_worker(rank, world, port, out_dir, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        tr, va = _data()
        args = linear.get_args_parser().parse_args(
            ["--output_dir", out_dir, "--epochs", "3", "--batch_size_per_gpu", "16", "--num_workers", "0",
             "--lrs", "0.5", "2.0", "--backend", "gloo"])
        res = linear.run(args, backbone=TinyViT(), train_dataset=tr, val_dataset=va)
        q.put((rank, res["last"]))
    finally:
        from dino_simpool import distributed as du

        du.cleanup()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_ddp_equal_one_process_with_the_global_batch(tmp_path):
    """2 ranks × 16 (DDP over the heads) = 1 process × 32: same global batches, same lr scaling."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, str(tmp_path / "ddp"), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(q.get(timeout=5) for _ in range(2))
    single = _run(tmp_path / "single", "--epochs", "3", "--lrs", "0.5", "2.0")
    assert got[0] == got[1]
    for name in single["last"]:
        assert got[0][name]["top1"] == pytest.approx(single["last"][name]["top1"])
    a, b = _heads(tmp_path / "ddp"), _heads(tmp_path / "single")
    for k in a["heads"]:
        torch.testing.assert_close(a["heads"][k], b["heads"][k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------- a NaN on one rank stops every rank (issue 15 §2)
ROOT = Path(__file__).resolve().parents[1]
LINEAR_HOOKS = str(ROOT / "tests" / "linear_hooks.py")
NAN_FLAGS = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "16", "--num_heads", "2", "--patch_size", "8",
             "--resize", "36", "--crop", "32", "--synthetic_size", "32", "--synthetic_per_class", "4",
             "--num_workers", "0", "--batch_size_per_gpu", "10", "--epochs", "3", "--lr", "0.1", "--backend", "gloo"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS="1", DINO_SIMPOOL_TEST_LINEAR_NAN_RANK="1",
               DINO_SIMPOOL_TEST_LINEAR_NAN_STEP="4", **extra)  # 40 images / 2 ranks / batch 10: 2 steps per epoch
    return env


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_on_one_rank_stops_both_ranks_with_exit_3(tmp_path):
    """Two bare ranks (as srun starts them: no torchrun agent to kill the survivors), the loss NaN on rank 1 only, in
    epoch 2: both ranks exit 3 with the agreed message, within seconds. Before the fix only rank 1 raised; rank 0
    sat in DDP's gradient all-reduce, and died with gloo's "Connection closed by peer" traceback (exit 1) once rank 1
    had gone (with NCCL it waits there until the process-group timeout, 30 minutes)."""
    import subprocess
    import time

    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = _rank_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, LINEAR_HOOKS, *NAN_FLAGS, "--output_dir", str(tmp_path)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    spent = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    assert codes == [3, 3], (codes, [o[1][-2000:] for o in outs])
    for _, err in outs:
        line = err.strip().splitlines()[-1]
        assert line.startswith("dino-simpool-linear: error: non-finite loss at epoch 2, step 2 on rank(s) [1] of 2")
        assert "every rank stops here" in line
    assert "per-head losses [nan]" in outs[1][1] and "per-head losses" not in outs[0][1]  # only rank 1 has them
    # epoch 1 finished and was saved; the NaN step was never applied to the saved heads
    ck = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["heads"].values())
    assert spent < 200  # a stuck rank would hit the communicate timeout above


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_on_one_rank_under_torchrun_rank_0_stops_by_itself(tmp_path):
    """The same under ``torchrun --standalone --nproc_per_node=2``. torchrun's agent kills the other ranks once one
    has failed, which would hide a stuck rank; so each rank writes the code ``main`` returned (tests/linear_hooks.py)
    and the poisoned rank lingers 5 s: rank 0 must have returned 3 by itself, before the agent could kill it."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = _rank_env(DINO_SIMPOOL_TEST_EXIT_DIR=str(tmp_path / "exits"), DINO_SIMPOOL_TEST_LINGER_S="5")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", LINEAR_HOOKS, *NAN_FLAGS,
                        "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode != 0
    exits = {p.name: p.read_text().strip() for p in (tmp_path / "exits").glob("*.exit")}
    assert exits.get("rank0.exit") == "3", (exits, r.stderr[-3000:])
    assert r.stderr.count("non-finite loss at epoch 2, step 2 on rank(s) [1] of 2") == 2, r.stderr[-3000:]


def _bad_label_worker(rank, world, port, out_dir, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        tr, va = _data()
        tr.targets[7] = 4  # one image of 160 has a label outside the 4 classes: it lands in one rank's shard only
        args = linear.get_args_parser().parse_args(
            ["--output_dir", out_dir, "--epochs", "1", "--batch_size_per_gpu", "16", "--num_workers", "0",
             "--lr", "0.5", "--backend", "gloo"])
        try:
            linear.run(args, backbone=TinyViT(), train_dataset=tr, val_dataset=va)
            q.put((rank, "finished", ""))
        except DataError as e:
            q.put((rank, "DataError", str(e)))
    finally:
        from dino_simpool import distributed as du

        du.cleanup()


@pytest.mark.distributed
@pytest.mark.slow
def test_bad_label_on_one_rank_stops_both_ranks(tmp_path):
    """The rank whose batch holds the bad label names it; the other stops at the same step with a DataError too
    (before: the other rank sat in DDP's all-reduce and died with gloo's connection error)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bad_label_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert codes == [0, 0], codes
    got = dict((r, (kind, msg)) for r, kind, msg in (q.get(timeout=5) for _ in range(2)))
    assert {kind for kind, _ in got.values()} == {"DataError"}, got
    msgs = sorted(msg for _, msg in got.values())
    assert any("the train split has label 4, outside 0..3" in m for m in msgs), msgs
    assert any("labels outside the heads' range on rank(s) [" in m and "of 2" in m for m in msgs), msgs


# --------------------------------------------------------------------------------- with the real modules
def _real_modules():
    try:
        from dino_simpool.data import build_dataset  # noqa: F401
        from dino_simpool.dino.augment import eval_transform  # noqa: F401
        from dino_simpool.models import build_backbone  # noqa: F401
    except ImportError as e:
        pytest.skip(f"real backbone/data modules not there yet: {e}")


TINY_VIT = ["--arch", "vit_tiny", "--depth", "2", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
            "--resize", "36", "--crop", "32", "--synthetic_size", "32", "--synthetic_per_class", "24", "--num_workers", "0",
            "--batch_size_per_gpu", "48", "--backend", "gloo"]


@pytest.mark.slow
def test_cli_embedded_dataset_tiny_vit_many_heads(tmp_path, capsys):
    _real_modules()
    rc = linear.main(TINY_VIT + ["--pooling", "simpool", "--epochs", "2", "--lrs", "0.1", "1.0",
                                 "--feature_sets", "last1", "last2", "last1_avgpool", "--output_dir", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "best head:" in out.out
    ck = _heads(tmp_path)
    dims = {h["feature_set"]: h["in_dim"] for h in ck["spec"]["heads"]}
    assert dims == {"last1": 32, "last2": 64, "last1_avgpool": 64}


@pytest.mark.slow
def test_cli_real_cnn_n_last_blocks_error(tmp_path, capsys):
    _real_modules()
    rc = linear.main(["--arch", "resnet_test", "--n_last_blocks", "4", "--resize", "36", "--crop", "32",
                      "--synthetic_size", "32", "--synthetic_per_class", "4", "--num_workers", "0",
                      "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--n_last_blocks 1" in err and err.count("\n") == 0


def test_non_finite_loss_stops_with_exit_3_semantics(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        _run(tmp_path, "--lr", "1e38", "--epochs", "2")


@pytest.mark.slow
def test_cli_real_checkpoint_config_cached_then_evaluate(tmp_path, capsys):
    """A training-style checkpoint (teacher backbone.* + config.backbone): the backbone comes from its config."""
    _real_modules()
    from dino_simpool.checkpoint import save_atomic
    from dino_simpool.models import build_backbone

    m = build_backbone("vit_tiny", pooling="cls", depth=3, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    sd = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    save_atomic({"teacher": sd, "student": sd, "config": {"backbone": m.config}}, tmp_path / "pre.pth")
    flags = ["--pretrained_weights", str(tmp_path / "pre.pth"), "--resize", "36", "--crop", "32", "--synthetic_size",
             "32", "--synthetic_per_class", "8", "--num_workers", "0", "--epochs", "1", "--lrs", "0.1", "1",
             "--feature_sets", "last1", "last3_avgpool", "--output_dir", str(tmp_path / "lin"), "--cached_features"]
    assert linear.main(flags) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "pooling cls" in out and "config: checkpoint" in out and "not the full DINO linear protocol" in out
    ck = _heads(tmp_path / "lin")
    assert {h["feature_set"]: h["in_dim"] for h in ck["spec"]["heads"]} == {"last1": 32, "last3_avgpool": 128}
    assert linear.main(flags + ["--evaluate"]) == 0
    assert "evaluation of" in capsys.readouterr().out
    # the same head checkpoint with a wider feature set: one clear line, exit 2
    wider = [("last2" if f == "last3_avgpool" else f) for f in flags]
    assert linear.main(wider + ["--evaluate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not match this run" in err[-1] and not any("batch/s" in line for line in err)  # before extraction


def test_mode_flag_maps_to_pooling():
    _real_modules()
    p = linear.get_args_parser()
    m = linear.build_model(p.parse_args(["--arch", "resnet_test", "--mode", "official"]))
    assert not m.is_vit and m.config["pooling"] == "gap"
    m = linear.build_model(p.parse_args(["--arch", "vit_tiny", "--mode", "official", "--depth", "1", "--embed_dim", "32",
                                         "--num_heads", "2", "--patch_size", "8", "--crop", "32", "--resize", "36"]))
    assert m.is_vit and m.config["pooling"] == "cls" and m.config["img_size"] == 32
    # --mode and --pooling that disagree are refused, as in training and k-NN (the probe once let --pooling win)
    with pytest.raises(ValueError, match="--mode official means --pooling cls"):
        linear.build_model(p.parse_args(["--arch", "vit_tiny", "--mode", "official", "--pooling", "gem", "--depth",
                                         "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8"]))
