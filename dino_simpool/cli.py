"""What every command line shares: the one-line-error parser and error line, DINO's boolean flag, and the CPUs this
task may use."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: <message naming the flag> (see --help)``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")


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
