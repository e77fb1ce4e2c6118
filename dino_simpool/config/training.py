"""``TrainConfig``: every training flag, written once.

Each field is one flag of DINO's / SimPool's ``main_dino.py`` (same names and meanings) or one of this project's.
Its default is SimPool's ``main_dino.py`` default (``--preset simpool``); ``dino=`` is DINO's where it differs
(``--preset dino``); ``embedded=`` is the value used without ``--data_path`` (the demo's few-minute CPU
configuration). Deliberate departures, each stated in its help: ``--gamma`` defaults to the architecture's own value
(1.25 ViT, 2.0 CNN; the official CLI says 2.0 but then gives the ViT teacher 1.25), ``--precision`` defaults to fp32 on
CPU and bf16 on CUDA under both presets, ``--num_workers`` is capped at the task's CPUs, ``--backend`` follows the
device, ``--drop_path_rate`` defaults per family (0.1 ViT as DINO, 0.0 ResNet and 0.4 ConvNeXt as the official
models), and under ``--preset simpool`` the pooling defaults to simpool (official: ``--mode official``).
"""
from __future__ import annotations


import dataclasses
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dino_simpool.cli import available_cpus
from dino_simpool.config.aliases import fold_aliases
from dino_simpool.config.fields import (above, at_least, check_fields, coerce_fields, flag_fields, flag_group, plain,
                                        scale_range, within)
from dino_simpool.config.presets import Provenance, describe
from dino_simpool.models.backbones import arch_family, list_archs
from dino_simpool.models.options import Gamma, resolve_gamma, resolve_pooling

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd", "lars")
AUG_BACKENDS = ("fast", "v2")
PRESETS = ("dino", "simpool")
# --drop_path_rate when not given: DINO's 0.1 for ViTs; the official ResNet-50 has no stochastic depth; the official
# SimPool ConvNeXt hard-codes 0.4 (student and teacher; here the student only, as every teacher)
DROP_PATH_DEFAULTS = {"vit": 0.1, "resnet": 0.0, "convnext": 0.4}
# --help's groups, in this order
GROUPS = ("recipe", "model", "teacher temperature", "optimisation", "multi-crop", "data", "run", "periodic k-NN",
          "processes")

recipe, model, temp, optim, crops, data, run, knn, procs = (flag_group(g) for g in GROUPS)
positive = at_least(1)
non_negative = at_least(0)


def _non_empty(v: str | None) -> str | None:
    if v is not None and not v.strip():
        return f"must be a weights file; got {v!r} (leave the flag out to start from random weights)"
    return None


def _subset(v: int) -> str | None:
    return None if v == -1 or v > 0 else f"must be -1 (all images) or a positive number of images per class; got {v}"


def _family(arch: str) -> str:
    try:
        return arch_family(arch)
    except ValueError as e:
        raise ValueError(f"--arch must be one of the supported architectures ({e})") from None


def _patch_of(arch: str, patch_size: int) -> int:
    """A timm ViT name carries its patch size (``vit_small_patch8_224``): it replaces the default 16; another
    explicit ``--patch_size`` contradicts the name."""
    m = re.search(r"_patch(\d+)", arch)
    if m is None or int(m.group(1)) == patch_size:
        return patch_size
    if patch_size != 16:
        raise ValueError(f"--arch {arch} has patch size {m.group(1)}, but --patch_size {patch_size} was given; leave "
                         f"--patch_size out")
    return int(m.group(1))


def _niceness(v: int | None) -> str | None:
    return None if v is None or 0 <= v <= 19 else f"must be a niceness increment in 0..19; got {v}"


def _knn_ks(v: tuple[int, ...]) -> str | None:
    return None if v and min(v) >= 1 else f"must be positive integers; got {list(v)}"


