"""``--layout official``: exports under the official DINO / SimPool key names.

The official models are re-written here, small, from the documented layout (shared/reference/simpool.md): DINO's ViT
and the official SimPool ViT (``blocks.*``, ``norm``, ``patch_embed``, ``cls_token`` / ``simpool.*``, ``pos_embed``,
the +0.1 position-embedding interpolation with the SimPool-mode quirk), ``sp.py``'s SimPool (batch-wide min),
torchvision's ResNet (the official resnet.py is a torchvision copy) and the FB ConvNeXt. Each export must load into
them with ``load_state_dict(strict=True)`` and through the official ``load_pretrained_weights`` procedure, give our
``compat="official"`` features, and round-trip through this project's own loaders.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from dino_simpool.checkpoint import save_atomic
from dino_simpool.export import (export_backbone, export_checkpoint, load_exported, official_state_dict,
                                 read_export_weights)
from dino_simpool.models import build_backbone, build_backbone_from_checkpoint, load_pretrained

REPO = Path(__file__).resolve().parents[1]
VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def randomize(model, seed=0, std=0.2):
    """Non-trivial weights everywhere (LayerNorm affine, beta, pos_embed, BatchNorm statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parent = name.split(".")[-2] if "." in name else ""
            base = 1.0 if "norm" in parent and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# The official modules, from the documented layout
# ---------------------------------------------------------------------------------------------------------------------
class OfficialSimPool(nn.Module):
    """sp.py: GAP query of the raw tokens, k = wk(LN x), v = LN x, softmax; γ: (a·(v − v.min() + eps)^γ)^(1/γ) + β with
    ONE min over the whole batch."""

    def __init__(self, dim, gamma=None, use_beta=False):
        super().__init__()
        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.gamma, self.eps, self.scale = gamma, 1e-6, dim ** -0.5
        if gamma is not None and use_beta:
            self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if x.ndim == 4:
            b, d, h, w = x.shape
            x = x.reshape(b, d, h * w).permute(0, 2, 1)
        u0 = x.mean(1, keepdim=True)
        kv = self.norm_patches(x)
        attn = ((self.wq(u0) @ self.wk(kv).transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.gamma is None:
            out = attn @ kv
        else:
            out = (attn @ (kv - kv.min() + self.eps).pow(self.gamma)).pow(1.0 / self.gamma)
            if hasattr(self, "beta"):
                out = out + self.beta
        return out.squeeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialViT(nn.Module):
    """mode "official": DINO's ViT (output norm(x)[:, 0]); mode "simpool": the official SimPool ViT (no class token,
    N position embeddings, output norm(SimPool(last block's tokens)))."""

    def __init__(self, mode, img_size, patch_size, embed_dim, depth, num_heads, gamma=None):
        super().__init__()
        self.mode = mode
        n = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        if mode == "official":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + (mode == "official"), embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if mode == "simpool":
            self.simpool = OfficialSimPool(embed_dim, gamma=gamma, use_beta=True)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1  # counts a class token even in simpool mode, where there is none
        prefix = 1 if self.mode == "official" else 0
        n = self.pos_embed.shape[1] - prefix
        if npatch == n and w == h:
            return self.pos_embed
        class_pos, patch_pos = self.pos_embed[:, :prefix], self.pos_embed[:, prefix:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_embed.patch_size + 0.1, h // self.patch_embed.patch_size + 0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                  scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos, patch_pos), dim=1)

    def forward(self, x):
        b, _, w, h = x.shape
        t = self.patch_embed(x)
        if self.mode == "official":
            t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        t = t + self.interpolate_pos_encoding(t, w, h)
        for blk in self.blocks:
            t = blk(t)
        if self.mode == "official":
            return self.norm(t)[:, 0]
        return self.norm(self.simpool(t))


class OfficialResNet(torchvision.models.ResNet):
    """The official resnet.py: torchvision's ResNet; simpool replaces avgpool + flatten; fc is Identity (DINO)."""

    def __init__(self, block, layers, mode="official", gamma=None):
        super().__init__(block, layers)
        self.fc = nn.Identity()
        if mode == "simpool":
            self.simpool = OfficialSimPool(512 * block.expansion, gamma=gamma)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if hasattr(self, "simpool"):
            return self.simpool(x)
        return torch.flatten(self.avgpool(x), 1)


class LayerNormCF(nn.Module):
    """The FB ConvNeXt LayerNorm, channels_first (eps 1e-6 in FB's code)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class FBBlock(nn.Module):
    def __init__(self, dim, eps, gelu):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(gelu), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXt(nn.Module):
    """The FB ConvNeXt of the official convnext.py (head replaced by Identity, as DINO's MultiCropWrapper does):
    simpool mode pools the stage-4 map with SimPool, then ``norm``; official mode is ``norm(GAP)``. FB's code has
    LayerNorm eps 1e-6 and exact GELU, as timm's convnext_tiny/small; timm's tiny ``test_convnext`` has eps 1e-5 and
    tanh GELU, which ``eps``/``gelu`` reproduce (same keys either way)."""

    def __init__(self, depths, dims, mode="official", gamma=None, eps=1e-6, gelu="none"):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNormCF(dims[0], eps))]
            + [nn.Sequential(LayerNormCF(dims[i], eps), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
               for i in range(3)])
        self.stages = nn.ModuleList([nn.Sequential(*[FBBlock(dims[i], eps, gelu) for _ in range(depths[i])])
                                     for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=eps)
        if mode == "simpool":
            self.simpool = OfficialSimPool(dims[-1], gamma=gamma)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(self.simpool(x) if hasattr(self, "simpool") else x.mean([-2, -1]))


def official_load_pretrained_weights(model, path, checkpoint_key="teacher"):
    """DINO's / SimPool's ``utils.load_pretrained_weights`` steps (simpool.md §4): torch.load, take checkpoint_key
    if there, strip module. and backbone., drop keys the model lacks, then load strictly. Returns the dropped keys."""
    sd = torch.load(path, map_location="cpu")
    if checkpoint_key in sd:
        sd = sd[checkpoint_key]
    sd = {k.replace("module.", "").replace("backbone.", ""): v for k, v in sd.items()}
    own = model.state_dict()
    dropped = [k for k in sd if k not in own]
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    return dropped


# (our arch, pooling, builder of the official model, input side) ----------------------------------------------------
def _official_vit(cfg):
    mode = "official" if cfg["pooling"] == "cls" else "simpool"
    return OfficialViT(mode, cfg["img_size"], cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"],
                       gamma=cfg["gamma"])


CASES = {
    "vit-cls": ("vit_tiny", "cls", VIT, _official_vit, 32),
    "vit-simpool": ("vit_tiny", "simpool", VIT, _official_vit, 32),
    "vit-simpool-nogamma": ("vit_tiny", "simpool", dict(VIT, gamma=None), _official_vit, 32),
    "resnet18-gap": ("resnet18", "gap", {}, lambda c: OfficialResNet(torchvision.models.resnet.BasicBlock,
                                                                      [2, 2, 2, 2]), 64),
    "resnet18-simpool": ("resnet18", "simpool", {}, lambda c: OfficialResNet(
        torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], "simpool", c["gamma"]), 64),
    "convnext_test-gap": ("convnext_test", "gap", {}, lambda c: OfficialConvNeXt(
        (1, 2, 4, 2), (24, 32, 48, 64), eps=1e-5, gelu="tanh"), 64),
    "convnext_test-simpool": ("convnext_test", "simpool", {}, lambda c: OfficialConvNeXt(
        (1, 2, 4, 2), (24, 32, 48, 64), "simpool", c["gamma"], eps=1e-5, gelu="tanh"), 64),
    "convnext_tiny-simpool": ("convnext_tiny", "simpool", {}, lambda c: OfficialConvNeXt(
        (3, 3, 9, 3), (96, 192, 384, 768), "simpool", c["gamma"]), 64),
}
_SLOW = {"resnet18-gap", "resnet18-simpool", "convnext_tiny-simpool"}
PARAMS = [pytest.param(k, id=k, marks=pytest.mark.slow) if k in _SLOW else pytest.param(k, id=k) for k in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_official_layout_loads_strictly_into_the_official_model(tmp_path, case):
    arch, pooling, kw, official_builder, side = CASES[case]
    ours = randomize(build_backbone(arch, pooling=pooling, **kw), seed=1)
    meta = export_backbone(ours, tmp_path / "exp", layout="official")
    assert meta["layout"] == "official"
    official = official_builder(ours.config).eval()
    sd = torch.load(tmp_path / "exp" / "backbone.pth", map_location="cpu", weights_only=True)
    official.load_state_dict(sd, strict=True)  # every key present, nothing extra, every shape right
    assert not any(k.startswith(("encoder.", "pool.")) for k in sd)
    # and through the official eval scripts' own loading procedure, from a plain file and from a training checkpoint
    fresh = official_builder(ours.config).eval()
    assert official_load_pretrained_weights(fresh, tmp_path / "exp" / "backbone.pth") == []
    save_atomic({"teacher": {"backbone." + k: v for k, v in sd.items()}, "epoch": 1}, tmp_path / "ckpt.pth")
    assert official_load_pretrained_weights(official_builder(ours.config).eval(), tmp_path / "ckpt.pth") == []
    ours.set_compat("official")  # batch-wide SimPool min, official pos-embed resampling
    sizes = (side, side + (8 if arch.startswith("vit") else 32))  # the stored grid and another one
    for s in sizes:
        x = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            ref = ours(x)
            tol = 2e-5 * max(1.0, ref.abs().max().item())  # fp32 round-off through deep random nets scales with |x|
            torch.testing.assert_close(official(x), ref, rtol=1e-5, atol=tol)
            torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=tol)


@pytest.mark.slow
def test_official_resnet50_keys_are_torchvision_plus_simpool():
    """ResNet-50 (the paper's): our official export has torchvision's resnet50 keys and shapes plus simpool.*."""
    ours = build_backbone("resnet50", pooling="simpool")
    sd = official_state_dict(ours)
    tv = OfficialResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], "simpool", 2.0)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    assert {k for k in sd if k.startswith("simpool.")} == {"simpool.norm_patches.weight", "simpool.norm_patches.bias",
                                                           "simpool.wq.weight", "simpool.wk.weight"}


ROUND_TRIP = [
    ("vit_tiny", "cls", VIT, 32), ("vit_tiny", "simpool", VIT, 32),
    ("resnet_test", "gap", {}, 64), ("resnet_test", "simpool", {}, 64),
    ("convnext_test", "gap", {}, 64), ("convnext_test", "simpool", {}, 64),
]


@pytest.mark.parametrize("arch,pooling,kw,side", ROUND_TRIP)
def test_official_layout_round_trips_through_our_loaders(tmp_path, arch, pooling, kw, side):
    """export official -> load_pretrained / build_backbone_from_checkpoint / load_exported -> identical features."""
    ours = randomize(build_backbone(arch, pooling=pooling, **kw), seed=2)
    export_backbone(ours, tmp_path / "exp", layout="official")
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(x)
        assert torch.equal(load_exported(tmp_path / "exp")(x), ref)  # keeps the exported model's compat (None)
        assert torch.equal(load_exported(tmp_path / "exp" / "backbone.pth")(x), ref)
        built, report = build_backbone_from_checkpoint(tmp_path / "exp")
        assert report["config_source"] == "config.json"
        assert torch.equal(built.eval()(x), ref)
        hub = torch.hub.load(str(REPO), f"{arch}_{pooling}", source="local", weights=str(tmp_path / "exp"))
        assert torch.equal(hub(x), ref)
        # the weights file alone, as a foreign checkpoint: the loader recognises the official format
        model = build_backbone(arch, pooling=pooling, **kw).eval()
        report = load_pretrained(model, tmp_path / "exp" / "backbone.pth", compat=None)
        assert report["format"] == ("simpool_official" if pooling == "simpool" else "dino")
        assert report["dropped"] == [] and torch.equal(model(x), ref)
        auto = build_backbone(arch, pooling=pooling, **kw).eval()
        load_pretrained(auto, tmp_path / "exp" / "backbone.safetensors")  # compat="auto"
        ours.set_compat("official")
        assert auto.compat == ("official" if pooling == "simpool" or arch.startswith("vit") else None)
        ours.set_compat(auto.compat)
        assert torch.equal(auto(x), ours(x))


def test_official_layout_key_names(tmp_path):
    """The documented names: ViT blocks.*/norm/patch_embed/pos_embed (+cls_token or simpool.*), ConvNeXt FB names."""
    vit = official_state_dict(build_backbone("vit_tiny", pooling="simpool", **VIT))
    assert "cls_token" not in vit and vit["pos_embed"].shape == (1, 16, 32)
    assert {"simpool.beta", "simpool.wq.weight", "norm.weight", "patch_embed.proj.weight",
            "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.bias"} <= set(vit)
    cls = official_state_dict(build_backbone("vit_tiny", pooling="cls", **VIT))
    assert cls["pos_embed"].shape == (1, 17, 32) and cls["cls_token"].shape == (1, 1, 32)
    cnx = official_state_dict(build_backbone("convnext_test", pooling="simpool"))
    assert {"downsample_layers.0.0.weight", "downsample_layers.3.1.weight", "stages.2.3.dwconv.weight",
            "stages.3.1.pwconv2.bias", "stages.0.0.gamma", "norm.weight", "simpool.wk.weight"} <= set(cnx)
    assert not any(k.startswith(("stem.", "head.", "encoder.")) for k in cnx)


@pytest.mark.parametrize("arch,pooling,kw,match", [
    ("vit_tiny", "gap", VIT, "vit_tiny/gap has no official DINO/SimPool counterpart"),
    ("vit_tiny", "gem", VIT, "vit_tiny/gem has no official"),
    ("vit_tiny", "simpool", dict(VIT, norm_order="supervised"), "norm_order='supervised' has no official"),
    ("vit_tiny", "simpool", dict(VIT, qkv_bias=True), "differs from the official module"),
])
def test_official_layout_refuses_what_has_no_official_counterpart(tmp_path, arch, pooling, kw, match):
    model = build_backbone(arch, pooling=pooling, **kw)
    with pytest.raises(ValueError, match=match):
        export_backbone(model, tmp_path / "exp", layout="official")
    assert not (tmp_path / "exp").exists()  # refused before anything is written


def test_export_cli_layout_official(tmp_path, capsys):
    from eval.export import main

    model = randomize(build_backbone("vit_tiny", pooling="simpool", **VIT), seed=4)
    head = {"head.mlp.0.weight": torch.randn(8, 32)}
    save_atomic({"teacher": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, **head},
                 "config": {"backbone": dict(model.config)}, "epoch": 1}, tmp_path / "checkpoint.pth")
    assert main(["--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "exp"), "--layout", "official"]) == 0
    out = capsys.readouterr().out
    assert "layout official" in out and "official layout:" in out
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert meta["layout"] == "official" and meta["timm"]["complete"] is False
    official = _official_vit(model.config).eval()
    official_load_pretrained_weights(official, tmp_path / "exp" / "backbone.pth")
    model.set_compat("official")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(official(x), model(x), rtol=1e-5, atol=1e-5)
    # the library call writes the same tensors as the command line
    export_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "exp2", layout="official")
    a, b = (read_export_weights(tmp_path / d / "backbone.safetensors") for d in ("exp", "exp2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a backbone without an official counterpart: exit 2, one line
    gap = build_backbone("vit_tiny", pooling="gap", **VIT)
    save_atomic({"teacher": {f"backbone.{k}": v for k, v in gap.state_dict().items()},
                 "config": {"backbone": dict(gap.config)}}, tmp_path / "gap.pth")
    assert main(["--checkpoint", str(tmp_path / "gap.pth"), "--output_dir", str(tmp_path / "e3"),
                 "--layout", "official"]) == 2
    err = capsys.readouterr().err
    assert "has no official DINO/SimPool counterpart" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "e4"), "--layout", "dino"])
    assert e.value.code == 2
