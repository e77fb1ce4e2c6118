"""Exported backbones: a folder with ``backbone.safetensors``, ``backbone.pth`` (a plain state dict) and
``config.json``, written from a training checkpoint and loaded back by :func:`load_exported` (and ``hubconf.py``).

Key layouts (``config.json["layout"]``):

* ``"timm"`` (pooling ``cls`` or ``gap``): the backbone *is* a timm model, and the keys are timm's: they load with
  no missing or unexpected key into ``timm.create_model(spec["model_name"], pretrained=True,
  pretrained_cfg_overlay=dict(file=".../backbone.safetensors"), num_classes=0, **spec["kwargs"])`` where
  ``spec = config["timm"]``, and that model computes the same features. ViT ``gap`` (ssl norm order: final
  LayerNorm *after* averaging the patch tokens) is timm's ``global_pool="avg"`` whose LayerNorm is ``fc_norm``, so
  the final norm is exported as ``fc_norm.*``.
* ``"dino_simpool"`` (SimPool and every other pooling): this project's keys, ``encoder.*`` (the timm model, timm
  names after the prefix) and ``pool.*`` (the pooling). Rebuild with ``build_backbone(**config["backbone"])``, which
  :func:`load_exported` does from ``config.json`` alone. The timm equivalent of a SimPool ViT: the ``encoder.*``
  tensors load strictly into ``timm.create_model(name, class_token=False, global_pool="", num_classes=0, ...)``
  (``config["timm"]``), the ``pool.*`` tensors into ``dino_simpool.pooling.SimPool``; the forward is
  ``norm(simpool(blocks(patch_embed + pos_embed)))``: SimPool runs on the last block's un-normalised patch tokens
  and the ViT's final LayerNorm on the pooled vector (see docs/export.md).

Reading never unpickles code: ``.pth`` files go through ``torch.load(weights_only=True)``, and a folder with both
files is read from the safetensors one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from dino_simpool.checkpoint import CheckpointError, load_checkpoint

EXPORT_FORMAT = "dino-simpool-export"
EXPORT_VERSION = 1
SAFETENSORS_NAME = "backbone.safetensors"
PTH_NAME = "backbone.pth"
CONFIG_NAME = "config.json"
TIMM_LAYOUT_POOLINGS = ("cls", "gap")


# ----------------------------------------------------------------------------------------------------------------------
# timm correspondence
# ----------------------------------------------------------------------------------------------------------------------
def _vit_timm_name(arch: str, patch_size: int) -> tuple[str, bool]:
    """timm model name for a ViT arch; returns (name, whether patch_size must be passed as a kwarg)."""
    import timm

    name = f"{arch}_patch{patch_size}_224"
    if name in timm.list_models(name):
        return name, False
    return f"{arch}_patch16_224", True


def timm_spec(config: dict[str, Any]) -> dict[str, Any]:
    """How a backbone with this ``Backbone.config`` maps onto timm: ``model_name``, ``kwargs`` for
    ``timm.create_model`` (besides ``num_classes=0``), ``layout`` (see the module docstring), ``complete`` (whether
    the timm model alone is the whole backbone) and a ``note``."""
    from dino_simpool.models.backbones import CONVNEXT_ARCHS, RESNET_ARCHS, VIT_ARCHS

    arch, pooling = config["arch"], config["pooling"]
    layout = "timm" if pooling in TIMM_LAYOUT_POOLINGS else "dino_simpool"
    kwargs: dict[str, Any] = {}
    if arch in VIT_ARCHS:
        name, pass_patch = _vit_timm_name(arch, config["patch_size"])
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
    elif arch in RESNET_ARCHS or arch in CONVNEXT_ARCHS:
        name = RESNET_ARCHS.get(arch) or CONVNEXT_ARCHS[arch]
        convnext = arch in CONVNEXT_ARCHS
        if pooling == "gap":
            note = "global average pooling" + (", then head.norm" if convnext else "")
        else:
            kwargs["global_pool"] = ""
            note = (f"timm gives the encoder only (encoder.* keys, prefix stripped): forward_features is the last "
                    f"stage's map; the {pooling} pooling (pool.* keys) replaces global average pooling"
                    + (", then head.norm on the pooled vector" if convnext else ""))
    else:
        raise ValueError(f"no timm correspondence for arch {arch!r}")
    return {"model_name": name, "kwargs": kwargs, "layout": layout, "complete": layout == "timm", "note": note}


def _fc_norm_rename(config: dict[str, Any]) -> bool:
    from dino_simpool.models.backbones import VIT_ARCHS

    return config["arch"] in VIT_ARCHS and config["pooling"] == "gap" and config.get("norm_order", "ssl") == "ssl"


def export_state_dict(model) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the export key names (see the module docstring); contiguous CPU copies."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if model.config["pooling"] not in TIMM_LAYOUT_POOLINGS:
        return sd
    extra = [k for k in sd if not k.startswith("encoder.")]
    if extra:
        raise ValueError(f"pooling {model.config['pooling']!r} has parameters outside the encoder ({extra[:3]}); "
                         f"it cannot use the timm layout")
    out = {k[len("encoder."):]: v for k, v in sd.items()}
    if _fc_norm_rename(model.config):
        out = {("fc_norm." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in out.items()}
    return out


def import_state_dict(sd: dict[str, torch.Tensor], config: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`export_state_dict`: export key names -> ``Backbone.state_dict()`` names."""
    if layout == "dino_simpool":
        return dict(sd)
    if layout != "timm":
        raise CheckpointError(f"unknown export layout {layout!r}; expected 'timm' or 'dino_simpool'")
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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_backbone(model, output_dir, training_config: dict | None = None, source: dict | None = None) -> dict:
    """Write ``backbone.safetensors``, ``backbone.pth`` and ``config.json`` for ``model`` into ``output_dir``.

    Returns the ``config.json`` content. The files are checked by reading them back.
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.config)
    spec = timm_spec(cfg)
    sd = export_state_dict(model)
    st_path, pth_path = out / SAFETENSORS_NAME, out / PTH_NAME
    save_file(sd, str(st_path), metadata={"format": "pt", "producer": EXPORT_FORMAT, "layout": spec["layout"]})
    torch.save(sd, pth_path)
    os.chmod(st_path, os.stat(pth_path).st_mode & 0o777)  # safetensors writes 0600; match the .pth (umask)
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
        "files": {SAFETENSORS_NAME: _file_sha256(st_path), PTH_NAME: _file_sha256(pth_path)},
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")
    for f in (st_path, pth_path):  # read back: same keys, same tensors
        back = read_export_weights(f)
        if back.keys() != sd.keys() or any(not torch.equal(back[k], sd[k]) for k in sd):
            raise CheckpointError(f"export check failed: {f} does not read back to the exported tensors")
    return meta


def export_checkpoint(checkpoint, output_dir, checkpoint_key: str = "teacher", **overrides) -> dict:
    """Export the ``checkpoint_key`` backbone (``teacher`` or ``student``) of a training checkpoint.

    The backbone config comes from ``ckpt["config"]["backbone"]`` (or ``overrides``); ``module.``/``backbone.`` are
    stripped and the DINO head dropped by :func:`dino_simpool.models.weights.build_backbone_from_checkpoint`, which
    loads strictly. Returns the ``config.json`` content.
    """
    from dino_simpool.models.weights import build_backbone_from_checkpoint, read_checkpoint

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
    return export_backbone(model.eval(), output_dir, training_config=train_cfg, source=source)


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
def read_export_weights(path) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or ``.pth`` (``weights_only=True``: pickled code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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
    ``weights_only=True``. Loading is strict. Returns the :class:`~dino_simpool.models.backbones.Backbone` in eval
    mode.
    """
    from dino_simpool.models.backbones import build_backbone

    weights, _ = resolve_export(path)
    meta = read_export_config(path)
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
    "import_state_dict",
    "load_exported",
    "read_export_config",
    "read_export_weights",
    "resolve_export",
    "timm_spec",
    "config_digest",
]
