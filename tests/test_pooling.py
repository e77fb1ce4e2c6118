"""The pooling registry: every method on tokens and maps, batch independence, gradients, errors."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dino_simpool.pooling import build_pooling, get_pooling_entry, list_poolings, pooling_options
from dino_simpool.pooling.tokens import _Block

D = 32
NAMES = list_poolings()
MULTI = ["otk", "kmeans", "slot"]
SPATIAL = ["how", "cbam", "ge"]
FAST = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])




def _build(name, dim=D, **options):
    if name == "simpool":
        options.setdefault("gamma", 1.25)  # the gamma path is the one with a min to get wrong
    return build_pooling(name, dim, **options).eval()


def test_registry_has_the_14_names_and_cls_needs_a_token():
    assert NAMES == sorted("gap max gem lse how otk kmeans slot se cbam cls cait ge simpool".split())
    assert [n for n in NAMES if get_pooling_entry(n).needs_token] == ["cls"]
    assert get_pooling_entry("GeM").name == "gem"  # case-insensitive


@pytest.mark.parametrize("name", NAMES)
def test_every_pooling_documents_its_framework_row(name):
    doc = type(build_pooling(name, D)).__doc__
    for column in ("U^0", "φ_Q", "φ_K", "s =", "A =", "φ_V", "f =", "φ_X", "φ_U", "k"):
        assert column in doc, f"{name}: docstring lacks {column}"


# --- batch independence and tokens vs maps, over random shapes -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(b=st.integers(2, 4), h=st.integers(1, 4), w=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_batch_independence(name, b, h, w, seed):
    torch.manual_seed(seed)
    m = _build(name)
    x = torch.randn(b, h * w, D)
    y = x.clone()
    y[1:] = torch.randn_like(y[1:]) * 3 + 1  # change every other sample
    with torch.no_grad():
        out_x, out_y = m(x, grid=(h, w)), m(y, grid=(h, w))
        alone = torch.cat([m(x[i : i + 1], grid=(h, w)) for i in range(b)])  # each sample in a batch of its own
    assert out_x.shape == (b, D)
    torch.testing.assert_close(out_x[0], out_y[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_x, alone, atol=1e-5, rtol=1e-5)


def test_batch_independence_check_can_fail():
    """The check above detects the reference's batch-wide min (SimPool min_over="batch")."""
    m = build_pooling("simpool", D, gamma=1.25, min_over="batch").eval()
    x = torch.randn(3, 9, D)
    y = x.clone()
    y[1, 0] = 0.0
    y[1, 0, 0] = -10.0
    assert (m(x)[0] - m(y)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(b=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_tokens_and_maps_agree(name, b, h, w, seed):
    torch.manual_seed(seed)
    m = _build(name)
    fmap = torch.randn(b, D, h, w)
    tokens = fmap.flatten(2).transpose(1, 2)
    with torch.no_grad():
        out_map, out_tok = m(fmap), m(tokens, grid=(h, w))
        if h == w:  # square token grids need no grid=
            torch.testing.assert_close(m(tokens), out_map, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_tok, out_map, atol=1e-5, rtol=1e-5)
        if name == "max":
            return
        (_, a_map), (_, a_tok) = m(fmap, return_attention=True), m(tokens, return_attention=True, grid=(h, w))
    assert a_map.shape == (b, h, w) and a_tok.shape == (b, h * w)
    torch.testing.assert_close(a_map.reshape(b, -1), a_tok, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_tok.sum(-1), torch.ones(b), atol=1e-5, rtol=1e-5)
    assert (a_tok >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one(name):
    m = _build(name)
    assert m(torch.randn(1, 7, D), grid=(1, 7)).shape == (1, D)
    assert m(torch.randn(1, D, 1, 1)).shape == (1, D)


def test_spatial_poolings_need_a_grid_for_non_square_tokens():
    for name in SPATIAL:
        with pytest.raises(ValueError, match="grid"):
            _build(name)(torch.randn(2, 6, D))
    with pytest.raises(ValueError, match="grid"):
        _build("gap")(torch.randn(2, 6, D), grid=(4, 4))


def test_max_has_no_attention():
    with pytest.raises(ValueError, match="no attention"):
        _build("max")(torch.randn(2, 4, D), return_attention=True)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_state_dict_round_trip(name):
    """The DINO teacher is a deepcopy of the student, later loaded from its state dict."""
    m = _build(name)
    x = torch.randn(2, D, 3, 3)
    twin = copy.deepcopy(m)
    torch.testing.assert_close(twin(x), m(x), atol=0, rtol=0)
    fresh = _build(name)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)


# --- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_learnable_parameter(name):
    options = {"use_beta": True} if name == "simpool" else {}
    m = _build(name, **options).train()
    x = torch.randn(3, D, 4, 4, requires_grad=True)
    (m(x) * torch.randn(3, D)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}.{pname} gets no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}.{pname}: zero/non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_finite_grads_under_bf16_autocast(name):
    m = _build(name).train()
    x = (torch.randn(2, D, 4, 4) * 3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (2, D) and torch.isfinite(out.float()).all()
    (out.float() * torch.randn(2, D)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"


# --- the classic poolings' limits ---------------------------------------------------------------------------------


def test_gem_p1_is_gap_and_large_p_approaches_max():
    x = torch.rand(3, 16, D) + 0.1  # GeM's domain: non-negative features
    gap, mx = x.mean(1), x.amax(1)
    torch.testing.assert_close(build_pooling("gem", D, p=1.0)(x), gap, atol=1e-5, rtol=1e-5)
    far, near = build_pooling("gem", D, p=3.0)(x), build_pooling("gem", D, p=500.0)(x)
    assert ((near - mx).abs() / mx).max() < 1e-2 < ((far - mx).abs() / mx).max()
    # shift=True: signed inputs, p = 1 is still exactly GAP, and large p still approaches max
    s = torch.randn(3, 16, D)
    torch.testing.assert_close(build_pooling("gem", D, p=1.0, shift=True)(s), s.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build_pooling("gem", D, p=2000.0, shift=True)(s), s.amax(1), atol=2e-2, rtol=0)


def test_gem_p_is_learnable_and_starts_at_3():
    m = build_pooling("gem", D)
    assert isinstance(m.p, torch.nn.Parameter) and m.p.item() == 3.0
    assert "p" not in dict(build_pooling("gem", D, learn_p=False).named_parameters())


def test_lse_small_r_is_mean_and_large_r_is_max():
    x = torch.randn(3, 16, D, dtype=torch.float64)
    small = build_pooling("lse", D, r=1e-4).double()(x)
    large = build_pooling("lse", D, r=1e4).double()(x)
    torch.testing.assert_close(small, x.mean(1), atol=1e-3, rtol=0)
    torch.testing.assert_close(large, x.amax(1), atol=1e-3, rtol=0)
    mid = build_pooling("lse", D)(x.float())  # default r = 10 lies strictly between
    assert (mid > x.mean(1).float()).all() and (mid < x.amax(1).float() + 1e-6).all()


def test_how_weights_locations_by_feature_norm():
    m = build_pooling("how", D)
    x = torch.randn(2, 9, D)
    x[:, 4] *= 10  # one strong location
    _, a = m(x, return_attention=True)
    norms = x.norm(dim=-1)
    torch.testing.assert_close(a, norms / norms.sum(-1, keepdim=True))
    assert (a.argmax(-1) == 4).all()


def test_how_output_matches_explicit_per_location_projection():
    m = build_pooling("how", D)
    fmap = torch.randn(2, D, 3, 4)
    out, a = m(fmap, return_attention=True)
    smooth = torch.nn.functional.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=False)
    v = m.proj(smooth.flatten(2).transpose(1, 2))  # every location projected
    torch.testing.assert_close(out, torch.einsum("bn,bnd->bd", a.flatten(1), v), atol=1e-5, rtol=1e-5)


# --- k > 1 poolings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MULTI)
def test_pool_all_checks_its_input_like_forward(name):
    m = _build(name, k=3)
    with pytest.raises(ValueError, match=f"dim={D}"):
        m.pool_all(torch.randn(2, 9, D + 1))
    with pytest.raises(ValueError, match="floating-point"):
        m.pool_all(torch.ones(2, 9, D, dtype=torch.long))


@pytest.mark.parametrize("name", MULTI)
def test_multi_output_pool_all_and_reductions(name):
    m = _build(name, k=3, reduce="mean")
    fmap = torch.randn(2, D, 3, 3)
    z, a = m.pool_all(fmap, return_attention=True)
    assert z.shape == (2, 3, D) and a.shape == (2, 3, 3, 3)
    torch.testing.assert_close(m.pool_all(fmap.flatten(2).transpose(1, 2)), z)
    torch.testing.assert_close(m(fmap), z.mean(1))
    flat = _build(name, k=3, reduce="flatten")
    flat.load_state_dict(m.state_dict())
    assert flat(fmap).shape == (2, 3 * D) and flat.out_dim == 3 * D
    torch.testing.assert_close(flat(fmap), z.flatten(1))
    proj = _build(name, k=3, reduce="project")
    assert proj(fmap).shape == (2, D) and proj.out_dim == D


@pytest.mark.parametrize("name", ["kmeans", "slot"])
def test_kmeans_and_slot_are_deterministic(name):
    m = _build(name)
    x = torch.randn(2, 16, D)
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    torch.testing.assert_close(m.pool_all(x), m.pool_all(x), atol=0, rtol=0)


def test_kmeans_finds_well_separated_clusters():
    centers = torch.randn(3, D) * 10
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])
    x = (centers[labels] + 0.1 * torch.randn(12, D)).unsqueeze(0)
    z, a = build_pooling("kmeans", D, k=3).pool_all(x, return_attention=True)
    means = torch.stack([x[0, labels == c].mean(0) for c in range(3)])
    match = torch.cdist(z[0], means).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(z[0], means[match], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 3))


