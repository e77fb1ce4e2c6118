"""Which defaults a run takes for the flags it does not give.

Layering (later wins): SimPool's ``main_dino.py`` defaults (the fields' defaults) ← DINO's ``main_dino.py`` values
under ``--preset dino`` (the fields' ``dino=``) ← the embedded-dataset values when no ``--data_path`` is given (the
fields' ``embedded=``; the model-shape ones only when ``--arch`` is not given either) ← ``--config recipe.yaml`` ←
the command line.

The preset, when ``--preset`` is not given: ``simpool`` if ``--mode`` is given (on the command line or in the
recipe), else ``dino``. Every command of SimPool's README passes ``--mode``, and DINO has no ``--mode``, so both
repositories' README commands train what they train at home. Flags that only SimPool has but that are often appended
to shrink a run (``--subset``, ``--eval_every``, ``--nb_knn``) do not switch the preset: appending one would
silently turn a DINO command into a ResNet-50 LARS recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dino_simpool.config.aliases import merge_layers
from dino_simpool.config.fields import UNSET, flag_fields, fmt, values

SOURCES = {"dino": "DINO's main_dino.py", "simpool": "SimPool's main_dino.py"}


@dataclass(frozen=True)
class Provenance:
    """How a command line chose its defaults: the preset and why, embedded or not, the flags it left out."""

    preset: str
    reason: str
    embedded: bool
    defaulted: frozenset[str]


def choose_preset(layers: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(preset, why) for the given layers (recipe, then command line); see the module docstring."""
    for layer in reversed(layers):
        if layer.get("preset") is not None:
            return str(layer["preset"]).strip().lower(), "--preset given"
    if any("mode" in layer for layer in layers):
        return "simpool", "--mode given, as in SimPool's commands"
    return "dino", "no --mode given, as in DINO's commands"


def default_layer(cls: type, preset: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the flags ``given`` leaves out, beyond the fields' own (SimPool's) defaults."""
    layer = values(cls, "dino") if preset == "dino" else {}
    if given.get("data_path") is None:
        embedded = values(cls, "embedded")
        if "arch" in given:
            shape = {f.name for f in flag_fields(cls) if f.flag.shape}
            embedded = {k: v for k, v in embedded.items() if k not in shape}
        layer = merge_layers(layer, embedded)
    return layer


def main_flags(cls: type) -> list[str]:
    """The flags on which the presets differ (those with a DINO value), plus the precision."""
    return [f.name for f in flag_fields(cls) if f.flag.dino is not UNSET or f.name == "precision"]


def describe(cfg: Any) -> str:
    """The start-up line: the defaults the run took and their main values (only those the run did not give)."""
    p: Provenance | None = cfg.provenance
    names = main_flags(type(cfg))
    took = names if p is None else [n for n in names if n in p.defaulted]
    shown = []
    for n in took:
        v = getattr(cfg, n)
        shown.append(f"{n} {'auto (fp32 on CPU, bf16 on CUDA)' if n == 'precision' and v is None else fmt(v)}")
    body = ", ".join(shown) if shown else "none of the main flags (all were given)"
    if p is not None and p.embedded:
        return f"training defaults: the embedded dataset's (the demo's configuration; give a --data_path for " \
               f"--preset dino or simpool): the flags not given take: {body}"
    preset = cfg.preset if p is None else p.preset
    other = "simpool" if preset == "dino" else "dino"
    why = "" if p is None else f"{p.reason}; "
    return f"training defaults: --preset {preset} ({why}--preset {other} for {SOURCES[other]}): the flags not " \
           f"given take {SOURCES[preset]} values: {body}"
