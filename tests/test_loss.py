"""DINO loss pieces against hand computation."""
import math

import pytest
import torch

from dino_simpool.dino.loss import (
    DINOLoss, batch_center, center_update, dino_cross_entropy, loss_pairs, student_log_probs, teacher_entropy,
    teacher_probs,
)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_teacher_probs_by_hand():
    t = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.5, 0.0]])
    q = teacher_probs(t, c, temp=0.5)  # logits (0.5, 0) / 0.5 = (1, 0)
    expected = _softmax([1.0, 0.0])
    torch.testing.assert_close(q, torch.tensor([expected]))
    assert not q.requires_grad


def test_loss_pairs_count():
    assert loss_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # 2*4-2 = 6 terms
    assert len(loss_pairs(8)) == 14  # 2 global + 6 local: SimPool's recipe
    assert len(loss_pairs(2)) == 2


def test_dino_cross_entropy_by_hand():
    # B=1, K=2, ncrops=3 (2 global + 1 local). Teacher probabilities given directly.
    s = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.3, 0.1]])
    q = torch.tensor([[0.75, 0.25], [0.4, 0.6]])
    logp = [[math.log(p) for p in _softmax([a / 0.1, b / 0.1])] for a, b in s.tolist()]
    terms = []
    for iq, v in [(0, 1), (0, 2), (1, 0), (1, 2)]:
        terms.append(-sum(qq * lp for qq, lp in zip(q[iq].tolist(), logp[v])))
    expected = sum(terms) / 4
    got = dino_cross_entropy(s, q, ncrops=3, student_temp=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dino_cross_entropy_batch_mean():
    torch.manual_seed(0)
    s = torch.randn(4 * 3, 5)
    q = torch.softmax(torch.randn(2 * 3, 5), -1)
    lp = torch.log_softmax(s / 0.1, -1).chunk(4)
    qc = q.chunk(2)
    explicit = sum((-(qc[i] * lp[v]).sum(-1)).mean() for i, v in loss_pairs(4)) / 6
    torch.testing.assert_close(dino_cross_entropy(s, q, ncrops=4), explicit)


def test_dino_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="ncrops"):
        dino_cross_entropy(torch.zeros(5, 3), torch.zeros(2, 3), ncrops=2)
    with pytest.raises(ValueError, match="teacher output"):
        dino_cross_entropy(torch.zeros(4, 3), torch.zeros(3, 3), ncrops=2)


def test_student_log_probs_temperature():
    lp = student_log_probs(torch.tensor([[0.1, 0.0]]), 0.1)
    torch.testing.assert_close(lp.exp(), torch.tensor([_softmax([1.0, 0.0])]))


def test_teacher_entropy_and_zero_guard():
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    h = teacher_entropy(q)
    assert torch.isfinite(h)
    assert h.item() == pytest.approx((math.log(2) + 0.0) / 2)


def test_center_helpers():
    t = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(batch_center(t), torch.tensor([[2.0, 4.0]]))
    c = center_update(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 4.0]]), 0.9)
    torch.testing.assert_close(c, torch.tensor([[1.1, 1.3]]))


def test_dinoloss_forward_matches_explicit_and_updates_center():
    torch.manual_seed(0)
    B, K, ncrops = 2, 6, 4
    loss_fn = DINOLoss(K, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4,
                       nepochs=10)
    loss_fn.center.fill_(0.25)
    s = torch.randn(ncrops * B, K, requires_grad=True)
    t = torch.randn(2 * B, K)
    epoch = 2  # temp = linspace(0.04, 0.07, 4)[2] = 0.06
    assert loss_fn.teacher_temp(epoch) == pytest.approx(0.06)
    q = torch.softmax((t - 0.25) / 0.06, -1)
    explicit = dino_cross_entropy(s.detach(), q, ncrops)
    loss, stats = loss_fn(s, t, epoch, return_stats=True)
    torch.testing.assert_close(loss, explicit)
    torch.testing.assert_close(stats.entropy, teacher_entropy(q))
    torch.testing.assert_close(stats.kl, explicit - teacher_entropy(q))
    assert stats.kl.item() >= -1e-6  # CE >= H
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss_fn.center, 0.25 * 0.9 + 0.1 * t.mean(0, keepdim=True))
    assert loss_fn.center.shape == (1, K)
    assert "center" in loss_fn.state_dict()


def test_dinoloss_teacher_temp_warmup_and_after_end():
    loss_fn = DINOLoss(4, 2, 0.04, 0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    temps = [loss_fn.teacher_temp(e) for e in range(7)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07])


def test_dinoloss_fp32_under_autocast():
    loss_fn = DINOLoss(8, 2, 0.04, 0.04, 0, 1)
    s = torch.randn(4, 8).bfloat16()
    t = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(s, t, 0)
    assert loss.dtype == torch.float32
    assert loss_fn.center.dtype == torch.float32


def test_dinoloss_rejects_bad_options():
    with pytest.raises(ValueError):
        DINOLoss(4, 1, 0.04, 0.04, 0, 1)
    with pytest.raises(ValueError):
        DINOLoss(4, 2, 0.04, 0.04, 5, 2)


def test_dinoloss_rejects_teacher_on_all_crops():
    loss_fn = DINOLoss(4, 4, 0.04, 0.04, 0, 1)
    with pytest.raises(ValueError, match="global crops only"):
        loss_fn(torch.randn(8, 4), torch.randn(8, 4), 0)