def test_kmeans_with_more_clusters_than_locations():
    m = build_pooling("kmeans", D, k=6)
    out, a = m(torch.randn(2, 3, D), return_attention=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2))


def test_otk_plan_has_uniform_location_marginals():
    m = build_pooling("otk", D, k=4, iters=50)
    plan = m.transport_plan(torch.randn(2, 10, D))
    torch.testing.assert_close(plan.sum(1), torch.full((2, 10), 0.1), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(2), torch.full((2, 4), 0.25), atol=1e-3, rtol=0)


def test_otk_outputs_are_plan_weighted_means_of_psi():
    m = build_pooling("otk", D, k=3)
    x = torch.randn(2, 10, D)
    z, a = m.pool_all(x, return_attention=True)
    torch.testing.assert_close(z, torch.einsum("bkn,bnd->bkd", a, m.psi(x)), atol=1e-5, rtol=1e-5)
    plan = m.transport_plan(x)
    torch.testing.assert_close(a, plan / plan.sum(-1, keepdim=True))


def test_slot_matches_explicit_keys_and_values():
    m = build_pooling("slot", D, k=3, iters=2)
    x = torch.randn(2, 10, D)
    xn = m.norm_inputs(x)
    keys, values = m.to_k(xn), m.to_v(xn)  # explicitly projected
    slots = m.slots_mu.expand(2, -1, -1)
    for _ in range(2):
        logits = m.to_q(m.norm_slots(slots)) @ keys.transpose(1, 2) * D ** -0.5
        a = logits.softmax(dim=1) + 1e-8
        a = a / a.sum(-1, keepdim=True)
        slots = m.gru(a @ values, slots)
        slots = slots + m.mlp(m.norm_mlp(slots))
    z, attn = m.pool_all(x, return_attention=True)
    torch.testing.assert_close(z, slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, a, atol=1e-6, rtol=1e-5)


