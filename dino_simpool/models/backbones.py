"""Backbones on timm models with a pluggable pooling: the named archs (DINO's ViT-T/S/B, ViT-L, ResNet-18/50,
ConvNeXt-T/S) and any timm model of the ViT/DeiT, ResNet/ResNeXt and ConvNeXt families (``resolve_arch``).

``build_backbone(arch, pooling="simpool", ...)`` returns a :class:`Backbone` whose ``forward(x)`` is the pooled
embedding (B, d). Where the pooling sits (SimPool paper, self-supervised code):

* ViT, ``simpool`` (and any pooling but ``cls``), ``norm_order="ssl"`` (default): no class token, N position
  embeddings; the pooling runs on the last block's *un-normalised* tokens and the ViT's final LayerNorm is applied to
  the pooled vector. SimPool has a ``beta`` when gamma is not None (as the official key sets).
  ``norm_order="supervised"``: final LayerNorm on the tokens, then the pooling (no norm after, no beta).
* ViT, ``cls``: DINO's model: [CLS] + N+1 position embeddings; the output is the final-norm [CLS].
  ``gap`` keeps the class token (the paper's GAP row) and averages the patch tokens.
* ResNet: the pooling replaces global average pooling on the layer4 map; no norm after. SimPool keeps PyTorch's
  default Linear init and has no beta, as the official ResNet.
* ConvNeXt: the pooling runs on the stage-4 map, then the head's final LayerNorm (official: ``norm(GAP)``).
* timm names (``deit_small_patch16_224``, ``resnet101``, ``convnext_base``, ``timm/<name>[.tag]``): timm builds the
  network without weights, with its classifier, its own pooling and ``fc_norm`` removed (ConvNeXt: also the
  ``_mlp`` models' pre-logits layer); the pooling then attaches exactly as above. Distilled DeiTs are refused
  (their distillation token only serves DeiT's teacher), and so are other timm families.

The state dict is ``encoder.*`` (the timm model, timm key names) plus ``pool.*`` (the pooling module, e.g.
``pool.wq.weight``): strip ``encoder.`` to get a timm state dict.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models import is_model_in_modules, model_entrypoint, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from dino_simpool.models.options import resolve_gamma, resolve_pooling
from dino_simpool.pooling import POOLINGS, SimPool, build_pooling, get_pooling_entry

# The named archs (DINO's and the paper's): ViTs built by this module, CNNs by their timm names. Any other timm model
# name of a supported family (FAMILY_MODULES) is accepted too, with or without a ``timm/`` prefix and a ``.tag``.
VIT_ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}
# DINO's first release named its ViTs after DeiT (``--arch deit_small``): the same networks
VIT_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small", "deit_base": "vit_base"}
RESNET_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "resnet_test": "test_resnet"}
CONVNEXT_ARCHS = {"convnext_tiny": "convnext_tiny", "convnext_small": "convnext_small", "convnext_test": "test_convnext"}
ARCHS = (*VIT_ARCHS, *RESNET_ARCHS, *CONVNEXT_ARCHS)
# timm modules whose models each family takes (DINO's torchvision CNN names, e.g. resnet101, resnext50_32x4d,
# wide_resnet50_2, convnext_base, are timm names of the same networks)
FAMILY_MODULES = {"vit": ("vision_transformer", "deit"), "resnet": ("resnet",), "convnext": ("convnext",)}
FAMILY_TITLES = {"vit": "ViT/DeiT (timm vision_transformer, deit)", "resnet": "ResNet/ResNeXt (timm resnet)",
                 "convnext": "ConvNeXt (timm convnext)"}
NORM_ORDERS = ("ssl", "supervised")
COMPATS = (None, "official")
_PATCH_IN_NAME = re.compile(r"_patch(\d+)")


def list_archs() -> list[str]:
    """The named archs; any timm model name of a supported family is accepted as well (see :func:`arch_family`)."""
    return list(ARCHS)


def supported_families() -> str:
    return "; ".join(FAMILY_TITLES.values())


@dataclass(frozen=True)
class ArchSpec:
    """How an ``arch`` name is built: ``family``; ``vit_cfg`` (this module's ViT) or ``timm_name`` (timm's model)."""

    family: str
    timm_name: str | None = None
    vit_cfg: dict[str, int] | None = None


def resolve_arch(arch: str) -> ArchSpec:
    """The named archs, DINO's aliases, and any timm model name of a supported family (``timm/`` prefix and
    ``.tag`` allowed; weights are never downloaded). ValueError naming the supported families otherwise."""
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"arch must be a model name such as vit_small, resnet50 or deit_small_patch16_224; got {arch!r}")
    name = VIT_ALIASES.get(arch, arch)
    if name in VIT_ARCHS:
        return ArchSpec("vit", vit_cfg=dict(VIT_ARCHS[name]))
    if arch in RESNET_ARCHS:
        return ArchSpec("resnet", timm_name=RESNET_ARCHS[arch])
    if arch in CONVNEXT_ARCHS:
        return ArchSpec("convnext", timm_name=CONVNEXT_ARCHS[arch])
    base = arch[len("timm/"):] if arch.startswith("timm/") else arch
    base, _ = split_model_name_tag(base)
    if not timm.is_model(base):
        raise ValueError(f"unknown arch {arch!r}: neither a named arch ({', '.join(ARCHS)}) nor a timm model name; "
                         f"supported timm families: {supported_families()} (list them with timm.list_models)")
    for family, modules in FAMILY_MODULES.items():
        if is_model_in_modules(base, list(modules)):
            return ArchSpec(family, timm_name=base)
    module = model_entrypoint(base).__module__.rsplit(".", 1)[-1]
    raise ValueError(f"arch {arch!r} is a timm {module} model, which is not a supported family; supported: "
                     f"{supported_families()}")


def arch_family(arch: str) -> str:
    """``vit``, ``resnet`` or ``convnext`` for any accepted arch name (see :func:`resolve_arch`); ValueError naming
    the supported families otherwise."""
    return resolve_arch(arch).family


class _ViT(VisionTransformer):
    """timm's VisionTransformer with a switch for the official DINO/SimPool position-embedding resampling.

    ``pos_embed_mode="timm"``: timm's ``resample_abs_pos_embed`` (identity at the build size).
    ``pos_embed_mode="official"``: the official ``interpolate_pos_encoding``: bicubic with
    ``scale_factor=((H + 0.1) / g, (W + 0.1) / g)`` on the g x g stored grid, skipped only when
    ``tokens - 1 == stored patches`` and the grid is square. Without a class token (SimPool mode) ``tokens - 1`` never
    equals the stored count, so the position embedding is always resampled, even at the build size.
    """

    pos_embed_mode: str = "timm"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_mode != "official":
            return super()._pos_embed(x)
        return official_pos_embed(self, x)


def official_pos_embed(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The official ``prepare_tokens``: class token (if any) + the officially resampled position embedding, for
    patch embeddings ``x`` (B, h, w, d) of a timm ViT with ``dynamic_img_size`` and a standard prefix."""
    b, h, w, c = x.shape  # dynamic_img_size: patch_embed gives NHWC
    x = x.reshape(b, h * w, c)
    n_prefix = vit.num_prefix_tokens
    if vit.cls_token is not None:
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + official_resample_pos_embed(vit.pos_embed, n_prefix, h, w)
    return vit.pos_drop(x)


