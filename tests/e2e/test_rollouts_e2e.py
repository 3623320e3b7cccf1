"""Issue 19: rollouts on real agent processes over loopback TLS: phases in order with a bounded
number of robots at once, a failed gate that stops the rollout and switches the phase's updated
robots back, a host killed mid-rollout that resumes without sending twice, and offline robots
that `resume` picks up when they are back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_agents.signing import generate_keypair, load_private_key
from robonas.export.artifact import write_artifact
from robonas.fleet.local_agents import LocalAgent, local_credentials, write_fleet
from robonas.store import Store
from tests.device_agents.test_agent import manifest_for, test_models

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# agents whose own canary floor no policy reaches: a policy "fails" on exactly these robots
FAILING = ["--canary-min-return", "1e9"]


class Fleet:
    """Local agents started side by side, a fleet file naming them, signed artifacts."""

    def __init__(self, root: Path, n: int, failing: set[int] = frozenset()) -> None:
        self.root = root
        priv, self.pub = generate_keypair(root / "signing")
        self.key = load_private_key(priv)
        local_credentials(root / "keys")  # made once, before the agents start side by side
        self.agents = [
            LocalAgent(
                f"bot-{i:02d}",
                "sim:cartpole-lab-a",
                "x86-host",
                root / "agents" / f"bot-{i:02d}",
                self.pub,
                keys=root / "keys",
                extra_args=FAILING if i in failing else [],
            )
            for i in range(n)
        ]
        self._each(lambda a: a.start())
        self.write()

    def _each(self, fn) -> None:
        errors: list[BaseException] = []

        def run(a: LocalAgent) -> None:
            try:
                fn(a)
            except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(a,)) for a in self.agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def write(self) -> Path:
        self.fleet = write_fleet(self.root / "fleet.toml", self.agents)
        return self.fleet

    def artifact(self, name: str, which: str = "good") -> tuple[Path, str]:
        model = test_models()[which]
        manifest = manifest_for(model)
        dest = write_artifact(self.root / name, model, manifest, self.key)
        return dest, manifest["sha256"]

    def status(self, agent: LocalAgent) -> dict:
        with agent.client() as c:
            c.hello()
            return c.status()

    def active_sha(self, agent: LocalAgent) -> str | None:
        st = self.status(agent)
        return st["slots"][st["active"]]["sha256"] if st.get("active") else None

    def close(self) -> None:
        self._each(lambda a: a.stop())


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path / 'robonas.db'}"


def _robonas(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "robonas.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    return r


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def test_three_phases_canary_first_and_bounded_concurrency(tmp_path, store_url):
    fleet = Fleet(tmp_path, 10)
    try:
        art, sha = fleet.artifact("v1")
        r = _robonas(
            "rollout",
            "start",
            str(art),
            "--fleet",
            str(fleet.fleet),
            "--phases",
            "1,30%,rest",
            "--concurrency",
            "3",
            "--episodes",
            "1",
            "--store",
            store_url,
            "--json",
        )
        out = json.loads(r.stdout[r.stdout.index("{") :])
        assert out["status"] == "complete" and out["phases"] == [1, 3, 6]
        robots = out["robots"]
        assert all(x["state"] == "updated" and x["attempts"] == 1 for x in robots)
        canary = next(x for x in robots if x["phase"] == 1)
        others = [x for x in robots if x["phase"] > 1]
        assert canary["finished_at"] <= min(x["started_at"] for x in others)  # touched before any other
        phase2_end = max(x["finished_at"] for x in robots if x["phase"] == 2)
        assert phase2_end <= min(x["started_at"] for x in robots if x["phase"] == 3)
        overlap = _max_overlap([(x["started_at"], x["finished_at"]) for x in robots])
        assert 2 <= overlap <= 3 and out["report"]["peak_concurrency"] <= 3
        assert all(fleet.active_sha(a) == sha for a in fleet.agents)
    finally:
        fleet.close()


def test_a_policy_failing_on_some_robots_stops_at_the_gate_and_rolls_the_phase_back(tmp_path, store_url):
    fleet = Fleet(tmp_path, 6, failing={4, 5})
    try:
        v1, sha1 = fleet.artifact("v1")
        healthy = ",".join(a.name for a in fleet.agents[:4])
        _robonas(
            "rollout",
            "start",
            str(v1),
            "--fleet",
            str(fleet.fleet),
            "--agents",
            healthy,
            "--phases",
            "100%",
            "--concurrency",
            "4",
            "--episodes",
            "1",
            "--store",
            store_url,
        )
        v2, sha2 = fleet.artifact("v2", "good2")
        r = _robonas(
            "rollout",
            "start",
            str(v2),
            "--fleet",
            str(fleet.fleet),
            "--phases",
            "1,rest",
            "--concurrency",
            "5",
            "--episodes",
            "1",
            "--store",
            store_url,
            "--json",
            check=False,
        )
        assert r.returncode == 1, r.stderr
        out = json.loads(r.stdout[r.stdout.index("{") :])
        assert out["status"] == "aborted"
        gate = out["report"]["gates"]["1"]
        (failure,) = gate["failures"]
        assert failure["gate"] == "pass_rate" and sorted(failure["robots"]) == ["bot-04", "bot-05"]
        assert failure["value"] == pytest.approx(3 / 5)
        states = {x["name"]: x["state"] for x in out["robots"]}
        assert states["bot-00"] == "updated"  # the canary phase passed and keeps v2
        assert {states[f"bot-0{i}"] for i in (1, 2, 3)} == {"rolled-back"}
        assert {states["bot-04"], states["bot-05"]} == {"failed"}
        assert (
            sorted(gate["rolled_back"]) == ["bot-01", "bot-02", "bot-03"]
            and gate["gate_to_rolled_back_s"] > 0
        )
        assert fleet.active_sha(fleet.agents[0]) == sha2
        for a in fleet.agents[1:4]:
            assert fleet.active_sha(a) == sha1  # back on their previous policy
        for a in fleet.agents[4:]:
            assert fleet.active_sha(a) is None  # their own canary refused both; nothing promoted
        shown = _robonas("rollout", "status", str(out["id"]), "--store", store_url)
        assert "failed gate pass_rate" in shown.stdout and "bot-04" in shown.stdout
    finally:
        fleet.close()


@pytest.mark.slow
def test_a_host_killed_mid_rollout_resumes_and_updates_every_robot_once(tmp_path, store_url):
    fleet = Fleet(tmp_path, 8)
    try:
        v1, _ = fleet.artifact("v1")
        _robonas(
            "rollout",
            "start",
            str(v1),
            "--fleet",
            str(fleet.fleet),
            "--phases",
            "100%",
            "--concurrency",
            "4",
            "--episodes",
            "1",
            "--store",
            store_url,
        )
        v2, sha2 = fleet.artifact("v2", "good2")
        cmd = [
            sys.executable,
            "-m",
            "robonas.cli",
            "rollout",
            "start",
            str(v2),
            "--fleet",
            str(fleet.fleet),
            "--phases",
            "1,rest",
            "--concurrency",
            "2",
            "--episodes",
            "5",
            "--store",
            store_url,
        ]
        host = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with Store(store_url) as store:
            deadline = time.monotonic() + 180
            while True:
                assert host.poll() is None and time.monotonic() < deadline, (
                    "the rollout ended before the kill"
                )
                rows = store.rollouts()
                if (
                    len(rows) == 2
                    and sum(r.state == "updated" for r in store.rollout_robots(rows[1].id)) >= 3
                ):
                    break
                time.sleep(0.05)
            os.kill(host.pid, signal.SIGKILL)
            host.wait()
            rid = store.rollouts()[1].id
            before = {r.name: r.state for r in store.rollout_robots(rid)}
        assert "pending" in before.values() or "sending" in before.values()
        _robonas("rollout", "resume", str(rid), "--store", store_url)
        with Store(store_url) as store:
            robots = store.rollout_robots(rid)
            assert store.get_rollout(rid).status == "complete"
            assert all(r.state == "updated" for r in robots)
            for r in robots:  # sent again only if its transfer was cut by the kill
                assert r.attempts == (
                    1 if before[r.name] != "sending" or r.detail.get("already_running") else 2
                )
        for a in fleet.agents:
            st = fleet.status(a)
            shas = [s["sha256"] for s in st["slots"].values() if s.get("sha256")]
            assert st["slots"][st["active"]]["sha256"] == sha2 and shas.count(sha2) == 1  # promoted once
    finally:
        fleet.close()


def test_offline_robots_stay_pending_and_resume_updates_them(tmp_path, store_url):
    fleet = Fleet(tmp_path, 5)
    try:
        v1, sha1 = fleet.artifact("v1")
        down = fleet.agents[3:]
        fleet.write()
        for a in down:
            a.stop()
        r = _robonas(
            "rollout",
            "start",
            str(v1),
            "--fleet",
            str(fleet.fleet),
            "--phases",
            "100%",
            "--concurrency",
            "5",
            "--episodes",
            "1",
            "--retries",
            "1",
            "--store",
            store_url,
            "--json",
            check=False,
        )
        assert r.returncode == 1, r.stderr
        out = json.loads(r.stdout[r.stdout.index("{") :])
        assert out["status"] == "incomplete"
        states = {x["name"]: x["state"] for x in out["robots"]}
        assert [n for n, s in states.items() if s == "offline"] == ["bot-03", "bot-04"]
        for a in down:
            a.start()  # back, on new ports
        fleet.write()
        _robonas("rollout", "resume", str(out["id"]), "--fleet", str(fleet.fleet), "--store", store_url)
        with Store(store_url) as store:
            robots = {x.name: x for x in store.rollout_robots(out["id"])}
            assert store.get_rollout(out["id"]).status == "complete"
            assert all(x.state == "updated" for x in robots.values())
            assert [robots[n].attempts for n in sorted(robots)] == [1, 1, 1, 1, 1]  # no robot sent twice
        assert all(fleet.active_sha(a) == sha1 for a in fleet.agents)
    finally:
        fleet.close()


@pytest.mark.slow
def test_fifty_simulated_robots_in_three_phases(tmp_path, store_url):
    """`robonas fleet simulate`'s fleet of 50: the canary first, at most 8 robots at once, all on
    the new policy at the end."""
    from robonas.fleet.simulate import SimulatedFleet

    with SimulatedFleet(50, tmp_path / "fleet") as fleet:
        model = test_models()["good"]
        art = write_artifact(tmp_path / "v1", model, manifest_for(model), load_private_key(fleet.signing_key))
        r = _robonas(
            "rollout", "start", str(art), "--fleet", str(fleet.fleet_path), "--phases", "1,10%,rest",
            "--concurrency", "8", "--episodes", "1", "--store", store_url, "--json",
        )  # fmt: skip
        out = json.loads(r.stdout[r.stdout.index("{") :])
        assert out["status"] == "complete" and out["phases"] == [1, 5, 44]
        robots = out["robots"]
        assert all(x["state"] == "updated" and x["attempts"] == 1 for x in robots)
        canary = next(x for x in robots if x["phase"] == 1)
        assert canary["finished_at"] <= min(x["started_at"] for x in robots if x["phase"] > 1)
        overlap = _max_overlap([(x["started_at"], x["finished_at"]) for x in robots])
        assert 2 <= overlap <= 8 and out["report"]["peak_concurrency"] <= 8
        sha = manifest_for(model)["sha256"]
        for agent in fleet.agents:
            with agent.client() as c:
                c.hello()
                st = c.status()
            assert st["slots"][st["active"]]["sha256"] == sha
