"""The one parser and resolver of the model options that every command line shares: gamma and pooling/mode.

Training, every evaluator and export call these, so that ``--gamma None`` and ``--mode official`` mean the same
thing everywhere: ``parse_gamma`` turns what a flag or a YAML file holds into a value, ``resolve_gamma`` and
``resolve_pooling`` fill in what depends on the architecture's family.
"""
from __future__ import annotations

from typing import Any, Literal

DEFAULT_GAMMA_VIT = 1.25
DEFAULT_GAMMA_CNN = 2.0
FAMILIES = ("vit", "resnet", "convnext")
# --mode (the official SimPool flag): official = DINO's own pooling for the family, simpool = --pooling simpool
MODE_NAMES = ("official", "simpool")

Gamma = float | None | Literal["default"]


def parse_gamma(value: Any) -> Gamma:
    """A flag or YAML value → a positive float, ``None`` (no power) or ``"default"`` (the family's own value).

    Accepts numbers, numeric strings, ``None``/``"none"``/``"null"`` and ``"default"`` (any case); anything else,
    and a number that is not > 0, raises ValueError naming the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid gamma {value!r}: give a number > 0 such as 1.25, None or default")
    if isinstance(value, (int, float)):
        g = float(value)
    else:
        text = str(value).strip()
        if text.lower() in {"none", "null"}:
            return None
        if text.lower() == "default":
            return "default"
        try:
            g = float(text)
        except ValueError:
            raise ValueError(f"invalid gamma {value!r}: give a number > 0 such as 1.25, None or default") from None
    if not g > 0 or g == float("inf"):
        raise ValueError(f"invalid gamma {value!r}: it must be a finite number > 0, None or default")
    return g


def resolve_gamma(gamma: Any, family: str) -> float | None:
    """``parse_gamma`` plus ``"default"`` → 1.25 for ViTs, 2.0 for CNNs (the paper's values)."""
    g = parse_gamma(gamma)
    if g == "default":
        return DEFAULT_GAMMA_VIT if family == "vit" else DEFAULT_GAMMA_CNN
    return g


def resolve_pooling(pooling: str | None, family: str, mode: str | None = None) -> str:
    """``--pooling`` / the official ``--mode`` → a pooling name. ``official`` (as a mode or a pooling) is DINO's own
    pooling for the family: ``cls`` for ViTs, ``gap`` for CNNs, in training and in every evaluator alike.

    Both given: they must agree (``--mode official --pooling gap`` on a CNN is fine), else ValueError."""
    if mode is not None:
        mode = str(mode).strip().lower()
        if mode not in MODE_NAMES:
            raise ValueError(f"--mode must be one of {', '.join(MODE_NAMES)}; got {mode!r}")
    from_mode = None if mode is None else _official(family) if mode == "official" else "simpool"
    if pooling is None:
        return from_mode or "simpool"
    name = str(pooling).strip().lower()
    name = _official(family) if name == "official" else name
    if from_mode is not None and name != from_mode:
        raise ValueError(f"--mode {mode} means --pooling {from_mode} for this architecture, but --pooling {pooling} "
                         f"was also given; give only one of them")
    return name


def _official(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; supported: {', '.join(FAMILIES)}")
    return "cls" if family == "vit" else "gap"
