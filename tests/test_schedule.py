"""The learning-rate schedule, point by point from its formula.

Warmup: step s < W trains at lr · (s + 1) / (W + 1), so step 0 already takes a step (at
lr / (W + 1)) and the rate reaches lr at step W. Then cosine decay over the steps W..S
(S = lr_decay_steps, or max_steps): min_lr + ½ (1 + cos(π (s − W) / (S − W))) (lr − min_lr),
and min_lr from step S on.
"""

from __future__ import annotations

import math

import pytest

from test_training import batch_at, tiny_config
from truthgpt.config import TrainConfig
from truthgpt.training import TruthGPTOptimizationCore, lr_at


def test_warmup_starts_above_zero_and_rises_linearly():
    cfg = TrainConfig(learning_rate=0.6, min_lr=0.06, warmup_steps=5, max_steps=50)
    assert lr_at(0, cfg) == pytest.approx(0.6 / 6) and lr_at(0, cfg) > 0
    assert lr_at(1, cfg) == pytest.approx(0.6 * 2 / 6)
    assert lr_at(4, cfg) == pytest.approx(0.6 * 5 / 6)
    assert lr_at(5, cfg) == pytest.approx(0.6)  # the first step of the decay: progress 0


def test_cosine_decay_by_hand():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.2, warmup_steps=10, max_steps=90)
    # progress (s − 10) / 80: a quarter, a half, three quarters of the cosine
    assert lr_at(30, cfg) == pytest.approx(0.2 + 0.5 * (1 + math.sqrt(0.5)) * 0.8)
    assert lr_at(50, cfg) == pytest.approx(0.6)
    assert lr_at(70, cfg) == pytest.approx(0.2 + 0.5 * (1 - math.sqrt(0.5)) * 0.8)
    assert lr_at(89, cfg) == pytest.approx(0.2 + 0.5 * (1 + math.cos(math.pi * 79 / 80)) * 0.8)
    assert lr_at(90, cfg) == pytest.approx(0.2) and lr_at(1000, cfg) == pytest.approx(0.2)


def test_lr_decay_steps_sets_the_end_of_the_decay():
    cfg = TrainConfig(
        learning_rate=1.0, min_lr=0.0, warmup_steps=2, max_steps=100, lr_decay_steps=12
    )
    assert lr_at(0, cfg) == pytest.approx(1 / 3)
    assert lr_at(7, cfg) == pytest.approx(0.5)  # halfway through steps 2..12
    assert lr_at(12, cfg) == 0.0 and lr_at(99, cfg) == 0.0


def test_no_warmup_starts_at_the_full_rate():
    cfg = TrainConfig(learning_rate=0.3, min_lr=0.03, warmup_steps=0, max_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.3)
    assert lr_at(5, cfg) == pytest.approx(0.03 + 0.5 * 0.27)


def test_trainer_steps_at_the_schedule_rate_from_step_zero():
    """The first update uses lr_at(0) = lr / (W + 1) for every parameter group (scaled by the
    group's lr_scale), and each later step the schedule's next value."""
    core = TruthGPTOptimizationCore(tiny_config(learning_rate=3e-3, warmup_steps=2))
    used = []
    optimizer = core.setup_optimizer()
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(
            [(g["lr"], g.get("lr_scale", 1.0)) for g in opt.param_groups]
        )
    )
    lrs = [core.train_step(batch_at(i))["lr"] for i in range(4)]
    assert lrs == pytest.approx([3e-3 / 3, 3e-3 * 2 / 3, 3e-3, lr_at(3, core.config)])
    for lr, groups in zip(lrs, used, strict=True):
        assert all(group_lr == pytest.approx(lr * scale) for group_lr, scale in groups)
