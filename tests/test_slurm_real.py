"""dino-simpool-launch against a real one-node Slurm that this module starts (tests/slurm_cluster.py).

Skipped, with the reason, only where the machine cannot run Slurm (not root, or Slurm missing and no apt-get), and
never under CI (``CI=true``): there the same reason fails the tests. The CI machine is root with apt: there they run.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable, skip_allowed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STANDIN = "tests/slurm_jobs/standin.py"


@pytest.fixture(scope="session")
def slurm():
    t0 = time.time()
    try:
        cluster = SlurmCluster(cpus=2).start()
    except SlurmUnavailable as e:
        if not skip_allowed():
            pytest.fail(f"CI is set but no real Slurm could be started here: {e}. CI must run the Slurm tests "
                        f"(run as root with apt-get available)")
        pytest.skip(f"no real Slurm here: {e}")
    print(f"[slurm] one-node cluster up in {time.time() - t0:.1f} s ({cluster.dir})")
    yield cluster
    cluster.stop()


HOOKS = str(REPO / "tests" / "train_hooks.py")  # the trainer with the fault hooks (DINO_SIMPOOL_TEST_*)


def launcher() -> list[str]:
    exe = Path(sys.executable).parent / "dino-simpool-launch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "launch.slurm"]


def launch(slurm: SlurmCluster, args: list[str], env: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
    """Submit through the real command line; sbatch passes this environment on to the job (--export=ALL)."""
    proc = subprocess.run(launcher() + args, env={**slurm.env, **(env or {})}, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1), proc


def slurm_log(out: Path, name: str, job_id: str) -> str:
    f = out / "slurm" / f"{name}-{job_id}.log"
    return f.read_text(errors="replace") if f.exists() else ""


def wait_for_log(out: Path, name: str, job_id: str, pattern: str, slurm: SlurmCluster, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = slurm_log(out, name, job_id)
        if re.search(pattern, text, re.M):
            return text
        if slurm.job_info(job_id).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in the job log within {timeout} s:\n{slurm_log(out, name, job_id)}")


CPU2 = ["--gpus-per-node", "0", "--ntasks-per-node", "2", "--partition", "debug", "--time", "10"]
# The real training CLI, tiny: 20 embedded images, 2 ranks x batch 4 = 2 iterations/epoch, 8 epochs = 16 iterations
# (enough that a signal sent after the first epoch lands mid-run even on an idle machine).
EPOCHS = 8
TRAIN = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
         "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
         "--batch_size_per_gpu", "4", "--synthetic_size", "32", "--synthetic_per_class", "2", "--epochs", str(EPOCHS),
         "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0", "--num_workers", "0",
         "--precision", "fp32", "--log_every", "1"]
TOTAL_ITERS = 2 * EPOCHS


def final_state(out: Path) -> dict:
    from dino_simpool.checkpoint import load_checkpoint
    ck = load_checkpoint(out / "checkpoint.pth")
    return {"iteration": ck["iteration"], "epoch": ck["epoch"], "teacher": ck["teacher"],
            "world_size": ck["rng"].get("world_size")}


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """One uninterrupted 2-task pretraining run (test 1 checks it; test 2 compares against it)."""
    out = tmp_path_factory.mktemp("train") / "run"
    t0 = time.time()
    job, proc = launch(slurm, CPU2 + ["--module", HOOKS, "--", *TRAIN, "--output_dir", str(out)],
                       env={"DINO_SIMPOOL_TEST_DUMP_RANKS": "1"})
    info = slurm.wait_job(job, timeout=300)
    took = time.time() - t0
    print(f"[slurm] uninterrupted 2-task pretraining: {took:.1f} s, {info.get('JobState')} {info.get('ExitCode')}")
    return {"out": out, "job": job, "stdout": proc.stdout, "info": info, "log": slurm_log(out, "dino-train", job)}


def test_two_task_cpu_pretraining(uninterrupted):
    out, job, info, log = (uninterrupted[k] for k in ("out", "job", "info", "log"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert int(info["Restarts"]) == 0
    assert str(out / "slurm" / "dino-train.sbatch") in uninterrupted["stdout"]
    # both ranks took part: one line per rank from its own process group, the global batch is 4 x 2, and each rank
    # wrote its final teacher, identical on both
    for r in (0, 1):
        assert re.search(rf"^{r}: \[rank {r}/2\] process group up: gloo", log, re.M), log
    assert "batch 4x2" in log and f"2 it/epoch x {EPOCHS} epochs" in log, log
    import torch
    t0, t1 = (torch.load(out / f"teacher_rank{r}.pth", weights_only=True) for r in (0, 1))
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    # checkpoint and logs
    state = final_state(out)
    assert state["iteration"] == TOTAL_ITERS and state["epoch"] == EPOCHS and state["world_size"] == 2
    assert (out / "log.txt").stat().st_size > 0 and (out / "config.yaml").exists()
    assert "training done" in log and "finished (exit 0)" in log
    assert not (out / "slurm" / f"dino-train-{job}.requeues").exists()


def test_preemption_saves_requeues_and_resumes(slurm, tmp_path, uninterrupted):
    out = tmp_path / "run"
    t0 = time.time()
    job, _ = launch(slurm, CPU2 + ["--", *TRAIN, "--output_dir", str(out)])
    # mid-run: once the first epoch is logged (the loop and its signal handler are running; 7 epochs to go)
    wait_for_log(out, "dino-train", job, rf"^0: epoch 0/{EPOCHS} done", slurm, timeout=240)
    slurm.run(["scancel", "--signal=USR1", "--full", job])
    info = slurm.wait_job(job, timeout=300)
    log = slurm_log(out, "dino-train", job)
    print(f"[slurm] preempted + requeued 2-task pretraining: {time.time() - t0:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log, slurm.logs())
    assert int(info["Restarts"]) == 1, info
    # --full signals the tasks, srun and the batch shell (whose trap passes it on once more): still one save, exit 75
    assert "batch shell got SIGUSR1" in log
    assert "Exited with exit code 75" in log and "requeue 1/20" in log, log
    assert len(re.findall(r"stopped by (a )?signal", log)) == 1 and "Killed" not in log, log
    assert (out / "slurm" / f"dino-train-{job}.requeues").read_text().strip() == "1"
    events = [json.loads(x) for x in (out / "log.txt").read_text().splitlines() if '"event"' in x]
    saved = [e for e in events if e.get("event") == "preempted"]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert len(saved) == 1 and len(resumed) == 1, events
    assert resumed[0]["iteration"] == saved[0]["iteration"] and 0 < saved[0]["iteration"] < TOTAL_ITERS
    m = re.search(r"^0: resuming from .*checkpoint.pth at epoch (\d+) iteration (\d+)", log, re.M)
    assert m and int(m.group(2)) == saved[0]["iteration"], log
    # the second run started again, with both ranks
    assert len(re.findall(r"^1: \[rank 1/2\] process group up", log, re.M)) == 2
    state, ref = final_state(out), final_state(uninterrupted["out"])
    assert state["iteration"] == ref["iteration"] == TOTAL_ITERS and state["epoch"] == ref["epoch"]
    import torch
    same = all(torch.equal(state["teacher"][k], ref["teacher"][k]) for k in ref["teacher"])
    print(f"[slurm] resumed at iteration {saved[0]['iteration']}; final teacher identical to the uninterrupted "
          f"run's: {same}")


def _stop_save_requeue_resume(slurm, tmp_path, scancel: list[str], task_signal: str,
                              launch_flags: tuple[str, ...] = ()) -> str:
    """Run the stand-in job, send ``scancel <scancel> <job>`` mid-run, and check that the tasks saved once after
    ``task_signal``, exited 75, and that the job requeued, resumed from the saved iteration and finished. -> the log."""
    out, iters = tmp_path / "run", 40
    job, _ = launch(slurm, CPU2 + [*launch_flags, "--module", STANDIN, "--job-name", "standin", "--",
                                   "--output_dir", str(out), "--iters", str(iters), "--sleep", "0.1"])
    wait_for_log(out, "standin", job, r"^0: rank 0 iteration 2 ", slurm, timeout=180)
    slurm.run(["scancel", *scancel, job])
    info = slurm.wait_job(job, timeout=240)
    log = slurm_log(out, "standin", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log, slurm.logs())
    assert int(info["Restarts"]) == 1, (info, log)
    saved = re.findall(rf"^0: saved \S+ at iteration (\d+) after {task_signal}", log, re.M)
    assert len(saved) == 1 and 2 <= int(saved[0]) < iters, log
    assert "Exited with exit code 75" in log and "requeue 1/20" in log, log
    assert re.findall(r"^0: resuming from \S+ at iteration (\d+)", log, re.M) == saved, log
    assert json.loads((out / "done.json").read_text()) == {"iteration": iters, "world_size": 2}
    return log


def test_batch_only_signal_reaches_the_tasks(slurm, tmp_path):
    """`scancel --signal=USR1 --batch` signals the batch shell alone: its trap passes the signal on to srun, which
    relays it to the tasks. They save once, the job requeues and the rerun resumes from the saved iteration. The
    job also asks for --cpus-per-task 1, so the real srun gets --cpus-per-task from SLURM_CPUS_PER_TASK."""
    log = _stop_save_requeue_resume(slurm, tmp_path, ["--signal=USR1", "--batch"], "SIGUSR1",
                                    launch_flags=("--cpus-per-task", "1"))
    assert "batch shell got SIGUSR1: asking the tasks to save" in log, log


def test_sigterm_to_the_tasks_saves_and_requeues(slurm, tmp_path):
    """`scancel --signal=TERM <job>` signals the job's steps, i.e. the tasks (not srun, not the batch shell): SIGTERM
    is handled like SIGUSR1, the tasks save once and exit 75, and the job requeues and resumes. (A SIGTERM that also
    reaches srun, `--full`, makes srun kill its tasks at once: docs/slurm.md says to rely on --signal=USR1 there.)"""
    _stop_save_requeue_resume(slurm, tmp_path, ["--signal=TERM"], "SIGTERM")


def test_nan_stop_is_not_requeued(slurm, tmp_path):
    out = tmp_path / "run"
    job, _ = launch(slurm, CPU2 + ["--module", HOOKS, "--", *TRAIN, "--output_dir", str(out)],
                    env={"DINO_SIMPOOL_TEST_NAN_AT": "1"})
    info = slurm.wait_job(job, timeout=300)
    log = slurm_log(out, "dino-train", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", (info, log)
    assert int(info["Restarts"]) == 0
    assert "non-finite loss" in log and "failed with exit code 3" in log and "not requeued" in log, log
    assert not (out / "slurm" / f"dino-train-{job}.requeues").exists()


def test_traceback_is_not_requeued(slurm, tmp_path):
    out = tmp_path / "run"
    job, _ = launch(slurm, CPU2 + ["--module", STANDIN, "--job-name", "standin", "--",
                                   "--output_dir", str(out), "--iters", "10", "--sleep", "0.05", "--raise_at", "2"])
    info = slurm.wait_job(job, timeout=180)
    log = slurm_log(out, "standin", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, log)
    assert int(info["Restarts"]) == 0
    assert "Traceback" in log and "RuntimeError: stand-in job: deliberate failure" in log
    assert "failed with exit code 1" in log and "not requeued" in log
    assert not (out / "slurm" / f"standin-{job}.requeues").exists()


def test_requeue_limit_stops_the_job(slurm, tmp_path):
    out = tmp_path / "run"
    job, _ = launch(slurm, CPU2 + ["--module", STANDIN, "--job-name", "standin", "--max-requeues", "0", "--",
                                   "--output_dir", str(out), "--iters", "200", "--sleep", "0.1"])
    wait_for_log(out, "standin", job, r"^0: rank 0 iteration 2 ", slurm, timeout=180)
    slurm.run(["scancel", "--signal=USR1", "--full", job])
    info = slurm.wait_job(job, timeout=180)
    log = slurm_log(out, "standin", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log)
    assert int(info["Restarts"]) == 0
    assert "requeue limit is reached (0/0): stopping" in log, log
    assert (out / "state.json").exists()


def test_hostile_output_dir_works_and_runs_nothing(slurm, tmp_path):
    """An output dir with spaces, quotes, $(...), backticks, ';', '%', '#' and a placeholder, through the real sbatch
    (which parses the #SBATCH lines itself and expands % in --output) and the real batch shell, on the path whose
    message used to run it (requeue limit reached): the log lands at the literal path, the job writes there, the
    printed resume command is the script's, and nothing ran."""
    out = tmp_path / f"run dir; $(touch PWNED) `touch PWNED` 'sq' \"dq\" 100% #h {{{{SRUN}}}}"
    job, _ = launch(slurm, CPU2 + ["--module", STANDIN, "--job-name", "standin", "--max-requeues", "0", "--",
                                   "--output_dir", str(out), "--iters", "200", "--sleep", "0.1"])
    wait_for_log(out, "standin", job, r"^0: rank 0 iteration 2 ", slurm, timeout=180)
    slurm.run(["scancel", "--signal=USR1", "--full", job])
    info = slurm.wait_job(job, timeout=180)
    log = slurm_log(out, "standin", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log)
    assert (out / "state.json").exists()
    m = re.search(r"requeue limit is reached \(0/0\): stopping; resume with: (.*)$", log, re.M)
    assert m and shlex.split(m.group(1)) == ["sbatch", str(out / "slurm" / "standin.sbatch")], log
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists(), log


def test_sbatch_refusal_is_reported(slurm, tmp_path):
    proc = subprocess.run(launcher() + ["--gpus-per-node", "0", "--partition", "nosuchpartition", "--",
                                        "--output_dir", str(tmp_path / "x")],
                          env=slurm.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "sbatch refused the job" in proc.stderr and "nvalid partition" in proc.stderr, proc.stderr
