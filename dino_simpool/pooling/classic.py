"""Group 1 of the framework (no query, a fixed or feature-derived attention): GAP, max, GeM, LSE, HOW.

Framework notation (poolings.md): X ∈ R^{d×p} the p locations, U^0 the initial representation, φ_Q/φ_K the
query/key maps, s the similarity, A the attention, φ_V the value map, f the pooling function
(Z = f^{-1}(f(V) Aᵀ)), φ_X a feature update, φ_U the output map and k the number of outputs.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Pooling, check_int, check_positive, register_pooling, uniform_attention


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


@register_pooling("gap")
class GAP(Pooling):
    """Global average pooling. Framework row: U^0 = –; φ_Q = –; φ_K = –; s = –; A = 1_p/p (uniform);
    φ_V = X; f = f_{−1} (identity: arithmetic mean); φ_X = –; φ_U = Z; k = 1.

    No parameters. The attention returned is the uniform A, (B, N) with every entry 1/N.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def pool(self, tokens):
        return tokens.mean(dim=1), uniform_attention(tokens)


@register_pooling("max")
class MaxPool(Pooling):
    """Global max pooling. Framework row: U^0 = –; φ_Q = –; φ_K = –; s = –; A = 1_p (all ones);
    φ_V = X; f = f_{−∞} (channel-wise max); φ_X = –; φ_U = Z; k = 1.

    No parameters. Each channel picks its own location, so there is no single distribution over locations:
    ``return_attention=True`` raises ValueError.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def pool(self, tokens):
        return tokens.amax(dim=1), None


@register_pooling("gem")
class GeM(Pooling):
    """Generalised-mean pooling (Radenović et al.). Framework row: U^0 = –; φ_Q = –; φ_K = –; s = –;
    A = 1_p/p (uniform); φ_V = X (clamped at eps, or shifted, see below); f = f_α, the power mean with exponent
    p (learnable, init 3); φ_X = –; φ_U = Z; k = 1.

    ``Z_c = (mean_i x_ic^p)^(1/p)``, computed in fp32 as ``exp((logsumexp(p·log x) − log N)/p)`` so that large p
    neither overflows nor underflows (p → ∞ gives max, p = 1 gives GAP). GeM needs non-negative inputs:
    ``shift=False`` (default, the classic GeM for post-ReLU CNN maps) clamps values below ``eps`` to ``eps``;
    ``shift=True`` (for signed features such as ViT tokens) shifts each sample's channel by its own min over
    locations (``x − min + eps``) and adds the shift back afterwards, so p = 1 is exactly GAP for any input.
    ``learn_p=False`` keeps p fixed (a buffer). p is clamped at 1e-3 in the forward so training cannot reach 0.
    The attention returned is the uniform A.
    """

    def __init__(self, dim: int, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6, shift: bool = False):
        super().__init__()
        check_positive("p", p)
        check_positive("eps", eps)
        self.dim, self.eps, self.shift = dim, float(eps), bool(shift)
        p_t = torch.full((1,), float(p))
        if learn_p:
            self.p = nn.Parameter(p_t)
        else:
            self.register_buffer("p", p_t)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, p={float(self.p):.4g}, learn_p={isinstance(self.p, nn.Parameter)}, shift={self.shift}"

    def pool(self, tokens):
        n = tokens.shape[1]
        with _no_autocast(tokens):
            x = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
            if self.shift:
                offset = x.amin(dim=1, keepdim=True) - self.eps  # (B, 1, d), per sample and channel
                x = x - offset
            else:
                x = x.clamp(min=self.eps)
            p = self.p.to(x.dtype).clamp(min=1e-3)
            out = ((torch.logsumexp(p * x.log(), dim=1) - math.log(n)) / p).exp()
            if self.shift:
                out = out + offset.squeeze(1)
        return out.to(tokens.dtype), uniform_attention(tokens)


@register_pooling("lse")
class LSE(Pooling):
    """Log-sum-exp pooling (Pinheiro & Collobert). Framework row: U^0 = –; φ_Q = –; φ_K = –; s = –;
    A = 1_p/p (uniform); φ_V = X; f = e^{r x} (log-mean-exp with scale r); φ_X = –; φ_U = Z; k = 1.

    ``Z_c = (1/r) log(mean_i exp(r x_ic))``, in fp32 via logsumexp: r → 0 gives the mean, r → ∞ the max.
    ``r`` (default 10) is fixed unless ``learn_r=True``. The attention returned is the uniform A.
    """

    def __init__(self, dim: int, r: float = 10.0, learn_r: bool = False):
        super().__init__()
        check_positive("r", r)
        self.dim = dim
        r_t = torch.full((1,), float(r))
        if learn_r:
            self.r = nn.Parameter(r_t)
        else:
            self.register_buffer("r", r_t)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={float(self.r):.4g}, learn_r={isinstance(self.r, nn.Parameter)}"

    def pool(self, tokens):
        n = tokens.shape[1]
        with _no_autocast(tokens):
            x = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
            r = self.r.to(x.dtype).clamp(min=1e-6)
            out = (torch.logsumexp(r * x, dim=1) - math.log(n)) / r
        return out.to(tokens.dtype), uniform_attention(tokens)


@register_pooling("how")
class HOW(Pooling):
    """HOW pooling (Tolias et al., ECCV 2020). Framework row: U^0 = –; φ_Q = –; φ_K = –; s = –;
    A = diag(XᵀX) (a weight per location from its feature norm; HOW's code uses the L2 norm, as here);
    φ_V = FC(avg_3(X)): 3×3 average smoothing over the grid, then a learned d→d linear map (1×1 conv);
    f = f_{−1}; φ_X = –; φ_U = Z (``l2_normalize=True`` L2-normalises it as HOW does); k = 1.

    The weights are normalised to sum to 1, so Z is the norm-weighted mean of the smoothed, projected features;
    the attention returned is that weight, (B, N). (The linear map is applied after the weighted sum, which is the
    same since the weights sum to 1.) Needs the spatial layout: tokens are taken as a square grid
    unless ``grid=(H, W)`` is passed to forward.
    """

    uses_grid = True

    def __init__(self, dim: int, kernel_size: int = 3, l2_normalize: bool = False):
        super().__init__()
        check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1; got {kernel_size!r}")
        self.dim, self.kernel_size, self.l2_normalize = dim, kernel_size, bool(l2_normalize)
        self.proj = nn.Linear(dim, dim)

    def pool(self, tokens, grid):
        b, n, d = tokens.shape
        h, w = grid
        norms = tokens.float().norm(dim=-1)  # (B, N)
        attn = norms / norms.sum(dim=1, keepdim=True).clamp(min=1e-12)
        fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
        k = self.kernel_size
        smooth = F.avg_pool2d(fmap, k, stride=1, padding=k // 2, count_include_pad=False)
        smooth = smooth.flatten(2).transpose(1, 2)  # (B, N, d)
        # Σ_i a_i (W s_i + b) = W (Σ_i a_i s_i) + b since Σ_i a_i = 1: project the pooled vector, not every location.
        out = self.proj(torch.einsum("bn,bnd->bd", attn.to(smooth.dtype), smooth))
        if self.l2_normalize:
            out = F.normalize(out, dim=-1)
        return out, attn.to(tokens.dtype)


__all__ = ["GAP", "MaxPool", "GeM", "LSE", "HOW"]
