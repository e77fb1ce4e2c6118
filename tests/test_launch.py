"""The Slurm launcher without a Slurm: script generation (golden files), the requeue bookkeeping of the script (with
fake srun/scontrol), the command line, and dino_simpool.distributed's environment detection.

Regenerate the golden files after an intended change with:  UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_launch.py
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_simpool.distributed import PORT_BASE, PORT_SPAN, detect_env, expand_hostlist, port_from_job_id
from launch import slurm as L

GOLDEN = Path(__file__).parent / "golden"
CWD = "/home/alice/dino-simpool"
PY = "/opt/venvs/dino/bin/python"

CASES = {
    # 2 nodes x 8 GPUs with every scheduling option
    "train_2x8_gpu": ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
                      "--account", "vision", "--qos", "high", "--constraint", "a100", "--exclude", "node[03,07]",
                      "--mem", "400G", "--cpus-per-task", "10", "--mail-user", "alice@example.org",
                      "--mail-type", "END,FAIL", "--",
                      "--arch", "vit_small", "--patch_size", "16", "--data_path", "/data/imagenet",
                      "--output_dir", "/checkpoints/vits16", "--global_crops_scale", "0.25", "1.0", "--lr", "0.0005"],
    # CPU mode: 2 gloo tasks, the output dir from the launcher, a relative path made absolute
    "train_cpu_2tasks": ["--gpus-per-node", "0", "--ntasks-per-node", "2", "--partition", "debug", "--time", "10",
                         "--signal-grace", "300", "--output_dir", "runs/cpu", "--", "--arch", "vit_tiny", "--depth", "1", "--epochs", "2"],
    # k-NN eval on 1 node x 4 GPUs, default partition and time
    "knn_1x4_gpu": ["--job", "knn", "--gpus-per-node", "4", "--", "--pretrained_weights",
                    "/checkpoints/vits16/checkpoint.pth", "--data_path", "/data/imagenet",
                    "--output_dir=/checkpoints/vits16/knn"],
    # linear eval with its own name, grace and requeue limit
    "linear_custom": ["--job", "linear", "--nodes", "1", "--gpus-per-node", "2", "--time", "12:00:00",
                      "--job-name", "vits-linear", "--max-requeues", "5", "--",
                      "--pretrained_weights", "/checkpoints/vits16/checkpoint.pth", "--epochs", "100",
                      "--output_dir", "/checkpoints/vits16/linear", "--lrs", "0.001", "0.01", "0.1"],
}


def render(argv) -> str:
    return L.render_script(L.spec_from_args(argv, cwd=CWD, python=PY))


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_matches_golden(name):
    text = render(CASES[name])
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: the script differs from {path} (UPDATE_GOLDEN=1 after an intended change)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_is_valid_bash(name, tmp_path):
    f = tmp_path / "job.sbatch"
    f.write_text(render(CASES[name]))
    proc = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_contents_gpu():
    text = render(CASES["train_2x8_gpu"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --exclude=node[03,07]", "#SBATCH --output=/checkpoints/vits16/slurm/dino-train-%j.log",
                 f"#SBATCH --chdir={CWD}", "MAX_REQUEUES=20", "trap "):
        assert line in text, line
    assert f"{PY} -u -m dino_simpool.train" in text
    assert "torchrun" not in text.replace("no torchrun", "").replace("torchrun variables", "")
    assert "--backend" not in text  # GPU jobs pick nccl themselves
    assert "scontrol requeue \"$SLURM_JOB_ID\"" in text


def test_script_contents_cpu():
    text = render(CASES["train_cpu_2tasks"])
    assert "#SBATCH --ntasks-per-node=2" in text and "--gres" not in text
    assert f"--output_dir {CWD}/runs/cpu" in text
    assert "--backend gloo" in text
    assert f"#SBATCH --output={CWD}/runs/cpu/slurm/dino-train-%j.log" in text


def test_signal_only_for_jobs_that_save_on_it():
    assert "#SBATCH --signal=USR1@300" in render(CASES["train_cpu_2tasks"])
    for case in ("knn_1x4_gpu", "linear_custom"):  # eval.knn / eval.linear do not handle SIGUSR1: it would kill them
        text = render(CASES[case])
        assert "#SBATCH --signal" not in text and "#SBATCH --requeue" in text
        assert "does not save on SIGUSR1/SIGTERM" in text and "FORWARD_STOP=0" in text
    assert "resumes from its last per-epoch checkpoint" in render(CASES["linear_custom"])
    assert "it starts over" in render(CASES["knn_1x4_gpu"])
    mod = render(["--module", "my_job.py", "--signal-grace", "60", "--", "--output_dir", "/o"])
    assert "#SBATCH --signal=USR1@60" in mod and "FORWARD_STOP=1" in mod


def test_eval_jobs_backend_flags():
    knn = render(["--job", "knn", "--gpus-per-node", "0", "--", "--output_dir", "/o"])
    assert "-m dino_simpool.eval.knn" in knn and "--dist_backend gloo" in knn
    knn2 = render(["--job", "knn", "--gpus-per-node", "0", "--", "--output_dir", "/o", "--backend", "gloo"])
    assert "--dist_backend" not in knn2  # SimPool's --backend gloo already names the process-group backend
    lin = render(["--job", "linear", "--gpus-per-node", "0", "--", "--output_dir", "/o"])
    assert "-m dino_simpool.eval.linear" in lin and "--backend gloo" in lin
    own = render(["--gpus-per-node", "0", "--", "--output_dir", "/o", "--backend", "gloo"])
    assert own.count("--backend") == 1


def test_module_override_py_file():
    text = render(["--gpus-per-node", "0", "--module", "tests/slurm_jobs/standin.py", "--", "--output_dir", "/o"])
    assert f"{PY} -u {CWD}/tests/slurm_jobs/standin.py" in text


@pytest.mark.parametrize("argv, msg", [
    (["--gpus-per-node", "8", "--ntasks-per-node", "2", "--"], "one task per GPU"),
    (["--time", "two days", "--"], "not a Slurm time"),
    (["--nodes", "0", "--"], "--nodes must be >= 1"),
    (["--gpus-per-node", "-1", "--"], "--gpus-per-node must be >= 0"),
    (["--signal-grace", "0", "--"], "--signal-grace"),
    (["--max-requeues", "-1", "--"], "--max-requeues"),
    (["--job-name", "my job", "--"], "--job-name"),
    (["--mail-type", "END", "--"], "--mail-user"),
    (["--mail-type", "SOMETIMES", "--mail-user", "a@b", "--"], "unknown SOMETIMES"),
    (["--output_dir", "/a", "--", "--output_dir", "/b"], "given twice"),
])
def test_bad_options_exit_2(argv, msg, capsys):
    assert L.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_launcher_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        L.main(["--partitoin", "gpu", "--", "--arch", "vit_small"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, cpus", [
    (["--gpus-per-node", "8"], 10),  # DINO's 10 CPUs per GPU task
    (["--gpus-per-node", "4", "--cpus-per-node", "96"], 24),  # the node's CPUs shared by its tasks
    (["--gpus-per-node", "8", "--cpus-per-node", "100"], 12),
    (["--gpus-per-node", "8", "--cpus-per-node", "96", "--cpus-per-task", "6"], 6),  # given: it wins
    (["--gpus-per-node", "0", "--ntasks-per-node", "2"], 1),
    (["--gpus-per-node", "0", "--ntasks-per-node", "2", "--cpus-per-node", "8"], 4),
])
def test_cpus_per_task_default(argv, cpus):
    text = render(argv + ["--", "--output_dir", "/o"])
    assert [line for line in text.splitlines() if "--cpus-per-task=" in line and line.startswith("#SBATCH")] == [
        f"#SBATCH --cpus-per-task={cpus}"]


def test_cpus_per_node_below_the_tasks_is_refused(capsys):
    assert L.main(["--gpus-per-node", "8", "--cpus-per-node", "4", "--", "--output_dir", "/o"]) == 2
    assert "--cpus-per-node 4 is below the 8 task(s) per node" in capsys.readouterr().err


@pytest.mark.parametrize("argv, warned", [
    (["--gpus-per-node", "8", "--", "--num_workers", "12"], True),  # 12 workers on the default 10 CPUs
    (["--gpus-per-node", "8", "--", "--num_workers", "10"], False),  # DINO's pairing: one worker per CPU
    (["--gpus-per-node", "8", "--cpus-per-task", "4", "--", "--num_workers=5"], True),
    (["--gpus-per-node", "0", "--", "--num_workers", "2"], True),  # CPU tasks get 1 CPU by default
    (["--gpus-per-node", "0", "--", "--num_workers", "0"], False),
    (["--gpus-per-node", "8", "--"], False),  # the job's own default follows its CPUs
])
def test_more_workers_than_cpus_is_warned(argv, warned, capsys):
    assert L.main(["--dry-run"] + argv + ["--output_dir", "/o"]) == 0
    err = capsys.readouterr().err
    assert ("warning: --num_workers" in err and "CPU(s) per task" in err) == warned, err


def test_help_names_gpus_the_shipped_torch_supports():
    text = L.build_parser().format_help()
    assert "volta32gb" not in text and "a100" in text and "h100" in text and "sm_70" in text


@pytest.mark.parametrize("t", ["30", "30:00", "12:00:00", "2-00", "2-12:00", "2-00:00:00", "UNLIMITED"])
def test_time_formats_accepted(t):
    assert f"--time={t}" in render(["--time", t, "--", "--output_dir", "/o"])


def test_dry_run_prints_script_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # no sbatch: a dry run must not need it
    assert L.main(["--dry-run"] + CASES["train_cpu_2tasks"]) == 0
    out = capsys.readouterr().out
    # normalise the machine-specific paths, then it is the golden file
    normalised = out.replace(sys.executable, PY).replace(str(tmp_path), CWD)
    assert normalised == (GOLDEN / "train_cpu_2tasks.sbatch").read_text()
    assert not (tmp_path / "runs").exists()


def _fake_bin(d: Path, name: str, body: str) -> None:
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text("#!/bin/bash\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_submit_with_fake_sbatch(tmp_path, capsys, monkeypatch):
    bin_ = tmp_path / "bin"
    _fake_bin(bin_, "sbatch", 'echo "$@" > "$(dirname "$0")/args"; echo "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert L.main(["--gpus-per-node", "0", "--ntasks-per-node", "2", "--", "--output_dir", "out"]) == 0
    out = capsys.readouterr().out
    script = tmp_path / "out" / "slurm" / "dino-train.sbatch"
    assert "submitted job 4242" in out and str(script) in out
    assert str(tmp_path / "out" / "slurm" / "dino-train-4242.log") in out
    assert script.exists() and os.access(script, os.X_OK)
    assert (bin_ / "args").read_text().split() == ["--parsable", str(script)]


def test_sbatch_refusal_is_reported_with_its_message(tmp_path, capsys, monkeypatch):
    bin_ = tmp_path / "bin"
    _fake_bin(bin_, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\n'
                              'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
                              "exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert L.main(["--partition", "nope", "--", "--output_dir", "out"]) == 2
    err = capsys.readouterr().err
    assert "Invalid partition name specified" in err and "invalid partition specified: nope" in err


def test_no_sbatch_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert L.main(["--", "--output_dir", "out"]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_python_m_launch_slurm_help():
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "--gpus-per-node" in proc.stdout and "--max-requeues" in proc.stdout


# ------------------------------------------------------------------------------------------------------------------
# The script's requeue bookkeeping, run by bash with fake srun / scontrol (the real thing: tests/test_slurm_real.py)


def _run_script(tmp_path: Path, srun_rc: int, state: str = "RUNNING", max_requeues: int = 2, prior: int | None = None):
    out = tmp_path / "out"
    spec = L.spec_from_args(["--gpus-per-node", "0", "--ntasks-per-node", "2", "--max-requeues", str(max_requeues),
                             "--", "--output_dir", str(out)], cwd=str(tmp_path), python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_ = tmp_path / "bin"
    calls = tmp_path / "calls"
    _fake_bin(bin_, "srun", f'echo "srun $*" >> {calls}; exit {srun_rc}\n')
    _fake_bin(bin_, "scontrol", f'echo "scontrol $*" >> {calls}\n'
                                f'case "$1 $2" in "show hostnames") echo node01; echo node02;;\n'
                                f'"show job") echo "JobId=77 JobName=x JobState={state} Reason=None";; esac\n')
    (out / "slurm").mkdir(parents=True)
    if prior is not None:
        (out / "slurm" / "dino-train-77.requeues").write_text(f"{prior}\n")
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-02]",
           "SLURM_NTASKS": "2", "RANK": "5", "MASTER_PORT": "1"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    count_file = out / "slurm" / "dino-train-77.requeues"
    count = int(count_file.read_text()) if count_file.exists() else None
    return proc, (calls.read_text() if calls.exists() else ""), count


def test_script_requeues_on_75(tmp_path):
    proc, calls, count = _run_script(tmp_path, 75)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scontrol requeue 77" in calls and count == 1
    assert "requeue 1/2" in proc.stdout
    assert "show hostnames node[01-02]" in calls


def test_script_stops_at_max_requeues(tmp_path):
    proc, calls, count = _run_script(tmp_path, 75, max_requeues=2, prior=2)
    assert proc.returncode == 75
    assert "scontrol requeue" not in calls and count == 2
    assert "requeue limit is reached (2/2)" in proc.stdout


@pytest.mark.parametrize("rc", [0, 1, 3, 137, 138, 143])
def test_script_passes_other_exit_codes_through(tmp_path, rc):
    # 143/138 without a stop that this shell passed on: a kill from elsewhere, not a preemption
    proc, calls, count = _run_script(tmp_path, rc)
    assert proc.returncode == rc
    assert "scontrol requeue" not in calls and count is None


def test_script_does_not_requeue_a_cancelled_job(tmp_path):
    proc, calls, count = _run_script(tmp_path, 75, state="COMPLETING")
    assert proc.returncode == 75 and "scontrol requeue" not in calls
    assert "job is COMPLETING (cancelled, timed out or preempted): not requeueing" in proc.stdout


def _run_cpu_script(tmp_path: Path, srun_body: str, scontrol_body: str, env: dict) -> int:
    """Render a 1-node CPU script and run it with fake srun/scontrol; -> its exit status."""
    spec = L.spec_from_args(["--gpus-per-node", "0", "--", "--output_dir", str(tmp_path / "o")], cwd=str(tmp_path),
                            python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_ = tmp_path / "bin"
    _fake_bin(bin_, "srun", srun_body)
    _fake_bin(bin_, "scontrol", scontrol_body)
    return subprocess.run(["bash", str(script)], env={"PATH": f"{bin_}:/usr/bin:/bin", **env},
                          capture_output=True).returncode


def test_script_clears_torchrun_vars_and_sets_master(tmp_path):
    out = tmp_path / "envdump"
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "4", "MASTER_PORT": "1234", "LOCAL_RANK": "1"}
    assert _run_cpu_script(tmp_path, f'env > {out}; exit 0\n', 'echo node07; echo node08\n', env) == 0
    dumped = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert dumped["MASTER_ADDR"] == "node07"
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"} & set(dumped)
    assert dumped["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("cpus", [None, "10"])
def test_script_passes_cpus_per_task_to_srun(tmp_path, cpus):
    # srun 22.05-23.08 does not read SLURM_CPUS_PER_TASK: the script must hand it over as --cpus-per-task
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "1"}
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    assert _run_cpu_script(tmp_path, f'printf "%s\\n" "$@" > {tmp_path / "args"}; exit 0\n', "echo node01\n",
                           env) == 0
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["--label", "--kill-on-bad-exit=0", "--ntasks-per-node=1"]
    assert args[3] == ("--cpus-per-task=10" if cpus else PY)  # one word when set, nothing (not "") when unset


# A fake srun that behaves like the real one for the script: it runs until its tasks end, relays SIGUSR1 to them
# (here: the "tasks" save after the first SIGUSR1 and exit 75) and answers SIGTERM by killing them (exit 143).
_SIGNAL_SRUN = """echo "srun $*" >> {calls}
saves=0
trap 'echo "srun got USR1" >> {calls}; saves=1' USR1
trap 'echo "srun got TERM" >> {calls}; exit 143' TERM
touch {started}
for i in $(seq {steps}); do
    sleep 0.05
    if [ "$saves" = 1 ]; then sleep {save_s}; echo "tasks saved" >> {calls}; exit 75; fi
