"""Exported backbones: a folder with ``backbone.safetensors``, ``backbone.pth`` (a plain state dict) and
``config.json``, written from a training checkpoint and loaded back by :func:`load_exported` (and ``hubconf.py``).

Key layouts (``config.json["layout"]``; ``export_backbone(layout="auto")`` picks the first two):

* ``"timm"`` (pooling ``cls`` or ``gap``): the backbone *is* a timm model, and the keys are timm's: they load with
  no missing or unexpected key into ``timm.create_model(spec["model_name"], pretrained=True,
  pretrained_cfg_overlay=dict(file=".../backbone.safetensors"), num_classes=0, **spec["kwargs"])`` where
  ``spec = config["timm"]``, and that model computes the same features. ``config.json`` is also a timm local-folder
  config (``architecture``, ``model_args``, ``pretrained_cfg``), so ``timm.create_model("local-dir:<folder>",
  pretrained=True)`` (timm releases that read ``local-dir:`` names, e.g. 1.0.31) builds and loads it strictly. ViT ``gap`` (ssl norm order: final LayerNorm
  *after* averaging the patch tokens) is timm's ``global_pool="avg"`` whose LayerNorm is ``fc_norm``, so the final
  norm is exported as ``fc_norm.*``.
* ``"dino_simpool"`` (SimPool and every other pooling): this project's keys, ``encoder.*`` (the timm model, timm
  names after the prefix) and ``pool.*`` (the pooling). Rebuild with ``build_backbone(**config["backbone"])``, which
  :func:`load_exported` does from ``config.json`` alone. The timm equivalent of a SimPool ViT: the ``encoder.*``
  tensors load strictly into ``timm.create_model(enc["model_name"], **enc["kwargs"])`` with
  ``enc = config["timm"]["encoder"]`` (``class_token=False, global_pool="", num_classes=0, ...``), the ``pool.*``
  tensors into ``dino_simpool.pooling.SimPool``; the forward is ``norm(simpool(blocks(patch_embed + pos_embed)))``:
  SimPool runs on the last block's un-normalised patch tokens and the ViT's final LayerNorm on the pooled vector
  (see docs/export.md).
* ``"official"`` (``layout="official"``, ``dino-simpool-export --layout official``): the key names of the official
  code, so that its strict loaders (``utils.load_pretrained_weights`` of DINO's and SimPool's ``eval_knn.py`` /
  ``eval_linear.py``) read the file. ViT ``cls``: DINO's ViT (``cls_token``, ``pos_embed`` (1, N+1, d),
  ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``). ViT ``simpool``:
  the official SimPool ViT (the same without ``cls_token``, ``pos_embed`` (1, N, d), plus
  ``simpool.{norm_patches,wq,wk,beta}``). ResNet ``gap``/``simpool``: torchvision's keys (``conv1``, ``bn1``,
  ``layer1..4``; no ``fc``: DINO's MultiCropWrapper replaces it by Identity) plus ``simpool.{norm_patches,wq,wk}``.
  ConvNeXt ``gap``/``simpool``: the FB layout (``downsample_layers.*``, ``stages.i.j.{dwconv,norm,pwconv1,
  pwconv2,gamma}``, ``norm``; no ``head``) plus ``simpool.*``. The official SimPool takes its min over the whole
  batch: build our model with ``compat="official"`` to get the official features (``load_exported`` keeps the
  exported model's own ``compat``). Other poolings, ViT ``gap`` and the supervised norm order have no official
  counterpart and are refused.

timm has no SimPool backbone: its ``timm.layers.SimPool1d``/``SimPool2d`` pool differently (their min is taken per
channel over the tokens, ``v.amin(dim=-2)``, where the paper, the official code and :class:`SimPool` take one min per
sample, or per batch, over tokens *and* channels; they have no ``beta``, other key names, and no timm ViT/ResNet/
ConvNeXt takes them as ``global_pool``). So the timm route refuses every export whose keys are not a timm model's:
``config["timm"]["model_name"]`` and ``config["architecture"]`` are then a name that timm rejects with
``RuntimeError: Unknown model (... load it with load_exported(folder) ...)``, instead of loading nothing and
returning a randomly initialised network.

Reading never unpickles code: ``.pth`` files go through ``torch.load(weights_only=True)``, and a folder with both
files is read from the safetensors one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dino_simpool.checkpoint import CheckpointError, load_checkpoint, save_atomic, write_atomic
from dino_simpool.models.backbones import VIT_ARCHS, arch_family, build_backbone, resolve_arch
from dino_simpool.models.weights import (build_backbone_from_checkpoint, check_export_digest, fb_convnext_to_timm,
                                         file_sha256, read_checkpoint, timm_convnext_to_fb)
from dino_simpool.pooling import SimPool

EXPORT_FORMAT = "dino-simpool-export"
EXPORT_VERSION = 1
SAFETENSORS_NAME = "backbone.safetensors"
PTH_NAME = "backbone.pth"
CONFIG_NAME = "config.json"
TIMM_LAYOUT_POOLINGS = ("cls", "gap")
LAYOUT_CHOICES = ("auto", "official")  # what export_backbone(layout=) takes; auto = "timm" or "dino_simpool"
STORED_LAYOUTS = ("timm", "dino_simpool", "official")
OFFICIAL_POOLINGS = {"vit": ("cls", "simpool"), "resnet": ("gap", "simpool"), "convnext": ("gap", "simpool")}
# Official key names (ViT: DINO's / the official SimPool ViT; ResNet: torchvision's): anything else is refused.
_OFFICIAL_VIT_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
                               r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")
_OFFICIAL_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")
_OFFICIAL_SIMPOOL_KEY = re.compile(r"^simpool\.(norm_patches\.(weight|bias)|wq\.weight|wk\.weight|beta)$")


def resolve_layout(config: dict[str, Any], layout: str = "auto") -> str:
    """The stored layout for ``layout`` (one of :data:`LAYOUT_CHOICES`): ``auto`` gives ``timm`` for cls/gap and
    ``dino_simpool`` otherwise; ``official`` is checked by :func:`official_state_dict`."""
    if layout == "auto":
        return "timm" if config["pooling"] in TIMM_LAYOUT_POOLINGS else "dino_simpool"
    if layout == "official":
        return "official"
    raise ValueError(f"unknown export layout {layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")


def _timm_loadable(config: dict[str, Any], layout: str) -> bool:
    """Whether the exported keys are exactly a timm model's (the official ViT cls and ResNet gap keys are)."""
    if layout == "timm":
        return True
    if layout == "official":
        return (arch_family(config["arch"]), config["pooling"]) in (("vit", "cls"), ("resnet", "gap"))
    return False


