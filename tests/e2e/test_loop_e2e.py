"""The loop end to end with real processes: search -> export -> agent -> reports -> recalibration,
and `robonas demo --quick` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agents.signing import generate_keypair
from robonas.fleet.client import AgentClient
from robonas.fleet.deploy import rollout
from robonas.fleet.inventory import load_inventory
from robonas.local_agents import LocalAgent, write_fleet
from robonas.report import SECTIONS
from robonas.store import Store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _robonas(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robonas.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_agent_on_the_ideal_twin_reproduces_the_export_parity_returns(tmp_path):
    """The deployed artifact, run by the agent in its own process, plays exactly the episodes the
    export's parity check played in simulation: same model, same seeds, same returns. This is
    what makes the returns from the other reality profiles honest."""
    url = f"sqlite:///{tmp_path / 'runs' / 'robonas.db'}"
    cfg = REPO / "launch" / "cartpole.toml"
    assert _robonas(tmp_path, "search", str(cfg), "--trials", "1", "--steps", "6000",
                    "--store", url).returncode == 0
    key, pub = generate_keypair(tmp_path / "keys")
    exported = _robonas(tmp_path, "export", "cartpole", "--best", "--key", str(key), "--store", url, "--json")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    artifact = Path(Store(url).artifacts(manifest["trial"], kind="tflite-int8")[-1].path)
    parity = manifest["parity"]

    agent = LocalAgent("ideal", "sim:cartpole-ideal", "x86-host", tmp_path / "agent", pub).start()
    try:
        inventory = load_inventory(write_fleet(tmp_path / "fleet.toml", [agent]))
        result = rollout(artifact, inventory, canary_count=1, episodes=1, store=Store(url))
        assert result.ok, result.to_dict()
        entry = inventory.get("ideal")
        with AgentClient(entry.link, entry.timeout_s, name="ideal") as client:
            report = client.run(parity["episodes"], seed=parity["seeds"][0])
    finally:
        agent.stop()
    assert report["mean_return"] == pytest.approx(parity["tflite_return"], abs=1e-6)
    assert report["sha256"] == manifest["sha256"]
    assert report["timings_ms"]["p50"] > 0 and report["nonfinite_actions"] == 0


def test_demo_quick_runs_the_whole_loop(tmp_path):
    work = tmp_path / "demo"
    proc = _robonas(tmp_path, "demo", "--quick", "--workdir", str(work), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["exported"], "no candidate was exported"
    # every exported candidate was measured on both robots
    for trial in out["exported"]:
        assert set(out["measured"][str(trial)]) == {"lab-a", "laggy-c"}
    assert out["latency"]["version"] >= 1 and 0 <= out["latency"]["holdout_within_10pct"] <= 1
    assert out["gap"]["version"] >= 1 and out["gap"]["n"] >= 3
    assert {r["trial"] for r in out["before"]} == {r["trial"] for r in out["after"]}

    store = Store(f"sqlite:///{work / 'robonas.db'}")
    top = _robonas(tmp_path, "top", "demo", "--json", "--store", f"sqlite:///{work / 'robonas.db'}")
    models = json.loads(top.stdout)["models"]
    assert models["latency_model"].startswith("calibrated-roofline@")
    assert models["gap_model"].startswith("bayes-gap@")
    assert store.device_reports(kind="run") and store.device_reports(kind="bench")

    html = Path(out["report"]).read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert html.count("data:image/png;base64,") >= 4
