"""What the attention pictures, MaxBoxAccV2 and CorLoc share on the command line: the image-size flags, the images
named on it, the model's attention map and the last block's patch keys (LOST). The model itself comes from
:mod:`eval.model_args`; the image preprocessing from :mod:`dino_simpool.evaluation.images`.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch

from dino_simpool.evaluation.images import DEFAULT_MAX_SIZE, unique_names
from dino_simpool.data.folder import scan_images

IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAP_CHOICES = ("auto", "pool", "heads_mean", "mean_blocks", "similarity")
#: poolings whose own attention is uniform over locations, so it cannot localize anything
UNIFORM_POOLINGS = ("gap",)


# ----------------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# maps and features
# ----------------------------------------------------------------------------------------------------------------------
def resolve_map_kind(model, kind: str = "auto") -> str:
    """``auto``: ``heads_mean`` (the last block's [CLS] attention averaged over heads) for ``cls``, ``similarity``
    for GAP (its own attention is uniform), ``pool`` for the other poolings (SimPool's attention...).
    ``similarity``, for any pooling: the cosine between each location's final feature and the pooled vector."""
    if kind not in MAP_CHOICES:
        raise ValueError(f"--map must be one of {MAP_CHOICES}; got {kind!r}")
    pooling = getattr(model, "pooling", None)
    is_cls = pooling == "cls"
    if kind == "auto":
        return "heads_mean" if is_cls else "similarity" if pooling in UNIFORM_POOLINGS else "pool"
    if kind in ("heads_mean", "mean_blocks") and not is_cls:
        raise ValueError(f"--map {kind} is for cls backbones ([CLS] attention); this one pools with "
                         f"{model.pooling!r} (use --map pool or similarity)")
    if kind == "pool" and is_cls:
        raise ValueError("--map pool needs a pooling with an attention map; cls backbones use heads_mean, "
                         "mean_blocks or similarity")
    return kind


@torch.no_grad()
def similarity_map(model, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w) cosine between each location's final feature and the pooled vector ``model(x)``: where the image
    looks like what the pooling kept. ViT: the final-norm patch tokens; CNN: the last stage's map."""
    pooled = model(x)
    if getattr(model, "is_vit", False):
        tokens = model.get_intermediate_layers(x, 1)[0][:, model.num_prefix_tokens:]
        h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    else:
        fmap = model.forward_features(x)
        h, w = fmap.shape[-2:]
        tokens = fmap.flatten(2).transpose(1, 2)
    sim = torch.nn.functional.cosine_similarity(tokens, pooled[:, None, :].to(tokens.dtype), dim=-1)
    return sim.reshape(x.shape[0], h, w)


@torch.no_grad()
def attention_map(model, x: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """(B, h, w) map of the chosen kind (see :func:`resolve_map_kind`)."""
    kind = resolve_map_kind(model, kind)
    if kind == "similarity":
        return similarity_map(model, x)
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
