"""The supervised trainer's configuration: one dataclass whose fields carry their flags, help and embedded default.

Every option is declared once, in ``SupervisedConfig`` (``option(...)`` puts the flag names, the help text, the parser
and the embedded-dataset default into the field's metadata); ``build_parser``, ``from_dict`` (YAML recipes) and the
``--help`` text are derived from it. (This moves onto ``dino_simpool/config``'s field machinery once that lands.)

The flag names are the official SimPool fork's (timm's ``train.py``): ``--model``, ``--gp token|avg|simpool``,
``--gamma``, ``--batch-size``/``-b``, ``--opt``, ``--lr``, ``--sched``, ``--mixup``, ``--model-ema``, ``--data-dir``,
``--output``... with their timm defaults; the DINO trainer's spellings (``--arch``, ``--pooling``, ``--data_path``,
``--output_dir``, ``--num_workers``) are accepted as aliases. ``--config recipe.yaml`` (keys = the field names, i.e.
timm's ``args.yaml`` names) sets values that flags on the command line override. With no ``--data-dir`` (the
embedded dataset) every option not given takes its ``[embedded: ...]`` value: the demo's few-minute CPU configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from dino_simpool.cli import OneLineErrorParser, available_cpus, bool_flag, positive_int
from dino_simpool.config.layers import read_yaml_mapping
from dino_simpool.models.backbones import arch_family, list_archs
from dino_simpool.models.options import parse_gamma, resolve_gamma, resolve_pooling
from dino_simpool.pooling import get_pooling_entry

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")
# --gp (timm's global_pool names) -> this project's pooling names; any other pooling registry name passes through
GP_ALIASES = {"token": "cls", "avg": "gap"}
NORM_ORDERS = ("auto", "ssl", "supervised")
_NO = object()  # "no embedded default": the field keeps its own default on the embedded dataset
_TIMM_VIT = re.compile(r"^(?:vit|deit)_(tiny|small|base)_patch(\d+)_(\d+)$")
# embedded-dataset values of the model shape, dropped when --model is given (they describe the tiny demo ViT)
MODEL_SHAPE_FIELDS = ("model", "depth", "embed_dim", "num_heads", "patch_size", "img_size")


def _none_or(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def f(s: Any) -> Any:
        if s is None or (isinstance(s, str) and s.strip().lower() in {"none", "null", ""}):
            return None
        try:
            return parse(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid value {s!r}") from None
    f.__name__ = getattr(parse, "__name__", "value")
    return f


def _gamma(s: Any) -> Any:
    try:
        return parse_gamma(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def option(default: Any, *flags: str, help: str, embedded: Any = _NO, type: Callable | None = None,
        nargs: str | int | None = None, choices: Sequence[str] | None = None, switch: bool = False) -> Any:
    """A config field: its default, command-line ``flags`` (the first is the canonical one), help text, value parser,
    and the value it takes on the embedded dataset. ``switch``: a boolean that is on when given alone (timm's
    ``store_true``) and also accepts ``True``/``False``."""
    meta = dict(flags=flags, help=help, embedded=embedded, type=bool_flag if switch else type, nargs=nargs,
                choices=choices, switch=switch)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class SupervisedConfig:
    # --- data ---
    data_dir: str | None = option(None, "--data-dir", "--data_dir", "--data_path", type=str,
                               help="ImageFolder root with train/ and val/ (ImageNet layout); left out = the embedded "
                                    "procedural dataset, where every option not given takes its [embedded] value")
    subset: int = option(-1, "--subset", type=int, help="keep the first K training images of each class, -1 = all")
    num_classes: int | None = option(None, "--num-classes", type=_none_or(int),
                                  help="classifier outputs (default: the number of class folders of train/)")
    synthetic_size: int = option(64, "--synthetic-size", type=int, help="image side of the embedded dataset")
    synthetic_per_class: int = option(200, "--synthetic-per-class", type=int, embedded=100,
                                   help="training images per class of the embedded dataset (val: a quarter)")
    img_size: int = option(224, "--img-size", "--input-size", type=int, embedded=64,
                        help="training crop / validation input side in pixels")
    crop_pct: float = option(0.875, "--crop-pct", type=float, embedded=1.0,
                          help="validation: resize to img_size / crop_pct, then centre-crop img_size")
    interpolation: str = option("bicubic", "--interpolation", type=str, help="validation resize interpolation")
    train_interpolation: str = option("random", "--train-interpolation", type=str,
                                   help="training crop interpolation (random = bilinear or bicubic)")
    scale: list = option([0.08, 1.0], "--scale", type=float, nargs=2, embedded=[0.35, 1.0],
                      help="RandomResizedCrop scale range")
    ratio: list = option([3 / 4, 4 / 3], "--ratio", type=float, nargs=2, help="RandomResizedCrop aspect-ratio range")
    hflip: float = option(0.5, "--hflip", type=float, help="horizontal-flip probability")
    color_jitter: float = option(0.4, "--color-jitter", type=float, help="colour jitter (used only without --aa)")
    aa: str | None = option(None, "--aa", type=_none_or(str), embedded="rand-m9-mstd0.5-inc1",
                         help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); None = off")
    reprob: float = option(0.0, "--reprob", type=float, embedded=0.25, help="random-erasing probability")
    remode: str = option("pixel", "--remode", type=str, choices=("pixel", "rand", "const"), help="random-erasing fill")
    recount: int = option(1, "--recount", type=int, help="random-erasing count")
    workers: int | None = option(None, "--workers", "-j", "--num_workers", type=_none_or(int), embedded=2,
                              help="data-loading processes per rank (default: min(4, CPUs of this task))")
    num_threads: int | None = option(None, "--num_threads", "--num-threads", type=_none_or(positive_int),
                                  help="CPU threads of each training process (torch.set_num_threads, "
                                       "OMP_NUM_THREADS), set before any work (default: torch's own); on a shared "
                                       "machine fewer threads than cores is often faster")
    # --- model ---
    model: str = option("resnet50", "--model", "--arch", type=str, embedded="vit_tiny",
                     help=f"backbone: {', '.join(list_archs())}, or a timm ViT name such as "
                          f"vit_small_patch16_224 / deit_small_patch16_224 (sets --patch-size)")
    gp: str | None = option(None, "--gp", "--pooling", type=_none_or(str), embedded="simpool",
                         help="pooling: token ([CLS], ViTs), avg (global average), simpool, or any pooling of the "
                              "registry (default: the model's own: token for ViTs, avg for CNNs)")
    gamma: Any = option("default", "--gamma", type=_gamma, embedded=1.25,
                     help="SimPool's gamma: a number, None (no power) or default (1.25 for ViTs, 2.0 for CNNs)")
    patch_size: int | None = option(None, "--patch-size", "--patch_size", type=_none_or(int), embedded=8,
                                 help="ViT patch size (default: from a timm --model name, else 16)")
    depth: int | None = option(None, "--depth", type=_none_or(int), embedded=2, help="ViT depth override (tiny models)")
    embed_dim: int | None = option(None, "--embed-dim", "--embed_dim", type=_none_or(int), embedded=64,
                                help="ViT width override (tiny models)")
    num_heads: int | None = option(None, "--num-heads", "--num_heads", type=_none_or(int), embedded=2,
                                help="ViT heads override (tiny models)")
    norm_order: str = option("auto", "--norm-order", type=str, choices=NORM_ORDERS,
                          help="ViT: where the final LayerNorm sits. auto = as the official supervised fork: simpool "
                               "on the normalised tokens (supervised), gap normalised after averaging (ssl, timm's "
                               "fc_norm)")
    drop: float = option(0.0, "--drop", type=float, help="dropout on the pooled vector, before the classifier")
    drop_path: float = option(0.0, "--drop-path", type=_none_or(float), help="stochastic depth rate")
    # --- optimiser ---
    opt: str = option("sgd", "--opt", type=str, embedded="adamw", help="timm optimizer name (create_optimizer_v2)")
    opt_eps: float | None = option(None, "--opt-eps", type=_none_or(float), help="optimizer epsilon (None = its own)")
    opt_betas: list | None = option(None, "--opt-betas", type=float, nargs="+", help="optimizer betas (None = its own)")
    momentum: float = option(0.9, "--momentum", type=float, help="SGD momentum")
    weight_decay: float = option(2e-5, "--weight-decay", type=float, embedded=0.05,
                              help="weight decay (not on biases, norms and position embeddings)")
    clip_grad: float | None = option(None, "--clip-grad", type=_none_or(float), help="gradient clipping, None = off")
    clip_mode: str = option("norm", "--clip-mode", type=str, choices=("norm", "value", "agc"), help="clipping mode")
    lr: float | None = option(None, "--lr", type=_none_or(float), embedded=3e-3,
                           help="learning rate, as is (default: None = --lr-base x global batch / --lr-base-size)")
    lr_base: float = option(0.1, "--lr-base", type=float, help="base lr at --lr-base-size, used when --lr is None")
    lr_base_size: int = option(256, "--lr-base-size", type=int, help="batch size of --lr-base")
    lr_base_scale: str = option("", "--lr-base-scale", type=str, choices=("", "linear", "sqrt"),
                             help="scaling of --lr-base with the batch ('' = sqrt for Ada*/Lamb, else linear)")
    # --- schedule ---
    sched: str = option("cosine", "--sched", type=str, choices=SCHEDULERS, help="timm lr scheduler (create_scheduler_v2)")
    sched_on_updates: bool = option(False, "--sched-on-updates", switch=True, embedded=True,
                                 help="step the schedule every iteration instead of every epoch")
    epochs: int = option(300, "--epochs", type=int, embedded=10, help="training epochs (cooldown epochs added)")
    warmup_epochs: int = option(5, "--warmup-epochs", type=int, embedded=1, help="linear lr warm-up epochs")
    warmup_lr: float = option(1e-5, "--warmup-lr", type=float, help="lr at the start of the warm-up")
    warmup_prefix: bool = option(False, "--warmup-prefix", switch=True, help="warm-up outside the decay schedule")
    min_lr: float = option(0.0, "--min-lr", type=float, embedded=1e-5, help="lower lr bound of the decay")
    cooldown_epochs: int = option(0, "--cooldown-epochs", type=int, help="epochs at --min-lr after the schedule")
    decay_epochs: float = option(90, "--decay-epochs", type=float, help="step schedule: decay interval")
    decay_milestones: list = option([90, 180, 270], "--decay-milestones", type=int, nargs="+",
                                 help="multistep schedule: decay epochs")
    decay_rate: float = option(0.1, "--decay-rate", type=float, help="step/multistep decay factor (poly: the power)")
    # --- regularisation ---
    smoothing: float = option(0.1, "--smoothing", type=float, help="label smoothing")
    mixup: float = option(0.0, "--mixup", type=float, embedded=0.2, help="mixup alpha (on if > 0)")
    cutmix: float = option(0.0, "--cutmix", type=float, help="cutmix alpha (on if > 0)")
    cutmix_minmax: list | None = option(None, "--cutmix-minmax", type=float, nargs=2,
                                     help="cutmix box ratio range (overrides --cutmix's alpha)")
    mixup_prob: float = option(1.0, "--mixup-prob", type=float, help="probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, "--mixup-switch-prob", type=float,
                                   help="probability of cutmix instead of mixup when both are on")
    mixup_mode: str = option("batch", "--mixup-mode", type=str, choices=("batch", "pair", "elem"),
                          help="mixup parameters per batch, pair or element")
    mixup_off_epoch: int = option(0, "--mixup-off-epoch", type=int, help="turn mixup/cutmix off from this epoch (0 = never)")
    aug_splits: int = option(0, "--aug-splits", type=int,
                             help="augmentation splits (0 = off, else >= 2): each image is given once clean and "
                                  "N-1 times augmented again (timm's AugMixDataset); with --jsd-loss / --split-bn")
    jsd_loss: bool = option(False, "--jsd-loss", "--jsd", switch=True,
                            help="Jensen-Shannon divergence over the splits + CE on the clean one (timm's "
                                 "JsdCrossEntropy); needs --aug-splits")
    split_bn: bool = option(False, "--split-bn", switch=True,
                            help="separate BatchNorm statistics per split (timm's SplitBatchNorm2d; the checkpoints "
                                 "keep the main ones under the usual keys); needs --aug-splits")
    model_ema: bool = option(False, "--model-ema", switch=True, embedded=True,
                          help="keep an EMA of the weights (timm ModelEmaV3), validated and saved as model_ema")
    model_ema_decay: float = option(0.9998, "--model-ema-decay", type=float, embedded=0.95, help="EMA decay per step")
    # --- run ---
    batch_size: int = option(128, "--batch-size", "-b", "--batch_size_per_gpu", type=int, embedded=64,
                          help="images per process")
    validation_batch_size: int | None = option(None, "--validation-batch-size", "-vb", type=_none_or(int),
                                            help="validation images per process (default: --batch-size)")
    precision: str | None = option(None, "--precision", type=_none_or(str), choices=(*PRECISIONS, None),
                                help="fp32, bf16 (autocast) or fp16 (autocast + GradScaler) (default: fp32, or "
                                     "--amp's dtype)")
    amp: bool = option(False, "--amp", switch=True, help="timm's flag: mixed precision with --amp-dtype")
    amp_dtype: str = option("float16", "--amp-dtype", type=str, choices=("float16", "bfloat16"),
                         help="dtype of --amp")
    output: str = option("output/supervised", "--output", "--output_dir", "--output-dir", type=str,
                      help="the run's folder: checkpoint.pth (resume point), checkpoint_best.pth, log.txt, "
                           "config.yaml, tb/ (timm adds an experiment sub-folder; this does not)")
    seed: int = option(42, "--seed", type=int, embedded=0, help="random seed")
    log_interval: int = option(50, "--log-interval", "--log_every", type=int, embedded=10,
                            help="progress line every N iterations")
    saveckp_freq: int = option(0, "--saveckp-freq", "--saveckp_freq", type=int,
                            help="also keep checkpoint{epoch:04}.pth every N epochs (0 = never)")
    max_iters: int | None = option(None, "--max-iters", "--max_iters", type=_none_or(int),
                                help="stop (with a resumable checkpoint) after N total iterations")
    dist_bn: str = option("reduce", "--dist-bn", type=_none_or(str), choices=("reduce", "broadcast", "", None),
                       help="after each epoch, average (reduce) or broadcast the BatchNorm statistics over ranks")
    backend: str | None = option(None, "--backend", "--dist-backend", type=_none_or(str),
                              choices=("nccl", "gloo", None), help="process group backend (default: nccl on CUDA, "
                                                                   "gloo on CPU)")
    dist_url: str = option("env://", "--dist-url", "--dist_url", type=str, help="env:// or tcp://, file://")
    attention_images: int = option(0, "--attention-images", type=int, embedded=6,
                                help="after training, draw the attention of this many val images into "
                                     "<output>/attention.png (embedded dataset only; 0 = none)")

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def family(self) -> str:
        return arch_family(self.arch)

    @property
    def arch(self) -> str:
        return resolve_model_name(self.model)[0]

    @property
    def pooling(self) -> str:
        return resolve_gp(self.gp, self.family)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Bad values raise ValueError naming the flag and the fix; resolves what depends on the model."""
        arch, patch, size = resolve_model_name(self.model)
        family = arch_family(arch)
        self.pooling  # noqa: B018  (validates --gp for the family)
        if patch is not None:
            if self.patch_size not in (None, patch):
                raise ValueError(f"--model {self.model} has patch {patch} but --patch-size {self.patch_size} was given")
            self.patch_size = patch
        if family == "vit" and self.patch_size is None:
            self.patch_size = 16
        if family != "vit":
            for name in ("patch_size", "depth", "embed_dim", "num_heads"):
                if getattr(self, name) is not None:
                    raise ValueError(f"--{name.replace('_', '-')} is a ViT option; --model {self.model} does not take "
                                     f"it (leave it out)")
        self.gamma = resolve_gamma(self.gamma, family)
        self.precision = resolve_precision(self.precision, self.amp, self.amp_dtype)
        positive = {"batch_size": self.batch_size, "epochs": self.epochs, "img_size": self.img_size,
                    "synthetic_size": self.synthetic_size, "synthetic_per_class": self.synthetic_per_class,
                    "log_interval": self.log_interval}
        for name, v in positive.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; got {v!r}")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a probability in [0, 1]; got {getattr(self, name)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"--smoothing must be in [0, 1); got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"--mixup and --cutmix are Beta alphas >= 0 (0 = off); got {self.mixup}, {self.cutmix}")
        if self.mixup_active and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair each image with its mirror in the batch: --batch-size must be even; "
                             f"got {self.batch_size}")
        if self.aug_splits not in (0,) and self.aug_splits < 2:
            raise ValueError(f"--aug-splits must be 0 (off) or >= 2; got {self.aug_splits}")
        if (self.jsd_loss or self.split_bn) and self.aug_splits < 2:
            raise ValueError("--jsd-loss and --split-bn work on augmentation splits: add --aug-splits 3 (or 2)")
        if self.aug_splits and self.mixup_active:
            raise ValueError("--aug-splits cannot be combined with --mixup/--cutmix (mixing would pair images across "
                             "the splits; timm refuses it too); drop one of them")
        if not 0.0 <= self.drop < 1.0 or not 0.0 <= (self.drop_path or 0.0) < 1.0:
            raise ValueError(f"--drop and --drop-path are rates in [0, 1); got {self.drop}, {self.drop_path}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"--crop-pct must be in (0, 1]; got {self.crop_pct}")
        if not 0.0 <= self.model_ema_decay < 1.0:
            raise ValueError(f"--model-ema-decay must be in [0, 1); got {self.model_ema_decay}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.warmup_epochs < 0 or self.cooldown_epochs < 0 or self.saveckp_freq < 0 or self.attention_images < 0:
            raise ValueError("--warmup-epochs, --cooldown-epochs, --saveckp-freq and --attention-images must be >= 0")
        if self.subset != -1 and self.subset < 1:
            raise ValueError(f"--subset must be -1 (all) or a positive number of images per class; got {self.subset}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0; got {self.workers}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"--num-classes must be >= 2; got {self.num_classes}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"--max-iters must be >= 1; got {self.max_iters}")
        if self.dist_bn not in ("reduce", "broadcast", "", None):
            raise ValueError(f"--dist-bn must be reduce, broadcast or '' (off); got {self.dist_bn!r}")
        if self.pooling not in ("cls", "gap"):
            get_pooling_entry(self.pooling)  # an unknown name raises ValueError listing the registry
        if self.workers is None:
            self.workers = min(4, available_cpus())

    def resolved_norm_order(self) -> str:
        """ViTs: ``supervised`` (final norm on the tokens, then the pooling) for poolings other than cls/gap, as the
        official supervised fork; ``ssl`` for gap (timm's fc_norm after averaging) and cls. CNNs: ``ssl``."""
        if self.family != "vit":
            return "ssl"
        if self.norm_order != "auto":
            return self.norm_order
        return "ssl" if self.pooling in ("cls", "gap") else "supervised"

    def backbone_kwargs(self) -> dict[str, Any]:
        """``build_backbone`` arguments of this run's backbone."""
        kw: dict[str, Any] = dict(arch=self.arch, pooling=self.pooling, gamma=self.gamma, img_size=self.img_size,
                                  drop_path_rate=float(self.drop_path or 0.0))  # img_size: CNNs only record it
        if self.family == "vit":
            kw.update(patch_size=self.patch_size, depth=self.depth, embed_dim=self.embed_dim,
                      num_heads=self.num_heads, norm_order=self.resolved_norm_order())
        return kw

    # ------------------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SupervisedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; valid keys are the field names of "
                             f"dino_simpool.supervised.config.SupervisedConfig: {', '.join(sorted(names))}")
        return cls(**{k: _coerce(k, v) for k, v in d.items()})

    def save_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


FIELDS = {f.name: f for f in dataclasses.fields(SupervisedConfig)}


def _coerce(name: str, value: Any) -> Any:
    """A YAML value through the field's own parser (so ``gamma: None`` or ``lr: 5e-4`` read as on the command
    line); ValueError naming the key."""
    meta = FIELDS[name].metadata
    parse, nargs = meta["type"], meta["nargs"]
    if parse is None or value is None and name != "gamma":
        return value
    try:
        if nargs is not None:
            if not isinstance(value, (list, tuple)):
                raise argparse.ArgumentTypeError(f"expected a list, got {value!r}")
            return [parse(v) for v in value]
        return parse(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ValueError(f"config key {name}: {e}") from None


def resolve_model_name(name: str) -> tuple[str, int | None, int | None]:
    """``--model`` -> (arch, patch size or None, image size or None): this project's arch names, or timm's ViT names
    ``vit_small_patch16_224`` / ``deit_small_patch16_224`` (the same architecture)."""
    m = _TIMM_VIT.match(str(name))
    if m:
        return f"vit_{m[1]}", int(m[2]), int(m[3])
    arch_family(name)  # ValueError listing the archs
    return str(name), None, None


def resolve_gp(gp: str | None, family: str) -> str:
    """``--gp`` -> pooling: token -> cls, avg -> gap, None -> the model's own (cls for ViTs, gap for CNNs)."""
    if gp is None:
        return "cls" if family == "vit" else "gap"
    name = GP_ALIASES.get(str(gp).strip().lower(), str(gp).strip().lower())
    if name == "cls" and family != "vit":
        raise ValueError(f"--gp token is the ViT's class token; a {family} has none: use --gp avg or --gp simpool")
    return resolve_pooling(name, family)


def resolve_precision(precision: str | None, amp: bool, amp_dtype: str) -> str:
    from_amp = ("bf16" if amp_dtype == "bfloat16" else "fp16") if amp else None
    if precision is None:
        return from_amp or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if from_amp is not None and precision != from_amp:
        raise ValueError(f"--amp (--amp-dtype {amp_dtype}) means --precision {from_amp}, but --precision {precision} "
                         f"was given; give only one of them")
    return precision


# ---------------------------------------------------------------------------------------------------- parsing
def _help(f: dataclasses.Field) -> str:
    meta, d = f.metadata, (f.default_factory() if f.default is dataclasses.MISSING else f.default)  # type: ignore
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    emb = "" if meta["embedded"] is _NO else f" [embedded: {show(meta['embedded'])}]"
    return f"{meta['help']} (default: {show(d)}){emb}".replace("%", "%%")


class _Once(argparse.Action):
    """Aliases of one option given with different values (``--output a --output_dir b``) are an error, not
    last-one-wins: a launcher that appends ``--output_dir`` must not silently move the run elsewhere."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest) and getattr(namespace, self.dest) != values:
            parser.error(f"{option_string} {values} contradicts {getattr(namespace, self.dest)} given earlier for "
                         f"the same option ({'/'.join(self.option_strings)}); give it once (dino-simpool-launch "
                         f"passes --output_dir)")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to SUPPRESS, so that only the flags given override the recipe and the embedded values."""
    p = OneLineErrorParser("dino-simpool-supervised", description=__doc__.split("\n\n")[0],
                           argument_default=argparse.SUPPRESS)
    p.add_argument("--config", "-c", type=str, help="YAML recipe (keys = the field names, as timm's args.yaml); "
                                                    "flags on the command line override it")
    p.add_argument("data_dir_pos", nargs="?", metavar="DATA_DIR", help="timm's positional dataset root (= --data-dir)")
    for f in dataclasses.fields(SupervisedConfig):
        m = f.metadata
        kw: dict[str, Any] = dict(dest=f.name, help=_help(f))
        if m["switch"]:
            kw.update(nargs="?", const=True, type=bool_flag, metavar="BOOL")
        else:
            kw.update(type=m["type"])
            if m["nargs"] is not None:
                kw["nargs"] = m["nargs"]
            if m["choices"] is not None:
                kw["choices"] = [c for c in m["choices"] if c is not None] if m["type"] is str else None
        if f.name == "output":
            kw["action"] = _Once
        p.add_argument(*m["flags"], **kw)
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help="ignored (old launchers)")
    return p


def load_yaml_layer(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe's options (keys as timm's args.yaml: ``weight_decay``, ``weight-decay`` or ``--weight-decay``)."""
    return {k.replace("-", "_"): v for k, v in read_yaml_mapping(path).items()}


def with_embedded_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus, when it has no ``data_dir``, the embedded value of every option it leaves out (the model-shape
    ones only when ``model`` is left out too)."""
    if given.get("data_dir") is not None:
        return dict(given)
    skip = MODEL_SHAPE_FIELDS if "model" in given else ()
    base = {f.name: f.metadata["embedded"] for f in dataclasses.fields(SupervisedConfig)
            if f.metadata["embedded"] is not _NO and f.name not in skip}
    if "model" in given and arch_family(resolve_model_name(given["model"])[0]) != "vit":
        base.pop("gamma", None)  # the embedded gamma is the tiny ViT's
    return {**base, **given}


def given_options(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The options that the command line and its ``--config`` recipe set (flags win), before any default."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)
    pos = ns.pop("data_dir_pos", None)
    if pos is not None:
        if ns.get("data_dir") not in (None, pos):
            raise ValueError(f"the dataset is given twice ({pos} and --data-dir {ns['data_dir']}); give it once")
        ns["data_dir"] = pos
    layer = load_yaml_layer(ns.pop("config")) if ns.get("config") else {}
    return {**layer, **ns}


def parse_config(argv: Sequence[str] | None = None) -> SupervisedConfig:
    """Command line (+ ``--config`` recipe) -> validated config. Bad syntax exits 2 (argparse); bad values raise
    ValueError."""
    return SupervisedConfig.from_dict(with_embedded_defaults(given_options(argv)))


def load_recipe(path: str | os.PathLike) -> SupervisedConfig:
    """A recipe alone (no command line), as ``parse_config(["--config", path])``."""
    return SupervisedConfig.from_dict(with_embedded_defaults(load_yaml_layer(path)))
