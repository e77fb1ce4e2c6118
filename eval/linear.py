"""Linear probe: DINO's linear evaluation protocol, plus many heads (lr × feature set) in one frozen pass.

    dino-simpool-linear --pretrained_weights out/checkpoint.pth --data_path /imagenet --output_dir out/linear
    python -m eval.linear --lrs 0.0001 0.001 0.01 0.1 --feature_sets last1 last4 last4_avgpool ...

The DINO protocol (``eval_linear.py``): frozen backbone in eval mode under ``no_grad``; one ``nn.Linear`` with weights
N(0, 0.01) and bias 0; SGD momentum 0.9, weight decay 0, lr × (global batch)/256, cosine over the epochs (stepped per
epoch, eta_min 0); cross-entropy; train RandomResizedCrop + flip, val Resize + CenterCrop; DDP over the head;
top-1/top-5 every ``--val_freq`` epochs; the best and the last epoch are reported. ``output_dir/checkpoint.pth`` is
written atomically every epoch and training resumes from it automatically.

Beyond DINO: ``--lrs`` × ``--feature_sets`` trains one head per pair on the same frozen forward pass (each head is
its own SGD param group with its own lr scaling and cosine); ``--cached_features`` extracts centre-crop features
once and trains the heads on the cached tensors (a fast sweep mode, *not* the full protocol: no augmentation);
``--train_crop_scale LOW HIGH`` (DINO: 0.08 1.0) and ``--train_aug dino|flip|none`` change the train augmentation for
small images, where RandomResizedCrop of a 32 px image costs accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchvision import transforms as T

from dino_simpool import distributed as D
from dino_simpool.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_atomic, strip_module_prefix
from dino_simpool.cli import OneLineErrorParser, available_cpus, bool_flag, print_error
from dino_simpool.data import DataError, build_dataset
from dino_simpool.data.loader import iterate_closing, make_loader
from dino_simpool.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from dino_simpool.dino.augment import eval_transform
from dino_simpool.dino.step import agree
from dino_simpool.evaluation.features import extract_features

from .linear_heads import (
    FeatureExtractor,
    FlatFeatures,
    LinearHeads,
    backbone_pooling,
    cosine_lr,
    default_feature_set,
    make_specs,
    parse_feature_set,
    topk_correct,
)
from . import model_args

TRAIN_AUGS = ("dino", "flip", "none")
DINO_TRAIN_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, which DINO's eval_linear.py uses

CACHED_NOTE = (
    "NOTE: --cached_features trains the heads on features extracted once from centre crops, without the "
    "RandomResizedCrop/flip augmentation: a fast sweep mode, not the full DINO linear protocol."
)


# ----------------------------------------------------------------------------------------------------------- flags
def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser("dino-simpool-linear",
                           description="Linear probe of a frozen backbone (DINO protocol + many heads).")
    model_args.add_model_args(p)
    f = p.add_argument_group("features")
    f.add_argument("--n_last_blocks", type=int, default=None,
                   help="concatenate the last n blocks' [CLS]/pooled vectors (default: 4 for a cls ViT, as DINO; 1, the "
                        "single pooled vector, for SimPool and other poolings, as the SimPool paper, and for CNNs)")
    f.add_argument("--avgpool_patchtokens", type=bool_flag, nargs="?", const=True, default=False,
                   help="append the mean patch token of the last block (ViTs)")
    f.add_argument("--feature_sets", nargs="+", default=None,
                   help="heads' feature sets: last<N> or last<N>_avgpool (default: from --n_last_blocks/--avgpool_patchtokens)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--lr", type=float, default=0.001, help="base lr (scaled by global batch / 256)")
    t.add_argument("--lrs", type=float, nargs="+", default=None, help="several base lrs: one head each (replaces --lr)")
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--batch_size_per_gpu", type=int, default=128)
    t.add_argument("--val_freq", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cached_features", action="store_true",
                   help="extract centre-crop features once and train on them (fast sweeps; not the full protocol)")
    t.add_argument("--evaluate", action="store_true", help="validation only, from a saved head")
    t.add_argument("--linear_weights", default="", help="head checkpoint for --evaluate (default: output_dir/checkpoint.pth)")
    t.add_argument("--stop_after_epochs", type=int, default=0, help=argparse.SUPPRESS)  # simulate preemption (tests)
    d = p.add_argument_group("data")
    d.add_argument("--data_path", default=None, help="folder with train/ and val/ (ImageFolder); none = embedded synthetic dataset")
    d.add_argument("--num_labels", type=int, default=None, help="default: the number of classes of the dataset")
    d.add_argument("--subset", type=int, default=-1, help="images per class from the train split (-1 = all)")
    d.add_argument("--resize", type=int, default=256, help="val: resize the short side to this")
    d.add_argument("--crop", type=int, default=224, help="train RandomResizedCrop and val CenterCrop size")
    d.add_argument("--train_aug", default=None, choices=TRAIN_AUGS,
                   help="train augmentation: dino = RandomResizedCrop(--crop, scale=--train_crop_scale) + flip (DINO's "
                        "protocol); flip = the val transform (--resize, centre --crop) + flip; none = the val "
                        "transform (small images, where random crops of a 32 px image cost accuracy); default: dino")
    d.add_argument("--train_crop_scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help=f"area fraction range of the train RandomResizedCrop (--train_aug dino); default: DINO's "
                        f"{DINO_TRAIN_CROP_SCALE[0]} {DINO_TRAIN_CROP_SCALE[1]}")
    d.add_argument("--synthetic_size", type=int, default=64, help="image size of the embedded dataset")
    d.add_argument("--synthetic_per_class", type=int, default=None,
                   help="embedded dataset: train images per class (val gets a quarter; default 200 / 50)")
    d.add_argument("--num_workers", type=int, default=min(10, available_cpus()),
                   help="data-loading processes (default: min(10, the CPUs this task may use))")
    d.add_argument("--output_dir", default=".")
    s = p.add_argument_group("distributed")
    s.add_argument("--dist_url", default="env://")
    s.add_argument("--backend", default=None, choices=["nccl", "gloo"], help="default: nccl with CUDA, else gloo")
    s.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="ignored (torchrun / torch.distributed.launch set LOCAL_RANK)")
    p.add_num_threads_flag()
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and fill ``lrs``; normalise ``feature_sets`` when given. Raises ValueError."""
    for name in ("epochs", "batch_size_per_gpu", "val_freq", "crop", "resize", "synthetic_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.synthetic_per_class is not None and args.synthetic_per_class < 1:
        raise ValueError(f"--synthetic_per_class must be >= 1; got {args.synthetic_per_class}")
    if args.crop > args.resize:
        raise ValueError(f"--crop {args.crop} is larger than --resize {args.resize}; use e.g. --resize 36 --crop 32")
    if args.cached_features and (args.train_aug not in (None, "none") or args.train_crop_scale is not None):
        raise ValueError("--cached_features trains on centre-crop features extracted once: --train_aug and "
                         "--train_crop_scale do not apply; drop them, or drop --cached_features")
    if args.train_crop_scale is not None:
        if args.train_aug not in (None, "dino"):
            raise ValueError(f"--train_crop_scale sets the RandomResizedCrop of --train_aug dino; --train_aug "
                             f"{args.train_aug} has no random crop: drop one of the two")
        lo, hi = args.train_crop_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"--train_crop_scale LOW HIGH must satisfy 0 < LOW <= HIGH <= 1 (area fractions); got "
                             f"{lo:g} {hi:g} (DINO: {DINO_TRAIN_CROP_SCALE[0]} {DINO_TRAIN_CROP_SCALE[1]})")
    args.train_aug = args.train_aug or ("none" if args.cached_features else "dino")
    if args.train_aug == "dino":
        args.train_crop_scale = tuple(float(v) for v in (args.train_crop_scale or DINO_TRAIN_CROP_SCALE))
    if args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0; got {args.num_workers}")
    if args.n_last_blocks is not None and args.n_last_blocks < 1:
        raise ValueError(f"--n_last_blocks must be >= 1; got {args.n_last_blocks}")
    if args.num_labels is not None and args.num_labels < 1:
        raise ValueError(f"--num_labels must be >= 1; got {args.num_labels}")
    lrs = args.lrs if args.lrs else [args.lr]
    bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
    if bad:
        raise ValueError(f"learning rates must be positive and finite; got {bad}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs repeats a value: {lrs}")
    args.lrs = [float(x) for x in lrs]
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0; got {args.weight_decay}")
    if args.feature_sets:
        args.feature_sets = [parse_feature_set(s).name for s in args.feature_sets]
        if len(set(args.feature_sets)) != len(args.feature_sets):
            raise ValueError(f"--feature_sets repeats a name: {args.feature_sets}")
    return args


