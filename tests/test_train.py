"""End-to-end training: tiny models on the embedded data; resume bit-identity; preemption; NaN; corrupt images; DDP."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_simpool.checkpoint import load_checkpoint
from dino_simpool.config import parse_config
from dino_simpool.dino.build import build_student_teacher
from dino_simpool.dino.trainer import build_data, knn_eval
from dino_simpool.evaluation import knn
from dino_simpool.logs import read_json_log
from dino_simpool.train import main

ROOT = Path(__file__).resolve().parents[1]

# 20 images (10 classes x 2), batch 8 -> 2 iterations per epoch
TINY_DATA = ["--synthetic_size", "32", "--synthetic_per_class", "2", "--batch_size_per_gpu", "8", "--num_workers", "0",
             "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2"]
TINY_OPT = ["--out_dim", "64", "--epochs", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
            "--optimizer", "adamw", "--lr", "5e-4", "--min_lr", "1e-6", "--weight_decay", "0.04",
            "--weight_decay_end", "0.4", "--eval_every", "0", "--saveckp_freq", "1", "--log_every", "1"]
TINY_VIT = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8"]
TINY = TINY_VIT + TINY_DATA + TINY_OPT


HOOKS = str(ROOT / "tests" / "train_hooks.py")  # the trainer with the fault hooks that tests inject


def _run(args, env_extra=None, timeout=240):
    """The trainer as a real process; with ``env_extra`` hooks (DINO_SIMPOOL_TEST_*) through tests/train_hooks.py."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    entry = [HOOKS] if env_extra else ["-m", "dino_simpool.train"]
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _same_weights(a, b):
    """Names of the tensors that differ between two checkpoints (student + teacher + loss centre)."""
    diff = [f"{part}.{k}" for part in ("student", "teacher") for k in a[part]
            if not torch.equal(a[part][k], b[part][k])]
    if not torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"]):
        diff.append("center")
    return diff


@pytest.mark.parametrize("model_args", [
    pytest.param(TINY_VIT + ["--pooling", "simpool"], id="vit-simpool"),
    pytest.param(TINY_VIT + ["--pooling", "simpool", "--gamma", "None"], id="vit-simpool-nogamma",
                 marks=pytest.mark.slow),
    pytest.param(TINY_VIT + ["--mode", "official"], id="vit-cls", marks=pytest.mark.slow),
    pytest.param(["--arch", "resnet_test", "--clip_grad", "3.0"], id="resnet", marks=pytest.mark.slow),
    # ConvNeXt's total stride is 32: 64/32 px crops
    pytest.param(["--arch", "convnext_test", "--precision", "bf16", "--global_crops_size", "64", "--local_crops_size",
                  "32", "--synthetic_size", "64", "--clip_grad", "1.0", "--clip_grad_mode", "global"],
                 id="convnext-bf16", marks=pytest.mark.slow),
    pytest.param(TINY_VIT + ["--precision", "fp16"], id="vit-fp16-gradscaler", marks=pytest.mark.slow),
])
def test_two_steps(tmp_path, model_args, capsys):
    out = tmp_path / "run"
    rc = main(TINY_DATA + TINY_OPT + model_args + ["--max_iters", "2", "--output_dir", str(out)])
    assert rc == 0
    ck = load_checkpoint(out / "checkpoint.pth")  # weights_only=True
    assert set(ck) >= {"student", "teacher", "optimizer", "scaler", "dino_loss", "epoch", "iteration",
                       "iter_in_epoch", "config", "rng"}
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (1, 2, 0)
    assert all(k.startswith(("backbone.", "head.")) for k in ck["student"])
    assert ck["student"].keys() == ck["teacher"].keys()
    # the student moved away from the teacher (gradients flowed; the EMA only follows at momentum 0.996)
    moved = [k for k, v in ck["student"].items() if v.is_floating_point() and not torch.equal(v, ck["teacher"][k])]
    assert len(moved) > 0.5 * sum(v.is_floating_point() for v in ck["student"].values())
    # teacher and student share gamma; gamma None really is no power
    bcfg = ck["config"]["backbone"]
    if "--gamma" in model_args:
        assert bcfg["gamma"] is None
    elif "--mode" not in model_args:
        assert bcfg["gamma"] == (1.25 if "vit_tiny" in model_args else 2.0)
    assert bcfg["arch"] == model_args[1]
    if "fp16" in model_args:
        assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0
    # config.yaml is the resolved config and parses back
    from dino_simpool.config import TrainConfig
    import yaml
    cfg = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.max_iters == 2 and cfg.precision in ("fp32", "bf16", "fp16")
    log = read_json_log(out / "log.txt")
    assert log[0]["event"] == "start" and any(r.get("epoch") == 0 and "loss" in r for r in log)
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    assert (out / "checkpoint0000.pth").is_file()


