"""Any timm backbone of a supported family (issue 13 §2): names, families, clear refusals, the pooling attached as
for the named archs, parameter counts checked against timm's own models, rebuild from config, no weight download.

Big models (ViT-L, ConvNeXt-B, ResNet-101) are only built on the meta device: no memory, no time."""
import json

import pytest
import timm
import timm.models._builder as timm_builder
import torch

from dino_simpool.models import build_backbone, count_parameters
from dino_simpool.models.backbones import FAMILY_TITLES, arch_family, list_archs, resolve_arch
from dino_simpool.models.weights import infer_config


@pytest.fixture(autouse=True)
def no_weight_download(monkeypatch):
    """A test that made timm load pretrained weights fails instead of downloading."""
    def refuse(*a, **k):
        raise AssertionError("timm tried to load pretrained weights")
    monkeypatch.setattr(timm_builder, "load_pretrained", refuse)


def meta(arch, **kw):
    with torch.device("meta"):
        return build_backbone(arch, **kw)


def timm_count(name, **kw):
    """timm's own model, classifier removed (num_classes=0): the independent reference."""
    with torch.device("meta"):
        return count_parameters(timm.create_model(name, pretrained=False, num_classes=0, **kw))


def simpool_params(d, vit):
    """SimPool's own parameters: LayerNorm on the patches (2d), W_q and W_k (d x d each, no bias), and on a ViT with
    gamma (ssl order) the scalar beta."""
    return 2 * d + 2 * d * d + (1 if vit else 0)


# --------------------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("arch,family", [
    ("vit_small", "vit"), ("vit_base", "vit"), ("vit_tiny", "vit"), ("vit_large", "vit"),
    ("deit_small", "vit"), ("deit_tiny", "vit"), ("deit_base", "vit"),
    ("deit_small_patch16_224", "vit"), ("deit_tiny_patch16_224", "vit"), ("deit3_small_patch16_224", "vit"),
    ("vit_small_patch16_224", "vit"), ("vit_large_patch16_224", "vit"), ("vit_small_patch8_224", "vit"),
    ("timm/vit_small_patch16_224", "vit"), ("timm/vit_small_patch16_224.augreg_in21k", "vit"),
    ("resnet50", "resnet"), ("resnet18", "resnet"), ("resnet34", "resnet"), ("resnet101", "resnet"),
    ("resnet152", "resnet"), ("resnext50_32x4d", "resnet"), ("wide_resnet50_2", "resnet"),
    ("timm/resnet50.a1_in1k", "resnet"), ("resnet_test", "resnet"),
    ("convnext_tiny", "convnext"), ("convnext_small", "convnext"), ("convnext_base", "convnext"),
    ("convnext_large", "convnext"), ("convnextv2_atto", "convnext"), ("convnext_test", "convnext"),
])
def test_arch_family_of_every_kind_of_name(arch, family):
    assert arch_family(arch) == family


@pytest.mark.parametrize("arch,module", [("efficientnet_b0", "efficientnet"),
                                         ("swin_tiny_patch4_window7_224", "swin_transformer"),
                                         ("resnetv2_50", "resnetv2"), ("vit_base_r50_s16_384", "hybrid")])
