"""The frame every training job runs in (DINO and supervised alike), so that each promise is kept in one place.

``run_job`` checks the output folder before any process group (a bad path stops every rank alike), installs the stop
handlers unless the command line already did, starts the process group with a collective timeout, starts the peer
watchdog, takes the output folder's lock on rank 0, runs the job, and on every way out stops the watchdog, destroys
the process group, drops the lock and restores the handlers. See docs/reliability.md.
"""
from __future__ import annotations

from typing import Callable

from dino_simpool import distributed as D
from dino_simpool.rundir import RunLock, lock_on_rank0, prepare_output_dir
from dino_simpool.signals import PreemptionFlag
from dino_simpool.watchdog import PeerWatchdog

# Each collective's timeout (torch's default is 30 min): bounds a rank that is alive but stuck; the longest
# legitimate wait is a barrier behind rank 0's checkpoint write.
DIST_TIMEOUT_S = 600.0
PEER_TIMEOUT_S = 60.0  # a peer silent this long (dead or frozen) ends the job


def run_job(output_dir: str, backend: str | None, dist_url: str,
            body: Callable[[D.DistEnv, PreemptionFlag], int], stop: PreemptionFlag | None = None) -> int:
    """Run ``body(env, stop)`` inside the job frame; returns its exit code.

    ``stop``: a stop-signal flag the caller installed earlier (the command lines do, before they import torch);
    else one is installed here, before any work, so a SIGUSR1/SIGTERM during start-up is honoured."""
    out = prepare_output_dir(output_dir)
    own_flag = stop is None
    stop = stop or PreemptionFlag().install()
    lock = RunLock(out)
    try:
        env = D.init_distributed(backend, dist_url, timeout_s=DIST_TIMEOUT_S)
        watchdog = PeerWatchdog.for_process_group(timeout=PEER_TIMEOUT_S)
        finished = False
        try:
            lock_on_rank0(lock, env.is_main, D.device_for(env))
            code = body(env, stop)
            finished = True
            return code
        finally:
            if watchdog is not None:
                watchdog.stop(finished)
            D.cleanup()
    finally:
        lock.release()
        if own_flag:
            stop.restore()
