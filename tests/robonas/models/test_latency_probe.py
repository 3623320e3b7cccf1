"""Calibrating latency on an agent, against a synthetic robot computer (known roofline, jitter,
drift, outliers, disturbances; tests/robonas/models/synthetic_latency_device.py): the measurement
(interleaved on the agent with `bench_probes`, or from the host with one-model BENCHes), the noise
verdict, the fit and its held-out figures, and what is stored or refused."""

from __future__ import annotations

import numpy as np
import pytest

from robonas.errors import RobonasError
from robonas.models import latency_probe
from robonas.models.costs import LayerCost
from robonas.models.latency_calibration import actor_signature, load_latency_model
from robonas.models.latency_probe import (
    MAX_PROBES_PER_BENCH,
    NoiseVerdict,
    NoisyMeasurement,
    compile_probe_set,
    measure,
)
from robonas.models.recalibrate import calibrate_latency_on_agent, measure_and_fit
from robonas.store import Store
from tests.robonas.models import synthetic_latency_device as syn


@pytest.fixture(autouse=True)
def fake_compiler(monkeypatch):
    """Probes are the architectures themselves: no torch, no converter."""
    calls: list = []

    def compile_probe(arch, seed=0):
        calls.append(arch)
        return syn.fake_compile(arch, seed)

    monkeypatch.setattr(latency_probe, "compile_probe", compile_probe)
    return calls


@pytest.fixture()
def probes(fake_compiler):
    return compile_probe_set(syn.SPACE, 16, 12, seed=0)


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    yield s
    s.close()


# ----------------------------------------------------------------------------- measuring


def test_interleaved_measurement_on_the_agent(probes) -> None:
    client = syn.FakeClient(syn.quiet())
    m = measure(client, probes.all, runs=600, rounds=15)
    assert client.probe_calls == [(28, 15, 40)]  # one interleaved BENCH of all 28 probes
    assert client.bench_calls == []
    assert m.protocol == "bench_probes" and m.verdict.ok and not m.verdict.refuse
    for t, p in zip(m.timings, probes.all, strict=True):
        assert t.arch == p.arch and t.rounds == 15 and t.noise is not None
        assert abs(t.p50_ms * 1000 / client.device.true_us(p.arch) - 1) < 0.05  # drift and all
        assert t.p99_ms >= t.p50_ms


def test_a_client_without_bench_probes_gets_rounds_from_the_host(probes) -> None:
    """The older client: `rounds` one-model BENCHes per probe, interleaved in a shuffled order,
    and the protocol's verdict computed here from the round medians."""
    client = syn.HostOnlyClient(syn.quiet())
    m = measure(client, probes.all, runs=300, rounds=10)
    assert m.protocol == "host-rounds" and m.per_round == 30
    assert len(client.bench_calls) == 10 * 28 and {r for _, r in client.bench_calls} == {30}
    first_round = [a.arch_id for a, _ in client.bench_calls[:28]]
    second_round = [a.arch_id for a, _ in client.bench_calls[28:56]]
    assert sorted(first_round) == sorted(p.arch.arch_id for p in probes.all)  # every probe once a round
    assert first_round != second_round  # in a fresh order
    assert m.verdict.ok
    for t, p in zip(m.timings, probes.all, strict=True):
        assert abs(t.p50_ms * 1000 / client.device.true_us(p.arch) - 1) < 0.05


@pytest.mark.parametrize("client_cls", [syn.FakeClient, syn.HostOnlyClient])
@pytest.mark.parametrize(
    "device, ok, refuse",
    [(syn.quiet, True, False), (syn.warning, False, False), (syn.too_noisy, False, True)],
)
def test_noise_verdict_quiet_warn_refuse(probes, client_cls, device, ok, refuse) -> None:
    v = measure(client_cls(device()), probes.all).verdict
    assert (v.ok, v.refuse) == (ok, refuse), v
    if refuse:
        assert v.worst > 0.10 and "too noisy" in v.message
    elif not ok:
        assert 0.05 < v.worst <= 0.10 and "noisy" in v.message
    else:
        assert v.worst <= 0.05


