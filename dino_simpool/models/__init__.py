"""Backbones (ViT, ResNet, ConvNeXt on timm) with a pluggable pooling, and weight loading."""
from .backbones import (
    ARCHS,
    Backbone,
    CNNBackbone,
    ViTBackbone,
    build_backbone,
    count_parameters,
    explicit_attention,
    list_archs,
)
from .weights import build_backbone_from_checkpoint, load_pretrained

__all__ = [
    "ARCHS",
    "Backbone",
    "CNNBackbone",
    "ViTBackbone",
    "build_backbone",
    "build_backbone_from_checkpoint",
    "count_parameters",
    "explicit_attention",
    "list_archs",
    "load_pretrained",
]