@pytest.mark.slow
def test_resume_bit_identical_epoch_boundary_and_mid_epoch(tmp_path, capsys):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(TINY + ["--output_dir", str(ref)]) == 0
    # stop at the epoch boundary (2 = one epoch), then in the middle of epoch 1 (3), then finish
    assert main(TINY + ["--output_dir", str(cut), "--max_iters", "2"]) == 0
    assert main(TINY + ["--output_dir", str(cut), "--max_iters", "3"]) == 0
    ck = load_checkpoint(cut / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (1, 3, 1)
    assert main(TINY + ["--output_dir", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "at epoch 1 iteration 2" in out and "at epoch 1 iteration 3" in out
    a, b = load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(cut / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 4
    assert _same_weights(a, b) == []
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            if torch.is_tensor(t):
                assert torch.equal(t, b["optimizer"]["state"][k][name])
    events = [r for r in read_json_log(cut / "log.txt") if r.get("event") == "resume"]
    assert [(r["epoch"], r["iteration"]) for r in events] == [(1, 2), (1, 3)]


@pytest.mark.slow
def test_different_seed_differs(tmp_path, capsys):
    """Guards the identity test against a vacuous pass: the weights do depend on the run's randomness."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(TINY + ["--output_dir", str(a), "--max_iters", "1"]) == 0
    assert main(TINY + ["--output_dir", str(b), "--max_iters", "1", "--seed", "1"]) == 0
    assert _same_weights(load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth"))


@pytest.mark.slow
def test_workers_do_not_change_the_result(tmp_path, capsys):
    """Augmentations are seeded per (seed, epoch, index): 0 or 2 loader workers give the same weights."""
    a, b = tmp_path / "w0", tmp_path / "w2"
    assert main(TINY + ["--output_dir", str(a), "--max_iters", "3"]) == 0
    assert main(TINY + ["--output_dir", str(b), "--max_iters", "3", "--num_workers", "2"]) == 0
    assert _same_weights(load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth")) == []


class _WorkerNiceness(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(os.nice(0))  # the worker's own niceness


def test_loader_workers_run_at_the_configured_niceness():
    from dino_simpool.config import parse_config
    from dino_simpool.data.loader import make_loader

    base = os.nice(0)
    for device, flags, expect in [("cpu", [], 19), ("cuda", [], 0), ("cpu", ["--loader_nice", "5"], 5)]:
        cfg = parse_config(TINY + ["--num_workers", "1", "--batch_size_per_gpu", "2", *flags]).resolve(device)
        assert cfg.loader_nice == expect
        loader = make_loader(_WorkerNiceness(), 2, cfg.num_workers, nice=cfg.loader_nice)
        got = torch.cat(list(loader)).unique().tolist()
        assert got == [min(19, base + expect)], (device, flags, got)
    with pytest.raises(ValueError, match="--loader_nice must be"):
        parse_config(TINY + ["--loader_nice", "20"])


@pytest.mark.slow
def test_sigterm_mid_epoch_exit_75_and_resume_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = TINY + ["--epochs", "2"]
    r = _run(args + ["--output_dir", str(ref)])
    assert r.returncode == 0, r.stderr
    # SIGTERM arrives during global iteration 2 (epoch 1, first batch): saved after it, at iteration 3
    r = _run(args + ["--output_dir", str(cut)], {"DINO_SIMPOOL_TEST_SIGNAL_AT": "2"})
    assert r.returncode == 75, r.stdout + r.stderr
    ck = load_checkpoint(cut / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (1, 3, 1)
    r = _run(args + ["--output_dir", str(cut)])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "at epoch 1 iteration 3" in r.stdout
    assert _same_weights(load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(cut / "checkpoint.pth")) == []
    ev = [r for r in read_json_log(cut / "log.txt") if r.get("event") in ("preempted", "resume")]
    assert [(e["event"], e["iteration"]) for e in ev] == [("preempted", 3), ("resume", 3)]


@pytest.mark.slow
def test_external_sigusr1_then_resume_identical(tmp_path):
    """A real signal from outside, at whatever iteration it lands: exit 75, and the resumed run ends identical."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = TINY + ["--epochs", "3", "--synthetic_per_class", "4"]  # 5 iterations per epoch, 15 in all
    assert _run(args + ["--output_dir", str(ref)]).returncode == 0
    env = {**os.environ, "TQDM_DISABLE": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-u", "-m", "dino_simpool.train", *args, "--output_dir", str(cut)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:  # wait for the first progress line: training has started, the handler is installed
        lines.append(line)
        if line.startswith("epoch 0/3 [1/5]"):
            p.send_signal(signal.SIGUSR1)
            break
    rest, _ = p.communicate(timeout=240)
    assert p.returncode == 75, "".join(lines) + rest
    ck = load_checkpoint(cut / "checkpoint.pth")
    assert 1 <= ck["iteration"] < 15
    r = _run(args + ["--output_dir", str(cut)])
    assert r.returncode == 0 and f"iteration {ck['iteration']}" in r.stdout
    assert _same_weights(load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(cut / "checkpoint.pth")) == []


def test_nonfinite_loss_exit_3_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output_dir", str(out), "--max_iters", "2"]) == 0
    before = (out / "checkpoint.pth").read_bytes()
    from dino_simpool.dino.trainer import Hooks
    rc = main(TINY + ["--output_dir", str(out)], hooks=Hooks(poison_loss=lambda it: it == 3))
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "global step 3" in err
    assert "bf16" in err and "--clip_grad" in err and "--lr" in err
    assert (out / "checkpoint.pth").read_bytes() == before  # the last good state is untouched
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 2


@pytest.mark.slow
def test_absurd_lr_stops_with_exit_3(tmp_path, capsys):
    """No hook: a real divergence (lr 1e30 with SGD) is caught the same way."""
    out = tmp_path / "run"
    rc = main(TINY + ["--output_dir", str(out), "--optimizer", "sgd", "--lr", "1e30", "--warmup_epochs", "0",
                      "--epochs", "2"])
    assert rc == 3
    assert "non-finite loss" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_jpeg_is_skipped(tmp_path, caplog, capsys):
    from dino_simpool.data import SyntheticShapes
    data = tmp_path / "data"
    SyntheticShapes("train", image_size=32, images_per_class=2).export_imagefolder(data)
    bad = next((data / "train").iterdir()) / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        rc = main(TINY + ["--data_path", str(data), "--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "0",
                          "--warmup_teacher_temp_epochs", "0", "--batch_size_per_gpu", "21"])
    assert rc == 0  # 21 images incl. the corrupt one -> one batch of 21 loads every index once
    assert "corrupt.jpg" in caplog.text


@pytest.mark.parametrize("argv,msg", [
    (["--data_path", "/nonexistent/path"], "does not exist"),
    (["--batch_size_per_gpu", "64"], "not one full batch"),
])
def test_bad_data_exit_2(tmp_path, argv, msg, capsys):
    rc = main(TINY + ["--output_dir", str(tmp_path / "o")] + argv)
    assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.slow
def test_mismatched_checkpoint_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output_dir", str(out), "--max_iters", "1"]) == 0
    rc = main(TINY + ["--output_dir", str(out), "--embed_dim", "64"])
    assert rc == 2 and "does not match" in capsys.readouterr().err


def test_pretrained_weights_start_student_and_teacher(tmp_path, capsys):
    from dino_simpool.config import parse_config
    from dino_simpool.dino.build import build_student_teacher, init_from_pretrained

    first = tmp_path / "first"
    assert main(TINY + ["--output_dir", str(first), "--max_iters", "2"]) == 0
    donor = load_checkpoint(first / "checkpoint.pth")["teacher"]
    donor_bb = {k[len("backbone."):]: v for k, v in donor.items() if k.startswith("backbone.")}
    student, teacher = build_student_teacher(parse_config(TINY + ["--seed", "1"]))
    assert any(not torch.equal(v, donor_bb[k]) for k, v in student.backbone.state_dict().items())  # not trivially equal
    report = init_from_pretrained(student, teacher, str(first / "checkpoint.pth"), "teacher")
    assert report["loaded"] == len(donor_bb)
    for net in (student, teacher):
        got = net.backbone.state_dict()
        assert got.keys() == donor_bb.keys() and all(torch.equal(got[k], donor_bb[k]) for k in got)
    # the command line: the flag is honoured, and a resume from --output_dir wins over it
    second = tmp_path / "second"
    args = TINY + ["--output_dir", str(second), "--pretrained_weights", str(first / "checkpoint.pth")]
    assert main(args + ["--max_iters", "1"]) == 0
    assert "backbone initialised from" in capsys.readouterr().out
    assert main(args + ["--max_iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "backbone initialised from" not in out
    # a checkpoint of another width is refused (exit 2, naming the mismatch): nothing is silently skipped
    rc = main(TINY + ["--output_dir", str(tmp_path / "third"), "--embed_dim", "64",
                      "--pretrained_weights", str(first / "checkpoint.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and ("mismatch" in err.lower() or "shape" in err.lower()), err


@pytest.mark.slow
def test_periodic_knn_logged(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(TINY + ["--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "0",
                      "--warmup_teacher_temp_epochs", "0", "--eval_every", "1", "--nb_knn", "1", "5"])
    assert rc == 0
    rec = [r for r in read_json_log(out / "log.txt") if "k-NN" in r]
    assert len(rec) == 1 and set(rec[0]["k-NN"]) == {"1", "5"}
    assert 0.0 <= rec[0]["k-NN"]["1"]["top1"] <= 100.0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model_args", [
    pytest.param(["--arch", "resnet_test"], id="resnet-bn"),
    pytest.param(TINY_VIT, id="vit-simpool"),
])
def test_torchrun_two_ranks_identical_teacher(tmp_path, model_args, monkeypatch):
    out = tmp_path / "run"
    args = model_args + TINY_DATA + TINY_OPT + ["--epochs", "1", "--warmup_epochs", "0",
                                                 "--warmup_teacher_temp_epochs", "0", "--batch_size_per_gpu", "4",
                                                 "--eval_every", "1", "--nb_knn", "1", "3", "--output_dir", str(out)]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    # k-NN bank blocks of 4 rows: the 20-image bank is split over both ranks (2 and 3 blocks)
    env = {**os.environ, "TQDM_DISABLE": "1", "DINO_SIMPOOL_TEST_DUMP_RANKS": "1", "OMP_NUM_THREADS": "1",
           "DINO_SIMPOOL_TEST_KNN_BANK_BLOCK": "4"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", HOOKS, *args],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t0 = torch.load(out / "teacher_rank0.pth", weights_only=True)
    t1 = torch.load(out / "teacher_rank1.pth", weights_only=True)
    assert t0.keys() == t1.keys()
    assert [k for k in t0 if not torch.equal(t0[k], t1[k])] == []
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["config"]["world_size"] == 2 and ck["iteration"] == 2  # 20 images / 2 ranks / batch 4 -> 2 it/epoch
    assert len(ck["rng"]["per_rank"]) == 2
    # the teacher actually changed (EMA of a trained student), and equals what rank 0 saved
    assert [k for k in t0 if not torch.equal(t0[k], ck["teacher"][k])] == []
    # the periodic k-NN ran with 2 ranks (bank sharded, search split) and was logged once, by rank 0
    rec = [r for r in read_json_log(out / "log.txt") if "k-NN" in r]
    assert len(rec) == 1 and set(rec[0]["k-NN"]) == {"1", "3"}, r.stdout[-2000:]
    assert all(0.0 <= v["top1"] <= v["top5"] <= 100.0 for v in rec[0]["k-NN"].values())
    assert "k-NN: " in r.stdout and "FLOP over 2 rank(s)" in r.stdout and "ETA" in r.stdout  # rank 0's estimate
    # ... and its numbers are what ONE rank computes for the same teacher
    monkeypatch.setattr(knn, "BANK_BLOCK", 4)
    cfg = parse_config(args)
    cfg.resolve("cpu")
    _, teacher = build_student_teacher(cfg)
    teacher.load_state_dict(t0)
    knn_sets = build_data(cfg, 1, 0, torch.device("cpu"))[3]
    assert knn_eval(teacher, cfg, knn_sets, torch.device("cpu")) == rec[0]["k-NN"]


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    """The README demo path (train + before/after k-NN) on its --quick setting; not a claim about its accuracy."""
    from eval.demo import DEMO_MARKER, main as demo_main
    assert demo_main(["--quick", "--output_dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "DINO 1 epochs" in out
    assert (tmp_path / "demo" / "checkpoint.pth").is_file()
    assert (tmp_path / "demo" / DEMO_MARKER).is_file()  # a rerun may replace this folder


def test_signal_during_startup_is_honoured(tmp_path):
    """SIGUSR1 before the first step (while the process group / data / models are set up) must not kill the job:
    it saves at the first iteration boundary and exits 75, so the launcher can requeue it."""
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "import dino_simpool.distributed as D\n"
        "orig = D.init_distributed\n"
        "def early(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    return orig(*a, **k)\n"
        "D.init_distributed = early\n"
        "from dino_simpool.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *TINY, "--output_dir", str(out)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 75, r.stderr[-2000:]
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] == 1 and ck["iter_in_epoch"] == 1


def test_no_arguments_trains_on_the_embedded_defaults(tmp_path, capsys):
    """No --data_path: every flag not given takes the embedded-dataset default (the demo's configuration), and the
    run says so; a flag given explicitly still wins."""
    import yaml

    from dino_simpool.config import EMBEDDED_DEFAULTS
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["--max_iters", "1", "--output_dir", str(out)]) == 0
    assert time.perf_counter() - t0 < 90  # was ResNet-50 on 224 px crops, batch 64, out_dim 60000 (~25 GB)
    stdout = capsys.readouterr().out
    assert sum("no --data_path" in line for line in stdout.splitlines()) == 1
    ck = load_checkpoint(out / "checkpoint.pth")
    assert {k: ck["config"][k] for k in EMBEDDED_DEFAULTS} == EMBEDDED_DEFAULTS
    assert ck["config"]["backbone"]["arch"] == "vit_tiny" and ck["config"]["backbone"]["embed_dim"] == 64
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["gamma"] == 1.25 and saved["drop_path_rate"] == 0.0 and saved["data_path"] is None
    out2 = tmp_path / "explicit"
    assert main(["--max_iters", "1", "--output_dir", str(out2), "--batch_size_per_gpu", "16", "--num_workers", "0",
                 "--out_dim", "32"]) == 0
    c = load_checkpoint(out2 / "checkpoint.pth")["config"]
    assert (c["batch_size_per_gpu"], c["num_workers"], c["out_dim"]) == (16, 0, 32)
    assert c["lr"] == EMBEDDED_DEFAULTS["lr"] and c["iterations_per_epoch"] == 1000 // 16


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_unusable_output_dir_exit_2(tmp_path, kind, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    out = f if kind == "file" else f / "sub"
    rc = main(TINY + ["--output_dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "--output_dir" in lines[0] and "Traceback" not in err
    assert f.read_text() == "x"


def test_teacher_gets_the_students_gamma():
    """Official bug: the ViT teacher was built without --gamma (always 1.25). Here both get the flag's value."""
    from dino_simpool.config import parse_config
    from dino_simpool.dino.build import build_student_teacher
    for gamma, want in (("2.0", 2.0), ("None", None), ("default", 1.25)):
        cfg = parse_config(TINY_VIT + ["--gamma", gamma, "--out_dim", "16"])
        student, teacher = build_student_teacher(cfg)
        assert student.backbone.pool.gamma == want
        assert teacher.backbone.pool.gamma == student.backbone.pool.gamma
        assert teacher.backbone.config["gamma"] == student.backbone.config["gamma"] == want
        assert teacher.state_dict().keys() == student.state_dict().keys()


def test_knn_eval_unwraps_a_wrapped_teacher(tmp_path):
    """The periodic k-NN takes the teacher's backbone through any ``.module`` wrapper, DDP included (the official
    code used ``teacher.module.backbone`` / ``teacher.backbone`` by arch and crashed on the other case)."""
    import torch.distributed as dist
    from torch import nn

    from dino_simpool.data import build_dataset
    from dino_simpool.dino.augment import eval_transform
    from dino_simpool.config import parse_config
    from dino_simpool.dino.build import build_student_teacher, unwrap
    from dino_simpool.dino.trainer import knn_eval

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    cfg = parse_config(TINY + ["--nb_knn", "1", "3", "--output_dir", str(tmp_path)])
    cfg.resolve("cpu")
    student, teacher = build_student_teacher(cfg)
    assert unwrap(teacher) is teacher and unwrap(Wrapper(Wrapper(teacher))) is teacher
    tf = eval_transform(resize=36, crop=32)
    sets = (build_dataset(None, "train", transform=tf, image_size=32, images_per_class=2),
            build_dataset(None, "val", transform=tf, image_size=32, images_per_class=2))
    cpu = torch.device("cpu")
    plain = knn_eval(teacher, cfg, sets, cpu)
    assert set(plain) == {"1", "3"}
    assert knn_eval(Wrapper(teacher), cfg, sets, cpu) == plain
    # a real DistributedDataParallel teacher (DINO wraps it when the model has BatchNorm), one gloo rank
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for p in teacher.parameters():  # DDP refuses a module without trainable parameters
            p.requires_grad_(True)
        ddp = nn.parallel.DistributedDataParallel(teacher)
        assert unwrap(ddp) is teacher
        assert knn_eval(ddp, cfg, sets, cpu) == plain
    finally:
        dist.destroy_process_group()


def test_max_iters_0_writes_the_initial_weights(tmp_path, capsys):
    """The random-init baseline of an SSL comparison: the exact weights training starts from, as a checkpoint that
    every evaluator reads; a later run in the same folder trains on from them."""
    from dino_simpool.config import parse_config
    from dino_simpool.dino.build import build_student_teacher
    from dino_simpool.dino.determinism import seed_all

    out = tmp_path / "run"
    assert main(TINY + ["--max_iters", "0", "--seed", "3", "--output_dir", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"], ck["iter_in_epoch"]) == (0, 0, 0)
    seed_all(3)
    student, teacher = build_student_teacher(parse_config(TINY + ["--seed", "3"]))
    assert all(torch.equal(v, ck["teacher"][k]) for k, v in teacher.state_dict().items())
    assert main(TINY + ["--seed", "3", "--max_iters", "1", "--output_dir", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 1
