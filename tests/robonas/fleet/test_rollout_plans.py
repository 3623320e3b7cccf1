"""Rollout plans and the checks made before anything is sent: phases that add up, groups that
exist, artifacts for the robots' kind; each refusal one line, exit 2, nothing stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from robonas.errors import ConfigError
from robonas.fleet.rollouts import Gates, parse_phases
from robonas.store import Store

REPO = Path(__file__).resolve().parents[3]


def test_phases_are_counts_percentages_and_a_final_rest():
    assert parse_phases("1,10%,rest", 50) == (1, 5, 44)
    assert parse_phases("1,10%,rest", 10) == (1, 1, 8)
    assert parse_phases("2,3", 5) == (2, 3)
    assert parse_phases("100%", 7) == (7,)
    assert parse_phases("1,rest", 2) == (1, 1)


@pytest.mark.parametrize(
    ("spec", "n", "why"),
    [
        ("1,2", 5, "covers 3 of the 5"),
        ("1,10%,50%", 10, "covers 7 of the 10"),
        ("3,rest", 3, "already cover"),
        ("rest,1", 5, "must be the last"),
        ("1,,rest", 5, "not a list"),
        ("0,rest", 5, "positive robot count"),
        ("1,150%", 5, r"\(0%, 100%\]"),
        ("one,rest", 5, "positive robot count"),
        ("", 5, "not a list"),
    ],
)
def test_a_plan_that_does_not_add_up_is_refused(spec, n, why):
    with pytest.raises(ConfigError, match=why):
        parse_phases(spec, n)


def test_gates_check_their_limits():
    with pytest.raises(ConfigError, match="min-pass-rate"):
        Gates(min_pass_rate=1.5)
    with pytest.raises(ConfigError, match="soak"):
        Gates(soak_s=-1)


def _artifact(dest: Path, env_id: str = "sim/CartPole-v0") -> Path:
    from robonas.export.artifact import write_artifact
    from tests.device_agents.test_agent import manifest_for, test_models

    model = test_models()["good"]  # read and hashed here; never run, never sent
    return write_artifact(dest, model, manifest_for(model, env_id=env_id))


def _fleet(path: Path) -> Path:
    rows = [
        ("cart-a1", "sim:cartpole-lab-a", "lab-a"),
        ("cart-a2", "sim:cartpole-worn-b", "lab-a"),
        ("cart-b1", "sim:cartpole-lab-a", "lab-b"),
        ("reach-b2", "sim:reacher-lab-a", "lab-b"),
    ]
    text = ""
    for i, (name, robot, site) in enumerate(rows):
        text += (
            f'[[agent]]\nname = "{name}"\nlink = "tcp://127.0.0.1:{9 + i}"\ndevice = "x86-host"\n'
            f'robot = "{robot}"\nsite = "{site}"\n\n'
        )
    path.write_text(text)
    return path


def _rollout(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    store = f"sqlite:///{tmp_path / 'r.db'}"
    cmd = [sys.executable, "-m", "robonas.cli", "rollout", "start", *args, "--store", store]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--group", "site=lab-z"], "no robot matches group 'site=lab-z'"),
        (["--group", "colour=red"], "colour"),
        (["--group", "site=lab-a", "--phases", "1,5"], "covers 6 of the 2"),
        (["--group", "site=lab-b"], "not for robot(s) reach-b2"),
        (["--group", "site=lab-a", "--concurrency", "0"], "concurrency"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_sent(tmp_path, extra, why):
    artifact = _artifact(tmp_path / "art")
    fleet = _fleet(tmp_path / "fleet.toml")
    r = _rollout(tmp_path, str(artifact), "--fleet", str(fleet), *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("robonas: error:") and why in r.stderr, r.stderr
    # the links name closed loopback ports: had anything been sent it would have failed
    # differently; and no rollout was stored
    with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        assert store.rollouts() == []


def test_a_dry_run_stores_the_plan_and_sends_nothing(tmp_path):
    artifact = _artifact(tmp_path / "art")
    fleet = _fleet(tmp_path / "fleet.toml")
    r = _rollout(
        tmp_path,
        str(artifact),
        "--fleet",
        str(fleet),
        "--group",
        "kind=sim/CartPole-v0",
        "--phases",
        "1,rest",
        "--dry-run",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        (row,) = store.rollouts()
        robots = store.rollout_robots(row.id)
        assert [(x.name, x.phase, x.state) for x in robots] == [
            ("cart-a1", 0, "pending"),
            ("cart-a2", 1, "pending"),
            ("cart-b1", 1, "pending"),
        ]
        assert row.plan["phases"] == [1, 2] and row.status == "running"


def test_the_fleet_file_gives_the_rollout_defaults_and_options_win(tmp_path):
    artifact = _artifact(tmp_path / "art")
    fleet = _fleet(tmp_path / "fleet.toml")
    fleet.write_text(
        '[rollout]\nphases = "2,rest"\nconcurrency = 3\nmin_pass_rate = 0.5\nrollback = false\n\n'
        + fleet.read_text()
    )
    group = ["--group", "kind=sim/CartPole-v0", "--dry-run", "--json"]
    assert _rollout(tmp_path, str(artifact), "--fleet", str(fleet), *group).returncode == 0
    assert (
        _rollout(
            tmp_path, str(artifact), "--fleet", str(fleet), *group, "--phases", "1,rest", "--rollback"
        ).returncode
        == 0
    )
    with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        from_file, from_options = store.rollouts()
        assert from_file.plan["phases"] == [2, 1] and from_file.plan["concurrency"] == 3
        assert from_file.plan["gates"]["min_pass_rate"] == 0.5 and from_file.plan["rollback"] is False
        assert from_options.plan["phases"] == [1, 2] and from_options.plan["rollback"] is True
        assert from_options.plan["concurrency"] == 3  # not given: still the file's


def test_a_bad_rollout_table_is_one_line(tmp_path):
    artifact = _artifact(tmp_path / "art")
    fleet = _fleet(tmp_path / "fleet.toml")
    fleet.write_text('[rollout]\nconcurrency = "many"\n\n' + fleet.read_text())
    r = _rollout(tmp_path, str(artifact), "--fleet", str(fleet))
    assert r.returncode == 2 and "[rollout]: field 'concurrency' must be a int" in r.stderr, r.stderr
