"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import pytest

from memlayers.train.optim import lr_factor


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_one(schedule):
    factors = [lr_factor(s, 100, 8, schedule, 0.1) for s in range(8)]
    assert factors == pytest.approx([(s + 1) / 8 for s in range(8)])
    assert factors[-1] == 1.0
    assert lr_factor(8, 100, 8, schedule, 0.1) == pytest.approx(
        1.0
    )  # first step after warmup: the peak


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.37])
def test_cosine_decays_to_min_ratio(min_ratio):
    total, warmup = 50, 10
    factors = [lr_factor(s, total, warmup, "cosine", min_ratio) for s in range(warmup, total + 1)]
    assert factors[0] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(min_ratio)
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # monotone
    middle = lr_factor(warmup + (total - warmup) // 2, total, warmup, "cosine", min_ratio)
    assert middle == pytest.approx((1 + min_ratio) / 2)
    quarter = lr_factor(warmup + (total - warmup) // 4, total, warmup, "cosine", min_ratio)
    assert quarter == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4)))
    # past the end it stays at the floor
    assert lr_factor(total + 25, total, warmup, "cosine", min_ratio) == pytest.approx(min_ratio)


def test_linear_is_midway_halfway():
    total, warmup, floor = 60, 20, 0.2
    assert lr_factor(40, total, warmup, "linear", floor) == pytest.approx((1 + floor) / 2)
    assert lr_factor(30, total, warmup, "linear", floor) == pytest.approx(
        floor + (1 - floor) * 0.75
    )
    assert lr_factor(60, total, warmup, "linear", floor) == pytest.approx(floor)
    assert lr_factor(59, total, warmup, "linear", floor) == pytest.approx(floor + (1 - floor) / 40)


def test_constant_stays_at_one():
    assert {lr_factor(s, 30, 5, "constant", 0.3) for s in range(5, 200)} == {1.0}


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 10, 0, "cosine", 0.1) == 1.0
    assert lr_factor(0, 10, 0, "linear", 0.1) == 1.0


def test_warmup_as_long_as_training():
    # nothing to decay over: no division by zero
    assert lr_factor(9, 10, 10, "cosine", 0.1) == 1.0
    assert lr_factor(10, 10, 10, "cosine", 0.1) == pytest.approx(1.0)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule 'exponential'"):
        lr_factor(20, 100, 10, "exponential", 0.1)
