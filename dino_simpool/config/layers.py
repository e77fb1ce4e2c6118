"""From a command line and a YAML recipe to one ``TrainConfig``: the parser, the recipe layer and the layering.

Bad flag syntax exits 2 through argparse (one line); bad values raise ValueError naming the flag (the command line
turns it into exit 2).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from dino_simpool.cli import OneLineErrorParser
from dino_simpool.config.aliases import ALIASES, fold_aliases, merge_layers
from dino_simpool.config.fields import add_flags, flag_fields
from dino_simpool.config.presets import Provenance, choose_preset, default_layer
from dino_simpool.config.training import GROUPS, TrainConfig

DESCRIPTION = (
    "DINO pretraining with any backbone and pooling. DINO's and SimPool's main_dino.py flags keep their names and "
    "meanings. Flags not given take, with a --data_path, the defaults of --preset dino (DINO's main_dino.py, shown as "
    "[DINO: ...]) or --preset simpool (SimPool's, shown as (default: ...)); the preset is simpool when --mode is "
    "given (as in every SimPool README command) and dino otherwise. Without --data_path (the embedded dataset) they "
    "take the demo's values, shown as [embedded: ...]. Layering, later wins: preset or embedded defaults, --config "
    "recipe.yaml, the command line. launch/recipes/ holds the paper's runs."
)


def build_parser() -> argparse.ArgumentParser:
    """All flags default to SUPPRESS, so that only those given on the command line override the recipe."""
    p = OneLineErrorParser("dino-simpool-train", description=DESCRIPTION, argument_default=argparse.SUPPRESS)
    return add_flags(p, TrainConfig, GROUPS, ALIASES)


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line (+ optional ``--config`` recipe) → validated ``TrainConfig``."""
    cli = fold_aliases(vars(build_parser().parse_args(argv)), "the command line")
    recipe = load_yaml_layer(cli["config"]) if cli.get("config") else {}
    return build_config([recipe, cli])


def load_recipe(path: str | os.PathLike) -> TrainConfig:
    """A recipe YAML alone (no command line) → ``TrainConfig``; the same as ``parse_config(["--config", path])``
    but for the ``config`` field."""
    return build_config([load_yaml_layer(path)])


def build_config(layers: Sequence[Mapping[str, Any]]) -> TrainConfig:
    """Given layers (recipe, then command line), on top of the defaults they choose → ``TrainConfig``."""
    given = merge_layers(*layers)
    preset, reason = choose_preset(layers)
    cfg = TrainConfig.from_dict(merge_layers(default_layer(TrainConfig, preset, given), given, {"preset": preset}))
    named = {"pooling" if k == "mode" else k for k in given}
    cfg.provenance = Provenance(preset=preset, reason=reason, embedded=cfg.data_path is None,
                                defaulted=frozenset(f.name for f in flag_fields(TrainConfig)) - named)
    return cfg


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A ``--config`` recipe file's mapping, keys with any leading ``--`` stripped and ``config`` dropped; ValueError
    naming the file. Both trainers read their recipes with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    data = {str(k).lstrip("-"): v for k, v in data.items()}
    data.pop("config", None)
    return data


def load_yaml_layer(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe's flags (keys may be written ``--lr`` or ``lr``), aliases folded; ValueError naming the file."""
    return fold_aliases(read_yaml_mapping(path), str(path))
