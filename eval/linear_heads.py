"""Building blocks of the linear probe: feature sets, the frozen feature extractor and the many-heads module.

Feature sets (``--feature_sets``) are named ``last<N>`` or ``last<N>_avgpool``:

- ``last<N>``: the concatenation, oldest block first, of one vector per block for the last ``N`` blocks.
  For a ``cls`` ViT this vector is the final-normed [CLS] token of the block (DINO's ``get_intermediate_layers``
  semantics); for every other pooling (simpool, gap, gem, ...) it is the pooled, normed vector of the block
  (``Backbone.pooled_layers``). CNNs have one such vector only, so they accept ``last1`` alone.
- ``_avgpool`` appends the mean of the last block's normed patch tokens (DINO's ``--avgpool_patchtokens``; ViTs only).

All feature sets are computed from one frozen forward pass (``FeatureExtractor.pieces``): the deepest ``N`` asked for
is extracted once and shallower sets are slices of it. A pooled (non-``cls``) ViT that also asks for ``_avgpool``
needs one more pass through ``get_intermediate_layers``.

``LinearHeads`` holds one ``nn.Linear`` per (feature set, learning rate). Every head is initialised from its own
generator seeded with the same seed (weights N(0, 0.01), bias 0), so a head gets the same initial weights whether
it is trained alone or next to others, and the heads' gradients do not interact (the loss is the sum of per-head
cross-entropies). Each head is one SGD param group with its own learning rate.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_SET_RE = re.compile(r"^last(\d+)(_avgpool)?$")


@dataclass(frozen=True)
class FeatureSet:
    name: str
    n_blocks: int
    avgpool: bool


def parse_feature_set(name: str) -> FeatureSet:
    m = _SET_RE.match(str(name).strip())
    if not m or int(m.group(1)) < 1:
        raise ValueError(
            f"bad feature set {name!r}: use last<N> or last<N>_avgpool with N >= 1 (e.g. last1 last4 last4_avgpool)"
        )
    return FeatureSet(name=m.group(0), n_blocks=int(m.group(1)), avgpool=bool(m.group(2)))


def default_feature_set(n_last_blocks: int, avgpool_patchtokens: bool) -> str:
    return f"last{n_last_blocks}" + ("_avgpool" if avgpool_patchtokens else "")


def head_name(feature_set: str, lr: float) -> str:
    return f"{feature_set}_lr{lr:g}"


def backbone_pooling(backbone: nn.Module) -> str:
    config = getattr(backbone, "config", None) or {}
    return str(config.get("pooling", "simpool")).lower()


class FeatureExtractor(nn.Module):
    """Frozen backbone → ``{feature set name: (B, D_set)}``, from one forward pass.

    The backbone is put in eval mode and its parameters stop requiring grad. ``forward`` runs under ``no_grad``.
    """

    def __init__(self, backbone: nn.Module, feature_sets: list[str]):
        super().__init__()
        if not feature_sets:
            raise ValueError("at least one feature set is needed (e.g. --feature_sets last1)")
        self.backbone = backbone
        self.sets = [parse_feature_set(s) for s in feature_sets]
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"feature sets repeat a name: {names}")
        self.max_n = max(s.n_blocks for s in self.sets)
        self.need_avg = any(s.avgpool for s in self.sets)
        self.is_vit = bool(getattr(backbone, "is_vit", False))
        self.pooling = backbone_pooling(backbone)
        self.use_cls = self.is_vit and self.pooling == "cls"
        if not self.is_vit and self.max_n > 1:
            raise ValueError(
                f"a CNN backbone has one pooled vector, not one per block: feature set "
                f"{[s.name for s in self.sets if s.n_blocks > 1][0]!r} asks for {self.max_n} blocks. "
                f"Use --n_last_blocks 1 (or --feature_sets last1)"
            )
        if not self.is_vit and self.need_avg:
            raise ValueError(
                "--avgpool_patchtokens / *_avgpool feature sets need patch tokens, which only ViTs have; "
                "drop it for a CNN backbone"
            )
        depth = _vit_depth(backbone)
        if self.is_vit and depth is not None and self.max_n > depth:
            raise ValueError(f"feature sets ask for the last {self.max_n} blocks but the backbone has only {depth}")
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the backbone stays frozen in eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    def _patch_mean(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = int(getattr(self.backbone, "patch_size", 0) or 0)
        n_patches = (x.shape[-2] // p) * (x.shape[-1] // p) if p else tokens.shape[1]
        n_prefix = tokens.shape[1] - n_patches
        if n_prefix < 0:
            n_prefix = 1 if self.use_cls else 0
        return tokens[:, n_prefix:].mean(dim=1)

    @torch.no_grad()
    def pieces(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One vector per block for the last ``max_n`` blocks (oldest first), and the patch mean (or None)."""
        avg = None
        if self.use_cls:
            out = list(self.backbone.get_intermediate_layers(x, self.max_n))
            blocks = [o[:, 0] for o in out]
            if self.need_avg:
                avg = self._patch_mean(out[-1], x)
        else:
            blocks = list(self.backbone.pooled_layers(x, self.max_n))
            if self.need_avg:
                last = list(self.backbone.get_intermediate_layers(x, 1))[-1]
                avg = self._patch_mean(last, x)
        if len(blocks) != self.max_n:
            raise ValueError(f"the backbone returned {len(blocks)} block vectors; {self.max_n} were asked for")
        blocks = [b.float().flatten(1) for b in blocks]
        return blocks, (avg.float() if avg is not None else None)

    def assemble(self, blocks: list[torch.Tensor], avg: torch.Tensor | None) -> dict[str, torch.Tensor]:
        feats = {}
        for s in self.sets:
            parts = blocks[len(blocks) - s.n_blocks:]
            if s.avgpool:
                parts = parts + [avg]
            feats[s.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return feats

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.assemble(*self.pieces(x))

    # -- cached mode: one flat vector per image holding every piece, sliced back into sets later
    @torch.no_grad()
    def flat(self, x: torch.Tensor) -> torch.Tensor:
        blocks, avg = self.pieces(x)
        return torch.cat(blocks + ([avg] if avg is not None else []), dim=-1)

    def split_flat(self, flat: torch.Tensor, piece_dims: list[int]) -> dict[str, torch.Tensor]:
        chunks = list(torch.split(flat, piece_dims, dim=-1))
        if self.need_avg:
            return self.assemble(chunks[:-1], chunks[-1])
        return self.assemble(chunks, None)

    def piece_dims(self, x: torch.Tensor) -> list[int]:
        blocks, avg = self.pieces(x)
        return [b.shape[-1] for b in blocks] + ([avg.shape[-1]] if avg is not None else [])


class FlatFeatures(nn.Module):
    """Adapter for ``dino_simpool.evaluation.features.extract_features``: ``forward(x) -> (B, D_all)`` (every piece, concatenated)."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, x):
        return self.extractor.flat(x)


def _vit_depth(backbone: nn.Module) -> int | None:
    if isinstance(getattr(backbone, "depth", None), int):
        return backbone.depth
    config = getattr(backbone, "config", None) or {}
    if config.get("depth"):
        return int(config["depth"])
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        inner = getattr(backbone, "vit", None) or getattr(backbone, "model", None)
        blocks = getattr(inner, "blocks", None)
    return len(blocks) if blocks is not None else None


@dataclass(frozen=True)
class HeadSpec:
    name: str
    feature_set: str
    lr: float  # the base lr before the batch-size scaling
    in_dim: int

    def as_dict(self) -> dict:
        return {"name": self.name, "feature_set": self.feature_set, "lr": float(self.lr), "in_dim": int(self.in_dim)}


def make_specs(feature_sets: list[str], lrs: list[float], in_dims: dict[str, int]) -> list[HeadSpec]:
    specs = [HeadSpec(head_name(fs, lr), fs, float(lr), int(in_dims[fs])) for fs in feature_sets for lr in lrs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two heads would share a name (repeated --lrs?): {names}")
    return specs


class LinearHeads(nn.Module):
    """One linear classifier per ``HeadSpec``; ``forward(feats: dict) -> list of logits`` (spec order)."""

    def __init__(self, specs: list[HeadSpec], num_labels: int, seed: int = 0):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"--num_labels must be >= 1; got {num_labels}")
        self.specs = list(specs)
        self.num_labels = int(num_labels)
        self.heads = nn.ModuleList()
        for spec in self.specs:
            lin = nn.Linear(spec.in_dim, num_labels)
            g = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
                lin.bias.zero_()
            self.heads.append(lin)

    def forward(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(feats[spec.feature_set]) for spec, head in zip(self.specs, self.heads)]

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the per-head cross-entropies (heads do not interact) and the per-head values (detached)."""
        losses = torch.stack([F.cross_entropy(lg, labels) for lg in logits])
        return losses.sum(), losses.detach()

    def param_groups(self, lr_scale: float) -> list[dict]:
        return [
            {"params": list(head.parameters()), "lr": spec.lr * lr_scale, "base_lr": spec.lr * lr_scale,
             "name": spec.name}
            for spec, head in zip(self.specs, self.heads)
        ]

    def spec_dicts(self) -> list[dict]:
        return [s.as_dict() for s in self.specs]


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch, in closed form."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 hits (top-k capped at the number of classes)."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top.eq(labels.view(-1, 1))
    return int(hit[:, :1].sum()), int(hit.any(dim=1).sum())
