"""Shared plumbing for every pooling: input layout handling and the registry."""
from __future__ import annotations

import math
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


def resolve_grid(n: int, grid: tuple[int, int] | None, map_grid: tuple[int, int] | None,
                 needs_grid: bool) -> tuple[int, int] | None:
    """The (H, W) layout of N tokens: a map's own shape, else ``grid=``, else a square N when ``needs_grid``."""
    if map_grid is not None:
        if grid is not None and tuple(grid) != tuple(map_grid):
            raise ValueError(f"grid={tuple(grid)} contradicts the feature map's spatial shape {tuple(map_grid)}")
        return map_grid
    if grid is not None:
        if len(grid) != 2 or int(grid[0]) * int(grid[1]) != n:
            raise ValueError(f"grid must be (H, W) with H*W equal to the {n} tokens; got grid={grid!r}")
        return int(grid[0]), int(grid[1])
    if not needs_grid:
        return None
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"this pooling needs the spatial layout of the tokens, and {n} tokens are not a square grid: "
            f"pass a (B, d, H, W) map or grid=(H, W)"
        )
    return side, side


class Pooling(nn.Module):
    """Base class: ``forward(x, return_attention=False, grid=None)`` maps tokens or maps to (B, d).

    Subclasses implement ``pool(tokens) -> (pooled (B, d), attention (B, N) or None)`` on (B, N, d) tokens.
    Poolings that need the spatial layout (3x3/7x7 convolutions: how, cbam, ge) set ``uses_grid = True`` and
    implement ``pool(tokens, grid)``; for tokens the grid is ``grid=`` or, by default, a square. Poolings with
    k > 1 outputs also implement ``pool_all`` returning (B, k, d).
    """

    #: The backbone must prepend a learnable token and hand the pooling all tokens ([CLS]-style).
    needs_token: bool = False
    #: ``pool`` takes the (H, W) layout of the tokens as a second argument.
    uses_grid: bool = False

    def pool(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _check_tokens(self, tokens: torch.Tensor, was_map: bool) -> None:
        """Clear errors for the layouts that would otherwise fail deep inside torch or, worse, pool silently."""
        layout = "(B, d, H, W) map" if was_map else "(B, N, d) tokens"
        if not tokens.is_floating_point():
            raise ValueError(f"pooling expects floating-point features; got dtype {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError(f"pooling got an empty {layout} (no locations): shape {tuple(tokens.shape)}")
        dim = getattr(self, "dim", None)
        if dim is not None and tokens.shape[-1] != dim:
            hint = " (a channels-last (B, H, W, d) map? permute it to (B, d, H, W))" if was_map else ""
            raise ValueError(f"{type(self).__name__} was built for dim={dim} but got {layout} with "
                             f"d={tokens.shape[-1]}{hint}")

    def forward(self, x: torch.Tensor, return_attention: bool = False, grid: tuple[int, int] | None = None):
        tokens, map_grid = to_tokens(x)
        self._check_tokens(tokens, map_grid is not None)
        if self.uses_grid:
            out, attn = self.pool(tokens, resolve_grid(tokens.shape[1], grid, map_grid, True))
        else:
            resolve_grid(tokens.shape[1], grid, map_grid, False)  # validates a given grid
            out, attn = self.pool(tokens)
        if not return_attention:
            return out
        if attn is None:
            raise ValueError(
                f"{type(self).__name__} has no attention map over locations; call it with return_attention=False"
            )
        return out, attention_to_grid(attn, map_grid)


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
    if (value is None or isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not value > 0):
        allowed = "a finite float > 0 or None" if allow_none else "a finite number > 0"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_heads(dim: int, num_heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
        raise ValueError(
            f"num_heads must be a positive integer dividing dim={dim}; got num_heads={num_heads!r} "
            f"(allowed: {[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]})"
        )


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def uniform_attention(tokens: torch.Tensor) -> torch.Tensor:
    """The uniform A = 1_N / N of GAP-like poolings, (B, N)."""
    b, n, _ = tokens.shape
    return tokens.new_full((b, n), 1.0 / n)
