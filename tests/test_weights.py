"""Foreign weights: official SimPool parity against an independent re-derivation of the official ViT forward, and
round trips through load_pretrained / build_backbone_from_checkpoint of every format the test writes itself."""
import argparse
import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.models import build_backbone, build_backbone_from_checkpoint, load_pretrained
from dino_simpool.models.weights import infer_config

VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def randomize(model, seed=0, std=0.3):
    """Non-trivial weights everywhere (LayerNorm affine, beta, pos_embed...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def to_official_vit(sd):
    """Our keys -> the official SimPool/DINO ViT keys (timm names without ``encoder.``, ``simpool.*``)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("pool."):
            out["simpool." + k[5:]] = v
        else:
            out[k[len("encoder."):]] = v
    return out


def official_training_checkpoint(backbone_sd, ddp_teacher=False, extra_head=True, arch="vit_small", gamma=1.25):
    """A DINO/SimPool ``main_dino`` checkpoint: teacher/student, ``module.``/``backbone.`` prefixes, an
    ``argparse.Namespace`` under ``args``."""
    head = {"head.mlp.0.weight": torch.randn(8, 4), "head.last_layer.weight_g": torch.ones(16, 1)} if extra_head else {}
    wrapped = {**{"backbone." + k: v for k, v in backbone_sd.items()}, **head}
    teacher = {("module." + k if ddp_teacher else k): v for k, v in wrapped.items()}
    student = {"module." + k: v.clone() + 1.0 for k, v in wrapped.items()}  # must not be the one loaded
    return {"teacher": teacher, "student": student, "optimizer": {}, "epoch": 3,
            "args": argparse.Namespace(arch=arch, mode="simpool", gamma=gamma),
            "dino_loss": {"center": torch.zeros(1, 16)}}