def _timm_refusal_name(config: dict[str, Any], layout: str) -> str:
    """A model name timm rejects with ``Unknown model (<this text>)``: it holds no '.', '/', ':', '\\', '#' or '?',
    which timm would parse as a pretrained tag, a path, a hub source or a URL part, and so cut off."""
    pooling = re.sub(r"[^A-Za-z0-9_-]", "_", str(config["pooling"]))
    keys = "official SimPool and DINO key names" if layout == "official" else "encoder and pool keys"
    return (f"dino-simpool {pooling} export ({keys}) is not a timm model - load it with load_exported(folder) from "
            f"dino_simpool's export module")


# ----------------------------------------------------------------------------------------------------------------------
# timm correspondence
# ----------------------------------------------------------------------------------------------------------------------
def _vit_timm_name(arch: str, patch_size: int) -> tuple[str, bool]:
    """timm model name for a ViT arch; returns (name, whether patch_size must be passed as a kwarg)."""
    name = f"{arch}_patch{patch_size}_224"
    if name in timm.list_models(name):
        return name, False
    return f"{arch}_patch16_224", True


def timm_spec(config: dict[str, Any], layout: str = "auto") -> dict[str, Any]:
    """How a backbone with this ``Backbone.config``, exported in ``layout``, maps onto timm.

    ``complete`` (the exported keys are exactly a timm model's): ``model_name`` and ``kwargs`` for
    ``timm.create_model`` (besides ``num_classes=0``) load it with the same features. Otherwise ``model_name`` is a
    name timm refuses (pointing to :func:`load_exported`) and ``kwargs`` is empty, so the timm route fails instead of
    returning a random network; the ``dino_simpool`` layout adds ``encoder`` (``model_name``, ``kwargs``, ``prefix``):
    the timm model that the ``encoder.*`` tensors load into strictly. Also ``layout`` and a ``note``."""
    arch, pooling = config["arch"], config["pooling"]
    layout = resolve_layout(config, layout)
    kwargs: dict[str, Any] = {}
    spec = resolve_arch(arch)
    if spec.family == "vit":
        if spec.vit_cfg is not None:  # a named arch: this project's ViT settings on timm's model
            name, pass_patch = _vit_timm_name(arch, config["patch_size"])
        else:  # a timm model name: timm builds exactly that model
            name, pass_patch = spec.timm_name, False
        if pass_patch:
            kwargs["patch_size"] = config["patch_size"]
        if config.get("img_size", 224) != 224:
            kwargs["img_size"] = config["img_size"]
        for k in ("depth", "embed_dim", "num_heads"):
            if config.get(k) is not None:
                kwargs[k] = config[k]
        kwargs["dynamic_img_size"] = True
        ssl = config.get("norm_order", "ssl") == "ssl"
        if pooling == "cls":
            note = "the output is the final-norm [CLS] token (timm's global_pool='token')"
        elif pooling == "gap":
            kwargs["global_pool"] = "avg"
            kwargs["fc_norm"] = ssl
            note = ("mean of the patch tokens, then the final LayerNorm (timm's fc_norm)" if ssl else
                    "final LayerNorm on the tokens, then the mean of the patch tokens")
        else:
            kwargs["class_token"] = False
            kwargs["global_pool"] = ""
            note = (f"timm gives the encoder only (encoder.* keys, prefix stripped); the {pooling} pooling (pool.* keys) "
                    + ("runs on the last block's un-normalised patch tokens and the final LayerNorm (norm.*) on the "
                       "pooled vector" if ssl else "runs on the final-norm patch tokens (no norm after)"))
        if config.get("compat") == "official":
            note += "; compat='official': position embeddings resampled as the official code (not timm's)"
    elif spec.family in ("resnet", "convnext"):
        name = spec.timm_name
        convnext = spec.family == "convnext"
        if pooling == "gap":
            note = "global average pooling" + (", then head.norm" if convnext else "")
        else:
            kwargs["global_pool"] = ""
            note = (f"timm gives the encoder only (encoder.* keys, prefix stripped): forward_features is the last "
                    f"stage's map; the {pooling} pooling (pool.* keys) replaces global average pooling"
                    + (", then head.norm on the pooled vector" if convnext else ""))
    else:
        raise ValueError(f"no timm correspondence for arch {arch!r}")
    if _timm_loadable(config, layout):
        return {"model_name": name, "kwargs": kwargs, "layout": layout, "complete": True, "note": note}
    spec: dict[str, Any] = {"model_name": _timm_refusal_name(config, layout), "kwargs": {}, "layout": layout,
                            "complete": False}
    if layout == "dino_simpool":
        spec["encoder"] = {"model_name": name, "kwargs": kwargs, "prefix": "encoder."}
        spec["note"] = note
    else:
        spec["note"] = ("official SimPool/DINO key names, for the official models and their strict loaders "
                        "(load_pretrained_weights); timm has no model with these keys")
    return spec


