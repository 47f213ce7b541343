"""Schedules against their closed forms, computed here independently."""

import math

import pytest
import torch

from nidl_dino.core.schedules import WarmupCosineLR, cosine_schedule, warmup_cosine_schedule


def test_cosine_schedule_first_middle_last():
    total, a, b = 10, 0.996, 1.0
    assert cosine_schedule(0, total, a, b) == pytest.approx(a)
    assert cosine_schedule(5, total, a, b) == pytest.approx((a + b) / 2)  # cos(pi/2) = 0
    last = b - (b - a) * (1 + math.cos(math.pi * 9 / 10)) / 2
    assert cosine_schedule(9, total, a, b) == pytest.approx(last)
    assert cosine_schedule(10, total, a, b) == b


def test_warmup_cosine_matches_linspace_then_cosine():
    total, warmup, base, final, start = 12, 4, 1.0, 0.1, 0.0
    warm = torch.linspace(start, base, warmup).tolist()
    values = [warmup_cosine_schedule(k, total, warmup, base, final, start) for k in range(total)]
    assert values[:warmup] == pytest.approx(warm)
    for j in range(total - warmup):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / (total - warmup)))
        assert values[warmup + j] == pytest.approx(expected)


def test_lr_scheduler_steps_through_schedule_and_restores():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6, warmup_start_lr=0.1, min_lr=0.0)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1, 0.5] + [0.5 * (1 + math.cos(math.pi * j / 4)) / 2 for j in range(4)]
    assert seen == pytest.approx(expected)
    # a fresh scheduler loaded from the state dict continues the same curve
    opt2 = torch.optim.SGD([param], lr=0.5)
    sched2 = WarmupCosineLR(opt2, warmup_steps=2, total_steps=6, warmup_start_lr=0.1)
    state = sched.state_dict()
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 6