# ---------------------------------------------------------------------------------------------------------------------
# An independent re-derivation of the official SimPool self-supervised ViT forward (simpool mode, one SimPool head),
# written from the reference description: pos-embed resampled with the +0.1 offset whenever tokens-1 != N (always, as
# there is no class token), explicit attention, SimPool with the batch-wide min, beta, then the final LayerNorm.
# ---------------------------------------------------------------------------------------------------------------------
def official_vit_forward(sd, x, patch, heads, gamma=None, eps=1e-6, mode="simpool"):
    """mode "simpool": the SimPool ViT (output: norm(SimPool(tokens))); "official": DINO's (output: norm(x)[:, 0])."""
    b, _, img_h, img_w = x.shape  # DINO names these (w, h): w0 = x.shape[2] // patch is the number of rows
    d = sd["pos_embed"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    if mode == "official":
        t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    pos = sd["pos_embed"]
    n_prefix = 1 if mode == "official" else 0
    n_stored = pos.shape[1] - n_prefix  # stored patch positions
    npatch = t.shape[1] - 1  # the quirk: in simpool mode this counts a class token that is not there
    if not (npatch == n_stored and img_h == img_w):
        side = n_stored ** 0.5
        grid = pos[:, n_prefix:].reshape(1, int(side), int(side), d).permute(0, 3, 1, 2)
        h0, w0 = img_h // patch + 0.1, img_w // patch + 0.1
        grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
        pos = torch.cat([pos[:, :n_prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    t = t + pos
    n = t.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + y
    if mode == "official":
        return F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 0]
    # SimPool: GAP query on raw tokens, keys/values = LN(tokens), batch-wide min, power mean, + beta
    u0 = t.mean(1, keepdim=True)
    xn = F.layer_norm(t, (d,), sd["simpool.norm_patches.weight"], sd["simpool.norm_patches.bias"], 1e-6)
    qq = F.linear(u0, sd["simpool.wq.weight"])
    kk = F.linear(xn, sd["simpool.wk.weight"])
    a = ((qq @ kk.transpose(-2, -1)) * d ** -0.5).softmax(-1)  # (B, 1, N)
    if gamma is None:
        pooled = (a @ xn).squeeze(1)
    else:
        pooled = (a @ (xn - xn.min() + eps).pow(gamma)).pow(1 / gamma).squeeze(1) + sd["simpool.beta"]
    return F.layer_norm(pooled, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)


@pytest.mark.parametrize("gamma", [1.25, None])
def test_official_simpool_vit_parity(tmp_path, gamma):
    src = randomize(build_backbone("vit_small", gamma=gamma, **VIT))
    official_sd = to_official_vit(src.state_dict())
    assert ("simpool.beta" in official_sd) == (gamma is not None)
    path = tmp_path / "checkpoint.pth"
    torch.save(official_training_checkpoint(official_sd), path)

    model = build_backbone("vit_small", gamma=gamma, **VIT).eval()
    assert model.compat is None
    report = load_pretrained(model, path)
    assert report["format"] == "simpool_official" and report["checkpoint_key"] == "teacher"
    assert report["compat"] == "official" and model.pool.min_over == "batch"
    g = torch.Generator().manual_seed(1)
    for h, w in ((32, 32), (16, 16), (32, 24)):
        x = torch.randn(4, 3, h, w, generator=g) * torch.tensor([0.3, 1.0, 2.0, 5.0]).view(4, 1, 1, 1)
        with torch.no_grad():
            ref = official_vit_forward(official_sd, x, 8, 2, gamma)
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
            # the compat switch is what makes it match (pos-embed resampling even at 32 px, batch-wide min)
            model.set_compat(None)
            assert (model(x) - ref).abs().max() > 1e-4
            model.set_compat("official")


def test_older_official_vit_layout(tmp_path):
    """(1, N+1, d) pos_embed without class token and the internal names attn.wq/attn.wk/attn.beta/norm_patches."""
    src = randomize(build_backbone("vit_small", **VIT))
    sd = to_official_vit(src.state_dict())
    sd["pos_embed"] = torch.cat([torch.randn(1, 1, 32), sd["pos_embed"]], dim=1)
    old = {}
    for k, v in sd.items():
        k = re.sub(r"^simpool\.(wq|wk|beta)", r"attn.\1", k)
        old[k.replace("simpool.norm_patches", "norm_patches")] = v
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model = build_backbone("vit_small", **VIT).eval()
    report = load_pretrained(model, path)
    assert any("slot 0" in n for n in report["notes"])
    x = torch.randn(2, 3, 32, 32)
    src.set_compat("official")
    torch.testing.assert_close(model(x), src.eval()(x))


# ---------------------------------------------------------------------------------------------------------------------
# DINO (cls) and timm formats
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "training", "training_ddp"])
def test_dino_vit_round_trip(tmp_path, layout):
    src = randomize(build_backbone("vit_small", pooling="cls", **VIT)).eval()
    dino_sd = {k[len("encoder."):]: v for k, v in src.state_dict().items()}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.weight"} <= set(dino_sd)
    obj = dino_sd if layout == "plain" else official_training_checkpoint(dino_sd, ddp_teacher=layout == "training_ddp")
    path = tmp_path / "dino.pth"
    torch.save(obj, path)
    model = build_backbone("vit_small", pooling="cls", **VIT).eval()
    report = load_pretrained(model, path)
    assert report["format"] == "dino" and report["compat"] == "official"
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_vit_forward(dino_sd, x, 8, 2, mode="official"),
                                   atol=1e-5, rtol=1e-5)
    if layout != "plain":
        assert report["stripped_prefixes"][-1] == "backbone." and report["checkpoint_key"] == "teacher"
        student = build_backbone("vit_small", pooling="cls", **VIT).eval()
        load_pretrained(student, path, checkpoint_key="student")
        assert not torch.allclose(student(x), model(x))


