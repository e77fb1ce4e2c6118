"""What every command line shares: the one-line-error parser and error line, DINO's boolean flag, the CPUs this
task may use, and the ``--num_threads`` flag."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: <message naming the flag> (see --help)``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")

    def add_num_threads_flag(self) -> None:
        """:func:`add_num_threads_flag` on this parser (one line in a command's parser)."""
        add_num_threads_flag(self)


def print_error(prog: str, error: BaseException) -> None:
    """``prog: error: <message>`` on stderr, on one line: a multi-line message (a checkpoint's missing, unexpected and
    mis-shaped keys) keeps all its parts, joined by spaces."""
    msg = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)


def bool_flag(s: Any) -> bool:
    """DINO's boolean flag parser: on/true/1/yes and off/false/0/no (any case)."""
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in {"off", "false", "0", "no"}:
        return False
    if v in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (use True or False)")


def available_cpus() -> int:
    """CPUs this process may run on (Slurm's --cpus-per-task, taskset, cgroups), not the node's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


NUM_THREADS_HELP = ("CPU threads of this process for torch (intra-op) and faiss, set as soon as the flag is parsed, "
                    "before any work (default: torch's own, one per core of this task); on a shared machine fewer "
                    "threads than cores is often faster (see docs/training.md)")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {n}")
    return n


class _ApplyNumThreads(argparse.Action):
    """Stores the value and applies it at once, so that a command only has to add the flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        apply_num_threads(values)


def add_num_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--num_threads N`` (default: None = leave torch's own count); the count is applied when parsed
    (:func:`apply_num_threads`)."""
    parser.add_argument("--num_threads", type=positive_int, default=None, action=_ApplyNumThreads, metavar="N",
                        help=NUM_THREADS_HELP)


def apply_num_threads(n: int | None) -> None:
    """Use ``n`` CPU threads in this process: torch's intra-op pool, faiss's OpenMP pool when faiss is loaded (it has
    its own OpenMP runtime when it was imported before torch), and ``OMP_NUM_THREADS`` for OpenMP runtimes that start
    later (child processes included; loader workers set 1 thread themselves). ``None`` changes nothing."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--num_threads must be >= 1; got {n}")
    import torch  # here, not at the top: the training CLI installs its signal handlers before torch loads (train.py)

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")  # only if already imported: faiss is an optional, heavy dependency
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(n)