def test_unsupported_family_is_one_clear_error(arch, module):
    for call in (lambda: arch_family(arch), lambda: meta(arch)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert module in msg and "not a supported family" in msg
        assert all(t in msg for t in FAMILY_TITLES.values())


@pytest.mark.parametrize("arch", ["not_a_model", "vit_huge", "resnet_51", ""])
def test_unknown_names_list_what_is_accepted(arch):
    with pytest.raises(ValueError, match="unknown arch|model name") as e:
        arch_family(arch)
    if arch:
        assert "vit_small" in str(e.value) and "ConvNeXt" in str(e.value)


def test_distilled_deit_is_refused_with_the_plain_name():
    with pytest.raises(ValueError, match="deit_small_patch16_224"):
        meta("deit_small_distilled_patch16_224")


def test_named_archs_unchanged():
    assert list_archs() == ["vit_tiny", "vit_small", "vit_base", "vit_large", "resnet18", "resnet50", "resnet_test",
                            "convnext_tiny", "convnext_small", "convnext_test"]
    assert resolve_arch("deit_small").vit_cfg == resolve_arch("vit_small").vit_cfg


# --------------------------------------------------------------------------------------------------- parameter counts
# published totals with the 1000-class classifier (torchvision's model docs; timm gives the same networks): the
# backbone is that minus the classifier, d * 1000 + 1000
PUBLISHED = {"resnet34": (21_797_672, 512), "resnet101": (44_549_160, 2048), "convnext_base": (88_591_464, 1024),
             "vit_large_patch16_224": (304_326_632, 1024), "deit_small_patch16_224": (22_050_664, 384)}


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "convnext_base"])
def test_cnn_parameter_counts(arch):
    total, d = PUBLISHED[arch]
    gap = count_parameters(meta(arch, pooling="gap"))
    assert gap == timm_count(arch) == total - (d * 1000 + 1000)
    assert count_parameters(meta(arch, pooling="simpool")) == gap + simpool_params(d, vit=False)


@pytest.mark.parametrize("arch", ["deit_small_patch16_224", "vit_large_patch16_224"])
def test_vit_parameter_counts(arch):
    total, d = PUBLISHED[arch]
    cls = count_parameters(meta(arch, pooling="cls"))
    assert cls == timm_count(arch) == total - (d * 1000 + 1000)
    # SimPool: no class token and one position embedding fewer (2d), plus the pooling
    assert count_parameters(meta(arch, pooling="simpool")) == cls - 2 * d + simpool_params(d, vit=True)
    assert count_parameters(meta(arch, pooling="gap")) == cls  # the paper's GAP row keeps the class token


def test_timm_names_of_dinos_vits_are_the_same_networks():
    for named, timm_name in (("vit_small", "vit_small_patch16_224"), ("deit_small", "deit_small_patch16_224"),
                             ("vit_large", "vit_large_patch16_224"), ("vit_small", "timm/vit_small_patch16_224")):
        for pooling in ("cls", "simpool"):
            a, b = meta(named, pooling=pooling), meta(timm_name, pooling=pooling)
            assert count_parameters(a) == count_parameters(b)
            assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert count_parameters(meta("vit_small", pooling="cls")) == 21_665_664  # the named count, unchanged


# --------------------------------------------------------------------------------------------------- patch sizes
def test_dino_vit_names_take_a_patch_size():
    m = meta("vit_small", patch_size=8)
    assert m.patch_size == 8 and m.config["patch_size"] == 8 and m.encoder.pos_embed.shape[1] == 28 * 28
    assert meta("deit_small", patch_size=8).encoder.pos_embed.shape == m.encoder.pos_embed.shape
    m = build_backbone("vit_small", patch_size=8, depth=1, img_size=32).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 384)


def test_timm_names_keep_their_own_patch_size():
    assert meta("vit_small_patch8_224").patch_size == 8
    assert meta("vit_small_patch16_224", patch_size=16).patch_size == 16
    with pytest.raises(ValueError, match="patch size 16 .in its name.*patch_size=8"):
        meta("vit_small_patch16_224", patch_size=8)
    m = meta("vit_base_patch16_384")
    assert m.config["img_size"] == 384 and m.encoder.pos_embed.shape[1] == 24 * 24 + 0
    assert meta("vit_base_patch16_384", img_size=224).encoder.pos_embed.shape[1] == 14 * 14


# --------------------------------------------------------------------------------------------------- behaviour
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)


