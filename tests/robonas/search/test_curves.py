"""Learning-curve figures on curves whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from robonas.errors import ConfigError
from robonas.search.curves import asymptote, auc_normalised

STEPS = np.linspace(0, 100_000, 11)


def test_auc_constant_at_top_is_one_and_at_bottom_zero():
    assert auc_normalised(STEPS, np.full(11, 500.0), 0.0, 500.0) == pytest.approx(1.0)
    assert auc_normalised(STEPS, np.full(11, 0.0), 0.0, 500.0) == pytest.approx(0.0)


def test_auc_clips_outside_the_range():
    assert auc_normalised(STEPS, np.full(11, 900.0), 0.0, 500.0) == pytest.approx(1.0)
    assert auc_normalised(STEPS, np.full(11, -900.0), 0.0, 500.0) == pytest.approx(0.0)


def test_auc_linear_ramp_is_half_and_uneven_steps_are_weighted():
    assert auc_normalised(STEPS, np.linspace(-200, 300, 11), -200.0, 300.0) == pytest.approx(0.5)
    # top for the first 10% of steps only, then bottom: area 0.05 + half of the ramp's 0.1
    assert auc_normalised([0, 10, 20, 100], [1, 1, 0, 0], 0.0, 1.0) == pytest.approx(0.15)


def test_auc_rejects_bad_input():
    with pytest.raises(ConfigError, match="lo"):
        auc_normalised(STEPS, STEPS, 1.0, 1.0)
    with pytest.raises(ConfigError, match="same length"):
        auc_normalised(STEPS, STEPS[:-1], 0.0, 1.0)
    with pytest.raises(ConfigError, match="increasing"):
        auc_normalised([0, 2, 1], [0, 0, 0], 0.0, 1.0)


def test_asymptote_recovers_a_known_exponential():
    rng = np.random.default_rng(0)
    t = np.linspace(10_000, 200_000, 12)
    a, b, tau = 420.0, 20.0, 40_000.0
    r = a - (a - b) * np.exp(-t / tau) + rng.normal(0, 3.0, t.size)
    est, std = asymptote(t, r)
    assert 0 < std < 20
    assert est - 3 * std <= a <= est + 3 * std
    assert est == pytest.approx(a, abs=10)


def test_asymptote_extrapolates_a_curve_that_has_not_yet_saturated():
    t = np.linspace(1, 10, 10)
    r = 100 - 100 * np.exp(-t / 6.0)  # ends at ~81, heading to 100
    est, _ = asymptote(t, r)
    assert est == pytest.approx(100, abs=1)
    assert r[-1] < est


def test_asymptote_of_a_flat_line_is_its_value_with_no_spread():
    assert asymptote(STEPS, np.full(11, 37.0)) == (pytest.approx(37.0), pytest.approx(0.0))


def test_asymptote_falls_back_to_the_tail_when_the_fit_is_ill_posed():
    # too few points: mean and spread of the last two
    assert asymptote([1, 2, 3], [0.0, 10.0, 20.0]) == (pytest.approx(15.0), pytest.approx(5.0))
    # a straight line never saturates: the fit runs onto its bounds, so the tail is reported
    t = np.arange(1, 13, dtype=float)
    est, std = asymptote(t, 10.0 * t)
    assert est == pytest.approx(np.mean(10.0 * t[-4:]))
    assert std == pytest.approx(np.std(10.0 * t[-4:]))


def test_asymptote_single_point():
    assert asymptote([5], [3.0]) == (3.0, 0.0)


def test_asymptote_never_promises_more_than_an_episode_pays():
    steps = np.array([1000, 2000, 3000, 4000, 5000, 6000], dtype=float)
    rising = 600.0 - 500.0 * np.exp(-steps / 4000.0)  # heading to 600, still below 500 at the end
    free, _ = asymptote(steps, rising)
    capped, _ = asymptote(steps, rising, ceiling=500.0)
    assert free > 500.0 and capped == 500.0
    assert asymptote(steps, rising, ceiling=1e9)[0] == free
