"""DINO projection head and the multi-crop wrapper.

``DINOHead``: MLP (Linear/[BN]/GELU) -> bottleneck -> L2-normalise -> weight-normalised Linear (no bias).
``MultiCropWrapper``: one backbone forward per group of consecutive same-resolution crops, then one head forward.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "MultiCropWrapper", "build_mlp", "group_by_resolution", "OLD_WEIGHT_NORM_KEYS"]

# Keys written by the deprecated ``torch.nn.utils.weight_norm`` (official DINO/SimPool checkpoints) -> new keys.
OLD_WEIGHT_NORM_KEYS = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


def build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int = 3, use_bn: bool = False) -> nn.Module:
    """``nlayers`` Linear layers with [BatchNorm1d +] GELU between them, ending at ``bottleneck_dim``."""
    nlayers = max(int(nlayers), 1)
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """DINO projection head.

    With ``norm_last_layer=True`` the weight-norm magnitude (``weight_g``, here ``original0``) is fixed to 1 and not
    trained, so every output unit is a unit-norm direction. ``fp32_logits``: under autocast, compute the last layer in
    fp32 (benchmarks/precision.py measures what bf16 logits cost). Loads both the new parametrization keys and the old
    ``last_layer.weight_g/weight_v`` keys of official checkpoints.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        fp32_logits: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim)):
            if int(v) < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {v!r}")
        self.mlp = build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.apply(_init_linear)
        # As in DINO, the last layer keeps PyTorch's default Linear init (it is created after the trunc_normal pass).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)
        self.norm_last_layer = bool(norm_last_layer)
        self.fp32_logits = bool(fp32_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        if self.fp32_logits and torch.is_autocast_enabled(x.device.type):
            # the logits are divided by a teacher temperature of 0.04: bf16's ~4e-3 steps near +-1 become 0.1 steps
            with torch.autocast(x.device.type, enabled=False):
                return self.last_layer(x.float())
        return self.last_layer(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D401 - torch hook
        """Remap the deprecated ``weight_norm`` keys (``last_layer.weight_g/weight_v``) to the parametrization ones."""
        for old, new in OLD_WEIGHT_NORM_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def group_by_resolution(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` runs of consecutive crops with equal spatial size (DINO's ``unique_consecutive``)."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops.

    Crops are concatenated per run of equal resolution and sent through the backbone in one forward each (so
    SimPool's batch statistics are computed per resolution group, as in DINO), the features are concatenated in crop
    order and the head runs once. Returns ``(n_crops * B, out_dim)``. State-dict keys: ``backbone.*``, ``head.*``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        crops = [x] if isinstance(x, torch.Tensor) else list(x)
        if not crops:
            raise ValueError("MultiCropWrapper: got an empty list of crops")
        feats = []
        for start, end in group_by_resolution(crops):
            out = self.backbone(torch.cat(crops[start:end]))
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats.append(out)
        return self.head(torch.cat(feats))
