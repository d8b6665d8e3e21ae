"""train/schedule.py: warmup steps, the lr multiplier per step, and LoRA+ groups keeping their ratio (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.train.schedule import lr_factor, set_lr, warmup_steps


def test_lr_schedule_hand_computed() -> None:
    # warmup W=2 of T=10: steps 0, 1 → 1/2, 2/2; then p = (t − 2) / 8
    assert [lr_factor(t, 10, 2, "cosine") for t in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # p = 1/2: ½(1 + cos π/2)
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_warmup_is_steps_from_one_and_a_fraction_below() -> None:
    assert warmup_steps(3, 100) == 3
    assert warmup_steps(3.7, 100) == 3  # steps: truncated
    assert warmup_steps(1, 100) == 1
    assert warmup_steps(0.05, 100) == 5
    assert warmup_steps(0.05, 30) == 2  # 1.5 rounds to even
    assert warmup_steps(0.25, 10) == 2  # 2.5 rounds to even
    assert warmup_steps(0.0, 100) == 0


def test_set_lr_keeps_each_groups_scale() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 16.0}], lr=1.0)
    set_lr(opt, 3e-4)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4 * 16.0]
