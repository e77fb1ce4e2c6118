"""DINO's and SimPool's flags that are not fields of their own, and how one layer of flags folds them in.

``--use_fp16`` (DINO) becomes ``precision``; ``--mode`` (SimPool) stays beside ``pooling`` until the architecture is
known (``--mode official`` is cls for ViTs, gap for CNNs: ``models.options.resolve_pooling``). A layer is one source
of flags: the command line, a YAML recipe, a stored config.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from dino_simpool.cli import bool_flag
from dino_simpool.config.fields import Alias
from dino_simpool.models.options import MODE_NAMES

ALIASES = (
    Alias("mode", "pooling", "official SimPool alias: official = DINO's pooling (--pooling cls for ViTs, gap for "
          "CNNs), simpool = --pooling simpool; giving it also selects --preset simpool", choices=MODE_NAMES),
    Alias("use_fp16", "precision", "DINO's alias: True = --precision fp16, False = --precision fp32 "
          "(default: not given, see --precision) [DINO: True]", token=bool_flag),
)


def fold_aliases(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``use_fp16`` → ``precision`` within one layer; ``mode`` checked and kept (resolved with the arch later)."""
    d = dict(d)
    d.pop("local-rank", None)  # a YAML spelling of --local-rank; ignored as the flag itself
    if "mode" in d:
        mode = str(d["mode"]).strip().lower()
        if mode not in MODE_NAMES:
            raise ValueError(f"--mode must be official or simpool (in {where}); got {d['mode']!r}")
        d["mode"] = mode
    if "use_fp16" in d:
        try:
            fp16 = bool_flag(d.pop("use_fp16"))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--use_fp16: {e}") from None
        if d.get("precision") is not None:
            if fp16 and str(d["precision"]).lower() != "fp16":
                raise ValueError(f"--use_fp16 True contradicts --precision {d['precision']} (in {where}); "
                                 f"give only one of them")
        else:  # --use_fp16 False given explicitly = DINO/SimPool's full fp32
            d["precision"] = "fp16" if fp16 else "fp32"
    return d


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; a layer that sets ``pooling`` or ``mode`` replaces both (they name one choice)."""
    out: dict[str, Any] = {}
    for layer in layers:
        if "pooling" in layer or "mode" in layer:
            out.pop("pooling", None)
            out.pop("mode", None)
        out.update(layer)
    return out
