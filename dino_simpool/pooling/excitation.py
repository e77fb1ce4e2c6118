"""Group 3 of the framework (feature re-weighting, then GAP): SE, CBAM, Gather-Excite.

None of them uses BatchNorm (the originals do in places): a pooled vector must not depend on the rest of the batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Pooling, check_choice, check_int, register_pooling, uniform_attention


def _hidden(dim: int, reduction: int) -> int:
    check_int("reduction", reduction)
    return max(dim // reduction, 1)


class _GateMLP(nn.Module):
    """d → d/r → d, ReLU in between (the SE/CBAM channel MLP, 1×1 convs as linear layers)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = _hidden(dim, reduction)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(u)))


@register_pooling("se")
class SE(Pooling):
    """Squeeze-and-Excitation, then GAP (Hu et al., CVPR 2018). Framework row: U^0 = π_A(X) = GAP(X);
    φ_Q = σ(mlp(U)) = q, channel gates (MLP d → d/r → d, ``reduction`` r = 16); φ_K = –; s = –;
    A = 1_p/p (uniform: GAP after re-weighting); φ_V = diag(q) X; f = f_{−1}; φ_X = V (features re-weighted);
    φ_U = Z; k = 1.

    Z = GAP(diag(q) X) = q ⊙ GAP(X). The attention returned is the uniform A.
    """

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        self.dim = dim
        self.mlp = _GateMLP(dim, reduction)

    def pool(self, tokens):
        u = tokens.mean(dim=1)
        q = torch.sigmoid(self.mlp(u))
        return q * u, uniform_attention(tokens)  # = mean over locations of q ⊙ x_i


@register_pooling("cbam")
class CBAM(Pooling):
    """Convolutional Block Attention Module, then GAP (Woo et al., ECCV 2018). Framework row:
    U^0 = π_A(X) (average- and max-pooled descriptors); φ_Q = σ(mlp(U)) = q (shared MLP, ``reduction`` r = 16,
    applied to both descriptors and summed); φ_K = X; s = channel pooling of diag(q) X (mean and max over
    channels); A = σ(conv_7(S)), a spatial gate a (``kernel_size`` 7, 2 → 1 channels); φ_V = diag(q) X;
    f = f_{−1}; φ_X = V diag(a); φ_U = Z; k = 1.

    Z = mean_i a_i q ⊙ x_i. The attention returned is the spatial gate normalised over locations, a / Σa (B, N).
    Needs the spatial layout: tokens are taken as a square grid unless ``grid=(H, W)`` is passed to forward.
    """

    uses_grid = True

    def __init__(self, dim: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1; got {kernel_size!r}")
        self.dim = dim
        self.mlp = _GateMLP(dim, reduction)
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def pool(self, tokens, grid):
        b, n, d = tokens.shape
        q = torch.sigmoid(self.mlp(tokens.mean(dim=1)) + self.mlp(tokens.amax(dim=1)))  # (B, d)
        v = tokens * q.unsqueeze(1)
        s = torch.stack([v.mean(dim=-1), v.amax(dim=-1)], dim=1).reshape(b, 2, *grid)
        a = torch.sigmoid(self.spatial(s)).reshape(b, n)  # (B, N) spatial gate
        out = (v * a.unsqueeze(-1)).mean(dim=1)
        a32 = a.float()
        return out, (a32 / a32.sum(dim=1, keepdim=True)).to(tokens.dtype)


@register_pooling("ge", aliases=("gather_excite",))
class GatherExcite(Pooling):
    """Gather-Excite, then GAP (Hu et al., NeurIPS 2018). Framework row: U^0 = –; φ_Q = σ(upsample(gather(X))),
    a gate g of the same shape as X; φ_K = –; s = –; A = 1_p/p (uniform: GAP after the excite); φ_V = g ⊙ X;
    f = f_{−1}; φ_X = V; φ_U = Z; k = 1.

    Gather with extent e (``extent``, default 2; 0 = global): ``learned=True`` (GE-θ, default) uses log2(e) depthwise
    3×3 stride-2 convolutions (ReLU between them, no BatchNorm); ``learned=False`` (GE-θ⁻) uses e×e average
    pooling; ``extent=0`` gathers by GAP. ``mlp=True`` (GE-θ⁺) adds an SE-style channel MLP (``reduction``) after
    the gather. Excite: nearest-neighbour upsampling of the gathered map to H×W, sigmoid, multiply. The attention
    returned is the uniform A. Needs the spatial layout: tokens are taken as a square grid unless ``grid=(H, W)``.
    """

    uses_grid = True
    EXTENTS = (0, 2, 4, 8, 16)

    def __init__(self, dim: int, extent: int = 2, learned: bool = True, mlp: bool = False, reduction: int = 16):
        super().__init__()
        check_choice("extent", extent, self.EXTENTS)
        self.dim, self.extent, self.learned = dim, extent, bool(learned)
        convs = int(math.log2(extent)) if (extent > 0 and learned) else 0
        self.gather = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim) for _ in range(convs)
        )
        self.mlp = _GateMLP(dim, reduction) if mlp else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, extent={self.extent}, learned={self.learned}, mlp={self.mlp is not None}"

    def pool(self, tokens, grid):
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *grid)
        if self.extent == 0:
            g = x.mean(dim=(2, 3), keepdim=True)
        elif self.learned:
            g = x
            for i, conv in enumerate(self.gather):
                g = conv(g)
                if i < len(self.gather) - 1:
                    g = F.relu(g)
        else:
            g = F.avg_pool2d(x, self.extent, stride=self.extent, ceil_mode=True)
        if self.mlp is not None:
            g = self.mlp(g.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        gate = torch.sigmoid(F.interpolate(g, size=grid, mode="nearest") if g.shape[-2:] != grid else g)
        out = (x * gate).mean(dim=(2, 3))
        return out, uniform_attention(tokens)


__all__ = ["SE", "CBAM", "GatherExcite"]
