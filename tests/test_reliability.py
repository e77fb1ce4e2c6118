"""Failure paths on real processes, files and signals: a crash, a full disk, a dead peer, a killed worker, a second
run in the same folder, saves cut short by a kill. Every process of the job must be gone within a bound."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_simpool.checkpoint import (CheckpointError, CheckpointWriteError, load_checkpoint,
                                     remove_stale_temporaries, save_atomic)
from dino_simpool.rundir import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
HOOKS = str(ROOT / "tests" / "train_hooks.py")
# 20 images, batch 4 -> 5 iterations per epoch; 2 loader workers (persistent), as on a real run
TINY = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
        "--synthetic_size", "32", "--synthetic_per_class", "2", "--batch_size_per_gpu", "4", "--num_workers", "2",
        "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
        "--epochs", "3", "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0",
        "--log_every", "1"]
ENV = {**os.environ, "TQDM_DISABLE": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _procs_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (a unique path of this test): the trainer and its workers."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


def _wait_gone(marker: str, timeout: float) -> float:
    t0 = time.monotonic()
    while _procs_with(marker):
        if time.monotonic() - t0 > timeout:
            left = _procs_with(marker)
            for p in left:
                os.kill(p, signal.SIGKILL)
            pytest.fail(f"processes still alive after {timeout} s: {left}")
        time.sleep(0.2)
    return time.monotonic() - t0


def _wait_for_line(p: subprocess.Popen, prefix: str, timeout: float = 180) -> list[str]:
    lines, t0 = [], time.monotonic()
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        if time.monotonic() - t0 > timeout:
            break
    p.kill()
    pytest.fail(f"never saw {prefix!r}:\n" + "".join(lines[-30:]))


# ------------------------------------------------------------------------------------------------ a full disk
def _tmpfs_command(mount_point: Path, size: str, cmd: list[str]) -> list[str]:
    """``cmd`` inside a private mount namespace where ``mount_point`` is a ``size`` tmpfs (unprivileged: a user
    namespace maps us to root there; nothing outside the test sees the mount)."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mount_point), *cmd]


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_full_disk_save_exits_74_with_one_line_and_no_process_left(tmp_path):
    if not _unshare_works():
        if os.environ.get("CI"):
            pytest.fail("unshare --user --mount is needed for the full-disk test and does not work on this machine")
        pytest.skip("unshare --user --mount does not work here (no user namespaces)")
    out = tmp_path / "full_disk_run"
    out.mkdir()
    cmd = _tmpfs_command(out, "3m", [sys.executable, "-m", "dino_simpool.train", *TINY, "--output_dir", str(out)])
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "TQDM_DISABLE": "1"}, timeout=300)
    took = time.monotonic() - t0
    gone = _wait_gone(str(out), 10)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "No space left on device (ENOSPC)" in err[0] and "checkpoint.pth" in err[0], err[0]
    assert "no earlier checkpoint.pth existed" in err[0], err[0]
    print(f"[reliability] full disk: exit {r.returncode} after {took:.1f} s, every process gone {gone:.1f} s later")


def test_save_atomic_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    """The unit view of the same promise: a write that fails half-way leaves the old file and no temporary."""
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f, *a, **k):
        f.write(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(ENOSPC\).*previous checkpoint.pth is "
                                                   r"intact") as e:
        save_atomic({"w": torch.zeros(3)}, path)
    assert e.value.errno == 28
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


# ------------------------------------------------------------------------------------------------ crashes
@pytest.mark.slow
def test_crash_mid_epoch_with_workers_exits_1_and_leaves_nothing(tmp_path):
    """An exception in the step while 2 persistent workers (which ignore SIGTERM) are alive: Python's exit path used
    to wait for them forever."""
    out = tmp_path / "crash_run"
    p = subprocess.Popen([sys.executable, HOOKS, *TINY, "--output_dir", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**ENV, "DINO_SIMPOOL_TEST_CRASH_AT": "7"})
    t0 = time.monotonic()
    try:
        text, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the crashed trainer did not exit (hung on its loader workers)")
    gone = _wait_gone(str(out), 10)
    assert p.returncode == 1, text[-3000:]
    assert "test crash at iteration 7" in text
    print(f"[reliability] crash with workers: exit 1 after {time.monotonic() - t0:.1f} s, workers gone +{gone:.1f} s")


