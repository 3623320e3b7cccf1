"""The calibrated latency model on synthetic timings generated from known device constants."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from robonas.errors import ConfigError, RobonasError
from robonas.models.devices import DeviceProfile
from robonas.models.latency_calibration import (
    RESIDUAL_CLIP,
    CalibratedLatencyModel,
    LatencySample,
    actor_signature,
    bootstrap_mean_interval,
    fit_roofline,
    holdout_accuracy,
    load_latency_model,
    save_latency_model,
    select_calibration_archs,
    select_probe_sets,
    split_holdout,
    wilson_interval,
)
from robonas.models.latency_model import AnalyticLatencyModel, LatencyModel
from robonas.space import Layer, PolicyArch, SearchSpace
from robonas.store import Store

PRIOR = DeviceProfile(
    name="testboard",
    description="prior figures",
    arch="aarch64",
    compute_macs_per_s=2.5e9,
    memory_bytes_per_s=5.5e9,
    per_layer_overhead_us=6.0,
    per_invoke_overhead_us=60.0,
    p99_over_p50=1.8,
    sources=("test",),
)
# The "real" board: slower compute, faster memory, cheaper ops, costlier Invoke, tighter tail.
# Linear layers stay compute-bound (s/MAC > 1.2 s/byte) so all four constants are identifiable.
TRUE = replace(
    PRIOR,
    compute_macs_per_s=4e8,
    memory_bytes_per_s=1.2e9,
    per_layer_overhead_us=4.0,
    per_invoke_overhead_us=90.0,
    p99_over_p50=1.5,
)
SPACE = SearchSpace(
    obs_dim=17, act_dim=6, depths=(1, 2, 3), widths=(16, 32, 64, 128, 256), activations=("relu", "tanh")
)
ARCHS = select_calibration_archs(SPACE, 80, seed=0)


def measure(archs, noise: float, seed: int) -> list[LatencySample]:
    rng = np.random.default_rng(seed)
    out = []
    for a in archs:
        p50 = AnalyticLatencyModel().predict(a, TRUE).p50_ms * float(np.exp(noise * rng.standard_normal()))
        out.append(LatencySample(a, p50, p50 * 1.5 * float(np.exp(0.05 * rng.standard_normal()))))
    return out


def spike(samples: list[LatencySample], share: float, seed: int) -> list[LatencySample]:
    """Scheduler hiccups: `share` of the samples 3x-10x too slow."""
    rng = np.random.default_rng(seed)
    out = list(samples)
    for i in rng.choice(len(out), round(share * len(out)), replace=False):
        f = float(rng.uniform(3, 10))
        out[i] = LatencySample(out[i].arch, out[i].p50_ms * f, out[i].p99_ms * f)
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def test_is_a_latency_model() -> None:
    model = fit_roofline(measure(ARCHS[:10], 0.01, 0), PRIOR)
    assert isinstance(model, LatencyModel)
    assert model.name == "calibrated-roofline" and model.version == "0"


def test_fit_recovers_known_constants() -> None:
    model = fit_roofline(measure(ARCHS, 0.001, 1), PRIOR)
    assert rel(model.compute_macs_per_s, TRUE.compute_macs_per_s) < 0.03
    assert rel(model.memory_bytes_per_s, TRUE.memory_bytes_per_s) < 0.05
    assert rel(model.per_layer_s * 1e6, TRUE.per_layer_overhead_us) < 0.03
    assert rel(model.per_invoke_s * 1e6, TRUE.per_invoke_overhead_us) < 0.03
    assert model.p99_over_p50 == pytest.approx(1.5, rel=0.03)
    # the roofline explains the data, so the residual stays negligible
    assert abs(model.log_correction(ARCHS[0].actor_layer_costs(), ARCHS[0])) < 0.01


def test_robust_fit_survives_gross_outliers_where_least_squares_fails() -> None:
    train, hold = split_holdout(measure(ARCHS, 0.01, 2), 0.25, seed=0)
    dirty = spike(train, 0.10, seed=3)
    robust = fit_roofline(dirty, PRIOR, robust=True)
    plain = fit_roofline(dirty, PRIOR, robust=False)
    acc_robust = holdout_accuracy(robust, hold)
    acc_plain = holdout_accuracy(plain, hold)
    assert acc_robust["n"] == len(hold) == 20
    assert acc_robust["mape"] < 0.05 and acc_robust["within_10pct"] == 1.0
    assert acc_plain["mape"] > 0.10 and acc_plain["mape"] > 5 * acc_robust["mape"]
    # the well-identified constants survive the spikes too
    assert rel(robust.compute_macs_per_s, TRUE.compute_macs_per_s) < 0.05
    assert rel(robust.per_invoke_s * 1e6, TRUE.per_invoke_overhead_us) < 0.05
    assert rel(plain.per_invoke_s * 1e6, TRUE.per_invoke_overhead_us) > 0.10


def test_calibration_beats_the_prior_on_held_out_archs() -> None:
    train, hold = split_holdout(measure(ARCHS, 0.01, 4), 0.25, seed=1)
    model = fit_roofline(train, PRIOR)
    assert holdout_accuracy(model, hold)["mape"] < 0.03
    assert holdout_accuracy(AnalyticLatencyModel(), hold, PRIOR)["mape"] > 0.3


def test_residual_does_not_explode_with_five_samples() -> None:
    few = measure(select_calibration_archs(SPACE, 5, seed=5), 0.03, 5)
    model = fit_roofline(few, PRIOR)
    others = [SPACE.sample(np.random.default_rng(i)) for i in range(40)]
    corrections = [model.log_correction(a.actor_layer_costs(), a) for a in others]
    assert max(abs(c) for c in corrections) <= RESIDUAL_CLIP
    assert max(abs(c) for c in corrections) < 0.1
    assert holdout_accuracy(model, measure(others, 0.0, 6))["mape"] < 0.15


def test_residual_learns_a_costlier_activation() -> None:
    # every tanh layer makes the net slower than the roofline says: +20% for an all-tanh net
    def tanh_share(arch) -> float:
        return sum(layer.activation == "tanh" for layer in arch.layers) / len(arch.layers)

    samples = [
        LatencySample(
            s.arch, s.p50_ms * (1 + 0.2 * tanh_share(s.arch)), s.p99_ms * (1 + 0.2 * tanh_share(s.arch))
        )
        for s in measure(ARCHS, 0.002, 7)
    ]
    train, hold = split_holdout(samples, 0.25, seed=2)
    model = fit_roofline(train, PRIOR)
    roofline_only = CalibratedLatencyModel.from_params(
        {
            **model.to_params(),
            "residual": {**model.to_params()["residual"], "coef": [0.0] * 6, "intercept": 0.0},
        }
    )
    with_residual = holdout_accuracy(model, hold)["mape"]
    assert with_residual < 0.02
    assert holdout_accuracy(roofline_only, hold)["mape"] > 2 * with_residual
    coef = dict(zip(model.to_params()["residual"]["features"], model.residual_coef, strict=True))
    assert coef["share_tanh"] > 0.02


def test_layernorm_has_its_own_cost() -> None:
    """An int8 LayerNorm is a chain of ops, far costlier than its bytes: here 5 us + 40 ns per
    element on top of its layer's roofline. The fit recovers both constants and predicts held-out
    nets with and without LayerNorm alike."""

    def norm_ms(arch) -> float:
        return sum(5e-3 + c.act_out * 4e-5 for c in arch.actor_layer_costs() if c.kind == "layernorm")

    samples = [
        LatencySample(s.arch, s.p50_ms + norm_ms(s.arch), s.p99_ms + 1.5 * norm_ms(s.arch))
        for s in measure(ARCHS, 0.002, 14)
    ]
    train, hold = split_holdout(samples, 0.25, seed=4)
    model = fit_roofline(train, PRIOR)
    assert model.per_layernorm_s > 0 and model.s_per_layernorm_element > 0
    assert rel(model.per_invoke_s * 1e6, TRUE.per_invoke_overhead_us) < 0.05
    # what LayerNorm adds to a net, narrow or wide (how the fit splits it between its own
    # constants and the LayerNorm's bytes is not identifiable, nor needed)
    for width in (16, 256):
        plain = PolicyArch(17, 6, (Layer(width, "relu"), Layer(width, "tanh")))
        normed = replace(plain, layer_norm=True)
        true_added = AnalyticLatencyModel().predict(normed, TRUE).p50_ms + norm_ms(normed)
        true_added -= AnalyticLatencyModel().predict(plain, TRUE).p50_ms
        added = model.predict(normed, PRIOR).p50_ms - model.predict(plain, PRIOR).p50_ms
        assert rel(added, true_added) < 0.10
    for norm in (False, True):
        side = [s for s in hold if s.arch.layer_norm == norm]
        assert len(side) >= 5 and holdout_accuracy(model, side)["mape"] < 0.01


def test_models_stored_before_the_layernorm_term_still_load() -> None:
    model = fit_roofline(measure(ARCHS[:20], 0.01, 15), PRIOR)
    old = {
        k: v for k, v in model.to_params().items() if k not in ("per_layernorm_s", "s_per_layernorm_element")
    }
    loaded = CalibratedLatencyModel.from_params({**old, "format": 1}, version=3)
    assert loaded.per_layernorm_s == 0.0 and loaded.s_per_layernorm_element == 0.0
    plain = [a for a in ARCHS if not a.layer_norm][:5]
    for a in plain:  # no LayerNorm: the term plays no part
        assert loaded.predict(a, PRIOR).p50_ms == pytest.approx(model.predict(a, PRIOR).p50_ms)


def test_predict_costs_refuses_another_device() -> None:
    model = fit_roofline(measure(ARCHS[:10], 0.01, 8), PRIOR)
    with pytest.raises(RobonasError, match=r"'testboard'.*'other'"):
        model.predict(ARCHS[0], replace(PRIOR, name="other"))
    pred = model.predict_costs(ARCHS[0].actor_layer_costs(), PRIOR)
    assert pred.p99_ms == pytest.approx(pred.p50_ms * model.p99_over_p50)


def test_too_few_samples_and_bad_samples() -> None:
    with pytest.raises(RobonasError, match=r"at least 4 samples.*got 3"):
        fit_roofline(measure(ARCHS[:3], 0.01, 9), PRIOR)
    with pytest.raises(RobonasError, match="p50_ms"):
        LatencySample(ARCHS[0], -1.0, 2.0)
    with pytest.raises(RobonasError, match="below"):
        LatencySample(ARCHS[0], 2.0, 1.0)


def test_params_round_trip() -> None:
    model = fit_roofline(measure(ARCHS[:30], 0.01, 10), PRIOR)
    import json

    again = CalibratedLatencyModel.from_params(json.loads(json.dumps(model.to_params())), version=4)
    assert again.version == "4"
    for a in ARCHS[:10]:
        assert again.predict(a, PRIOR) == model.predict(a, PRIOR)
    with pytest.raises(RobonasError, match="format"):
        CalibratedLatencyModel.from_params({**model.to_params(), "format": 99})


def test_store_round_trip(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        assert load_latency_model(store, "pi-1") is None
        model = fit_roofline(measure(ARCHS[:20], 0.01, 11), PRIOR)
        assert save_latency_model(store, "pi-1", model, {"mape": 0.01}) == 1
        assert save_latency_model(store, "pi-1", model, {"mape": 0.01}) == 2
        loaded = load_latency_model(store, "pi-1")
        assert loaded is not None and loaded.version == "2"
        assert loaded.predict(ARCHS[0], PRIOR) == model.predict(ARCHS[0], PRIOR)
        assert load_latency_model(store, "pi-2") is None
    finally:
        store.close()


def test_select_calibration_archs_is_deterministic_and_covers_the_space() -> None:
    chosen = select_calibration_archs(SPACE, 24, seed=3)
    assert chosen == select_calibration_archs(SPACE, 24, seed=3)
    assert len({a.arch_id for a in chosen}) == 24
    assert all(SPACE.contains(a) for a in chosen)
    assert {len(a.layers) for a in chosen} == set(SPACE.depths)
    assert {a.layer_norm for a in chosen} == {False, True}
    assert {layer.activation for a in chosen for layer in a.layers} == set(SPACE.activations)
    macs = [sum(c.macs for c in a.actor_layer_costs()) for a in chosen]
    all_macs = [
        sum(c.macs for c in SPACE.sample(np.random.default_rng(i)).actor_layer_costs()) for i in range(300)
    ]
    assert min(macs) <= min(all_macs) and max(macs) >= max(all_macs)
    with pytest.raises(ConfigError, match="0"):
        select_calibration_archs(SPACE, 0, seed=0)


def test_split_holdout() -> None:
    samples = measure(ARCHS[:20], 0.01, 12)
    train, hold = split_holdout(samples, 0.25, seed=0)
    assert len(hold) == 5 and len(train) == 15
    assert {id(s) for s in train} | {id(s) for s in hold} == {id(s) for s in samples}
    assert split_holdout(samples, 0.25, seed=0) == (train, hold)
    with pytest.raises(ConfigError, match="fraction"):
        split_holdout(samples, 1.5, seed=0)


def test_timings_of_one_architecture_do_not_calibrate_a_latency_model(tmp_path) -> None:
    """Six timings of one network cannot separate the per-invoke from the per-MAC cost, so the
    fit is refused (and the report-driven refit says why) instead of extrapolating anywhere."""
    from robonas.models.latency_calibration import LatencySample
    from robonas.models.recalibrate import fit_latency
    from robonas.space import Layer, PolicyArch

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    wide = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(256, "tanh"), Layer(256, "tanh")))
    narrow = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(256, "tanh"),))
    same = [LatencySample(wide, 137.0 + i, 150.0 + i) for i in range(6)]
    with pytest.raises(RobonasError, match="cover 1 architecture; at least 2 different"):
        fit_latency(store, "cortex-m7", same)
    assert store.latest_model_version("latency", device="cortex-m7") is None
    both = [*same[:4], LatencySample(narrow, 5.2, 5.7), LatencySample(narrow, 5.3, 5.8)]
    _, version, _ = fit_latency(store, "cortex-m7", both)
    assert version == 1


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_the_closed_form() -> None:
    # reference values of the 95% Wilson score interval (z = 1.96)
    assert wilson_interval(6, 12) == pytest.approx((0.2538, 0.7462), abs=5e-4)
    assert wilson_interval(12, 12) == pytest.approx((0.7575, 1.0), abs=5e-4)
    assert wilson_interval(0, 12) == pytest.approx((0.0, 0.2425), abs=5e-4)
    assert wilson_interval(45, 50) == pytest.approx((0.7864, 0.9565), abs=5e-4)
    # more held-out architectures, a narrower interval at the same share
    lo4, hi4 = wilson_interval(3, 4)
    lo40, hi40 = wilson_interval(30, 40)
    assert hi40 - lo40 < (hi4 - lo4) / 2
    for bad in ((13, 12), (-1, 12), (0, 0)):
        with pytest.raises(RobonasError, match="wilson_interval"):
            wilson_interval(*bad)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    errors = np.abs(np.random.default_rng(0).normal(0.0, 0.05, 12))
    lo, hi = bootstrap_mean_interval(errors)
    assert (lo, hi) == bootstrap_mean_interval(errors)
    assert lo < errors.mean() < hi
    # the mean of 12 draws of |N(0, 0.05)| has a standard error of about 0.009: a 95% interval
    # some 0.035 wide, not a point and not the whole range
    assert 0.015 < hi - lo < 0.06
    assert bootstrap_mean_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
    with pytest.raises(RobonasError, match="1 or more"):
        bootstrap_mean_interval([])


def test_holdout_accuracy_reports_intervals_beside_the_figures() -> None:
    train, hold = split_holdout(measure(ARCHS, 0.05, 13), 0.25, seed=3)
    acc = holdout_accuracy(fit_roofline(train, PRIOR), hold)
    assert acc["n"] == 20
    assert acc["mape_lo"] <= acc["mape"] <= acc["mape_hi"]
    assert acc["within_10pct_lo"] <= acc["within_10pct"] <= acc["within_10pct_hi"]
    assert acc["within_10pct"] == acc["k_within_10pct"] / 20
    assert (acc["within_10pct_lo"], acc["within_10pct_hi"]) == wilson_interval(int(acc["k_within_10pct"]), 20)


# ----------------------------------------------------------------------------- probe sets


def _widths(archs) -> set[int]:
    return {layer.width for a in archs for layer in a.layers}


@pytest.mark.parametrize("n_fit, n_hold", [(16, 12), (6, 12), (24, 20)])
def test_probe_sets_are_disjoint_and_each_covers_the_space(n_fit, n_hold) -> None:
    fit, hold = select_probe_sets(SPACE, n_fit, n_hold, seed=4)
    assert (fit, hold) == select_probe_sets(SPACE, n_fit, n_hold, seed=4)
    assert len(fit) == n_fit and len(hold) == n_hold
    # no duplicates, and no network timed twice: archs that differ only in the critic's trunk
    # compile to the same actor
    for s in (fit, hold, fit + hold):
        assert len({a.arch_id for a in s}) == len(s)
        assert len({actor_signature(a) for a in s}) == len(s)
    all_macs = [
        sum(c.macs for c in SPACE.sample(np.random.default_rng(i)).actor_layer_costs()) for i in range(300)
    ]
    for s in (fit, hold):
        assert all(SPACE.contains(a) for a in s)
        assert min(_widths(s)) == min(SPACE.widths) and max(_widths(s)) == max(SPACE.widths)
        depths = {len(a.layers) for a in s}
        assert min(SPACE.depths) in depths and max(SPACE.depths) in depths
        assert {layer.activation for a in s for layer in a.layers} == set(SPACE.activations)
        assert {a.layer_norm for a in s} == {False, True}
        macs = [sum(c.macs for c in a.actor_layer_costs()) for a in s]
        # the held-out set spans the cost range too, not only the fitting set
        assert min(macs) <= np.percentile(all_macs, 5) and max(macs) >= np.percentile(all_macs, 90)


def test_held_out_set_covers_the_space_better_than_random_leftovers() -> None:
    """Covering means no architecture of the space is far from a held-out probe: the largest
    distance from a sample of the space to its nearest held-out probe (in the selection's own
    feature space: scaled decisions and log MACs) is smaller than for any of 20 random sets of
    12, such as the leftovers of a random split would be."""
    from robonas.models.latency_calibration import _coverage_features  # the space it covers

    _, hold = select_probe_sets(SPACE, 16, 12, seed=0)
    rng = np.random.default_rng(7)
    population = [SPACE.sample(rng) for _ in range(2000)]

    def radius(probes) -> float:
        feats, _ = _coverage_features(SPACE, population + probes)
        pop, own = feats[: len(population)], feats[len(population) :]
        return float(np.linalg.norm(pop[:, None, :] - own[None, :, :], axis=2).min(axis=1).max())

    randoms = []
    for seed in range(20):
        r = np.random.default_rng(seed)
        randoms.append(radius([SPACE.sample(r) for _ in range(12)]))
    assert radius(hold) < min(randoms)


def test_a_space_too_small_for_both_sets_is_a_config_error() -> None:
    tiny = SearchSpace(
        obs_dim=3,
        act_dim=1,
        depths=(1,),
        widths=(16, 32),
        activations=("relu",),
        layer_norm=(False,),
        residual=(False, True),
        shared_trunk=(False, True),
    )
    # 8 archs, but only 2 distinct actor networks
    assert len(select_calibration_archs(tiny, 10, seed=0)) == 2
    with pytest.raises(ConfigError, match=r"2 distinct actor networks.*need 3"):
        select_probe_sets(tiny, 2, 1, seed=0)
    with pytest.raises(ConfigError, match="held-out"):
        select_probe_sets(tiny, 1, -1, seed=0)