def test_dino_vit_features_equal_dino_at_every_crop_size(tmp_path):
    """DINO's interpolate_pos_encoding (bicubic, +0.1) away from the stored grid; at the stored grid, no resampling.
    timm's resampling (antialiased, no offset) differs there, which is what makes this test able to fail."""
    src = randomize(build_backbone("vit_small", pooling="cls", **VIT)).eval()
    dino_sd = {k[len("encoder."):]: v for k, v in src.state_dict().items()}
    path = tmp_path / "dino.pth"
    torch.save(official_training_checkpoint(dino_sd), path)
    model, report = build_backbone_from_checkpoint(path, num_heads=2, arch="vit_small")
    assert report["compat"] == "official"
    g = torch.Generator().manual_seed(3)
    for h, w in ((32, 32), (16, 16), (48, 48), (24, 40)):
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            ref = official_vit_forward(dino_sd, x, 8, 2, mode="official")
            torch.testing.assert_close(model.eval()(x), ref, atol=1e-5, rtol=1e-5)
            if (h, w) != (32, 32):
                assert (src(x) - ref).abs().max() > 1e-4  # timm's resampling is not DINO's


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_vit_weights_file(tmp_path, suffix):
    """A real timm VisionTransformer (with its 1000-class head) saved by timm naming loads into cls mode."""
    t = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                          num_heads=2, num_classes=10).eval()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save(t.state_dict(), path)
    else:
        save_file(t.state_dict(), str(path))
    model = build_backbone("vit_small", pooling="cls", **VIT).eval()
    report = load_pretrained(model, path)
    assert report["format"] == "timm" and set(report["dropped"]) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), t.forward_head(t.forward_features(x), pre_logits=True))


def test_timm_resnet_and_convnext_weights(tmp_path):
    for arch, timm_name in (("resnet_test", "test_resnet"), ("convnext_test", "test_convnext")):
        t = randomize(timm.create_model(timm_name, pretrained=False, num_classes=7)).eval()
        path = tmp_path / f"{arch}.pth"
        torch.save(t.state_dict(), path)
        model = build_backbone(arch, pooling="gap").eval()
        report = load_pretrained(model, path)
        assert report["format"] == "timm" and report["dropped"]
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model(x), t.forward_head(t.forward_features(x), pre_logits=True))


# ---------------------------------------------------------------------------------------------------------------------
# official SimPool CNN formats
# ---------------------------------------------------------------------------------------------------------------------
def test_official_simpool_resnet_round_trip(tmp_path):
    src = randomize(build_backbone("resnet_test", pooling="simpool")).eval()
    sd = {("simpool." + k[5:] if k.startswith("pool.") else k[len("encoder."):]): v for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(5, 96), torch.randn(5)  # classifier left in by the official code
    path = tmp_path / "resnet.pth"
    torch.save(official_training_checkpoint(sd, ddp_teacher=True, arch="resnet50", gamma=2.0), path)
    model = build_backbone("resnet_test", pooling="simpool").eval()
    report = load_pretrained(model, path)
    assert report["format"] == "simpool_official" and model.pool.min_over == "batch"
    assert set(report["dropped"]) == {"fc.weight", "fc.bias"}
    x = torch.randn(3, 3, 64, 64)
    src.set_compat("official")
    torch.testing.assert_close(model(x), src(x))


@pytest.mark.parametrize("stored", [None, "None", 3.0])
def test_official_cnn_gamma_comes_from_the_training_args(tmp_path, stored):
    """γ is not in the weights; official CNN checkpoints carry it in ``args`` (passed to student and teacher)."""
    gamma = None if stored in (None, "None") else stored
    src = randomize(build_backbone("resnet_test", pooling="simpool", gamma=gamma)).eval()
    sd = {("simpool." + k[5:] if k.startswith("pool.") else k[len("encoder."):]): v for k, v in src.state_dict().items()}
    ck = official_training_checkpoint(sd)
    ck["args"] = argparse.Namespace(arch="resnet50", mode="simpool", gamma=stored)
    path = tmp_path / "resnet.pth"
    torch.save(ck, path)
    model, report = build_backbone_from_checkpoint(path)
    assert model.config["gamma"] == gamma and "from the checkpoint's training args" in report["config_source"]
    src.set_compat("official")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x))
    assert build_backbone_from_checkpoint(path, gamma=1.5)[0].config["gamma"] == 1.5  # a flag still wins


