"""DINO schedules against hand-computed values."""
import math

import numpy as np
import pytest

from dino_simpool.dino.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule


def test_cosine_shape_and_no_warmup_values():
    s = cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=2)
    assert s.shape == (4,)
    # cos part over n=4 iterations: 0.5 * (1 + cos(pi * i / 4))
    expected = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(s, expected)
    assert s[0] == 1.0


def test_cosine_warmup_then_cosine():
    # 1 warm-up epoch of 4 iterations: linspace(0.1, 1.0, 4), then 8 cosine iterations from 1.0 towards 0.2.
    s = cosine_scheduler(1.0, 0.2, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.1)
    assert len(s) == 12
    np.testing.assert_allclose(s[:4], [0.1, 0.4, 0.7, 1.0])
    assert s[4] == pytest.approx(1.0)  # first iteration after warm-up: base value
    assert s[-1] == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * 7 / 8)))  # end: close to final_value
    assert np.all(np.diff(s[4:]) < 0)


def test_cosine_fractional_warmup_and_constant():
    s = cosine_scheduler(0.5, 0.5, epochs=2, niter_per_ep=4, warmup_epochs=0.5)
    assert len(s) == 8
    np.testing.assert_allclose(s[:2], [0.0, 0.5])
    np.testing.assert_allclose(s[2:], 0.5)


def test_cosine_whole_run_warmup():
    s = cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=3, warmup_epochs=1)
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("kwargs", [
    dict(epochs=2, niter_per_ep=3, warmup_epochs=3),
    dict(epochs=0, niter_per_ep=3),
    dict(epochs=2, niter_per_ep=0),
    dict(epochs=2, niter_per_ep=3, warmup_epochs=-1),
])
def test_cosine_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        cosine_scheduler(1.0, 0.0, **kwargs)


def test_warmup_longer_than_training_message():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=5)


def test_teacher_temp_schedule():
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, nepochs=6)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, warmup_epochs=50, nepochs=2)
    with pytest.raises(ValueError):
        teacher_temp_schedule(0.0, 0.07, 0, 2)


def test_scaled_lr():
    assert scaled_lr(5e-4, 512) == pytest.approx(1e-3)
    assert scaled_lr(0.3, 64) == pytest.approx(0.075)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)