@pytest.mark.slow
def test_killed_loader_worker_ends_the_trainer(tmp_path):
    out = tmp_path / "worker_kill_run"
    p = subprocess.Popen([sys.executable, "-m", "dino_simpool.train", *TINY, "--epochs", "50", "--output_dir",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    _wait_for_line(p, "epoch 0/50 [2/5]")
    workers = [pid for pid in _procs_with(str(out)) if pid != p.pid]
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the trainer did not exit after one of its loader workers was killed")
    gone = _wait_gone(str(out), 10)
    assert p.returncode == 1
    print(f"[reliability] killed worker: trainer exit 1 after {time.monotonic() - t0:.1f} s, all gone +{gone:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_ends_its_peer_within_seconds(tmp_path):
    """Two ranks started as plain processes (as srun --kill-on-bad-exit=0 starts them), 2 workers each: SIGKILL
    rank 1 mid-epoch; rank 0 and every worker must be gone soon after, with exit 1."""
    out = tmp_path / "two_rank_run"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "dino_simpool.train", *TINY, "--epochs", "50",
                                       "--batch_size_per_gpu", "2", "--output_dir", str(out)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    _wait_for_line(procs[0], "epoch 0/50 [2/5]")
    procs[1].kill()
    t0 = time.monotonic()
    try:
        text, _ = procs[0].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 still alive 90 s after rank 1 was killed")
    took = time.monotonic() - t0
    gone = _wait_gone(str(out), 10)
    procs[1].wait()
    assert procs[0].returncode == 1, text[-3000:]
    assert took < 60, f"rank 0 took {took:.1f} s to exit"
    print(f"[reliability] killed rank 1: rank 0 exit {procs[0].returncode} after {took:.1f} s, all gone +{gone:.1f} s")


# ------------------------------------------------------------------------------------------------ stop signals
@pytest.mark.slow
def test_stop_signal_while_importing_is_honoured(tmp_path):
    """SIGTERM 0.3 s after start (Python still importing torch) used to give exit 143 and no requeue: the handler
    is now installed before the imports, so the run saves at its first iteration and exits 75."""
    out = tmp_path / "early_signal_run"
    p = subprocess.Popen([sys.executable, "-m", "dino_simpool.train", *TINY, "--num_workers", "0", "--output_dir",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**ENV, "TQDM_DISABLE": "1"})
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=240)
    assert p.returncode == 75, text[-3000:]
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 1


# ------------------------------------------------------------------------------------------------ two runs, one folder
def test_second_run_in_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from dino_simpool.rundir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    try:
        r = subprocess.run([sys.executable, "-m", "dino_simpool.train", *TINY, "--num_workers", "0", "--output_dir",
                            str(out)], capture_output=True, text=True, env={**ENV, "TQDM_DISABLE": "1"}, timeout=240)
        assert r.returncode == 2, r.stderr
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in err[0], r.stderr
        assert not (out / "checkpoint.pth").exists() and not (out / "config.yaml").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # the kernel dropped the lock with the holder: no stale lock to clean up
    with RunLock(out):
        pass


def test_lock_is_exclusive_and_released_on_close(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    a.release()
    RunLock(tmp_path).acquire().release()


# ------------------------------------------------------------------------------------------------ cut-short saves
def test_stale_temporaries_of_ours_are_removed_others_kept(tmp_path):
    ours = [".checkpoint.pth.ab12CD_9.tmp", ".checkpoint0003.pth.zzzzzzzz.tmp"]
    theirs = [".checkpoint.pth.tmp", "checkpoint.pth.ab12CD_9.tmp", ".other.pth.ab12CD_9.tmp", "notes.tmp",
              ".checkpoint.pth.ab12CD_9.tmp.keep"]
    for n in ours + theirs:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)


@pytest.mark.slow
def test_kill_during_snapshot_write_loses_no_snapshot(tmp_path):
    """SIGKILL while checkpoint0001.pth is being written (after epoch 1): the resumed run still writes it, and the
    temporary file the kill left is cleaned up at start-up."""
    out = tmp_path / "snap_run"
    args = [*TINY, "--num_workers", "0", "--saveckp_freq", "1", "--output_dir", str(out)]
    code = (
        "import os, signal, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import dino_simpool.checkpoint as C\n"
        "orig = C.save_atomic\n"
        "def save(obj, path, **kw):\n"
        "    if os.path.basename(str(path)) == 'checkpoint0001.pth':\n"
        "        with open(os.path.join(os.path.dirname(str(path)), '.checkpoint0001.pth.killed__.tmp'), 'wb') as f:\n"
        "            f.write(b'half a checkpoint')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(obj, path, **kw)\n"
        "C.save_atomic = save\n"
        "from dino_simpool.train import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True,
                       env={**ENV, "TQDM_DISABLE": "1"}, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "checkpoint0000.pth").is_file() and not (out / "checkpoint0001.pth").exists()
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # the resume point is still before epoch 1's end
    r = subprocess.run([sys.executable, "-m", "dino_simpool.train", *args], capture_output=True, text=True,
                       env={**ENV, "TQDM_DISABLE": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert {"checkpoint0000.pth", "checkpoint0001.pth", "checkpoint0002.pth"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")], names


# ------------------------------------------------------------------------------------------------ messages
def test_code_running_pickle_is_reported_as_unsafe(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": Evil()}, path)
    with pytest.raises(CheckpointError, match="unsafe checkpoint") as e:
        load_checkpoint(path)
    assert "not a PyTorch checkpoint" not in str(e.value) and "posix.system" in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_resume_with_another_model_lists_the_keys(tmp_path, capsys):
    from dino_simpool.train import main

    out = tmp_path / "run"
    base = list(TINY)
    base[base.index("--num_workers") + 1] = "0"
    assert main(base + ["--max_iters", "1", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    other = list(base)
    other[other.index("--depth") + 1] = "2"
    assert main(other + ["--output_dir", str(out), "--resume_force", "True"]) == 2
    err = capsys.readouterr().err
    assert "missing keys (" in err and "backbone.encoder.blocks.1." in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ a frozen peer
_FROZEN_PEER = r'''
import os, signal, sys, time, datetime
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from dino_simpool.watchdog import PeerWatchdog
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
wd = PeerWatchdog.for_process_group(timeout=float(sys.argv[3]), interval=0.5)
dist.all_reduce(torch.ones(1))
print("ready", flush=True)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # a frozen node: alive, sockets open, never answers again
dist.all_reduce(torch.ones(1))  # rank 0 waits here: 600 s of gloo timeout without the watchdog
print("all_reduce returned", flush=True)
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_frozen_peer_ends_the_job_within_the_watchdog_timeout(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _FROZEN_PEER, str(ROOT), port, "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**ENV, "RANK": str(r)}) for r in (0, 1)]
    try:
        assert procs[0].stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - t0
        assert procs[0].returncode == 1, out + err
        assert "rank 1 has not answered for" in err and "all_reduce returned" not in out
        assert took < 20, took
        print(f"[reliability] frozen peer: rank 0 exit 1 after {took:.1f} s (watchdog timeout 4 s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_watchdog_tells_a_finished_peer_from_a_failed_one():
    """A peer that stopped as finished is never reported, however long it stays silent; one that stopped without
    finishing (a failing rank) is reported once its heartbeat has stood still for the timeout."""
    from dino_simpool.watchdog import PeerWatchdog

    for finished, expect_lost in ((True, False), (False, True)):
        store, lost = torch.distributed.HashStore(), []
        a = PeerWatchdog(0, 2, interval=0.05, timeout=0.4, store=store, on_lost=lost.append).start()
        b = PeerWatchdog(1, 2, interval=0.05, timeout=0.4, store=store, on_lost=lost.append).start()
        time.sleep(0.3)
        b.stop(finished=finished)
        time.sleep(1.2)
        a.stop(finished=True)
        assert bool(lost) == expect_lost, (finished, lost)
        if expect_lost:
            assert len(lost) == 1 and "rank 0: rank 1 has not answered" in lost[0]


def test_resume_with_result_changing_flags_is_refused_unless_forced(tmp_path, capsys):
    from dino_simpool.logs import read_json_log
    from dino_simpool.train import main

    out = tmp_path / "run"
    base = list(TINY)
    base[base.index("--num_workers") + 1] = "0"
    assert main(base + ["--max_iters", "1", "--output_dir", str(out)]) == 0
    before = (out / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    # flags that do not change the result may differ
    assert main(base + ["--max_iters", "2", "--log_every", "5", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(base + ["--seed", "1", "--lr", "0.001", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--seed: 0 in the stored run, 1 now" in err and "--lr:" in err and "--resume_force" in err
    assert "--log_every" not in err and "--max_iters" not in err
    assert (out / "checkpoint.pth").read_bytes() != before  # the second (compatible) resume did advance it
    resumed = load_checkpoint(out / "checkpoint.pth")["iteration"]
    assert main(base + ["--seed", "1", "--max_iters", "3", "--resume_force", "True", "--output_dir", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 3 and resumed == 2
    assert [e["changed"] for e in read_json_log(out / "log.txt") if e.get("event") == "resume_force"] == \
        [["--seed: 0 in the stored run, 1 now"]]