def test_official_vit_teacher_keeps_gamma_1_25_student_takes_args(tmp_path):
    """The official ViT teacher is built without γ (always 1.25, simpool.md's teacher-γ bug); the student uses
    ``args.gamma``."""
    src = randomize(build_backbone("vit_small", **VIT))
    ck = official_training_checkpoint(to_official_vit(src.state_dict()))
    ck["args"] = argparse.Namespace(arch="vit_small", mode="simpool", gamma=2.0)
    path = tmp_path / "vit.pth"
    torch.save(ck, path)
    assert build_backbone_from_checkpoint(path, arch="vit_small", num_heads=2)[0].config["gamma"] == 1.25
    student, report = build_backbone_from_checkpoint(path, "student", arch="vit_small", num_heads=2)
    assert student.config["gamma"] == 2.0 and "gamma=2.0" in report["config_source"]


def test_dino_torchvision_resnet_format(tmp_path):
    """DINO's ResNet-50 backbone file: torchvision keys, ``fc`` removed (Identity): loads as GAP, same features."""
    t = randomize(timm.create_model("test_resnet", pretrained=False, num_classes=0)).eval()
    path = tmp_path / "dino_resnet.pth"
    torch.save({k: v for k, v in t.state_dict().items() if not k.startswith("fc.")}, path)
    model, report = build_backbone_from_checkpoint(path)
    assert report["format"] == "dino" and model.config["pooling"] == "gap" and report["compat"] is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), t(x))


def timm_convnext_to_fb(k):
    """timm ConvNeXt keys -> the FB/official layout (written independently of the loader's mapping)."""
    if k.startswith("stem."):
        return "downsample_layers.0." + k[len("stem."):]
    m = re.match(r"stages\.(\d+)\.downsample\.(.*)", k)
    if m:
        return f"downsample_layers.{m.group(1)}.{m.group(2)}"
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        rest = m.group(3).replace("conv_dw.", "dwconv.").replace("mlp.fc1.", "pwconv1.").replace("mlp.fc2.", "pwconv2.")
        return f"stages.{m.group(1)}.{m.group(2)}.{rest}"
    if k.startswith("head.norm."):
        return "norm." + k[len("head.norm."):]
    raise AssertionError(k)


def test_official_simpool_convnext_round_trip(tmp_path):
    src = randomize(build_backbone("convnext_test", pooling="simpool")).eval()
    sd = {}
    for k, v in src.state_dict().items():
        sd["simpool." + k[5:] if k.startswith("pool.") else timm_convnext_to_fb(k[len("encoder."):])] = v
    assert "downsample_layers.1.1.weight" in sd and "stages.3.1.pwconv2.weight" in sd and "norm.weight" in sd
    sd["head.weight"], sd["head.bias"] = torch.randn(1, 64), torch.randn(1)  # official num_classes=1 head
    path = tmp_path / "convnext.pth"
    torch.save(official_training_checkpoint(sd, arch="convnext_small", gamma=2.0), path)
    model = build_backbone("convnext_test", pooling="simpool").eval()
    report = load_pretrained(model, path)
    assert report["format"] == "simpool_official" and model.compat == "official"
    x = torch.randn(2, 3, 64, 64)
    src.set_compat("official")
    torch.testing.assert_close(model(x), src(x))
    # the arch, pooling and compat can be read off the keys alone
    built, rep = build_backbone_from_checkpoint(path)
    assert rep["config_source"] == "inferred (gamma=2.0 from the checkpoint's training args)"
    assert (built.config["arch"], built.config["pooling"], built.compat) == ("convnext_test", "simpool", "official")
    torch.testing.assert_close(built.eval()(x), src(x))


