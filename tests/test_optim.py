"""Parameter groups, LARS, clipping, last-layer freezing, teacher EMA, schedule application."""
import copy

import pytest
import torch
from torch import nn

from dino_simpool.dino.head import DINOHead
from dino_simpool.dino.optim import (
    LARS, apply_schedules, build_optimizer, cancel_gradients_last_layer, clip_gradients, ema_update, param_groups,
)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.bn = nn.BatchNorm1d(3)
        self.beta = nn.Parameter(torch.zeros(1))   # SimPool's beta
        self.scalar = nn.Parameter(torch.zeros(()))
        self.wq = nn.Linear(3, 3, bias=False)
        self.last_layer = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.last_layer(self.wq(self.bn(self.norm(self.fc(x)))) + self.beta + self.scalar)


def _ids(ps):
    return {id(p) for p in ps}


def test_param_groups_membership():
    m = _Tiny()
    reg, no = param_groups(m)
    assert _ids(reg["params"]) == _ids([m.fc.weight, m.wq.weight, m.last_layer.weight])
    assert _ids(no["params"]) == _ids([m.fc.bias, m.norm.weight, m.norm.bias, m.bn.weight, m.bn.bias, m.beta,
                                       m.scalar])
    assert no["weight_decay"] == 0.0 and "weight_decay" not in reg


def test_param_groups_skip_frozen_weight_g():
    h = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, norm_last_layer=True)
    reg, no = param_groups(h)
    g = h.last_layer.parametrizations.weight.original0
    assert id(g) not in _ids(reg["params"]) | _ids(no["params"])
    assert id(h.last_layer.parametrizations.weight.original1) in _ids(reg["params"])


def test_lars_1d_param_is_plain_momentum_sgd():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([p], lr=0.1, weight_decay=0.5, momentum=0.9)
    g = torch.tensor([0.3, 0.4])
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.data, torch.tensor([1.0, -2.0]) - 0.1 * g)  # no wd, no trust ratio
    p.grad = g.clone()
    opt.step()
    # mu = 0.9 * g + g
    torch.testing.assert_close(p.data, torch.tensor([1.0, -2.0]) - 0.1 * g - 0.1 * 1.9 * g)


def test_lars_2d_param_trust_ratio_by_hand():
    w0 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||w|| = 5
    p = nn.Parameter(w0.clone())
    g = torch.tensor([[1.0, 2.0], [2.0, -1.0]])
    lr, wd, eta = 0.5, 0.1, 0.001
    opt = LARS([p], lr=lr, weight_decay=wd, momentum=0.9, eta=eta)
    p.grad = g.clone()
    opt.step()
    d = g + wd * w0  # [[1.3, 2], [2, -0.6]]
    d_norm = (1.3 ** 2 + 2 ** 2 + 2 ** 2 + 0.6 ** 2) ** 0.5
    q = eta * 5.0 / d_norm
    torch.testing.assert_close(p.data, w0 - lr * q * d)


def test_lars_zero_weight_gives_unit_ratio_and_custom_filter():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=1.0, momentum=0.0)
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(p.data, -torch.ones(2, 2))
    # Barlow-Twins style: a filter that excludes nothing applies the trust ratio to a 1-D tensor too
    b = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([b], lr=1.0, momentum=0.0, eta=0.1, lars_adaptation_filter=lambda p: False)
    b.grad = torch.tensor([0.0, 2.0])
    opt.step()
    torch.testing.assert_close(b.data, torch.tensor([3.0, 4.0]) - 0.1 * 5.0 / 2.0 * torch.tensor([0.0, 2.0]))


def test_lars_state_dict_is_plain_data(tmp_path):
    m = _Tiny()
    opt = build_optimizer("lars", param_groups(m))
    m(torch.randn(4, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pth")
    sd = torch.load(tmp_path / "o.pth", weights_only=True)
    opt2 = build_optimizer("lars", param_groups(_Tiny()))
    opt2.load_state_dict(sd)


def test_build_optimizer():
    groups = param_groups(_Tiny())
    assert isinstance(build_optimizer("adamw", groups), torch.optim.AdamW)
    sgd = build_optimizer("SGD", param_groups(_Tiny()))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer("lars", param_groups(_Tiny())), LARS)
    with pytest.raises(ValueError, match="adamw, sgd, lars"):
        build_optimizer("adam", groups)


def test_apply_schedules():
    opt = build_optimizer("adamw", param_groups(_Tiny()))
    apply_schedules(opt, lr=0.01, wd=0.04)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]


