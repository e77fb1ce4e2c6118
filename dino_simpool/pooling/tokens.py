"""Group 4 of the framework (a learned token attends to the locations): ViT [CLS] and CaiT class-attention."""
from __future__ import annotations

import torch
from torch import nn

from .base import Pooling, check_heads, check_int, check_positive, register_pooling


def _resolve_heads(dim: int, num_heads: int | None) -> int:
    if num_heads is None:  # the largest of 4, 2, 1 that divides dim
        return next(h for h in (4, 2, 1) if dim % h == 0)
    check_heads(dim, num_heads)
    return num_heads


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float):
        hidden = max(int(dim * mlp_ratio), 1)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def _split_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, h, d // h).transpose(1, 2)  # (B, h, n, d/h)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


class _Attention(nn.Module):
    """Multi-head attention returning its weights. ``queries`` attend to ``context`` (self-attention if None)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.num_heads
        q, k, v = _split_heads(self.q(queries), h), _split_heads(self.k(context), h), _split_heads(self.v(context), h)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, h, nq, nk)
        out = _merge_heads(attn.to(v.dtype) @ v)
        return self.proj(out), attn


class _Block(nn.Module):
    """Pre-norm transformer block. ``update="all"``: MSA + MLP on every token (ViT). ``update="token"``: only
    token 0 queries and is updated; the others are keys/values only (CaiT class-attention)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, update: str):
        super().__init__()
        self.update = update
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm1(x)
        if self.update == "all":
            a, attn = self.attn(y, y)
            x = x + a
            return x + self.mlp(self.norm2(x)), attn
        a, attn = self.attn(y[:, :1], y)  # the token queries [token; patches]
        t = x[:, :1] + a
        t = t + self.mlp(self.norm2(t))
        return torch.cat([t, x[:, 1:]], dim=1), attn


class _TokenPooling(Pooling):
    UPDATE = "all"

    def __init__(self, dim: int, depth: int, num_heads: int | None, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        check_int("depth", depth)
        check_positive("mlp_ratio", mlp_ratio)
        heads = _resolve_heads(dim, num_heads)
        self.dim, self.depth, self.num_heads = dim, depth, heads
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, qkv_bias, self.UPDATE) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.token, std=0.02)
        self.apply(_init_linear)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}, num_heads={self.num_heads}"

    def pool(self, tokens):
        b = tokens.shape[0]
        x = torch.cat([self.token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        attn = None
        for blk in self.blocks:
            x, attn = blk(x)
        out = self.norm(x[:, 0])
        a = attn[:, :, 0, 1:].mean(dim=1)  # last block, token → patches, mean over heads
        a = a / a.sum(dim=-1, keepdim=True)  # drop the token's weight on itself, renormalise over locations
        return out, a.to(tokens.dtype)


@register_pooling("cls", needs_token=True)
class ClassToken(_TokenPooling):
    """ViT [CLS] pooling. Framework row: U^0 = U (a learned token); φ_Q = g_m(W_Q U) (m heads); φ_K = g_m(W_K X);
    s = xᵀy; A = per-head σ_2(S_i/√(d/m)); φ_V = g_m(W_V X); f = f_{−1}; φ_X = MLP(MSA(X)): the patches are updated
    in every block, iterated ``depth`` times; φ_U = MLP(g_m^{-1}(Z)); k = 1.

    Registry entry ``needs_token=True``: inside a ViT the backbone prepends its own [CLS] token at the input and
    uses it instead of this module. Standalone (e.g. on CNN maps) this module owns the learned token, prepends it
    to the locations (no positional embedding), runs ``depth`` (default 1) pre-norm transformer blocks (MSA + MLP,
    all tokens updated, ``mlp_ratio`` 4) and returns LayerNorm(token). ``num_heads=None`` picks the largest of 4, 2, 1
    dividing dim. The attention returned is the last block's token → location attention averaged over heads,
    renormalised over the locations (the token's weight on itself is dropped).
    """

    needs_token = True
    UPDATE = "all"

    def __init__(self, dim: int, depth: int = 1, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__(dim, depth, num_heads, mlp_ratio, qkv_bias)


@register_pooling("cait")
class ClassAttention(_TokenPooling):
    """CaiT class-attention pooling (Touvron et al., ICCV 2021). Framework row: U^0 = U (a learned token);
    φ_Q = g_m(W_Q U); φ_K = g_m(W_K X); s = xᵀy; A = per-head σ_2(S_i/√(d/m)); φ_V = g_m(W_V X); f = f_{−1};
    φ_X = X (patches frozen: only the class token is updated), iterated ``depth`` times; φ_U = MLP(g_m^{-1}(Z));
    k = 1.

    ``depth`` (default 2) class-attention blocks: the token (LayerNorm'd together with the locations) queries
    [token; locations], then an MLP updates the token; no LayerScale. Returns LayerNorm(token).
    ``num_heads=None`` picks the largest of 4, 2, 1 dividing dim. The attention returned is the last block's
    token → location attention averaged over heads, renormalised over the locations.
    """

    UPDATE = "token"

    def __init__(self, dim: int, depth: int = 2, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__(dim, depth, num_heads, mlp_ratio, qkv_bias)


__all__ = ["ClassToken", "ClassAttention"]