# ---------------------------------------------------------------------------------------------------------------------
# our own formats and build_backbone_from_checkpoint
# ---------------------------------------------------------------------------------------------------------------------
def test_own_training_checkpoint_and_overrides(tmp_path):
    src = randomize(build_backbone("vit_small", pooling="simpool", gamma=2.0, **VIT)).eval()
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["head.last_layer.weight"] = torch.randn(16, 8)
    ckpt = {"student": sd, "teacher": {k: v.clone() for k, v in sd.items()}, "epoch": 1,
            "config": {"backbone": dict(src.config), "lr": 0.1}}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    model, report = build_backbone_from_checkpoint(path)
    assert report["config_source"] == "checkpoint" and report["format"] == "dino_simpool"
    assert model.config == src.config and model.pool.gamma == 2.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), src(x))
    # flags win over the stored config (gamma is not stored in weights: any value loads)
    model2, _ = build_backbone_from_checkpoint(path, gamma=1.5, drop_path_rate=0.1)
    assert model2.pool.gamma == 1.5 and model2.config["drop_path_rate"] == 0.1
    # but a structural override that does not fit the weights is refused
    with pytest.raises(CheckpointError, match="missing keys"):
        build_backbone_from_checkpoint(path, pooling="cls")


def test_exported_folder_with_config_json(tmp_path):
    src = randomize(build_backbone("resnet_test", pooling="gem")).eval()
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"backbone": src.config, "epoch": 100}))
    model, report = build_backbone_from_checkpoint(folder)
    assert report["config_source"] == "config.json" and model.config == src.config
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), src(x))


def test_infer_config_from_foreign_keys(tmp_path):
    with torch.device("meta"):  # shapes only
        full = build_backbone("vit_small", pooling="cls", patch_size=8)
        full_sp = build_backbone("vit_base", gamma=None, depth=9)
    cfg = infer_config({k[len("encoder."):]: v for k, v in full.state_dict().items()})
    assert cfg == dict(arch="vit_small", patch_size=8, img_size=224, pooling="cls")
    cfg = infer_config(to_official_vit(full_sp.state_dict()))
    assert cfg == dict(arch="vit_base", patch_size=16, img_size=224, depth=9, pooling="simpool", compat="official",
                       gamma=None)
    with pytest.raises(ValueError, match="arch"):
        infer_config({"weird.weight": torch.zeros(1)})
    # a non-standard width: arch and num_heads come from flags, the rest from the weights
    src = randomize(build_backbone("vit_small", pooling="cls", **VIT)).eval()
    path = tmp_path / "dino.pth"
    torch.save({k[len("encoder."):]: v for k, v in src.state_dict().items()}, path)
    with pytest.raises(ValueError, match="arch"):
        build_backbone_from_checkpoint(path)
    model, report = build_backbone_from_checkpoint(path, arch="vit_small", num_heads=2)
    assert report["config_source"] == "inferred" and model.config == {**src.config, "compat": "official"}
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), src(x))


# ---------------------------------------------------------------------------------------------------------------------
# mismatches and unsafe files
# ---------------------------------------------------------------------------------------------------------------------
def test_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    src = build_backbone("vit_small", pooling="cls", **VIT)
    path = tmp_path / "dino.pth"
    torch.save({k[len("encoder."):]: v for k, v in src.state_dict().items()}, path)
    model = build_backbone("vit_small", pooling="simpool", **VIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, path)
    msg = str(e.value)
    assert "missing keys (5)" in msg and "pool.wq.weight" in msg and "pool.beta" in msg
    assert "unexpected keys (1)" in msg and "encoder.cls_token" in msg
    assert "encoder.pos_embed: checkpoint (1, 17, 32) vs model (1, 16, 32)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_gamma_none_checkpoint_into_gamma_model_names_beta(tmp_path):
    src = build_backbone("vit_small", gamma=None, **VIT)
    path = tmp_path / "nog.pth"
    torch.save(to_official_vit(src.state_dict()), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+pool\.beta"):
        load_pretrained(build_backbone("vit_small", **VIT), path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_arbitrary_pickles_and_missing_files(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": torch.zeros(1)}, "evil": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_pretrained(build_backbone("vit_small", **VIT), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(build_backbone("vit_small", **VIT), tmp_path / "nope.pth")


def test_wrong_checkpoint_key(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"student": {"backbone.x.weight": torch.zeros(1)}, "dino_loss": {"center": torch.zeros(4)},
                "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"--checkpoint_key on the command line\): one of \['student'\]$"):
        load_pretrained(build_backbone("vit_small", **VIT), path, checkpoint_key="teacher")
