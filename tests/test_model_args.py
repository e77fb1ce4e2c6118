"""eval/model_args.py, the evaluators' front door: every evaluator takes the same model flags with the same meaning,
and builds (and loads) the backbone the same way."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dino_simpool.checkpoint import save_atomic
from dino_simpool.export import export_backbone
from dino_simpool.models.backbones import build_backbone
from eval import knn, linear
from eval.model_args import add_model_args, build_model, model_overrides

TINY_VIT = ["--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8"]
# module -> the flags its parser needs besides the model flags
EVALUATORS = {
    "eval.knn": [], "eval.linear": [], "eval.attention": ["--output_dir", "o"], "eval.localization": [],
    "eval.discovery": [], "eval.export": ["--output_dir", "o"],
}


def _parser(module):
    mod = importlib.import_module(module)
    return (mod.get_args_parser if hasattr(mod, "get_args_parser") else mod.build_parser)()


def _save_training_checkpoint(model, path):
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    return save_atomic({"teacher": sd, "student": sd, "config": {"backbone": model.config}}, path)


@pytest.mark.parametrize("module", list(EVALUATORS))
def test_every_evaluator_takes_the_same_model_flags(module):
    argv = ["--checkpoint", "w.pth", "--key", "student", "--arch", "resnet_test", "--mode", "official",
            "--gamma", "None", *EVALUATORS[module]]
    args = _parser(module).parse_args(argv)
    assert (args.pretrained_weights, args.checkpoint_key) == ("w.pth", "student")
    assert model_overrides(args) == {"arch": "resnet_test", "pooling": "gap", "gamma": None}
    args = _parser(module).parse_args(["--pretrained_weights", "w.pth", "--checkpoint_key", "teacher",
                                       *EVALUATORS[module]])
    assert (args.pretrained_weights, args.checkpoint_key) == ("w.pth", "teacher")
    assert model_overrides(args) == {}  # nothing given: everything comes from the checkpoint


@pytest.mark.parametrize("module", list(EVALUATORS))
def test_every_evaluator_refuses_a_bad_gamma_in_one_line(module, capsys):
    with pytest.raises(SystemExit) as e:
        _parser(module).parse_args(["--gamma", "0", *EVALUATORS[module]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "invalid gamma '0'" in err


def test_linear_gamma_none_is_not_ignored():
    """``dino-simpool-linear --gamma None`` once fell through ``if args.gamma is not None`` to the default 1.25."""
    p = linear.get_args_parser()
    m = linear.build_model(p.parse_args(["--arch", "vit_tiny", "--gamma", "None", "--crop", "32", *TINY_VIT]))
    assert m.config["pooling"] == "simpool" and m.config["gamma"] is None
    m = linear.build_model(p.parse_args(["--arch", "vit_tiny", "--crop", "32", *TINY_VIT]))
    assert m.config["gamma"] == 1.25  # unset: the ViT default


def test_linear_gamma_none_is_applied_to_a_checkpoint(tmp_path, capsys):
    """Asked for no gamma, a checkpoint trained with one (its ``pool.beta``) is refused, not loaded as if the flag
    had not been given."""
    trained = build_backbone("vit_tiny", pooling="simpool", gamma=1.25, img_size=32, depth=1, embed_dim=32,
                             num_heads=2, patch_size=8)
    ckpt = _save_training_checkpoint(trained, tmp_path / "checkpoint.pth")
    p = linear.get_args_parser()
    assert linear.build_model(p.parse_args(["--pretrained_weights", str(ckpt)])).config["gamma"] == 1.25
    rc = linear.main(["--pretrained_weights", str(ckpt), "--gamma", "None", "--output_dir", str(tmp_path / "lin"),
                      "--num_workers", "0", "--epochs", "1", "--synthetic_size", "32", "--synthetic_per_class", "2",
                      "--resize", "36", "--crop", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "gamma=None" in err and "pool.beta" in err


def _imagefolder(root, classes="ab", n=2, size=32):
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((g.random((size, size, 3)) * 255).astype("uint8")).save(root / split / c / f"{i}.png")
    return root


def test_knn_mode_official_on_a_cnn_is_global_average_pooling(tmp_path, capsys):
    """``dino-simpool-knn --mode official`` once meant ``cls`` for every arch; for a CNN it is DINO's ``gap``, as in
    training and the linear probe: the gap checkpoint loads and gives the figures of its own pooling."""
    cnn = build_backbone("resnet_test", pooling="gap")
    ckpt = _save_training_checkpoint(cnn, tmp_path / "checkpoint.pth")
    root = _imagefolder(tmp_path / "data")
    common = ["--pretrained_weights", str(ckpt), "--data_path", str(root), "--resize", "32", "--crop", "32",
              "--nb_knn", "1", "--num_workers", "0", "--use_cuda", "false"]
    assert knn.main(common + ["--mode", "official", "--output_dir", str(tmp_path / "mode")]) == 0, \
        capsys.readouterr().err
    assert "resnet_test, pooling gap" in capsys.readouterr().out
    assert knn.main(common + ["--output_dir", str(tmp_path / "own")]) == 0
    mode, own = (json.loads((tmp_path / d / "knn_results.json").read_text())["results"] for d in ("mode", "own"))
    assert mode == own


@pytest.mark.parametrize("arch,want", [("vit_tiny", "cls"), ("resnet_test", "gap")])
def test_mode_official_without_arch_follows_the_checkpoints_arch(tmp_path, arch, want):
    kw = dict(img_size=32, **{k.strip("-"): int(v) for k, v in zip(TINY_VIT[::2], TINY_VIT[1::2])}) \
        if arch == "vit_tiny" else {}
    ckpt = _save_training_checkpoint(build_backbone(arch, pooling=want, **kw), tmp_path / "checkpoint.pth")
    for module in ("eval.knn", "eval.linear", "eval.attention"):
        args = _parser(module).parse_args(["--pretrained_weights", str(ckpt), "--mode", "official",
                                           *EVALUATORS[module]])
        assert build_model(args, log=lambda _: None).config["pooling"] == want


@pytest.mark.parametrize("argv,match", [
    (["--mode", "official", "--pooling", "simpool"], "--mode official means --pooling"),
    (["--mode", "simpool", "--pooling", "gap"], "--mode simpool means --pooling simpool"),
    (["--arch", "resnet_test", "--mode", "official", "--pooling", "cls"], "--mode official means --pooling gap"),
    (["--arch", "nosuch", "--mode", "official"], "unknown arch"),
])
def test_disagreeing_model_flags_are_a_value_error(argv, match):
    args = _parser("eval.knn").parse_args(argv)
    with pytest.raises(ValueError, match=match):
        model_overrides(args)


def test_random_init_is_announced_and_export_folders_load_with_their_own_loader(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_model_args(p)
    lines = []
    m = build_model(p.parse_args(["--arch", "vit_tiny", *TINY_VIT]), log=lines.append)
    assert "RANDOMLY INITIALISED vit_tiny" in lines[-1] and not m.training
    export_backbone(m, tmp_path / "exp")
    got = build_model(p.parse_args(["--pretrained_weights", str(tmp_path / "exp")]), log=lines.append)
    assert lines[-1].startswith(f"loaded export {tmp_path / 'exp'}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), m(x))


@pytest.mark.parametrize("module", ["eval.knn", "eval.localization", "eval.discovery", "eval.linear"])
def test_random_init_baseline_is_seeded(module):
    """``--seed`` picks the random-init baseline: the same seed, the same network; another seed, another network
    (k-NN, localization and discovery take the model group's ``--seed``; the linear probe its own)."""
    def weights(*argv):
        args = _parser(module).parse_args(["--arch", "vit_tiny", *TINY_VIT, *EVALUATORS[module], *argv])
        torch.manual_seed(1234)  # whatever the global RNG holds, the seed decides
        sd = build_model(args, img_size=32, log=lambda _: None).state_dict()
        torch.randn(3)
        return sd

    a, b, c = weights("--seed", "1"), weights("--seed", "1"), weights("--seed", "2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert any(not torch.equal(a[k], v) for k, v in weights().items() if v.is_floating_point())  # default 0 != 1
