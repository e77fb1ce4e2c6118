"""``dino-simpool-launch``: submit pretraining or an evaluation to Slurm, with requeue on preemption.

    dino-simpool-launch --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
        -- --arch vit_small --data_path /data/imagenet --output_dir /checkpoints/dino_simpool_vits

The launcher writes a readable sbatch script into ``<output_dir>/slurm/``, submits it with ``sbatch`` and prints the
job id, the script and the log paths (``--dry-run`` prints the script and submits nothing). In the script:

- one srun task per GPU (``--ntasks-per-node = --gpus-per-node``, the node's GPUs requested with ``--gres=gpu:G``;
  each task uses ``cuda:<local rank>``, so every GPU has exactly one task and NCCL still sees the node's other GPUs
  for peer-to-peer copies); ``--gpus-per-node 0`` runs ``--ntasks-per-node`` CPU tasks with gloo;
- every task runs ``<python> -m <job module>`` directly, with the Python of the environment the launcher runs in;
  rank, world size, master address and port come from :mod:`dino_simpool.distributed` (no torchrun, no rendezvous
  file);
- ``--cpus-per-task`` defaults to 10 per GPU task (DINO's own launcher; 80 CPUs for 8 GPUs), to
  ``--cpus-per-node // tasks per node`` when ``--cpus-per-node`` is given, and to 1 for CPU tasks; srun gets it from
  ``SLURM_CPUS_PER_TASK`` (srun 22.05-23.08 no longer inherits it). A job ``--num_workers`` above it is warned about;
- ``--signal=USR1@<grace>``: the tasks save and exit 75 (see ``dino_simpool.signals``). srun runs in the background
  and the batch shell's traps pass a SIGUSR1 or SIGTERM that reaches only the shell (``scancel --batch``) on to srun
  as SIGUSR1, once (srun relays it to every task; it would turn a SIGTERM into SIGKILL). The batch script then runs
  ``scontrol requeue`` itself, after srun has returned. It does this rather than rank 0 because then (a) every rank
  has finished writing before Slurm kills the step, (b) the decision uses srun's exit status (the highest over all
  tasks), so a rank killed by a signal (128+n) or a failure on every rank (1, 3) is not requeued, (c) the count and
  its limit live in one place for train, knn and linear alike, and (d) the job's state is checked first: a saved
  exit after ``scancel`` (state COMPLETING) is not brought back;
- a stop signal that the batch shell passed on and that ended the tasks before their handler was up (exit 143 =
  128+SIGTERM or 138 = 128+SIGUSR1: Python still importing) counts as preempted, like exit 75.

Every value that reaches the script is checked first: control characters (a newline above all) are refused
everywhere; values on ``#SBATCH`` lines, which sbatch splits itself (no shell there), may not hold spaces, quotes,
``\\`` or ``#`` (paths are double-quoted for sbatch instead, ``%`` doubled in ``--output``); in the shell part every
value is one single-quoted word (``shlex.quote``), assigned to a variable and printed as its own argument, never
pasted into a double-quoted string.

Exit codes: 0 submitted (or dry run printed); 2 bad options or sbatch refused the job (its own message is shown).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dino_simpool.cli import OneLineErrorParser

TEMPLATE = Path(__file__).with_name("templates") / "slurm.sbatch"

# --job -> (python module, the job's process-group backend flag, saves and exits 75 on SIGUSR1/SIGTERM)
# eval.knn and eval.linear do not handle SIGUSR1 (its default action kills), so they get no --signal and the batch
# shell passes no signal on to them: they run until they end or the time limit kills them (TIMEOUT, not requeued).
# A Slurm preemption with PreemptMode=REQUEUE requeues them (--requeue) and they run again from the start:
# eval.linear then resumes from its last per-epoch checkpoint, eval.knn recomputes everything. Flip the third
# field when a job learns to exit 75 on USR1.
JOBS = {
    "train": ("dino_simpool.train", "--backend", True),
    "knn": ("dino_simpool.eval.knn", "--dist_backend", False),
    "linear": ("dino_simpool.eval.linear", "--backend", False),
    "supervised": ("dino_simpool.supervised", "--backend", True),
}
EXIT_SAVED = 75
_TIME_RE = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|unlimited|infinite)$",
    re.IGNORECASE,
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAIL_TYPES = {"NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
               "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS"}
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# A newline would end the #SBATCH line (or the comment) it is on and run the rest as shell; every other control
# character (and an undecodable byte, which Python keeps as a lone surrogate) has no business in a path or a name.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# sbatch splits an #SBATCH line itself (src/sbatch/opt.c, _get_argument): whitespace separates, ' and " group,
# \ escapes the next character (but never keeps a space), an unquoted # starts a comment.
_SBATCH_SPECIAL_RE = re.compile(r"[\s'\"\\#]")
DEFAULT_CPUS_PER_GPU_TASK = 10  # DINO's own Slurm launcher: 10 CPUs (data-loading workers) per GPU
DEFAULT_CPUS_PER_CPU_TASK = 1


def check_text(what: str, value: str) -> str:
    """``value`` if it holds no control character (a newline above all); else a ValueError naming ``what``."""
    m = _CONTROL_RE.search(value)
    if m:
        raise ValueError(f"{what} {value!r} contains the control character {m.group()!r} (position {m.start()}): "
                         "remove it (a newline would end the sbatch script's line and run the rest as shell)")
    return value


def check_sbatch_word(flag: str, value: str) -> str:
    """A value for an ``#SBATCH --flag=value`` line: one word that sbatch's own line parser keeps as it is."""
    check_text(flag, value)
    if not value:
        raise ValueError(f"{flag} is empty: give a value or leave the option out")
    m = _SBATCH_SPECIAL_RE.search(value)
    if m:
        raise ValueError(f"{flag} {value!r}: {m.group()!r} is not allowed (sbatch splits #SBATCH lines at spaces and "
                         "reads quotes, '\\' and '#' itself); Slurm names and lists never need it")
    return value


