"""``--compile``: the compiled step gives the eager step's losses, and its checkpoints keep the eager key names.
Also the CUDA-only speed options' code paths (fused AdamW, channels_last), run on CPU where torch allows."""
import pytest
import torch

from dino_simpool.checkpoint import load_checkpoint
from dino_simpool.config import parse_config
from dino_simpool.dino.build import build_student_teacher, optimizer_options, place
from dino_simpool.dino.loss import DINOLoss
from dino_simpool.dino.optim import apply_schedules, build_optimizer, param_groups
from dino_simpool.dino.step import DINOStep, StepSettings
from dino_simpool.train import main

TINY = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8",
        "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
        "--synthetic_size", "32", "--synthetic_per_class", "2", "--batch_size_per_gpu", "4", "--num_workers", "0",
        "--epochs", "1", "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0"]


def _losses(compiled: bool, steps: int = 3) -> list[float]:
    cfg = parse_config(TINY)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    student, teacher, fwd, _ = place(student, teacher, torch.device("cpu"), compile=compiled)
    opt = build_optimizer("adamw", param_groups(student))
    step = DINOStep(student, fwd, teacher, DINOLoss(cfg.out_dim, cfg.ncrops, 0.04, 0.04, 0, 1), opt,
                    StepSettings("fp32", 3.0), torch.device("cpu"))
    step.train_mode()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + \
            [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    out = []
    for _ in range(steps):
        apply_schedules(opt, 1e-3, 0.04)
        out.append(float(step(crops, 1, 0.99)[0]))
    return out


@pytest.mark.slow
def test_compiled_step_matches_eager():
    eager, compiled = _losses(False), _losses(True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5), (eager, compiled)


@pytest.mark.slow
def test_compiled_run_resumes_with_eager_key_names(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--compile", "True", "--max_iters", "2", "--output_dir", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoint.pth")
    assert not [k for k in ck["student"] if "_orig_mod" in k]
    assert main(TINY + ["--output_dir", str(out)]) == 0  # an eager resume of the compiled run
    assert "resuming from" in capsys.readouterr().out


def test_fused_adamw_on_cuda_only_and_it_runs():
    assert optimizer_options("adamw", torch.device("cuda", 0)) == {"fused": True}
    assert optimizer_options("adamw", torch.device("cpu")) == {} and optimizer_options("lars", torch.device("cuda"))\
        == {}
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer("adamw", [{"params": [w]}], fused=True)  # torch's fused AdamW also runs on CPU
    w.grad = torch.ones(3)
    apply_schedules(opt, 0.1, 0.0)
    opt.step()
    assert torch.all(w < 1)


def test_channels_last_for_cnns_keeps_the_output():
    cfg = parse_config(["--arch", "resnet_test", "--out_dim", "16"])
    torch.manual_seed(0)
    a_s, a_t = build_student_teacher(cfg)
    b_s, b_t = build_student_teacher(cfg)
    b_s.load_state_dict(a_s.state_dict())
    place(a_s, a_t, torch.device("cpu"))
    place(b_s, b_t, torch.device("cpu"), channels_last=True)
    assert next(p for p in b_s.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    a_s.eval(), b_s.eval()
    torch.testing.assert_close(a_s.backbone(x), b_s.backbone(x), rtol=1e-4, atol=1e-5)
