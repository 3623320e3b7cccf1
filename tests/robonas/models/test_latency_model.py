"""The roofline latency model on constructed layer costs whose answer is known by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from robonas.errors import RobonasError
from robonas.models.costs import LayerCost
from robonas.models.devices import DeviceProfile
from robonas.models.latency_model import (
    AnalyticLatencyModel,
    LatencyModel,
    LatencyPrediction,
)

# Round numbers so every expectation can be computed by hand: 1e9 MAC/s, 1e9 B/s.
DEV = DeviceProfile(
    name="test",
    description="round numbers",
    arch="aarch64",
    compute_macs_per_s=1e9,
    memory_bytes_per_s=1e9,
    per_layer_overhead_us=10.0,
    per_invoke_overhead_us=100.0,
    p99_over_p50=2.0,
    sources=("test",),
)
NO_OVERHEAD = replace(DEV, per_layer_overhead_us=0.0, per_invoke_overhead_us=0.0)


def linear(i: int, o: int, name: str = "fc") -> LayerCost:
    return LayerCost(name=name, kind="linear", params=i * o + o, macs=i * o, act_in=i, act_out=o)


class StandIn:
    """Duck-typed PolicyArch: only what the latency model uses."""

    def __init__(self, costs: list[LayerCost]) -> None:
        self._costs = costs

    def actor_layer_costs(self) -> list[LayerCost]:
        return list(self._costs)


MODEL = AnalyticLatencyModel()


def test_is_a_latency_model_with_name_and_version() -> None:
    assert isinstance(MODEL, LatencyModel)
    assert MODEL.name and MODEL.version
    with pytest.raises(TypeError):
        LatencyModel()  # type: ignore[abstract]


def test_hand_computed_prediction() -> None:
    # 1e6 MACs -> 1 ms compute; bytes = params+in+out = 1,001,000+1000+1000 at int8 -> 1.003 ms.
    costs = [linear(1000, 1000)]
    pred = MODEL.predict_costs(costs, DEV)
    expected_ms = 0.1 + 0.01 + 1_003_000 / 1e9 * 1e3
    assert pred.p50_ms == pytest.approx(expected_ms)
    assert pred.p99_ms == pytest.approx(2.0 * expected_ms)


def test_predict_uses_actor_layer_costs() -> None:
    costs = [linear(17, 64, "fc0"), linear(64, 64, "fc1"), linear(64, 6, "head")]
    assert MODEL.predict(StandIn(costs), DEV) == MODEL.predict_costs(costs, DEV)


def test_latency_grows_with_macs() -> None:
    preds = [MODEL.predict_costs([linear(w, w), linear(w, w)], DEV).p50_ms for w in (16, 64, 256, 1024)]
    assert preds == sorted(preds) and len(set(preds)) == 4


def test_more_layers_cost_overhead_each() -> None:
    one = MODEL.predict_costs([linear(8, 8)], DEV).p50_ms
    act = LayerCost("act0", "activation", 0, 0, 8, 8)
    two = MODEL.predict_costs([linear(8, 8), act], DEV).p50_ms
    # the activation moves 16 bytes (16 ns) and pays one per-layer overhead (10 us)
    assert two - one == pytest.approx(0.010 + 16e-6)


def test_empty_network_costs_the_invoke_overhead() -> None:
    pred = MODEL.predict_costs([], DEV)
    assert pred.p50_ms == pytest.approx(0.1)


def test_compute_bound_layer_ignores_bandwidth() -> None:
    """Many MACs per byte: doubling bandwidth changes nothing, doubling MAC rate halves time."""
    # 1e6 MACs but only 1000 bytes: arithmetic intensity 1000 MAC/B, far above the 1 MAC/B ridge.
    layer = LayerCost("conv-like", "linear", params=800, macs=1_000_000, act_in=100, act_out=100)
    (t,) = MODEL.layer_times([layer], NO_OVERHEAD)
    assert t.bound == "compute"
    base = MODEL.predict_costs([layer], NO_OVERHEAD).p50_ms
    faster_mem = replace(NO_OVERHEAD, memory_bytes_per_s=2e9)
    faster_cpu = replace(NO_OVERHEAD, compute_macs_per_s=2e9)
    assert MODEL.predict_costs([layer], faster_mem).p50_ms == pytest.approx(base)
    assert MODEL.predict_costs([layer], faster_cpu).p50_ms == pytest.approx(base / 2)
    assert base == pytest.approx(1.0)


def test_memory_bound_layer_ignores_mac_rate() -> None:
    """A LayerNorm-like layer: few MACs, many bytes; only bandwidth matters."""
    layer = LayerCost("ln0", "layernorm", params=2000, macs=3000, act_in=100_000, act_out=100_000)
    (t,) = MODEL.layer_times([layer], NO_OVERHEAD)
    assert t.bound == "memory"
    base = MODEL.predict_costs([layer], NO_OVERHEAD).p50_ms
    assert base == pytest.approx(202_000 / 1e9 * 1e3)
    faster_mem = replace(NO_OVERHEAD, memory_bytes_per_s=2e9)
    faster_cpu = replace(NO_OVERHEAD, compute_macs_per_s=2e9)
    assert MODEL.predict_costs([layer], faster_cpu).p50_ms == pytest.approx(base)
    assert MODEL.predict_costs([layer], faster_mem).p50_ms == pytest.approx(base / 2)


def test_ridge_point_switches_regime() -> None:
    """On a 1 MAC/byte device a layer switches from memory- to compute-bound at intensity 1."""
    below = LayerCost("a", "linear", params=10, macs=90, act_in=45, act_out=45)  # 90 MACs / 100 B
    above = LayerCost("b", "linear", params=10, macs=110, act_in=45, act_out=45)  # 110 MACs / 100 B
    assert [t.bound for t in MODEL.layer_times([below, above], NO_OVERHEAD)] == ["memory", "compute"]


def test_p99_at_least_p50_for_shipped_style_profiles() -> None:
    for ratio in (1.0, 1.3, 3.0):
        dev = replace(DEV, p99_over_p50=ratio)
        pred = MODEL.predict_costs([linear(32, 32)], dev)
        assert pred.p99_ms >= pred.p50_ms
        assert pred.p99_ms == pytest.approx(ratio * pred.p50_ms)


def test_prediction_rejects_inconsistent_values() -> None:
    with pytest.raises(RobonasError):
        LatencyPrediction(p50_ms=2.0, p99_ms=1.0)
    with pytest.raises(RobonasError):
        LatencyPrediction(p50_ms=-1.0, p99_ms=1.0)


def test_real_policy_arch() -> None:
    """Integration with robonas.space: wider nets are slower on every profile."""
    from robonas.models.devices import load_device
    from robonas.space import ACTIVATIONS, PolicyArch

    archs = [
        PolicyArch.from_dict({"obs_dim": 17, "act_dim": 6, "layers": [[width, ACTIVATIONS[0]]] * 2})
        for width in (16, 256)
    ]
    for name in ("rpi4", "jetson-orin-nano-cpu", "x86-host"):
        small, big = (MODEL.predict(a, load_device(name)) for a in archs)
        assert big.p50_ms > small.p50_ms > 0
