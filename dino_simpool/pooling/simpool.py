"""SimPool (Psomas et al., ICCV 2023): GAP-initialised single-query attention with a generalised-mean pooling."""
from __future__ import annotations

import torch
from torch import nn

from .base import Pooling, check_heads, check_positive, register_pooling

MIN_OVER = ("sample", "batch")


@register_pooling("simpool")
class SimPool(Pooling):
    """SimPool. Framework row: U^0 = GAP(X); φ_Q = W_Q; φ_K = W_K LN(X); s = xᵀy; A = σ_2(S/√(d/h));
    φ_V = LN(X) − min LN(X); f = f_α (power mean with exponent γ); φ_X = –; φ_U = Z (+ β). k = 1.

    ``gamma=None`` is plain attention-weighted averaging of LN(X). With ``gamma`` set the output is
    ``(a · (V − min V + eps)^γ)^(1/γ)`` (+ beta): the shift is not undone, exactly as in the official code.
    As in the official code, ``beta`` exists only when ``use_beta`` and ``gamma`` is set (so official γ and no-γ
    checkpoints load 1:1; ``use_beta=True`` with ``gamma=None`` adds nothing). The attention returned is the
    softmax over locations averaged over heads, (B, N).

    Unlike the official ``sp.py``: the min is taken per sample (``min_over="sample"``; ``"batch"`` reproduces the
    official batch-wide min for checkpoint parity), no device is hard-coded, the multi-head γ path returns (B, d),
    B = 1 keeps its batch axis, and the power mean runs in fp32 under autocast. The logits q·W_K LN(x) are computed
    as LN(x)·(W_Kᵀ q), which is the same number without projecting all N keys (O(N·d·h) instead of O(N·d²)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        gamma: float | None = None,
        use_beta: bool = False,
        eps: float = 1e-6,
        min_over: str = "sample",
        init: str = "trunc_normal",
    ):
        super().__init__()
        check_heads(dim, num_heads)
        check_positive("gamma", gamma, allow_none=True)
        check_positive("eps", eps)
        check_positive("qk_scale", qk_scale, allow_none=True)
        if min_over not in MIN_OVER:
            raise ValueError(f"min_over must be one of {MIN_OVER}; got {min_over!r}")
        if init not in ("trunc_normal", "default"):
            raise ValueError(f"init must be 'trunc_normal' or 'default'; got {init!r}")
        self.dim, self.num_heads = dim, num_heads
        self.gamma = None if gamma is None else float(gamma)
        self.eps = float(eps)
        self.min_over = min_over
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        # Official sp.py: beta only on the gamma path (its no-gamma checkpoints have no `beta` key).
        self.beta = nn.Parameter(torch.zeros(1)) if (use_beta and gamma is not None) else None
        if init == "trunc_normal":
            for lin in (self.wq, self.wk):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, gamma={self.gamma}, eps={self.eps}, min_over={self.min_over!r}"

    def pool(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = tokens.shape
        h = self.num_heads
        u0 = tokens.mean(dim=1)  # GAP of the raw tokens: the query is not normalised
        xn = self.norm_patches(tokens)
        q = self.wq(u0).reshape(b, h, d // h)  # (B, h, d/h)
        # q·(W_K x + b_K) per head, computed as x·(W_Kᵀ q) + q·b_K: the same logits without projecting all N keys
        # (O(N·d·h) instead of O(N·d²)).
        kq = torch.einsum("bhc,hcd->bhd", q, self.wk.weight.reshape(h, d // h, d))  # (B, h, d)
        logits = torch.einsum("bnd,bhd->bhn", xn, kq.to(xn.dtype))
        if self.wk.bias is not None:  # constant over locations, so softmax-invariant; kept for exactness
            logits = logits + (q * self.wk.bias.reshape(h, d // h)).sum(-1, keepdim=True).to(logits.dtype)
        logits = (logits * self.scale).unsqueeze(2)  # (B, h, 1, N)
        v = xn.reshape(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h), no projection
        attn = logits.float().softmax(dim=-1)  # softmax in fp32 even under autocast
        if self.gamma is None:
            out = attn.to(v.dtype) @ v
        else:
            out = self._power_mean(attn, v)
        out = out.transpose(1, 2).reshape(b, d)
        if self.beta is not None:
            out = out + self.beta.to(out.dtype)
        return out, attn.mean(dim=1).reshape(b, n).to(tokens.dtype)

    def _power_mean(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention-weighted power mean of the shifted values, in fp32 even under autocast."""
        dtype = v.dtype
        with torch.autocast(device_type=v.device.type, enabled=False):
            a32, v32 = attn.float(), v.float()
            if self.min_over == "sample":
                vmin = v32.amin(dim=(1, 2, 3), keepdim=True)
            else:
                vmin = v32.min()
            shifted = (v32 - vmin + self.eps).pow(self.gamma)
            out = (a32 @ shifted).pow(1.0 / self.gamma)
        return out.to(dtype)