done
exit 0
"""


def _signal_script(tmp_path: Path, signals: list[str], job: str = "train", save_s: float = 0.2, run_s: float = 10):
    """Run the script with the fake srun above and send ``signals`` to the batch shell only (like ``--batch``)."""
    out = tmp_path / "out"
    spec = L.spec_from_args(["--job", job, "--gpus-per-node", "0", "--", "--output_dir", str(out)],
                            cwd=str(tmp_path), python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_, calls, started = tmp_path / "bin", tmp_path / "calls", tmp_path / "started"
    _fake_bin(bin_, "srun", _SIGNAL_SRUN.format(calls=calls, started=started, save_s=save_s,
                                                steps=int(run_s / 0.05)))
    _fake_bin(bin_, "scontrol", f'echo "scontrol $*" >> {calls}\n'
                                'case "$1 $2" in "show hostnames") echo node01;;\n'
                                '"show job") echo "JobId=77 JobState=RUNNING";; esac\n')
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "2"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 10
    while not started.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert started.exists(), "the fake srun never started"
    time.sleep(0.1)  # the shell is in its `wait` now
    for s in signals:
        proc.send_signal(getattr(signal, f"SIG{s}"))
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=30)
    return proc.returncode, stdout, calls.read_text()


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_batch_shell_passes_stop_signal_to_srun_as_usr1(tmp_path, sig):
    # `scancel --signal=USR1 --batch` (or a TERM to the shell alone) must reach the tasks: they save, exit 75, requeue
    rc, out, calls = _signal_script(tmp_path, [sig])
    assert rc == 0, out
    assert calls.count("srun got USR1") == 1 and "srun got TERM" not in calls  # TERM would make srun SIGKILL them
    assert "tasks saved" in calls and "scontrol requeue 77" in calls
    assert f"batch shell got SIG{sig}: asking the tasks to save" in out and "requeue 1/20" in out


def test_batch_shell_passes_a_stop_on_once(tmp_path):
    # repeated signals (a --full scancel reaches the shell as well as the tasks; a second scancel) are passed on once;
    # the ones that arrive while the tasks save must not end the shell's wait early or change srun's exit code
    rc, out, calls = _signal_script(tmp_path, ["USR1", "USR1", "TERM"], save_s=0.5)
    assert rc == 0, out
    assert calls.count("srun got USR1") == 1 and calls.count("tasks saved") == 1
    assert out.count("the tasks were already asked to save") == 2
    assert "the tasks saved a checkpoint (exit 75): requeue 1/20" in out


# The tasks are still importing when the stop reaches them: no handler yet, so the signal's default action ends them
# (srun reports 128 + the signal). After a stop that the batch shell passed on, that is a preemption.
_STARTING_SRUN = """echo "srun $*" >> {calls}
trap 'echo "srun got USR1" >> {calls}; exit {rc}' USR1
touch {started}
for i in $(seq 200); do sleep 0.05; done
exit 0
"""


@pytest.mark.parametrize("sig, rc", [("TERM", 143), ("USR1", 138), ("TERM", 138)])
def test_stop_before_the_handler_is_up_is_requeued(tmp_path, sig, rc):
    out = tmp_path / "out"
    spec = L.spec_from_args(["--gpus-per-node", "0", "--", "--output_dir", str(out)], cwd=str(tmp_path), python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_, calls, started = tmp_path / "bin", tmp_path / "calls", tmp_path / "started"
    _fake_bin(bin_, "srun", _STARTING_SRUN.format(calls=calls, started=started, rc=rc))
    _fake_bin(bin_, "scontrol", f'echo "scontrol $*" >> {calls}\n'
                                'case "$1 $2" in "show hostnames") echo node01;;\n'
                                '"show job") echo "JobId=77 JobState=RUNNING";; esac\n')
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "1"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 10
    while not started.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert started.exists()
    time.sleep(0.1)
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    assert "srun got USR1" in calls.read_text() and "scontrol requeue 77" in calls.read_text()
    assert f"the tasks ended on the stop signal before they could save (exit {rc}, still starting up)" in stdout
    assert "requeue 1/20" in stdout
    assert (out / "slurm" / "dino-train-77.requeues").read_text().strip() == "1"


def test_stop_that_comes_before_srun_starts_is_passed_on(tmp_path):
    # the shell is still in `scontrol show hostnames` when the stop comes: it must reach srun once srun is started
    out = tmp_path / "out"
    spec = L.spec_from_args(["--gpus-per-node", "0", "--", "--output_dir", str(out)], cwd=str(tmp_path), python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_, calls, in_scontrol = tmp_path / "bin", tmp_path / "calls", tmp_path / "in_scontrol"
    _fake_bin(bin_, "srun", _SIGNAL_SRUN.format(calls=calls, started=tmp_path / "started", save_s=0.1, steps=100))
    _fake_bin(bin_, "scontrol", f'echo "scontrol $*" >> {calls}\n'
                                f'case "$1 $2" in "show hostnames") touch {in_scontrol}; sleep 1; echo node01;;\n'
                                '"show job") echo "JobId=77 JobState=RUNNING";; esac\n')
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "1"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 10
    while not in_scontrol.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert in_scontrol.exists()
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    assert "batch shell got SIGUSR1: srun is not started yet; the stop is passed on once it is" in stdout
    assert "batch shell got SIGUSR1: asking the tasks to save" in stdout and "requeue 1/20" in stdout
    # srun got the USR1 (and saved, exit 75) or died of it before its trap was up (138): requeued either way
    assert "scontrol requeue 77" in calls.read_text()


def test_a_stop_to_a_job_that_cannot_save_is_never_requeued(tmp_path):
    # eval.knn: nothing is passed on, so a 143 afterwards is not a preemption of ours
    out = tmp_path / "out"
    spec = L.spec_from_args(["--job", "knn", "--gpus-per-node", "0", "--", "--output_dir", str(out)],
                            cwd=str(tmp_path), python=PY)
    script = tmp_path / "job.sbatch"
    script.write_text(L.render_script(spec))
    bin_, calls, started = tmp_path / "bin", tmp_path / "calls", tmp_path / "started"
    _fake_bin(bin_, "srun", f"touch {started}; sleep 0.5; exit 143\n")
    _fake_bin(bin_, "scontrol", f'echo "scontrol $*" >> {calls}\ncase "$1 $2" in "show hostnames") echo node01;; esac\n')
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "1"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 10
    while not started.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "scontrol requeue" not in calls.read_text(), stdout
    assert "failed with exit code 143" in stdout


def test_batch_shell_does_not_signal_jobs_that_cannot_save(tmp_path):
    # eval.knn dies of SIGUSR1: the shell keeps waiting and passes nothing on
    rc, out, calls = _signal_script(tmp_path, ["USR1"], job="knn", run_s=1)
    assert rc == 0 and "srun got" not in calls and "tasks saved" not in calls
    assert "dino_simpool.eval.knn does not save on a signal, so it is not passed on" in out and "finished (exit 0)" in out


# ------------------------------------------------------------------------------------------------------------------
# dino_simpool.distributed: what every srun task reads

def _srun_task_env(**over):
    """What srun gives task 5 of a 2-node x 4-task step (measured on Slurm 22.05, trimmed)."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_NODELIST": "node[01-03,07]",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "node[01-03,07]",
           "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    env.update(over)
    return env


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("localhost", ["localhost"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("rack[1-2]-n[01,03]", ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]),
    ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
    ("node-[001-002].cluster", ["node-001.cluster", "node-002.cluster"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "n[5-2]"])
def test_expand_hostlist_rejects_bad(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_detect_slurm_task_multi_node():
    env = detect_env(_srun_task_env())
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 16, 1)
    assert env.master_addr == "node01"
    assert env.master_port == port_from_job_id(123456)


def test_detect_prefers_step_values():
    # srun -n 4 inside a 16-task allocation: the step's own count and first node win
    env = detect_env(_srun_task_env(SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NODELIST="node[02-03]", SLURM_PROCID="3"))
    assert (env.world_size, env.master_addr, env.rank) == (4, "node02", 3)


def test_detect_master_addr_from_env_wins():
    env = detect_env(_srun_task_env(MASTER_ADDR="10.0.0.5"))
    assert env.master_addr == "10.0.0.5" and env.source == "slurm"


def test_detect_batch_shell_is_single_process():
    # what the sbatch batch shell sees (measured): SLURM_PROCID=0 and SLURM_NTASKS, but no step variables
    env = detect_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                      "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost"})
    assert env.source == "single" and env.world_size == 1


