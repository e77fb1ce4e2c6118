"""The supervised recipe's data side, from timm's training utilities: the transforms (``create_transform``:
RandomResizedCrop, flip, RandAugment, random erasing), mixup/cutmix (``Mixup``), the loss that goes with them, and
the loaders (the DINO trainer's resumable sampler and seeded dataset, so that resume is bit-identical on CPU).

Random numbers: the transform of image ``i`` in epoch ``e`` runs inside ``SeededDataset`` (torch, numpy and
``random`` seeded from ``(seed, e, i)``); ``Mixup`` draws from numpy's global RNG in the main process, which the
trainer seeds before every step with ``seed_step(seed, rank, iteration)``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import AugMixDataset, Mixup, auto_augment, create_transform
from timm.loss import JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Sampler

from dino_simpool.data import DataError, build_dataset
from dino_simpool.data.loader import make_loader
from dino_simpool.data.sampling import ResumableDistributedSampler, SeededDataset
from dino_simpool.supervised.config import SupervisedConfig


def train_transform(cfg: SupervisedConfig):
    """timm's training transform (with ``--aug-splits``: its three parts, base / augmentation / normalise, for
    ``AugSplits``); a bad ``--aa`` policy string becomes a ValueError naming the flag."""
    try:
        return _posterize_compat(create_transform(cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                                interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode,
                                re_count=cfg.recount, separate=cfg.aug_splits > 0))
    except (AssertionError, KeyError, ValueError, IndexError) as e:  # timm's policy parsers assert
        raise ValueError(f"--aa {cfg.aa!r} / --train-interpolation {cfg.train_interpolation!r} is not a timm "
                         f"augmentation (e.g. --aa rand-m9-mstd0.5-inc1, --train-interpolation random): {e}") from None


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with Pillow < 11's meaning of 0 bits (a black image): Pillow >= 11 raises ValueError for
    bits < 1, which timm 1.0 passes at magnitude 10 (``rand-m9-mstd0.5`` reaches it in ~2% of its draws)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def _posterize_compat(transform):
    """Point every posterize op of timm's auto-augment policies in ``transform`` at :func:`_posterize`."""
    parts = transform if isinstance(transform, tuple) else (transform,)
    for t in (t for part in parts for t in getattr(part, "transforms", ())):
        ops = list(getattr(t, "ops", ()))
        for sub in getattr(t, "policy", ()):  # AutoAugment: a list of sub-policies
            ops.extend(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def eval_transform(cfg: SupervisedConfig):
    """Resize to ``img_size / crop_pct`` (``--interpolation``), centre-crop ``img_size``, normalise."""
    try:
        return create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation,
                                crop_pct=cfg.crop_pct)
    except (AssertionError, KeyError, ValueError) as e:
        raise ValueError(f"--interpolation {cfg.interpolation!r}: {e}") from None


class AugSplits(AugMixDataset):
    """timm's AugMixDataset (item = (clean, augmented x N-1), label), passing the dataset's ``classes`` through."""

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def build_datasets(cfg: SupervisedConfig) -> tuple[Any, Any]:
    """(train, val) datasets with their transforms: ImageFolders under ``--data-dir`` or the embedded dataset."""
    kw = dict(image_size=cfg.synthetic_size)
    tf = train_transform(cfg)
    train = build_dataset(cfg.data_dir, "train", transform=None if cfg.aug_splits else tf, subset=cfg.subset,
                          images_per_class=cfg.synthetic_per_class, **kw)
    if cfg.aug_splits:
        train = AugSplits(train, num_splits=cfg.aug_splits)
        train.transform = tf
    try:
        val = build_dataset(cfg.data_dir, "val", transform=eval_transform(cfg),
                            images_per_class=max(1, cfg.synthetic_per_class // 4), **kw)
    except DataError as e:
        raise DataError(f"{e} (the supervised trainer validates top-1/top-5 every epoch on val/)") from None
    if cfg.data_dir is not None and list(val.classes) != list(train.classes):
        extra = sorted(set(val.classes) ^ set(train.classes))[:5]
        raise DataError(f"train/ and val/ under {cfg.data_dir} have different class folders (e.g. {extra}); the "
                        f"classifier's outputs are train/'s classes: make the two lists equal")
    return train, val


def num_classes_of(cfg: SupervisedConfig, train_set) -> int:
    n = len(getattr(train_set, "classes", []))
    if cfg.num_classes is None:
        return n
    if cfg.num_classes < n:
        raise DataError(f"--num-classes {cfg.num_classes} is smaller than the {n} class folders of the training set")
    return cfg.num_classes


class ShardSampler(Sampler):
    """Rank ``r`` of ``world`` takes indices ``r, r + world, ...`` without padding, so that sums over ranks count
    every validation image exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def build_loaders(cfg: SupervisedConfig, train_set, val_set, rank: int, world: int, pin: bool):
    """Training loader (resumable order, seeded transforms, full batches) and validation loader (a shard each)."""
    sampler = ResumableDistributedSampler(len(train_set), num_replicas=world, rank=rank, seed=cfg.seed, shuffle=True,
                                          batch_size=cfg.batch_size, drop_last=True)
    if sampler.batches_per_epoch < 1:
        raise DataError(f"the training set has {len(train_set)} images: with {world} process(es) and --batch-size "
                        f"{cfg.batch_size} not one full batch per process; lower --batch-size or use more data")
    train = make_loader(SeededDataset(train_set, cfg.seed), cfg.batch_size, cfg.workers, sampler=sampler,
                        drop_last=True, pin_memory=pin, seed=cfg.seed)
    val = make_loader(val_set, cfg.validation_batch_size or cfg.batch_size, cfg.workers,
                      sampler=ShardSampler(len(val_set), rank, world), pin_memory=pin, seed=cfg.seed)
    return sampler, train, val


def build_mixup(cfg: SupervisedConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup (mixup and/or cutmix, smoothed soft targets), or None when both are off."""
    if not cfg.mixup_active:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def build_loss(cfg: SupervisedConfig) -> nn.Module:
    """As timm's train.py: JSD + CE over augmentation splits, soft-target CE when mixing (the smoothing is in the
    mixed targets), else label-smoothing CE, else plain CE."""
    if cfg.jsd_loss:
        return JsdCrossEntropy(num_splits=cfg.aug_splits, smoothing=cfg.smoothing)
    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, autocast) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean cross-entropy over the whole validation set, summed over every rank's shard
    (one all-reduce)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    ce = nn.CrossEntropyLoss(reduction="sum")
    try:
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == targets[:, None]
            sums += torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                 ce(logits, targets).double(), torch.tensor(float(len(targets)), device=device,
                                                                            dtype=torch.float64)])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n)}
