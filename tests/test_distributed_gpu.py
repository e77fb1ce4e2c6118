"""dino_simpool.distributed's start-up GPU check (issue 15 §1): no silent CPU fallback, no unsupported arch, no two
ranks on one GPU. On this CPU machine torch.cuda is monkeypatched where a GPU is needed; the CPU cases and the
refusal run as real processes (this machine's torch is a CUDA build without a GPU: is_available() is False)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dino_simpool import distributed as D

REPO = Path(__file__).resolve().parents[1]
ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # what the shipped torch 2.14 (cu130) lists


def fake_cuda(monkeypatch, available=True, count=8, capability=(9, 0), arches=ARCHES, name="NVIDIA H100"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches) if available else [])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)


@pytest.mark.parametrize("env, given", [
    ({}, None),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS=0,1,2,3"),
    ({"SLURM_STEP_GPUS": "5"}, "SLURM_STEP_GPUS=5"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),  # --gres=gpu:8
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_GPUS": "a100:2"}, "SLURM_GPUS=a100:2"),
    ({"SLURM_GPUS_PER_TASK": "1"}, "SLURM_GPUS_PER_TASK=1"),
    ({"SLURM_JOB_GRES": "gpu:a100:2(IDX:0-1)"}, "SLURM_JOB_GRES=gpu:a100:2(IDX:0-1)"),
    ({"SLURM_TRES_PER_NODE": "gres/gpu:4"}, "SLURM_TRES_PER_NODE=gres/gpu:4"),
    ({"SLURM_TRES_PER_TASK": "cpu:4"}, None),
    ({"SLURM_JOB_GRES": "tmpfs:10"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8f3a"}, "CUDA_VISIBLE_DEVICES=GPU-8f3a"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    # GPUs hidden on purpose win over what Slurm says
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_GPUS_ON_NODE": "4"}, None),
])
def test_gpus_allocated(env, given):
    assert D.gpus_allocated(env) == given


@pytest.mark.parametrize("cap, ok", [
    ((7, 0), False),  # V100: the shipped torch has no sm_70 (nor PTX below sm_75)
    ((6, 1), False),
    ((7, 5), True), ((8, 0), True), ((8, 6), True), ((8, 9), True),  # L4/L40: sm_86 code runs on 8.9
    ((9, 0), True), ((10, 0), True), ((12, 0), True), ((12, 1), True),
    ((11, 0), False),  # no sm_11x code and no PTX
])
def test_arch_supported_on_the_shipped_arch_list(cap, ok):
    assert D.arch_supported(cap, ARCHES) is ok


def test_arch_supported_rules():
    assert D.arch_supported((9, 0), ["sm_90a"]) and not D.arch_supported((9, 1), ["sm_90a"])
    assert D.arch_supported((9, 0), ["compute_80"]) and not D.arch_supported((7, 5), ["compute_80"])
    assert not D.arch_supported((8, 0), ["sm_86"])  # machine code does not run on an older minor


def test_allocated_gpus_without_cuda_raise_one_line(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    with pytest.raises(D.GpuSetupError) as e:
        D.check_gpu_setup(0, {"SLURM_JOB_GPUS": "0,1"})
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert "SLURM_JOB_GPUS=0,1" in msg and "driver" in msg and "torch build that matches the driver" in msg
    assert "CUDA_VISIBLE_DEVICES=" in msg  # the way to run on CPU on purpose
    with pytest.raises(D.GpuSetupError):
        D.device_for(D.DistEnv(), {"SLURM_GPUS_ON_NODE": "8"})


def test_no_gpus_allocated_runs_on_cpu(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    D.check_gpu_setup(0, {})
    assert D.device_for(D.DistEnv(), {}).type == "cpu"
    assert D.device_for(D.DistEnv(), {"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "0"}).type == "cpu"


def test_unsupported_arch_raises_naming_arch_and_fix(monkeypatch):
    fake_cuda(monkeypatch, capability=(7, 0), name="Tesla V100-SXM2-32GB")
    with pytest.raises(D.GpuSetupError) as e:
        D.device_for(D.DistEnv(local_rank=3), {"SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"})
    msg = str(e.value)
    assert "\n" not in msg and "sm_70" in msg and "Tesla V100" in msg and "sm_75 sm_80" in msg
    assert "--constraint a100 or h100" in msg and "torch build" in msg


def test_supported_gpu_gets_cuda_local_rank(monkeypatch):
    fake_cuda(monkeypatch, count=8, capability=(8, 0))
    assert D.device_for(D.DistEnv(local_rank=5, world_size=8), {"SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}) == \
        torch.device("cuda", 5)


@pytest.mark.parametrize("count, local_rank", [(4, 4), (4, 7), (2, 5)])
def test_two_ranks_on_one_gpu_raise(monkeypatch, count, local_rank):
    # today this was silently cuda:<local_rank % count>: ranks 0 and 4 on one GPU
    fake_cuda(monkeypatch, count=count)
    with pytest.raises(D.GpuSetupError, match=f"local rank {local_rank} has no GPU of its own"):
        D.device_for(D.DistEnv(local_rank=local_rank, world_size=8))


def test_one_visible_gpu_per_task_is_a_per_task_binding(monkeypatch):
    # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU, as cuda:0 (checked across ranks later)
    fake_cuda(monkeypatch, count=1)
    assert D.device_for(D.DistEnv(local_rank=3, world_size=4), {"CUDA_VISIBLE_DEVICES": "3"}) == torch.device("cuda", 0)


def test_init_distributed_refuses_before_any_process_group(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
           "SLURM_JOB_GPUS": "0,1"}
    with pytest.raises(D.GpuSetupError, match="GPUs were allocated"):
        D.init_distributed(environ=env)


# ---------------------------------------------------------------------------------------------------- processes

def _py_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


# The training command line, tiny (the real-Slurm tests' flags): one epoch of 2 iterations on embedded images.
TINY_TRAIN = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
              "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
              "--batch_size_per_gpu", "4", "--synthetic_size", "32", "--synthetic_per_class", "2", "--epochs", "1",
              "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0", "--num_workers", "0",
              "--max_iters", "1"]


@pytest.mark.slow
def test_train_cli_refuses_allocated_gpus_it_cannot_use(tmp_path):
    """The real command line on this GPU-less machine, as on a node whose driver is too old for torch's CUDA."""
    proc = subprocess.run([sys.executable, "-m", "dino_simpool.train", *TINY_TRAIN, "--output_dir", str(tmp_path)],
                          cwd=REPO, timeout=180, env=_py_env(SLURM_JOB_GPUS="0"), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dino-simpool-train: error: GPUs were allocated to this job (SLURM_JOB_GPUS=0)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.slow
def test_hidden_gpus_still_train_on_cpu(tmp_path):
    """CUDA_VISIBLE_DEVICES="" inside a GPU allocation: the user asked for CPU, and the training runs there."""
    proc = subprocess.run([sys.executable, "-m", "dino_simpool.train", *TINY_TRAIN, "--output_dir", str(tmp_path)],
                          cwd=REPO, timeout=300, capture_output=True, text=True,
                          env=_py_env(CUDA_VISIBLE_DEVICES="", SLURM_JOB_GPUS="0,1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "checkpoint.pth").exists()


# Two real gloo ranks whose torch.cuda is patched to show each of them one GPU with the UUID in GPU_UUID.
_TWO_RANKS = textwrap.dedent("""
    import os, sys
    from types import SimpleNamespace
    import torch
    from dino_simpool import distributed as D
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.get_device_capability = lambda i=None: (9, 0)
    c.get_arch_list = lambda: ["sm_90"]
    c.get_device_name = lambda i=None: "NVIDIA H100"
    c.set_device = lambda d: None
    c.get_device_properties = lambda d: SimpleNamespace(uuid=os.environ["GPU_UUID"])
    try:
        env = D.init_distributed(backend="gloo", timeout_s=60)
    except D.GpuSetupError as e:
        print("refused:", e, flush=True)
        sys.exit(2)
    print("ok", D.device_for(env), flush=True)
    D.cleanup()
""")


def _two_ranks(uuids: list[str]) -> list[subprocess.CompletedProcess]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_py_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(port), GPU_UUID=uuids[r]))
             for r in range(2)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_that_see_the_same_gpu_both_stop():
    """A per-task binding that shows both ranks the same GPU: each rank has "its own" cuda:0, but it is one GPU."""
    results = _two_ranks(["GPU-same", "GPU-same"])
    for r in results:
        assert r.returncode == 2, r.stdout[-2000:]
        assert "refused: ranks 0, 1 all run on one GPU (GPU-same on " in r.stdout, r.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_their_own_gpus_start():
    results = _two_ranks(["GPU-aaaa", "GPU-bbbb"])
    for r in results:
        assert r.returncode == 0 and "ok cuda:0" in r.stdout, r.stdout[-2000:]
