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


@pytest.mark.slow
def test_robot_reports_reorder_the_study_in_top(tmp_path):
    """The loop with real processes, through the CLI: a search of two architectures (1x64 and
    3x64, both with LayerNorm), every trial exported and deployed to an agent on
    `cartpole-mcu-d` (a robot whose computer is 1000x slower than this one, so inference time
    becomes tens of milliseconds of actuation delay), fresh runs, automatic refit and re-rank.

    Once the robot has spoken, each deployed trial's predicted real return is pulled from the
    model's prediction (now the prior) toward what the robot measured, the gap model is refitted,
    and `robonas top` ranks by the new figures."""
    flip_dir = REPO / "scripts" / "experiments" / "latency_flip"
    url = f"sqlite:///{tmp_path / 'runs' / 'robonas.db'}"
    search = _robonas(tmp_path, "search", str(flip_dir / "flip.toml"), "--workers", "2",
                      "--store", url, "--json")
    assert search.returncode == 0, search.stderr
    before = json.loads(_robonas(tmp_path, "top", "flip", "--json", "--store", url).stdout)["rows"]
    assert {r["arch"] for r in before} == {"64tanh ln shared", "64tanh-64tanh-64tanh ln shared"}

    key, pub = generate_keypair(tmp_path / "keys")
    agent = LocalAgent("mcu", "sim:cartpole-mcu-d", "x86-host", tmp_path / "agent", pub).start()
    try:
        fleet = write_fleet(tmp_path / "fleet.toml", [agent])
        for row in before:
            exported = _robonas(tmp_path, "export", "flip", "--trial", str(row["trial"]), "--key",
                                str(key), "--store", url)
            if exported.returncode != 0:  # a half-trained policy may fail the int8 parity check
                assert "refused" in exported.stderr
                exported = _robonas(tmp_path, "export", "flip", "--trial", str(row["trial"]),
                                    "--fp32", "--key", str(key), "--store", url)
            assert exported.returncode == 0, exported.stderr
            deploy = _robonas(tmp_path, "deploy", exported.stdout.strip(), "--fleet", str(fleet),
                              "--canary", "1", "--episodes", "1", "--min-return", "0", "--store", url)
            assert deploy.returncode == 0, deploy.stderr
            run = _robonas(tmp_path, "fleet", "run", "--fleet", str(fleet), "--episodes", "6",
                           "--store", url)
            assert run.returncode == 0, run.stderr
            assert "recalibrate: re-ranked flip" in run.stderr
    finally:
        agent.stop()

    table = json.loads(_robonas(tmp_path, "top", "flip", "--json", "--store", url).stdout)
    after = table["rows"]
    assert table["models"]["gap_model"].startswith("bayes-gap@")  # 3 (trial, robot) pairs
    for r in after:  # every trial was deployed and measured: 1 canary + 6 run episodes
        assert r["measured_episodes"] == 7
        # the robot's episodes pulled the model's prediction toward what was measured
        model, measured, pred = r["model_real_return"], r["measured_real_return"], r["predicted_real_return"]
        assert min(model, measured) - 1e-6 <= pred <= max(model, measured) + 1e-6
        assert abs(pred - measured) <= abs(model - measured) + 1e-6
    by_trial = {r["trial"]: r for r in after}
    rank_before = {r["trial"]: r["rank"] for r in before}
    fast = [r for r in after if r["arch"] == "64tanh ln shared"]
    slow = [r for r in after if r["arch"] != "64tanh ln shared"]
    flipped = 0
    for s in slow:
        for f in fast:
            assert by_trial[s["trial"]]["p99_ms"] > by_trial[f["trial"]]["p99_ms"]
            # the scenario; reported, not asserted: whether a trained policy loses its
            # return to the delay differs from policy to policy (see the closing note)
            if rank_before[s["trial"]] < rank_before[f["trial"]] and s["rank"] > f["rank"]:
                flipped += 1
    objectives = [r["objective"] for r in after]
    assert objectives == sorted(objectives, reverse=True)
    print(f"slower-but-better-in-sim trials that fell below a faster one: {flipped}; measured "
          + ", ".join(f"trial {r['trial']} {r['arch']}: {r['measured_real_return']:.0f}" for r in after))