def test_detect_torchrun_wins_inside_allocation():
    env = detect_env(_srun_task_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT="29400"))
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_port) == ("torchrun", 1, 2, 1, 29400)


def test_detect_partial_torchrun_is_an_error():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"})


def test_detect_nothing_is_single():
    assert detect_env({}).source == "single" and detect_env({}).world_size == 1


def test_detect_bad_integer_names_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect_env(_srun_task_env(SLURM_PROCID="x"))


def test_port_from_job_id():
    ports = [port_from_job_id(j) for j in range(100000, 100050)]
    assert len(set(ports)) == 50  # consecutive jobs on one node do not collide
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert port_from_job_id("123456") == port_from_job_id(123456) == PORT_BASE + 123456 % PORT_SPAN
    assert port_from_job_id(PORT_SPAN + 7) == port_from_job_id(7)  # wraps, stays in range
    assert port_from_job_id(0) == PORT_BASE
    assert PORT_BASE + PORT_SPAN <= 32768  # below Linux's default ephemeral port range


# ------------------------------------------------------------------------------------------------------------------
# The real-Slurm harness decides to skip only when it cannot run Slurm at all


def test_harness_skips_without_root(monkeypatch):
    import slurm_cluster as sc
    monkeypatch.setattr(sc.os, "geteuid", lambda: 1000)
    with pytest.raises(sc.SlurmUnavailable, match="root"):
        sc.SlurmCluster().start()