@dataclass
class TrainConfig:
    # --- model ---
    arch: str = model("resnet50", f"backbone: {', '.join(list_archs())}", dino="vit_small", embedded="vit_tiny",
                      shape=True)
    pooling: str = model(
        "simpool", "pooling of the backbone (any registry name; cls = DINO's [CLS] for ViTs, gap = global average for "
        "CNNs, official = the family's own of these two). With --preset simpool, a departure: the official --mode "
        "defaults to official (DINO's pooling); here SimPool is the default, so pass --mode official for the "
        "baseline", dino="official", embedded="simpool")
    gamma: Gamma = model(
        "default", "SimPool's gamma: a number, None (no power) or default", embedded=1.25, shape=True,
        default_text="default = 1.25 for ViTs, 2.0 for CNNs, the paper's values, written resolved into config.yaml; "
        "the official CLI default is 2.0 but its ViT teacher silently used 1.25; here student and teacher always "
        "share gamma")
    patch_size: int = model(16, "ViT patch size", embedded=4, shape=True, check=positive)
    out_dim: int = model(60000, "dimensionality of the DINO head output", dino=65536, embedded=64, check=positive)
    norm_last_layer: bool = model(True, "weight-normalise the head's last layer (True/False)", embedded=True)
    momentum_teacher: float = model(0.996, "base EMA momentum of the teacher; cosine to 1", embedded=0.99,
                                    check=within(0.0, 1.0))
    use_bn_in_head: bool = model(True, "BatchNorm in the head MLP (True/False)", dino=False, embedded=False)
    drop_path_rate: float | None = model(
        None, "stochastic depth of the student (teacher: 0)", embedded=0.0, shape=True,
        check=within(0.0, 1.0, high_open=True),
        default_text="per family: 0.1 for ViTs as DINO, 0.0 for ResNets and 0.4 for ConvNeXts as the official models; "
        "the official CLI passes 0.1 to every arch but its ResNet has no drop-path and its ConvNeXt hard-codes 0.4")
    depth: int | None = model(None, "ViT depth override (tiny models; None = the arch's)", embedded=2, shape=True,
                              check=at_least(1, optional=True))
    embed_dim: int | None = model(None, "ViT width override (tiny models; None = the arch's)", embedded=64,
                                  shape=True, check=at_least(1, optional=True))
    num_heads: int | None = model(None, "ViT heads override (tiny models; None = the arch's)", embedded=2, shape=True,
                                  check=at_least(1, optional=True))
    pretrained_weights: str | None = model(
        None, "start the student (and its teacher copy) backbone from these weights: a DINO/SimPool checkpoint, an "
        "export of this project or a timm file, loaded strictly (any mismatch stops the run); the head starts fresh. "
        "A resume from --output_dir wins over it", check=_non_empty)
    checkpoint_key: str = model("teacher", "entry of a training checkpoint given to --pretrained_weights")
    # --- teacher temperature ---
    warmup_teacher_temp: float = temp(0.04, "initial teacher temperature", embedded=0.02,
                                      check=above(0, " (it divides the teacher logits)"))
    teacher_temp: float = temp(0.07, "final teacher temperature", dino=0.04, embedded=0.04, check=above(0))
    warmup_teacher_temp_epochs: int = temp(50, "teacher temperature warm-up", dino=0, embedded=3, check=non_negative)
    # --- optimisation ---
    precision: str | None = optim(
        None, "fp32, bf16 (autocast) or fp16 (autocast + GradScaler)", choices=PRECISIONS,
        default_text="fp32 on CPU, bf16 on CUDA, under both presets: DINO's --use_fp16 True default is not followed, "
        "as bf16 has fp16's speed on GPUs without its overflows and fp16 on a CPU is several times slower than fp32; "
        "pass --use_fp16 True for DINO's fp16")
    compile: bool = optim(False, "torch.compile the student's and teacher's backbone and head (True/False); the first "
                          "steps then take longer (compilation), the state dict keys stay the same", affects_result=False,
                          default_text="False: off on CPU, where it was slower for these small steps, and not yet "
                          "measured on a GPU (benchmarks/train_step.py)")
    weight_decay: float = optim(1e-6, "initial weight decay", dino=0.04, embedded=0.04, check=non_negative)
    weight_decay_end: float = optim(1e-6, "final weight decay (cosine)", dino=0.4, embedded=0.1, check=non_negative)
    clip_grad: float = optim(0.0, "max gradient norm, 0 = off", dino=3.0, embedded=3.0, check=non_negative)
    clip_grad_mode: str = optim("per_tensor", "per_tensor (DINO: each parameter's norm) or global",
                                choices=("per_tensor", "global"))
    batch_size_per_gpu: int = optim(64, "images per process", embedded=32, check=positive)
    epochs: int = optim(100, "training epochs", embedded=25, check=positive)
    freeze_last_layer: int = optim(1, "epochs during which the head's last layer is frozen", embedded=1,
                                   check=non_negative)
    lr: float = optim(0.3, "peak lr at batch 256 (scaled by global batch / 256)", dino=0.0005, embedded=0.008,
                      check=non_negative)
    warmup_epochs: int = optim(10, "linear lr warm-up epochs", embedded=2, check=non_negative)
    min_lr: float = optim(0.0048, "final lr (cosine)", dino=1e-6, embedded=1e-5, check=non_negative)
    optimizer: str = optim("lars", "adamw, sgd or lars", choices=OPTIMIZERS, dino="adamw", embedded="adamw")
    # --- multi-crop ---
    global_crops_scale: tuple[float, float] = crops((0.14, 1.0), "scale range of the 2 global crops", dino=(0.4, 1.0),
                                                    embedded=(0.5, 1.0), check=scale_range)
    local_crops_number: int = crops(6, "number of local crops", dino=8, embedded=2, check=non_negative)
    local_crops_scale: tuple[float, float] = crops((0.05, 0.14), "scale range of the local crops", dino=(0.05, 0.4),
                                                   embedded=(0.2, 0.5), check=scale_range)
    global_crops_size: int = crops(224, "global crop side in pixels", embedded=32, check=positive)
    local_crops_size: int = crops(96, "local crop side in pixels", embedded=16, check=positive)
    aug_backend: str = crops("fast", "multi-crop implementation: fast (batched kernels, same recipe and rates, ~3x "
                             "faster on small crops) or v2 (stock torchvision.transforms.v2)", choices=AUG_BACKENDS)
    aug_pipeline: str = crops(
        "auto", "where DINO's multi-crop runs. cpu: the loader workers do all of it (stage 2 batched per worker batch). "
        "device: the workers decode and cut uint8 crops; the training device runs colour jitter, grayscale, blur, "
        "solarize and normalise on the whole batch. device_decode: the workers only read JPEG bytes and draw the "
        "random parameters; the device decodes them (nvjpeg on CUDA) and cuts the crops; other formats are decoded by "
        "the workers. auto: device on CUDA, cpu on CPU (the fastest measured there). All random parameters are drawn "
        "in the workers from the per-sample seeded generator, so every choice is reproducible and a resume is "
        "bit-identical on CPU", choices=("auto", "cpu", "device", "device_decode"), affects_result=False)
    # --- data ---
    data_path: str | None = data(
        None, "ImageFolder root with train/ (and val/ for k-NN); left out = the embedded procedural dataset, and every "
        "flag not given takes its [embedded: ...] value (the demo's configuration; the model-shape ones only if "
        "--arch is not given)")
    subset: int = data(-1, "keep the first K images per class, -1 = all", check=_subset)
    synthetic_size: int = data(64, "image side of the embedded dataset", embedded=64, check=positive)
    synthetic_per_class: int | None = data(None, "images per class of the embedded dataset", embedded=100,
                                           check=at_least(1, optional=True), default_text="the dataset's own, 200")
    num_workers: int | None = data(None, "data-loading processes per rank", embedded=2, affects_result=False,
                                   check=at_least(0, optional=True), default_text="min(10, CPUs of this task)")
    loader_nice: int | None = data(
        None, "niceness added to the loader workers", affects_result=False, check=_niceness,
        default_text="19 on CPU, so that the step's threads win the cores and the workers fill their idle time; 0 on "
        "CUDA, where the step runs on the GPU")
    # --- run ---
    output_dir: str = run(".", "checkpoints, log.txt, config.yaml, tb/", affects_result=False)
    saveckp_freq: int = run(20, "also keep checkpoint{epoch:04}.pth every N epochs", embedded=100,
                            affects_result=False, check=positive)
    seed: int = run(0, "random seed")
    max_iters: int | None = run(None, "stop (with a checkpoint) after N total iterations; 0 writes the initial "
                                "weights (the random-init baseline of an SSL comparison) and stops",
                                affects_result=False, check=at_least(0, optional=True))
    log_every: int = run(10, "print a progress line every N iterations", affects_result=False, check=positive)
    resume_force: bool = run(False, "resume from --output_dir's checkpoint even when flags that change the result "
                             "(arch, data, batch, lr, epochs, seed, ...) differ from the stored run's (True/False); "
                             "without it such a resume stops and lists the differences", affects_result=False)
    # --- periodic k-NN ---
    eval_every: int = knn(5, "k-NN on val every N epochs (and at the last); 0 = off", affects_result=False,
                          check=non_negative)
    nb_knn: tuple[int, ...] = knn((10, 20, 100, 200), "k values", affects_result=False, check=_knn_ks)
    temperature: float = knn(0.07, "k-NN temperature", affects_result=False, check=above(0))
    # --- processes ---
    dist_url: str = procs("env://", "env:// (detected master) or tcp://, file://", affects_result=False)
    backend: str | None = procs(None, "process-group backend", choices=("nccl", "gloo"), affects_result=False,
                                default_text="nccl on CUDA, gloo on CPU")
    local_rank: int = procs(0, "accepted for old launchers and ignored (the environment gives the rank)",
                            aliases=("--local-rank",), affects_result=False)
    num_threads: int | None = procs(
        None, "CPU threads of each training process (torch.set_num_threads), set by the command line before any "
        "work; on a shared machine fewer threads than cores is often faster", affects_result=False,
        check=at_least(1, optional=True), default_text="torch's own")
    # --- recipe ---
    config: str | None = recipe(None, "YAML recipe (keys = flag names); flags on the command line override it",
                                affects_result=False)
    preset: str = recipe(
        "simpool", "defaults of the flags not given, with a --data_path: dino = DINO's main_dino.py ([DINO: ...] "
        "below), simpool = SimPool's main_dino.py ((default: ...) below; a ResNet-50 LARS recipe)", choices=PRESETS,
        affects_result=False, default_text="simpool if --mode is given (every SimPool README command passes it), else "
        "dino (DINO has no --mode), so that both repositories' README commands mean what they mean at home")

    # how the command line chose the defaults (set by parse_config; not a flag, not compared, not saved)
    provenance: Provenance | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.normalize()

    def normalize(self) -> "TrainConfig":
        """Coerce types (YAML gives lists, strings), resolve the per-family defaults, check every value; raises
        ValueError naming the flag and the fix."""
        coerce_fields(self)
        family = _family(self.arch)
        self.pooling = resolve_pooling(self.pooling, family)
        self.gamma = resolve_gamma(self.gamma, family)
        if self.drop_path_rate is None:
            self.drop_path_rate = DROP_PATH_DEFAULTS[family]
        self.patch_size = _patch_of(self.arch, self.patch_size)
        check_fields(self)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup_epochs ({self.warmup_epochs}) must be <= --epochs ({self.epochs}); pass a "
                             f"smaller --warmup_epochs (e.g. --warmup_epochs {max(0, self.epochs // 10)})")
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise ValueError(f"--warmup_teacher_temp_epochs ({self.warmup_teacher_temp_epochs}) must be <= --epochs "
                             f"({self.epochs}); pass a smaller --warmup_teacher_temp_epochs (SimPool's default 50 "
                             f"assumes 100 epochs)")
        return self

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

    def describe_preset(self) -> str:
        """One start-up line: which defaults the run took (preset or embedded) and their main values."""
        return describe(self)

    # ------------------------------------------------------------------ plain data: YAML files and checkpoints
    def to_dict(self) -> dict[str, Any]:
        """Every flag field, tuples as lists."""
        return {f.name: plain(getattr(self, f.name)) for f in flag_fields(type(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A mapping of flag names (a config.yaml, a checkpoint's config, merged layers) → validated config; DINO's
        and SimPool's aliases (``use_fp16``, ``mode``) are accepted, unknown keys are refused."""
        d = fold_aliases(d, "config")
        mode = d.pop("mode", None)
        names = {f.name for f in flag_fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; valid keys are the training flags: "
                             f"{', '.join(sorted(names))}")
        if mode is not None:  # --mode official is the family's own pooling: cls for ViTs, gap for CNNs
            d["pooling"] = resolve_pooling(d.get("pooling"), _family(str(d.get("arch", cls.arch))), mode)
        return cls(**d)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """config.yaml, written atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path
