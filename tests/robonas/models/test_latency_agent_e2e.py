"""A latency calibration against a real agent process (a local agent on a sim twin, TLS, the real
`AgentClient`): probes compiled by the real converter, timed with the agent's interleaved BENCH,
fitted, stored; then the repeat benchmark on the same compiled probes.

Nothing here asserts accuracy or timing (this machine is shared: that is what `robonas bench
latency` measures); it asserts that every piece fits together and what was stored.
"""

from __future__ import annotations

import math

import pytest

from device_agents.signing import generate_keypair
from robonas.bench.latency import bench_latency
from robonas.fleet.local_agents import LocalAgent
from robonas.models.latency_probe import compile_probe_set
from robonas.models.recalibrate import calibrate_latency_on_agent
from robonas.space import SearchSpace
from robonas.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# the demo's cart-pole space
SPACE = SearchSpace(obs_dim=5, act_dim=1, depths=(1, 2, 3), widths=(16, 32, 64, 128))


def test_calibration_and_repeats_on_a_local_agent(tmp_path) -> None:
    _, pub = generate_keypair(tmp_path / "keys")
    agent = LocalAgent("lab", "sim:cartpole-lab-a", "x86-host", tmp_path / "agent", pub).start()
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        probes = compile_probe_set(SPACE, 6, 6, seed=0)  # the real converter, once
        assert all(p.model[4:8] == b"TFL3" for p in probes.all)
        with agent.client(timeout_s=30.0) as client:
            # force: a busy machine may be too noisy; the refusal itself is tested on a fake device
            _, version, m = calibrate_latency_on_agent(
                store, client, "lab", "x86-host", SPACE, 6, 200, rounds=8, force=True, probes=probes
            )
            result = bench_latency(
                client, "lab", "x86-host", SPACE, repeats=2, runs=200, rounds=8, probes=probes
            )
    finally:
        agent.stop()
        store.close()
    assert version == 1
    assert m["protocol"] == "bench_probes" and m["rounds"] == 8 and m["per_round"] == 25
    assert m["n_train"] == 6 and m["n_holdout"] == 6
    assert m["holdout_mape_ci"][0] <= m["holdout_mape"] <= m["holdout_mape_ci"][1]
    assert m["holdout_within_10pct_ci"][0] <= m["holdout_within_10pct"] <= m["holdout_within_10pct_ci"][1]
    assert set(m["noise"]) >= {"ok", "refuse", "worst", "message"}
    assert all(row["noise"] is not None and math.isfinite(row["noise"]) for row in m["holdout"])
    assert all(row["measured_ms"] > 0 for row in m["holdout"])
    assert [r.protocol for r in result.repeats] == ["bench_probes", "bench_probes"]
    assert all(r.version is None for r in result.repeats)  # the benchmark stored nothing
    spread = result.spread()
    noises = ", ".join(f"{r.noise['worst']:.1%}" for r in result.repeats)
    print(
        f"\nlocal agent: calibration MAPE {m['holdout_mape']:.1%}, within 10% "
        f"{m['holdout_k_within_10pct']}/6, noise worst {m['noise']['worst']:.1%}; repeats MAPE "
        f"{spread['mape_min']:.1%}-{spread['mape_max']:.1%}, noise "
        f"{noises}"
    )
