"""Loading foreign and own weights into a :class:`~dino_simpool.models.backbones.Backbone`.

Formats recognised (after taking ``checkpoint_key`` and stripping the ``module.`` / ``backbone.`` wrappers):

* ``dino_simpool``: this project's own keys (``encoder.*``, ``pool.*``): training checkpoints and exports.
* ``dino``: DINO's released backbones and DINO training checkpoints (``teacher``/``student``): ViT keys
  ``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``; ResNet torchvision keys. Load into
  ``pooling="cls"`` (ViT) / ``"gap"`` (CNN).
* ``timm``: timm's own weights for the same arch (same names as above plus a classifier ``head.*`` / ``fc.*`` /
  ``head.fc.*``, which is dropped); ConvNeXt in timm (``stem.*``, ``stages.*.blocks.*``, ``head.norm.*``) or in the
  original FB layout (``downsample_layers.*``, ``stages.i.j.dwconv``, ``norm.*``), which is remapped.
* ``simpool_official``: the official SimPool self-supervised checkpoints (ViT-S, ResNet-50, ConvNeXt-S):
  ``simpool.{norm_patches,wq,wk,beta}`` (older internal names ``attn.wq``/``attn.wk``/``attn.beta``/``norm_patches``
  and ConvNeXt ``norm_output.`` are remapped too). An older ViT layout stored a (1, N+1, d) ``pos_embed`` without a
  class token; its unused slot 0 is dropped. Loading such a checkpoint switches the model to ``compat="official"``
  (see below) unless ``compat`` is given.

``compat="official"`` changes two things, both needed to get the official model's features from its weights:
(1) SimPool's ``min`` is taken over the whole batch (``SimPool(min_over="batch")``), as the official ``sp.py``, so a
sample's output depends on the rest of its batch; (2) ViTs resample the position embedding as the official
``interpolate_pos_encoding``: bicubic with ``scale_factor=((H + 0.1) / g, (W + 0.1) / g)`` from the stored g x g
grid. In the official SimPool ViT the skip test compares ``tokens - 1`` with the number of stored embeddings, which
never match without a class token, so the embedding is *always* resampled, even at 224 px (14 -> 14 is not the
identity). For DINO checkpoints (cls) the switch only matters at sizes other than the stored grid.

Any mismatch raises :class:`~dino_simpool.checkpoint.CheckpointError` listing the missing, unexpected and
mis-shaped keys; nothing falls back to other weights. Files are read with ``torch.load(weights_only=True)``;
only ``argparse.Namespace`` (stored by the official training scripts) is admitted beyond plain data.
"""
from __future__ import annotations

import argparse
import hashlib

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dino_simpool.checkpoint import CheckpointError, describe_key_mismatch, load_checkpoint, strip_module_prefix
from dino_simpool.models.backbones import VIT_ARCHS, Backbone, build_backbone
from dino_simpool.models.options import parse_gamma