def test_harness_never_skips_under_ci():
    import slurm_cluster as sc
    assert not sc.skip_allowed({"CI": "true"}) and not sc.skip_allowed({"CI": "1"})
    assert sc.skip_allowed({}) and sc.skip_allowed({"CI": "false"})


def test_harness_skips_when_slurm_missing_and_no_apt(monkeypatch):
    import slurm_cluster as sc
    monkeypatch.setattr(sc, "_which", lambda name: None)
    monkeypatch.setattr(sc.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sc.shutil, "which", lambda name: None)
    with pytest.raises(sc.SlurmUnavailable, match="no apt-get"):
        sc.ensure_installed()
    monkeypatch.setattr(sc.os, "geteuid", lambda: 1000)
    with pytest.raises(sc.SlurmUnavailable, match="needs root"):
        sc.ensure_installed()


# ------------------------------------------------------------------------------------------------------------------
# Hostile values (issue 11 §2): refused with one line, or written so that nothing they hold runs as shell


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads from a script's #SBATCH lines, parsed as sbatch 22.05 does (src/sbatch/opt.c,
    _opt_batch_script and _get_argument): up to the first line that is not a comment, split at whitespace, ' and "
    group, \\ escapes the next character, an unquoted # ends the line."""
    args: list[str] = []
    for line in script.split("\n")[1:]:
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.strip().startswith("#"):
                break  # sbatch stops at the first command
            continue
        rest, i = line[len("#SBATCH"):], 0
        while i < len(rest):
            while i < len(rest) and rest[i].isspace():
                i += 1
            if i >= len(rest):
                break
            arg, quote, escape = [], None, False
            while i < len(rest) and (quote or not rest[i].isspace()):
                ch = rest[i]
                i += 1
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                    continue
                elif quote:
                    if ch == quote:
                        quote = None
                        continue
                elif ch in "'\"":
                    quote = ch
                    continue
                elif ch == "#":
                    i = len(rest)
                    break
                arg.append(ch)
            assert quote is None, f"sbatch: unmatched {quote} in {line!r}"
            if arg:
                args.append("".join(arg))
    return args


