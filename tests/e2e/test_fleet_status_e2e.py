"""`robonas fleet status` on real agents: whether the robot itself answers (a serial controller
that goes away), errors in full, a table that reads at 100 columns, and the report of the policy
a robot runs after a rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robonas.fleet.local_agents import LocalAgent, local_credentials, write_fleet
from tests.e2e.fake_mcu import FakeMCU
from tests.e2e.test_rollouts_e2e import Fleet

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _status(fleet: Path, store_url: str, *extra: str, columns: int = 100) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    cmd = [
        sys.executable,
        "-m",
        "robonas.cli",
        "fleet",
        "status",
        "--fleet",
        str(fleet),
        "--store",
        store_url,
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_a_serial_robot_that_stops_answering_is_reported_with_its_cause(tmp_path):
    from device_agents.signing import generate_keypair

    _priv, pub = generate_keypair(tmp_path / "signing")
    local_credentials(tmp_path / "keys")
    mcu = FakeMCU("cartpole-lab-a").start()
    agent = LocalAgent(
        "mcu-bot",
        f"serial:{mcu.port}",
        "x86-host",
        tmp_path / "agent",
        pub,
        keys=tmp_path / "keys",
        fast=False,
    )
    agent.start()
    try:
        fleet = write_fleet(tmp_path / "fleet.toml", [agent])
        store = f"sqlite:///{tmp_path / 's.db'}"
        ok = _status(fleet, store, "--json")
        assert ok.returncode == 0, ok.stderr
        (row,) = json.loads(ok.stdout)
        assert row["reachable"] and row["robot_check"]["ok"] is True
        mcu.close()  # the controller is gone; the agent still answers
        bad = _status(fleet, store)
        assert bad.returncode == 2
        assert "mcu-bot: the agent answers, the robot does not:" in bad.stdout
        assert "robot(s) not answering their agent: mcu-bot" in bad.stderr
        (row,) = json.loads(_status(fleet, store, "--json").stdout)
        assert row["reachable"] and row["robot_check"]["ok"] is False and row["robot_check"]["detail"]
    finally:
        agent.stop()
        mcu.close()


def test_status_reads_at_100_columns_and_shows_the_active_policys_report_after_a_rollback(tmp_path):
    fleet = Fleet(tmp_path, 2)
    store = f"sqlite:///{tmp_path / 'robonas.db'}"
    try:
        v1, sha1 = fleet.artifact("v1")
        v2, sha2 = fleet.artifact("v2", "good2")
        for art in (v1, v2):
            cmd = [
                "rollout",
                "start",
                str(art),
                "--fleet",
                str(fleet.fleet),
                "--phases",
                "100%",
                "--episodes",
                "1",
            ]
            r = subprocess.run(
                [sys.executable, "-m", "robonas.cli", *cmd, "--store", store],
                cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        rollback = subprocess.run(
            [sys.executable, "-m", "robonas.cli", "fleet", "rollback", "--fleet", str(fleet.fleet),
             "--agent", "bot-00", "--store", store],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert rollback.returncode == 0, rollback.stderr
        rows = {r["name"]: r for r in json.loads(_status(fleet.fleet, store, "--json").stdout)}
        assert rows["bot-00"]["sha256"] == sha1 and rows["bot-01"]["sha256"] == sha2
        # the report shown is the one of the policy each robot runs now
        with_reports = {n: r["last_report"]["id"] for n, r in rows.items()}
        from robonas.store import Store

        with Store(store) as s:
            for name, sha in (("bot-00", sha1), ("bot-01", sha2)):
                (report,) = [x for x in s.device_reports(device=name) if x.id == with_reports[name]]
                assert report.payload["sha256"] == sha
        table = _status(fleet.fleet, store, columns=100)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert max(len(line) for line in lines) <= 100
        for name in ("bot-00", "bot-01"):  # one line per robot: nothing wrapped
            (line,) = [x for x in lines if name in x]
            assert " yes " in line and "canary" in line
    finally:
        fleet.close()