WEIGHT_FILES = ("model.safetensors", "backbone.safetensors", "backbone.pth", "model.pth", "checkpoint.pth")
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Any:
    """Read a ``.pth`` (``weights_only=True``; ``argparse.Namespace`` admitted only when it is the one non-plain
    object) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path; nothing was loaded)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    allow_namespace = False
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        allow_namespace = unsafe == {"argparse.Namespace"}
    except Exception:  # legacy (non-zip) files: let load_checkpoint decide
        pass
    return load_checkpoint(path, allow_namespace=allow_namespace)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select_state_dict(obj: Any, checkpoint_key: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict or a dict of them; got a {type(obj).__name__}")
    if checkpoint_key and checkpoint_key in obj:
        sd = obj[checkpoint_key]
        if not _is_state_dict(sd):
            raise CheckpointError(f"entry {checkpoint_key!r} of the checkpoint is not a state dict")
        return sd, checkpoint_key
    if _is_state_dict(obj):
        return obj, None
    if checkpoint_key in STATE_DICT_KEYS:  # asked for by name (e.g. model_ema): no fallback to another network
        present = [k for k in STATE_DICT_KEYS if k in obj and _is_state_dict(obj[k])]
        raise CheckpointError(f"the checkpoint has no {checkpoint_key!r} entry (a run without --model-ema has no "
                              f"model_ema); choose --checkpoint_key from {present or sorted(map(str, obj))[:20]}")
    for key in STATE_DICT_KEYS:
        if key in obj and _is_state_dict(obj[key]):
            return obj[key], key
    networks = [k for k, v in obj.items() if _is_state_dict(v) and any(str(n).endswith("weight") for n in v)]
    raise CheckpointError(
        f"the checkpoint has no {checkpoint_key!r} entry and is not a state dict; top-level keys: "
        f"{sorted(map(str, obj))[:20]}. Pick the network with checkpoint_key= (--checkpoint_key on the command "
        f"line): one of {networks}"
    )


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip DDP's ``module.`` and the multi-crop wrapper's ``backbone.`` (keeping only backbone keys)."""
    stripped: list[str] = []

    def strip_ddp(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if sd and all(k.startswith("module.") for k in sd):  # every key wrapped: DDP's, not a layer named module
            sd = {strip_module_prefix(k): v for k, v in sd.items()}
            stripped.append("module.")
        return sd

    sd = strip_ddp(sd)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        stripped.append("backbone.")
        sd = strip_ddp(sd)
    return sd, stripped


# ----------------------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------------------
_SIMPOOL_OLD = re.compile(r"^(attn\.(wq|wk|beta)|norm_patches\.)")


def _has_official_simpool(keys) -> bool:
    return any(k.startswith("simpool.") or _SIMPOOL_OLD.match(k) for k in keys)


def _pool_key(k: str) -> str | None:
    """Official SimPool names -> ``pool.*`` (None if ``k`` is not a SimPool key)."""
    if k.startswith("simpool."):
        return "pool." + k[len("simpool."):]
    if k.startswith("attn.") and not k.startswith("attn.qkv"):  # older internal names (top-level attn.*)
        return "pool." + k[len("attn."):]
    if k.startswith("norm_patches."):
        return "pool." + k
    return None


def _fb_convnext_to_timm(k: str) -> str:
    k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
    if k.startswith("norm_output."):
        k = "norm." + k[len("norm_output."):]
    if k.startswith("norm."):
        k = "head." + k
    return k


fb_convnext_to_timm = _fb_convnext_to_timm  # public name; the exporter's inverse is timm_convnext_to_fb

_TIMM_CONVNEXT_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_TIMM_CONVNEXT_DOWN = re.compile(r"^stages\.(\d+)\.downsample\.(.+)$")


def timm_convnext_to_fb(k: str) -> str:
    """timm ConvNeXt key -> the FB/official layout (the inverse of the loader's FB -> timm mapping); ValueError
    for a key the official layout has no name for (e.g. the classifier ``head.fc.*``)."""
    if k.startswith("stem."):
        return "downsample_layers.0." + k[len("stem."):]
    if m := _TIMM_CONVNEXT_DOWN.match(k):
        return f"downsample_layers.{m.group(1)}.{m.group(2)}"
    if m := _TIMM_CONVNEXT_BLOCK.match(k):
        rest = m.group(3)
        for timm_name, fb_name in (("conv_dw.", "dwconv."), ("mlp.fc1.", "pwconv1."), ("mlp.fc2.", "pwconv2.")):
            if rest.startswith(timm_name):
                rest = fb_name + rest[len(timm_name):]
        return f"stages.{m.group(1)}.{m.group(2)}.{rest}"
    if k.startswith("head.norm."):
        return "norm." + k[len("head.norm."):]
    raise ValueError(f"timm ConvNeXt key {k!r} has no name in the official (FB) ConvNeXt layout")


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """``dino_simpool`` | ``simpool_official`` | ``timm`` | ``dino`` (wrappers already stripped)."""
    keys = list(sd)
    if any(k.startswith("encoder.") for k in keys):
        return "dino_simpool"
    if _has_official_simpool(keys):
        return "simpool_official"
    if any(k.startswith(("head.weight", "head.fc.", "fc.weight")) for k in keys) or any(
        k.startswith(("stem.", "head.norm.")) for k in keys
    ):
        return "timm"
    return "dino"


def map_state_dict(sd: dict[str, torch.Tensor], model: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """Foreign keys -> this model's keys. Returns (mapped, origin of each mapped key, dropped keys, notes)."""
    fmt = detect_format(sd)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    notes: list[str] = []
    if fmt == "dino_simpool":
        for k, v in sd.items():
            mapped[k], origin[k] = v, k
        return mapped, origin, dropped, notes
    family = "vit" if model.is_vit else getattr(model, "family", "")
    fb_convnext = family == "convnext" and any(k.startswith("downsample_layers.") for k in sd)
    for k, v in sd.items():
        pk = _pool_key(k) if fmt == "simpool_official" else None
        if pk is not None:
            mapped[pk], origin[pk] = v, k
            continue
        if family == "vit" and k.startswith("head."):
            dropped.append(k)
            continue
        if (family == "vit" and k.startswith("fc_norm.") and "norm.weight" not in sd and model.pooling != "cls"
                and model.config.get("norm_order") == "ssl"):
            # timm global_pool="avg" ViTs (and gap exports): fc_norm is the LayerNorm after pooling = our final norm
            k = "norm." + k[len("fc_norm."):]
        if family == "resnet" and k.startswith("fc."):
            dropped.append(k)
            continue
        if family == "convnext":
            if fb_convnext and k in ("head.weight", "head.bias"):
                dropped.append(k)
                continue
            k2 = _fb_convnext_to_timm(k) if fb_convnext else k  # FB pwconv are Linear like timm's: same shapes
            if k2.startswith("head.fc."):
                dropped.append(k)
                continue
            mapped["encoder." + k2], origin["encoder." + k2] = v, k
            continue
        mapped["encoder." + k], origin["encoder." + k] = v, k
    # Older official SimPool ViT: (1, N+1, d) pos_embed without a class token; slot 0 is unused.
    pe = "encoder.pos_embed"
    expected = model.state_dict()
    if family == "vit" and pe in mapped and pe in expected and "encoder.cls_token" not in expected:
        n_ckpt, n_model = mapped[pe].shape[1], expected[pe].shape[1]
        if n_ckpt == n_model + 1 and "encoder.cls_token" not in mapped:
            mapped[pe] = mapped[pe][:, 1:]
            notes.append("dropped slot 0 of a (1, N+1, d) pos_embed (older official SimPool ViT layout)")
    return mapped, origin, dropped, notes


def _check_and_fill(model: Backbone, mapped: dict[str, torch.Tensor], origin: dict[str, str], fmt: str, path) -> None:
    expected = model.state_dict()
    mismatch = describe_key_mismatch(expected, mapped, origin)
    if mismatch:
        cfg = model.config
        raise CheckpointError(
            f"checkpoint {path} (detected format: {fmt}) does not match the model "
            f"{cfg['arch']}/pooling={cfg['pooling']}/gamma={cfg['gamma']}; nothing was loaded.\n{mismatch}\n"
            f"  Build the model that matches the checkpoint (arch, pooling, gamma: a SimPool ViT with gamma has a "
            f"'beta', img_size/patch_size set the pos_embed grid), or use build_backbone_from_checkpoint."
        )
    for k in expected:  # BatchNorm counters some checkpoints omit
        if k not in mapped:
            mapped[k] = expected[k]


def _load_into(model: Backbone, obj: Any, path, checkpoint_key: str | None, compat: str | None | bool) -> dict:
    sd, used_key = _select_state_dict(obj, checkpoint_key)
    sd, stripped = _strip_wrappers(sd)
    fmt = detect_format(sd)
    mapped, origin, dropped, notes = map_state_dict(sd, model)
    _check_and_fill(model, mapped, origin, fmt, path)
    model.load_state_dict(mapped, strict=True)
    if compat == "auto":
        if fmt == "simpool_official":
            model.set_compat("official")
            notes.append("compat='official': batch-wide SimPool min" + (" and official pos-embed resampling" if model.is_vit else ""))
        elif fmt == "dino" and model.is_vit:  # DINO's interpolate_pos_encoding at sizes other than the stored grid
            model.set_compat("official")
            notes.append("compat='official': DINO's pos-embed resampling at sizes other than the stored grid")
    else:
        model.set_compat(compat)
    return {
        "path": str(path),
        "format": fmt,
        "checkpoint_key": used_key,
        "stripped_prefixes": stripped,
        "loaded": len(sd) - len(dropped),
        "dropped": dropped,
        "compat": model.compat,
        "notes": notes,
    }


def load_pretrained(model: Backbone, path, checkpoint_key: str | None = "teacher", compat: str | None = "auto") -> dict:
    """Load weights from ``path`` (any format in the module docstring) into ``model``, strictly.

    ``checkpoint_key`` picks the entry of a training checkpoint (``teacher``/``student``); plain state dicts are used
    as they are. ``compat="auto"`` switches the model to ``"official"`` for official SimPool checkpoints and official
    DINO ViTs (their position-embedding resampling) and leaves it alone otherwise; ``None`` / ``"official"`` set it explicitly. Returns a report: path, format, checkpoint_key,
    stripped_prefixes, loaded (tensors), dropped (classifier keys), compat, notes. Raises CheckpointError.
    """
    if compat not in ("auto", None, "official"):
        raise ValueError(f"compat must be 'auto', None or 'official'; got {compat!r}")
    return _load_into(model, read_checkpoint(path), path, checkpoint_key, compat)


# ----------------------------------------------------------------------------------------------------------------------
# building from a checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def _weights_in_dir(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted([*folder.glob("*.safetensors"), *folder.glob("*.pth")])
    if len(found) == 1:
        return found[0]
    raise CheckpointError(
        f"no weights file in {folder}: expected one of {WEIGHT_FILES} (found {[p.name for p in found]})"
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_export_digest(weights: Path, meta: Any, config_path: Path) -> None:
    """An export's ``config.json`` lists the sha256 of its weight files: a weights file that differs from it (an
    interrupted or mixed export, a file copied over) is refused rather than loaded under the wrong config."""
    files = meta.get("files") if isinstance(meta, dict) else None
    want = files.get(weights.name) if isinstance(files, dict) else None
    if want is not None and file_sha256(weights) != want:
        raise CheckpointError(f"{weights} is not the file that {config_path} describes (its sha256 differs: an "
                              f"interrupted export, or weights copied over another export's); export it again")


def _config_from_json(path: Path, weights: Path | None = None) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if weights is not None:
        check_export_digest(weights, data, path)
    if isinstance(data, dict) and isinstance(data.get("backbone"), dict):
        return dict(data["backbone"])
    if isinstance(data, dict) and "arch" in data:
        return dict(data)
    raise CheckpointError(f"{path} has no backbone config (expected a 'backbone' object or an 'arch' key)")


# torchvision / timm ResNets (DINO's torchvision names): (blocks per stage, bottleneck?, layer1.0.conv2 weight
# (out, in / groups), deep stem?) -> arch
_RESNET_BY_SHAPE = {
    ((1, 1, 1, 1), False, (32, 32), True): "resnet_test",
    ((2, 2, 2, 2), False, (64, 64), False): "resnet18",
    ((3, 4, 6, 3), False, (64, 64), False): "resnet34",
    ((3, 4, 6, 3), True, (64, 64), False): "resnet50",
    ((3, 4, 23, 3), True, (64, 64), False): "resnet101",
    ((3, 8, 36, 3), True, (64, 64), False): "resnet152",
    ((3, 4, 6, 3), True, (128, 4), False): "resnext50_32x4d",
    ((3, 4, 23, 3), True, (256, 8), False): "resnext101_32x8d",
    ((3, 4, 23, 3), True, (256, 4), False): "resnext101_64x4d",
    ((3, 4, 6, 3), True, (128, 128), False): "wide_resnet50_2",
    ((3, 4, 23, 3), True, (128, 128), False): "wide_resnet101_2",
}
# ConvNeXt: (blocks in stage 2, stem width) -> arch
_CONVNEXT_BY_SHAPE = {(9, 96): "convnext_tiny", (27, 96): "convnext_small", (27, 128): "convnext_base",
                      (27, 192): "convnext_large", (27, 256): "convnext_xlarge", (4, 24): "convnext_test"}


def _resnet_arch(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    try:
        blocks = tuple(1 + max(int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.")) for i in range(1, 5))
        conv2 = tuple(int(v) for v in sd["layer1.0.conv2.weight"].shape[:2])
    except (KeyError, ValueError):
        raise ValueError("cannot tell the ResNet variant from the checkpoint keys: pass arch= (--arch)") from None
    arch = _RESNET_BY_SHAPE.get((blocks, "layer1.0.conv3.weight" in keys, conv2, "conv1.0.weight" in keys))
    if arch is None:
        raise ValueError(f"cannot tell the ResNet variant from the checkpoint (blocks per stage {blocks}): pass "
                         f"arch= (--arch, the timm name)")
    return arch


def infer_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Best-effort ``build_backbone`` kwargs from a foreign state dict (wrappers stripped). A ViT of non-standard
    width gives no ``arch`` (pass ``arch=`` and ``num_heads=``); unknown layouts raise ValueError. CNN gamma is not
    stored in the weights: the default (2.0) is assumed here; build_backbone_from_checkpoint reads it from the
    official checkpoint's ``args`` when they are there."""
    keys = set(sd)
    official = _has_official_simpool(keys)
    cfg: dict[str, Any] = {}
    if "patch_embed.proj.weight" in keys:
        w = sd["patch_embed.proj.weight"]
        dim, patch = int(w.shape[0]), int(w.shape[-1])
        by_dim = {v["embed_dim"]: k for k, v in VIT_ARCHS.items()}
        depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
        has_cls = "cls_token" in keys
        n = int(sd["pos_embed"].shape[1]) - (1 if has_cls else 0)
        side = math.isqrt(n)
        if side * side != n and not has_cls and math.isqrt(n - 1) ** 2 == n - 1:
            side = math.isqrt(n - 1)  # older official layout with an unused slot 0
        cfg = dict(patch_size=patch, img_size=side * patch)
        if dim in by_dim:
            cfg["arch"] = by_dim[dim]
            if depth != VIT_ARCHS[by_dim[dim]]["depth"]:
                cfg["depth"] = depth
        else:  # a non-standard width: the caller must name the arch and num_heads (not readable from the weights)
            cfg.update(embed_dim=dim, depth=depth)
        if official:
            cfg.update(pooling="simpool", compat="official")
            if not any(k.endswith("beta") for k in keys):
                cfg["gamma"] = None
        elif has_cls:
            cfg["pooling"] = "cls"
        else:
            raise ValueError("ViT checkpoint without a class token or SimPool keys: pass pooling=")
        return cfg
    if "layer4.0.conv1.weight" in keys or any(k.startswith("layer4.") for k in keys):
        cfg = dict(arch=_resnet_arch(sd))
    elif any(k.startswith(("downsample_layers.", "stem.", "stages.")) for k in keys):
        timm_keys = {_fb_convnext_to_timm(k) for k in keys}
        n_stage2 = len({k.split(".")[3] for k in timm_keys if k.startswith("stages.2.blocks.")})
        width = next((int(v.shape[0]) for k, v in sd.items() if _fb_convnext_to_timm(k) == "stem.0.weight"), None)
        arch = _CONVNEXT_BY_SHAPE.get((n_stage2, width))
        if arch is None:
            raise ValueError("cannot tell the ConvNeXt variant from the checkpoint: pass arch= (--arch)")
        cfg = dict(arch=arch)
    else:
        raise ValueError("cannot tell the arch from the checkpoint keys: pass arch= (--arch)")
    if official:
        cfg.update(pooling="simpool", compat="official")  # gamma is not stored: the CNN default (2.0) is assumed
    else:
        cfg["pooling"] = "gap"
    return cfg


def _official_gamma(obj: Any, cfg: dict[str, Any], checkpoint_key: str | None) -> str | None:
    """Set ``cfg["gamma"]`` of an official SimPool checkpoint from the ``args`` it was trained with.

    γ is not in the weights. CNNs pass ``--gamma`` to student and teacher. Official ViT teachers are built without
    it (always γ=1.25 with a beta: simpool.md, "teacher γ bug"), so ``args.gamma`` applies to a ViT student only.
    Returns a note for the load report, or None when nothing is stored.
    """
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict) or "gamma" not in args:
        return None
    gamma = parse_gamma(args["gamma"])  # the official flag's float, None or "None"
    if "patch_size" in cfg:  # a ViT
        if cfg.get("gamma", "default") is None or checkpoint_key != "student" or gamma is None:
            return None
    cfg["gamma"] = gamma
    return f"gamma={gamma} from the checkpoint's training args"


def build_backbone_from_checkpoint(path, checkpoint_key: str | None = "teacher", **overrides) -> tuple[Backbone, dict]:
    """Build the backbone a checkpoint was trained with and load it.

    The config comes from, first to last: ``overrides`` (flags), ``ckpt["config"]["backbone"]`` of our training
    checkpoints, a ``config.json`` in/beside ``path`` (exports; ``{"backbone": {...}}`` or the config itself), or
    is inferred from foreign keys (DINO, timm, official SimPool). ``path`` may be a file or an exported folder.
    Returns ``(model, report)``; the report adds ``config`` and ``config_source``.
    """
    path = Path(path)
    if path.is_dir():
        weights, cfg_json = _weights_in_dir(path), path / "config.json"
    else:
        weights, cfg_json = path, path.parent / "config.json"
    obj = read_checkpoint(weights)
    cfg: dict[str, Any] | None = None
    source = "overrides"
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and isinstance(obj["config"].get("backbone"), dict):
        cfg, source = dict(obj["config"]["backbone"]), "checkpoint"
    if cfg is None:
        cfg = _config_from_json(cfg_json, weights)
        if cfg is not None:
            source = "config.json"
    if cfg is None:
        sd, _ = _select_state_dict(obj, checkpoint_key)
        sd, _ = _strip_wrappers(sd)
        if detect_format(sd) == "dino_simpool":
            if "arch" not in overrides:
                raise ValueError(f"{weights} has this project's keys but no config: pass arch= (--arch) and the other "
                                 f"model flags it was trained with")
            cfg = {}
        else:
            try:
                cfg = infer_config(sd)
                source = "inferred"
                if cfg.get("compat") == "official" and (gamma_note := _official_gamma(obj, cfg, checkpoint_key)):
                    source += f" ({gamma_note})"
            except ValueError:
                if "arch" not in overrides:
                    raise
                cfg = {}
    if "arch" not in cfg and "arch" not in overrides:
        raise ValueError(f"cannot tell the arch of {weights} (no stored config): pass arch= (--arch; and num_heads= "
                         f"/ --num_heads for a non-standard ViT width)")
    cfg.update({k: v for k, v in overrides.items()})
    if "arch" not in cfg:
        raise ValueError(f"no backbone config found for {weights}: pass arch= (--arch)")
    model = build_backbone(**cfg)
    report = _load_into(model, obj, weights, checkpoint_key, "auto" if "compat" not in cfg else cfg["compat"])
    report.update(config=dict(model.config), config_source=source)
    return model, report


__all__ = [
    "load_pretrained",
    "build_backbone_from_checkpoint",
    "read_checkpoint",
    "detect_format",
    "map_state_dict",
    "infer_config",
    "fb_convnext_to_timm",
    "timm_convnext_to_fb",
]
