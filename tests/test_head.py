"""DINOHead and MultiCropWrapper."""
import copy

import pytest
import torch
from torch import nn

from dino_simpool.dino.head import DINOHead, MultiCropWrapper, group_by_resolution

G = "last_layer.parametrizations.weight.original0"
V = "last_layer.parametrizations.weight.original1"


def _head(**kw):
    return DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, **kw)


def test_shapes_and_layers():
    h = _head()
    assert h(torch.randn(3, 8)).shape == (3, 16)
    assert sum(isinstance(m, nn.Linear) for m in h.mlp.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm1d) for m in h.modules())
    hb = _head(use_bn=True, nlayers=2)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in hb.modules()) == 1
    assert isinstance(_head(nlayers=1).mlp, nn.Linear)
    assert h.last_layer.bias is None


def test_init_trunc_normal_zero_bias():
    h = DINOHead(64, 16, hidden_dim=256, bottleneck_dim=32)
    w = h.mlp[0].weight
    # DINO's trunc_normal_(std=.02) truncates at +-2 in absolute value (as torch's does): effectively N(0, .02^2)
    assert w.abs().max() <= 2.0
    assert 0.018 < w.std().item() < 0.022
    assert all((m.bias == 0).all() for m in h.mlp.modules() if isinstance(m, nn.Linear))


def test_l2_normalised_before_last_layer():
    h = _head()
    seen = {}
    h.last_layer.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    h(torch.randn(5, 8) * 10)
    torch.testing.assert_close(seen["x"].norm(dim=-1), torch.ones(5))


def test_weight_g_fixed_and_frozen():
    h = _head(norm_last_layer=True)
    sd = h.state_dict()
    assert set(sd) >= {G, V}
    torch.testing.assert_close(sd[G], torch.ones(16, 1))
    g = h.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    # every output direction has unit norm
    torch.testing.assert_close(h.last_layer.weight.norm(dim=1), torch.ones(16))
    h(torch.randn(2, 8)).sum().backward()
    assert g.grad is None and h.last_layer.parametrizations.weight.original1.grad is not None
    assert _head(norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_deepcopy_keeps_parametrization():
    h = _head()
    t = copy.deepcopy(h)
    x = torch.randn(2, 8)
    torch.testing.assert_close(h(x), t(x))
    assert not t.last_layer.parametrizations.weight.original0.requires_grad


def test_loads_old_weight_norm_keys():
    src = _head()
    with torch.no_grad():
        src.last_layer.parametrizations.weight.original1.normal_()
        src.last_layer.parametrizations.weight.original0.fill_(2.0)
    old = {k: v for k, v in src.state_dict().items() if not k.startswith("last_layer")}
    old["last_layer.weight_g"] = src.state_dict()[G].clone()
    old["last_layer.weight_v"] = src.state_dict()[V].clone()
    dst = _head()
    dst.load_state_dict(old)  # strict
    x = torch.randn(3, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert "last_layer.weight_g" in old  # caller's dict is not modified
    # with a prefix, through the wrapper
    wrapped = {"head." + k: v for k, v in old.items()}
    w = MultiCropWrapper(nn.Identity(), _head())
    w.load_state_dict(wrapped)
    torch.testing.assert_close(w.head(x), src(x))


class _CountingBackbone(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.calls = []
        self.proj = nn.Linear(3, dim)

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.proj(x.mean(dim=(2, 3)))


def test_group_by_resolution():
    crops = [torch.zeros(1, 3, s, s) for s in (8, 8, 4, 4, 4, 8)]
    assert group_by_resolution(crops) == [(0, 2), (2, 5), (5, 6)]


def test_multicrop_two_resolutions_two_backbone_calls():
    bb = _CountingBackbone()
    w = MultiCropWrapper(bb, _head())
    B = 3
    crops = [torch.randn(B, 3, 16, 16) for _ in range(2)] + [torch.randn(B, 3, 8, 8) for _ in range(4)]
    out = w(crops)
    assert out.shape == (6 * B, 16)
    assert bb.calls == [(2 * B, 3, 16, 16), (4 * B, 3, 8, 8)]
    # crop order is preserved: the rows of crop 3 equal a forward of crop 3 alone
    torch.testing.assert_close(out[3 * B:4 * B], w.head(bb(crops[3])))
    assert set(k.split(".")[0] for k in w.state_dict()) == {"backbone", "head"}


def test_multicrop_single_tensor_and_empty():
    bb = _CountingBackbone()
    w = MultiCropWrapper(bb, _head())
    assert w(torch.randn(2, 3, 8, 8)).shape == (2, 16)
    with pytest.raises(ValueError):
        w([])
