"""The heuristic gap model: zero with nothing to lose, grows with latency share and robustness drop."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from robonas.errors import ConfigError
from robonas.models.gap_model import GapFeatures, GapModel, GapPrediction, HeuristicGapModel


def feats(**kw: float) -> GapFeatures:
    base: dict[str, float] = {
        "asymptotic_return": 800.0,
        "robustness_return": 800.0,
        "p99_ms": 0.0,
        "control_period_ms": 20.0,
        "params": 5000,
        "return_lo": 0.0,
        "return_hi": 1000.0,
    }
    base.update(kw)
    return GapFeatures(**base)  # type: ignore[arg-type]


MODEL = HeuristicGapModel()


def test_derived_features() -> None:
    f = feats(p99_ms=5.0, robustness_return=700.0)
    assert f.latency_share == pytest.approx(0.25)
    assert f.robustness_drop == pytest.approx(100.0)
    # a policy that does better under perturbation has no drop, not a negative one
    assert feats(robustness_return=900.0).robustness_drop == 0.0


def test_zero_gap_at_zero_share_and_drop() -> None:
    assert isinstance(MODEL, GapModel) and MODEL.name and MODEL.version
    pred = MODEL.predict(feats())
    assert pred.mean_gap == 0.0
    assert pred.std_gap >= 0.0


def test_gap_grows_with_latency_share_and_is_steeper_past_one_period() -> None:
    shares = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    gaps = [MODEL.predict(feats(p99_ms=s * 20.0)).mean_gap for s in shares]
    assert all(b > a for a, b in itertools.pairwise(gaps))
    slope_before = (gaps[4] - gaps[2]) / 0.5  # shares 0.5 -> 1.0
    slope_after = (gaps[6] - gaps[4]) / 0.5  # shares 1.0 -> 1.5
    assert slope_after > 2 * slope_before


def test_gap_grows_with_robustness_drop() -> None:
    gaps = [MODEL.predict(feats(robustness_return=800.0 - d)).mean_gap for d in (0, 50, 100, 400)]
    assert gaps[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(gaps))
    assert gaps[2] == pytest.approx(100.0)  # robustness_coef=1 passes the drop straight through


def test_latency_part_scales_with_return_range() -> None:
    narrow = MODEL.predict(feats(p99_ms=10.0, return_hi=100.0)).mean_gap
    wide = MODEL.predict(feats(p99_ms=10.0, return_hi=1000.0)).mean_gap
    assert wide == pytest.approx(10 * narrow)


def test_coefficients_come_from_the_constructor() -> None:
    f = feats(p99_ms=30.0, robustness_return=600.0)  # share 1.5, drop 200
    m = HeuristicGapModel(
        latency_coef=0.2, overrun_coef=1.0, robustness_coef=0.5, std_floor=0.0, std_coef=0.1
    )
    expected = 1000.0 * (0.2 * 1.5 + 1.0 * 0.5) + 0.5 * 200.0
    pred = m.predict(f)
    assert pred.mean_gap == pytest.approx(expected)
    assert pred.std_gap == pytest.approx(0.1 * expected)
    off = HeuristicGapModel(latency_coef=0, overrun_coef=0, robustness_coef=0)
    assert off.predict(f).mean_gap == 0.0
    assert m.params()["overrun_coef"] == 1.0


def test_bad_inputs_raise_config_error_naming_the_value() -> None:
    with pytest.raises(ConfigError, match="latency_coef"):
        HeuristicGapModel(latency_coef=-0.1)
    with pytest.raises(ConfigError, match="control_period_ms"):
        feats(control_period_ms=0.0)
    with pytest.raises(ConfigError, match="return_hi"):
        feats(return_hi=0.0)
    with pytest.raises(ConfigError, match="p99_ms"):
        replace(feats(), p99_ms=-1.0)
    with pytest.raises(ConfigError, match="mean_gap"):
        GapPrediction(mean_gap=-1.0, std_gap=0.0)


def test_from_config_table() -> None:
    m = HeuristicGapModel.from_config({"latency_coef": 0.3, "robustness_coef": 2.0})
    assert m.params()["latency_coef"] == 0.3 and m.params()["robustness_coef"] == 2.0
    assert m.params()["overrun_coef"] == HeuristicGapModel().overrun_coef
    with pytest.raises(ConfigError) as e:
        HeuristicGapModel.from_config({"latency": 0.3})
    assert "'latency'" in str(e.value) and "latency_coef" in str(e.value)
