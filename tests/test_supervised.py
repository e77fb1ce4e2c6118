"""Supervised training (dino_simpool.supervised): the recipes and the official flags, timm's recipe reaching the loss,
EMA, bit-identical resume, preemption, NaN, 2 ranks, and every evaluator reading its checkpoints."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from dino_simpool.checkpoint import load_checkpoint
from dino_simpool.logs import read_json_log
from dino_simpool.models import build_backbone_from_checkpoint, load_pretrained
from dino_simpool.supervised.cli import main
from dino_simpool.supervised.config import load_recipe, parse_config
from dino_simpool.supervised.data import build_loss, build_mixup, validate
from dino_simpool.supervised.model import build_classifier
from dino_simpool.supervised.step import StepSettings, SupervisedStep
from dino_simpool.supervised.trainer import Hooks

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "launch" / "recipes" / "supervised"
HOOKS = str(ROOT / "tests" / "supervised_hooks.py")
# 40 train images (10 classes x 4), 10 val, batch 8 -> 5 iterations per epoch
TINY_DATA = ["--synthetic-per-class", "4", "--synthetic-size", "32", "--img-size", "32", "-b", "8", "-j", "0"]
TINY_VIT = ["--model", "vit_tiny", "--patch-size", "8", "--depth", "1", "--embed-dim", "32", "--num-heads", "2"]
TINY_OPT = ["--epochs", "2", "--warmup-epochs", "1", "--log-interval", "1", "--attention-images", "0", "--model-ema", "False"]
TINY = TINY_VIT + TINY_DATA + TINY_OPT + ["--gp", "simpool"]


def _run(args, env_extra=None, timeout=300, entry=None):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    entry = entry or ([HOOKS] if env_extra else ["-m", "dino_simpool.supervised"])
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _diff(a: dict, b: dict, parts=("model", "model_ema")) -> list[str]:
    """Names of the tensors that differ between two checkpoints (model, EMA, optimizer state)."""
    out = [f"{p}.{k}" for p in parts if p in a for k in a[p] if not torch.equal(a[p][k], b[p][k])]
    for i, st in a["optimizer"]["state"].items():
        out += [f"optimizer.{i}.{n}" for n, t in st.items()
                if torch.is_tensor(t) and not torch.equal(t, b["optimizer"]["state"][i][n])]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny SimPool ViT run (2 epochs, EMA) and one [CLS] and one GAP run, shared by the evaluator tests."""
    root = tmp_path_factory.mktemp("sup")
    runs = {}
    for gp in ("simpool", "token", "avg"):
        out = root / gp
        args = TINY_VIT + TINY_DATA + TINY_OPT + ["--gp", gp, "--model-ema", "--model-ema-decay", "0.5",
                                                   "--output", str(out)]
        assert main(args) == 0
        runs[gp] = out
    return runs


