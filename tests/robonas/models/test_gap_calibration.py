"""The Bayesian gap model on synthetic reports drawn from known coefficients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robonas.errors import RobonasError
from robonas.models.gap_calibration import (
    FEATURES,
    MIN_OBSERVATIONS,
    BayesianGapModel,
    GapObservation,
    design_row,
    load_gap_model,
    save_gap_model,
)
from robonas.models.gap_model import GapFeatures, GapModel
from robonas.store import Store

# True gap share = x . TRUE over FEATURES (bias, share, overrun, drop, log params).
TRUE = np.array([0.02, 0.15, 0.4, 0.8, 0.01])
LO, HI = 0.0, 1000.0


def features(rng: np.random.Generator, share_range=(0.05, 1.6)) -> GapFeatures:
    asym = float(rng.uniform(500, 900))
    return GapFeatures(
        asymptotic_return=asym,
        robustness_return=asym - float(rng.uniform(0, 150)),
        p99_ms=float(rng.uniform(*share_range)) * 20.0,
        control_period_ms=20.0,
        params=int(rng.integers(500, 100_000)),
        return_lo=LO,
        return_hi=HI,
    )


def observations(n: int, seed: int, noise: float = 0.02, **kw) -> list[GapObservation]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = features(rng, **kw)
        gap_share = float(design_row(f) @ TRUE) + noise * float(rng.standard_normal())
        out.append(GapObservation(f, f.asymptotic_return - gap_share * (HI - LO)))
    return out


def with_outliers(obs: list[GapObservation], idx: list[int]) -> list[GapObservation]:
    # A robot that fell over: it lost 60% of the range more than the model explains.
    out = list(obs)
    for i in idx:
        out[i] = GapObservation(obs[i].features, obs[i].real_return - 0.6 * (HI - LO))
    return out


def test_is_a_gap_model_with_name_and_version() -> None:
    model = BayesianGapModel()
    assert isinstance(model, GapModel)
    assert model.name == "bayes-gap" and model.version == "0"


def test_posterior_recovers_known_coefficients_and_covers_them() -> None:
    model = BayesianGapModel().fit(observations(200, seed=0))
    for j, name in enumerate(FEATURES):
        mean, std = model.coefficient(name)
        assert abs(mean - TRUE[j]) <= 1.96 * std, (name, mean, std, TRUE[j])
        assert abs(mean - TRUE[j]) < 0.05, name
    assert model.noise_scale == pytest.approx(0.02, rel=0.5)


def test_predictive_std_includes_noise_and_mean_matches_truth() -> None:
    obs = observations(200, seed=1)
    model = BayesianGapModel().fit(obs)
    f = obs[0].features
    pred = model.predict(f)
    true_gap = float(design_row(f) @ TRUE) * (HI - LO)
    assert pred.mean_gap == pytest.approx(true_gap, abs=10.0)
    x = design_row(f)
    param_only = (HI - LO) * math.sqrt(float(x @ model.cov @ x))
    assert pred.std_gap > param_only  # the report noise is part of the predictive std
    assert pred.std_gap == pytest.approx(
        (HI - LO) * math.sqrt(model.noise_variance + (param_only / (HI - LO)) ** 2)
    )
    assert model.predict_real_return(f) == pytest.approx(f.asymptotic_return - pred.mean_gap)


def test_outlying_reports_barely_move_the_t_fit_but_drag_a_gaussian_fit() -> None:
    clean = observations(30, seed=2)
    dirty = with_outliers(clean, [3, 11, 25])
    t_clean = BayesianGapModel().fit(clean)
    t_dirty = BayesianGapModel().fit(dirty)
    g_dirty = BayesianGapModel(nu=None).fit(dirty)
    # shifts in units of the clean posterior std of each coefficient
    std = np.sqrt(np.diag(t_clean.cov))
    t_shift = (np.abs(t_dirty.mean - t_clean.mean) / std).max()
    g_shift = (np.abs(g_dirty.mean - t_clean.mean) / std).max()
    assert t_shift < 1.5
    assert g_shift > 5 * t_shift
    # the outliers get the smallest EM weights
    assert set(np.argsort(t_dirty.weights)[:3].tolist()) == {3, 11, 25}


def test_prior_dominates_with_three_reports() -> None:
    # Three reports at nearly the same latency share cannot tell latency from bias.
    obs = observations(3, seed=3, share_range=(0.30, 0.31))
    model = BayesianGapModel().fit(obs)
    mean, std = model.coefficient("latency_share")
    prior_mean, prior_std = model.prior_mean[1], model.prior_std[1]
    assert mean > 0
    assert abs(mean - prior_mean) < 0.5 * prior_std
    assert std > 0.8 * prior_std


def test_too_few_observations_say_how_many_are_needed() -> None:
    with pytest.raises(RobonasError, match=rf"at least {MIN_OBSERVATIONS} observations.*got 2"):
        BayesianGapModel().fit(observations(2, seed=4))


def test_unfitted_model_predicts_the_prior() -> None:
    f = observations(1, seed=5)[0].features
    pred = BayesianGapModel().predict(f)
    assert pred.mean_gap == pytest.approx(
        max(0.0, float(design_row(f) @ BayesianGapModel().prior_mean)) * (HI - LO)
    )


def test_params_round_trip_and_bad_params() -> None:
    model = BayesianGapModel().fit(observations(20, seed=6))
    again = BayesianGapModel.from_params(model.to_params(), version=3)
    f = observations(1, seed=7)[0].features
    assert again.predict(f) == model.predict(f)
    assert again.version == "3"
    with pytest.raises(RobonasError, match="features"):
        BayesianGapModel.from_params({**model.to_params(), "features": ["bias"]})
    with pytest.raises(RobonasError, match="nu"):
        BayesianGapModel(nu=1.5)


def test_store_round_trip(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        sid = store.create_study("s", {}).id
        assert load_gap_model(store, sid) is None
        model = BayesianGapModel().fit(observations(10, seed=8))
        assert save_gap_model(store, sid, model, {"n": 10}) == 1
        assert save_gap_model(store, sid, model, {"n": 10}) == 2
        loaded = load_gap_model(store, sid)
        assert loaded is not None and loaded.version == "2"
        np.testing.assert_allclose(loaded.mean, model.mean)
        np.testing.assert_allclose(loaded.cov, model.cov)
    finally:
        store.close()
