"""Model-side helpers shared by the attention pictures, MaxBoxAccV2 and CorLoc: image preprocessing, the model's
attention map, the last block's patch keys (LOST), and building a model from the evaluators' flags.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from dino_simpool.data.folder import scan_images
from dino_simpool.dino.config import float_or_none

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAP_CHOICES = ("auto", "pool", "heads_mean", "mean_blocks")


# ----------------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------------
DEFAULT_MAX_SIZE = 480  # longest side fed to the model when no --image_size is given (DINO's visualize_attention)


def model_input_size(size: tuple[int, int], multiple: int, image_size: int | None,
                     max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """(H, W) fed to the model, rounded to the nearest multiple of ``multiple`` (the ViT patch; 1 for CNNs), at least
    one multiple: ``image_size`` x ``image_size`` when given; else the image's own size, scaled down (keeping the
    aspect ratio) so that its longest side is at most ``max_size`` (``None``/0: full size). Images are never scaled
    up."""
    m = max(int(multiple), 1)
    if image_size:
        h, w = image_size, image_size
    else:
        h, w = size
        if max_size and max(h, w) > max_size:
            s = max_size / max(h, w)
            h, w = h * s, w * s
    h, w = (max(m, int(round(v / m)) * m) for v in (h, w))
    if not image_size and max_size and max_size >= m:
        cap = max_size // m * m
        h, w = min(h, cap), min(w, cap)
    return h, w


def add_size_args(p: argparse.ArgumentParser) -> None:
    """``--image_size`` and ``--max_size``, shared by the attention pictures, MaxBoxAccV2 and CorLoc."""
    p.add_argument("--image_size", default=None, type=int,
                   help="resize images to this square size for the model (default: their own aspect ratio, see "
                        "--max_size)")
    p.add_argument("--max_size", default=DEFAULT_MAX_SIZE, type=int,
                   help=f"without --image_size: scale images down so that the longest side is at most this "
                        f"(default {DEFAULT_MAX_SIZE}, as DINO's visualize_attention; rounded to the patch size; "
                        f"never scaled up); 0 = full size (a 4000x3000 photo on ViT-S/16 needs tens of GB)")


def check_size_args(args: argparse.Namespace) -> None:
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image_size must be >= 1; got {args.image_size}")
    if args.max_size < 0:
        raise ValueError(f"--max_size must be >= 0 (0 = full size); got {args.max_size}")


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> normalised (3, H, W) float tensor at ``size`` = (H, W) (bicubic resize when needed)."""
    img = img.convert("RGB")
    if (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def input_multiple(model) -> int:
    return int(model.patch_size) if getattr(model, "is_vit", False) else 1


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the images (recursively, sorted) of the folders given."""
    return [f for f, _ in list_images_named(paths)]


def list_images_named(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """:func:`list_images` with a unique output name per image: its path relative to the folder it was found in,
    without the suffix and with ``/`` as ``__`` (``a/x.png`` -> ``a__x``); the file stem for files given directly.
    Names that would still clash keep the suffix (``x_png``, ``x_jpg``), then get ``_2``, ``_3``..."""
    found: list[tuple[Path, tuple[str, ...]]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(map(Path, scan_images(p, IMG_SUFFIXES)[0]))  # links followed once, each image once
            if not files:
                raise ValueError(f"{p} has no images ({', '.join(IMG_SUFFIXES)})")
            found += [(f, f.relative_to(p).parts) for f in files]
        elif p.is_file():
            found.append((p, (p.name,)))
        else:
            raise ValueError(f"{p} does not exist; pass image files or folders of images")
    return list(zip([f for f, _ in found], unique_names([parts for _, parts in found])))


def unique_names(rel_parts: Sequence[Sequence[str]]) -> list[str]:
    """File-name-safe, unique names for relative paths given as parts (see :func:`list_images_named`)."""
    def join(parts: Sequence[str], keep_suffix: bool) -> str:
        *dirs, last = parts
        p = Path(last)
        last = f"{p.stem}_{p.suffix[1:]}" if keep_suffix and p.suffix else p.stem
        return "__".join([*dirs, last])

    names = [join(parts, False) for parts in rel_parts]
    counts = Counter(names)
    names = [join(parts, True) if counts[n] > 1 else n for n, parts in zip(names, rel_parts)]
    seen: set[str] = set()
    out = []
    for n in names:
        name, k = n, 1
        while name in seen:
            k += 1
            name = f"{n}_{k}"
        seen.add(name)
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# maps and features
# ----------------------------------------------------------------------------------------------------------------------
def resolve_map_kind(model, kind: str = "auto") -> str:
    """``auto``: ``pool`` for poolings with an attention map (SimPool...), ``heads_mean`` (the last block's [CLS]
    attention averaged over heads) for ``cls``."""
    if kind not in MAP_CHOICES:
        raise ValueError(f"--map must be one of {MAP_CHOICES}; got {kind!r}")
    is_cls = getattr(model, "pooling", None) == "cls"
    if kind == "auto":
        return "heads_mean" if is_cls else "pool"
    if kind in ("heads_mean", "mean_blocks") and not is_cls:
        raise ValueError(f"--map {kind} is for cls backbones ([CLS] attention); this one pools with "
                         f"{model.pooling!r} (use --map pool)")
    if kind == "pool" and is_cls:
        raise ValueError("--map pool needs a pooling with an attention map; cls backbones use heads_mean/mean_blocks")
    return kind


@torch.no_grad()
def attention_map(model, x: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """(B, h, w) attention map of the chosen kind (see :func:`resolve_map_kind`)."""
    kind = resolve_map_kind(model, kind)
    maps = model.attention_maps(x)
    if kind == "pool":
        if "pool" not in maps:
            raise ValueError(f"pooling {model.pooling!r} gives no 'pool' attention map (got {sorted(maps)})")
        return maps["pool"]
    if kind == "heads_mean":
        return maps["heads"].mean(1)
    return maps["mean_blocks"]


@contextmanager
def _last_qkv_hook(model, store: list):
    qkv = model.encoder.blocks[-1].attn.qkv
    handle = qkv.register_forward_hook(lambda mod, args, out: store.append(out))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def patch_features(model, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """LOST's features: for ViTs the last block's patch *keys* (heads concatenated), captured by a forward hook on
    that block's ``attn.qkv``; for CNNs the last stage's map. Returns ((B, h*w, d), (h, w))."""
    if getattr(model, "is_vit", False):
        store: list[torch.Tensor] = []
        with _last_qkv_hook(model, store):
            model.forward_features(x)
        qkv = store[-1]  # (B, T, 3 * d): q | k | v, each heads-major
        d = qkv.shape[-1] // 3
        keys = qkv[:, model.num_prefix_tokens:, d:2 * d]
        h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
        return keys, (h, w)
    fmap = model.forward_features(x)
    b, d, h, w = fmap.shape
    return fmap.flatten(2).transpose(1, 2), (h, w)


# ----------------------------------------------------------------------------------------------------------------------
# model flags (the other evaluators' names)
# ----------------------------------------------------------------------------------------------------------------------
_UNSET = object()


def add_model_args(p: argparse.ArgumentParser, weights_flags=("--pretrained_weights",)) -> None:
    p.add_argument(*weights_flags, dest="pretrained_weights", default="", type=str,
                   help="training checkpoint, export folder or weight file; empty = RANDOM INIT (a baseline)")
    p.add_argument("--checkpoint_key", default="teacher", type=str, help="teacher (default) or student")
    p.add_argument("--arch", default=None, type=str, help="backbone (default: from the checkpoint, else vit_small)")
    p.add_argument("--pooling", default=None, type=str, help="pooling (default: from the checkpoint, else simpool)")
    p.add_argument("--gamma", default=_UNSET, type=float_or_none, help="SimPool gamma: a float, 'None' or 'default'")
    p.add_argument("--patch_size", default=None, type=int, help="ViT patch size (default: from the checkpoint)")
    p.add_argument("--depth", default=None, type=int, help="ViT depth override (tiny models)")
    p.add_argument("--embed_dim", default=None, type=int, help="ViT width override (tiny models)")
    p.add_argument("--num_heads", default=None, type=int, help="ViT heads override (tiny models)")
    p.add_argument("--device", default=None, type=str, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")


def build_model(args: argparse.Namespace, log=print) -> Any:
    """The backbone named by the flags, in eval mode on ``args.device``; exports load via ``load_exported``."""
    from dino_simpool.models.backbones import build_backbone
    from dino_simpool.models.weights import build_backbone_from_checkpoint

    device = resolve_device(getattr(args, "device", None))  # before the (slow) load, so a bad flag fails fast
    overrides = {k: getattr(args, k) for k in ("arch", "pooling", "patch_size", "depth", "embed_dim", "num_heads")
                 if getattr(args, k, None) is not None}
    if getattr(args, "gamma", _UNSET) is not _UNSET:
        overrides["gamma"] = args.gamma
    weights = getattr(args, "pretrained_weights", "")
    if weights:
        if not overrides and _is_export(weights):
            from dino_simpool.export import load_exported

            model = load_exported(weights)
            log(f"loaded export {weights}: {model.config['arch']}/{model.config['pooling']}")
        else:
            model, report = build_backbone_from_checkpoint(weights, checkpoint_key=args.checkpoint_key, **overrides)
            log(f"loaded {weights} (key '{report.get('checkpoint_key')}', {report.get('format')}): "
                f"{model.config['arch']}/{model.config['pooling']}")
    else:
        overrides.setdefault("arch", "vit_small")
        model = build_backbone(**overrides)
        log(f"WARNING: no --pretrained_weights: evaluating a RANDOMLY INITIALISED {overrides['arch']} (a baseline)")
    return model.to(device).eval()


def resolve_device(name: str | None = None) -> torch.device:
    """``--device``: ``None``/empty = cuda when present, else cpu; a named device must parse and be usable here."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"--device {name}: {device.type} is not available here; use --device cpu")
    return device


def _is_export(path) -> bool:
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not (folder / "config.json").is_file():
        return False
    try:
        from dino_simpool.export import read_export_config

        read_export_config(p)
        return True
    except Exception:
        return False


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
