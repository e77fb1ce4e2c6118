"""Shared plumbing for every pooling: input layout handling and the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


def to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """(B, N, d) tokens pass through; (B, d, H, W) maps become (B, HW, d). Returns the grid for maps."""
    if x.ndim == 3:
        return x, None
    if x.ndim == 4:
        b, d, h, w = x.shape
        return x.flatten(2).transpose(1, 2), (h, w)
    raise ValueError(
        f"pooling expects tokens (B, N, d) or a feature map (B, d, H, W); got a tensor of shape {tuple(x.shape)}"
    )


def attention_to_grid(attn: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, N) attention back to (B, H, W) when the input was a map."""
    if grid is None:
        return attn
    return attn.reshape(attn.shape[0], *grid)


class Pooling(nn.Module):
    """Base class: ``forward(x, return_attention=False)`` maps tokens or maps to (B, d).

    Subclasses implement ``pool(tokens) -> (pooled (B, d), attention (B, N) or None)`` on (B, N, d) tokens.
    Poolings with k > 1 outputs also implement ``pool_all`` returning (B, k, d).
    """

    #: The backbone must prepend a learnable token and hand the pooling all tokens ([CLS]-style).
    needs_token: bool = False

    def pool(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        tokens, grid = to_tokens(x)
        out, attn = self.pool(tokens)
        if not return_attention:
            return out
        if attn is None:
            raise ValueError(f"{type(self).__name__} has no attention map over locations")
        return out, attention_to_grid(attn, grid)


@dataclass(frozen=True)
class PoolingEntry:
    name: str
    builder: Callable[..., nn.Module]
    needs_token: bool = False
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


POOLINGS: dict[str, PoolingEntry] = {}


def register_pooling(name: str, needs_token: bool = False, description: str = "", aliases: tuple[str, ...] = ()):
    """Class/function decorator adding a pooling to the registry under ``name``."""

    def deco(builder):
        entry = PoolingEntry(name, builder, needs_token, description or (builder.__doc__ or "").strip().split("\n")[0], aliases)
        for key in (name, *aliases):
            if key in POOLINGS:
                raise ValueError(f"pooling name {key!r} registered twice")
            POOLINGS[key] = entry
        return builder

    return deco


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not isinstance(value, (int, float)) or not value > 0:
        allowed = "a float > 0 or None" if allow_none else "a number > 0"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_heads(dim: int, num_heads: int) -> None:
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
        raise ValueError(
            f"num_heads must be a positive integer dividing dim={dim}; got num_heads={num_heads!r} "
            f"(allowed: {[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]})"
        )
