"""The training configuration: DINO/SimPool flag names → one ``TrainConfig`` dataclass.

Layering (later wins): the dataclass defaults ← the embedded-dataset defaults (only when no ``--data_path`` is given;
``[embedded: ...]`` below) ← ``--config recipe.yaml`` ← flags given on the command line.

Which defaults: those of SimPool's ``main_dino.py`` (the official fork this project re-implements), so that every
official SimPool command line means the same thing here; where DINO's ``main_dino.py`` differs, its value is given in
the help text as ``[DINO: ...]``. Deliberate departures, each stated in its help: ``--gamma`` defaults to the
architecture's own value (1.25 ViT, 2.0 CNN; the official CLI says 2.0 but then gives the ViT teacher 1.25),
``--precision`` defaults to fp32 on CPU and bf16 on CUDA, ``--num_workers`` is capped at the CPU count, and
``--backend`` follows the device (nccl on GPU, gloo on CPU), ``--drop_path_rate`` defaults per family (0.1 ViT as
DINO, 0.0 ResNet and 0.4 ConvNeXt as the official models), and ``--pooling`` defaults to simpool (official:
``--mode official``, DINO's pooling). The defaults describe an ImageNet-scale ResNet-50 run; with no ``--data_path``
(the embedded dataset) every flag not given takes the embedded-dataset default instead (``EMBEDDED_DEFAULTS``: the
demo's few-minute CPU configuration, shown as ``[embedded: ...]`` in ``--help``). ``launch/recipes/`` holds the
paper's runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dino_simpool.cli import OneLineErrorParser, available_cpus, bool_flag
from dino_simpool.models.backbones import (CONVNEXT_ARCHS, DEFAULT_GAMMA_CNN, DEFAULT_GAMMA_VIT, RESNET_ARCHS,
                                           VIT_ARCHS, list_archs)

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd", "lars")
# --mode official = DINO's own pooling: [CLS] for ViTs, global average pooling for CNNs (resolved with --arch)
MODES = {"official": "official", "simpool": "simpool"}
AUG_BACKENDS = ("fast", "v2")
# --drop_path_rate when not given: DINO's 0.1 for ViTs; the official ResNet-50 has no stochastic depth; the official
# SimPool ConvNeXt hard-codes 0.4 (student and teacher; here the student only, as every teacher)
DROP_PATH_DEFAULTS = {"vit": 0.1, "resnet": 0.0, "convnext": 0.4}

# With no --data_path (the embedded SyntheticShapes dataset), every flag not given takes these values instead of the
# ImageNet-scale defaults: the demo's configuration (python -m dino_simpool.demo; measured in README "The demo"), a
# few minutes on 2 CPU cores. The ``MODEL_SHAPE_KEYS`` among them apply only when --arch is not given either.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "arch": "vit_tiny", "depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4, "pooling": "simpool",
    "gamma": 1.25, "drop_path_rate": 0.0,
    "global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2,
    "global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.2, 0.5],
    "synthetic_size": 64, "synthetic_per_class": 100,
    "out_dim": 64, "use_bn_in_head": False, "norm_last_layer": True,
    "optimizer": "adamw", "lr": 0.008, "min_lr": 1e-5, "weight_decay": 0.04, "weight_decay_end": 0.1,
    "warmup_epochs": 2, "momentum_teacher": 0.99, "warmup_teacher_temp": 0.02, "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 3, "freeze_last_layer": 1, "clip_grad": 3.0,
    "batch_size_per_gpu": 32, "epochs": 25, "num_workers": 2, "saveckp_freq": 100,
}
MODEL_SHAPE_KEYS = ("arch", "depth", "embed_dim", "num_heads", "patch_size", "gamma", "drop_path_rate")


def arch_family(arch: str) -> str:
    """``vit``, ``resnet`` or ``convnext`` for a registry arch; ValueError listing the accepted ones otherwise."""
    for family, archs in (("vit", VIT_ARCHS), ("resnet", RESNET_ARCHS), ("convnext", CONVNEXT_ARCHS)):
        if arch in archs:
            return family
    raise ValueError(f"--arch must be one of {', '.join(list_archs())}; got {arch!r}")


def float_or_none(s: Any) -> float | None | str:
    """``--gamma``: a positive float, the string None (no power), or ``default`` (the architecture's own value)."""
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    v = str(s).strip()
    if v.lower() in {"none", "null"}:
        return None
    if v.lower() == "default":
        return "default"
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid gamma {s!r}: give a number such as 1.25, None or default") from None


def _int_or_none(s: Any) -> int | None:
    if s is None or (isinstance(s, str) and s.strip().lower() in {"none", "null", ""}):
        return None
    try:
        return int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None


@dataclass
class TrainConfig:
    # --- model ---
    arch: str = "resnet50"
    pooling: str = "simpool"
    gamma: float | None | str = "default"
    patch_size: int = 16
    out_dim: int = 60000
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    use_bn_in_head: bool = True
    drop_path_rate: float | None = None  # None = per family (DROP_PATH_DEFAULTS)
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    pretrained_weights: str | None = None
    checkpoint_key: str = "teacher"
    # --- teacher temperature ---
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 50
    # --- optimisation ---
    precision: str | None = None  # None = auto: fp32 on CPU, bf16 on CUDA
    weight_decay: float = 1e-6
    weight_decay_end: float = 1e-6
    clip_grad: float = 0.0
    clip_grad_mode: str = "per_tensor"
    batch_size_per_gpu: int = 64
    epochs: int = 100
    freeze_last_layer: int = 1
    lr: float = 0.3
    warmup_epochs: int = 10
    min_lr: float = 0.0048
    optimizer: str = "lars"
    # --- multi-crop ---
    global_crops_scale: tuple[float, float] = (0.14, 1.0)
    local_crops_number: int = 6
    local_crops_scale: tuple[float, float] = (0.05, 0.14)
    global_crops_size: int = 224
    local_crops_size: int = 96
    aug_backend: str = "fast"
    # --- data ---
    data_path: str | None = None
    subset: int = -1
    synthetic_size: int = 64
    synthetic_per_class: int | None = None
    num_workers: int | None = None  # None = min(10, CPU count)
    loader_nice: int | None = None  # None = 19 on CPU, 0 on CUDA
    # --- run ---
    output_dir: str = "."
    saveckp_freq: int = 20
    seed: int = 0
    max_iters: int | None = None
    log_every: int = 10
    # --- periodic k-NN ---
    eval_every: int = 5
    nb_knn: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    # --- processes ---
    dist_url: str = "env://"
    backend: str | None = None  # None = nccl on CUDA, gloo on CPU
    local_rank: int = 0  # accepted for the official command lines; the environment decides
    config: str | None = None

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.normalize()

    def normalize(self) -> "TrainConfig":
        """Coerce types (YAML gives lists, strings) and check every value; raises ValueError naming the fix."""
        def err(msg: str) -> None:
            raise ValueError(msg)

        for name in ("norm_last_layer", "use_bn_in_head"):
            try:
                setattr(self, name, bool_flag(getattr(self, name)))
            except argparse.ArgumentTypeError as e:
                err(f"--{name}: {e}")
        try:
            self.gamma = float_or_none(self.gamma)
        except argparse.ArgumentTypeError as e:
            err(f"--gamma: {e}")
        if isinstance(self.gamma, float) and not self.gamma > 0:
            err(f"--gamma must be > 0, None or default; got {self.gamma}")
        for name in ("patch_size", "out_dim", "batch_size_per_gpu", "epochs", "local_crops_number", "saveckp_freq",
                     "seed", "subset", "synthetic_size", "log_every", "eval_every", "warmup_epochs",
                     "warmup_teacher_temp_epochs", "freeze_last_layer", "global_crops_size", "local_crops_size",
                     "local_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                err(f"--{name} must be an integer; got {v!r}")
            try:
                iv = int(v)
                if isinstance(v, float) and iv != v:
                    raise ValueError
            except ValueError:
                err(f"--{name} must be an integer; got {v!r}")
            setattr(self, name, iv)
        for name in ("depth", "embed_dim", "num_heads", "synthetic_per_class", "num_workers", "max_iters",
                     "loader_nice"):
            try:
                setattr(self, name, _int_or_none(getattr(self, name)))
            except argparse.ArgumentTypeError as e:
                err(f"--{name}: {e}")
        for name in ("momentum_teacher", "warmup_teacher_temp", "teacher_temp", "weight_decay", "weight_decay_end",
                     "clip_grad", "lr", "min_lr", "drop_path_rate", "temperature"):
            v = getattr(self, name)
            if v is None and name == "drop_path_rate":
                continue  # resolved from --arch below
            try:
                if isinstance(v, bool):
                    raise ValueError
                setattr(self, name, float(v))
            except (TypeError, ValueError):
                err(f"--{name} must be a number; got {v!r}")
        for name in ("global_crops_scale", "local_crops_scale"):
            v = getattr(self, name)
            try:
                t = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                err(f"--{name} must be two numbers LOW HIGH; got {v!r}")
            if len(t) != 2 or not (0.0 < t[0] <= t[1] <= 1.0):
                err(f"--{name} must be two numbers 0 < LOW <= HIGH <= 1; got {v!r}")
            setattr(self, name, t)
        try:
            self.nb_knn = tuple(int(k) for k in (self.nb_knn if isinstance(self.nb_knn, (list, tuple)) else [self.nb_knn]))
        except (TypeError, ValueError):
            err(f"--nb_knn must be positive integers; got {self.nb_knn!r}")
        if not self.nb_knn or min(self.nb_knn) < 1:
            err(f"--nb_knn must be positive integers; got {self.nb_knn!r}")

        # choices; then the per-architecture defaults (written resolved into config.yaml and checkpoints)
        self.arch = str(self.arch)
        family = arch_family(self.arch)
        self.pooling = str(self.pooling).lower()
        if self.pooling == "official":
            self.pooling = "cls" if family == "vit" else "gap"
        if self.gamma == "default":
            self.gamma = DEFAULT_GAMMA_VIT if family == "vit" else DEFAULT_GAMMA_CNN
        if self.drop_path_rate is None:
            self.drop_path_rate = DROP_PATH_DEFAULTS[family]
        self.aug_backend = str(self.aug_backend).lower()
        if self.aug_backend not in AUG_BACKENDS:
            err(f"--aug_backend must be one of {', '.join(AUG_BACKENDS)}; got {self.aug_backend!r}")
        if self.precision is not None:
            self.precision = str(self.precision).lower()
            if self.precision not in PRECISIONS:
                err(f"--precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        self.optimizer = str(self.optimizer).lower()
        if self.optimizer not in OPTIMIZERS:
            err(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.clip_grad_mode not in ("per_tensor", "global"):
            err(f"--clip_grad_mode must be per_tensor or global; got {self.clip_grad_mode!r}")
        if self.backend is not None and self.backend not in ("nccl", "gloo"):
            err(f"--backend must be nccl or gloo; got {self.backend!r}")

        # ranges
        positive = ("patch_size", "out_dim", "batch_size_per_gpu", "epochs", "saveckp_freq", "log_every",
                    "global_crops_size", "local_crops_size", "synthetic_size")
        for name in positive:
            if getattr(self, name) < 1:
                err(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("depth", "embed_dim", "num_heads", "synthetic_per_class", "max_iters"):
            v = getattr(self, name)
            if v is not None and v < 1:
                err(f"--{name} must be >= 1 (or left out); got {v}")
        if self.num_workers is not None and self.num_workers < 0:
            err(f"--num_workers must be >= 0; got {self.num_workers}")
        if self.loader_nice is not None and not 0 <= self.loader_nice <= 19:
            err(f"--loader_nice must be a niceness increment in 0..19; got {self.loader_nice}")
        for name in ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                     "eval_every"):
            if getattr(self, name) < 0:
                err(f"--{name} must be >= 0; got {getattr(self, name)}")
        if self.subset == 0 or self.subset < -1:
            err(f"--subset must be -1 (all images) or a positive number of images per class; got {self.subset}")
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "warmup_teacher_temp",
                     "drop_path_rate"):
            if getattr(self, name) < 0:
                err(f"--{name} must be >= 0; got {getattr(self, name)}")
        for name in ("teacher_temp", "temperature"):
            if not getattr(self, name) > 0:
                err(f"--{name} must be > 0; got {getattr(self, name)}")
        if self.warmup_teacher_temp == 0:
            err("--warmup_teacher_temp must be > 0 (it divides the teacher logits)")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            err(f"--momentum_teacher must be in [0, 1]; got {self.momentum_teacher}")
        if not self.drop_path_rate < 1.0:
            err(f"--drop_path_rate must be in [0, 1); got {self.drop_path_rate}")
        if self.warmup_epochs > self.epochs:
            err(f"--warmup_epochs ({self.warmup_epochs}) must be <= --epochs ({self.epochs}); "
                f"pass a smaller --warmup_epochs (e.g. --warmup_epochs {max(0, self.epochs // 10)})")
        if self.warmup_teacher_temp_epochs > self.epochs:
            err(f"--warmup_teacher_temp_epochs ({self.warmup_teacher_temp_epochs}) must be <= --epochs "
                f"({self.epochs}); pass a smaller --warmup_teacher_temp_epochs (the official default 50 assumes "
                f"100 epochs)")
        if self.data_path is not None:
            self.data_path = str(self.data_path)
        self.output_dir = str(self.output_dir)
        return self

    # ------------------------------------------------------------------
    def resolve(self, device_type: str = "cpu") -> "TrainConfig":
        """Fill the device-dependent defaults (precision, workers, loader priority, backend) in place."""
        if self.precision is None:
            self.precision = "bf16" if device_type == "cuda" else "fp32"
        if self.num_workers is None:
            self.num_workers = min(10, available_cpus())
        if self.loader_nice is None:
            self.loader_nice = 0 if device_type == "cuda" else 19
        if self.backend is None:
            self.backend = "nccl" if device_type == "cuda" else "gloo"
        return self

    @property
    def use_fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for YAML files and checkpoints."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d = _fold_aliases(d, "config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; valid keys are the training flags: "
                             f"{', '.join(sorted(names))}")
        return cls(**d)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


# ----------------------------------------------------------------------
def _fold_aliases(d: dict[str, Any], where: str) -> dict[str, Any]:
    """``mode`` → ``pooling`` and ``use_fp16`` → ``precision`` within one layer (YAML or command line)."""
    d = dict(d)
    d.pop("local-rank", None)
    if "mode" in d:
        mode = d.pop("mode")
        if mode not in MODES:
            raise ValueError(f"--mode must be official or simpool (in {where}); got {mode!r}")
        pooling = MODES[mode]
        ok = ("cls", "gap", "official") if mode == "official" else (pooling,)
        if "pooling" in d and str(d["pooling"]).lower() not in ok:
            raise ValueError(f"--mode {mode} means --pooling {'cls/gap' if mode == 'official' else pooling}, but --pooling {d['pooling']} was also given "
                             f"(in {where}); give only one of them")
        d["pooling"] = str(d.get("pooling", pooling)).lower()
    if "use_fp16" in d:
        try:
            fp16 = bool_flag(d.pop("use_fp16"))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--use_fp16: {e}") from None
        if "precision" in d and d["precision"] is not None:
            if fp16 and d["precision"] != "fp16":
                raise ValueError(f"--use_fp16 True contradicts --precision {d['precision']} (in {where}); "
                                 f"give only one of them")
        else:  # --use_fp16 False given explicitly = DINO/SimPool's full fp32
            d["precision"] = "fp16" if fp16 else "fp32"
    return d


_DEFAULTS = TrainConfig.__new__(TrainConfig)  # defaults without validation, for help texts
for _f in dataclasses.fields(TrainConfig):
    setattr(_DEFAULTS, _f.name, _f.default)


def _fmt_default(d: Any) -> str:
    return " ".join(str(x) for x in d) if isinstance(d, (list, tuple)) else str(d)


def _h(text: str, name: str | None = None) -> str:
    """Help text with the default and, where it differs, the embedded-dataset default."""
    if name is None:
        return text
    d = getattr(_DEFAULTS, name)
    e = EMBEDDED_DEFAULTS.get(name, d)
    emb = "" if e == d else f" [embedded: {_fmt_default(e)}]"
    return f"{text} (default: {_fmt_default(d)}){emb}"


def build_parser() -> argparse.ArgumentParser:
    """All flags default to SUPPRESS so that only those given on the command line override the YAML recipe."""
    p = OneLineErrorParser(
        "dino-simpool-train",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("recipe")
    g.add_argument("--config", type=str, help="YAML recipe (keys = flag names); flags on the command line override it")

    g = p.add_argument_group("model")
    g.add_argument("--arch", type=str, help=_h(f"backbone: {', '.join(list_archs())} [DINO: vit_small]", "arch"))
    g.add_argument("--mode", type=str, choices=sorted(MODES), help="official SimPool alias: official = DINO's pooling (--pooling cls for "
                   "ViTs, gap for CNNs), simpool = --pooling simpool")
    g.add_argument("--pooling", type=str, help=_h("pooling of the backbone (any registry name; cls = DINO's [CLS] for "
                                                 "ViTs / global average for CNNs). A departure: the official "
                                                 "--mode defaults to official (DINO's pooling); here SimPool is the "
                                                 "default, so pass --mode official for the baseline", "pooling"))
    g.add_argument("--gamma", type=float_or_none, help="SimPool's gamma: a number, None (no power) or default "
                   "(default: default = 1.25 for ViTs, 2.0 for CNNs, the paper's values, written resolved into "
                   "config.yaml; the official CLI default is 2.0 but its ViT teacher silently used 1.25; here "
                   "student and teacher always share gamma)")
    g.add_argument("--patch_size", type=int, help=_h("ViT patch size", "patch_size"))
    g.add_argument("--out_dim", type=int, help=_h("dimensionality of the DINO head output [DINO: 65536]", "out_dim"))
    g.add_argument("--norm_last_layer", type=bool_flag, help=_h("weight-normalise the head's last layer (True/False)",
                                                                "norm_last_layer"))
    g.add_argument("--momentum_teacher", type=float, help=_h("base EMA momentum of the teacher; cosine to 1",
                                                             "momentum_teacher"))
    g.add_argument("--use_bn_in_head", type=bool_flag, help=_h("BatchNorm in the head MLP (True/False) [DINO: False]",
                                                               "use_bn_in_head"))
    g.add_argument("--drop_path_rate", type=float, help="stochastic depth of the student (teacher: 0) (default: "
                   "per family: 0.1 for ViTs as DINO, 0.0 for ResNets and 0.4 for ConvNeXts as the official models; "
                   "the official CLI passes 0.1 to every arch but its ResNet has no drop-path and its ConvNeXt "
                   "hard-codes 0.4) [embedded: 0.0]")
    g.add_argument("--depth", type=_int_or_none,
                   help=_h("ViT depth override (tiny models; None = the arch's)", "depth"))
    g.add_argument("--embed_dim", type=_int_or_none,
                   help=_h("ViT width override (tiny models; None = the arch's)", "embed_dim"))
    g.add_argument("--num_heads", type=_int_or_none,
                   help=_h("ViT heads override (tiny models; None = the arch's)", "num_heads"))
    g.add_argument("--pretrained_weights", type=str, help="start the student (and its teacher copy) backbone from these "
                   "weights: a DINO/SimPool checkpoint, an export of this project or a timm file, loaded strictly "
                   "(any mismatch stops the run); the head starts fresh. A resume from --output_dir wins over it")
    g.add_argument("--checkpoint_key", type=str, help=_h("entry of a training checkpoint given to --pretrained_weights",
                                                         "checkpoint_key"))

    g = p.add_argument_group("teacher temperature")
    g.add_argument("--warmup_teacher_temp", type=float, help=_h("initial teacher temperature", "warmup_teacher_temp"))
    g.add_argument("--teacher_temp", type=float, help=_h("final teacher temperature [DINO: 0.04]", "teacher_temp"))
    g.add_argument("--warmup_teacher_temp_epochs", type=int, help=_h("teacher temperature warm-up [DINO: 0]",
                                                                     "warmup_teacher_temp_epochs"))

    g = p.add_argument_group("optimisation")
    g.add_argument("--precision", type=str, choices=PRECISIONS, help="fp32, bf16 (autocast) or fp16 (autocast + "
                   "GradScaler) (default: fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--use_fp16", type=bool_flag, help="DINO's alias: True = --precision fp16 (default: False) "
                   "[DINO: True]")
    g.add_argument("--weight_decay", type=float, help=_h("initial weight decay [DINO: 0.04]", "weight_decay"))
    g.add_argument("--weight_decay_end", type=float, help=_h("final weight decay (cosine) [DINO: 0.4]",
                                                             "weight_decay_end"))
    g.add_argument("--clip_grad", type=float, help=_h("max gradient norm, 0 = off [DINO: 3.0]", "clip_grad"))
    g.add_argument("--clip_grad_mode", type=str, choices=("per_tensor", "global"),
                   help=_h("per_tensor (DINO: each parameter's norm) or global", "clip_grad_mode"))
    g.add_argument("--batch_size_per_gpu", type=int, help=_h("images per process", "batch_size_per_gpu"))
    g.add_argument("--epochs", type=int, help=_h("training epochs", "epochs"))
    g.add_argument("--freeze_last_layer", type=int, help=_h("epochs during which the head's last layer is frozen",
                                                            "freeze_last_layer"))
    g.add_argument("--lr", type=float, help=_h("peak lr at batch 256 (scaled by global batch / 256) [DINO: 5e-4]",
                                               "lr"))
    g.add_argument("--warmup_epochs", type=int, help=_h("linear lr warm-up epochs", "warmup_epochs"))
    g.add_argument("--min_lr", type=float, help=_h("final lr (cosine) [DINO: 1e-6]", "min_lr"))
    g.add_argument("--optimizer", type=str, choices=OPTIMIZERS, help=_h("[DINO: adamw]", "optimizer"))

    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_scale", type=float, nargs=2, help=_h("scale range of the 2 global crops [DINO: 0.4 1]",
                                                                        "global_crops_scale"))
    g.add_argument("--local_crops_number", type=int, help=_h("number of local crops [DINO: 8]", "local_crops_number"))
    g.add_argument("--local_crops_scale", type=float, nargs=2, help=_h("scale range of the local crops [DINO: 0.05 0.4]",
                                                                       "local_crops_scale"))
    g.add_argument("--global_crops_size", type=int, help=_h("global crop side in pixels", "global_crops_size"))
    g.add_argument("--local_crops_size", type=int, help=_h("local crop side in pixels", "local_crops_size"))
    g.add_argument("--aug_backend", type=str, choices=AUG_BACKENDS,
                   help=_h("multi-crop implementation: fast (batched kernels, same recipe and rates, ~3x faster on "
                           "small crops) or v2 (stock torchvision.transforms.v2)", "aug_backend"))

    g = p.add_argument_group("data")
    g.add_argument("--data_path", type=str, help="ImageFolder root with train/ (and val/ for k-NN); left out = the "
                   "embedded procedural dataset, and every flag not given takes its [embedded: ...] value (the "
                   "demo's configuration; the model-shape ones only if --arch is not given)")
    g.add_argument("--subset", type=int, help=_h("keep the first K images per class, -1 = all", "subset"))
    g.add_argument("--synthetic_size", type=int, help=_h("image side of the embedded dataset", "synthetic_size"))
    g.add_argument("--synthetic_per_class", type=_int_or_none, help="images per class of the embedded dataset "
                   "(default: the dataset's own, 200) [embedded: 100]")
    g.add_argument("--num_workers", type=int,
                   help="data-loading processes per rank (default: min(10, CPUs of this task)) [embedded: 2]")
    g.add_argument("--loader_nice", type=_int_or_none,
                   help="niceness added to the loader workers (default: 19 on CPU, so that the step's threads win "
                        "the cores and the workers fill their idle time; 0 on CUDA, where the step runs on the GPU)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", type=str, help=_h("checkpoints, log.txt, config.yaml, tb/", "output_dir"))
    g.add_argument("--saveckp_freq", type=int, help=_h("also keep checkpoint{epoch:04}.pth every N epochs",
                                                       "saveckp_freq"))
    g.add_argument("--seed", type=int, help=_h("random seed", "seed"))
    g.add_argument("--max_iters", type=_int_or_none, help="stop (with a checkpoint) after N total iterations")
    g.add_argument("--log_every", type=int, help=_h("print a progress line every N iterations", "log_every"))

    g = p.add_argument_group("periodic k-NN")
    g.add_argument("--eval_every", type=int, help=_h("k-NN on val every N epochs (and at the last); 0 = off",
                                                     "eval_every"))
    g.add_argument("--nb_knn", type=int, nargs="+", help=_h("k values", "nb_knn"))
    g.add_argument("--temperature", type=float, help=_h("k-NN temperature", "temperature"))

    g = p.add_argument_group("processes")
    g.add_argument("--dist_url", type=str, help=_h("env:// (detected master) or tcp://, file://", "dist_url"))
    g.add_argument("--backend", type=str, choices=("nccl", "gloo"), help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   help="accepted for old launchers and ignored (the environment gives the rank)")
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line (+ optional YAML recipe) → validated ``TrainConfig``.

    Bad flag syntax exits 2 via argparse; bad values raise ValueError (the CLI turns them into exit 2).
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    cli = _fold_aliases(vars(ns), "the command line")
    layer: dict[str, Any] = {}
    if cli.get("config"):
        layer = load_yaml_layer(cli["config"])
    return TrainConfig.from_dict(with_embedded_defaults({**layer, **cli}))


def with_embedded_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (the flags set by the command line or a recipe) plus, when it has no ``data_path``, the
    ``EMBEDDED_DEFAULTS`` for every flag it leaves out (the model-shape ones only when ``arch`` is left out too)."""
    if given.get("data_path") is not None:
        return dict(given)
    base = dict(EMBEDDED_DEFAULTS)
    if "arch" in given:
        for k in MODEL_SHAPE_KEYS:
            base.pop(k, None)
    return {**base, **given}


def load_yaml_layer(path: str | os.PathLike) -> dict[str, Any]:
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
    return _fold_aliases(data, str(path))


def load_recipe(path: str | os.PathLike) -> TrainConfig:
    """A recipe YAML alone (no command line) → ``TrainConfig``; same result as ``parse_config(["--config", path])``
    but for the ``config`` field."""
    return TrainConfig.from_dict(with_embedded_defaults(load_yaml_layer(path)))
