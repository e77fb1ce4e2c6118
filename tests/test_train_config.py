"""Training CLI/config: official flag names and meanings, aliases, YAML recipes, clean errors."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dino_simpool.dino.config import TrainConfig, bool_flag, load_recipe, parse_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))


def test_defaults_are_simpool_main_dino():
    c = parse_config([])
    # SimPool's main_dino.py defaults (DINO differs on these)
    assert (c.arch, c.out_dim, c.use_bn_in_head, c.teacher_temp, c.warmup_teacher_temp_epochs) == \
        ("resnet50", 60000, True, 0.07, 50)
    assert (c.optimizer, c.lr, c.min_lr, c.weight_decay, c.weight_decay_end, c.clip_grad) == \
        ("lars", 0.3, 0.0048, 1e-6, 1e-6, 0.0)
    assert c.global_crops_scale == (0.14, 1.0) and c.local_crops_scale == (0.05, 0.14) and c.local_crops_number == 6
    assert c.nb_knn == (10, 20, 100, 200) and c.eval_every == 5 and c.saveckp_freq == 20
    assert c.precision is None and c.gamma == "default"
    assert c.resolve("cpu").precision == "fp32"
    assert TrainConfig().resolve("cuda").precision == "bf16"


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
    p.write_text("norm_last_layer: maybe\n")
    with pytest.raises(ValueError, match="norm_last_layer"):
        parse_config(["--config", str(p)])
    with pytest.raises(ValueError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("argv,match", [
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--global_crops_scale", "0.5", "0.2"], "global_crops_scale"),
    (["--epochs", "3"], "warmup_epochs"),
    (["--epochs", "20", "--warmup_epochs", "2"], "warmup_teacher_temp_epochs"),
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


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(path):
    c = load_recipe(path)
    text = path.read_text()
    assert "main_dino.py" in text and "dino_simpool.train --config" in text  # the README command + ours
    stem = path.stem
    assert c.arch == stem.split("_")[0] + ("_small" if "small" in stem else "")
    if "official" in stem:
        assert c.pooling in ("cls", "gap")
    else:
        assert c.pooling == "simpool"
        assert (c.gamma is None) if "nogamma" in stem else c.gamma == float(re.search(r"gamma([\d.]+)_", stem)[1])
    assert c.epochs == (300 if "ep300" in stem else 100)
    # global batch arithmetic written out correctly (README typos fixed: 1440 not 1280; linear 1024 not 1028)
    m = re.search(r"Global batch = processes x batch_size_per_gpu = (\d+) x (\d+) = (\d+)", text)
    assert m and int(m[1]) * int(m[2]) == int(m[3])
    assert int(m[2]) == c.batch_size_per_gpu
    assert {"resnet50": 1440, "vit": 800, "convnext": 480}[stem.split("_")[0]] == int(m[3])
    assert "4 GPUs x 256 = 1024" in text
    # same command line through argparse
    via_cli = parse_config(["--config", str(path)])
    assert via_cli.config == str(path)
    via_cli.config = None
    assert via_cli == c
