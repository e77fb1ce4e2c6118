"""Build DINO's student and teacher from a ``TrainConfig`` and wrap them for this process (device, SyncBN, DDP).

* student = ``MultiCropWrapper(build_backbone(...), DINOHead(...))``; the teacher is the same architecture with the
  **same** gamma (the official fork gave the ViT teacher gamma 1.25 whatever ``--gamma`` said), no drop-path, no
  gradients, initialised from the student. The student is wrapped in DDP when distributed; the teacher never is (its
  BatchNorm buffers are broadcast from rank 0 after every step by ``DINOStep``, as DINO's DDP-wrapped teacher did; on
  CUDA, BN layers are SyncBN instead, where the ranks agree without it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dino_simpool import distributed as D
from dino_simpool.dino.head import DINOHead, MultiCropWrapper
from dino_simpool.models.backbones import build_backbone
from dino_simpool.models.weights import load_pretrained


def backbone_kwargs(cfg) -> dict[str, Any]:
    """The ``build_backbone`` arguments shared by student and teacher (same gamma for both)."""
    kw: dict[str, Any] = dict(arch=cfg.arch, pooling=cfg.pooling, gamma=cfg.gamma, patch_size=cfg.patch_size,
                              img_size=cfg.global_crops_size)
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    return kw


def build_student_teacher(cfg) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop-path) and teacher (no drop-path, same gamma), teacher = copy of the student, frozen."""
    kw = backbone_kwargs(cfg)
    student_bb = build_backbone(**kw, drop_path_rate=cfg.drop_path_rate)
    teacher_bb = build_backbone(**kw, drop_path_rate=0.0)
    dim = student_bb.embed_dim
    student = MultiCropWrapper(student_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                                                    norm_last_layer=cfg.norm_last_layer))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def init_from_pretrained(student: MultiCropWrapper, teacher: MultiCropWrapper, path: str,
                         checkpoint_key: str | None = "teacher") -> dict:
    """Start the student's backbone from ``path`` (strict, any format ``load_pretrained`` reads) and copy it into the
    teacher; the heads keep their fresh init. The model keeps this project's numerics (``compat=None``: per-sample
    SimPool min, timm position-embedding interpolation), which training should not inherit from the official code."""
    report = load_pretrained(student.backbone, path, checkpoint_key=checkpoint_key, compat=None)
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    return report


def unwrap(model: nn.Module) -> nn.Module:
    """DDP (or any ``.module`` wrapper) → the wrapped module; by attribute, whatever the architecture."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def optimizer_options(name: str, device: torch.device) -> dict[str, Any]:
    """Fused AdamW on CUDA (one kernel for all parameters, no per-parameter host work); the default elsewhere."""
    return {"fused": True} if name == "adamw" and device.type == "cuda" else {}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def place(student: nn.Module, teacher: nn.Module, device: torch.device, compile: bool = False,
          channels_last: bool | None = None) -> tuple[nn.Module, nn.Module, nn.Module, bool]:
    """Move both to ``device``; SyncBN on multi-GPU; ``torch.compile`` (in place, so state dict keys keep their
    names); DDP around the student when distributed. ``channels_last`` (default: on CUDA for CNN backbones, where
    cuDNN's convolutions prefer it) converts the weights' memory format.

    Returns ``(student, teacher, student_for_forward, sync_teacher_buffers)``: the last says whether the teacher's
    BatchNorm buffers must be broadcast after each step (distributed, with BN, without SyncBN)."""
    if channels_last is None:
        channels_last = device.type == "cuda" and not getattr(student.backbone, "is_vit", True)
    fmt = {"memory_format": torch.channels_last} if channels_last else {}
    student.to(device, **fmt)
    teacher.to(device, **fmt)
    syncbn = D.is_dist() and device.type == "cuda" and has_batchnorm(student)
    if syncbn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher.train()  # as DINO: BN layers of the teacher use batch statistics
    if compile:
        for m in (student, teacher):  # per part: the wrapper's crop grouping and cat stay eager
            m.backbone.compile()
            m.head.compile()
    forward: nn.Module = student
    if D.is_dist():
        forward = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    return student, teacher, forward, D.is_dist() and has_batchnorm(teacher) and not syncbn