def slurm_filename(pattern: str, job_id: str) -> str:
    """Slurm's filename pattern, for the two symbols the launcher writes: %j (the job id) and %% (a %)."""
    return re.sub(r"%(.)", lambda m: {"j": job_id, "%": "%"}[m.group(1)], pattern)


PWN = "$(touch PWNED)"  # each hostile value also tries a backtick form and a ; form
HOSTILE_DIR = f"out dir; {PWN} `touch PWNED` 'sq' \"dq\" 100% #h {{{{SRUN}}}} -x"


def test_sbatch_directive_parser_matches_sbatch_rules():
    # the test's own parser, checked on the cases it has to get right
    # (sbatch tests for whitespace before it looks at a backslash: "\ " does not keep a space; quotes do)
    text = ("#!/bin/bash\n#SBATCH --a=1 --b='x y' \"--c=p q\" --d=e\\ f --e=\"x\\\"y #z\" --g=h#i\n# comment\n"
            "#SBATCH --j\necho\n#SBATCH --k\n")
    assert sbatch_directives(text) == ["--a=1", "--b=x y", "--c=p q", "--d=e", "f", '--e=x"y #z', "--g=h", "--j"]


def test_paths_are_escaped_for_sbatch():
    assert L.sbatch_path("--output_dir", "/plain/path%j", filename_pattern=True) == "/plain/path%%j"
    assert L.sbatch_path("--output_dir", "/a b/'c\"#d%e", filename_pattern=True) == '"/a b/\'c\\"#d%%e"'
    line = f"#SBATCH --output={L.sbatch_path('--output_dir', '/a b/' + chr(39) + 'c#%', filename_pattern=True)}"
    assert sbatch_directives("#!/bin/bash\n" + line + "\n") == ["--output=/a b/'c#%%"]


