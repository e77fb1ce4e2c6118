"""A real one-node Slurm for the tests: install (apt) if missing, start munged + slurmctld + slurmd, stop by pid.

Everything lives in one temporary dir (config, state, spool, logs, munge socket and key) and uses free ports, so the
machine's /etc/slurm, /etc/munge and any other Slurm or munged on it are left alone. Used by tests/test_slurm_real.py.
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "munge")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(Exception):
    """This machine cannot run a Slurm for the tests (the reason is the message): skip."""


def skip_allowed(env: dict | None = None) -> bool:
    """Whether a machine that cannot run Slurm may skip the Slurm tests: not under CI (``CI`` set to true/1/yes),
    where a skip would hide that the tests never ran; there the failure says why."""
    ci = (os.environ if env is None else env).get("CI", "").strip().lower()
    return ci not in ("1", "true", "yes")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_installed(timeout: float = 600) -> None:
    """Install slurm-wlm and munge with apt when a binary is missing. Raises SlurmUnavailable when it cannot try."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and installing them needs root "
                               "(apt-get install slurm-wlm munge)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:  # root and apt are here: a failure is a failure, not a skip
            raise RuntimeError(f"apt-get install slurm-wlm munge failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    still = [b for b in BINARIES if _which(b) is None]
    if still:
        raise RuntimeError(f"installed slurm-wlm and munge but {still} are still missing")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int | None, timeout: float = 10.0) -> None:
    if pid is None or not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SlurmCluster:
    """``with SlurmCluster() as c: c.run(["sinfo"])`` — a private one-node cluster with ``cpus`` CPUs."""

    def __init__(self, cpus: int = 2):
        self.cpus = cpus
        self.dir: Path | None = None
        self.env: dict[str, str] = {}
        self._pids: dict[str, int] = {}

    # ------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd as this test does needs root (SlurmUser=root)")
        ensure_installed()
        try:
            pwd.getpwnam("munge")
        except KeyError:
            raise RuntimeError("the munge package is installed but there is no 'munge' user") from None
        # munged insists that every dir on its socket path is executable by all: /tmp/pytest-of-root is 0700.
        d = Path(tempfile.mkdtemp(prefix="dino-simpool-slurm-", dir="/tmp"))
        self.dir = d
        os.chmod(d, 0o755)
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        mdir = d / "munge"
        mdir.mkdir()
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        uid, gid = pwd.getpwnam("munge").pw_uid, pwd.getpwnam("munge").pw_gid
        os.chown(mdir, uid, gid)
        os.chmod(mdir, 0o755)
        os.chown(key, uid, gid)
        os.chmod(key, 0o400)
        sock = mdir / "munge.sock"
        ctld_port, d_port = _free_port(), _free_port()
        while d_port == ctld_port:
            d_port = _free_port()
        # Job ids decide the rendezvous port (dino_simpool.distributed.port_from_job_id): a random first id keeps two
        # test clusters on one machine (several developers, or CI beside a developer) off each other's ports.
        first_job_id = random.randint(1000, 2_000_000)
        conf = d / "slurm.conf"
        conf.write_text(f"""\
ClusterName=dinotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id}
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
            self.env.pop(k, None)  # a test run inside a real allocation must not talk to that one
        try:
            self._start_daemons(conf, sock, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self, conf: Path, sock: Path, timeout: float) -> None:
        d = self.dir
        assert d is not None
        munged = _which("munged")
        subprocess.run(["runuser", "-u", "munge", "--", munged, f"--socket={sock}", f"--key-file={d}/munge/munge.key",
                        f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                        f"--seed-file={d}/munge/munged.seed"], check=True, capture_output=True, text=True)
        self._wait(lambda: _read_pid(d / "munge" / "munged.pid") is not None and sock.exists(), 10, "munged socket")
        self._pids["munged"] = _read_pid(d / "munge" / "munged.pid")  # type: ignore[assignment]
        probe = subprocess.run(f"{_which('munge')} -S {sock} -n | {_which('unmunge')} -S {sock}", shell=True,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(f"munge does not work: {probe.stderr}")
        subprocess.run([_which("slurmctld"), "-f", str(conf)], env=self.env, check=True, capture_output=True, text=True)
        self._wait(lambda: _read_pid(d / "slurmctld.pid") is not None, 10, "slurmctld pid file")
        self._pids["slurmctld"] = _read_pid(d / "slurmctld.pid")  # type: ignore[assignment]
        subprocess.run([_which("slurmd"), "-f", str(conf), "-N", "localhost"], env=self.env, check=True,
                       capture_output=True, text=True)
        self._wait(lambda: _read_pid(d / "slurmd.pid") is not None, 10, "slurmd pid file")
        self._pids["slurmd"] = _read_pid(d / "slurmd.pid")  # type: ignore[assignment]

        def idle() -> bool:
            p = self.run(["sinfo", "-h", "-o", "%t"], check=False)
            return p.returncode == 0 and p.stdout.strip() == "idle"
        self._wait(idle, timeout, "sinfo to show the node idle")

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        if self.dir is not None:
            for f in sorted((self.dir / "log").glob("*.log")) + [self.dir / "munge" / "munged.log"]:
                if f.exists():
                    out.append(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons by pid, remove the temporary dir."""
        if self.dir is None:
            return
        if self._pids.get("slurmctld"):
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.time() + 20
            while time.time() < deadline:
                p = self.run(["squeue", "-h"], check=False)
                if p.returncode != 0 or not p.stdout.strip():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld"):
            _stop_pid(self._pids.get(name) or _read_pid(self.dir / f"{name}.pid"))
        _stop_pid(self._pids.get("munged") or _read_pid(self.dir / "munge" / "munged.pid"))
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self._pids.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """Poll until the job ends (no sacct here). A requeued job waits ``cred_expire`` (10 s in this test cluster's
        slurm.conf, Slurm's default 120 s) before it may start again: until then slurmd still holds the revoked
        credential of the previous run and would refuse the launch (forcing ``StartTime=now`` made it fail)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState", "") in TERMINAL_STATES:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not end within {timeout:.0f} s; last state {info}")
