"""The pooling framework of the SimPool paper behind one registry: ``build_pooling(name, dim, **options)``."""
from __future__ import annotations

from torch import nn

from .base import POOLINGS, Pooling, PoolingEntry, register_pooling
from . import simpool  # noqa: F401  (registers)
from .simpool import SimPool


def list_poolings() -> list[str]:
    """Canonical registry names (aliases excluded)."""
    return sorted({e.name for e in POOLINGS.values()})


def get_pooling_entry(name: str) -> PoolingEntry:
    if not isinstance(name, str) or name.lower() not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of: {', '.join(list_poolings())}")
    return POOLINGS[name.lower()]


def build_pooling(name: str, dim: int, **options) -> nn.Module:
    """Build the pooling ``name`` for ``dim``-channel features. Unknown names list the registry."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer; got {dim!r}")
    entry = get_pooling_entry(name)
    try:
        return entry.builder(dim, **options)
    except TypeError as e:  # an option the pooling does not take
        raise ValueError(f"bad option for pooling {entry.name!r}: {e}") from None


__all__ = ["build_pooling", "list_poolings", "get_pooling_entry", "register_pooling", "Pooling", "SimPool", "POOLINGS"]
