"""SimPool specifics: the paper's formulas by hand, the fixed reference bugs, and serialisation."""
import copy
import io
import pickle

import pytest
import torch
from torch.nn import functional as F

from dino_simpool.pooling import SimPool, build_pooling

D = 32




def _ln(x, m):
    return F.layer_norm(x, (x.shape[-1],), m.norm_patches.weight, m.norm_patches.bias, eps=1e-6)


def _randomise_ln(m):
    with torch.no_grad():
        m.norm_patches.weight.normal_(1.0, 0.3)
        m.norm_patches.bias.normal_(0.0, 0.3)


def _hand_attention(m, x):
    """Softmax over locations of (W_Q GAP(X))·(W_K LN(X)) / sqrt(d/h), per head: (B, h, N)."""
    b, n, d = x.shape
    h = m.num_heads
    q = F.linear(x.mean(1), m.wq.weight, m.wq.bias).reshape(b, h, d // h)
    k = F.linear(_ln(x, m), m.wk.weight, m.wk.bias).reshape(b, n, h, d // h)  # every key projected explicitly
    return (torch.einsum("bhc,bnhc->bhn", q, k) * (d // h) ** -0.5).softmax(-1)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_no_gamma_zero_query_is_mean_of_layernormed_tokens(heads):
    m = SimPool(D, num_heads=heads)
    _randomise_ln(m)
    with torch.no_grad():
        m.wq.weight.zero_()
    x = torch.randn(3, 10, D) * 2 + 0.5
    out, attn = m(x, return_attention=True)
    torch.testing.assert_close(out, _ln(x, m).mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, torch.full((3, 10), 0.1))


@pytest.mark.parametrize("heads,gamma,bias", [(1, 1.0, False), (2, 1.0, True), (1, 2.0, False), (4, 1.25, True)])
def test_gamma_matches_hand_computation_with_per_sample_min(heads, gamma, bias):
    m = SimPool(D, num_heads=heads, gamma=gamma, qkv_bias=bias)
    _randomise_ln(m)
    if bias:
        with torch.no_grad():
            m.wq.bias.normal_()
            m.wk.bias.normal_()
    x = torch.randn(3, 12, D)
    b, n, d = x.shape
    a = _hand_attention(m, x)  # (B, h, N)
    v = _ln(x, m).reshape(b, n, heads, d // heads)
    vmin = v.amin(dim=(1, 2, 3), keepdim=True)  # one min per sample, over tokens and channels
    shifted = (v - vmin + 1e-6) ** gamma
    expected = torch.einsum("bhn,bnhc->bhc", a, shifted).pow(1 / gamma).reshape(b, d)  # shift not undone
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
    if gamma == 1.0:  # gamma = 1: a·(V − min V + eps) exactly, i.e. the no-gamma output shifted per sample
        m0 = SimPool(D, num_heads=heads, qkv_bias=bias)
        m0.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), m0(x) - vmin.reshape(b, 1) + 1e-6, atol=1e-5, rtol=1e-5)


def test_batch_min_matches_hand_computation():
    m = SimPool(D, gamma=1.0, min_over="batch")
    x = torch.randn(4, 9, D)
    a = _hand_attention(m, x)[:, 0]  # h = 1
    v = _ln(x, m)
    expected = torch.einsum("bn,bnd->bd", a, v - v.min() + 1e-6)
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("gamma", [None, 1.25])
@pytest.mark.parametrize("b", [1, 3])
def test_shapes_tokens_and_maps(heads, gamma, b):
    m = SimPool(D, num_heads=heads, gamma=gamma, use_beta=True)
    out, attn = m(torch.randn(b, 12, D), return_attention=True)
    assert out.shape == (b, D) and attn.shape == (b, 12)
    out, attn = m(torch.randn(b, D, 3, 4), return_attention=True)
    assert out.shape == (b, D) and attn.shape == (b, 3, 4)
    torch.testing.assert_close(attn.sum((1, 2)), torch.ones(b))


def _max_change_of_sample0(m, x):
    y = x.clone()
    y[1:] = torch.randn_like(y[1:])
    y[1, 0] = 0.0
    y[1, 0, 0] = -10.0  # a spike: LN of that token reaches ≈ −sqrt(d − 1), below every min of sample 0
    return (m(x)[0] - m(y)[0]).abs().max().item()


def test_min_over_batch_differs_exactly_when_it_should():
    torch.manual_seed(1)
    x = torch.randn(4, 9, D)
    sample, batch = SimPool(D, gamma=1.25), SimPool(D, gamma=1.25, min_over="batch")
    batch.load_state_dict(sample.state_dict())
    mins = sample.norm_patches(x).amin(dim=(1, 2))
    assert mins.unique().numel() == 4  # the samples' mins differ ...
    assert (sample(x) - batch(x)).abs().max() > 1e-3  # ... so the batch-wide min changes the outputs
    # The reference bug, reproduced by "batch" only: sample 0 depends on the others.
    assert _max_change_of_sample0(batch, x) > 1e-3
    assert _max_change_of_sample0(sample, x) < 1e-5
    # Equal for B = 1, and for a batch whose samples share their min (identical samples).
    torch.testing.assert_close(sample(x[:1]), batch(x[:1]))
    same = x[:1].expand(3, -1, -1).clone()
    torch.testing.assert_close(sample(same), batch(same))
    # gamma=None: no min at all, so min_over has no effect.
    s0, b0 = SimPool(D), SimPool(D, min_over="batch")
    b0.load_state_dict(s0.state_dict())
    torch.testing.assert_close(s0(x), b0(x))


@pytest.mark.parametrize("heads,gamma", [(1, 1.25), (4, 2.0), (2, None)])
def test_finite_grads_under_bf16_autocast(heads, gamma):
    m = SimPool(D, num_heads=heads, gamma=gamma, use_beta=True)
    x = (torch.randn(2, 16, D) * 4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x, return_attention=True)
    assert out.dtype in (torch.bfloat16, torch.float32)
    (out.float() * torch.randn(2, D)).sum().backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ref = m(x.detach())
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 result close to fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_power_mean_is_computed_in_fp32_under_autocast(dtype):
    """(a · (v - min + eps)^γ)^(1/γ) in low precision loses several ulps; in fp32 it is the float64 value, rounded."""
    m = SimPool(64, gamma=1.25)
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(8, 1, 1, 196, generator=g) * 3).softmax(-1)
    v = (torch.randn(8, 1, 196, 64, generator=g) * 2).to(dtype)
    v64 = v.double()
    ref = (attn.double() @ (v64 - v64.amin(dim=(1, 2, 3), keepdim=True) + 1e-6).pow(1.25)).pow(0.8)
    with torch.autocast("cpu", dtype=dtype):
        out = m._power_mean(attn, v)
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.abs()
    assert ((out.double() - ref).abs() <= ulp).all()  # within one rounding of the exact value


def test_pure_low_precision_module_runs_power_mean_in_fp32():
    """The official fp32 eps tensor broke pure fp16 models; here a bf16 module on bf16 input just works."""
    m = SimPool(D, num_heads=2, gamma=2.0, use_beta=True)
    x = torch.randn(2, 16, D)
    ref = m(x)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_state_dict_keys_match_reference_names():
    assert set(SimPool(D).state_dict()) == {"norm_patches.weight", "norm_patches.bias", "wq.weight", "wk.weight"}
    assert set(SimPool(D, gamma=2.0, use_beta=True, qkv_bias=True).state_dict()) == {
        "norm_patches.weight", "norm_patches.bias", "wq.weight", "wq.bias", "wk.weight", "wk.bias", "beta"}
    # As in the official code, beta exists only on the gamma path (so no-gamma checkpoints load 1:1).
    assert "beta" not in SimPool(D, use_beta=True).state_dict()


def test_beta_is_added_and_learns():
    m = SimPool(D, gamma=1.5, use_beta=True)
    x = torch.randn(2, 8, D)
    base = m(x)
    with torch.no_grad():
        m.beta.fill_(0.7)
    torch.testing.assert_close(m(x), base + 0.7)
    m(x).sum().backward()
    assert m.beta.grad is not None and m.beta.grad.abs().item() > 0


def test_state_dict_pickle_deepcopy_and_to_round_trip():
    m = SimPool(D, num_heads=2, gamma=1.25, use_beta=True, eps=1e-5, min_over="batch")
    _randomise_ln(m)
    x = torch.randn(3, 10, D)
    ref = m(x)
    fresh = SimPool(D, num_heads=2, gamma=1.25, use_beta=True, eps=1e-5, min_over="batch")
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), ref)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), ref)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert (clone.gamma, clone.eps, clone.min_over, clone.num_heads) == (1.25, 1e-5, "batch", 2)
        torch.testing.assert_close(clone(x), ref)
    m64 = copy.deepcopy(m).to(torch.float64)
    torch.testing.assert_close(m64(x.double()).float(), ref, atol=1e-5, rtol=1e-5)
    assert m64.to("cpu")(x.double()).dtype == torch.float64


def test_init_options():
    a = SimPool(384)  # trunc_normal(.02) for wq/wk, as the SSL ViT/ConvNeXt re-init
    b = SimPool(384, init="default")  # PyTorch's default U(±1/sqrt(d)), as the SSL ResNet
    assert 0.015 < a.wq.weight.std().item() < 0.025
    assert 0.027 < b.wq.weight.std().item() < 0.032


@pytest.mark.parametrize(
    "options,names",
    [
        ({"gamma": 0}, ["gamma", "> 0"]),
        ({"gamma": -1.0}, ["gamma", "> 0"]),
        ({"num_heads": 5}, ["num_heads", "dim=32", "allowed", "1, 2, 4, 8"]),
        ({"num_heads": 0}, ["num_heads"]),
        ({"min_over": "rank"}, ["min_over", "sample", "batch"]),
        ({"eps": 0.0}, ["eps", "> 0"]),
        ({"init": "xavier"}, ["init", "trunc_normal", "default"]),
    ],
)
def test_bad_options_raise_value_error_naming_them(options, names):
    with pytest.raises(ValueError) as e:
        build_pooling("simpool", D, **options)
    for name in names:
        assert name in str(e.value)