# ------------------------------------------------------------------------------------------------ flags and recipes
def test_official_flag_names():
    cfg = parse_config(["--model", "vit_small_patch16_224", "--gp", "simpool", "--gamma", "1.25", "--batch-size", "74",
                        "--opt", "adamw", "--lr", "5e-4", "--weight-decay", "0.05", "--sched", "cosine",
                        "--epochs", "100", "--warmup-lr", "1e-6", "--warmup-epochs", "5", "--mixup", "0.2",
                        "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.99996", "--aa",
                        "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel", "--drop", "0.1",
                        "--drop-path", "0.1", "--data-dir", "/data/imagenet", "--output", "/runs/x", "--subset", "260",
                        "--smoothing", "0.1", "--min-lr", "1e-5", "--seed", "3", "-j", "6"])
    assert (cfg.arch, cfg.patch_size, cfg.pooling, cfg.gamma) == ("vit_small", 16, "simpool", 1.25)
    assert (cfg.batch_size, cfg.opt, cfg.lr, cfg.weight_decay, cfg.sched, cfg.epochs) == (74, "adamw", 5e-4, 0.05,
                                                                                          "cosine", 100)
    assert (cfg.warmup_lr, cfg.warmup_epochs, cfg.mixup, cfg.cutmix) == (1e-6, 5, 0.2, 1.0)
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.aa, cfg.reprob, cfg.remode) == (True, 0.99996,
                                                                                   "rand-m9-mstd0.5-inc1", 0.25,
                                                                                   "pixel")
    assert (cfg.drop, cfg.drop_path, cfg.data_dir, cfg.output, cfg.subset) == (0.1, 0.1, "/data/imagenet", "/runs/x",
                                                                              260)
    assert (cfg.smoothing, cfg.min_lr, cfg.seed, cfg.workers) == (0.1, 1e-5, 3, 6)
    assert cfg.resolved_norm_order() == "supervised"  # SimPool on the normalised tokens, as the official fork
    # --gp aliases and the model's own pooling; gamma None; timm's positional data dir and -b / --workers
    assert parse_config(["/data", "--model", "vit_small"]).pooling == "cls"
    assert parse_config(["/data", "--model", "vit_small", "--gp", "token"]).pooling == "cls"
    assert parse_config(["/data", "--model", "vit_small", "--gp", "avg"]).pooling == "gap"
    assert parse_config(["/data", "--model", "resnet50"]).pooling == "gap"
    g = parse_config(["--data-dir", "/d", "--model", "resnet50", "--gp", "simpool", "--gamma", "None", "-b", "6",
                      "--workers", "2"])
    assert (g.gamma, g.batch_size, g.workers, g.data_dir) == (None, 6, 2, "/d")
    assert parse_config(["--data-dir", "/d", "--model", "convnext_small", "--gp", "simpool"]).gamma == 2.0
    assert parse_config(["--data-dir", "/d", "--amp"]).precision == "fp16"