@pytest.mark.parametrize("argv, what", [
    # a newline in every option that reaches the script
    (["--output_dir", "/o\nrm -rf ~"], "--output_dir"),
    (["--", "--output_dir", "/o\n#SBATCH --x"], "--output_dir"),
    (["--partition", "gpu\ntouch PWNED"], "--partition"),
    (["--account", "acc\ntouch PWNED"], "--account"),
    (["--qos", "q\n"], "--qos"),
    (["--mem", "4G\ntouch PWNED"], "--mem"),
    (["--mail-user", "a@b.org\ntouch PWNED", "--mail-type", "END"], "--mail-user"),
    (["--constraint", "a100\ntouch PWNED"], "--constraint"),
    (["--exclude", "node1\ntouch PWNED"], "--exclude"),
    (["--time", "10\ntouch PWNED"], "--time"),
    (["--job-name", "x\ntouch PWNED"], "--job-name"),
    (["--module", "job\n.py"], "--module"),
    (["--", "--arch", "vit_small\ntouch PWNED"], "job argument 2 after -- (the value of --arch)"),
    (["--", "--output_dir", "/o", "--lr", "0.1\r"], "(the value of --lr)"),
    (["--", "--data_path", "/d\x00"], "(the value of --data_path)"),
    (["--", "--flag\nx"], "job argument 1 after --"),
    # what sbatch's own #SBATCH parser would read differently: spaces, quotes, backslash, '#'
    (["--partition", "gpu touch"], "--partition"),
    (["--account", "a'b"], "--account"),
    (["--qos", 'q"x'], "--qos"),
    (["--constraint", "a100#h100"], "--constraint"),
    (["--exclude", "node\\1"], "--exclude"),
    (["--mail-user", "a b@c.org"], "--mail-user"),
    (["--output_dir", "/data/a\\b"], "--output_dir"),
    (["--mem", "$(touch PWNED)"], "--mem"),
    (["--mem", "4 G"], "--mem"),
    (["--module", "$(touch PWNED)"], "--module"),
    (["--module=-c"], "--module"),
    (["--job-name", "$(touch PWNED)"], "--job-name"),
    (["--time", "`touch PWNED`"], "--time"),
    (["--partition", ""], "--partition is empty"),
])
def test_hostile_values_are_refused_with_one_line(argv, what, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    assert L.main(argv if "--" in argv else argv + ["--"]) == 2
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("*")), "a refused launch must write nothing"


