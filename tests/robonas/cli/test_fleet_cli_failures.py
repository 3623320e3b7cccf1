"""The fleet commands when things go wrong: a fleet file that is not a TOML file is one error line
from the real CLI, and a deploy or run that brought no new evidence from any robot refits and
re-ranks nothing (and says why).

The refit entry point (`robonas.models.recalibrate.after_reports`) is replaced by a recorder;
robots are scripted clients patched in where the commands open their links, as in
tests/robonas/fleet/test_fleet_inventory.py. The store is a real SQLite file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from robonas.fleet.client import DeployResult, LinkFailure
from robonas.space import Layer, PolicyArch

REPO = Path(__file__).resolve().parents[3]
MODEL = b"TFL3-fake-model-bytes" * 100
SHA = hashlib.sha256(MODEL).hexdigest()


# ----------------------------------------------------------------------------- bad --fleet, real CLI
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "robonas.cli", *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("kind", ["directory", "non-utf8"])
def test_fleet_status_with_a_directory_or_binary_fleet_file_is_one_line(tmp_path, kind):
    if kind == "directory":
        fleet = tmp_path / "fleet-dir"
        fleet.mkdir()
        words = ["is a directory"]
    else:
        fleet = tmp_path / "fleet.toml"
        fleet.write_bytes(b"\xff\xfe")
        words = ["not UTF-8", "0xff at offset 0"]
    r = _cli("fleet", "status", "--fleet", str(fleet), "--store", f"sqlite:///{tmp_path / 's.db'}")
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("robonas: error: fleet file ") and str(fleet) in lines[0]
    for w in words:
        assert w in lines[0]


# ----------------------------------------------------------------------------- deploy / run refits
class Robot:
    """One scripted agent. `plan[name]` says what it does: ok, canary-fail (NACK with a canary
    report), bad-signature (NACK at DEPLOY_BEGIN, no canary ran) or down (the link never opens)."""

    def __init__(self, entry: Any, plan: dict[str, str]):
        self.name, self.plan = entry.name, plan

    def _link(self) -> None:
        if self.plan[self.name] == "down":
            raise LinkFailure(f"agent {self.name}: cannot open link: refused", self.name, "open")

    def hello(self) -> dict[str, Any]:
        self._link()
        return {"agent": self.name, "protocol": 1}

    def status(self) -> dict[str, Any]:
        return {"active": "a", "slots": {"a": {"sha256": "old"}}}

    def deploy(self, artifact_dir, canary, progress, signature=None) -> DeployResult:
        outcome = self.plan[self.name]
        progress(len(MODEL), len(MODEL))
        if outcome == "bad-signature":
            return DeployResult(
                self.name, False, SHA, len(MODEL), reason="signature", detail="bad signature", step="begin"
            )
        report = {"returns": [120.0, 130.0], "timings_ms": {"p50": 0.05, "p99": 0.2}, "deadline_misses": 0}
        return DeployResult(
            self.name,
            outcome == "ok",
            SHA,
            len(MODEL),
            reason="ok" if outcome == "ok" else "canary",
            detail="" if outcome == "ok" else "deadline misses 40% > 5%",
            slot="b",
            active="b" if outcome == "ok" else "a",
            canary=report,
            bytes_sent=len(MODEL),
        )

    def close(self) -> None:
        pass


class RunClient:
    """`AgentClient` for `fleet run`: the robots named in `down` never answer."""

    down: ClassVar[set[str]] = set()

    def __init__(self, url: str, timeout_s: float = 5.0, name: str | None = None):
        self.name = name or url

    @classmethod
    def for_entry(cls, entry: Any, credentials: object = None) -> RunClient:
        return cls(entry.link, entry.timeout_s, name=entry.name)

    def __enter__(self) -> RunClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def hello(self) -> dict[str, Any]:
        if self.name in self.down:
            raise LinkFailure(f"agent {self.name}: cannot open link: refused", self.name, "open")
        return {"agent": self.name}

    def run(self, episodes: int, seed: int, record: bool = False) -> dict[str, Any]:
        return {"sha256": SHA, "returns": [100.0] * episodes, "timings_ms": {"p50": 0.05, "p99": 0.2}}


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """A store with study 's', one trial and its artifact; a two-robot fleet (c1 on x86-host,
    r1 on rpi4); the refit entry point replaced by a recorder."""
    import robonas.fleet.client as client_mod
    from robonas.store import Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    study = store.create_study("s", {})
    trial = store.add_trial(study.id, 0, PolicyArch(4, 1, (Layer(8, "tanh"),)))
    art_dir = tmp_path / "art"
    art_dir.mkdir()
    manifest = {"sha256": SHA, "trial": trial.id, "study": "s", "format_version": 1}
    (art_dir / "manifest.json").write_text(json.dumps(manifest))
    art = store.add_artifact(trial.id, "tflite-int8", str(art_dir), SHA)
    store.close()
    monkeypatch.setattr(client_mod, "read_artifact", lambda d: (dict(manifest), MODEL, "sig"))
    monkeypatch.setattr("robonas.fleet.deploy.RETRY_BACKOFF_S", 0.0)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[agent]]\nname = "c1"\nlink = "tcp://127.0.0.1:7001"\ndevice = "x86-host"\nrobot = "sim:p"\n\n'
        '[[agent]]\nname = "r1"\nlink = "tcp://127.0.0.1:7002"\ndevice = "rpi4"\nrobot = "sim:p"\n'
    )
    calls: list[dict[str, Any]] = []

    def after_reports(store, study_names, profiles, refit=True, robots=()):
        calls.append(
            {"studies": list(study_names), "profiles": list(profiles), "refit": refit, "robots": list(robots)}
        )
        return ["recorded"]

    monkeypatch.setattr("robonas.models.recalibrate.after_reports", after_reports)
    return {"url": url, "fleet": fleet, "art": art_dir, "artifact_id": art.id, "calls": calls}


def _invoke(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from robonas.cli.fleet import deploy_command, fleet_app

    app = typer.Typer()
    app.command("deploy")(deploy_command)
    app.add_typer(fleet_app, name="fleet")
    return CliRunner().invoke(app, args)


def _deploy(world, monkeypatch, plan: dict[str, str], *extra: str):
    monkeypatch.setattr("robonas.fleet.deploy.default_client", lambda e, credentials=None: Robot(e, plan))
    return _invoke(
        [
            "deploy",
            str(world["art"]),
            "--fleet",
            str(world["fleet"]),
            "--store",
            world["url"],
            "--retries",
            "0",
            *extra,
        ]
    )


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(
    "plan, words",
    [
        ({"c1": "down", "r1": "ok"}, ["c1: link-failure (link)", "r1: skipped (canary failed)"]),
        ({"c1": "bad-signature", "r1": "ok"}, ["c1: refused (signature)", "r1: skipped"]),
    ],
)
def test_deploy_where_no_robot_sent_a_report_refits_nothing(world, monkeypatch, plan, words, as_json):
    r = _deploy(world, monkeypatch, plan, *(["--json"] if as_json else []))
    assert r.exit_code == 2, r.output
    assert world["calls"] == []
    line = next(x for x in r.stderr.splitlines() if x.startswith("recalibrate:"))
    assert "nothing refitted or re-ranked: no robot sent a canary report" in line
    for w in words:
        assert w in line
    if as_json:  # the explanation went to stderr: stdout is still the JSON document alone
        assert [x["status"] for x in json.loads(r.stdout)["robots"]][1] == "skipped"


def test_deploy_refits_for_the_robots_that_reported_only(world, monkeypatch):
    # c1 (the canary, x86-host) passes; r1 (rpi4) is unreachable: only x86-host has new reports
    r = _deploy(world, monkeypatch, {"c1": "ok", "r1": "down"})
    assert r.exit_code == 2 and "r1 link-failure" in r.stderr
    assert world["calls"] == [{"studies": ["s"], "profiles": ["x86-host"], "refit": True, "robots": []}]
    assert "recalibrate: recorded" in r.stderr and "nothing refitted" not in r.stderr


def test_a_failed_canary_with_a_report_is_evidence(world, monkeypatch):
    """The canary ran on the robot and its timings are stored: a policy refused for deadline
    misses is what the latency model must learn from, so the refit runs."""
    r = _deploy(world, monkeypatch, {"c1": "canary-fail", "r1": "ok"}, "--json")
    assert r.exit_code == 2
    assert json.loads(r.stdout)["robots"][0]["report_id"] is not None
    assert world["calls"] == [{"studies": ["s"], "profiles": ["x86-host"], "refit": True, "robots": []}]


def test_deploy_with_reports_and_no_refit_passes_refit_off(world, monkeypatch):
    r = _deploy(world, monkeypatch, {"c1": "ok", "r1": "ok"}, "--no-refit")
    assert r.exit_code == 0, r.output
    assert world["calls"] == [
        {"studies": ["s"], "profiles": ["x86-host", "rpi4"], "refit": False, "robots": []}
    ]


def _run(world, monkeypatch, down: set[str]):
    monkeypatch.setattr("robonas.fleet.client.AgentClient", RunClient)
    monkeypatch.setattr(RunClient, "down", down)
    return _invoke(
        ["fleet", "run", "--fleet", str(world["fleet"]), "--store", world["url"], "--episodes", "2", "--json"]
    )


def _deployed(world, *robots: str) -> None:
    """Deployment rows that tie SHA on these robots to the stored artifact (and so its trial)."""
    from robonas.store import Store

    store = Store(world["url"])
    for robot in robots:
        store.add_deployment(world["artifact_id"], robot, "ok", {"sha256": SHA})
    store.close()


def test_run_where_every_robot_failed_refits_nothing(world, monkeypatch):
    _deployed(world, "c1", "r1")
    r = _run(world, monkeypatch, {"c1", "r1"})
    assert r.exit_code == 2
    assert world["calls"] == []
    line = next(x for x in r.stderr.splitlines() if x.startswith("recalibrate:"))
    assert "nothing refitted or re-ranked: no robot returned a report" in line
    assert "c1: agent c1: cannot open link" in line and "r1: agent r1: cannot open link" in line


def test_run_refits_for_the_robots_that_reported_only(world, monkeypatch):
    _deployed(world, "c1", "r1")
    r = _run(world, monkeypatch, {"c1"})
    assert r.exit_code == 2
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["r1"]["ok"] and not rows["c1"]["ok"]
    assert world["calls"] == [{"studies": ["s"], "profiles": ["rpi4"], "refit": True, "robots": ["r1"]}]


def test_run_on_an_artifact_the_store_does_not_know_refits_nothing(world, monkeypatch):
    r = _run(world, monkeypatch, set())  # no deployment rows: the reports name no trial
    assert r.exit_code == 0, r.output
    assert world["calls"] == []
    # nothing on stderr either: `--json` output, stdout and stderr together, is the JSON alone
    assert [row["ok"] for row in json.loads(r.output)] == [True, True]
