"""Backbones: shapes for every arch x pooling, gradients, multi-crop sizes, attention maps, norm orders, exact
parameter counts (issue #3 §5)."""
import json
import math

import pytest
import torch
from torch.nn import functional as F

from dino_simpool.models import build_backbone, count_parameters, explicit_attention
from dino_simpool.models.backbones import official_resample_pos_embed
from dino_simpool.pooling import SimPool

VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
TINY_CNNS = ("resnet_test", "convnext_test")


def tiny(arch="vit_small", **kw):
    if arch.startswith("vit"):
        kw = {**VIT, **kw}
    return build_backbone(arch, **kw)


def meta_count(arch, **kw):
    with torch.device("meta"):
        return count_parameters(build_backbone(arch, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# parameter counts (build only, on the meta device)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,pooling,expected",
    [
        ("vit_small", "cls", 21_665_664),
        ("vit_small", "simpool", 21_960_577),
        ("resnet50", "gap", 23_508_032),
        ("resnet50", "simpool", 31_900_736),
        ("convnext_small", "gap", 49_454_688),
        ("convnext_small", "simpool", 50_635_872),
    ],
)
def test_backbone_parameter_counts(arch, pooling, expected):
    assert meta_count(arch, pooling=pooling) == expected


HEAD_1000 = 384 * 1000 + 1000  # the paper's ViT-S table counts a Linear(384, 1000) classifier


@pytest.mark.parametrize(
    "depth,expected", [(12, 22_050_664), (13, 23_825_128), (14, 25_599_592), (15, 27_374_056), (16, 29_148_520),
                       (17, 30_922_984)],
)
def test_paper_vit_s_table_cls_and_gap(depth, expected):
    assert meta_count("vit_small", pooling="cls", depth=depth) + HEAD_1000 == expected
    if depth == 12:  # the paper's GAP row keeps the class token: same count
        assert meta_count("vit_small", pooling="gap", depth=depth) + HEAD_1000 == expected


@pytest.mark.parametrize("depth,expected", [(12, 22_345_577), (11, 20_571_113), (10, 18_796_649), (9, 17_022_185)])
def test_paper_vit_s_table_simpool(depth, expected):
    assert meta_count("vit_small", pooling="simpool", depth=depth) + HEAD_1000 == expected
    # the supervised order has no beta: one less
    assert meta_count("vit_small", pooling="simpool", depth=depth, norm_order="supervised") + HEAD_1000 == expected - 1


def test_full_size_archs_dims_and_strides():
    with torch.device("meta"):
        dims = {a: build_backbone(a).embed_dim for a in ("vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50",
                                                         "convnext_tiny", "convnext_small")}
        assert build_backbone("vit_base", patch_size=8).patch_size == 8
        assert build_backbone("resnet50").patch_size == 32 and build_backbone("convnext_small").patch_size == 32
    assert dims == {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "resnet18": 512, "resnet50": 2048,
                    "convnext_tiny": 768, "convnext_small": 768}


# ---------------------------------------------------------------------------------------------------------------------
# shapes, gradients, multi-crop sizes
# ---------------------------------------------------------------------------------------------------------------------
CASES = [(a, p) for a in ("vit_tiny", "vit_small", "vit_base") for p in ("cls", "simpool", "gem")]
CASES += [(a, p) for a in TINY_CNNS for p in ("gap", "simpool", "gem")]


@pytest.mark.parametrize("arch,pooling", CASES)
def test_forward_shape_and_gradients(arch, pooling):
    m = tiny(arch, pooling=pooling)
    size = 32 if m.is_vit else 64
    x = torch.randn(2, 3, size, size)
    out = m(x)
    assert out.shape == (2, m.embed_dim) and torch.isfinite(out).all()
    out.square().sum().backward()
    stem = m.encoder.patch_embed.proj.weight if m.is_vit else next(m.encoder.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    if pooling in ("simpool", "gem"):  # learnable poolings: the gradient reaches them
        grads = [p.grad for p in m.pool.parameters()]
        assert len(grads) > 0 and all(g is not None and g.abs().sum() > 0 for g in grads if g is not None)
        if pooling == "simpool":
            assert m.pool.wq.weight.grad.abs().sum() > 0 and m.pool.wk.weight.grad.abs().sum() > 0
    elif pooling == "cls":
        assert m.encoder.cls_token.grad.abs().sum() > 0


def test_resnet18_forward():
    m = build_backbone("resnet18")
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize("pooling", ["simpool", "cls", "gap"])
def test_vit_multicrop_sizes_and_non_square(pooling):
    m = tiny(pooling=pooling).eval()
    for h, w in ((32, 32), (16, 16), (32, 24), (16, 40)):
        assert m(torch.randn(3, 3, h, w)).shape == (3, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("arch", TINY_CNNS)
def test_cnn_multicrop_sizes(arch):
    m = build_backbone(arch).eval()
    for h, w in ((64, 64), (32, 32), (64, 96)):
        assert m(torch.randn(2, 3, h, w)).shape == (2, m.embed_dim)


def test_vit_pos_embed_resampled_for_small_crops():
    """A 16 px crop of a 32 px model uses the interpolated embedding, not the first 4 rows."""
    m = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    out = m(x)
    with torch.no_grad():
        m.encoder.pos_embed[:, 4:] += 1.0  # rows a truncation (rather than interpolation) would ignore
    assert not torch.allclose(m(x), out, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# placement of the pooling and the norm
# ---------------------------------------------------------------------------------------------------------------------
def test_vit_simpool_ssl_order_no_class_token_and_beta():
    m = tiny().eval()
    assert m.encoder.cls_token is None and m.encoder.pos_embed.shape[1] == 16
    assert isinstance(m.pool, SimPool) and m.pool.gamma == 1.25 and m.pool.beta is not None
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)  # un-normalised last-block tokens
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(m(x), m.encoder.norm(m.pool(tokens)))
    assert not torch.allclose(m(x), m.pool(m.encoder.norm(tokens)), atol=1e-4)


def test_vit_simpool_supervised_order():
    m = tiny(norm_order="supervised").eval()
    assert m.pool.beta is None
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)  # final-norm tokens
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 16) + m.encoder.norm.bias.mean(), atol=1e-5)
    torch.testing.assert_close(m(x), m.pool(tokens))