def _with_grads(grads):
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(2))
    m.b = nn.Parameter(torch.zeros(1, 2))
    m.c = nn.Parameter(torch.zeros(3))  # no grad
    m.a.grad, m.b.grad = grads[0].clone(), grads[1].clone()
    return m


def test_clip_per_tensor():
    m = _with_grads([torch.tensor([3.0, 4.0]), torch.tensor([[0.3, 0.4]])])
    norms = clip_gradients(m, clip=1.0)
    assert norms == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(m.a.grad, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))  # capped at 1
    torch.testing.assert_close(m.b.grad, torch.tensor([[0.3, 0.4]]))  # under the cap: untouched


def test_clip_global():
    m = _with_grads([torch.tensor([3.0, 4.0]), torch.tensor([[0.0, 0.0]])])
    m.b.grad = torch.tensor([[0.0, 12.0]])  # total norm 13
    norms = clip_gradients(m, clip=1.0, mode="global")
    assert norms == pytest.approx([13.0])
    total = torch.cat([m.a.grad.flatten(), m.b.grad.flatten()]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(m.a.grad / m.b.grad.sum(), torch.tensor([3.0, 4.0]) / 12.0)  # direction kept


def test_clip_measure_only_and_bad_mode():
    m = _with_grads([torch.tensor([3.0, 4.0]), torch.tensor([[0.3, 0.4]])])
    assert clip_gradients(m, clip=0.0) == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(m.a.grad, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError):
        clip_gradients(m, 1.0, mode="layer")


def test_cancel_gradients_last_layer():
    m = _Tiny()
    m(torch.randn(4, 4)).sum().backward()
    cancel_gradients_last_layer(epoch=0, model=m, freeze_last_layer=1)
    assert m.last_layer.weight.grad is None and m.fc.weight.grad is not None
    m(torch.randn(4, 4)).sum().backward()
    cancel_gradients_last_layer(epoch=1, model=m, freeze_last_layer=1)
    assert m.last_layer.weight.grad is not None


def test_ema_update_formula_and_buffers_untouched():
    student, teacher = _Tiny(), _Tiny()
    student.bn.running_mean.fill_(5.0)
    t_before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, momentum=0.9)
    for (n, tp), sp in zip(teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(tp.data, 0.9 * t_before[n] + 0.1 * sp.data)
    torch.testing.assert_close(teacher.bn.running_mean, t_before["bn.running_mean"])
    assert teacher.bn.num_batches_tracked == t_before["bn.num_batches_tracked"]


def test_ema_update_through_module_prefix_and_mismatch():
    class Wrap(nn.Module):  # stands in for DDP: parameters named module.*
        def __init__(self, m):
            super().__init__()
            self.module = m

    student, teacher = _Tiny(), _Tiny()
    before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, Wrap(student), momentum=0.5)
    torch.testing.assert_close(teacher.fc.weight, 0.5 * before["fc.weight"] + 0.5 * student.fc.weight)
    ema_update(Wrap(teacher), student, momentum=1.0)  # m=1 keeps the teacher
    torch.testing.assert_close(teacher.fc.weight, 0.5 * before["fc.weight"] + 0.5 * student.fc.weight)
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(4, 3), student, 0.9)


def test_ema_update_head_with_weight_norm():
    s = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    t = copy.deepcopy(s)
    with torch.no_grad():
        s.last_layer.parametrizations.weight.original1.add_(1.0)
    v_t = t.last_layer.parametrizations.weight.original1.detach().clone()
    ema_update(t, s, 0.99)
    torch.testing.assert_close(t.last_layer.parametrizations.weight.original1, v_t * 0.99 + 0.01 * (v_t + 1.0))


def test_param_groups_on_simpool():
    from dino_simpool.pooling.simpool import SimPool

    sp = SimPool(8, qkv_bias=True, gamma=1.25, use_beta=True)
    reg, no = param_groups(sp)
    names = {id(p): n for n, p in sp.named_parameters()}
    assert sorted(names[id(p)] for p in reg["params"]) == ["wk.weight", "wq.weight"]
    assert sorted(names[id(p)] for p in no["params"]) == [
        "beta", "norm_patches.bias", "norm_patches.weight", "wk.bias", "wq.bias"]
