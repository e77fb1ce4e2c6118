"""Where am I running? torchrun, then SLURM tasks, then a single process; and the process-group set-up.

One small module used by training, the evaluators and the SLURM launcher, so that all of them agree on rank,
world size, master address and port.
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


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


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
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        if torch.cuda.is_available():
            torch.cuda.set_device(device_for(env))
        return env
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"--backend must be 'nccl' or 'gloo'; got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl needs CUDA; this machine has no GPU. Use --backend gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
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
    if os.environ.get("DINO_SIMPOOL_LOG_RANKS"):  # set by the Slurm launcher's script: one line per rank in the log
        print(f"[rank {env.rank}/{env.world_size}] process group up: {backend}, host {socket.gethostname()}, "
              f"local rank {env.local_rank}, master {env.master_addr}:{env.master_port} (from {env.source})",
              flush=True)
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
