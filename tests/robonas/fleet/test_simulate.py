"""The simulated fleet (robonas.fleet.simulate, `robonas fleet simulate`): real agent processes on
loopback TLS, the fleet file naming them with site/kind/tags, one agent going down and coming
back, and the robots that are slow or failing on purpose.

The default suite starts a few agents (about a second each on a 2-core machine); 50 agents and
deploying a hand-built int8 cart-pole controller (a TFLite conversion) are marked slow."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robonas.errors import ConfigError, RobonasError
from robonas.fleet.client import AgentClient, Canary, FleetError, fleet_credentials
from robonas.fleet.inventory import load_inventory
from robonas.fleet.simulate import FAILING_PROFILE, FAILING_PROFILE_TOML, SimulatedFleet

REPO = Path(__file__).resolve().parents[3]
CARTPOLE = "sim/CartPole-v0"
# A saturating PD controller for the sim cart-pole, a = tanh(K . [x, x_dot, cos, sin, theta_dot]):
# it balances the nominal cart-pole and the packaged bench profiles for all 500 steps, as a policy
# trained on the nominal robot does (the demo's trained int8 policies behave the same way).
PD_GAINS = np.array([0.5, 1.0, 0.0, 10.0, 1.0])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """sim-000 healthy (cartpole-lab-a, lab-a), sim-001 slow (cartpole-worn-b, lab-b), sim-002
    failing (the failing profile, lab-a)."""
    with SimulatedFleet(3, tmp_path_factory.mktemp("sim"), slow=1, failing=1) as f:
        yield f
    assert not any(a.proc is not None and a.proc.poll() is None for a in f.agents)


def _hello(url_or_agent, timeout_s: float = 10.0) -> dict:
    with url_or_agent.client(timeout_s) as c:
        return c.hello()


# ----------------------------------------------------------------------------- the fleet
def test_robots_are_laid_out_by_index(fleet):
    layout = [(r.name, r.profile, r.site, r.kind, r.tags) for r in fleet.robots]
    assert layout == [
        ("sim-000", "cartpole-lab-a", "lab-a", CARTPOLE, ()),
        ("sim-001", "cartpole-worn-b", "lab-b", CARTPOLE, ("slow",)),
        ("sim-002", FAILING_PROFILE, "lab-a", CARTPOLE, ("failing",)),
    ]
    assert fleet.signing_key is not None and fleet.signing_key.exists() and fleet.trust.exists()


def test_each_agent_answers_hello_and_status(fleet):
    for a, r in zip(fleet.agents, fleet.robots, strict=True):
        with a.client() as c:
            hello = c.hello()
            status = c.status()
        assert (hello["agent"], hello["robot"], hello["device"]) == (a.name, r.robot, "x86-host")
        assert hello["auth"]["operator"] == "local-operator"
        assert status["agent"] == a.name
        # the slow robot keeps real time; the others run their control loops as fast as they can
        assert status["fast"] is (r.tags != ("slow",)), (a.name, status["fast"])


def test_the_fleet_file_names_every_agent_and_its_groups(fleet):
    inv = load_inventory(fleet.fleet_path)
    assert inv.names == ["sim-000", "sim-001", "sim-002"]
    assert [e.link for e in inv.agents] == [a.url for a in fleet.agents]
    assert [e.robot for e in inv.agents] == [a.robot for a in fleet.agents]
    assert inv.credentials is not None and inv.credentials.keys == fleet.keys
    assert [e.name for e in inv.where("tag=slow")] == ["sim-001"]
    assert [e.name for e in inv.where("tag=failing")] == ["sim-002"]
    assert [e.name for e in inv.where("site=lab-a")] == ["sim-000", "sim-002"]
    assert [e.name for e in inv.where("site=lab-a,tag=failing")] == ["sim-002"]
    assert [e.name for e in inv.where(f"kind={CARTPOLE}")] == inv.names
    with pytest.raises(ConfigError, match=r"sites in .*: lab-a, lab-b$"):
        inv.where("site=lab-z")
    # what the host's fleet commands do with the file: connect with its [credentials]
    credentials = fleet_credentials(inv)
    for e in inv.agents:
        with AgentClient.for_entry(e, credentials) as c:
            assert c.hello()["agent"] == e.name


def test_the_failing_profile_defeats_a_controller_that_balances_the_others(tmp_path, monkeypatch):
    """What makes sim-002 a failing robot, checked in the simulator itself: a controller that
    holds the bench robots up for 500 steps drops the pole within a few dozen there."""
    from sim.reality import make_reality

    (tmp_path / "failing.toml").write_text(FAILING_PROFILE_TOML)
    monkeypatch.setenv("ROBONAS_REALITY_PROFILES", str(tmp_path / "failing.toml"))

    def mean_return(profile: str) -> float:
        returns = []
        for seed in range(3):
            env = make_reality(profile)
            obs, _ = env.reset(seed=seed)
            total = 0.0
            for _ in range(500):
                action = np.tanh([float(PD_GAINS @ np.asarray(obs, np.float64))])
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                if terminated or truncated:
                    break
            env.close()
            returns.append(total)
        return float(np.mean(returns))

    assert mean_return("cartpole-lab-a") == pytest.approx(500.0)
    assert mean_return("cartpole-worn-b") == pytest.approx(500.0)
    assert mean_return(FAILING_PROFILE) < 100.0


# ----------------------------------------------------------------------------- one agent down
def test_stop_agent_and_start_agent_on_the_same_state(tmp_path):
    with SimulatedFleet(2, tmp_path / "sim", profiles=["cartpole-ideal"]) as f:
        a = f.agent("sim-001")
        url, state = a.url, a.state_dir
        f.stop_agent("sim-001")
        assert not f.running("sim-001") and f.running("sim-000")
        with pytest.raises(FleetError):
            _hello(a, timeout_s=2.0)
        assert _hello(f.agent("sim-000"))["agent"] == "sim-000"  # the others stay up
        # the fleet file still lists the robot that is down
        assert load_inventory(f.fleet_path).get("sim-001").link == url

        again = f.start_agent("sim-001")
        assert again is a and f.running("sim-001")
        assert (a.url, a.state_dir) == (url, state)  # its old port, so the fleet file is still right
        assert _hello(a)["agent"] == "sim-001"
        with pytest.raises(RobonasError, match="is running"):
            f.start_agent("sim-001")

        # its port taken meanwhile: a new one, and the fleet file says so
        f.stop_agent("sim-001")
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            squatter.listen()
            f.start_agent("sim-001")
        assert a.url != url
        assert load_inventory(f.fleet_path).get("sim-001").link == a.url
        assert _hello(a)["agent"] == "sim-001"
        procs = [x.proc for x in f.agents]
    assert all(p is not None and p.poll() is not None for p in procs)


def test_an_agent_that_cannot_start_stops_them_all_and_says_why(tmp_path):
    bad = tmp_path / "garbage.pub"
    bad.write_text("not a key\n")
    f = SimulatedFleet(2, tmp_path / "sim", trust=bad)
    with pytest.raises(RobonasError) as e:
        f.start()
    message = str(e.value)
    assert message.startswith("2 simulated agent(s) did not start: sim-000: ")
    assert str(bad) in message and "agent.log" in message
    assert all(a.proc is not None and a.proc.poll() is not None for a in f.agents)
    assert not f.fleet_path.exists()


def test_the_agents_own_canary_floor_is_passed_on(tmp_path):
    with SimulatedFleet(1, tmp_path / "sim", canary_min_return=150.0) as f, f.agents[0].client() as c:
        assert c.status()["canary_policy"]["min_return"] == 150.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": 0}, "number of agents must be a whole number >= 1"),
        ({"n": 2, "slow": 2, "failing": 1}, "slow (2) + failing (1) is more than 2 agents"),
        ({"n": 2, "profiles": ["cartpole-nope"]}, "unknown reality profile 'cartpole-nope'; valid profiles:"),
        ({"n": 2, "profiles": []}, "no reality profiles given"),
        ({"n": 2, "device": "no-such-device"}, "no-such-device"),
        (
            {"n": 2, "trust": "/nonexistent/robonas.pub"},
            "trusted key '/nonexistent/robonas.pub' does not exist",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, kwargs, words):
    with pytest.raises(ConfigError) as e:
        SimulatedFleet(directory=tmp_path / "sim", **kwargs)
    assert words in str(e.value)
    assert not (tmp_path / "sim").exists()


# ----------------------------------------------------------------------------- the command
def test_the_command_prints_the_agents_and_stops_them_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robonas.cli",
            "fleet",
            "simulate",
            "--agents",
            "2",
            "--dir",
            str(tmp_path / "d"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "Ctrl-C or SIGTERM stops them" in line:
                break
        else:
            pytest.fail(f"no ready line; stdout {lines}, stderr {proc.stderr.read() if proc.stderr else ''}")
        agent_lines = [ln for ln in lines if ln.startswith("sim-")]
        assert [ln.split()[0] for ln in agent_lines] == ["sim-000", "sim-001"]
        assert f"fleet file: {tmp_path / 'd' / 'fleet.toml'}" in lines
        pids = [int(ln.rsplit("pid=", 1)[1]) for ln in agent_lines]
        assert all(_alive(p) for p in pids)
        assert load_inventory(tmp_path / "d" / "fleet.toml").names == ["sim-000", "sim-001"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_fifty_agents_come_up_answer_and_go_away(tmp_path):
    with SimulatedFleet(50, tmp_path / "sim", slow=5, failing=5) as f:
        inv = load_inventory(f.fleet_path)
        assert len(inv.agents) == 50 and len({e.link for e in inv.agents}) == 50
        assert [e.name for e in inv.where("tag=failing")] == [f"sim-{i:03d}" for i in range(45, 50)]
        assert [e.name for e in inv.where("tag=slow")] == [f"sim-{i:03d}" for i in range(40, 45)]
        assert len(inv.where("site=lab-b")) == 25
        credentials = fleet_credentials(inv)
        for e in inv.agents:
            with AgentClient.for_entry(e, credentials) as c:
                assert c.hello()["agent"] == e.name
        procs = [a.proc for a in f.agents]
    assert all(p is not None and p.poll() is not None for p in procs)


def _pd_artifact(out: Path, key: Path) -> Path:
    """PD_GAINS as an int8 TFLite policy: one tanh unit over the normalised observation, head 1."""
    import torch

    from robonas.export.artifact import build_manifest, write_artifact
    from robonas.export.tflite_convert import to_tflite_int8
    from robonas.space import Layer, PolicyArch

    mean, std = np.array([0.0, 0.0, 1.0, 0.0, 0.0]), np.array([0.5, 0.5, 1.0, 0.05, 0.5])
    arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(1, "tanh"),))
    module = arch.build_actor().eval()
    with torch.no_grad():
        fc, head = module.trunk.blocks[0].fc, module.head
        fc.weight[:] = torch.tensor(PD_GAINS * std, dtype=torch.float32)[None]  # on (obs - mean) / std
        fc.bias.zero_()
        head.weight.fill_(1.0)
        head.bias.zero_()
    calibration = np.random.default_rng(0).uniform(-3, 3, (512, 5)).astype(np.float32)
    model = to_tflite_int8(module, calibration)
    spaces = {
        "env_id": CARTPOLE,
        "observation": {
            "shape": [5],
            "low": [-4.8, -20.0, -1.0, -1.0, -40.0],
            "high": [4.8, 20.0, 1.0, 1.0, 40.0],
        },
        "action": {"discrete": False, "shape": [1], "low": [-1.0], "high": [1.0], "transform": "clip"},
    }
    manifest = build_manifest(
        model=model,
        study="simulate-test",
        trial=1,
        arch=arch,
        spaces=spaces,
        frame_mean=mean,
        control_hz=50.0,
        parity={},
        precision="int8",
        input_normalisation={"mean": mean.tolist(), "std": std.tolist(), "clip": 10.0},
    )
    return write_artifact(out, model, manifest, key)


@pytest.mark.slow
def test_a_policy_that_balances_passes_on_healthy_robots_fails_on_failing_ones_and_waits_on_slow_ones(
    fleet, tmp_path
):
    assert fleet.signing_key is not None
    artifact = _pd_artifact(tmp_path / "pd", fleet.signing_key)
    healthy, slow, failing = fleet.agents
    gate = Canary(episodes=2, min_return=200.0)
    with healthy.client(60.0) as c:
        ok = c.deploy(artifact, gate)
    assert ok.ok, ok
    assert ok.canary is not None and ok.canary["mean_return"] >= 200.0
    with failing.client(60.0) as c:
        refused = c.deploy(artifact, gate)
    assert not refused.ok and refused.canary is not None
    assert refused.canary["mean_return"] < 100.0, refused
    assert refused.reason == "canary" and "mean return" in refused.detail, refused
    # 50 control periods at 50 Hz: a real-time canary cannot take less than one second
    with slow.client(60.0) as c:
        t0 = time.monotonic()
        waited = c.deploy(artifact, Canary(episodes=1, max_steps=50))
        elapsed = time.monotonic() - t0
    assert waited.ok, waited
    assert elapsed >= 0.95, elapsed
    assert waited.canary is not None and waited.canary["fast"] is False