def sbatch_path(flag: str, path: str, filename_pattern: bool = False) -> str:
    """``path`` written for an ``#SBATCH`` line: in double quotes when it holds a space, a quote or ``#`` (sbatch keeps
    those inside quotes; a ``\\`` escapes the ``"``: a backslash does not escape a space there), and
    (``filename_pattern``, as for ``--output``) ``%`` doubled so that Slurm does not read it as ``%j`` and friends.

    A ``\\`` is refused: sbatch's line parser reads it as an escape, and Slurm's filename patterns give it a meaning
    of their own (``\\\\`` turns the ``%`` replacements off). A ``%`` is refused where the value is not a filename
    pattern (``--chdir``, taken literally by Slurm 22.05): doubling it would be wrong there.
    """
    check_text(flag, path)
    if "\\" in path:
        raise ValueError(f"{flag} {path!r}: a '\\' in a path is not supported by Slurm's #SBATCH lines; "
                         "use a path without it")
    if "%" in path and not filename_pattern:
        raise ValueError(f"{flag} {path!r}: a '%' is not supported here; use a path without it")
    if filename_pattern:
        path = path.replace("%", "%%")
    return '"' + path.replace('"', '\\"') + '"' if _SBATCH_SPECIAL_RE.search(path) else path


@dataclass
class LaunchSpec:
    """Everything the sbatch script depends on (plain data, so the script is a pure function of it)."""

    job: str = "train"
    job_args: list[str] = field(default_factory=list)
    output_dir: str = ""  # absolute
    workdir: str = ""  # absolute; the job's working directory (--chdir)
    python: str = sys.executable
    module: str | None = None  # overrides JOBS[job] (a module name, or a path to a .py file)
    nodes: int = 1
    gpus_per_node: int = 8
    ntasks_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None  # None: the default (see .cpus)
    cpus_per_node: int | None = None  # the nodes' CPUs, when known: the default cpus_per_task is this / tasks per node
    job_name: str | None = None
    mail_user: str | None = None
    mail_type: str | None = None
    signal_grace: int = 120
    max_requeues: int = 20
    dry_run: bool = False  # not part of the script

    # ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.job_name or f"dino-{self.job}"

    @property
    def handles_signal(self) -> bool:
        """Whether the job saves and exits 75 on SIGUSR1 (a --module job is expected to, like the training)."""
        return self.module is not None or JOBS[self.job][2]

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.ntasks_per_node or 1)

    @property
    def cpus(self) -> int:
        """CPUs per task written into the script: --cpus-per-task, else the default (see the module docstring)."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        if self.cpus_per_node is not None:
            return max(1, self.cpus_per_node // self.tasks_per_node)
        return DEFAULT_CPUS_PER_GPU_TASK if self.gpus_per_node > 0 else DEFAULT_CPUS_PER_CPU_TASK

    @property
    def slurm_dir(self) -> str:
        return os.path.join(self.output_dir, "slurm")

    @property
    def script_path(self) -> str:
        return os.path.join(self.slurm_dir, f"{self.name}.sbatch")

    def log_path(self, job_id: str = "%j") -> str:
        return os.path.join(self.slurm_dir, f"{self.name}-{job_id}.log")

    def validate(self) -> "LaunchSpec":
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if self.job not in JOBS:
            bad(f"--job must be one of {', '.join(JOBS)}; got {self.job!r}")
        if self.nodes < 1:
            bad(f"--nodes must be >= 1; got {self.nodes}")
        if self.gpus_per_node < 0:
            bad(f"--gpus-per-node must be >= 0 (0 = CPU tasks with gloo); got {self.gpus_per_node}")
        if self.ntasks_per_node is not None:
            if self.ntasks_per_node < 1:
                bad(f"--ntasks-per-node must be >= 1; got {self.ntasks_per_node}")
            if self.gpus_per_node > 0 and self.ntasks_per_node != self.gpus_per_node:
                bad(f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {self.gpus_per_node}: GPU jobs run "
                    "one task per GPU; leave --ntasks-per-node out (it is for --gpus-per-node 0, CPU tasks)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            bad(f"--cpus-per-task must be >= 1; got {self.cpus_per_task}")
        if self.cpus_per_node is not None and self.cpus_per_node < self.tasks_per_node:
            bad(f"--cpus-per-node {self.cpus_per_node} is below the {self.tasks_per_node} task(s) per node: give the "
                "CPUs of one node (e.g. 96)")
        if self.mem is not None and not _MEM_RE.match(self.mem):
            bad(f"--mem {self.mem!r} is not a Slurm memory size: use a number with an optional K, M, G or T (e.g. 400G)")
        if self.time is not None and not _TIME_RE.match(self.time):
            bad(f"--time {self.time!r} is not a Slurm time: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        if self.signal_grace < 1:
            bad(f"--signal-grace must be >= 1 second (the time the tasks get to save before the limit); "
                f"got {self.signal_grace}")
        if self.max_requeues < 0:
            bad(f"--max-requeues must be >= 0; got {self.max_requeues}")
        if self.job_name is not None and not _NAME_RE.match(self.job_name):
            bad(f"--job-name {self.job_name!r}: use letters, digits, '.', '_' and '-' (it names the script and logs)")
        if self.mail_type is not None:
            unknown = [t for t in self.mail_type.upper().split(",") if t not in _MAIL_TYPES]
            if unknown:
                bad(f"--mail-type: unknown {','.join(unknown)}; use a comma list of {', '.join(sorted(_MAIL_TYPES))}")
            if not self.mail_user:
                bad("--mail-type needs --mail-user (the address to mail)")
        if not os.path.isabs(self.output_dir) or not os.path.isabs(self.workdir):
            bad("internal: output_dir and workdir must be absolute paths")
        self._check_script_values()
        return self

    def _check_script_values(self) -> None:
        """Refuse every value that could not be written into the script as it is (see the module docstring)."""
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos),
                            ("--constraint", self.constraint), ("--exclude", self.exclude),
                            ("--mail-user", self.mail_user), ("--mail-type", self.mail_type)):
            if value is not None:
                check_sbatch_word(flag, value)
        sbatch_path("--output_dir", self.output_dir, filename_pattern=True)
        sbatch_path("the working directory (the job's --chdir; run the launcher from another directory)", self.workdir)
        check_text("the Python interpreter path", self.python)
        if not self.python:
            raise ValueError("no Python interpreter path (sys.executable is empty): run the launcher with a Python")
        if self.module is not None:
            check_text("--module", self.module)
            if not self.module.endswith(".py") and not _MODULE_RE.match(self.module):
                raise ValueError(f"--module {self.module!r} is neither a Python module name (a.b.c) nor a .py file")
        for i, a in enumerate(self.job_args):
            prev = self.job_args[i - 1] if i else ""
            of = f" (the value of {prev})" if prev.startswith("-") and not a.startswith("-") else ""
            check_text(f"job argument {i + 1} after --{of}", a)


# ----------------------------------------------------------------------------------------------------------------
# Job flags


def _find_flag(args: Sequence[str], flag: str) -> tuple[int, str] | None:
    """Index and value of ``flag V`` or ``flag=V`` in a job's flags (the last one wins, as in argparse)."""
    found = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            found = (i, args[i + 1])
        elif a.startswith(flag + "="):
            found = (i, a.split("=", 1)[1])
    return found


