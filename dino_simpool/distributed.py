"""Where am I running? torchrun, then SLURM tasks, then a single process; and the process-group set-up.

One small module used by training, the evaluators and the SLURM launcher, so that all of them agree on rank,
world size, master address and port.

Before any work, :func:`check_gpu_setup` (called by :func:`init_distributed` and :func:`device_for`) refuses to run
on CPU when GPUs were allocated but torch cannot use them (a driver older than torch's CUDA, a CPU build), a GPU whose
compute capability torch was not built for (V100 = sm_70 with a torch for sm_75 and newer), and two ranks on one GPU.
It raises :class:`GpuSetupError`, a ValueError, which every command line reports in one line with exit status 2.
``CUDA_VISIBLE_DEVICES=""`` (or ``-1``) hides the GPUs on purpose: the job then runs on CPU.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from dino_simpool.cli import available_cpus

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rendezvous ports 20000-32767: below Linux's default ephemeral range (32768-60999), so a port derived from the job id
# does not collide with an outgoing connection's local port.
PORT_BASE, PORT_SPAN = 20000, 12768


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad Slurm host list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"bad Slurm host list {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    """``rack[1-2]-n[01,03]`` -> rack1-n01, rack1-n03, rack2-n01, rack2-n03 (several bracket groups multiply)."""
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    values: list[str] = []
    for rng in ranges.split(","):
        rng = rng.strip()
        if not rng:
            continue
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {rng!r} in Slurm host list {name!r}")
            width = len(lo) if lo.startswith("0") else 0
            values.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
        else:
            values.append(rng)
    return [f"{prefix}{v}{tail}" for v in values for tail in _expand_one(rest)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list such as ``node[01-03,07],gpu5`` into host names (what ``scontrol show hostnames`` prints).

    Zero padding follows the lower bound (``n[08-10]`` -> n08, n09, n10); several bracket groups in one name multiply.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(part))
    return hosts


def port_from_job_id(job_id: int | str) -> int:
    """Deterministic rendezvous port for a Slurm job: every task of the job computes the same one."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Detect the launch environment. torchrun's variables win, even inside a Slurm allocation."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in TORCHRUN_VARS if k not in env]
        if missing:
            raise ValueError(f"RANK/WORLD_SIZE are set but {missing} are not; launch with torchrun or set all of {TORCHRUN_VARS}")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
            source="torchrun",
        )
    # Inside an srun step. Measured on Slurm 22.05: srun gives every task SLURM_PROCID, SLURM_LOCALID,
    # SLURM_STEP_ID, SLURM_STEP_NUM_TASKS and SLURM_STEP_NODELIST. The batch shell of an sbatch job has SLURM_PROCID=0
    # and SLURM_NTASKS (the job's task count) but no SLURM_STEP_ID / SLURM_STEP_NUM_TASKS: a python started there
    # without srun is ONE process, and taking SLURM_NTASKS as its world size would wait forever for absent peers.
    in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if "SLURM_PROCID" in env and in_step and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        hosts = expand_hostlist(nodelist)
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = port_from_job_id(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return DistEnv()


class GpuSetupError(ValueError):
    """The job was given GPUs that this torch cannot use, or two ranks would share one GPU (see check_gpu_setup)."""


# Slurm 22.05 gives a job with --gres=gpu:N SLURM_GPUS_ON_NODE=N and SLURM_JOB_GPUS=<ids>, an srun step
# SLURM_STEP_GPUS, and --gpus* the SLURM_GPUS* of the same name; SLURM_JOB_GRES / SLURM_TRES_PER_* carry "gpu:N".
_GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
                   "SLURM_GPUS_PER_SOCKET")
_GPU_ID_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
_GRES_VARS = ("SLURM_JOB_GRES", "SLURM_GRES", "SLURM_TRES_PER_NODE", "SLURM_TRES_PER_TASK", "SLURM_TRES_PER_JOB")
_NO_DEVICES = ("", "-1", "none", "nodevfiles", "n/a", "(null)")
TORCH_INSTALL_URL = "https://pytorch.org/get-started/locally/"


