"""The training step's host-read budget: at most one read-back per iteration (the agreed stop/NaN flags); logging
reads only every --log_every steps; the NaN stop still exits 3 with the last checkpoint intact."""
from dino_simpool.checkpoint import load_checkpoint
from dino_simpool.dino.step import HostReadCounter
from dino_simpool.dino.trainer import Hooks
from dino_simpool.train import main

TINY = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
        "--synthetic_size", "32", "--synthetic_per_class", "4", "--batch_size_per_gpu", "4", "--num_workers", "1",
        "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
        "--epochs", "1", "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0",
        "--clip_grad", "3.0"]


def _count(tmp_path, extra):
    with HostReadCounter() as counter:
        rc = main(TINY + extra + ["--output_dir", str(tmp_path / "run")], hooks=Hooks(before_step=counter.mark))
    assert rc == 0
    return counter.per_iteration


def test_one_host_read_per_iteration(tmp_path):
    counts = _count(tmp_path, ["--log_every", "1000", "--precision", "bf16"])  # 10 iterations, clipping, bf16
    assert len(counts) == 10
    # the last iteration of the epoch also logs its progress line (1 more read) and ends the epoch
    assert max(counts[:-1]) <= 1, counts


def test_logging_reads_only_every_log_every_steps(tmp_path):
    counts = _count(tmp_path, ["--log_every", "3"])
    assert [c for i, c in enumerate(counts[:-1]) if (i + 1) % 3] == [1] * sum(1 for i in range(9) if (i + 1) % 3)
    assert all(c == 2 for i, c in enumerate(counts[:-1]) if (i + 1) % 3 == 0), counts


def test_nan_is_caught_at_its_iteration_and_nothing_is_saved(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output_dir", str(out), "--max_iters", "4", "--log_every", "1000"]) == 0
    before = (out / "checkpoint.pth").read_bytes()
    rc = main(TINY + ["--output_dir", str(out), "--log_every", "1000"], hooks=Hooks(poison_loss=lambda it: it == 6))
    assert rc == 3
    assert "global step 6" in capsys.readouterr().err
    assert (out / "checkpoint.pth").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 4