def test_slot_noise_only_in_training():
    m = build_pooling("slot", D, train_noise=True)
    x = torch.randn(2, 9, D)
    assert not torch.equal(m.train()(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)


# --- token poolings --------------------------------------------------------------------------------------------------


def test_cls_updates_patches_but_cait_keeps_them_frozen():
    x = torch.randn(2, 6, D)
    assert not torch.allclose(_Block(D, 2, 4.0, True, "all")(x)[0][:, 1:], x[:, 1:])
    torch.testing.assert_close(_Block(D, 2, 4.0, True, "token")(x)[0][:, 1:], x[:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("name,depth", [("cls", 1), ("cait", 2)])
def test_token_pooling_defaults(name, depth):
    m = build_pooling(name, 48)
    assert m.depth == depth and m.num_heads == 4 and len(m.blocks) == depth
    assert build_pooling(name, 30).num_heads == 2
    assert m(torch.randn(2, 5, 48)).shape == (2, 48)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError) as e:
        build_pooling("avgmax", D)
    assert "avgmax" in str(e.value) and all(n in str(e.value) for n in NAMES)


@pytest.mark.parametrize(
    "name,options,words",
    [
        ("simpool", {"gamma": 0.0}, ["gamma", "> 0"]),
        ("simpool", {"num_heads": 3}, ["num_heads", "dim=32", "allowed"]),
        ("cls", {"num_heads": 5}, ["num_heads", "dim=32", "allowed"]),
        ("cait", {"num_heads": 6}, ["num_heads", "dim=32", "allowed"]),
        ("cait", {"depth": 0}, ["depth", ">= 1"]),
        ("gem", {"p": 0}, ["p ", "> 0"]),
        ("gem", {"p": -2.0}, ["p ", "> 0"]),
        ("lse", {"r": 0}, ["r ", "> 0"]),
        ("otk", {"eps": -1.0}, ["eps", "> 0"]),
        ("otk", {"k": 0}, ["k ", ">= 1"]),
        ("kmeans", {"reduce": "max"}, ["reduce", "mean", "flatten", "project"]),
        ("slot", {"iters": 0}, ["iters", ">= 1"]),
        ("ge", {"extent": 3}, ["extent", "0, 2, 4, 8, 16"]),
        ("how", {"kernel_size": 2}, ["kernel_size", "odd"]),
        ("se", {"reduction": 0}, ["reduction", ">= 1"]),
        ("gap", {"gamma": 2.0}, ["gamma", "gap", "allowed"]),
        ("gem", {"q": 2.0}, ["q", "allowed", "p, learn_p"]),
    ],
)
def test_bad_options_raise_value_error_naming_them(name, options, words):
    with pytest.raises(ValueError) as e:
        build_pooling(name, D, **options)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        build_pooling("gap", 0)
    with pytest.raises(ValueError, match="tokens"):
        build_pooling("gap", D)(torch.randn(2, D))


def test_pooling_options_lists_constructor_keywords():
    assert pooling_options("simpool") == [
        "num_heads", "qkv_bias", "qk_scale", "gamma", "use_beta", "eps", "min_over", "init"]
    assert pooling_options("gap") == []


@pytest.mark.parametrize("name", ["simpool", "gap", "gem", "slot"])
def test_wrong_width_empty_or_integer_input_is_a_clear_error(name):
    m = build_pooling(name, 32)
    with pytest.raises(ValueError, match="dim=32 .* d=64"):
        m(torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(2, 4, 4, 32))  # (B, H, W, d) read as (B, d=4, ...)
    with pytest.raises(ValueError, match="empty"):
        m(torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(2, 16, 32, dtype=torch.long))