@pytest.mark.parametrize("arch,kw", [
    ("deit_tiny_patch16_224", dict(TINY_VIT, pooling="simpool")),
    ("timm/vit_small_patch16_224.augreg_in21k", dict(TINY_VIT, pooling="cls")),
    ("vit_base_patch16_reg4_gap_256", dict(TINY_VIT, pooling="simpool")),   # register tokens: stripped
    ("resnet10t", dict(pooling="simpool")),
    ("convnext_atto", dict(pooling="gap")),
])
def test_config_rebuilds_timm_models(arch, kw):
    m = build_backbone(arch, **kw).eval()
    cfg = json.loads(json.dumps(m.config))
    assert cfg["arch"] == arch
    m2 = build_backbone(**cfg).eval()
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32) if m.is_vit else torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m2(x), m(x))
    assert m(x).shape == (2, m.embed_dim)


def test_pooling_attaches_to_a_timm_vit_as_to_the_named_ones():
    m = build_backbone("deit_tiny_patch16_224", pooling="simpool", **TINY_VIT).eval()
    assert m.encoder.cls_token is None and m.pool.beta is not None and m.pool.gamma == 1.25
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 4, 32)
    torch.testing.assert_close(m(x), m.encoder.norm(m.pool(tokens)))
    c = build_backbone("deit_tiny_patch16_224", pooling="cls", **TINY_VIT).eval()
    torch.testing.assert_close(c(x), c.forward_features(x)[:, 0])
    maps = c.attention_maps(x)
    assert maps["heads"].shape == (2, 2, 2, 2) and maps["mean_blocks"].shape == (2, 2, 2)
    assert m.attention_maps(x)["pool"].shape == (2, 2, 2)
    # register tokens are prefix tokens: the pooling sees only the patches
    r = build_backbone("vit_base_patch16_reg4_gap_256", pooling="simpool", **TINY_VIT).eval()
    assert r.num_prefix_tokens == 4 and r.forward_features(x).shape == (2, 4 + 4, 32)
    with pytest.raises(ValueError, match="compat='official'"):
        build_backbone("vit_base_patch16_reg4_gap_256", pooling="simpool", compat="official", **TINY_VIT)


def test_pooling_attaches_to_a_timm_cnn_as_to_the_named_ones():
    m = build_backbone("convnext_atto", pooling="simpool").eval()
    assert m.pool.gamma == 2.0 and m.pool.beta is None
    x = torch.randn(2, 3, 64, 64)
    fmap = m.forward_features(x)
    torch.testing.assert_close(m(x), m.encoder.head.norm(m.pool(fmap)[:, :, None, None]).flatten(1))
    r = build_backbone("resnet10t", pooling="gap").eval()
    torch.testing.assert_close(r(x), r.forward_features(x).mean((2, 3)))
    with pytest.raises(ValueError, match="ViT option"):
        build_backbone("resnet10t", depth=3)


def test_convnext_mlp_head_is_dropped():
    """convnext_large_mlp's pre-logits MLP belongs to timm's classifier: no unused parameters are kept."""
    m = meta("convnext_large_mlp", pooling="gap")
    assert not any(k.startswith("encoder.head.pre_logits") for k in m.state_dict())
    with torch.device("meta"):
        ref = timm.create_model("convnext_large_mlp", pretrained=False, num_classes=0)
    assert count_parameters(ref.head.pre_logits) > 0
    assert count_parameters(m) == count_parameters(ref) - count_parameters(ref.head.pre_logits)
    assert m.embed_dim == 1536 == ref.head.norm.normalized_shape[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                  "wide_resnet50_2", "convnext_base", "convnext_large"])
def test_foreign_checkpoints_name_their_arch(name):
    """weights.infer_config tells DINO's torchvision ResNets and timm's ConvNeXts apart from the keys and shapes
    (a ResNet-101 checkpoint was read as a ResNet-50 before, and failed to load)."""
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
    assert infer_config(sd)["arch"] == name
    with pytest.raises(ValueError, match="ResNet variant"):
        infer_config({k: v for k, v in sd.items() if not k.startswith("layer3.")} if "resnet" in name else
                     {"layer4.0.conv1.weight": torch.zeros(1)})