def test_vit_cls_is_final_norm_class_token():
    m = tiny(pooling="cls").eval()
    assert m.encoder.pos_embed.shape[1] == 17 and m.pool is None
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(m(x), tokens[:, 0])


def test_gamma_defaults_and_none():
    assert tiny().pool.gamma == 1.25
    assert build_backbone("resnet_test").pool.gamma == 2.0
    no_gamma = tiny(gamma=None)
    assert no_gamma.pool.gamma is None and no_gamma.pool.beta is None and no_gamma.config["gamma"] is None
    assert tiny(gamma=2.5).pool.gamma == 2.5


def test_cnn_pool_placement_and_init():
    r = build_backbone("resnet_test").eval()
    assert r.pool.beta is None
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(r(x), r.pool(r.forward_features(x)))  # no norm after
    # ResNet keeps PyTorch's default Linear init (U(+-1/sqrt(d)), std 1/sqrt(3d)); ViT/ConvNeXt use trunc_normal(.02)
    assert abs(r.pool.wq.weight.std().item() - 1 / math.sqrt(3 * 96)) < 0.01
    c = build_backbone("convnext_test").eval()
    assert abs(c.pool.wq.weight.std().item() - 0.02) < 0.005
    fmap = c.forward_features(x)
    expected = F.layer_norm(c.pool(fmap), (64,), c.encoder.head.norm.weight, c.encoder.head.norm.bias,
                            c.encoder.head.norm.eps)
    torch.testing.assert_close(c(x), expected)
    gap = build_backbone("convnext_test", pooling="gap").eval()
    gap.load_state_dict({k: v for k, v in c.state_dict().items() if not k.startswith("pool.")})
    torch.testing.assert_close(gap(x), gap.encoder.forward_head(fmap, pre_logits=True))  # timm's own norm(GAP)


# ---------------------------------------------------------------------------------------------------------------------
# attention maps
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit_small", *TINY_CNNS])
def test_simpool_attention_maps(arch):
    m = tiny(arch).eval()
    x = torch.randn(2, 3, 32, 24) if m.is_vit else torch.randn(2, 3, 64, 96)
    maps = m.attention_maps(x)
    a = maps["pool"]
    assert set(maps) == {"pool"}
    assert a.shape == ((2, 4, 3) if m.is_vit else (2, 2, 3))
    assert (a >= 0).all()
    torch.testing.assert_close(a.flatten(1).sum(1), torch.ones(2))


