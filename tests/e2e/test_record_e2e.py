"""End to end: a run's record travels from a real agent to the store and back.

A real `python -m device_agents serve` process on `sim:cartpole-lab-a` (`--fast`) gets a signed
model, then `AgentClient.run(..., record=True)` and `robonas fleet run --record` bring back its
record; it decodes, the stored report carries it and `episodes_of` reads it back. A record too
big for one frame is checked in process: an `Agent` serving a TCP link in a thread, with a stub
policy on a noisy robot, sends it in several frames and the client joins them.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from device_agents.operators import Operators
from device_agents.protocol import MAX_PAYLOAD, Message, MsgType
from device_agents.robots.base import Robot
from device_agents.signing import generate_keypair, load_private_key, sign_manifest
from device_agents.trajectory import decode, summary
from tests.device_agents.test_agent import (
    CREDENTIALS,
    AgentProcess,
    credentials_toml,
    deploy,
    manifest_for,
    operators_file,
    test_models,
)

pytestmark = pytest.mark.e2e

QUICK = {"episodes": 1, "seed": 0, "min_return": -1e9, "max_miss_rate": 1.0, "max_steps": 20}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    priv, pub = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(priv), pub


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys):
    """A real agent with the int8 test policy active."""
    pytest.importorskip("sim")
    key, pub = keys
    a = AgentProcess(tmp_path_factory.mktemp("agent-state"), pub)
    try:
        good = test_models()["good"]
        m = manifest_for(good)
        with a.link() as link:
            r = deploy(link, good, m, sign_manifest(m, key), QUICK)
            assert r.type == MsgType.ACK, r.header
        yield a
    finally:
        a.stop()


def test_a_recorded_run_decodes_is_stored_and_read_back(agent, tmp_path):
    from robonas.fleet.client import AgentClient
    from robonas.fleet.reports import (
        ArtifactRef,
        episodes_of,
        record_report,
        recorded_reports,
        summarise_report,
    )
    from robonas.store import Store

    with AgentClient(agent.url, timeout_s=30.0, name="bot", credentials=CREDENTIALS) as c:
        plain = c.run(2, seed=3, max_steps=30)
        assert "record" not in plain and "record_wire" not in plain  # old hosts see no change
        report = c.run(3, seed=5, max_steps=40, record=True)
        assert c.ping(n=1) > 0  # the link is still in step after the record
    assert report["lengths"] and "record_wire" not in report
    eps = decode(report["record"])
    assert [e.steps for e in eps] == report["lengths"] and [e.seed for e in eps] == [5, 6, 7]
    for e, ret in zip(eps, report["returns"], strict=True):
        assert e.obs.shape == (e.steps + 1, 5) and e.action.shape == (e.steps, 1)
        assert np.all(np.diff(e.clock_s) > 0) and np.all(e.latency_s > 0)
        assert e.reward.sum() == pytest.approx(ret)
    assert sum(e.steps for e in eps) == report["steps"]

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        rid = record_report(store, "bot", "run", report, ArtifactRef(None, None), episodes=3, seed=5)
        record_report(store, "bot", "run", plain, ArtifactRef(None, None), episodes=2, seed=3)
        rows = store.device_reports(device="bot")
        stored = next(r for r in rows if r.id == rid)
        assert stored.payload["record"] == report["record"]  # kept inside the payload JSON
        assert summarise_report(stored.payload)["episodes"] == 3
        back = episodes_of(stored)
        assert len(back) == 3
        for b, e in zip(back, eps, strict=True):
            for f in ("obs", "action", "reward", "clock_s", "latency_s"):
                assert getattr(b, f).tobytes() == getattr(e, f).tobytes()
        assert [r.id for r in recorded_reports(store, "bot")] == [rid]
        assert episodes_of(next(r for r in rows if r.id != rid)) == []
    finally:
        store.close()


def test_a_bad_record_flag_is_refused(agent):
    with agent.link() as link:
        r = link.request(Message(MsgType.RUN, {"episodes": 1, "seed": 0, "record": "yes"}))
        assert r.type == MsgType.NACK and r.header["reason"] == "bad header"
        assert "record" in r.header["detail"]


def test_fleet_run_record_stores_the_record(agent, tmp_path):
    from typer.testing import CliRunner

    from robonas.cli.fleet import fleet_app
    from robonas.fleet.reports import episodes_of
    from robonas.store import Store

    fleet = tmp_path / "fleet.toml"
    link = agent.url.replace("tcp://", "socket://", 1)
    fleet.write_text(
        credentials_toml()
        + f'[[agent]]\nname = "bot"\nlink = "{link}"\ndevice = "x86-host"\nrobot = "sim:cartpole-lab-a"\n'
    )
    url = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["run", "--fleet", str(fleet), "--episodes", "2", "--seed", "1", "--store", url]
    out = CliRunner().invoke(fleet_app, [*args, "--record", "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)
    assert row["ok"] and "record" not in row["report"]  # printed as a summary, stored whole
    assert row["record"]["episodes"] == 2 and row["record"]["steps"] == row["report"]["lengths"]
    table = CliRunner().invoke(fleet_app, [*args, "--record"])
    assert table.exit_code == 0 and "2 ep," in table.output, table.output
    store = Store(url)
    try:
        reports = store.device_reports(device="bot", kind="run")
        assert len(reports) == 2
        assert [e.seed for e in episodes_of(reports[0])] == [1, 2]
    finally:
        store.close()


# ------------------------------------------------------------------ a record of several frames
class NoisyRobot(Robot):
    """20 noisy observations a step (they barely compress), 4 actions, 50 Hz, never done."""

    name = "noisy"
    observation_size = property(lambda self: 20)  # type: ignore[assignment]
    action_size = property(lambda self: 4)  # type: ignore[assignment]
    control_hz = property(lambda self: 50.0)  # type: ignore[assignment]

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.log: list[np.ndarray] = []

    def reset(self, seed=None):
        self.rng = np.random.default_rng(seed)
        obs = self.rng.standard_normal(20).astype(np.float32)
        self.log.append(obs)
        return obs

    def step(self, action, latency_s=0.0):
        obs = self.rng.standard_normal(20).astype(np.float32)
        self.log.append(obs)
        return obs, 1.0, False


class Echo:
    runtime_name, runtime_version = "stub", "0"

    def act(self, obs):
        return np.asarray(obs[:4], np.float32) * 0.5


def test_a_record_over_one_frame_comes_in_several(tmp_path, keys):
    from device_agents.agent import Agent
    from device_agents.link import listen
    from robonas.fleet.client import AgentClient

    pytest.importorskip("sim")
    robot = NoisyRobot()
    agent = Agent(
        tmp_path / "state",
        [keys[1]],
        "sim:cartpole-lab-a",
        fast=True,
        operators=Operators.from_file(operators_file(tmp_path / "trust")),
    )
    agent._robot = robot
    agent._pick_slot = lambda header: "a"  # type: ignore[method-assign]
    agent.slots.runnable = lambda slot, force: None  # type: ignore[method-assign]
    agent._slot_policy = lambda slot: (Echo(), {"control_hz": 50.0})  # type: ignore[method-assign]
    listener = listen("tcp://127.0.0.1:0")

    def serve() -> None:
        with listener.accept(timeout_s=30) as link:
            agent.serve_link(link)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = listener.url.replace("tcp://", "socket://", 1)
        with AgentClient(url, timeout_s=30.0, name="noisy", credentials=CREDENTIALS) as c:
            link = c.connect()
            first = link.request(
                Message(MsgType.RUN, {"episodes": 4, "seed": 0, "max_steps": 400, "record": True})
            )
            wire = first.header["record_wire"]
            assert wire["frames"] >= 2 and wire["size"] > MAX_PAYLOAD and len(first.payload) == MAX_PAYLOAD
            rest = [link.receive(10.0) for _ in range(wire["frames"] - 1)]
            assert [m.header["record_part"] for m in rest] == list(range(1, wire["frames"]))
            assert all(m.seq == first.seq and m.type == MsgType.REPORT for m in rest)
            robot.log.clear()
            report = c.run(4, seed=0, max_steps=400, record=True)  # the client joins them
            assert c.ping(n=2) > 0
        eps = decode(report["record"])
        s = summary(report["record"])
        assert s["steps"] == [400] * 4 and s["dropped_episodes"] == 0
        sent = np.stack(robot.log).reshape(4, 401, 20)
        for e, obs in zip(eps, sent, strict=True):
            np.testing.assert_array_equal(e.obs, obs)
            np.testing.assert_array_equal(e.action, e.obs[:-1, :4] * np.float32(0.5))
    finally:
        agent.stop_event.set()
        thread.join(10)
        listener.close()
        agent.close()


def test_a_mangled_record_is_a_link_failure(tmp_path):
    """A record whose parts do not add up is refused, and the client starts afresh."""
    from robonas.fleet.client import AgentClient, LinkFailure

    class OneShotLink:
        def __init__(self, frames: list[Message]) -> None:
            self.frames = frames

        def receive(self, timeout_s: float | None = None) -> Message:
            return self.frames.pop(0)

        def frame_timeout_s(self, nbytes: int = 0) -> float:
            return 1.0

        def close(self) -> None:
            pass

    c = AgentClient("loop://", name="x")
    wire = {"encoding": "zlib-json", "size": MAX_PAYLOAD + 10, "sha256": "0" * 64, "frames": 2}
    first = Message(MsgType.REPORT, {"record_wire": wire}, b"\0" * MAX_PAYLOAD, seq=3)
    c._link = OneShotLink([Message(MsgType.REPORT, {"record_part": 1}, b"\0" * 10, seq=3)])  # type: ignore[assignment]
    with pytest.raises(LinkFailure, match="does not match its announced size 65546 and sha256"):
        c._receive_record(first, wire)
    assert c._link is None
    c._link = OneShotLink([Message(MsgType.REPORT, {"record_part": 2}, b"", seq=3)])  # type: ignore[assignment]
    with pytest.raises(LinkFailure, match="frame 1 of 2 came as REPORT"):
        c._receive_record(first, wire)
    with pytest.raises(LinkFailure, match="announced with size"):
        c._receive_record(first, dict(wire, frames=5))
    with pytest.raises(LinkFailure, match="encoding"):
        c._receive_record(first, dict(wire, encoding="gzip"))


def test_no_record_from_an_old_agent_is_none():
    """An agent that predates the record ignores the flag: the report says `record: None`."""
    from robonas.fleet.client import AgentClient

    class OldAgentLink:
        baudrate = None

        def frame_timeout_s(self, nbytes: int = 0) -> float:
            return 1.0

        def request(self, msg: Message, timeout_s: float | None = None) -> Message:
            assert msg.header["record"] is True
            return Message(MsgType.REPORT, {"returns": [1.0], "lengths": [1]}, seq=1)

        def close(self) -> None:
            pass

    c = AgentClient("loop://", name="old")
    c._link = OldAgentLink()  # type: ignore[assignment]
    assert c.run(1, record=True)["record"] is None
