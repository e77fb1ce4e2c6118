"""The evaluators' front door: one set of model flags, and the backbone they name, built and loaded.

k-NN, the linear probe, the attention pictures, localization, discovery and export all call
:func:`add_model_args` and then :func:`build_model` (export: :func:`model_overrides`), so a flag means the same in each:

* ``--pretrained_weights`` (alias ``--checkpoint``): a training checkpoint, an export folder or a foreign weight file
  (DINO, timm, official SimPool); empty = a randomly initialised backbone (a baseline, said in a warning);
* ``--checkpoint_key`` (alias ``--key``): which network of a training checkpoint, ``teacher`` (default) or ``student``;
* ``--seed`` (where the evaluator asks for it, ``add_model_args(seed=True)``): the seed of a randomly initialised
  backbone, so that a random-init baseline is the same network every time (an evaluator with a ``--seed`` of its
  own, the linear probe's, gets the same effect: :func:`build_model` reads ``args.seed`` when there is one);
* ``--arch``, ``--pooling``, ``--mode``, ``--gamma``, ``--patch_size`` and the tiny-model ``--depth``,
  ``--embed_dim``, ``--num_heads``: a flag left unset comes from the checkpoint's stored config (or its
  ``config.json``, or what its keys show); without weights, from ``build_backbone``'s defaults (``vit_small``,
  SimPool, patch 16).

``--mode official`` is DINO's own pooling for the arch (``cls`` for ViTs, ``gap`` for CNNs) and ``--mode simpool`` is
SimPool, as in training (:func:`dino_simpool.models.options.resolve_pooling`); given with ``--pooling``, the two must
agree. ``--gamma`` takes a number > 0, ``None`` (no power) or ``default`` (:func:`~dino_simpool.models.options.parse_gamma`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.export import load_exported, read_export_config
from dino_simpool.models.backbones import Backbone, arch_family, build_backbone
from dino_simpool.models.options import MODE_NAMES, parse_gamma, resolve_pooling
from dino_simpool.models.weights import build_backbone_from_checkpoint

DEFAULT_ARCH = "vit_small"  # the random-init baseline when neither weights nor --arch are given
SIZE_FLAGS = ("arch", "patch_size", "depth", "embed_dim", "num_heads")


def gamma_flag(value: str) -> Any:
    """argparse type of ``--gamma``: :func:`parse_gamma`, its ValueError as argparse's one-line usage error."""
    try:
        return parse_gamma(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(parser: argparse.ArgumentParser, weights_required: bool = False, device: bool = False,
                   seed: bool = False) -> None:
    """Add the model flags (module docstring) to ``parser``, in their own help group; ``device`` adds ``--device``,
    ``seed`` adds ``--seed`` (for evaluators without a ``--seed`` of their own)."""
    g = parser.add_argument_group("model (a flag left unset comes from the checkpoint's stored config)")
    g.add_argument("--pretrained_weights", "--checkpoint", dest="pretrained_weights", default="", type=str,
                   required=weights_required,
                   help="training checkpoint, export folder or weight file (DINO, timm, official SimPool)"
                        + ("" if weights_required else "; empty = RANDOM INIT (a baseline)"))
    g.add_argument("--checkpoint_key", "--key", dest="checkpoint_key", default="teacher", type=str,
                   help="the network of a training checkpoint: teacher (default) or student")
    g.add_argument("--arch", default=None, type=str,
                   help=f"backbone (vit_tiny, vit_small, vit_base, resnet50, convnext_small, ...); default: the "
                        f"checkpoint's, else {DEFAULT_ARCH}")
    g.add_argument("--mode", default=None, choices=list(MODE_NAMES),
                   help="official = DINO's pooling for the arch ([CLS] for ViTs, global average for CNNs); "
                        "simpool = SimPool")
    g.add_argument("--pooling", default=None, type=str,
                   help="any registry pooling, cls or gap (default: the checkpoint's, else simpool)")
    g.add_argument("--gamma", default=argparse.SUPPRESS, type=gamma_flag,
                   help="SimPool's gamma: a number > 0, None (no power) or default (1.25 ViT, 2.0 CNN); default: "
                        "the checkpoint's")
    g.add_argument("--patch_size", default=None, type=int, help="ViT patch size (default: the checkpoint's, else 16)")
    g.add_argument("--depth", default=None, type=int, help="ViT depth override (tiny models)")
    g.add_argument("--embed_dim", default=None, type=int, help="ViT width override (tiny models)")
    g.add_argument("--num_heads", default=None, type=int, help="ViT heads override (tiny models)")
    if device:
        g.add_argument("--device", default=None, type=str,
                       help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    if seed:
        g.add_argument("--seed", default=0, type=int,
                       help="seed of the randomly initialised backbone when no --pretrained_weights are given (the "
                            "random-init baseline: the same seed, the same network)")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags that were given, as ``build_backbone`` keywords (a checkpoint's config fills in the rest).

    ``--mode``/``--pooling`` are resolved for ``--arch`` when it is given; else ``--mode official`` passes on as
    pooling ``official``, which ``build_backbone`` resolves once the checkpoint has named the arch. Raises ValueError
    when ``--mode`` and ``--pooling`` disagree."""
    kw = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k, None) is not None}
    if "gamma" in vars(args):
        kw["gamma"] = args.gamma
    pooling = _pooling(getattr(args, "pooling", None), getattr(args, "mode", None), kw.get("arch"))
    if pooling is not None:
        kw["pooling"] = pooling
    return kw


def _pooling(pooling: str | None, mode: str | None, arch: str | None) -> str | None:
    if arch is not None:
        return None if pooling is None and mode is None else resolve_pooling(pooling, arch_family(arch), mode)
    if mode is None:
        return pooling  # "official" included: build_backbone resolves it once the checkpoint names the arch
    if pooling is None:
        return "official" if mode == "official" else "simpool"
    try:  # both given, the arch still unknown: they must agree for a ViT or for a CNN
        resolved = resolve_pooling(pooling, "vit", mode)
    except ValueError:
        try:
            resolved = resolve_pooling(pooling, "resnet", mode)
        except ValueError:
            means = "cls (ViTs) or gap (CNNs)" if mode == "official" else "simpool"
            raise ValueError(f"--mode {mode} means --pooling {means}, but --pooling {pooling} was also given; give "
                             f"only one of them") from None
    return "official" if pooling.strip().lower() == "official" else resolved


def build_model(args: argparse.Namespace, device: torch.device | None = None, *, img_size: int | None = None,
                log: Callable[[str], None] = print) -> Backbone:
    """The backbone the flags name, weights loaded (strictly), in eval mode, on ``device`` when given.

    An export folder (``dino-simpool-export``) loads through its own loader unless a flag overrides its config.
    ``img_size``: a randomly initialised ViT's position-embedding grid (the linear probe passes its crop; default
    224). ``log`` gets one line: what was loaded, or the random-init warning. A random init is seeded with
    ``args.seed`` when the evaluator has one (``torch.manual_seed``: the same seed, the same network)."""
    overrides = model_overrides(args)
    weights = args.pretrained_weights
    if weights:
        if not overrides and _is_export(weights):
            model = load_exported(weights)
            log(f"loaded export {weights}: {model.config['arch']}, pooling {model.config['pooling']}")
        else:
            model, report = build_backbone_from_checkpoint(weights, checkpoint_key=args.checkpoint_key, **overrides)
            log(f"loaded {weights} (key '{report.get('checkpoint_key')}', {report.get('format')}): "
                f"{model.config['arch']}, pooling {model.config['pooling']} "
                f"[config: {report.get('config_source', '?')}]")
    else:
        overrides.setdefault("arch", DEFAULT_ARCH)
        if img_size is not None and arch_family(overrides["arch"]) == "vit":
            overrides["img_size"] = img_size
        seed = getattr(args, "seed", None)
        if seed is not None:
            torch.manual_seed(int(seed))
        model = build_backbone(**overrides)
        log(f"WARNING: no --pretrained_weights: evaluating a RANDOMLY INITIALISED {overrides['arch']} (pooling "
            f"{model.config['pooling']}{'' if seed is None else f', seed {seed}'}): a random-init baseline, not a "
            f"trained model (nothing is downloaded)")
    if device is not None:
        model = model.to(device)
    return model.eval()


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


def _is_export(path: str | Path) -> bool:
    """True for what ``dino-simpool-export`` wrote: a readable ``config.json`` in (or beside) ``path``."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not (folder / "config.json").is_file():
        return False
    try:
        read_export_config(p)
        return True
    except (CheckpointError, OSError):  # not an export's config.json: the checkpoint loader says what it finds
        return False