def resolve_job_args(job: str, job_args: Sequence[str], output_dir: str | None, gpus_per_node: int,
                     cwd: str) -> tuple[list[str], str]:
    """The job's flags as they go into the script, and the absolute output dir.

    The output dir is the job's own ``--output_dir`` if given (made absolute), else the launcher's ``--output_dir``
    (added to the job's flags), else ``<cwd>/output/<job>``. CPU mode adds the job's gloo backend flag unless a
    backend is already given.
    """
    args = list(job_args)
    hit = _find_flag(args, "--output_dir")
    if hit is not None:
        i, value = hit
        out = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
        if output_dir is not None and os.path.normpath(os.path.join(cwd, output_dir)) != out:
            raise ValueError(f"--output_dir is given twice with different values ({output_dir} for the launcher, "
                             f"{value} for the job); give it once")
        if args[i] == "--output_dir":
            args[i + 1] = out
        else:
            args[i] = f"--output_dir={out}"
    else:
        out = os.path.normpath(os.path.join(cwd, os.path.expanduser(output_dir or os.path.join("output", job))))
        args += ["--output_dir", out]
    if gpus_per_node == 0:
        backend_flag = JOBS[job][1]
        has_backend = _find_flag(args, backend_flag) is not None
        if job == "knn":  # eval.knn also accepts the process-group backend under --backend (SimPool compat)
            b = _find_flag(args, "--backend")
            has_backend = has_backend or (b is not None and b[1] in ("nccl", "gloo"))
        if not has_backend:
            args += [backend_flag, "gloo"]
    return args, out