@pytest.mark.parametrize("argv,msg", [
    (["--data-dir", "/d", "--model", "resnet50", "--gp", "token"], "class token"),
    (["--data-dir", "/d", "--model", "vit_nano"], "unknown arch"),
    (["--data-dir", "/d", "--gp", "nosuchpool"], "nosuchpool"),
    (["--data-dir", "/d", "--mixup", "0.2", "-b", "7"], "must be even"),
    (["--data-dir", "/d", "--reprob", "1.5"], "--reprob"),
    (["--data-dir", "/d", "--amp", "--precision", "bf16"], "--amp"),
    (["--data-dir", "/d", "--model", "resnet50", "--patch-size", "16"], "ViT option"),
])
def test_bad_values_are_one_line_errors(argv, msg, capsys):
    assert main(argv + ["--output", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


def test_output_given_twice_with_different_values_is_an_error(capsys):
    """The launcher appends --output_dir: a job's own --output must not be silently overridden by it."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--output", "/a", "--output_dir", "/b"])
    assert e.value.code == 2 and "give it once" in capsys.readouterr().err
    assert parse_config(["--output", "/a", "--output_dir", "/a"]).output == "/a"


# The paper's supervised rows (../shared/reference/simpool.md, "Supervised recipes"), written out here, independently of
# the recipe files: family -> values the reference gives
REFERENCE = {
    "vit_small": dict(batch_size=74, opt="adamw", lr=5e-4, weight_decay=0.05, sched="cosine", warmup_lr=1e-6,
                      mixup=0.2, model_ema=True, model_ema_decay=0.99996, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                      drop=0.1, drop_path=0.1, epochs=100),
    "resnet50": dict(batch_size=128, opt="sgd", lr=0.4, reprob=0.6, epochs=100, aug_splits=3, jsd_loss=True,
                     split_bn=True, dist_bn="reduce"),
    "convnext_small": dict(batch_size=128, opt="adamw", lr=1e-3, weight_decay=0.05, mixup=0.8, cutmix=1.0,
                           model_ema=True, model_ema_decay=0.9999, drop_path=0.4, epochs=100),
}
ROWS = {  # recipe stem -> (pooling, gamma)
    "vit_small_cls_ep100": ("cls", None), "vit_small_gap_ep100": ("gap", None),
    "vit_small_simpool_gamma1.25_ep100": ("simpool", 1.25), "vit_small_simpool_nogamma_ep100": ("simpool", None),
    "resnet50_gap_ep100": ("gap", None), "resnet50_simpool_gamma2.0_ep100": ("simpool", 2.0),
    "convnext_small_gap_ep100": ("gap", None), "convnext_small_simpool_gamma2.0_ep100": ("simpool", 2.0),
}


def test_every_paper_row_has_a_recipe():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(ROWS)


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_paper_recipe_loads_with_its_values(stem):
    path = RECIPES / f"{stem}.yaml"
    cfg = load_recipe(path)
    arch = next(a for a in REFERENCE if stem.startswith(a))
    assert cfg.arch == arch
    for k, want in REFERENCE[arch].items():
        assert getattr(cfg, k) == want, f"{stem}: {k} = {getattr(cfg, k)!r}, the reference says {want!r}"
    pooling, gamma = ROWS[stem]
    assert cfg.pooling == pooling
    if pooling == "simpool":
        assert cfg.gamma == gamma
    if arch == "vit_small":
        assert (cfg.patch_size, cfg.img_size) == (16, 224)
    # every value is written out (none left to the code's defaults), and the file says how to run it
    raw = yaml.safe_load(path.read_text())
    from dino_simpool.supervised.config import FIELDS
    not_recipe = {"data_dir", "output", "synthetic_size", "synthetic_per_class", "attention_images", "max_iters",
                  "backend", "dist_url", "num_classes", "num_threads"}
    irrelevant = {"depth", "embed_dim", "num_heads"} | ({"patch_size"} if arch != "vit_small" else set()) | (
        {"gamma"} if pooling != "simpool" else set())
    assert set(FIELDS) - not_recipe - irrelevant - set(raw) == set()  # nothing left to the code's defaults
    text = path.read_text()
    assert "torchrun --nproc_per_node=8 -m dino_simpool.supervised --config" in text
    assert "dino-simpool-launch --job supervised" in text
    n = re.search(r"Global batch = 8 x (\d+) = (\d+)", text)
    assert n and int(n[1]) == cfg.batch_size and int(n[2]) == 8 * cfg.batch_size
    # the command line over the recipe: same config, flags override
    via = parse_config(["--config", str(path), "--data-dir", "/d", "--output", "/o"]).to_dict()
    alone = {**cfg.to_dict(), "data_dir": "/d", "output": "/o"}
    assert {k: v for k, v in via.items() if k not in not_recipe} == {k: v for k, v in alone.items()
                                                                    if k not in not_recipe}
    assert parse_config(["--config", str(path), "--data-dir", "/d", "--epochs", "3"]).epochs == 3


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: vit_small\nnot_a_flag: 1\n")
    with pytest.raises(ValueError, match="not_a_flag"):
        load_recipe(bad)
    bad.write_text("model: vit_small\nlr: fast\n")
    with pytest.raises(ValueError, match="lr"):
        load_recipe(bad)


# ------------------------------------------------------------------------------------------------ the recipe's parts
def _step(cfg_args, num_classes=10):
    cfg = parse_config(TINY_VIT + TINY_DATA + cfg_args)
    model = build_classifier(cfg.backbone_kwargs(), num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step changes nothing, the loss is what we compare
    step = SupervisedStep(model, model, build_loss(cfg), opt, StepSettings(), torch.device("cpu"),
                          mixup=build_mixup(cfg, num_classes))
    return cfg, model, step


@pytest.mark.parametrize("flags", [["--mixup", "0.8"], ["--cutmix", "1.0"], ["--mixup", "0.8", "--cutmix", "1.0"]])
def test_mixup_cutmix_and_smoothing_reach_the_loss(flags):
    cfg, model, step = _step(flags + ["--smoothing", "0.1", "--mixup-prob", "1.0"])
    assert isinstance(step.loss, SoftTargetCrossEntropy) and isinstance(step.mixup, Mixup)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10
    np.random.seed(5)
    loss = float(step(x.clone(), y.clone(), 1)[0])
    # by hand: the same numpy draws through timm's Mixup, then soft-target CE of the model's logits on the mixed batch
    np.random.seed(5)
    xm, ym = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.1, num_classes=10)(x.clone(),
                                                                                                       y.clone())
    assert not torch.equal(xm, x) and ym.shape == (8, 10)
    assert ym.max() < 1.0 and (ym > 0).all()  # mixed, and smoothed: no class has exactly 0 or 1
    with torch.no_grad():
        logits = model(xm)
    assert loss == pytest.approx(float(SoftTargetCrossEntropy()(logits, ym)), rel=1e-6)
    hard = float(torch.nn.functional.cross_entropy(logits, y))
    assert abs(loss - hard) > 1e-3  # the plain CE of the unmixed labels is something else


def test_label_smoothing_without_mixup_reaches_the_loss():
    _, model, step = _step(["--smoothing", "0.3", "--mixup", "0"])
    assert step.mixup is None and isinstance(step.loss, LabelSmoothingCrossEntropy)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    loss = float(step(x, y, 1)[0])
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(LabelSmoothingCrossEntropy(0.3)(logits, y)), rel=1e-6)
    assert abs(loss - float(torch.nn.functional.cross_entropy(logits, y))) > 1e-3
    _, _, plain = _step(["--smoothing", "0", "--mixup", "0"])
    assert type(plain.loss) is torch.nn.CrossEntropyLoss


def test_aug_splits_and_jsd_reach_the_loss():
    from timm.loss import JsdCrossEntropy
    from dino_simpool.supervised.data import AugSplits, build_datasets
    cfg, model, step = _step(["--aug-splits", "3", "--jsd-loss", "--smoothing", "0.1", "--mixup", "0"])
    assert isinstance(step.loss, JsdCrossEntropy) and step.loss.num_splits == 3
    train, _ = build_datasets(cfg)
    assert isinstance(train, AugSplits) and len(train.classes) == 10
    (clean, *aug), label = train[0]
    assert len(aug) == 2 and clean.shape == aug[0].shape == (3, 32, 32) and not torch.equal(aug[0], aug[1])
    xs, y = [torch.randn(8, 3, 32, 32) for _ in range(3)], torch.arange(8) % 10
    loss = float(step([x.clone() for x in xs], y, 1)[0])
    with torch.no_grad():
        logits = model(torch.cat(xs))
    assert loss == pytest.approx(float(JsdCrossEntropy(3, smoothing=0.1)(logits, y.repeat(3))), rel=1e-6)
    assert abs(loss - float(LabelSmoothingCrossEntropy(0.1)(logits[:8], y))) > 1e-4  # the JSD term is in it


@pytest.mark.parametrize("args", [
    pytest.param(["--model", "resnet_test", "--gp", "simpool", "--aug-splits", "3", "--jsd-loss", "--split-bn",
                  "--mixup", "0", "--model-ema"], id="resnet-jsd-splitbn"),
    pytest.param(["--model", "convnext_test", "--gp", "avg", "--precision", "bf16", "--clip-grad", "1.0"],
                 id="convnext-bf16", marks=pytest.mark.slow),
    pytest.param(TINY_VIT + ["--gp", "simpool", "--gamma", "None", "--amp"], id="vit-fp16", marks=pytest.mark.slow),
])
def test_other_backbones_and_precisions_train_and_load(tmp_path, args):
    out = tmp_path / "run"
    cnn = args[1] != "vit_tiny"
    data = TINY_DATA + (["--synthetic-size", "64", "--img-size", "64"] if cnn else [])
    assert main(data + TINY_OPT + args + ["--max-iters", "6", "--output", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] == 6 and ck["metrics"]["epoch"] == 0 and ck["metrics"]["val"]["images"] == 10
    assert not any(".aux_bn." in k for k in ck["model"])  # plain keys for the evaluators
    if "--split-bn" in args:
        assert ck["model_aux_bn"] and all(".aux_bn." in k for k in ck["model_aux_bn"])
        assert ck["model_ema_aux_bn"]
    for key in ("model", "model_ema") if "--model-ema" in args else ("model",):
        bb, rep = build_backbone_from_checkpoint(out / "checkpoint.pth", checkpoint_key=key)
        assert rep["checkpoint_key"] == key and bb.config["pooling"] == ck["config"]["backbone"]["pooling"]
    # and it resumes (the split BatchNorms' statistics come back from model_aux_bn)
    assert main(data + TINY_OPT + args + ["--max-iters", "7", "--output", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 7


def test_randaugment_and_erasing_in_the_training_transform():
    from dino_simpool.supervised.data import train_transform
    names = [type(t).__name__ for t in train_transform(parse_config(TINY)).transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing"


def test_posterize_at_magnitude_10_does_not_crash():
    """timm 1.0 asks Pillow >= 11 to keep 0 bits at magnitude 10 (which Pillow refuses); the shim gives the black image
    that Pillow < 11 gave."""
    from PIL import Image
    from dino_simpool.supervised.data import train_transform
    t = train_transform(parse_config(TINY + ["--aa", "rand-m10-n15-inc1"]))  # magnitude 10, every op each time
    img = Image.new("RGB", (32, 32), (200, 120, 40))
    for _ in range(20):
        t(img)


# ------------------------------------------------------------------------------------------------ training runs
def test_ema_saved_and_evaluated(trained):
    out = trained["simpool"]
    ck = load_checkpoint(out / "checkpoint.pth")
    assert set(ck) >= {"model", "model_ema", "optimizer", "epoch", "iteration", "config", "rng", "best", "metrics"}
    assert (ck["epoch"], ck["iteration"]) == (2, 10)
    assert all(k.startswith(("backbone.", "head.")) for k in ck["model"])
    assert ck["model"].keys() == ck["model_ema"].keys()
    differ = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, ck["model_ema"][k])]
    assert len(differ) > 0.5 * len(ck["model"])  # a real average, not a copy
    recs = [r for r in read_json_log(out / "log.txt") if "val_ema" in r]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert ck["best"]["network"] == "model_ema"
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars beside the JSON lines
    assert yaml.safe_load((out / "config.yaml").read_text())["model_ema"] is True
    # the logged EMA accuracy is the EMA weights' accuracy on val
    cfg = parse_config(TINY + ["--model-ema"])
    from dino_simpool.supervised.data import build_datasets, build_loaders
    from contextlib import nullcontext
    _, val_set = build_datasets(cfg)
    ema = build_classifier(cfg.backbone_kwargs(), 10)
    ema.load_state_dict(ck["model_ema"])
    val_loader = build_loaders(cfg, *build_datasets(cfg), 0, 1, False)[2]
    got = validate(ema, val_loader, torch.device("cpu"), nullcontext)
    assert got["top1"] == recs[-1]["val_ema"]["top1"] and got["images"] == len(val_set) == 10
    assert ck["metrics"]["val_ema"] == recs[-1]["val_ema"] and ck["metrics"]["epoch"] == 1
    # evaluators pick either network: model (the default for a checkpoint without a teacher) or model_ema
    for key, part in ((None, "model"), ("teacher", "model"), ("model", "model"), ("model_ema", "model_ema")):
        bb, rep = build_backbone_from_checkpoint(out / "checkpoint.pth", **({} if key is None else
                                                                           {"checkpoint_key": key}))
        assert rep["checkpoint_key"] == part and rep["config_source"] == "checkpoint"
        want = {k[len("backbone."):]: v for k, v in ck[part].items() if k.startswith("backbone.")}
        assert all(torch.equal(v, want[k]) for k, v in bb.state_dict().items())
    assert load_pretrained(bb, out / "checkpoint.pth", checkpoint_key="model_ema")["checkpoint_key"] == "model_ema"


def test_best_checkpoint(trained):
    out = trained["token"]
    best = load_checkpoint(out / "checkpoint_best.pth")
    recs = [r for r in read_json_log(out / "log.txt") if "val_ema" in r]
    top = max(r["val_ema"]["top1"] for r in recs)
    first = next(r for r in recs if r["val_ema"]["top1"] == top)
    assert best["best"] == {"top1": top, "epoch": first["epoch"], "network": "model_ema"}
    assert best["epoch"] == first["epoch"] + 1


def test_no_ema_checkpoint_has_no_model_ema_key(tmp_path):
    from dino_simpool.checkpoint import CheckpointError
    out = tmp_path / "run"
    assert main(TINY + ["--max-iters", "1", "--output", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoint.pth")
    assert "model_ema" not in ck
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        build_backbone_from_checkpoint(out / "checkpoint.pth", checkpoint_key="model_ema")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    pytest.param(TINY_VIT + ["--mixup", "0.5", "--cutmix", "1.0", "--reprob", "0.5", "--drop-path", "0.1",
                             "--sched-on-updates"], id="vit-mixup-cutmix-erasing-droppath"),
    pytest.param(["--model", "resnet_test", "--synthetic-size", "64", "--img-size", "64", "--mixup", "0",
                  "--aug-splits", "3", "--jsd-loss", "--split-bn"], id="resnet-splits-jsd-splitbn"),
])
def test_resume_bit_identical_mid_epoch_and_epoch_boundary(tmp_path, capsys, extra):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = TINY_DATA + TINY_OPT + ["--gp", "simpool", "--model-ema"] + extra
    assert main(args + ["--output", str(ref)]) == 0
    assert main(args + ["--output", str(cut), "--max-iters", "3"]) == 0  # mid-epoch 0
    ck = load_checkpoint(cut / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (0, 3, 3)
    assert main(args + ["--output", str(cut), "--max-iters", "5"]) == 0  # the epoch boundary
    assert main(args + ["--output", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "at epoch 0 iteration 3" in out and "at epoch 1 iteration 5" in out
    a, b = load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(cut / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 10
    assert _diff(a, b, ("model", "model_ema", "model_aux_bn", "model_ema_aux_bn")) == []
    assert a["metrics"] == b["metrics"]
    # not vacuous: another seed gives other weights
    other = tmp_path / "other"
    assert main(args + ["--output", str(other), "--seed", "1", "--max-iters", "3"]) == 0
    assert _diff(load_checkpoint(cut / "checkpoint.pth"), load_checkpoint(other / "checkpoint.pth"))


@pytest.mark.slow
def test_sigterm_mid_epoch_exit_75_and_resume_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = TINY + ["--mixup", "0.5", "--sched-on-updates", "False"]  # the per-epoch schedule (the other test: updates)
    r = _run(args + ["--output_dir", str(ref)])
    assert r.returncode == 0, r.stderr
    r = _run(args + ["--output_dir", str(cut)], {"DINO_SIMPOOL_TEST_SIGNAL_AT": "6"})  # epoch 1, 2nd batch
    assert r.returncode == 75, r.stdout + r.stderr
    ck = load_checkpoint(cut / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (1, 7, 2)
    r = _run(args + ["--output_dir", str(cut)])
    assert r.returncode == 0 and "at epoch 1 iteration 7" in r.stdout, r.stdout + r.stderr
    assert _diff(load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(cut / "checkpoint.pth")) == []
    ev = [e for e in read_json_log(cut / "log.txt") if e.get("event") in ("preempted", "resume")]
    assert [(e["event"], e["iteration"]) for e in ev] == [("preempted", 7), ("resume", 7)]


def test_nonfinite_loss_exit_3_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output", str(out), "--max-iters", "2"]) == 0
    before = (out / "checkpoint.pth").read_bytes()
    assert main(TINY + ["--output", str(out)], hooks=Hooks(poison_loss=lambda it: it == 3)) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "global step 3" in err and "--clip-grad" in err
    assert (out / "checkpoint.pth").read_bytes() == before


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output", str(out), "--max-iters", "2"]) == 0
    assert main(TINY + ["--output", str(out), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other options" in err and "lr" in err


def test_locked_output_is_refused(tmp_path, capsys):
    from dino_simpool.rundir import RunLock
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        assert main(TINY + ["--output", str(out), "--max-iters", "1"]) == 2
    assert "in use by another run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_agree(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--epochs", "1", "--warmup-epochs", "0", "--model-ema", "--mixup", "0.5", "-b", "4",
                   "--output_dir", str(out)]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "TQDM_DISABLE": "1", "DINO_SIMPOOL_TEST_DUMP_RANKS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", HOOKS, *args], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m0 = torch.load(out / "model_rank0.pth", weights_only=True)
    m1 = torch.load(out / "model_rank1.pth", weights_only=True)
    assert [k for k in m0 if not torch.equal(m0[k], m1[k])] == []
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["config"]["world_size"] == 2 and ck["iteration"] == 5  # 40 images / 2 ranks / batch 4
    assert [k for k in m0 if not torch.equal(m0[k], ck["model"][k])] == []
    # validation counted every val image once over the two shards, logged once
    recs = [e for e in read_json_log(out / "log.txt") if "val" in e and "epoch" in e and "event" not in e]
    assert len(recs) == 1 and recs[0]["val"]["images"] == 10
    # the ranks drew different augmentations and mixup (seeded by rank): a 1-rank run with the same global batch differs
    one = tmp_path / "one"
    assert main(TINY + ["--epochs", "1", "--warmup-epochs", "0", "--model-ema", "--mixup", "0.5", "-b", "8",
                        "--output", str(one)]) == 0
    assert [k for k in m0 if not torch.equal(m0[k], load_checkpoint(one / "checkpoint.pth")["model"][k])]


# ------------------------------------------------------------------------------------------------ the evaluators
def test_knn_reads_a_supervised_checkpoint(trained, tmp_path, capsys):
    from eval.knn import main as knn_main
    rc = knn_main(["--pretrained_weights", str(trained["simpool"] / "checkpoint.pth"), "--nb_knn", "1", "3",
                   "--batch_size_per_gpu", "8", "--num_workers", "0", "--synthetic_size", "32", "--resize", "32",
                   "--crop", "32", "--output_dir", str(tmp_path / "knn")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(key 'model', dino_simpool)" in out, out[-2000:]  # the supervised network, its stored config
    res = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert res, res


def test_linear_reads_a_supervised_checkpoint(trained, tmp_path, capsys):
    from eval.linear import main as linear_main
    rc = linear_main(["--pretrained_weights", str(trained["simpool"] / "checkpoint.pth"), "--checkpoint_key",
                      "model_ema", "--epochs", "1", "--batch_size_per_gpu", "8", "--num_workers", "0",
                      "--synthetic_per_class", "4", "--crop", "32", "--resize", "32", "--n_last_blocks", "1",
                      "--output_dir", str(tmp_path / "lin")])
    assert rc == 0
    assert "config: checkpoint" in capsys.readouterr().out


def test_attention_and_compare_read_supervised_checkpoints(trained, tmp_path, capsys):
    from PIL import Image
    from eval.attention import main as attn_main
    assert attn_main(["--checkpoint", str(trained["simpool"] / "checkpoint.pth"), "--output_dir", str(tmp_path / "a"),
                      "--num_images", "2", "--synthetic_size", "32"]) == 0
    assert len(list((tmp_path / "a").glob("*.png"))) == 2
    assert attn_main(["--compare", str(trained["token"] / "checkpoint.pth"), str(trained["simpool"] / "checkpoint.pth"),
                      str(trained["avg"] / "checkpoint.pth"), "--labels", "cls", "simpool", "gap",
                      "--output_dir", str(tmp_path / "c"), "--num_images", "3", "--synthetic_size", "32"]) == 0
    pic = Image.open(tmp_path / "c" / "compare.png")
    assert pic.width == 4 * 128 + 3 * 4 and pic.height == 28 + 3 * (128 + 4)  # input + 3 maps, 3 rows
    arr = np.asarray(pic)
    cells = [arr[28:28 + 128, c * 132:c * 132 + 128] for c in range(4)]
    spatial = [cell.astype(float).std(axis=(0, 1)).max() for cell in cells]
    assert spatial[0] > 0 and spatial[1] > 0 and spatial[2] > 0  # input, [CLS] mean over blocks, SimPool: maps
    assert spatial[3] == 0  # GAP weighs every patch alike: a uniform map, drawn as one
    assert not np.array_equal(cells[1], cells[2])
    capsys.readouterr()
    assert attn_main(["--compare", "a.pth", "--labels", "x", "y", "--output_dir", str(tmp_path / "d"),
                      "--num_images", "1"]) == 2
    assert "--labels gives 2 titles for 1" in capsys.readouterr().err


def test_localization_reads_a_supervised_checkpoint(trained, tmp_path, capsys):
    from eval.localization import main as loc_main
    rc = loc_main(["--pretrained_weights", str(trained["simpool"] / "checkpoint.pth"), "--output_dir",
                   str(tmp_path / "loc"), "--synthetic_per_class", "1", "--synthetic_size", "32"])
    assert rc == 0, capsys.readouterr().err
    assert "MaxBoxAccV2" in capsys.readouterr().out


@pytest.mark.parametrize("gp", ["token", "avg"])
def test_exported_supervised_backbone_loads_in_timm(trained, tmp_path, gp, capsys):
    from eval.export import main as export_main
    out = tmp_path / "exp"
    assert export_main(["--checkpoint", str(trained[gp] / "checkpoint.pth"), "--output_dir", str(out), "--key",
                        "model_ema"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["layout"] == "timm"
    spec = meta["timm"]
    model = timm.create_model(spec["model_name"], pretrained=True, num_classes=0, **spec["kwargs"],
                              pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors")))
    ours, _ = build_backbone_from_checkpoint(trained[gp] / "checkpoint.pth", checkpoint_key="model_ema")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ours.eval()(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ the demo
@pytest.mark.slow
def test_demo_trains_cls_and_simpool_and_draws_the_comparison(tmp_path):
    """``python -m dino_simpool.supervised`` with no --data-dir and no --gp, shortened: both runs and the picture."""
    out = tmp_path / "demo"
    r = _run(["--epochs", "1", "--synthetic-per-class", "8", "--output", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"ViT \[CLS\]: val top-1 [\d.]+% .*\(chance 10\.0%\)", r.stdout)
    assert re.search(r"ViT SimPool: val top-1 [\d.]+% .*\(chance 10\.0%\)", r.stdout)
    assert (out / "token" / "checkpoint.pth").is_file() and (out / "simpool" / "checkpoint.pth").is_file()
    from PIL import Image
    pic = Image.open(out / "attention.png")
    assert pic.width == 3 * 128 + 2 * 4  # input | [CLS] | SimPool


def test_launcher_submits_the_supervised_job(tmp_path):
    """``dino-simpool-launch --job supervised``: the module, USR1 before the time limit (it saves and exits 75), and the
    run folder as --output_dir (which the trainer takes as --output)."""
    from launch.slurm import main as launch_main
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = launch_main(["--job", "supervised", "--gpus-per-node", "8", "--dry-run", "--", "--config",
                          "launch/recipes/supervised/vit_small_simpool_gamma1.25_ep100.yaml", "--data-dir", "/d",
                          "--output_dir", str(tmp_path / "run")])
    script = buf.getvalue()
    assert rc == 0
    assert "-m dino_simpool.supervised" in script and "--signal=USR1@" in script
    assert f"--output_dir {tmp_path / 'run'}" in script
    # the flags the script passes parse as the trainer's
    cfg = parse_config(["--config", "launch/recipes/supervised/vit_small_simpool_gamma1.25_ep100.yaml", "--data-dir",
                        "/d", "--output_dir", str(tmp_path / "run"), "--backend", "gloo"])
    assert cfg.output == str(tmp_path / "run") and cfg.backend == "gloo"