def official_resample_pos_embed(pos_embed: torch.Tensor, n_prefix: int, h: int, w: int) -> torch.Tensor:
    """The official DINO/SimPool position-embedding interpolation for an h x w patch grid (see :class:`_ViT`)."""
    stored = pos_embed.shape[1] - n_prefix
    n_tokens = h * w + n_prefix
    if n_tokens - 1 == stored and h == w:
        return pos_embed
    prefix, patch = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    g = math.sqrt(stored)
    side = int(g)
    dim = pos_embed.shape[-1]
    grid = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"official pos-embed interpolation gave a {tuple(grid.shape[-2:])} grid for {(h, w)}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([prefix, patch], dim=1) if n_prefix else patch


class Backbone(nn.Module):
    """An encoder (timm model, ``self.encoder``) followed by a pooling (``self.pool``). See the module docstring."""

    is_vit: bool = False

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.pooling = config["pooling"]
        self.pool: nn.Module | None = None

    # -- shared API -------------------------------------------------------------------------------------------------
    @property
    def compat(self) -> str | None:
        return self.config["compat"]

    def set_compat(self, compat: str | None) -> None:
        """``"official"``: batch-wide SimPool min (and, for ViTs, the official position-embedding resampling)."""
        if compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}; got {compat!r}")
        if isinstance(self.pool, SimPool):
            self.pool.min_over = "batch" if compat == "official" else self.config.get("min_over", "sample")
        self.config["compat"] = compat

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: the smallest input side that survives the encoder's strides (ViT: its patch size)
    min_input_size: int = 1

    def _check_input(self, x: torch.Tensor) -> None:
        """One clear error for the inputs that would otherwise fail deep inside torch or timm."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.config['arch']} expects a tensor of images (B, 3, H, W); got {type(x).__name__}")
        if x.ndim != 4:
            hint = " (one image? add the batch axis: x[None])" if x.ndim == 3 else ""
            raise ValueError(f"{self.config['arch']} expects images (B, 3, H, W); got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != 3:
            hint = " (channels-last? permute(0, 3, 1, 2))" if x.shape[-1] == 3 else ""
            raise ValueError(f"{self.config['arch']} expects 3 colour channels in axis 1; got shape "
                             f"{tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise ValueError(f"{self.config['arch']} expects floating-point images (normalised, e.g. from "
                             f"ToTensor + Normalize); got dtype {x.dtype}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"{self.config['arch']} needs images of at least {self.min_input_size} px a side; "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        param = next(self.parameters(), None)
        if (param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"input dtype {x.dtype} differs from the model's {param.dtype}: cast the input "
                             f"(x.to({param.dtype})) or run under torch.autocast")

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pooled_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        raise NotImplementedError

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        raise ValueError(f"get_intermediate_layers is for ViTs; {self.config['arch']} is a CNN (use pooled_layers(x, 1))")

    def _pool_attention(self, feats: torch.Tensor) -> torch.Tensor:
        """The pooling's attention over locations (poolings without one raise ValueError)."""
        _, attn = self.pool(feats, return_attention=True)
        return attn

    def extra_repr(self) -> str:
        return f"arch={self.config['arch']}, pooling={self.pooling!r}, embed_dim={self.embed_dim}"