def test_a_working_directory_with_a_percent_is_refused(tmp_path, capsys, monkeypatch):
    wd = tmp_path / "100%"
    wd.mkdir()
    monkeypatch.chdir(wd)
    assert L.main(["--", "--output_dir", str(tmp_path / "o")]) == 2
    assert "the working directory" in capsys.readouterr().err


# The job the fake srun starts: a real Python process. It records its argv and ends as JOB_ENDING says.
_JOB = """import json, os, sys, time
with open(os.environ["JOB_RECORD"], "w") as f:
    json.dump({"argv": sys.argv, "cwd": os.getcwd()}, f)
ending = os.environ["JOB_ENDING"]
if ending == "raise":
    raise RuntimeError("deliberate failure")
if ending == "starting":  # still importing when the stop comes: Python's default SIGTERM action ends it (143)
    open(os.environ["JOB_STARTED"], "w").close()
    time.sleep(30)
sys.exit({"ok": 0, "saved": 75}[ending])
"""
# srun: drop its own options, run the task in the background, relay a USR1 to it as SIGTERM (what reaches a task
# whose handler is not installed yet), and exit with the task's status.
_PASSTHROUGH_SRUN = """echo "srun started" >> {calls}
while [ $# -gt 0 ] && [ "${{1#-}}" != "$1" ]; do shift; done
"$@" &
child=$!
trap 'echo "srun got USR1" >> {calls}; trapped=1; kill -TERM "$child"' USR1
while :; do
    trapped=
    wait "$child"; rc=$?
    [ -n "$trapped" ] || exit "$rc"  # a trap ended the wait early: wait again for the task's own status
done
"""

