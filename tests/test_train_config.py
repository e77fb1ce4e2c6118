"""Training CLI/config: official flag names and meanings, aliases, YAML recipes, clean errors."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dino_simpool.cli import bool_flag
from dino_simpool.config import TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))


def test_defaults_are_simpool_main_dino():
    # with a data path and --preset simpool: the ImageNet-scale official SimPool defaults
    c = parse_config(["--data_path", "/data/imagenet", "--preset", "simpool"])
    # SimPool's main_dino.py defaults (DINO differs on these)
    assert (c.arch, c.out_dim, c.use_bn_in_head, c.teacher_temp, c.warmup_teacher_temp_epochs) == \
        ("resnet50", 60000, True, 0.07, 50)
    assert (c.optimizer, c.lr, c.min_lr, c.weight_decay, c.weight_decay_end, c.clip_grad) == \
        ("lars", 0.3, 0.0048, 1e-6, 1e-6, 0.0)
    assert c.global_crops_scale == (0.14, 1.0) and c.local_crops_scale == (0.05, 0.14) and c.local_crops_number == 6
    assert c.nb_knn == (10, 20, 100, 200) and c.eval_every == 5 and c.saveckp_freq == 20
    assert (c.global_crops_size, c.local_crops_size, c.batch_size_per_gpu, c.epochs) == (224, 96, 64, 100)
    # departures (README table): SimPool pooling by default (official: --mode official = DINO's pooling);
    # gamma and drop-path resolved per family; precision per device
    assert c.pooling == "simpool"
    assert c.gamma == 2.0 and c.drop_path_rate == 0.0  # ResNet-50: the paper's gamma, no stochastic depth
    assert c.precision is None and c.aug_backend == "fast"
    assert c.resolve("cpu").precision == "fp32"
    assert TrainConfig().resolve("cuda").precision == "bf16"


@pytest.mark.parametrize("arch,gamma,drop_path", [
    ("vit_small", 1.25, 0.1), ("vit_tiny", 1.25, 0.1), ("resnet50", 2.0, 0.0), ("resnet_test", 2.0, 0.0),
    ("convnext_small", 2.0, 0.4), ("convnext_test", 2.0, 0.4),
])
def test_gamma_and_drop_path_resolve_per_family(arch, gamma, drop_path, tmp_path):
    c = parse_config(["--arch", arch, "--data_path", "/data"])
    assert (c.gamma, c.drop_path_rate) == (gamma, drop_path)
    # written resolved (not "default" / null) into config.yaml
    d = yaml.safe_load(c.save_yaml(tmp_path / "config.yaml").read_text())
    assert (d["gamma"], d["drop_path_rate"]) == (gamma, drop_path)
    # an explicit value is honoured
    c = parse_config(["--arch", arch, "--data_path", "/data", "--drop_path_rate", "0.25", "--gamma", "3"])
    assert (c.gamma, c.drop_path_rate) == (3.0, 0.25)
    assert parse_config(["--arch", arch, "--gamma", "None"]).gamma is None


def test_resnet_student_from_default_config_has_no_drop_path():
    """The official ResNet-50 has no stochastic depth; timm's ResNet builds DropPath layers for any rate > 0."""
    from timm.layers import DropPath

    from dino_simpool.dino.build import build_student_teacher
    c = parse_config(["--data_path", "/data", "--arch", "resnet_test", "--out_dim", "16"])
    student, teacher = build_student_teacher(c)
    assert not [m for m in student.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    # the check can fail: the same builder with the old default (0.1) does create active DropPath layers
    c.drop_path_rate = 0.1
    student, _ = build_student_teacher(c)
    assert [m for m in student.modules() if isinstance(m, DropPath) and m.drop_prob > 0]


def test_embedded_defaults_without_data_path():
    from eval.demo import DEMO_FLAGS
    from dino_simpool.config import EMBEDDED_DEFAULTS
    c = parse_config([])
    for k, v in EMBEDDED_DEFAULTS.items():
        got = getattr(c, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, k
    assert {k: DEMO_FLAGS[k] for k in EMBEDDED_DEFAULTS} == EMBEDDED_DEFAULTS  # the demo's configuration
    assert c.eval_every == 5 and c.data_path is None
    # a flag given explicitly wins, on the command line or in a recipe
    c = parse_config(["--lr", "0.1", "--epochs", "30", "--global_crops_size", "48"])
    assert (c.lr, c.epochs, c.global_crops_size, c.batch_size_per_gpu) == (0.1, 30, 48, 32)
    # --arch given: the model-shape flags keep that arch's own defaults, the rest stays embedded
    c = parse_config(["--arch", "resnet_test"])
    assert (c.arch, c.depth, c.gamma, c.drop_path_rate, c.patch_size) == ("resnet_test", None, 2.0, 0.0, 16)
    assert (c.out_dim, c.global_crops_size, c.batch_size_per_gpu) == (64, 32, 32)
    c = parse_config(["--arch", "vit_small"])
    assert (c.depth, c.embed_dim, c.drop_path_rate) == (None, None, 0.1)


@pytest.mark.parametrize("s,v", [("True", True), ("false", False), ("1", True), ("off", False), ("ON", True)])
def test_bool_flag(s, v):
    assert bool_flag(s) is v


def test_official_command_line_flags():
    c = parse_config("--arch vit_small --mode simpool --gamma 1.25 --optimizer adamw --use_bn_in_head False "
                     "--out_dim 65536 --subset -1 --batch_size_per_gpu 100 --local_crops_number 6 --epochs 100 "
                     "--num_workers 10 --lr 0.0005 --min_lr 0.00001 --global_crops_scale 0.25 1.0 "
                     "--local_crops_scale 0.05 0.25 --norm_last_layer False --warmup_teacher_temp_epochs 30 "
                     "--weight_decay 0.04 --weight_decay_end 0.4 --local_rank 0".split())
    assert c.pooling == "simpool" and c.gamma == 1.25 and c.use_bn_in_head is False and c.norm_last_layer is False
    assert c.global_crops_scale == (0.25, 1.0) and c.lr == 0.0005 and c.warmup_teacher_temp_epochs == 30


def test_mode_alias_and_gamma_none():
    assert parse_config(["--mode", "official", "--arch", "vit_small"]).pooling == "cls"
    assert parse_config(["--mode", "official", "--arch", "resnet50"]).pooling == "gap"  # DINO's CNN pooling
    assert parse_config(["--mode", "simpool"]).pooling == "simpool"
    assert parse_config(["--gamma", "None"]).gamma is None
    assert parse_config(["--gamma", "2"]).gamma == 2.0
    with pytest.raises(ValueError, match="give only one"):
        parse_config(["--mode", "official", "--pooling", "simpool"])


def test_use_fp16_alias():
    assert parse_config(["--use_fp16", "True"]).precision == "fp16"
    assert parse_config(["--use_fp16", "False"]).precision == "fp32"
    assert parse_config(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(ValueError, match="contradicts"):
        parse_config(["--use_fp16", "True", "--precision", "bf16"])


def test_yaml_recipe_then_cli_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("arch: vit_small\nmode: official\nlr: 0.001\nglobal_crops_scale: [0.3, 1.0]\nuse_fp16: true\n")
    c = parse_config(["--config", str(p)])
    assert (c.arch, c.pooling, c.lr, c.global_crops_scale, c.precision) == \
        ("vit_small", "cls", 0.001, (0.3, 1.0), "fp16")
    # the command line wins, also over the YAML's aliases
    c = parse_config(["--config", str(p), "--lr", "0.002", "--pooling", "simpool", "--precision", "bf16"])
    assert (c.lr, c.pooling, c.precision) == (0.002, "simpool", "bf16")


def test_yaml_unknown_key_and_bad_value(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown configuration key"):
        parse_config(["--config", str(p)])
    p.write_text("aug_backend: pil\n")
    with pytest.raises(ValueError, match="--aug_backend must be one of fast, v2"):
        parse_config(["--config", str(p)])
    p.write_text("norm_last_layer: maybe\n")
    with pytest.raises(ValueError, match="norm_last_layer"):
        parse_config(["--config", str(p)])
    with pytest.raises(ValueError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("argv,match", [
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--global_crops_scale", "0.5", "0.2"], "global_crops_scale"),
    (["--epochs", "3", "--data_path", "/d"], "warmup_epochs"),
    (["--epochs", "20", "--warmup_epochs", "2", "--data_path", "/d", "--preset", "simpool"],
     "warmup_teacher_temp_epochs"),
    (["--epochs", "1"], "warmup_epochs"),  # embedded defaults: 2 warm-up epochs
    (["--arch", "efficientnet_b0"], "--arch must be one of"),  # a timm family that is not supported
    (["--subset", "0"], "subset"),
    (["--momentum_teacher", "1.5"], "momentum_teacher"),
    (["--gamma", "-1"], "gamma"),
])
def test_bad_values_raise_valueerror(argv, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        parse_config(argv)


@pytest.mark.parametrize("argv", [["--lr", "abc"], ["--optimizer", "adam"], ["--norm_last_layer", "maybe"],
                                  ["--precision", "fp8"], ["--no_such_flag"]])
def test_bad_flags_exit_2_argparse(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["--lr", "abc"], "--lr"), (["--epochs", "1.5"], "--epochs"), (["--no_such_flag"], "--no_such_flag"),
    (["--optimizer", "adam"], "--optimizer"),
])
def test_argparse_errors_are_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and "see --help" in lines[0] and "usage" not in lines[0]


def test_arch_help_lists_exactly_the_accepted_archs():
    from dino_simpool.config import build_parser
    from dino_simpool.models.backbones import list_archs
    action = next(a for a in build_parser()._actions if "--arch" in a.option_strings)
    listed = re.search(r"backbone: ([\w, ]+?) \[", action.help)[1].split(", ")
    assert listed == list_archs()
    for arch in listed:  # each one is accepted
        parse_config(["--arch", arch])
    help_text = build_parser().format_help()
    assert "resnet34" not in help_text and "convnext_base" not in help_text
    # the pooling departure is stated in --help
    assert "official --mode defaults to official" in " ".join(help_text.split())


def test_cli_bad_value_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "dino_simpool.train", "--lr", "-1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--lr must be >= 0" in lines[0] and "Traceback" not in r.stderr


def test_resolved_config_roundtrip(tmp_path):
    c = parse_config(["--arch", "vit_small", "--gamma", "None", "--nb_knn", "5", "10"])
    c.save_yaml(tmp_path / "config.yaml")
    back = TrainConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert back == c


def test_all_paper_recipes_present():
    names = {p.stem for p in RECIPES}
    assert {"vit_small_simpool_gamma1.25_ep100", "vit_small_simpool_gamma1.25_ep300", "vit_small_simpool_nogamma_ep100",
            "vit_small_official_ep100", "resnet50_simpool_gamma2.0_ep100", "resnet50_simpool_nogamma_ep100",
            "resnet50_official_ep100", "convnext_small_simpool_gamma2.0_ep100",
            "convnext_small_simpool_nogamma_ep100", "convnext_small_official_ep100"} <= names




def test_any_timm_backbone_trains_from_the_command_line():
    """issue 13 §2: timm names of the supported families reach the trainer; a ViT name carries its patch size."""
    from dino_simpool.dino.build import build_student_teacher

    for arch, family_patch in (("resnet34", None), ("timm/convnext_atto", None), ("vit_tiny_patch16_224", 16),
                               ("vit_small_patch8_224", 8)):
        cfg = parse_config(["--arch", arch, "--data_path", "/tmp/unused", "--out_dim", "16"])
        if family_patch is not None:
            assert cfg.patch_size == family_patch
    cfg = parse_config(["--arch", "resnet34", "--data_path", "/tmp/unused", "--out_dim", "16"])
    student, _ = build_student_teacher(cfg)
    assert student.backbone.config["arch"] == "resnet34"
    with pytest.raises(ValueError, match="supported"):
        parse_config(["--arch", "efficientnet_b0", "--data_path", "/tmp/unused"])
    with pytest.raises(ValueError, match="patch size 8"):
        parse_config(["--arch", "vit_small_patch8_224", "--patch_size", "14", "--data_path", "/tmp/unused"])