def _timm_folder_config(spec: dict[str, Any], config: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """The top-level fields of a timm local-folder ``config.json`` (``timm.create_model("local-dir:<folder>",
    pretrained=True)``): the real model for complete specs, the refusal name otherwise."""
    if not spec["complete"]:
        return {"architecture": spec["model_name"], "num_classes": 0, "num_features": embed_dim, "model_args": {},
                "pretrained_cfg": {"architecture": spec["model_name"], "num_classes": 0}}
    default = timm.models.get_pretrained_cfg(spec["model_name"])  # classifier / first_conv names for adaptation
    size = config.get("img_size") if arch_family(config["arch"]) == "vit" else 224
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    pretrained_cfg = {
        "architecture": spec["model_name"], "num_classes": 0, "input_size": [3, *size],
        "interpolation": "bicubic", "crop_pct": 0.875,
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
        "classifier": getattr(default, "classifier", None), "first_conv": getattr(default, "first_conv", None),
    }
    return {"architecture": spec["model_name"], "num_classes": 0, "num_features": embed_dim,
            "model_args": dict(spec["kwargs"]), "pretrained_cfg": pretrained_cfg}


def _fc_norm_rename(config: dict[str, Any]) -> bool:
    return config["arch"] in VIT_ARCHS and config["pooling"] == "gap" and config.get("norm_order", "ssl") == "ssl"


def export_state_dict(model, layout: str = "auto") -> dict[str, torch.Tensor]:
    """The backbone's tensors under the export key names of ``layout`` (see the module docstring); contiguous CPU
    copies."""
    layout = resolve_layout(model.config, layout)
    if layout == "official":
        return official_state_dict(model)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if layout == "dino_simpool":
        return sd
    extra = [k for k in sd if not k.startswith("encoder.")]
    if extra:
        raise ValueError(f"pooling {model.config['pooling']!r} has parameters outside the encoder ({extra[:3]}); "
                         f"it cannot use the timm layout")
    out = {k[len("encoder."):]: v for k, v in sd.items()}
    if _fc_norm_rename(model.config):
        out = {("fc_norm." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in out.items()}
    return out


def _check_official(model) -> str:
    """The family of a backbone that has an official counterpart; ValueError naming what has none."""
    cfg = model.config
    family = arch_family(cfg["arch"])
    if cfg["pooling"] not in OFFICIAL_POOLINGS[family]:
        supported = "; ".join(f"{f}: {', '.join(p)}" for f, p in OFFICIAL_POOLINGS.items())
        raise ValueError(f"--layout official: {cfg['arch']}/{cfg['pooling']} has no official DINO/SimPool "
                         f"counterpart (official layouts: {supported}); export it with --layout auto")
    if family == "vit" and cfg.get("norm_order", "ssl") != "ssl":
        raise ValueError("--layout official: the official self-supervised ViT has the ssl norm order (SimPool, then "
                         "the final LayerNorm); norm_order='supervised' has no official counterpart")
    pool = model.pool
    if cfg["pooling"] == "simpool":
        # the official sp.py: one head, no q/k bias, eps 1e-6, scale (d/h)^-0.5, beta only on a ViT with gamma
        want_beta = family == "vit" and pool.gamma is not None
        if (not isinstance(pool, SimPool) or pool.num_heads != 1 or pool.wq.bias is not None or pool.eps != 1e-6
                or pool.scale != pool.dim ** -0.5 or (pool.beta is not None) != want_beta):
            raise ValueError(f"--layout official: this SimPool ({pool.extra_repr()}, beta "
                             f"{'present' if pool.beta is not None else 'absent'}) differs from the official module "
                             f"(1 head, no q/k bias, eps 1e-6, default scale, beta on a ViT with gamma only)")
    return family


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the official DINO / SimPool key names (module docstring, ``"official"``);
    ValueError for a backbone without an official counterpart or a key the official layout has no name for."""
    family = _check_official(model)
    key_ok = {"vit": _OFFICIAL_VIT_KEY.match, "resnet": _OFFICIAL_RESNET_KEY.match,
              "convnext": lambda k: True}[family]  # ConvNeXt: timm_convnext_to_fb refuses unknown keys
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("pool."):
            name = "simpool." + k[len("pool."):]
            ok = _OFFICIAL_SIMPOOL_KEY.match(name)
        else:
            name = k[len("encoder."):]
            if family == "convnext":
                name = timm_convnext_to_fb(name)  # ValueError for keys without an FB name
            ok = key_ok(name)
        if not ok:
            raise ValueError(f"--layout official: {model.config['arch']} key {k!r} has no official name")
        out[name] = v.detach().to("cpu").contiguous().clone()
    return out


def _official_to_ours(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_state_dict` (key names only; ``load_exported`` checks the result strictly)."""
    convnext = arch_family(config["arch"]) == "convnext"
    out = {}
    for k, v in sd.items():
        if k.startswith("simpool."):
            out["pool." + k[len("simpool."):]] = v
        else:
            out["encoder." + (fb_convnext_to_timm(k) if convnext else k)] = v
    return out


def import_state_dict(sd: dict[str, torch.Tensor], config: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`export_state_dict`: export key names -> ``Backbone.state_dict()`` names."""
    if layout == "dino_simpool":
        return dict(sd)
    if layout == "official":
        return _official_to_ours(sd, config)
    if layout != "timm":
        raise CheckpointError(f"unknown export layout {layout!r}; expected one of {', '.join(STORED_LAYOUTS)}")
    if _fc_norm_rename(config):
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
    return {"encoder." + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------
def config_digest(config: Any) -> str | None:
    """sha256 of the canonical JSON of a training config (sorted keys, compact, non-JSON values as str)."""
    if config is None:
        return None
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def export_backbone(model, output_dir, training_config: dict | None = None, source: dict | None = None,
                    layout: str = "auto") -> dict:
    """Write ``backbone.safetensors``, ``backbone.pth`` and ``config.json`` for ``model`` into ``output_dir``.

    ``layout``: ``"auto"`` (timm keys for cls/gap, this project's otherwise) or ``"official"`` (the official DINO /
    SimPool key names; ValueError, before anything is written, for a backbone without an official counterpart).
    Returns the ``config.json`` content. The files are checked by reading them back.
    """
    cfg = dict(model.config)
    spec = timm_spec(cfg, layout)
    sd = export_state_dict(model, layout)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    st_path, pth_path, cfg_path = out / SAFETENSORS_NAME, out / PTH_NAME, out / CONFIG_NAME
    # config.json goes first and comes back last: a crash in between leaves weights without a config (refused by
    # every loader, timm's included), never new weights under an old config
    cfg_path.unlink(missing_ok=True)
    st_meta = {"format": "pt", "producer": EXPORT_FORMAT, "layout": spec["layout"]}
    write_atomic(st_path, lambda f: f.write(safetensors_bytes(sd, metadata=st_meta)))
    save_atomic(sd, pth_path)
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "arch": cfg["arch"],
        "pooling": cfg["pooling"],
        "gamma": cfg.get("gamma"),
        "patch_size": int(model.patch_size),
        "embed_dim": int(model.embed_dim),
        "img_size": cfg.get("img_size"),
        "is_vit": bool(model.is_vit),
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "layout": spec["layout"],
        "backbone": cfg,
        "timm": spec,
        "training_config_sha256": config_digest(training_config),
        "source": source or {},
        "files": {SAFETENSORS_NAME: file_sha256(st_path), PTH_NAME: file_sha256(pth_path)},
        **_timm_folder_config(spec, cfg, int(model.embed_dim)),  # timm.create_model("local-dir:<folder>") reads these
    }
    text = json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(cfg_path, lambda f: f.write(text.encode()))
    for f in (st_path, pth_path):  # read back: same keys, same tensors
        back = read_export_weights(f)
        if back.keys() != sd.keys() or any(not torch.equal(back[k], sd[k]) for k in sd):
            raise CheckpointError(f"export check failed: {f} does not read back to the exported tensors")
    return meta


def export_checkpoint(checkpoint, output_dir, checkpoint_key: str = "teacher", layout: str = "auto",
                      **overrides) -> dict:
    """Export the ``checkpoint_key`` backbone (``teacher`` or ``student``) of a training checkpoint.

    The backbone config comes from ``ckpt["config"]["backbone"]`` (or ``overrides``); ``module.``/``backbone.`` are
    stripped and the DINO head dropped by :func:`dino_simpool.models.weights.build_backbone_from_checkpoint`, which
    loads strictly. ``layout`` as :func:`export_backbone`. Returns the ``config.json`` content.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pth"
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and ("teacher" in obj or "student" in obj) and checkpoint_key not in obj:
        raise CheckpointError(f"{path} has no {checkpoint_key!r} entry; choose --key from "
                              f"{[k for k in ('teacher', 'student') if k in obj]}")
    model, report = build_backbone_from_checkpoint(path, checkpoint_key=checkpoint_key, **overrides)
    train_cfg = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    source = {
        "checkpoint": str(path),
        "checkpoint_key": report.get("checkpoint_key"),
        "checkpoint_format": report.get("format"),
        "epoch": obj.get("epoch") if isinstance(obj, dict) else None,
        "iteration": obj.get("iteration") if isinstance(obj, dict) else None,
        "dropped": len(report.get("dropped", [])),
    }
    return export_backbone(model.eval(), output_dir, training_config=train_cfg, source=source, layout=layout)


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
def read_export_weights(path) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or ``.pth`` (``weights_only=True``: pickled code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors has its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    else:
        sd = load_checkpoint(path)  # weights_only=True; CheckpointError on pickled code
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a plain state dict (a non-empty dict of tensors)")
    return sd


def resolve_export(path) -> tuple[Path, Path]:
    """(weights file, config.json) of an export folder or of a weights file in one; safetensors preferred."""
    path = Path(path)
    if path.is_dir():
        folder = path
        weights = next((folder / n for n in (SAFETENSORS_NAME, PTH_NAME) if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder} is not an export folder: it has neither {SAFETENSORS_NAME} nor {PTH_NAME} "
                                  f"(write one with dino-simpool-export)")
    elif path.is_file():
        folder, weights = path.parent, path
    else:
        raise CheckpointError(f"export not found: {path}")
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: an exported backbone needs its config.json beside the weights "
                              f"(re-run dino-simpool-export)")
    return weights, cfg


def read_export_config(path) -> dict[str, Any]:
    _, cfg_path = resolve_export(path)
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("backbone"), dict):
        raise CheckpointError(f"{cfg_path} is not a {EXPORT_FORMAT} config (no 'format'/'backbone' entries)")
    if meta.get("format_version", 0) > EXPORT_VERSION:
        raise CheckpointError(f"{cfg_path} has format_version {meta['format_version']}; this code reads up to "
                              f"{EXPORT_VERSION} (upgrade dino-simpool)")
    return meta


def load_exported(path, map_location: str | torch.device = "cpu"):
    """Rebuild an exported backbone from its folder (or one of its weight files) and ``config.json`` alone.

    A folder holding both files is read from ``backbone.safetensors``; ``.pth`` files are read with
    ``weights_only=True``. Every layout (timm, dino_simpool, official) loads, strictly. The model keeps the exported
    backbone's ``compat`` (an official-layout export of a ``compat=None`` model gives that model's features; set
    ``model.set_compat("official")`` for the official code's). Returns the
    :class:`~dino_simpool.models.backbones.Backbone` in eval mode.
    """
    weights, cfg_path = resolve_export(path)
    meta = read_export_config(path)
    check_export_digest(weights, meta, cfg_path)
    sd = read_export_weights(weights)
    model = build_backbone(**meta["backbone"])
    mapped = import_state_dict(sd, meta["backbone"], meta.get("layout", "dino_simpool"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = [k for k in mapped if k in expected and mapped[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{weights} does not match its config.json ({meta['arch']}/{meta['pooling']}): "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}")
    model.load_state_dict(mapped, strict=True)
    return model.to(map_location).eval()


__all__ = [
    "export_backbone",
    "export_checkpoint",
    "export_state_dict",
    "official_state_dict",
    "import_state_dict",
    "resolve_layout",
    "LAYOUT_CHOICES",
    "load_exported",
    "read_export_config",
    "read_export_weights",
    "resolve_export",
    "timm_spec",
    "config_digest",
]
