"""The trainer's wiring of DINO's schedules, checked against an independently written official-style step.

A few SGD iterations of a tiny ViT go through ``dino_simpool.train.main``; the same iterations are then replayed
here the way DINO's ``main_dino.py`` / ``utils.py`` write them (numpy schedules, a plain loop for clipping and EMA,
the loss written out), from the same initial weights and the same crops. Student, teacher and loss centre must
agree. Each ingredient is also broken on purpose in the replay (negative controls): every one of them must change
the result by far more than the tolerance, so the comparison really measures it.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from dino_simpool.checkpoint import load_checkpoint
from dino_simpool.data import build_dataset
from dino_simpool.dino.augment import MultiCropAugmentation
from dino_simpool.config import parse_config
from dino_simpool.data.sampling import ResumableDistributedSampler, SeededDataset
from dino_simpool.dino.determinism import seed_all, seed_step
from dino_simpool.dino.build import build_student_teacher
from dino_simpool.train import main

BATCH, NITER, ITERS = 8, 2, 4  # 20 images, batch 8 -> 2 iterations per epoch; 4 iterations = 2 epochs
ARGV = ("--arch vit_tiny --depth 1 --embed_dim 32 --num_heads 2 --patch_size 8 --pooling simpool "
        "--synthetic_size 32 --synthetic_per_class 2 --batch_size_per_gpu 8 --num_workers 0 "
        "--global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 64 --epochs 3 "
        "--warmup_epochs 1 --warmup_teacher_temp 0.04 --teacher_temp 0.06 --warmup_teacher_temp_epochs 2 "
        "--optimizer sgd --lr 2.0 --min_lr 1e-3 --weight_decay 0.04 --weight_decay_end 0.4 --eval_every 0 "
        "--clip_grad 0.05 --clip_grad_mode per_tensor --freeze_last_layer 1 --momentum_teacher 0.9 "
        "--drop_path_rate 0.1 --use_bn_in_head True --norm_last_layer False --seed 0").split()
ATOL = 1e-6


def cosine(base, final, epochs, niter, warmup_epochs=0, start=0.0):
    """DINO's utils.cosine_scheduler, written out."""
    warm = np.linspace(start, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def replay(cfg, broken=None):
    """``ITERS`` official-style iterations; ``broken`` names one ingredient to get wrong (negative control)."""
    lr = cosine(cfg.lr * BATCH / 256.0, cfg.min_lr, cfg.epochs, NITER, cfg.warmup_epochs)
    if broken == "lr_batch_scaling":
        lr = cosine(cfg.lr, cfg.min_lr, cfg.epochs, NITER, cfg.warmup_epochs)
    if broken == "lr_warmup":
        lr = cosine(cfg.lr * BATCH / 256.0, cfg.min_lr, cfg.epochs, NITER)
    if broken == "lr_cosine":
        n_warm_it = cfg.warmup_epochs * NITER  # warm-up, then flat instead of the cosine decay
        lr = np.where(np.arange(len(lr)) >= n_warm_it, lr[n_warm_it], lr)
    wd = cosine(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, NITER)
    if broken == "wd_schedule":
        wd = np.full_like(wd, cfg.weight_decay)
    mom = cosine(cfg.momentum_teacher, 1.0, cfg.epochs, NITER)
    if broken == "momentum_schedule":
        mom = np.full_like(mom, cfg.momentum_teacher)
    n_warm = cfg.warmup_teacher_temp_epochs
    ttemp = np.concatenate((np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, n_warm),
                            np.ones(cfg.epochs - n_warm) * cfg.teacher_temp))
    if broken == "teacher_temp_warmup":
        ttemp = np.full_like(ttemp, cfg.teacher_temp)

    aug = MultiCropAugmentation(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                                global_size=cfg.global_crops_size, local_size=cfg.local_crops_size)
    ds = SeededDataset(build_dataset(None, "train", transform=aug, image_size=cfg.synthetic_size,
                                     images_per_class=cfg.synthetic_per_class), cfg.seed)
    sampler = ResumableDistributedSampler(len(ds), 1, 0, cfg.seed, True, BATCH, True)
    seed_all(cfg.seed)
    student, teacher = build_student_teacher(cfg)
    # DINO's get_params_groups: no weight decay on biases and 1-D tensors
    reg = [p for n, p in student.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    noreg = [p for n, p in student.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    opt = torch.optim.SGD([{"params": reg}, {"params": noreg, "weight_decay": 0.0}], lr=0, momentum=0.9)
    center = torch.zeros(1, cfg.out_dim)
    ncrops = cfg.ncrops
    for it in range(ITERS):
        epoch, i = divmod(it, NITER)
        sampler.set_epoch(epoch)
        idx = list(sampler)[i * BATCH:(i + 1) * BATCH]
        images, _ = default_collate([ds[k] for k in idx])
        seed_step(cfg.seed, 0, it)  # the student's drop-path draws, as the trainer seeds them
        for k, g in enumerate(opt.param_groups):
            g["lr"] = lr[it]
            if k == 0:
                g["weight_decay"] = wd[it]
        student.train()
        teacher.train()
        t_out = teacher(images[:2])
        s_out = student(images)
        # DINOLoss.forward
        s_chunks = (s_out / 0.1).chunk(ncrops)
        q = F.softmax((t_out - center) / ttemp[epoch], dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, qq in enumerate(q):
            for v in range(ncrops):
                if v == iq:
                    continue
                total = total + torch.sum(-qq * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
                terms += 1
        loss = total / terms
        if broken != "center_update":
            center = center * 0.9 + t_out.detach().sum(0, keepdim=True) / len(t_out) * 0.1
        opt.zero_grad()
        loss.backward()
        if broken == "clip_global":
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        elif broken != "no_clip":
            for p in student.parameters():  # utils.clip_gradients: per parameter tensor
                if p.grad is not None:
                    c = cfg.clip_grad / (p.grad.data.norm(2) + 1e-6)
                    if c < 1:
                        p.grad.data.mul_(c)
        if epoch < cfg.freeze_last_layer and broken != "freeze_last_layer":
            for n, p in student.named_parameters():  # utils.cancel_gradients_last_layer
                if "last_layer" in n:
                    p.grad = None
        opt.step()
        with torch.no_grad():
            m = mom[it]
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
    return student.state_dict(), teacher.state_dict(), center


def max_diff(ck, ref):
    student, teacher, center = ref
    d = [(ck[part][k].float() - v.float()).abs().max().item()
         for part, sd in (("student", student), ("teacher", teacher)) for k, v in sd.items() if v.is_floating_point()]
    d.append((ck["dino_loss"]["center"] - center).abs().max().item())
    return max(d)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("numerics") / "run"
    argv = ARGV + ["--max_iters", str(ITERS), "--output_dir", str(out)]
    assert main(argv) == 0
    cfg = parse_config(argv)
    cfg.resolve("cpu")
    return load_checkpoint(out / "checkpoint.pth"), cfg


def test_trainer_matches_official_style_step(trained):
    ck, cfg = trained
    assert ck["iteration"] == ITERS
    ref = replay(cfg)
    assert max_diff(ck, ref) < ATOL
    # the last layer was frozen in epoch 0 and trained in epoch 1 (norm_last_layer False: it has parameters)
    assert any("last_layer" in k for k in ck["student"])


@pytest.mark.parametrize("broken", ["lr_batch_scaling", "lr_warmup", "lr_cosine", "wd_schedule", "momentum_schedule",
                                    "teacher_temp_warmup", "no_clip", "clip_global", "freeze_last_layer",
                                    "center_update"])
def test_each_ingredient_is_measured(trained, broken):
    """Negative controls: getting any one ingredient wrong moves the result far beyond the tolerance."""
    ck, cfg = trained
    assert max_diff(ck, replay(cfg, broken)) > 100 * ATOL
