"""ops/dropout.py: sparse dropout positions regenerated from a seed."""

import math

import pytest
import torch

from lorakit.ops.dropout import dropped_positions


def test_same_seed_same_positions_other_seed_other_positions():
    a = dropped_positions(100_000, 0.1, seed=7)
    assert torch.equal(a, dropped_positions(100_000, 0.1, seed=7))
    assert not torch.equal(a, dropped_positions(100_000, 0.1, seed=8))


def test_positions_are_sorted_unique_and_in_range():
    pos = dropped_positions(50_000, 0.3, seed=1).long()
    assert pos.numel() > 0 and int(pos.min()) >= 0 and int(pos.max()) < 50_000
    assert torch.all(pos[1:] > pos[:-1])


@pytest.mark.parametrize("p", [0.01, 0.05, 0.5])
def test_drop_rate_is_p_within_five_standard_deviations(p):
    n = 200_000
    count = dropped_positions(n, p, seed=3).numel()
    assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_each_element_is_dropped_independently():
    # Neighbouring elements of a Bernoulli(p) mask are dropped together with probability p², not p.
    n, p = 400_000, 0.2
    mask = torch.zeros(n, dtype=torch.bool)
    mask[dropped_positions(n, p, seed=5).long()] = True
    both = (mask[1:] & mask[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n)


def test_zero_probability_and_invalid_probability():
    assert dropped_positions(10, 0.0, seed=0).numel() == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropped_positions(10, 1.0, seed=0)
