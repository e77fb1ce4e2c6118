"""--preset dino|simpool: DINO's and SimPool's README command lines, verbatim, mean what they mean at home.

The expected values are written out from the reference (../shared/reference/simpool.md §3: SimPool's main_dino.py
defaults, DINO's in brackets) and from each README line, not read from the config package, so a change of a default
there fails here. Also: the start-up line, the schedule and device warnings, --pretrained_weights '', --num_threads.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_simpool.config import (DINO_DEFAULTS, EMBEDDED_DEFAULTS, TrainConfig, device_warnings, parse_config,
                                 schedule_warnings)
from dino_simpool.dino.schedules import cosine_scheduler, scaled_lr

ROOT = Path(__file__).resolve().parents[1]

# facebookresearch/dino README.md at 7c446df (the commit of the reference), verbatim
DINO_VITS = ("python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small "
             "--data_path /path/to/imagenet/train --output_dir /path/to/saving_dir")
DINO_VITS_SUBMITIT = ("python run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small --data_path "
                      "/path/to/imagenet/train --output_dir /path/to/saving_dir")
DINO_VITB = ("python run_with_submitit.py --nodes 2 --ngpus 8 --use_volta32 --arch vit_base  --data_path "
             "/path/to/imagenet/train --output_dir /path/to/saving_dir")
DINO_BOOST = ("python run_with_submitit.py --arch vit_small --epochs 300 --teacher_temp 0.07 "
              "--warmup_teacher_temp_epochs 30 --norm_last_layer false --data_path /path/to/imagenet/train "
              "--output_dir /path/to/saving_dir")
DINO_RN50 = ("python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch resnet50 --optimizer sgd "
             "--lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale "
             "0.05 0.14 --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir")
# billpsomas/simpool self_supervised/README.md at fac2263, verbatim (line continuations joined)
SIMPOOL_VITS = ("python3 -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small --mode simpool "
                "--gamma 1.25 --data_path /path/to/imagenet/ --output_dir /path/to/output/ --optimizer adamw "
                "--use_bn_in_head False --out_dim 65536 --subset -1 --batch_size_per_gpu 100 --local_crops_number 6 "
                "--epochs 100 --num_workers 10 --lr 0.0005 --min_lr 0.00001 --global_crops_scale 0.25 1.0 "
                "--local_crops_scale 0.05 0.25 --norm_last_layer False --warmup_teacher_temp_epochs 30 "
                "--weight_decay 0.04 --weight_decay_end 0.4")
SIMPOOL_RN50 = ("python3 -m torch.distributed.launch --nproc_per_node=16 main_dino.py --arch resnet50 --mode simpool "
                "--data_path /path/to/imagenet/ --output_dir /path/to/output/ --subset -1 --num_workers 10 "
                "--batch_size_per_gpu 90 --out_dim 60000 --use_bn_in_head True --teacher_temp 0.07 "
                "--warmup_teacher_temp_epochs 50 --use_fp16 False --weight_decay 0.000001 --weight_decay_end 0.000001 "
                "--clip_grad 0.0 --epochs 100 --lr 0.3 --min_lr 0.0048 --optimizer lars --global_crops_scale 0.14 1.0 "
                "--local_crops_number 6 --local_crops_scale 0.05 0.14")
SIMPOOL_CONVNEXT = ("python3 -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch convnext_small --mode "
                    "simpool --data_path /path/to/imagenet/ --output_dir /path/to/output/ --subset -1 --num_workers 10 "
                    "--batch_size_per_gpu 60 --out_dim 65536 --use_bn_in_head False --weight_decay 0.04 "
                    "--weight_decay_end 0.4 --clip_grad 0.3 --epochs 100 --min_lr 2e-6 --optimizer adamw --lr 0.001 "
                    "--freeze_last_layer 3")
SUBMITIT_OWN = {"--nodes": 1, "--ngpus": 1, "--use_volta32": 0}  # run_with_submitit.py's own flags: value count


def main_dino_flags(line: str) -> list[str]:
    """The flags a README line gives main_dino.py (run_with_submitit.py passes its non-own flags through)."""
    tokens = shlex.split(line)
    script = next(i for i, t in enumerate(tokens) if t.endswith(("main_dino.py", "run_with_submitit.py")))
    flags, rest = [], tokens[script + 1:]
    while rest:
        t = rest.pop(0)
        if tokens[script].endswith("run_with_submitit.py") and t in SUBMITIT_OWN:
            del rest[:SUBMITIT_OWN[t]]
        else:
            flags.append(t)
    return flags


# DINO's main_dino.py defaults (reference §3, the bracketed values and the shared ones)
DINO_HOME = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
                 use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                 weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
                 freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw",
                 drop_path_rate=0.1, global_crops_scale=(0.4, 1.0), local_crops_number=8,
                 local_crops_scale=(0.05, 0.4), saveckp_freq=20, seed=0)
# SimPool's main_dino.py defaults (reference §3)
SIMPOOL_HOME = dict(arch="resnet50", patch_size=16, out_dim=60000, norm_last_layer=True, momentum_teacher=0.996,
                    use_bn_in_head=True, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=50,
                    weight_decay=1e-6, weight_decay_end=1e-6, clip_grad=0.0, batch_size_per_gpu=64, epochs=100,
                    freeze_last_layer=1, lr=0.3, warmup_epochs=10, min_lr=0.0048, optimizer="lars",
                    global_crops_scale=(0.14, 1.0), local_crops_number=6, local_crops_scale=(0.05, 0.14),
                    saveckp_freq=20, seed=0, subset=-1, eval_every=5, nb_knn=(10, 20, 100, 200), temperature=0.07)


def home(defaults: dict, **line) -> dict:
    return {**defaults, **line}


SIMPOOL_VITS_HOME = home(SIMPOOL_HOME, arch="vit_small", drop_path_rate=0.1, optimizer="adamw", use_bn_in_head=False,
                         out_dim=65536, batch_size_per_gpu=100, lr=0.0005, min_lr=1e-5, global_crops_scale=(0.25, 1.0),
                         local_crops_scale=(0.05, 0.25), norm_last_layer=False, warmup_teacher_temp_epochs=30,
                         weight_decay=0.04, weight_decay_end=0.4)
# line -> (preset it must choose, what the home repository trains with it)
CASES = {
    "dino_vits": (DINO_VITS, "dino", home(DINO_HOME, pooling="cls")),
    "dino_vits_submitit": (DINO_VITS_SUBMITIT, "dino", home(DINO_HOME, pooling="cls")),
    "dino_vitb": (DINO_VITB, "dino", home(DINO_HOME, arch="vit_base", pooling="cls")),
    "dino_boost": (DINO_BOOST, "dino", home(DINO_HOME, pooling="cls", epochs=300, teacher_temp=0.07,
                                            warmup_teacher_temp_epochs=30, norm_last_layer=False)),
    # torchvision's ResNet-50: global average pooling, no stochastic depth
    "dino_rn50": (DINO_RN50, "dino", home(DINO_HOME, arch="resnet50", pooling="gap", drop_path_rate=0.0,
                                          optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                                          global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))),
    "simpool_vits": (SIMPOOL_VITS, "simpool", {**SIMPOOL_VITS_HOME, "pooling": "simpool", "gamma": 1.25}),
    # the README's "For ViT-S official adjust --mode official": DINO's [CLS] under SimPool's other defaults
    "simpool_vits_official": (SIMPOOL_VITS.replace("--mode simpool", "--mode official"), "simpool",
                              {**SIMPOOL_VITS_HOME, "pooling": "cls"}),
    "simpool_rn50": (SIMPOOL_RN50, "simpool", home(SIMPOOL_HOME, pooling="simpool", gamma=2.0, precision="fp32",
                                                   drop_path_rate=0.0, batch_size_per_gpu=90)),
    "simpool_convnext": (SIMPOOL_CONVNEXT, "simpool", home(
        SIMPOOL_HOME, arch="convnext_small", pooling="simpool", gamma=2.0, drop_path_rate=0.4, batch_size_per_gpu=60,
        out_dim=65536, use_bn_in_head=False, weight_decay=0.04, weight_decay_end=0.4, clip_grad=0.3, min_lr=2e-6,
        optimizer="adamw", lr=0.001, freeze_last_layer=3)),
}


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_line_means_what_it_means_at_home(name):
    line, preset, want = CASES[name]
    c = parse_config(main_dino_flags(line))
    assert c.preset == preset
    got = {k: _plain(getattr(c, k)) for k in want}
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert c.data_path.startswith("/path/to/imagenet")


@pytest.mark.parametrize("name", ["dino_vits", "dino_rn50"])
def test_flags_appended_to_shrink_a_run_keep_the_preset(name):
    """SimPool-only flags that shrink a run (--subset, --eval_every, --nb_knn) do not switch a DINO line over."""
    line, preset, want = CASES[name]
    c = parse_config(main_dino_flags(line) + ["--epochs", "2", "--warmup_epochs", "1", "--subset", "2",
                                              "--eval_every", "0", "--nb_knn", "1", "--batch_size_per_gpu", "4"])
    assert c.preset == "dino"
    assert (c.optimizer, c.lr, c.out_dim, c.teacher_temp, c.local_crops_number, c.pooling) == \
        (want["optimizer"], want["lr"], want["out_dim"], want["teacher_temp"], want["local_crops_number"],
         want["pooling"])


def test_the_preset_rule(tmp_path):
    d = ["--data_path", "/data"]
    assert parse_config(d).preset == "dino"
    assert parse_config(d + ["--mode", "official"]).preset == "simpool"
    assert parse_config(d + ["--pooling", "simpool", "--gamma", "2"]).preset == "dino"  # this project's flags
    assert parse_config(d + ["--mode", "simpool", "--preset", "dino"]).preset == "dino"  # --preset wins
    c = parse_config(d + ["--preset", "SimPool"])
    assert (c.preset, c.arch, c.optimizer, c.lr) == ("simpool", "resnet50", "lars", 0.3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: official\narch: vit_small\n")
    assert parse_config(d + ["--config", str(recipe)]).preset == "simpool"  # --mode in the recipe counts
    assert parse_config(d + ["--config", str(recipe), "--preset", "dino"]).preset == "dino"
    recipe.write_text("preset: dino\nmode: simpool\n")
    c = parse_config(d + ["--config", str(recipe)])
    assert (c.preset, c.pooling, c.optimizer, c.teacher_temp) == ("dino", "simpool", "adamw", 0.04)
    with pytest.raises(SystemExit):
        parse_config(d + ["--preset", "moco"])


def test_presets_do_not_move_the_embedded_defaults():
    """Without --data_path the demo's values apply under either preset (the demo's figures must not move)."""
    for argv in ([], ["--arch", "vit_small"], ["--arch", "resnet_test"], ["--mode", "official"]):
        a, b = parse_config(argv + ["--preset", "dino"]).to_dict(), parse_config(argv + ["--preset", "simpool"])
        b = b.to_dict()
        assert {k for k in a if a[k] != b[k]} == {"preset"}, argv
    # the embedded values, written out (the demo's configuration, README "The demo")
    assert EMBEDDED_DEFAULTS == {
        "arch": "vit_tiny", "depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "pooling": "simpool",
        "gamma": 1.25, "drop_path_rate": 0.0, "global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2,
        "global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.2, 0.5], "synthetic_size": 64,
        "synthetic_per_class": 100, "out_dim": 64, "use_bn_in_head": False, "norm_last_layer": True,
        "optimizer": "adamw", "lr": 0.008, "min_lr": 1e-5, "weight_decay": 0.04, "weight_decay_end": 0.1,
        "warmup_epochs": 2, "momentum_teacher": 0.99, "warmup_teacher_temp": 0.02, "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 3, "freeze_last_layer": 1, "clip_grad": 3.0, "batch_size_per_gpu": 32,
        "epochs": 25, "num_workers": 2, "saveckp_freq": 100,
    }
    # --preset dino differs from the fields' (SimPool's) defaults exactly where the reference brackets DINO's value
    assert DINO_DEFAULTS == {
        "arch": "vit_small", "pooling": "official", "out_dim": 65536, "use_bn_in_head": False, "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0, "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0,
        "lr": 0.0005, "min_lr": 1e-6, "optimizer": "adamw", "global_crops_scale": [0.4, 1.0],
        "local_crops_number": 8, "local_crops_scale": [0.05, 0.4],
    }


def test_start_up_line_names_the_preset_and_the_defaults_it_took():
    line = parse_config(main_dino_flags(DINO_VITS)).describe_preset()
    assert "--preset dino" in line and "DINO's main_dino.py" in line and "no --mode" in line
    for part in ("pooling cls", "optimizer adamw", "lr 0.0005", "out_dim 65536", "teacher_temp 0.04",
                 "global_crops_scale 0.4 1.0", "local_crops_number 8", "min_lr 1e-06"):
        assert part in line, part
    assert "arch" not in line  # given on the command line, not a default it took
    line = parse_config(main_dino_flags(SIMPOOL_VITS)).describe_preset()
    assert "--preset simpool" in line and "--mode given" in line and "teacher_temp 0.07" in line
    assert "lr 0.0005" not in line and "optimizer" not in line  # given
    line = parse_config([]).describe_preset()
    assert "embedded" in line and "arch vit_tiny" in line and "\n" not in line


def test_min_lr_above_the_scaled_peak_warns_and_the_schedule_really_rises():
    world = 1
    for argv, rises in ((["--preset", "simpool", "--optimizer", "adamw", "--lr", "5e-4"], True),  # min_lr 0.0048
                        ([], False), (["--preset", "simpool"], False), (["--lr", "1e-3", "--min_lr", "2e-4"], False),
                        (["--lr", "1e-3", "--min_lr", "3e-4"], True)):
        c = parse_config(["--data_path", "/d"] + argv)
        sched = cosine_scheduler(scaled_lr(c.lr, c.batch_size_per_gpu * world), c.min_lr, c.epochs, 10,
                                 warmup_epochs=c.warmup_epochs)
        after_warmup = sched[c.warmup_epochs * 10]
        assert bool(sched[-1] > after_warmup) is rises, argv  # what the warning is about, on the real schedule
        warnings = schedule_warnings(c, world)
        assert bool(warnings) is rises, argv
        if rises:
            assert "--min_lr" in warnings[0] and "rises" in warnings[0]
    # the world size counts: 8 processes make DINO's peak 8x higher
    c = parse_config(["--data_path", "/d", "--lr", "1e-3", "--min_lr", "3e-4"])
    assert schedule_warnings(c, 1) and not schedule_warnings(c, 8)


def test_half_precision_on_cpu_warns():
    assert device_warnings(parse_config(["--use_fp16", "True"]), "cpu")
    assert "slower" in device_warnings(parse_config(["--precision", "bf16"]), "cpu")[0]
    assert not device_warnings(parse_config(["--precision", "fp16"]), "cuda")
    assert not device_warnings(parse_config([]), "cpu")  # auto = fp32 on CPU
    assert not device_warnings(parse_config([]).resolve("cpu"), "cpu")


def test_empty_pretrained_weights_is_refused(tmp_path, capsys):
    from dino_simpool.train import main
    with pytest.raises(ValueError, match="--pretrained_weights must be a weights file; got ''"):
        parse_config(["--pretrained_weights", ""])
    (tmp_path / "r.yaml").write_text("pretrained_weights: '  '\n")
    with pytest.raises(ValueError, match="--pretrained_weights"):
        parse_config(["--config", str(tmp_path / "r.yaml")])
    assert main(["--pretrained_weights", "", "--output_dir", str(tmp_path / "o")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "--pretrained_weights" in err[0] and "random weights" in err[0]
    assert not (tmp_path / "o").exists()  # refused before any work


def test_num_threads_is_applied_before_work(tmp_path, capsys):
    from dino_simpool.train import main
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # the run stops at the data (exit 2), after the command line has set the threads
        assert main(["--num_threads", "1", "--data_path", str(tmp_path / "missing"),
                     "--output_dir", str(tmp_path / "o")]) == 2
        assert torch.get_num_threads() == 1
        assert main(["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2
        assert torch.get_num_threads() == 1  # not given: left as it is
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--num_threads must be >= 1"):
        parse_config(["--num_threads", "0"])
    assert TrainConfig().num_threads is None


@pytest.mark.slow
def test_cli_prints_the_preset_line_and_warnings(tmp_path):
    """The real command: DINO's README line (output to a temporary folder) prints the preset line on stdout, then
    stops with one clear line at the missing dataset; a rising schedule is warned about on stderr."""
    argv = main_dino_flags(DINO_VITS) + ["--output_dir", str(tmp_path / "o"), "--min_lr", "0.01"]
    r = subprocess.run([sys.executable, "-m", "dino_simpool.train", *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=180)
    assert r.returncode == 2, r.stderr
    out = [x for x in r.stdout.splitlines() if "training defaults" in x]
    assert len(out) == 1 and "--preset dino" in out[0] and "optimizer adamw" in out[0]
    assert "min_lr" not in out[0]  # given
    err = r.stderr.strip().splitlines()
    assert any("warning: --min_lr 0.01 is larger than the peak lr" in x for x in err)
    assert "error:" in err[-1] and "/path/to/imagenet/train" in err[-1] and "Traceback" not in r.stderr
