"""The pooling framework of the SimPool paper behind one registry: ``build_pooling(name, dim, **options)``."""
from __future__ import annotations

import inspect

from torch import nn

from .base import POOLINGS, Pooling, PoolingEntry, register_pooling
from . import classic, clustering, excitation, simpool, tokens  # noqa: F401  (each import registers its poolings)
from .classic import GAP, HOW, LSE, GeM, MaxPool
from .clustering import OTK, KMeans, MultiOutputPooling, SlotAttention
from .excitation import CBAM, SE, GatherExcite
from .simpool import SimPool
from .tokens import ClassAttention, ClassToken


def list_poolings() -> list[str]:
    """Canonical registry names (aliases excluded)."""
    return sorted({e.name for e in POOLINGS.values()})


def get_pooling_entry(name: str) -> PoolingEntry:
    """The registry entry of ``name`` (``.needs_token``: the backbone must supply a [CLS]-style token)."""
    if not isinstance(name, str) or name.lower() not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of: {', '.join(list_poolings())}")
    return POOLINGS[name.lower()]


def pooling_options(name: str) -> list[str]:
    """The keyword options that ``build_pooling(name, dim, ...)`` accepts."""
    params = list(inspect.signature(get_pooling_entry(name).builder).parameters.values())[1:]  # after dim
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_pooling(name: str, dim: int, **options) -> nn.Module:
    """Build the pooling ``name`` for ``dim``-channel features. Unknown names list the registry; unknown options
    list the options that pooling takes."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer; got {dim!r}")
    entry = get_pooling_entry(name)
    allowed = pooling_options(entry.name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for pooling {entry.name!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    return entry.builder(dim, **options)


__all__ = [
    "build_pooling", "list_poolings", "get_pooling_entry", "pooling_options", "register_pooling", "Pooling", "MultiOutputPooling",
    "POOLINGS", "SimPool", "GAP", "MaxPool", "GeM", "LSE", "HOW", "OTK", "KMeans", "SlotAttention", "SE", "CBAM",
    "GatherExcite", "ClassToken", "ClassAttention",
]
