"""Unfinished-work experiment (issue "Close the loop"): does a slower architecture that ranks
higher in simulation fall below a faster one once a robot with a slow computer has reported?

Exports every complete trial of the `flip` study (int8, fp32 where the parity check refuses
int8), deploys each in turn to one local agent driving PROFILE, runs 6 episodes, stores the
reports, refits the latency and gap models and prints the ranking. See run.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

from device_agents.signing import generate_keypair
from robonas.export import ExportRefused, export_trial
from robonas.fleet.client import AgentClient
from robonas.fleet.deploy import rollout
from robonas.fleet.inventory import load_inventory
from robonas.fleet.reports import artifact_for_sha, record_report, register_device
from robonas.local_agents import LocalAgent, write_fleet
from robonas.recalibrate import after_reports
from robonas.store import Store
from robonas.study_views import ranked_trials


def main(work: Path, profile: str) -> None:
    store = Store(f"sqlite:///{work / 'runs' / 'robonas.db'}")
    key, pub = generate_keypair(work / "keys", overwrite=True)
    before = ranked_trials(store, "flip")["rows"]
    artifacts = {}
    for row in before:
        try:
            artifacts[row["trial"]] = export_trial(store, "flip", row["trial"], key_path=key).path
        except ExportRefused:
            artifacts[row["trial"]] = export_trial(store, "flip", row["trial"], key_path=key, fp32=True).path
    agent = LocalAgent("robot", f"sim:{profile}", "x86-host", work / "agent", pub).start()
    try:
        inventory = load_inventory(write_fleet(work / "fleet.toml", [agent]))
        entry = inventory.get("robot")
        for trial, path in artifacts.items():
            rollout(path, inventory, canary_count=1, episodes=1, store=store, min_return=0)
            with AgentClient(entry.link, entry.timeout_s, name="robot") as client:
                report = client.run(6, seed=100)
            register_device(store, "robot", "x86-host")
            record_report(store, "robot", "run", report, artifact_for_sha(store, "robot", report["sha256"]))
            print(f"trial {trial}: robot return {report['mean_return']:.0f}, step p50 "
                  f"{report['timings_ms']['p50'] * 1000:.0f} us, applied latency p50 "
                  f"{report['robot_extras']['applied_latency_ms']['p50']:.1f} ms")
    finally:
        agent.stop()
    for line in after_reports(store, ["flip"], ["x86-host"]):
        print(line)
    for b, r in zip(before, ranked_trials(store, "flip")["rows"]):
        print(f"rank {r['rank']}: trial {r['trial']} {r['arch']} (was trial {b['trial']})")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2] if len(sys.argv) > 2 else "cartpole-mcu-d")