def feature_sets_for(args, is_vit: bool, pooling: str = "cls") -> list[str]:
    """``--feature_sets`` if given, else one set from ``--n_last_blocks`` and ``--avgpool_patchtokens``.

    ``--n_last_blocks`` defaults to 4 for a ``cls`` ViT (DINO's ViT-S/16 protocol) and to 1 otherwise: a SimPool (or
    any other pooling) ViT is probed on its single pooled vector, as the SimPool paper does, and a CNN has only one."""
    if args.feature_sets:
        return list(args.feature_sets)
    default_n = 4 if is_vit and pooling == "cls" else 1
    n = args.n_last_blocks if args.n_last_blocks is not None else default_n
    return [default_feature_set(n, bool(args.avgpool_patchtokens))]


# ---------------------------------------------------------------------------------------------- model and data
def build_model(args: argparse.Namespace) -> nn.Module:
    """The frozen backbone the model flags name (:func:`eval.model_args.build_model`); randomly initialised ViTs get
    the probe's ``--crop`` as their position-embedding grid."""
    return model_args.build_model(args, img_size=args.crop, log=_print)


def train_transform(crop: int, resize: int, aug: str = "dino", scale: tuple[float, float] = DINO_TRAIN_CROP_SCALE):
    """The train split's transform (``--train_aug``): ``dino`` = DINO's RandomResizedCrop(crop, scale) + flip;
    ``flip`` = the val transform (Resize(resize), CenterCrop(crop)), then a random flip; ``none`` = the val transform."""
    if aug == "dino":
        return T.Compose([
            T.RandomResizedCrop(crop, scale=tuple(scale)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    if aug == "flip":
        return T.Compose([eval_transform(resize, crop), T.RandomHorizontalFlip()])  # flips the val crop itself
    if aug == "none":
        return eval_transform(resize, crop)
    raise ValueError(f"--train_aug must be one of {', '.join(TRAIN_AUGS)}; got {aug!r}")


def describe_train_aug(args) -> str:
    """One line for the start-up log: what the train split sees."""
    if args.cached_features:
        return "none (cached centre-crop features)"
    if args.train_aug == "dino":
        lo, hi = args.train_crop_scale
        return f"RandomResizedCrop({args.crop}, scale=({lo:g}, {hi:g})) + flip"
    val = f"Resize({args.resize}) + CenterCrop({args.crop})"
    return val + (" + flip" if args.train_aug == "flip" else "")


def build_datasets(args, train_aug: bool = True):
    """(train, val) datasets; train gets ``--train_aug``, or centre crops when ``train_aug`` is False."""
    val_tf = eval_transform(args.resize, args.crop)
    train_tf = train_transform(args.crop, args.resize, args.train_aug, args.train_crop_scale) if train_aug else val_tf
    syn_train, syn_val = {}, {}
    if not args.data_path and args.synthetic_per_class:
        syn_train = {"images_per_class": args.synthetic_per_class}
        syn_val = {"images_per_class": max(1, args.synthetic_per_class // 4)}
    train = build_dataset(args.data_path, "train", transform=train_tf, subset=args.subset,
                          image_size=args.synthetic_size, **syn_train)
    val = build_dataset(args.data_path, "val", transform=val_tf, image_size=args.synthetic_size, **syn_val)
    return train, val


def resolve_num_labels(num_labels: int | None, train, val) -> int:
    """The heads' output count: ``--num_labels``, else the dataset's class count; raises DataError (exit 2) when
    they differ, or when the two splits name different classes.

    Larger is refused, not warned about: the extra outputs can never be right, and until training has pushed them
    down (a short run, a small lr) one of them wins the argmax, so top-1 falls towards 0 % with nothing else amiss.
    Smaller would make labels index past the head (a deep cross-entropy index error, a device assert on CUDA)."""
    tr_classes, va_classes = getattr(train, "classes", None), getattr(val, "classes", None)
    if tr_classes is not None and va_classes is not None and len(train) and list(tr_classes) != list(va_classes):
        only_tr = sorted(set(tr_classes) - set(va_classes))
        only_va = sorted(set(va_classes) - set(tr_classes))
        detail = (f"only in train: {only_tr[:5]}" if only_tr else "") + ("; " if only_tr and only_va else "") \
            + (f"only in val: {only_va[:5]}" if only_va else "")
        raise DataError(f"the train and val splits have different classes ({len(tr_classes)} vs {len(va_classes)}"
                        f"{': ' + detail if detail else ', in another order'}), so their label indices do not match; "
                        f"give both splits the same class folders")
    n_classes = num_classes_of(train if len(train) else val)
    if num_labels is None:
        return n_classes
    if num_labels > n_classes:
        raise DataError(f"--num_labels {num_labels} is larger than the dataset's {n_classes} classes: the "
                        f"{num_labels - n_classes} extra outputs can never be right and push top-1 towards 0 %; "
                        f"leave --num_labels out (default: the class count) or pass --num_labels {n_classes}")
    if num_labels < n_classes:
        raise DataError(f"--num_labels {num_labels} is smaller than the dataset's {n_classes} classes: labels "
                        f"{num_labels}..{n_classes - 1} have no output; leave --num_labels out (default: the class "
                        f"count) or pass --num_labels {n_classes}")
    return num_labels


def label_range_problem(labels: torch.Tensor, num_labels: int, split: str) -> str | None:
    """The message when a (CPU) label tensor leaves ``0..num_labels-1`` (the dataset's labels do not match its class
    count), else None. Checked before the labels reach the device: there, cross-entropy would fail deep inside torch
    (an index error on CPU, a device-side assert on CUDA)."""
    if labels.numel() == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < num_labels:
        return None
    bad = lo if lo < 0 else hi
    return (f"the {split} split has label {bad}, outside 0..{num_labels - 1} ({num_labels} labels from the dataset's "
            f"class count or --num_labels): the dataset's labels do not match its classes; fix the dataset's "
            f"targets/classes")


def check_label_range(labels: torch.Tensor, num_labels: int, split: str) -> None:
    """:func:`label_range_problem` as a DataError."""
    problem = label_range_problem(labels, num_labels, split)
    if problem is not None:
        raise DataError(problem)


def num_classes_of(ds) -> int:
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes):
        return len(classes)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [int(ds[i][1]) for i in range(len(ds))]
    return int(max(int(t) for t in targets)) + 1


# -------------------------------------------------------------------------------------------------- samplers
class _ShardSampler(torch.utils.data.Sampler):
    """This rank's indices of ``order`` (a permutation), padded so every rank gets the same count (training)."""

    def __init__(self, order: list[int], rank: int, world: int, pad: bool):
        if pad and world > 1 and len(order) % world:
            order = order + order[: world - len(order) % world]
        self.idx = order[rank::world]

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def _order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


class ImageBatches:
    """Batches of (features dict, labels, problem) from images through the frozen extractor. ``problem``: None, or
    the message of a batch whose labels leave ``0..num_labels-1`` (its features are then not computed); the loops
    agree on it over ranks, so that every rank stops with it together."""

    def __init__(self, dataset, extractor, batch_size, num_workers, device, seed, shuffle, pad,
                 num_labels: int | None = None, split: str = "train"):
        self.dataset, self.extractor, self.bs, self.nw = dataset, extractor, batch_size, num_workers
        self.device, self.seed, self.shuffle, self.pad = device, seed, shuffle, pad
        self.num_labels, self.split = num_labels, split

    def __len__(self):
        return len(self.dataset)

    def epoch(self, epoch: int):
        rank, world = D.get_rank(), D.get_world_size()
        sampler = _ShardSampler(_order(len(self.dataset), self.seed, epoch, self.shuffle), rank, world, self.pad)
        seed = int(self.seed) * 7919 + int(epoch) * 31 + rank
        loader = make_loader(self.dataset, self.bs, self.nw, sampler=sampler, seed=seed,
                             pin_memory=self.device.type == "cuda", persistent=False)
        for imgs, labels, *_ in iterate_closing(loader):  # its workers end with the epoch, or when it is left
            labels = torch.as_tensor(labels)
            problem = label_range_problem(labels, self.num_labels, self.split) if self.num_labels else None
            if problem is not None:
                yield None, None, problem
                continue
            imgs = imgs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.extractor(imgs), labels, None


class CachedBatches:
    """Batches of (features dict, labels, None) from cached flat features (every rank holds all of them, their labels
    checked once after extraction)."""

    def __init__(self, flat, labels, extractor, piece_dims, batch_size, seed, shuffle, pad):
        self.flat, self.labels, self.extractor, self.piece_dims = flat, labels, extractor, piece_dims
        self.bs, self.seed, self.shuffle, self.pad = batch_size, seed, shuffle, pad

    def __len__(self):
        return len(self.labels)

    def epoch(self, epoch: int):
        rank, world = D.get_rank(), D.get_world_size()
        idx = torch.tensor(_ShardSampler(_order(len(self.labels), self.seed, epoch, self.shuffle), rank, world, self.pad).idx,
                           dtype=torch.long)
        for i in range(0, len(idx), self.bs):
            b = idx[i:i + self.bs].to(self.flat.device)
            yield self.extractor.split_flat(self.flat[b], self.piece_dims), self.labels[b], None


# ---------------------------------------------------------------------------------------------- train / eval
def _print(*a):
    if D.is_main_process():
        print(*a, flush=True)


def ranks_with(flags: list[bool | torch.Tensor], device: torch.device) -> list[list[int]]:
    """For each flag, the ranks where it is true, agreed over all ranks in one tiny all-reduce (as the trainer's
    :func:`~dino_simpool.dino.step.agree`). A failure seen on one rank (a non-finite loss, a bad label) then stops
    every rank at the same step, instead of the healthy ranks waiting in the next collective (DDP's gradient
    all-reduce, validation's counts) for the one that raised, until the process-group timeout."""
    table = torch.zeros(len(flags), D.get_world_size(), device=device)
    for i, f in enumerate(flags):
        table[i, D.get_rank()] = torch.as_tensor(f, dtype=torch.float32, device=device)
    return [[r for r, v in enumerate(row) if v > 0] for row in agree(table).tolist()]


def _stop_on(bad_loss: list[int], bad_data: list[int], problem: str | None, per_head, epoch: int, step: int,
             split: str) -> None:
    """Raise the agreed stop on every rank: DataError (exit 2) for bad labels, FloatingPointError (exit 3) for a
    non-finite loss; the rank that saw it adds the detail."""
    where = f" on rank(s) {{}} of {D.get_world_size()}" if D.is_dist() else ""
    if bad_data:
        raise DataError(problem if problem is not None else
                        f"the {split} split has labels outside the heads' range{where.format(bad_data)}; every rank "
                        f"stops here (the detail is on that rank's error line)")
    mine = f": per-head losses {per_head.tolist()}" if per_head is not None and D.get_rank() in bad_loss else ""
    raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}{where.format(bad_loss)}{mine}; "
                             f"every rank stops here (lower the lr?)")


def train_one_epoch(heads: nn.Module, core: LinearHeads, optimizer, batches, epoch: int, epochs: int, seed: int):
    for g in optimizer.param_groups:
        g["lr"] = cosine_lr(g["base_lr"], epoch, epochs)
    torch.manual_seed(int(seed) * 1009 + epoch)  # augmentation RNG in the main process (num_workers=0)
    heads.train()
    loss_sum = torch.zeros(len(core.specs), dtype=torch.float64)
    n = 0
    device = next(core.parameters()).device
    for step, (feats, labels, problem) in enumerate(batches.epoch(epoch)):
        loss = per_head = None
        if problem is None:
            logits = heads(feats)
            loss, per_head = core.loss(logits, labels)
        nonfinite = loss is not None and ~torch.isfinite(loss.detach())
        bad_loss, bad_data = ranks_with([nonfinite, problem is not None], device)  # before backward's all-reduce
        if bad_loss or bad_data:
            _stop_on(bad_loss, bad_data, problem, per_head, epoch, step, "train")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += per_head.double().cpu()
        n += 1
    loss_mean = loss_sum / max(n, 1)
    if D.is_dist():
        device = next(core.parameters()).device
        loss_mean = D.all_reduce_mean(loss_mean.to(device)).cpu()
    return loss_mean.tolist()


@torch.no_grad()
def validate(heads: nn.Module, core: LinearHeads, batches, epoch: int = 0) -> list[dict]:
    heads.eval()
    counts = torch.zeros(len(core.specs), 2, dtype=torch.float64)
    total = 0
    problem = None
    for feats, labels, batch_problem in batches.epoch(epoch):
        if batch_problem is not None:
            problem = problem or batch_problem
            continue
        logits = core(feats)  # not the DDP wrapper: ranks may hold different numbers of val batches
        for i, lg in enumerate(logits):
            c1, c5 = topk_correct(lg, labels)
            counts[i, 0] += c1
            counts[i, 1] += c5
        total += labels.shape[0]
    (bad_data,) = ranks_with([problem is not None], next(core.parameters()).device)  # all ranks stop, or none
    if bad_data:
        _stop_on([], bad_data, problem, None, epoch, 0, "val")
    tot = torch.tensor([float(total)], dtype=torch.float64)
    if D.is_dist():
        device = next(core.parameters()).device
        counts, tot = counts.to(device), tot.to(device)
        dist.all_reduce(counts)
        dist.all_reduce(tot)
        counts, tot = counts.cpu(), tot.cpu()
    total = max(tot.item(), 1.0)
    return [{"top1": 100.0 * counts[i, 0].item() / total, "top5": 100.0 * counts[i, 1].item() / total}
            for i in range(len(core.specs))]


# -------------------------------------------------------------------------------------------------- checkpoint
def _spec(core: LinearHeads, mode: str, train_aug: str) -> dict:
    return {"heads": core.spec_dicts(), "num_labels": core.num_labels, "features": mode, "train_aug": train_aug}


def check_spec(saved: dict | None, current: dict, path, compare_mode: bool = True) -> None:
    """Raise CheckpointError naming every difference between a saved head set and the one the flags ask for."""
    if not isinstance(saved, dict) or "heads" not in saved:
        raise CheckpointError(f"{path} is not a linear-probe checkpoint of dino-simpool-linear (no head spec inside)")
    problems = []
    if saved.get("num_labels") != current["num_labels"]:
        problems.append(f"num_labels {saved.get('num_labels')} saved vs {current['num_labels']} now")
    s_heads = {h["name"]: h for h in saved["heads"]}
    c_heads = {h["name"]: h for h in current["heads"]}
    if set(s_heads) != set(c_heads):
        problems.append(f"heads {sorted(s_heads)} saved vs {sorted(c_heads)} now (--lrs/--feature_sets)")
    for name in sorted(set(s_heads) & set(c_heads)):
        if s_heads[name]["in_dim"] != c_heads[name]["in_dim"]:
            problems.append(f"head {name}: input dim {s_heads[name]['in_dim']} saved vs {c_heads[name]['in_dim']} "
                            f"from this backbone")
    if compare_mode and saved.get("features") != current["features"]:
        problems.append(f"trained on {saved.get('features')} features, now {current['features']} (--cached_features)")
    if compare_mode and "train_aug" in saved and saved["train_aug"] != current["train_aug"]:  # older: not stored
        problems.append(f"train augmentation {saved['train_aug']} saved vs {current['train_aug']} now "
                        f"(--train_aug/--train_crop_scale)")
    if problems:
        raise CheckpointError(
            f"head checkpoint {path} does not match this run: " + "; ".join(problems)
            + ". Use the flags it was trained with, or a fresh --output_dir"
        )


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _strip_module(sd: dict) -> dict:
    return {strip_module_prefix(k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------- run
def _report(core: LinearHeads, best: dict, last: dict, epochs_done: int, title: str) -> str:
    rows = []
    header = f"{'head':<26}{'features':<16}{'lr':>9}{'dim':>7}{'best top1':>11}{'(epoch)':>9}{'last top1':>11}{'last top5':>11}"
    rows.append(header)
    for s in core.specs:
        b, l = best.get(s.name), last.get(s.name)
        rows.append(
            f"{s.name:<26}{s.feature_set:<16}{s.lr:>9g}{s.in_dim:>7}"
            + (f"{b['top1']:>11.2f}{b['epoch']:>9}" if b else f"{'-':>11}{'-':>9}")
            + (f"{l['top1']:>11.2f}{l['top5']:>11.2f}" if l else f"{'-':>11}{'-':>11}")
        )
    text = title + "\n" + "\n".join(rows)
    if best:
        name = max(core.specs, key=lambda s: (best.get(s.name, {}).get("top1", -1.0), -core.specs.index(s))).name
        b = best[name]
        text += f"\nbest head: {name}  top-1 {b['top1']:.2f}%  top-5 {b['top5']:.2f}%  (epoch {b['epoch']})"
    return text


def run(args, backbone: nn.Module | None = None, train_dataset=None, val_dataset=None) -> dict:
    """The whole probe. ``backbone``/datasets may be given directly (tests, notebooks); else built from flags.

    Returns ``{"best": {head: {top1, top5, epoch}}, "last": {...}, "best_head": name, "epochs_done": int, ...}``.
    """
    resolve_args(args)
    env = D.init_distributed(args.backend, args.dist_url)
    device = D.device_for(env)
    torch.manual_seed(args.seed)
    out_dir = Path(args.output_dir)
    if D.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)

    if backbone is None:
        backbone = build_model(args)
    feature_sets = feature_sets_for(args, bool(getattr(backbone, "is_vit", True)), backbone_pooling(backbone))
    backbone = backbone.to(device)
    extractor = FeatureExtractor(backbone, feature_sets)  # validates n_last_blocks vs CNN/depth; freezes

    if (train_dataset is None) != (val_dataset is None):
        raise ValueError("pass both train_dataset and val_dataset, or neither")
    if train_dataset is None:
        train_dataset, val_dataset = build_datasets(args, train_aug=not args.cached_features)
    if len(val_dataset) == 0 or (len(train_dataset) == 0 and not args.evaluate):
        raise ValueError("empty dataset: the train or val split has no images")
    num_labels = resolve_num_labels(args.num_labels, train_dataset, val_dataset)

    # the heads' input sizes come from a real forward pass, never from embed_dim arithmetic
    probe = torch.stack([val_dataset[i][0] for i in range(min(2, len(val_dataset)))]).to(device)
    piece_dims = extractor.piece_dims(probe)
    in_dims = {k: v.shape[-1] for k, v in extractor(probe).items()}

    bs = args.batch_size_per_gpu
    mode = "cached" if args.cached_features else "images"
    core = LinearHeads(make_specs(feature_sets, args.lrs, in_dims), num_labels, seed=args.seed).to(device)
    spec = _spec(core, mode, describe_train_aug(args))
    ckpt_path = out_dir / CHECKPOINT_NAME
    # checkpoint checks first: a mismatch fails before any (long) feature extraction
    ck = None
    if args.evaluate:
        eval_path = Path(args.linear_weights) if args.linear_weights else ckpt_path
        if not eval_path.is_file():
            raise CheckpointError(f"--evaluate needs a trained head: {eval_path} does not exist (train first, or pass "
                                  f"--linear_weights)")
        ck = load_checkpoint(eval_path)
        check_spec(ck.get("spec") if isinstance(ck, dict) else None, spec, eval_path, compare_mode=False)
    elif ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        check_spec(ck.get("spec") if isinstance(ck, dict) else None, spec, ckpt_path)
        if ck.get("epochs") != args.epochs:
            raise CheckpointError(f"{ckpt_path} was trained for --epochs {ck.get('epochs')}, now {args.epochs}: the "
                                  f"cosine schedule differs. Use the same --epochs or a fresh --output_dir")

    if args.cached_features:
        _print(CACHED_NOTE)
        flat_model = FlatFeatures(extractor)
        t0 = time.time()
        tr_x, tr_y = (None, None) if args.evaluate else extract_features(
            flat_model, train_dataset, batch_size=bs, num_workers=args.num_workers, device=device, desc="train")
        va_x, va_y = extract_features(flat_model, val_dataset, batch_size=bs, num_workers=args.num_workers,
                                      device=device, desc="val")
        _print(f"cached features in {time.time() - t0:.1f}s: val {tuple(va_x.shape)}"
               + ("" if tr_x is None else f", train {tuple(tr_x.shape)}"))
        for split, y in (("train", tr_y), ("val", va_y)):
            if y is not None:
                check_label_range(y, num_labels, split)
        train_b = None if tr_x is None else CachedBatches(tr_x.to(device), tr_y.to(device), extractor, piece_dims, bs,
                                                         args.seed, shuffle=True, pad=True)
        val_b = CachedBatches(va_x.to(device), va_y.to(device), extractor, piece_dims, bs, args.seed, False, False)
    else:
        train_b = ImageBatches(train_dataset, extractor, bs, args.num_workers, device, args.seed, True, True,
                               num_labels=num_labels, split="train")
        val_b = ImageBatches(val_dataset, extractor, bs, args.num_workers, device, args.seed, False, False,
                             num_labels=num_labels, split="val")

    heads: nn.Module = core
    if D.is_dist():
        heads = nn.parallel.DistributedDataParallel(core, device_ids=[device] if device.type == "cuda" else None)
    lr_scale = bs * D.get_world_size() / 256.0
    optimizer = torch.optim.SGD(core.param_groups(lr_scale), lr=args.lrs[0] * lr_scale, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    _print(f"linear probe: {len(core.specs)} head(s) {[s.name for s in core.specs]}, {num_labels} labels, "
           f"features {in_dims}, {len(train_dataset)} train / {len(val_dataset)} val images, "
           f"global batch {bs * D.get_world_size()} (lr x {lr_scale:g}); train augmentation: "
           f"{describe_train_aug(args)}")

    result = {"heads": core.spec_dicts(), "num_labels": num_labels, "features": mode}

    # ---- evaluate only
    if args.evaluate:
        path = eval_path
        core.load_state_dict(_strip_module(ck["heads"]))
        stats = validate(heads, core, val_b)
        last = {s.name: dict(st, epoch=ck.get("epoch", 0)) for s, st in zip(core.specs, stats)}
        _print(_report(core, last, last, ck.get("epoch", 0), f"evaluation of {path} on {len(val_dataset)} val images"))
        result.update(best=last, last=last, best_head=max(last, key=lambda k: last[k]["top1"]),
                      epochs_done=ck.get("epoch", 0))
        return result

    # ---- resume
    start_epoch, best, last, history = 0, {}, {}, []
    if ck is not None:
        try:
            core.load_state_dict(_strip_module(ck["heads"]))
            optimizer.load_state_dict(ck["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot restore the heads from {ckpt_path}: {e}") from None
        start_epoch, best, last, history = ck["epoch"], ck["best"], ck["last"], ck.get("history", [])
        _print(f"resuming from {ckpt_path} at epoch {start_epoch}")
        if D.is_main_process():
            with open(out_dir / "log.txt", "a") as f:
                f.write(json.dumps({"event": "resume", "epoch": start_epoch}) + "\n")

    log_path = out_dir / "log.txt"
    epochs_this_run = 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        if D.is_dist():
            D.barrier()
        losses = train_one_epoch(heads, core, optimizer, train_b, epoch, args.epochs, args.seed)
        entry = {"epoch": epoch, "time_s": round(time.time() - t0, 3),
                 "loss": {s.name: l for s, l in zip(core.specs, losses)},
                 "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}
        if (epoch + 1) % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validate(heads, core, val_b)
            last = {}
            for s, st in zip(core.specs, stats):
                last[s.name] = dict(st, epoch=epoch + 1)  # 1-based: "after this many epochs"
                if s.name not in best or st["top1"] > best[s.name]["top1"]:
                    best[s.name] = dict(st, epoch=epoch + 1)
            entry["val"] = {k: {"top1": v["top1"], "top5": v["top5"]} for k, v in last.items()}
            top = max(core.specs, key=lambda s: last[s.name]["top1"]).name
            _print(f"epoch {epoch + 1}/{args.epochs} ({entry['time_s']:.1f}s): best head now {top} top-1 "
                   f"{last[top]['top1']:.2f}% top-5 {last[top]['top5']:.2f}% (loss {entry['loss'][top]:.4f}); "
                   f"max top-1 so far {max(b['top1'] for b in best.values()):.2f}%")
        else:
            _print(f"epoch {epoch + 1}/{args.epochs} ({entry['time_s']:.1f}s): mean loss "
                   f"{sum(losses) / len(losses):.4f}")
        history.append(entry)
        if D.is_main_process():
            save_atomic({
                "heads": core.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "epochs": args.epochs, "best": best, "last": last, "history": history, "spec": spec,
                "args": _plain(vars(args)),
            }, ckpt_path)
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        epochs_this_run += 1
        if args.stop_after_epochs and epochs_this_run >= args.stop_after_epochs and epoch + 1 < args.epochs:
            _print(f"stopping after {epochs_this_run} epoch(s) (--stop_after_epochs); rerun to resume")
            D.barrier()
            result.update(best=best, last=last, epochs_done=epoch + 1, stopped=True,
                          best_head=max(best, key=lambda k: best[k]["top1"]) if best else None)
            return result

    D.barrier()
    epochs_done = max(start_epoch, args.epochs)
    title = (f"linear probe, {len(core.specs)} head(s), {args.epochs} epochs"
             + (" [cached centre-crop features: not the full protocol]" if args.cached_features else ""))
    _print(_report(core, best, last, epochs_done, title))
    best_head = max(best, key=lambda k: best[k]["top1"]) if best else None
    result.update(best=best, last=last, best_head=best_head, epochs_done=epochs_done)
    if D.is_main_process():
        (out_dir / "results.json").write_text(json.dumps(_plain(result), indent=1))
    return result


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, CheckpointError) as e:
        print_error("dino-simpool-linear", e)
        return 2
    except FloatingPointError as e:  # same code as training's non-finite loss
        print_error("dino-simpool-linear", e)
        return 3
    finally:
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