# ----------------------------------------------------------------------------------------------------------------
# The script


def _sbatch_lines(spec: LaunchSpec) -> list[str]:
    """The ``#SBATCH`` lines. sbatch reads them itself (no shell): every value was checked by ``spec.validate()``
    and paths are escaped for sbatch's parser by :func:`sbatch_path`."""
    lines = [
        f"--job-name={spec.name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
    ]
    if spec.gpus_per_node > 0:
        lines.append(f"--gres=gpu:{spec.gpus_per_node}")
    lines.append(f"--cpus-per-task={spec.cpus}")
    if spec.mem is not None:
        lines.append(f"--mem={spec.mem}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account),
                        ("qos", spec.qos), ("constraint", spec.constraint), ("exclude", spec.exclude),
                        ("mail-user", spec.mail_user), ("mail-type", spec.mail_type)):
        if value is not None:
            lines.append(f"--{flag}={check_sbatch_word('--' + flag, value)}")
    if spec.handles_signal:
        lines.append(f"--signal=USR1@{spec.signal_grace}")
    lines += [
        "--requeue",
        "--open-mode=append",
        # the directory escaped (a % in it doubled), then the file name with Slurm's own %j (the job id)
        f"--output={sbatch_path('--output_dir', spec.slurm_dir, filename_pattern=True)}/{spec.name}-%j.log",
        f"--chdir={sbatch_path('--chdir', spec.workdir)}",
    ]
    return [f"#SBATCH {x}" for x in lines]