def _gpu_count(value: str, gres: bool) -> int:
    """The GPU count in a Slurm value: ``8``, ``a100:2`` (a SLURM_GPUS* count, ``gres=False``) or, for a GRES/TRES
    list (``gres=True``), the ``gpu`` entries of ``gpu:a100:2(IDX:0-1)``, ``gres/gpu:4``, ``gres:gpu:2,tmpfs:1``."""
    total = 0
    for item in value.split(","):
        item = item.split("(")[0].strip()
        if not item or (gres and "gpu" not in item.lower()):
            continue  # another generic resource (tmpfs:1, cpu:4, license:...)
        m = re.search(r"(\d+)$", item)
        total += int(m.group(1)) if m else 1  # "gpu" alone is one GPU
    return total


def gpus_allocated(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable (``NAME=value``) through which Slurm, torchrun or the user gave this process GPUs, or None.

    ``CUDA_VISIBLE_DEVICES`` set to ``""`` or ``-1`` hides every GPU on purpose and wins: None.
    """
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env and env["CUDA_VISIBLE_DEVICES"].strip().lower() in ("", "-1"):
        return None
    for k in _GPU_ID_VARS:
        v = env.get(k)
        if v is not None and v.strip().lower() not in _NO_DEVICES:
            return f"{k}={v}"
    for names, gres in ((_GPU_COUNT_VARS, False), (_GRES_VARS, True)):
        for k in names:
            v = env.get(k)
            if v and _gpu_count(v, gres) > 0:
                return f"{k}={v}"
    return None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether code built for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on a GPU of this capability.

    CUDA's rule: ``sm_XY`` machine code runs on X.Z for Z >= Y (same major; ``sm_XYa`` on X.Y only), ``compute_XY``
    (PTX) is compiled on the fly for any X.Y and newer. Written here because torch's own check is private and only warns.
    """
    major, minor = capability
    for arch in arch_list:
        m = re.match(r"^(sm|compute)_(\d+)(\d)([af]?)$", arch)
        if not m:
            continue
        kind, a_major, a_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "compute" and (major, minor) >= (a_major, a_minor):
            return True
        if kind == "sm" and major == a_major and (minor == a_minor if suffix == "a" else minor >= a_minor):
            return True
    return False


def check_gpu_setup(local_rank: int = 0, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, before any work, to run without the GPUs the job was given or on a GPU this torch cannot drive.

    Raises GpuSetupError (one line: the problem and the fix) when GPUs were allocated (:func:`gpus_allocated`) but
    ``torch.cuda.is_available()`` is False, when this rank's GPU has a compute capability outside
    ``torch.cuda.get_arch_list()``, or when ``local_rank`` has no GPU of its own (``local_rank >= device_count()`` with
    more than one visible GPU: two ranks would share one; a single visible GPU per task is a per-task GPU binding,
    which init_distributed checks across ranks).
    """
    given = gpus_allocated(environ)
    if not torch.cuda.is_available():
        if given:
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise GpuSetupError(
                f"GPUs were allocated to this job ({given}) but torch cannot use them: torch.cuda.is_available() is "
                f"False for torch {torch.__version__} ({build}), so the job would silently run on CPU. Usually the "
                f"NVIDIA driver is older than this CUDA needs (compare `nvidia-smi` with {TORCH_INSTALL_URL}); "
                "install a torch build that matches the driver, or set CUDA_VISIBLE_DEVICES= to run on CPU on purpose")
        return
    n = torch.cuda.device_count()
    if local_rank >= n and n != 1:
        raise GpuSetupError(
            f"local rank {local_rank} has no GPU of its own: this process sees {n} GPUs (cuda:0..cuda:{n - 1}), so "
            f"it would share cuda:{local_rank % n} with local rank {local_rank % n}; start one task per GPU "
            "(dino-simpool-launch: --gpus-per-node = the GPUs per node; torchrun: --nproc_per_node <= the GPUs)")
    index = local_rank if local_rank < n else 0
    cap = tuple(torch.cuda.get_device_capability(index))
    arches = list(torch.cuda.get_arch_list())
    if arches and not arch_supported(cap, arches):
        raise GpuSetupError(
            f"GPU {index} ({torch.cuda.get_device_name(index)}) has compute capability sm_{cap[0]}{cap[1]}, which "
            f"torch {torch.__version__} was not built for (it runs {' '.join(arches)}); run on GPUs it supports "
            f"(e.g. dino-simpool-launch --constraint a100 or h100, as your site names them) or install a torch build "
            f"whose torch.cuda.get_arch_list() has sm_{cap[0]}{cap[1]} ({TORCH_INSTALL_URL})")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(env: DistEnv, environ: Mapping[str, str] | None = None) -> torch.device:
    """cuda:<local_rank> when CUDA is present (cuda:0 when each task sees only its own GPU), else CPU.

    Runs :func:`check_gpu_setup` first: GPUs that were allocated but cannot be used raise instead of a CPU fallback.
    """
    check_gpu_setup(env.local_rank, environ)
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank if env.local_rank < torch.cuda.device_count() else 0)
    return torch.device("cpu")


def check_one_rank_per_gpu(device: torch.device) -> None:
    """Every rank on its own GPU: compare (host, GPU UUID) over the process group; raise GpuSetupError on all ranks
    when two share one (a per-task binding that shows every task the same GPU; NCCL would fail later and less
    clearly). Gathered over gloo, which works before NCCL has its communicators (that is where a shared GPU fails)."""
    if device.type != "cuda" or not is_dist():
        return
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:  # no UUID in this torch: nothing reliable to compare
        return
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    idents: list = [None] * dist.get_world_size()
    dist.all_gather_object(idents, (socket.gethostname(), str(uuid)), group=group)
    if group is not None:
        dist.destroy_process_group(group)
    by_gpu: dict = {}
    for rank, ident in enumerate(idents):
        by_gpu.setdefault(tuple(ident), []).append(rank)
    shared = [(ident, ranks) for ident, ranks in by_gpu.items() if len(ranks) > 1]
    if shared:
        (host, gpu), ranks = shared[0]
        raise GpuSetupError(
            f"ranks {', '.join(map(str, ranks))} all run on one GPU ({gpu} on {host}): every rank needs its own GPU; "
            "start one task per GPU and let each task see its GPU (dino-simpool-launch does: --gres=gpu:G with G "
            "tasks per node)")


def init_distributed(
    backend: str | None = None,
    dist_url: str = "env://",
    environ: Mapping[str, str] | None = None,
    timeout_s: float = 1800.0,
) -> DistEnv:
    """Detect the environment and, for more than one process, start the process group.

    ``dist_url='env://'`` uses the detected master address and port; any other URL (``tcp://``, ``file://``) is
    passed to torch as is. A single process starts no process group.
    """
    env = detect_env(environ)
    device = device_for(env, environ)  # GPUs given but unusable, an unsupported arch, a shared GPU: raise here
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return env
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"--backend must be 'nccl' or 'gloo'; got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl needs CUDA; this machine has no GPU. Use --backend gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_method = f"tcp://{env.master_addr}:{env.master_port}" if dist_url == "env://" else dist_url
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    # A process that ends on an uncaught exception would otherwise tear gloo down during interpreter shutdown, where
    # a peer that has already gone makes it abort (exit 134 instead of the traceback's 1).
    atexit.register(cleanup)
    check_one_rank_per_gpu(device)
    if os.environ.get("DINO_SIMPOOL_LOG_RANKS"):  # set by the Slurm launcher's script: one line per rank in the log
        print(f"[rank {env.rank}/{env.world_size}] process group up: {backend}, host {socket.gethostname()}, "
              f"local rank {env.local_rank}, device {device}, {available_cpus()} CPU(s), "
              f"master {env.master_addr}:{env.master_port} (from {env.source})", flush=True)
    return env


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op on one process)."""
    if is_dist():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def cleanup() -> None:
    """Destroy the process group if one is up; safe to call more than once."""
    if is_dist():
        dist.destroy_process_group()
