"""The training configuration: DINO/SimPool flag names → one validated ``TrainConfig``.

- ``fields``: the flag machinery (one dataclass field per flag; parser, coercion, checks and help derived from it);
- ``training``: ``TrainConfig``, every training flag written once;
- ``aliases``: DINO's ``--use_fp16`` and SimPool's ``--mode``;
- ``presets``: which defaults a run takes (``--preset dino|simpool``, or the embedded dataset's);
- ``layers``: the parser, the YAML recipe layer and ``parse_config``;
- ``checks``: a resume under other flags, a rising lr schedule, slow precision on a CPU.
"""
from dino_simpool.config.checks import device_warnings, result_differences, schedule_warnings
from dino_simpool.config.fields import values
from dino_simpool.config.layers import build_config, build_parser, load_recipe, load_yaml_layer, parse_config
from dino_simpool.config.presets import Provenance
from dino_simpool.config.training import PRESETS, TrainConfig

# The embedded-dataset values (no --data_path): the demo's configuration, and DINO's values (--preset dino)
EMBEDDED_DEFAULTS = values(TrainConfig, "embedded")
DINO_DEFAULTS = values(TrainConfig, "dino")

__all__ = ["DINO_DEFAULTS", "EMBEDDED_DEFAULTS", "PRESETS", "Provenance", "TrainConfig", "build_config",
           "build_parser", "device_warnings", "load_recipe", "load_yaml_layer", "parse_config", "result_differences",
           "schedule_warnings"]