def test_the_agents_verdict_is_the_one_used(probes) -> None:
    class Stern(syn.FakeClient):
        def bench_probes(self, models, rounds=15, per_round=40):
            out = super().bench_probes(models, rounds, per_round)
            self.last_noise_verdict = {"ok": False, "refuse": True, "worst": 0.5, "message": "agent says no"}
            return out

    v = measure(Stern(syn.quiet()), probes.all).verdict
    assert v == NoiseVerdict(False, True, 0.5, "agent says no")


def test_more_probes_than_an_agent_session_keeps_are_measured_in_batches() -> None:
    big = compile_probe_set(syn.SPACE, MAX_PROBES_PER_BENCH, 6, seed=1)
    client = syn.FakeClient(syn.quiet())
    m = measure(client, big.all)
    assert [c[0] for c in client.probe_calls] == [MAX_PROBES_PER_BENCH, 6]
    assert [t.arch for t in m.timings] == [p.arch for p in big.all]


def test_an_answer_for_another_model_is_an_error(probes) -> None:
    class Mixed(syn.FakeClient):
        def bench_probes(self, models, rounds=15, per_round=40):
            return list(reversed(super().bench_probes(models, rounds, per_round)))

    with pytest.raises(RobonasError, match="was sent"):
        measure(Mixed(syn.quiet()), probes.all)


# ----------------------------------------------------------------------------- fitting


def test_calibration_recovers_the_devices_roofline(probes) -> None:
    """Timed with jitter, a 2% drift, 1% outliers and small disturbances, 16 probes give back the
    device's step time everywhere in the space. Of the constants, the two overheads are
    identifiable on their own; a Linear layer moves about as many int8 bytes as it does MACs, so
    the fit may put its time on either rate: what must come back is the time of the layer."""
    client = syn.FakeClient(syn.quiet(seed=3))
    run = measure_and_fit(client, "x86-host", probes)
    model, m = run.model, run.metrics
    assert abs(model.per_invoke_s * 1e6 / syn.TRUE.per_invoke_overhead_us - 1) < 0.10
    assert abs(model.per_layer_s * 1e6 / syn.TRUE.per_layer_overhead_us - 1) < 0.10
    big = LayerCost("fc", "linear", 256 * 256 + 256, 256 * 256, 256, 256)  # the widest layer
    fitted = max(big.macs * model.s_per_mac, big.bytes_moved(1) * model.s_per_byte)
    true = max(big.macs / syn.TRUE.compute_macs_per_s, big.bytes_moved(1) / syn.TRUE.memory_bytes_per_s)
    assert abs(fitted / true - 1) < 0.10
    rng = np.random.default_rng(1)
    everywhere = [syn.SPACE.sample(rng) for _ in range(200)]
    errors = [
        abs(model.predict(a, model.prior).p50_ms * 1000 / client.device.true_us(a) - 1) for a in everywhere
    ]
    assert max(errors) < 0.05
    assert m["n_train"] == 16 and m["n_holdout"] == 12
    assert m["holdout_mape"] < 0.03 and m["holdout_k_within_10pct"] == 12
    assert m["holdout_within_10pct_ci"] == pytest.approx([0.7575, 1.0], abs=5e-4)
    assert m["holdout_mape_ci"][0] <= m["holdout_mape"] <= m["holdout_mape_ci"][1]
    assert m["prior_holdout_mape"] > 0.3  # the x86-host prior is far off this device
    assert m["noise"]["ok"] and m["protocol"] == "bench_probes"
    assert {r["arch_id"] for r in m["holdout"]} == {p.arch.arch_id for p in probes.holdout}