def test_cls_attention_maps_match_explicit_attention():
    m = tiny(pooling="cls", depth=3).eval()
    x = torch.randn(2, 3, 32, 24)
    captured = []
    with explicit_attention(m):  # reference: timm's own non-fused path, captured at its dropout input
        hooks = [b.attn.attn_drop.register_forward_hook(lambda mod, a, o: captured.append(o)) for b in m.encoder.blocks]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
    maps = m.attention_maps(x)
    assert maps["heads"].shape == (2, 2, 4, 3) and maps["mean_blocks"].shape == (2, 4, 3)
    ref_heads = captured[-1][:, :, 0, 1:].reshape(2, 2, 4, 3)
    torch.testing.assert_close(maps["heads"], ref_heads, atol=1e-6, rtol=1e-5)
    ref_mean = torch.stack([c[:, :, 0, 1:].mean(1) for c in captured]).mean(0).reshape(2, 4, 3)
    torch.testing.assert_close(maps["mean_blocks"], ref_mean, atol=1e-6, rtol=1e-5)
    assert (maps["heads"] >= 0).all() and (maps["heads"].flatten(2).sum(-1) <= 1 + 1e-6).all()


def test_attention_maps_keep_fused_attention(monkeypatch):
    m = tiny(pooling="cls", depth=2).eval()
    flags = [b.attn.fused_attn for b in m.encoder.blocks]
    if not all(flags):
        pytest.skip("timm fused attention is disabled in this environment")
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*a, **kw):
        calls.append(1)
        return real_sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    x = torch.randn(1, 3, 32, 32)
    out = m(x)
    assert len(calls) == 2  # the normal forward is fused
    m.attention_maps(x)
    assert len(calls) == 4  # the blocks still ran fused; the maps were computed beside them
    assert [b.attn.fused_attn for b in m.encoder.blocks] == flags
    with explicit_attention(m):
        torch.testing.assert_close(m(x), out, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4 and [b.attn.fused_attn for b in m.encoder.blocks] == flags


def test_attention_maps_of_pooling_without_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention map"):
        tiny(pooling="max").attention_maps(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------------
# pooled_layers / get_intermediate_layers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["simpool", "cls"])
def test_pooled_and_intermediate_layers(pooling):
    m = tiny(pooling=pooling, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = m.pooled_layers(x, 2)
    assert len(layers) == 2 and all(t.shape == (2, 32) for t in layers)
    torch.testing.assert_close(m.pooled_layers(x, 1)[0], m(x))
    torch.testing.assert_close(layers[-1], m(x))
    assert not torch.allclose(layers[0], layers[1])
    inter = m.get_intermediate_layers(x, 3)
    n_tokens = 17 if pooling == "cls" else 16
    assert len(inter) == 3 and all(t.shape == (2, n_tokens, 32) for t in inter)
    if pooling == "cls":  # DINO's linear eval: final-norm [CLS] of each block
        torch.testing.assert_close(layers[0], inter[1][:, 0])
    with pytest.raises(ValueError):
        m.pooled_layers(x, 4)


def test_cnn_pooled_layers_only_one():
    m = build_backbone("resnet_test").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(m.pooled_layers(x, 1)[0], m(x))
    with pytest.raises(ValueError, match="n=1"):
        m.pooled_layers(x, 2)
    with pytest.raises(ValueError, match="ViT"):
        m.get_intermediate_layers(x, 1)


# ---------------------------------------------------------------------------------------------------------------------
# config, options and errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [("vit_small", dict(VIT, pooling="simpool", gamma=None)),
                                     ("vit_tiny", dict(VIT, pooling="cls")),
                                     ("convnext_test", dict(pooling="simpool", compat="official"))])
def test_config_rebuilds_the_model(arch, kw):
    m = build_backbone(arch, **kw).eval()
    cfg = json.loads(json.dumps(m.config))  # plain data
    m2 = build_backbone(**cfg).eval()
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32) if m.is_vit else torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("arch,shift", [("vit_small", True), ("convnext_test", True), ("resnet_test", False)])
def test_gem_shifts_signed_features_and_clamps_post_relu_maps(arch, shift):
    # ViT tokens and ConvNeXt maps are signed: GeM must shift them (p = 1 is then exactly GAP), not clamp at eps;
    # ResNet maps are post-ReLU, where the classic clamp is right
    m = tiny(arch, pooling="gem")
    assert m.pool.shift is shift
    tokens = torch.randn(2, 9, m.embed_dim)
    m.pool.p.data.fill_(1.0)
    if shift:
        torch.testing.assert_close(m.pool(tokens), tokens.mean(1), atol=1e-5, rtol=1e-5)
    assert tiny(arch, pooling="gem", shift=not shift).pool.shift is (not shift)  # an explicit option wins