class ViTBackbone(Backbone):
    is_vit = True

    def __init__(self, config: dict[str, Any], encoder: VisionTransformer, pool_options: dict[str, Any]):
        super().__init__(config)
        pooling, norm_order = config["pooling"], config["norm_order"]
        self.encoder = encoder
        if self.encoder.cls_token is not None:  # DINO's init (timm uses N(0, 1e-6))
            nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        self.embed_dim = int(encoder.embed_dim)
        heads = getattr(getattr(encoder.blocks[0], "attn", None), "num_heads", None)
        self.num_heads = int(heads) if heads is not None else None  # None: blocks without one attention module
        self.depth = len(encoder.blocks)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.min_input_size = self.patch_size
        self.norm_order = norm_order
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        if pooling == "cls":
            if pool_options:
                raise ValueError(f"pooling='cls' (the ViT's own [CLS] token) takes no pooling options; got "
                                 f"{', '.join(sorted(pool_options))}")
            self.pool = None
        else:
            opts: dict[str, Any] = {}
            if pooling == "simpool":
                gamma = config["gamma"]
                opts = dict(num_heads=1, gamma=gamma, use_beta=gamma is not None and norm_order == "ssl")
            elif pooling == "gem":
                opts = dict(shift=True)  # ViT tokens are signed: clamping at eps would drop every negative value
            opts.update(pool_options)
            self.pool = build_pooling(pooling, self.embed_dim, **opts)
        self.set_compat(config["compat"])

    def set_compat(self, compat: str | None) -> None:
        if compat == "official" and not _standard_pos_embed(self.encoder):
            raise ValueError(f"compat='official' reproduces the official ViT's position embedding; "
                             f"{self.config['arch']} has another layout (register tokens or no embedding for the "
                             f"class token): leave compat unset")
        super().set_compat(compat)
        self.encoder.pos_embed_mode = "official" if compat == "official" else "timm"

    # -- token path -------------------------------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        self._check_input(x)
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}; resize or crop it")
        return h // p, w // p

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._grid(x)
        enc = self.encoder
        x = enc.patch_embed(x)
        x = official_pos_embed(enc, x) if self.compat == "official" else enc._pos_embed(x)
        x = enc.patch_drop(x)
        return enc.norm_pre(x)

    def _blocks(self, x: torch.Tensor, n_last: int) -> list[torch.Tensor]:
        """Outputs (un-normalised) of the last ``n_last`` blocks."""
        x = self._embed(x)
        out = []
        blocks = self.encoder.blocks
        for i, blk in enumerate(blocks):
            x = blk(x)
            if len(blocks) - i <= n_last:
                out.append(x)
        return out

    def _call_pool(self, tokens: torch.Tensor, grid: tuple[int, int], return_attention: bool = False):
        if getattr(self.pool, "uses_grid", False):
            return self.pool(tokens, return_attention=return_attention, grid=grid)
        return self.pool(tokens, return_attention=return_attention) if return_attention else self.pool(tokens)

    def _pool_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Un-normalised block output (B, T, d) -> pooled, normed (B, d)."""
        norm = self.encoder.norm
        if self.pool is None:
            return norm(tokens)[:, 0]
        tokens = tokens[:, self.num_prefix_tokens:]
        if self.norm_order == "ssl":
            return norm(self._call_pool(tokens, grid))
        return self._call_pool(norm(tokens), grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's tokens (B, T, d), T = N patches (+1 with a class token, which comes first): ssl order
        un-normalised (what SimPool sees); supervised order and cls: after the final norm."""
        t = self._blocks(x, 1)[-1]
        if self.pool is None or self.norm_order == "supervised":
            t = self.encoder.norm(t)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool_tokens(self._blocks(x, 1)[-1], self._grid(x))

    def pooled_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The pooled, normed vector of each of the last ``n`` blocks (cls: final-norm [CLS], as DINO's linear eval)."""
        _check_n(n, self.depth)
        grid = self._grid(x)
        return [self._pool_tokens(t, grid) for t in self._blocks(x, n)]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """DINO semantics: the final-norm outputs (all tokens) of the last ``n`` blocks."""
        _check_n(n, self.depth)
        return [self.encoder.norm(t) for t in self._blocks(x, n)]

    # -- attention maps ---------------------------------------------------------------------------------------------
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """cls: ``heads`` (B, heads, h, w), the last block's [CLS]-to-patch attention per head, and ``mean_blocks``
        (B, h, w), the mean over blocks of the head-averaged [CLS] attention (both rows of a softmax over
        [CLS] + patches, so they sum to 1 minus the [CLS] self-weight). Other poolings: ``pool`` (B, h, w).

        The blocks keep fused attention; the [CLS] rows are recomputed explicitly from each block's attention input
        by a forward pre-hook on its ``attn`` module, only during this call.
        """
        h, w = self._grid(x)
        b = x.shape[0]
        if self.pool is not None:
            tokens = self.forward_features(x)[:, self.num_prefix_tokens:]
            _, attn = self._call_pool(tokens, (h, w), return_attention=True)
            return {"pool": attn.reshape(b, h, w)}
        if not all(type(getattr(blk, "attn", None)) is Attention for blk in self.encoder.blocks):
            raise ValueError(f"[CLS] attention maps need timm's standard attention (timm.layers.Attention) in "
                             f"every block; {self.config['arch']} has other blocks")
        rows: list[torch.Tensor] = []
        with _cls_attention_hooks(self.encoder.blocks, rows):
            self._blocks(x, 1)
        patch_rows = [r[:, :, self.num_prefix_tokens:] for r in rows]  # (B, heads, h*w)
        heads = patch_rows[-1].reshape(b, -1, h, w)
        mean_blocks = torch.stack([r.mean(1) for r in patch_rows]).mean(0).reshape(b, h, w)
        return {"heads": heads, "mean_blocks": mean_blocks}


def _cls_row_attention(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the first token's query over all keys, (B, heads, T), computed explicitly."""
    b, t, _ = x.shape
    qkv = attn_mod.qkv(x).reshape(b, t, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    logits = (q[:, :, :1] * attn_mod.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
    return logits.softmax(dim=-1)[:, :, 0]


@contextmanager
def _cls_attention_hooks(blocks: nn.Module, rows: list[torch.Tensor]):
    handles = [
        blk.attn.register_forward_pre_hook(lambda mod, args: rows.append(_cls_row_attention(mod, args[0])))
        for blk in blocks
    ]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def explicit_attention(model: Backbone):
    """Temporarily run this model's ViT blocks with explicit (non-fused) attention, e.g. to benchmark the fused
    path. Only the blocks of ``model`` are switched, and they are restored on exit."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.fused_attn = s


def _check_n(n: int, depth: int) -> None:
    if not isinstance(n, int) or not 1 <= n <= depth:
        raise ValueError(f"n must be an integer in [1, {depth}] (the number of last blocks); got {n!r}")


class CNNBackbone(Backbone):
    """ResNet or ConvNeXt from timm; the pooling replaces GAP on the last stage's map."""

    def __init__(self, config: dict[str, Any], timm_name: str, family: str, pool_options: dict[str, Any]):
        super().__init__(config)
        self.family = family
        kwargs: dict[str, Any] = dict(num_classes=0, drop_path_rate=config["drop_path_rate"])
        if family == "resnet":
            kwargs["zero_init_last"] = False  # torchvision / official init
        self.encoder = timm.create_model(timm_name, pretrained=False, **kwargs)
        head = getattr(self.encoder, "head", None)
        if family == "convnext" and not isinstance(getattr(head, "pre_logits", nn.Identity()), nn.Identity):
            head.pre_logits = nn.Identity()  # convnext_*_mlp's pre-logits MLP belongs to the removed classifier
        self.embed_dim = self.encoder.num_features
        self.patch_size = int(self.encoder.feature_info[-1]["reduction"])
        if family == "convnext":  # its 2x2 downsampling convolutions need every stage at least 2 px wide
            self.min_input_size = self.patch_size
        pooling = config["pooling"]
        opts: dict[str, Any] = {}
        if pooling == "simpool":
            opts = dict(num_heads=1, gamma=config["gamma"], use_beta=False)
            if family == "resnet":
                opts["init"] = "default"  # official ResNet keeps PyTorch's default Linear init
        elif pooling == "gem" and family == "convnext":
            opts = dict(shift=True)  # ConvNeXt maps are signed (ResNet's are post-ReLU, where GeM's clamp is right)
        opts.update(pool_options)
        self.pool = build_pooling(pooling, self.embed_dim, **opts)
        self.set_compat(config["compat"])

    def _head_norm(self, v: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.encoder.head, "norm", None) if self.family == "convnext" else None
        if norm is None:  # ResNets; ConvNeXts with head_norm_first normalise the map in forward_features instead
            return v
        return norm(v[:, :, None, None]).flatten(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, d, h, w) (ConvNeXt: before the final norm)."""
        self._check_input(x)
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head_norm(self.pool(self.forward_features(x)))

    def pooled_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        if n != 1:
            raise ValueError(f"CNN backbones have one pooled layer; pooled_layers needs n=1, got n={n!r}")
        return [self.forward(x)]

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pool``: the pooling's attention over the last map's locations, (B, h, w)."""
        attn = self._pool_attention(self.forward_features(x))
        return {"pool": attn}


def _standard_pos_embed(vit: VisionTransformer) -> bool:
    """Whether the official position-embedding resampling applies: one embedding per prefix token and patch."""
    n_prefix = 1 if vit.cls_token is not None else 0
    return (vit.pos_embed is not None and not getattr(vit, "no_embed_class", False)
            and vit.num_prefix_tokens == n_prefix)


def _dino_vit_encoder(vit_cfg: dict[str, int], patch_size: int, img_size: Any, class_token: bool,
                      drop_path_rate: float) -> _ViT:
    """DINO's ViT (qkv bias, MLP ratio 4, LayerNorm eps 1e-6) on timm's VisionTransformer."""
    return _ViT(img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="", class_token=class_token,
                dynamic_img_size=True, drop_path_rate=drop_path_rate, qkv_bias=True, mlp_ratio=4.0,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **vit_cfg)


def _timm_vit_encoder(arch: str, timm_name: str, class_token: bool, drop_path_rate: float,
                      overrides: dict[str, Any]) -> VisionTransformer:
    """timm's own ViT/DeiT ``timm_name`` (no weights), with its classifier, pooling and ``fc_norm`` removed (the
    final ``norm`` is kept: the pooled vector goes through it as in this module's ViTs) and ``overrides``."""
    if "distilled" in timm_name:
        raise ValueError(f"arch {arch!r} is a distilled DeiT: its distillation token only serves DeiT's training "
                         f"from a CNN teacher; use the same network without it, "
                         f"{timm_name.replace('_distilled', '')}")
    kwargs: dict[str, Any] = dict(num_classes=0, global_pool="", fc_norm=False, class_token=class_token,
                                  dynamic_img_size=True, drop_path_rate=drop_path_rate, **overrides)
    enc = timm.create_model(timm_name, pretrained=False, **kwargs)
    if not isinstance(enc, VisionTransformer):
        raise ValueError(f"arch {arch!r} builds a timm {type(enc).__name__}, not a VisionTransformer; supported: "
                         f"{supported_families()}")
    patch = enc.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"arch {arch!r} has non-square patches {tuple(patch)}; use a model with square patches")
    return enc


def build_backbone(
    arch: str,
    pooling: str = "simpool",
    gamma: float | str | None = "default",
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    img_size: int | tuple[int, int] | list[int] | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    norm_order: str = "ssl",
    compat: str | None = None,
    **pool_options,
) -> Backbone:
    """Build ``arch`` with ``pooling`` (a registry name, ``cls``, ``gap`` or ``official``: DINO's pooling for the arch).

    arch: a named arch (:func:`list_archs`, DINO's ``deit_*`` aliases) or any timm model name of the ViT/DeiT,
    ResNet or ConvNeXt families (``deit_small_patch16_224``, ``resnet101``, ``convnext_base``, ``timm/<name>``;
    built by timm without weights, its own classifier and pooling removed); see :func:`resolve_arch`.
    gamma: SimPool's exponent; ``"default"`` = 1.25 for ViTs, 2.0 for CNNs; ``None`` = no power. Ignored by other
    poolings. patch_size / img_size / depth / embed_dim / num_heads: ViT only (``img_size`` sets the stored position
    embedding grid; any multiple of the patch size is accepted at run time); ``None`` = the arch's own (16 and 224
    for the named ViTs; a timm name's own, and a patch size in the name, ``..._patch8_...``, must not be
    contradicted). norm_order: ``"ssl"`` or ``"supervised"`` (ViT). compat: ``None`` or ``"official"`` (batch-wide
    SimPool min and the official ViT position-embedding resampling, to reproduce the official checkpoints'
    features). ``pool_options`` go to the pooling builder. ``build_backbone(**model.config)`` rebuilds the model.
    """
    spec = resolve_arch(arch)
    family = spec.family
    if pool_options.get("reduce") == "flatten":
        raise ValueError("reduce='flatten' makes the pooled vector k*d wide, but a backbone's embedding is d wide "
                         "(its norm and the heads are built for d): use reduce='mean' or 'project'")
    if not isinstance(pooling, str):
        raise ValueError(f"pooling must be a registry name, 'cls' or 'gap'; got {pooling!r}")
    pooling = resolve_pooling(pooling, family)  # "official" = DINO's pooling for the family (cls / gap)
    if pooling not in ("cls", "gap"):
        get_pooling_entry(pooling)  # unknown names raise ValueError listing the registry
    if norm_order not in NORM_ORDERS:
        raise ValueError(f"norm_order must be one of {NORM_ORDERS}; got {norm_order!r}")
    if compat not in COMPATS:
        raise ValueError(f"compat must be None or 'official'; got {compat!r}")
    if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate!r}")
    gamma = resolve_gamma(gamma, family)
    if isinstance(img_size, list):
        img_size = tuple(img_size)
    config = dict(
        arch=arch, pooling=pooling, gamma=gamma, patch_size=patch_size, drop_path_rate=float(drop_path_rate),
        img_size=img_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads, norm_order=norm_order,
        compat=compat, **pool_options,
    )
    if family == "vit":
        return _build_vit(spec, config, pool_options)
    for key, val in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if val is not None:
            raise ValueError(f"{key} is a ViT option; {arch} does not take it (leave it unset)")
    if norm_order != "ssl":
        raise ValueError(f"norm_order applies to ViTs; {arch} has one order (leave norm_order='ssl')")
    if pooling == "cls" and "cls" not in _registry_names():
        raise ValueError("pooling 'cls' for CNNs needs the registry's standalone 'cls' pooling, which is not available")
    # CNNs ignore patch_size and img_size; they are stored as the named archs always stored them
    config["patch_size"] = 16 if patch_size is None else patch_size
    config["img_size"] = _plain_size(224 if img_size is None else img_size)
    return CNNBackbone(config, spec.timm_name, family, pool_options)


def _plain_size(size: Any) -> Any:
    """A size as ``config`` stores it (plain data): an int, or a list of two."""
    return list(size) if isinstance(size, tuple) else size


def _build_vit(spec: ArchSpec, config: dict[str, Any], pool_options: dict[str, Any]) -> "ViTBackbone":
    arch, pooling = config["arch"], config["pooling"]
    patch_size, img_size = config["patch_size"], config["img_size"]
    for key in ("depth", "embed_dim", "num_heads"):
        val = config[key]
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{key} must be a positive integer; got {val!r}")
    if patch_size is not None and (not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1):
        raise ValueError(f"patch_size must be a positive integer; got {patch_size!r}")
    # [CLS] and the poolings flagged needs_token get a class token; the paper's GAP row keeps one too
    class_token = pooling in ("cls", "gap") or get_pooling_entry(pooling).needs_token
    if spec.vit_cfg is not None:
        vit_cfg = dict(spec.vit_cfg)
        vit_cfg.update({k: config[k] for k in ("depth", "embed_dim", "num_heads") if config[k] is not None})
        patch = 16 if patch_size is None else patch_size
        size = 224 if img_size is None else img_size
    else:
        vit_cfg = None
        named = _PATCH_IN_NAME.search(spec.timm_name)
        if named and patch_size is not None and patch_size != int(named[1]):
            raise ValueError(f"arch {arch!r} has patch size {named[1]} (in its name), but patch_size={patch_size} "
                             f"was given: leave patch_size unset, or name the model with that patch size (or "
                             f"use a named arch such as vit_small with patch_size={patch_size})")
        patch = patch_size if patch_size is not None else int(named[1]) if named else None
        size = img_size
    if vit_cfg is not None and vit_cfg["embed_dim"] % vit_cfg["num_heads"]:
        raise ValueError(f"embed_dim={vit_cfg['embed_dim']} is not divisible by num_heads={vit_cfg['num_heads']}")
    if size is not None and patch is not None:
        sizes = size if isinstance(size, tuple) else (size, size)
        if any((not isinstance(v, int)) or v < patch or v % patch for v in sizes):
            raise ValueError(f"img_size {size!r} must be a multiple of patch_size={patch}")
        if config["compat"] == "official" and sizes[0] != sizes[1]:
            raise ValueError(f"compat='official' reproduces the official square position-embedding grid; "
                             f"img_size {size!r} is not square (use one size, e.g. img_size={sizes[0]})")
    if vit_cfg is not None:
        encoder = _dino_vit_encoder(vit_cfg, patch, size, class_token, config["drop_path_rate"])
    else:
        overrides = {k: config[k] for k in ("depth", "embed_dim", "num_heads") if config[k] is not None}
        if patch_size is not None:
            overrides["patch_size"] = patch_size
        if img_size is not None:
            overrides["img_size"] = img_size
        encoder = _timm_vit_encoder(arch, spec.timm_name, class_token, config["drop_path_rate"], overrides)
        if img_size is None:
            grid = tuple(int(v) for v in encoder.patch_embed.img_size)
            size = grid[0] if grid[0] == grid[1] else grid
        if config["compat"] == "official" and isinstance(size, tuple) and size[0] != size[1]:
            raise ValueError(f"compat='official' reproduces the official square position-embedding grid; "
                             f"{arch} has a {size} grid")
    config["patch_size"] = int(encoder.patch_embed.patch_size[0])
    config["img_size"] = _plain_size(size)
    return ViTBackbone(config, encoder, pool_options)


def _registry_names() -> set[str]:
    return set(POOLINGS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