def test_the_held_out_share_interval_covers_the_true_share() -> None:
    """A device with per-architecture quirks the roofline cannot express (a fixed log-normal
    factor per actor, sigma 8%): about 70-80% of the space is predicted within +-10%. Over ten
    calibrations (each its own probes and quirks), the 95% interval of the share measured on 12
    held-out probes contains the share over the rest of the space (the truth) nearly always,
    and the MAPE's bootstrap interval the true MAPE most of the time (the bootstrap is a little
    optimistic with 12 values)."""
    share_covered = mape_covered = 0
    for seed in range(10):
        probes = compile_probe_set(syn.SPACE, 16, 12, seed=seed)
        device = syn.quiet(seed, quirk=0.08)
        run = measure_and_fit(syn.FakeClient(device), "x86-host", probes)
        used = {actor_signature(p.arch) for p in probes.all}
        rng = np.random.default_rng(100 + seed)
        rest = {actor_signature(a): a for a in (syn.SPACE.sample(rng) for _ in range(600))}
        rel = np.array(
            [
                abs(run.model.predict(a, run.model.prior).p50_ms * 1000 / device.true_us(a) - 1)
                for key, a in rest.items()
                if key not in used
            ]
        )
        true_share, true_mape = float(np.mean(rel <= 0.10)), float(rel.mean())
        assert 0.5 < true_share < 0.95  # the quirks matter: the share is not trivially 100%
        lo, hi = run.metrics["holdout_within_10pct_ci"]
        share_covered += lo <= true_share <= hi
        mlo, mhi = run.metrics["holdout_mape_ci"]
        mape_covered += mlo <= true_mape <= mhi
        assert hi - lo < 0.6  # an interval, not the whole range
    assert share_covered >= 8
    assert mape_covered >= 7


# ----------------------------------------------------------------------------- storing


def test_calibrate_on_agent_stores_model_and_timings(store, fake_compiler) -> None:
    client = syn.FakeClient(syn.quiet())
    # positional, as the demo calls it: (store, client, robot, device, space, n_archs, runs)
    _, version, m = calibrate_latency_on_agent(store, client, "lab", "x86-host", syn.SPACE, 6, 300)
    assert client.hellos == 1 and len(fake_compiler) == 6 + 12
    assert version == 1 and load_latency_model(store, "x86-host").version == "1"
    assert m["n_train"] == 6 and m["n_holdout"] == 12 and m["noise_warning"] is None
    reports = store.device_reports(device="lab")
    assert len(reports) == 18 and sum(r.payload["held_out"] for r in reports) == 12
    row = store.latest_model_version("latency", device="x86-host")
    assert row.metrics["holdout_within_10pct_ci"] == m["holdout_within_10pct_ci"]
    # the stored fit has seen its own timings: a refit from reports waits for newer ones
    assert row.metrics["last_report_id"] == max(r.id for r in reports)


def test_too_noisy_timings_store_nothing_unless_forced(store) -> None:
    with pytest.raises(NoisyMeasurement) as e:
        calibrate_latency_on_agent(
            store, syn.FakeClient(syn.too_noisy()), "lab", "x86-host", syn.SPACE, 6, 300
        )
    line = str(e.value)
    assert "\n" not in line
    for words in ("nothing stored", "worst noise", "over 15 rounds", "--rounds 30", "--force"):
        assert words in line
    assert store.latest_model_version("latency", device="x86-host") is None
    assert store.device_reports(device="lab") == []
    _, version, m = calibrate_latency_on_agent(
        store, syn.FakeClient(syn.too_noisy()), "lab", "x86-host", syn.SPACE, 6, 300, force=True
    )
    assert version == 1 and m["noise"]["refuse"] and "--force" in m["noise_warning"]


def test_noisy_timings_are_stored_with_a_warning(store) -> None:
    _, version, m = calibrate_latency_on_agent(
        store, syn.FakeClient(syn.warning()), "lab", "x86-host", syn.SPACE, 6, 300
    )
    assert version == 1
    assert m["noise_warning"] and "noisy" in m["noise_warning"]
    assert not m["noise"]["ok"] and not m["noise"]["refuse"]


def test_compiled_probes_are_reused(store, fake_compiler, probes) -> None:
    compiled = len(fake_compiler)
    for _ in range(2):
        calibrate_latency_on_agent(
            store, syn.FakeClient(syn.quiet()), "lab", "x86-host", syn.SPACE, 16, 300, probes=probes
        )
    assert len(fake_compiler) == compiled
    assert store.latest_model_version("latency", device="x86-host").version == 2


def test_bad_sizes_fail_before_any_work(store, fake_compiler) -> None:
    client = syn.FakeClient(syn.quiet())
    with pytest.raises(RobonasError, match="--n-archs 5"):
        calibrate_latency_on_agent(store, client, "lab", "x86-host", syn.SPACE, 5, 300)
    with pytest.raises(RobonasError, match="--holdout 0"):
        calibrate_latency_on_agent(store, client, "lab", "x86-host", syn.SPACE, 6, 300, holdout=0)
    assert client.hellos == 0 and fake_compiler == []
