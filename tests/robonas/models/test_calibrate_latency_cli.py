"""`robonas calibrate latency` against a synthetic robot computer: the figures printed with their
intervals, the refusal of noisy timings (one line, nothing stored), `--force`, the warning.

The agent is a fake client (tests/robonas/models/synthetic_latency_device.py) patched in where the
command opens its link (`latency_probe.client_for_entry`); probes are not compiled; the fleet file
and the store (SQLite) are real; the space is the command's default (the demo's cart-pole).
"""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from robonas.models import latency_probe
from robonas.models.latency_probe import NoisyMeasurement
from robonas.store import Store
from tests.robonas.models import synthetic_latency_device as syn


@pytest.fixture()
def world(tmp_path, monkeypatch):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[agent]]\nname = "lab"\nlink = "tcp://127.0.0.1:9"\n'
        'device = "x86-host"\nrobot = "sim:cartpole-lab-a"\n'
    )
    monkeypatch.setattr(latency_probe, "compile_probe", syn.fake_compile)
    devices = {"device": syn.quiet()}

    def client_for_entry(entry, inventory):
        assert entry.name == "lab"
        return syn.FakeClient(devices["device"])

    monkeypatch.setattr(latency_probe, "client_for_entry", client_for_entry)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    return {"fleet": str(fleet), "url": url, "devices": devices}


def _args(world, *extra: str) -> list[str]:
    return [
        "latency",
        "--fleet",
        world["fleet"],
        "--agent",
        "lab",
        "--n-archs",
        "8",
        "--store",
        world["url"],
        *extra,
    ]


def _invoke(world, *extra: str):
    from robonas.cli.calibrate import calibrate_app

    app = typer.Typer()
    app.add_typer(calibrate_app, name="calibrate")
    return CliRunner().invoke(app, ["calibrate", *_args(world, *extra)])


def _stored(world) -> tuple[int | None, int]:
    """(latest latency version of x86-host, bench reports of the robot) in the store."""
    store = Store(world["url"])
    try:
        row = store.latest_model_version("latency", device="x86-host")
        return (None if row is None else row.version), len(store.device_reports(device="lab"))
    finally:
        store.close()


def test_quiet_timings_are_stored_and_printed_with_intervals(world) -> None:
    r = _invoke(world)
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "latency model for x86-host version 1" in out
    assert "held-out MAPE" in out and "within +-10%: 12 of 12 = 100% (95% CI 76%-100%)" in out
    assert out.count("95% CI") == 2 and "uncalibrated prior" in out and "noise worst" in out
    assert r.stderr == ""
    assert _stored(world) == (1, 8 + 12)


def test_json_carries_the_intervals_and_the_noise(world) -> None:
    r = _invoke(world, "--holdout", "14", "--runs", "300", "--rounds", "10", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["version"] == 1 and doc["n_train"] == 8 and doc["n_holdout"] == 14
    assert doc["rounds"] == 10 and doc["per_round"] == 30
    lo, hi = doc["holdout_within_10pct_ci"]
    assert lo <= doc["holdout_within_10pct"] <= hi
    assert doc["holdout_mape_ci"][0] <= doc["holdout_mape"] <= doc["holdout_mape_ci"][1]
    assert doc["noise"]["ok"] is True and doc["noise_warning"] is None
    assert "holdout" not in doc  # the per-architecture rows stay in the store


def test_too_noisy_timings_are_refused_and_nothing_is_stored(world) -> None:
    world["devices"]["device"] = syn.too_noisy()
    r = _invoke(world)
    assert r.exit_code != 0 and isinstance(r.exception, NoisyMeasurement)
    assert _stored(world) == (None, 0)
    # --force stores them, and says what it stored
    r = _invoke(world, "--force")
    assert r.exit_code == 0, r.output
    assert "warning: stored despite the noise (--force)" in " ".join(r.stderr.split())
    assert _stored(world) == (1, 8 + 12)


def test_the_refusal_is_one_line_and_exit_code_2_from_the_real_entry_point(world, capsys) -> None:
    from robonas.cli.app import main

    world["devices"]["device"] = syn.too_noisy()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", *_args(world)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(
        "robonas: error: calibrate latency: timings too noisy to calibrate on, nothing stored"
    )
    for words in ("worst noise", "over 15 rounds", "Close other work", "--rounds 30", "--force"):
        assert words in line
    assert _stored(world) == (None, 0)


def test_noisy_timings_are_stored_with_a_warning(world) -> None:
    world["devices"]["device"] = syn.warning()
    r = _invoke(world)
    assert r.exit_code == 0, r.output
    assert " ".join(r.stderr.split()).startswith("warning: noisy")
    assert "version 1" in r.stdout
    assert _stored(world) == (1, 8 + 12)
