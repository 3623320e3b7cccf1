"""`robonas bench latency`: the whole calibration several times in a row on one (synthetic) robot,
probes compiled once, nothing stored unless asked, and the spread across repeats.

The agent is the fake client of tests/robonas/models/synthetic_latency_device.py, patched in where
the command opens its link (`latency_probe.client_for_entry`); probes are not compiled.
"""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from robonas.bench.latency import bench_latency
from robonas.errors import ConfigError
from robonas.models import latency_probe
from robonas.store import Store
from tests.robonas.models import synthetic_latency_device as syn


@pytest.fixture()
def world(tmp_path, monkeypatch):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[agent]]\nname = "lab"\nlink = "tcp://127.0.0.1:9"\n'
        'device = "x86-host"\nrobot = "sim:cartpole-lab-a"\n'
    )
    compiled: list = []

    def compile_probe(arch, seed=0):
        compiled.append(arch)
        return syn.fake_compile(arch, seed)

    monkeypatch.setattr(latency_probe, "compile_probe", compile_probe)
    state = {"device": syn.quiet(), "clients": []}

    def client_for_entry(entry, inventory):
        client = syn.FakeClient(state["device"])
        state["clients"].append(client)
        return client

    monkeypatch.setattr(latency_probe, "client_for_entry", client_for_entry)
    # where a store would go if the command opened the default one
    default_store = tmp_path / "default.db"
    monkeypatch.setenv("ROBONAS_STORE", f"sqlite:///{default_store}")
    return {
        "fleet": str(fleet),
        "url": f"sqlite:///{tmp_path / 'r.db'}",
        "default_store": default_store,
        "compiled": compiled,
        "state": state,
    }


def _invoke(world, *extra: str):
    from robonas.cli.bench import bench_app

    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    args = ["bench", "latency", "--fleet", world["fleet"], "--agent", "lab", "--n-archs", "8", *extra]
    return CliRunner().invoke(app, args)


def test_repeats_with_probes_compiled_once_and_nothing_stored(world) -> None:
    r = _invoke(world, "--repeats", "3", "--holdout", "12", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(world["compiled"]) == 8 + 12  # compiled once for three repeats
    (client,) = world["state"]["clients"]
    assert client.probe_calls == [(20, 15, 40)] * 3  # each repeat times every probe, interleaved
    assert doc["agent"] == "lab" and doc["device"] == "x86-host"
    assert doc["n_fit"] == 8 and doc["n_holdout"] == 12
    repeats = doc["repeats"]
    assert [x["repeat"] for x in repeats] == [1, 2, 3]
    for x in repeats:
        assert x["n_holdout"] == 12 and x["version"] is None
        assert x["mape_ci"][0] <= x["mape"] <= x["mape_ci"][1]
        assert x["within_10pct_ci"][0] <= x["within_10pct"] <= x["within_10pct_ci"][1]
        assert x["noise"]["ok"] is True
    spread = doc["spread"]
    assert spread["mape_min"] == min(x["mape"] for x in repeats)
    assert spread["mape_max"] == max(x["mape"] for x in repeats)
    assert spread["within_10pct_min"] == min(x["within_10pct"] for x in repeats)
    assert spread["within_10pct_max"] == max(x["within_10pct"] for x in repeats)
    # three measurements of the same probes are three different measurements
    assert len({x["mape"] for x in repeats}) == 3
    assert doc["meets_target"] is True  # the quiet synthetic device follows its roofline
    # stderr: one line per repeat as it finished
    lines = [line for line in r.stderr.splitlines() if line.startswith("repeat ")]
    assert len(lines) == 3 and "95% CI" in lines[0]
    assert not world["default_store"].exists()


def test_the_table_prints_each_repeat_and_the_spread(world) -> None:
    r = _invoke(world, "--repeats", "2", "--holdout", "12")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "latency calibration x2 on lab" in out and "8 fitting + 12 held-out" in out
    assert "12/12 = 100%" in out and "76%-100%" in out
    assert "spread across 2 repeats: MAPE" in out and "target: every repeat >= 90%: met" in out


def test_store_keeps_every_repeat_that_the_noise_verdict_allows(world) -> None:
    r = _invoke(world, "--repeats", "2", "--store", world["url"], "--json")
    assert r.exit_code == 0, r.output
    assert [x["version"] for x in json.loads(r.stdout)["repeats"]] == [1, 2]
    world["state"]["device"] = syn.too_noisy()
    r = _invoke(world, "--repeats", "2", "--store", world["url"], "--json")
    assert r.exit_code == 0, r.output  # a benchmark reports the noise, it does not fail on it
    doc = json.loads(r.stdout)
    assert [x["version"] for x in doc["repeats"]] == [None, None]
    assert all(x["noise"]["refuse"] and "refused" in x["not_stored"] for x in doc["repeats"])
    store = Store(world["url"])
    try:
        assert store.latest_model_version("latency", device="x86-host").version == 2
        assert len(store.device_reports(device="lab")) == 2 * (8 + 12)
    finally:
        store.close()
    r = _invoke(world, "--repeats", "1", "--store", world["url"], "--force", "--json")
    assert [x["version"] for x in json.loads(r.stdout)["repeats"]] == [3]


def test_bench_latency_follows_progress_and_reuses_given_probes(world) -> None:
    probes = latency_probe.compile_probe_set(syn.SPACE, 6, 6, seed=2)
    compiled = len(world["compiled"])
    client = syn.HostOnlyClient(syn.quiet())  # the older client: rounds from the host
    seen: list[tuple[int, int, int]] = []
    result = bench_latency(
        client,
        "lab",
        "x86-host",
        syn.SPACE,
        repeats=2,
        probes=probes,
        rounds=5,
        runs=100,
        progress=lambda *a: seen.append(a),
    )
    assert len(world["compiled"]) == compiled
    assert [r.protocol for r in result.repeats] == ["host-rounds"] * 2
    assert len(client.bench_calls) == 2 * 5 * 12
    assert seen[0] == (1, 1, 5) and seen[-1] == (2, 5, 5)
    assert result.n_fit == 6 and result.n_holdout == 6


def test_bad_repeats_fail_before_any_work(world) -> None:
    with pytest.raises(ConfigError, match="--repeats"):
        bench_latency(syn.FakeClient(syn.quiet()), "lab", "x86-host", syn.SPACE, repeats=0)
    assert world["compiled"] == []