def test_pool_options_pass_through():
    m = tiny(qkv_bias=True)
    assert m.pool.wq.bias is not None and m.config["qkv_bias"] is True


@pytest.mark.parametrize(
    "arch,kw,match",
    [
        ("vit_huge", {}, "unknown arch"),
        ("vit_small", dict(pooling="nope"), "unknown pooling"),
        ("resnet50", dict(depth=3), "ViT option"),
        ("resnet50", dict(norm_order="supervised"), "norm_order"),
        ("vit_small", dict(norm_order="sideways"), "norm_order"),
        ("vit_small", dict(gamma=-1.0), "gamma"),
        ("vit_small", dict(compat="yes"), "compat"),
        ("vit_small", dict(embed_dim=30, num_heads=4), "divisible"),
        ("vit_small", dict(img_size=30, patch_size=8), "multiple"),
        ("resnet50", dict(pooling="otk", reduce="flatten"), "k\\*d wide"),
        ("vit_small", dict(img_size=(32, 24), patch_size=8, compat="official"), "not square"),
        ("vit_small", dict(pooling="cls", min_over="batch"), "cls.*takes no pooling options.*min_over"),
    ],
)
def test_bad_options_raise_value_error(arch, kw, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            build_backbone(arch, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# compat="official"
# ---------------------------------------------------------------------------------------------------------------------
def test_official_pos_embed_resampling():
    pe = torch.randn(1, 16, 8)
    # without a class token the official code always resamples, even at the stored 4x4 grid, and 4 -> 4 is no identity
    same_grid = official_resample_pos_embed(pe, 0, 4, 4)
    assert same_grid.shape == pe.shape and not torch.allclose(same_grid, pe, atol=1e-3)
    # with a class token the stored grid passes through, other grids are resampled (class slot kept)
    pe_cls = torch.randn(1, 17, 8)
    assert official_resample_pos_embed(pe_cls, 1, 4, 4) is pe_cls
    out = official_resample_pos_embed(pe_cls, 1, 2, 3)
    assert out.shape == (1, 7, 8) and torch.equal(out[:, 0], pe_cls[:, 0])


def test_compat_official_switches_min_and_pos_embed():
    m = tiny().eval()
    x = torch.randn(3, 3, 32, 32) * torch.tensor([0.5, 1.0, 4.0]).view(3, 1, 1, 1)
    ours = m(x)
    m.set_compat("official")
    assert m.pool.min_over == "batch" and m.config["compat"] == "official"
    official = m(x)
    assert not torch.allclose(ours, official, atol=1e-4)
    # batch-wide min: the samples that do not hold the batch's min change when pooled alone
    alone = torch.cat([m(x[i:i + 1]) for i in range(3)])
    assert sum(not torch.allclose(alone[i], official[i], atol=1e-5) for i in range(3)) >= 1
    m.set_compat(None)
    torch.testing.assert_close(m(x), ours)
    alone = torch.cat([m(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, ours, atol=1e-5, rtol=1e-5)


def test_min_over_option_survives_compat_switches():
    m = tiny(min_over="batch")
    assert m.pool.min_over == "batch"
    m.set_compat("official")
    m.set_compat(None)
    assert m.pool.min_over == "batch" and build_backbone(**m.config).pool.min_over == "batch"


@pytest.mark.parametrize("arch", ["vit_small", *TINY_CNNS])
@pytest.mark.parametrize("x,match", [
    (torch.randn(3, 32, 32), "add the batch axis"),
    (torch.randn(2, 1, 32, 32), "3 colour channels"),
    (torch.randn(2, 32, 32, 3), "channels-last"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float16), "dtype"),
])
def test_bad_inputs_give_one_clear_error(arch, x, match):
    m = tiny(arch)
    for call in (m, m.forward_features, m.attention_maps):
        with pytest.raises(ValueError, match=match):
            call(x)


def test_too_small_inputs_name_the_minimum():
    with pytest.raises(ValueError, match="at least 32 px"):
        tiny("convnext_test")(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 8 px"):
        tiny()(torch.randn(2, 3, 0, 8))


def test_low_precision_input_is_fine_under_autocast():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).float()).all()
