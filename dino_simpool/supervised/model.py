"""The supervised network: any ``build_backbone`` backbone (any pooling) and a linear classifier on its pooled vector.

The pooled vector goes to the classifier exactly where DINO's head sits, so the backbone is the same module, with the
same state-dict keys, in both trainings: ``Classifier.state_dict()`` is ``backbone.*`` (``encoder.*`` + ``pool.*``)
plus ``head.{weight,bias}``, which ``dino_simpool.models.weights`` reads as a DINO checkpoint's (it keeps the
``backbone.`` keys and drops the rest).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dino_simpool.models.backbones import Backbone, build_backbone


class Classifier(nn.Module):
    """``head(dropout(backbone(x)))``. ``drop``: dropout on the pooled vector (timm's ``drop_rate``)."""

    def __init__(self, backbone: Backbone, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head_drop = nn.Dropout(drop)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        family = "vit" if backbone.is_vit else getattr(backbone, "family", "")
        if family in ("vit", "convnext"):  # timm's head init for these; ResNet keeps PyTorch's Linear default (as timm)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.backbone(x)))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that timm's optimizer factory keeps out of weight decay (besides every 1-d tensor): the
        encoder's own list (ViT: pos_embed, cls_token), under this module's prefixes."""
        enc = self.backbone.encoder
        names = enc.no_weight_decay() if hasattr(enc, "no_weight_decay") else set()
        return {f"backbone.encoder.{n}" for n in names}


def build_classifier(backbone_kwargs: dict[str, Any], num_classes: int, drop: float = 0.0) -> Classifier:
    return Classifier(build_backbone(**backbone_kwargs), num_classes, drop)