def _group_flags(args: Sequence[str]) -> list[list[str]]:
    """``--a 1 --b --c x y`` -> [[--a, 1], [--b], [--c, x, y]]: one flag and its values per line."""
    groups: list[list[str]] = []
    for a in args:
        if not groups or (a.startswith("-") and not re.match(r"^-\.?\d", a)):
            groups.append([a])
        else:
            groups[-1].append(a)
    return groups


def _srun_block(spec: LaunchSpec) -> str:
    # --cpus-per-task from the job's own variable (set when the job has one; see the template's comment)
    srun = ["srun", "--label", "--kill-on-bad-exit=0", f"--ntasks-per-node={spec.tasks_per_node}",
            "${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}"]
    module = spec.module or JOBS[spec.job][0]
    cmd = [spec.python, "-u"] + ([module] if module.endswith(".py") else ["-m", module])
    lines = [" ".join(srun) + " \\", "    " + " ".join(shlex.quote(c) for c in cmd)]
    for g in _group_flags(spec.job_args):
        lines[-1] += " \\"
        lines.append("        " + " ".join(shlex.quote(x) for x in g))
    return "\n".join(lines)


def render_script(spec: LaunchSpec) -> str:
    """The sbatch script for ``spec`` (a pure function of it: the golden-file tests call this)."""
    spec.validate()
    total = spec.nodes * spec.tasks_per_node
    module = spec.module or JOBS[spec.job][0]
    if spec.gpus_per_node > 0:
        what = (f"Job: {spec.job} ({module}) on {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s) = {total} tasks, "
                f"one per GPU (cuda:<local rank>).")
    else:
        what = (f"Job: {spec.job} ({module}) on {spec.nodes} node(s) x {spec.tasks_per_node} CPU task(s) = "
                f"{total} tasks, gloo.")
    if spec.handles_signal:
        note = (f"Slurm sends SIGUSR1 to the tasks {spec.signal_grace} s before the time limit\n"
                "# (--signal). `scancel --signal=USR1 --full <job id>` signals the tasks too, and `--batch` (this shell\n"
                "# only) is passed on to them through srun. The tasks save a checkpoint at the current iteration and exit\n"
                "# 75; this script then runs `scontrol requeue` (at most MAX_REQUEUES times, counted in REQUEUE_FILE) and\n"
                "# the next run resumes from the checkpoint.")
    else:
        again = {"linear": "it resumes from its last per-epoch checkpoint"}.get(spec.job, "it starts over")
        note = (f"{module} does not save on SIGUSR1/SIGTERM, so no --signal is asked\n"
                "# for and nothing is passed on to it: it runs until it ends or the time limit kills it (not requeued).\n"
                "# A Slurm preemption with PreemptMode=REQUEUE requeues it (--requeue) and it runs again:\n"
                f"# {again}. `scancel --signal=USR1 --full` kills it.")
    # Each value is substituted once, in one pass over the template: a value that happens to contain "{{SRUN}}"
    # stays text. In the shell part every value is one shlex-quoted word assigned to a variable.
    subs = {
        "SBATCH": "\n".join(_sbatch_lines(spec)),
        "SCRIPT": shlex.quote(spec.script_path),  # in a comment, ready to copy
        "DESCRIPTION": what,  # in comments (no newline can reach them: checked)
        "PREEMPTION_NOTE": note,
        "OUTPUT_DIR": shlex.quote(spec.output_dir),
        "MAX_REQUEUES": str(spec.max_requeues),
        "JOB_NAME": shlex.quote(spec.name),
        "JOB_MODULE": shlex.quote(module),
        "RESUME": shlex.quote(f"sbatch {shlex.quote(spec.script_path)}"),
        "SRUN": _srun_block(spec),
        "FORWARD_STOP": "1" if spec.handles_signal else "0",
    }
    template = TEMPLATE.read_text(encoding="utf-8")
    unknown = set(re.findall(r"\{\{(\w+)\}\}", template)) ^ set(subs)
    assert not unknown, f"sbatch template and render_script disagree on the placeholders {sorted(unknown)}"
    return re.sub(r"\{\{(\w+)\}\}", lambda m: subs[m.group(1)], template)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="dino-simpool-launch",
        description="Submit DINO-SimPool pretraining (or a k-NN / linear evaluation) to Slurm: one task per GPU, "
                    "USR1 before the time limit, save + requeue on preemption. Everything after `--` goes to the job.",
        epilog="example: dino-simpool-launch --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 "
               "-- --arch vit_small --data_path /data/imagenet --output_dir /ckpt/vits",
    )
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU; 0 = CPU tasks with gloo")
    r.add_argument("--ntasks-per-node", type=int, default=None, help="CPU mode (--gpus-per-node 0) only; default 1")
    r.add_argument("--cpus-per-task", type=int, default=None,
                   help=f"CPUs per task (the main process and its data-loading workers). Default: --cpus-per-node "
                        f"divided by the tasks per node when given, else {DEFAULT_CPUS_PER_GPU_TASK} per GPU task "
                        f"(DINO's choice: 80 CPUs for 8 GPUs) and {DEFAULT_CPUS_PER_CPU_TASK} per CPU task")
    r.add_argument("--cpus-per-node", type=int, default=None,
                   help="the CPUs of one node (e.g. 96, from `sinfo -o %%c`), to derive --cpus-per-task from")
    r.add_argument("--mem", default=None, help="memory per node, e.g. 400G (Slurm's --mem)")
    r.add_argument("--partition", default=None, help="default: the cluster's default partition")
    r.add_argument("--time", default=None, help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    r.add_argument("--account", default=None)
    r.add_argument("--qos", default=None)
    r.add_argument("--constraint", default=None,
                   help="node features (site names), e.g. a100 or h100. The shipped torch runs sm_75 (Turing) and "
                        "newer, so avoid V100 nodes (sm_70): the job would stop at start-up")
    r.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[03,07]")
    j = p.add_argument_group("job")
    j.add_argument("--job", default="train", choices=sorted(JOBS),
                   help="train (default), knn or linear. Only train saves on SIGUSR1/SIGTERM and is requeued by the "
                        "script; knn and linear are not: the time limit ends them, and a Slurm preemption that "
                        "requeues them reruns them (linear resumes from its last finished epoch, knn starts over)")
    j.add_argument("--module", default=None,
                   help="advanced: run this Python module (or .py file) instead of the --job's one; it must read "
                        "its rank from dino_simpool.distributed")
    j.add_argument("--job-name", default=None, help="default: dino-<job>")
    j.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                   help="the job's output dir when the job flags have no --output_dir (default ./output/<job>); "
                        "the script, logs and requeue count go to <output_dir>/slurm/")
    j.add_argument("--mail-user", default=None)
    j.add_argument("--mail-type", default=None, help="e.g. END,FAIL,REQUEUE")
    q = p.add_argument_group("preemption")
    q.add_argument("--signal-grace", type=int, default=120,
                   help="seconds before the time limit at which the tasks get SIGUSR1 to save (default 120)")
    q.add_argument("--max-requeues", type=int, default=20, help="requeues allowed per job (default 20)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    return p


def spec_from_args(argv: Sequence[str], cwd: str | None = None, python: str | None = None) -> LaunchSpec:
    """Parse ``[launcher options] -- [job flags]``. Raises ValueError for bad values (argparse exits 2 itself)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        own, job_args = argv[:i], argv[i + 1:]
    else:
        own, job_args = argv, []
    ns = build_parser().parse_args(own)
    cwd = os.path.abspath(cwd or os.getcwd())
    if ns.gpus_per_node is not None and ns.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0 (0 = CPU tasks with gloo); got {ns.gpus_per_node}")
    args, out = resolve_job_args(ns.job, job_args, ns.output_dir, ns.gpus_per_node, cwd)
    spec = LaunchSpec(
        job=ns.job, job_args=args, output_dir=out, workdir=cwd, python=python or sys.executable, module=ns.module,
        nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, ntasks_per_node=ns.ntasks_per_node,
        partition=ns.partition, time=ns.time, account=ns.account, qos=ns.qos, constraint=ns.constraint,
        exclude=ns.exclude, mem=ns.mem, cpus_per_task=ns.cpus_per_task, cpus_per_node=ns.cpus_per_node,
        job_name=ns.job_name,
        mail_user=ns.mail_user, mail_type=ns.mail_type, signal_grace=ns.signal_grace,
        max_requeues=ns.max_requeues, dry_run=ns.dry_run,
    )
    if spec.module and spec.module.endswith(".py"):
        spec.module = os.path.normpath(os.path.join(cwd, spec.module))
    return spec.validate()


def warnings_for(spec: LaunchSpec) -> list[str]:
    """What is allowed but likely a mistake: more data-loading workers than the task has CPUs."""
    out = []
    hit = _find_flag(spec.job_args, "--num_workers")
    if hit is not None and hit[1].isdigit() and int(hit[1]) > spec.cpus:
        out.append(f"--num_workers {hit[1]} is more than the {spec.cpus} CPU(s) per task (--cpus-per-task): the "
                   f"workers share {spec.cpus} CPU(s) with the main process; raise --cpus-per-task or lower "
                   "--num_workers")
    return out


def submit(spec: LaunchSpec, script: str) -> str:
    """Write the script, run ``sbatch --parsable`` and return the job id. Raises RuntimeError with sbatch's message."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run to see the script)")
    os.makedirs(spec.slurm_dir, exist_ok=True)
    with open(spec.script_path, "w", encoding="utf-8") as f:
        f.write(script)
    os.chmod(spec.script_path, 0o755)
    proc = subprocess.run([sbatch, "--parsable", spec.script_path], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip() or f"sbatch exited with status {proc.returncode}"
        raise RuntimeError(f"sbatch refused the job: {msg}")
    job_id = proc.stdout.strip().split(";")[0].strip()
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed no job id: {proc.stdout.strip()!r} {proc.stderr.strip()!r}")
    return job_id


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec = spec_from_args(argv)
        script = render_script(spec)
    except ValueError as e:
        print(f"dino-simpool-launch: error: {e}", file=sys.stderr)
        return 2
    for w in warnings_for(spec):
        print(f"dino-simpool-launch: warning: {w}", file=sys.stderr)
    if spec.dry_run:
        sys.stdout.write(script)
        return 0
    try:
        job_id = submit(spec, script)
    except (RuntimeError, OSError) as e:
        print(f"dino-simpool-launch: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}")
    print(f"  script:     {spec.script_path}")
    print(f"  slurm log:  {spec.log_path(job_id)}")
    print(f"  output dir: {spec.output_dir}")
    print(f"  requeues:   {os.path.join(spec.slurm_dir, f'{spec.name}-{job_id}.requeues')} (max {spec.max_requeues})")
    print(f"  watch with: squeue -j {job_id}; tail -f {shlex.quote(spec.log_path(job_id))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