# (job ending, scontrol's JobState, scontrol requeue's exit status, --max-requeues, stop signal to the batch shell)
ENDINGS = {
    "success": ("ok", "RUNNING", 0, 2, None),
    "preempted_requeued": ("saved", "RUNNING", 0, 2, None),
    "requeue_fails": ("saved", "RUNNING", 1, 2, None),
    "requeue_limit": ("saved", "RUNNING", 0, 0, None),
    "cancelled": ("saved", "COMPLETING", 0, 2, None),
    "traceback": ("raise", "RUNNING", 0, 2, None),
    "stopped_while_starting": ("starting", "RUNNING", 0, 2, "TERM"),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_hostile_values_run_nothing_through_every_ending(ending, tmp_path, capsys, monkeypatch):
    """Every option that reaches the script gets a hostile value that sbatch and bash must keep as text; the launcher
    submits (to a fake sbatch), the script runs with fake srun/scontrol as sbatch would start it, and the job is a
    real Python process. Nothing may run (no PWNED file), the #SBATCH options are exactly the given values, the job
    gets its flags unchanged, and every command the script prints for the user is one that works."""
    job_ending, state, requeue_rc, max_requeues, stop = ENDINGS[ending]
    workdir = tmp_path / f"work dir; {PWN} 'q' \"dq\" -x"
    workdir.mkdir()
    pydir = tmp_path / f"py {PWN} `touch PWNED` 'q'"
    pydir.mkdir()
    (pydir / "python").symlink_to(sys.executable)
    job_file = workdir / f"job {PWN} 'q' \"dq\".py"
    job_file.write_text(_JOB)
    out = workdir / HOSTILE_DIR
    bin_, calls = tmp_path / "bin", tmp_path / "calls"
    _fake_bin(bin_, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch_args; echo 4242\n')
    _fake_bin(bin_, "srun", _PASSTHROUGH_SRUN.format(calls=calls))
    _fake_bin(bin_, "scontrol", f'echo "scontrol $1 $2" >> {calls}\n'
                                'case "$1 $2" in "show hostnames") echo node01;;\n'
                                f'"show job") echo "JobId=4242 JobState={state}";;\n'
                                f'requeue*) exit {requeue_rc};; esac\n')
    hostile = {
        "--partition": f"gpu;{PWN.replace(' ', '${IFS}')}", "--account": "`touch${IFS}PWNED`", "--qos": "-high",
        "--constraint": "a100|h100&$(touch${IFS}PWNED)", "--exclude": "node[03,07]", "--mem": "4G",
        "--mail-user": "a;$(touch${IFS}PWNED)@x.org", "--time": "10",
    }
    job_args = ["--arch", f"x;{PWN}", "--note", "`touch PWNED` {{SRUN}} {{OUTPUT_DIR}}", "--lr", "-1",
                "--path", "a b", "--quote", "it's \"q\"", "--dash", "-x", "--empty", "", "--output_dir", HOSTILE_DIR]
    argv = ["--gpus-per-node", "0", "--ntasks-per-node", "2", "--module", job_file.name, "--job-name", "my-job.1",
            "--max-requeues", str(max_requeues), "--mail-type", "END"]
    argv += [f"{k}={v}" for k, v in hostile.items()] + ["--", *job_args]
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "executable", str(pydir / "python"))
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    assert L.main(argv) == 0, capsys.readouterr().err
    script = out / "slurm" / "my-job.1.sbatch"
    assert (tmp_path / "sbatch_args").read_text().splitlines() == ["--parsable", str(script)]
    text = script.read_text()

    # what sbatch reads: every option whole, none hidden behind a broken line
    directives = sbatch_directives(text)
    expected = ["--job-name=my-job.1", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G",
                f"--partition={hostile['--partition']}", "--time=10", f"--account={hostile['--account']}",
                "--qos=-high", f"--constraint={hostile['--constraint']}", "--exclude=node[03,07]",
                f"--mail-user={hostile['--mail-user']}", "--mail-type=END", "--signal=USR1@120", "--requeue",
                "--open-mode=append", f"--output={str(out).replace('%', '%%')}/slurm/my-job.1-%j.log",
                f"--chdir={workdir}"]
    assert directives == expected

    # run it as sbatch would: in --chdir, output to --output (%j = the job id)
    opts = dict(d[2:].split("=", 1) for d in directives if "=" in d)
    log_path = Path(slurm_filename(opts["output"], "4242"))
    assert log_path == out / "slurm" / "my-job.1-4242.log"
    record, started = tmp_path / "record.json", tmp_path / "started"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node01",
           "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1", "JOB_RECORD": str(record), "JOB_ENDING": job_ending,
           "JOB_STARTED": str(started)}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(["bash", str(script)], cwd=opts["chdir"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        if stop:
            deadline = time.time() + 20
            while not started.exists() and time.time() < deadline:
                time.sleep(0.02)
            assert started.exists(), "the job never started"
            proc.send_signal(getattr(signal, f"SIG{stop}"))
        rc = proc.wait(timeout=60)
    log_text = log_path.read_text()

    assert not list(tmp_path.rglob("PWNED")), f"a hostile value ran as shell code:\n{log_text}"
    # the job got its own flags back, unchanged, from the same interpreter path and directory
    rec = json.loads(record.read_text())
    assert rec["argv"] == [str(job_file), *job_args[:-1], str(out), "--backend", "gloo"]  # CPU tasks: gloo
    assert rec["cwd"] == str(workdir)
    assert "srun started" in calls.read_text()

    requeued = "scontrol requeue" in calls.read_text()
    count_file = out / "slurm" / "my-job.1-4242.requeues"
    if ending == "success":
        assert rc == 0 and "finished (exit 0)" in log_text and not requeued
    elif ending == "traceback":
        assert rc == 1 and "RuntimeError: deliberate failure" in log_text and not requeued
        assert "failed with exit code 1" in log_text
    elif ending in ("preempted_requeued", "stopped_while_starting"):
        assert rc == 0 and requeued and count_file.read_text().strip() == "1", log_text
        assert "requeue 1/2" in log_text
    else:
        assert rc == 75 and not (ending != "requeue_fails" and requeued), log_text
        # the command printed for the user submits exactly this script
        m = re.search(r"(?:resume with|to continue): (.*)$", log_text, re.M)
        assert m, log_text
        assert shlex.split(m.group(1)) == ["sbatch", str(script)]
