"""Host side of deployment without a real agent: the fleet file, the rollout's canary gating and
retries (with scripted clients), the store rows it writes, and AgentClient's message sequence
against a scripted agent on a loopback socket. The real agent is exercised in
tests/e2e/test_fleet_e2e.py."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from robonas.errors import ConfigError
from robonas.fleet.client import AgentClient, DeployResult, LinkFailure
from robonas.fleet.inventory import load_inventory, parse_inventory
from robonas.space import Layer, PolicyArch

REPO = Path(__file__).resolve().parents[3]


def _agent(**kw):
    base = {"name": "a1", "link": "tcp://127.0.0.1:7447", "device": "x86-host", "robot": "sim:x"}
    base.update(kw)
    return base


# ----------------------------------------------------------------------------- inventory
def test_launch_fleet_file_loads():
    inv = load_inventory(REPO / "launch" / "fleet.toml")
    assert inv.names == ["twin-a", "twin-b"]
    assert all(a.link.startswith("tcp://127.0.0.1:") for a in inv.agents)
    assert [a.name for a in inv.select("twin-b,twin-a")] == ["twin-b", "twin-a"]
    assert inv.select(None) == list(inv.agents) == inv.select("")


@pytest.mark.parametrize(
    "link",
    [
        "tcp://127.0.0.1:7447",
        "socket://robot.local:9000",
        "loop://",
        "rfc2217://10.0.0.2:4000",
        "/dev/ttyUSB0?baudrate=115200",
        "/dev/ttyACM0",
        "/dev/pts/3?baudrate=9600&rtscts=1",
    ],
)
def test_valid_links(link):
    assert parse_inventory({"agent": [_agent(link=link)]}).agents[0].link == link


@pytest.mark.parametrize(
    "link, words",
    [
        ("http://x:1", ["'link'", "http", "tcp://HOST:PORT"]),
        ("tcp://127.0.0.1", ["needs a host and a port"]),
        ("tcp://:7447", ["needs a host and a port"]),
        ("ttyUSB0", ["neither a URL nor a serial device path"]),
        ("/dev/ttyUSB0?baud=115200", ["unknown serial parameter 'baud'", "baudrate"]),
        ("/dev/ttyUSB0?baudrate=fast", ["baudrate 'fast'"]),
        ("", ["non-empty URL"]),
    ],
)
def test_bad_links_name_agent_field_and_forms(link, words):
    with pytest.raises(ConfigError) as e:
        parse_inventory({"agent": [_agent(link=link)]}, "f.toml")
    msg = str(e.value)
    assert "agent 'a1'" in msg and "f.toml" in msg
    for w in words:
        assert w in msg


def test_unknown_key_duplicate_name_bad_device_missing_field():
    with pytest.raises(ConfigError, match=r"agent 'a1': unknown field\(s\) \['baud'\]"):
        parse_inventory({"agent": [_agent(baud=1)]})
    with pytest.raises(ConfigError, match=r"'a1' is used by \[\[agent\]\] #1 and #2"):
        parse_inventory({"agent": [_agent(), _agent(link="loop://")]})
    with pytest.raises(ConfigError, match=r"agent 'a1': field 'device'.*unknown device 'pi9'.*rpi4"):
        parse_inventory({"agent": [_agent(device="pi9")]})
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['robot'\]"):
        parse_inventory({"agent": [{k: v for k, v in _agent().items() if k != "robot"}]})
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_inventory({"agent": [_agent()], "fleet": {}})
    with pytest.raises(ConfigError, match=r"no \[\[agent\]\] tables"):
        parse_inventory({})
    with pytest.raises(ConfigError, match="'timeout_s' must be a positive number"):
        parse_inventory({"agent": [_agent(timeout_s=0)]})
    with pytest.raises(ConfigError, match="field 'name'"):
        parse_inventory({"agent": [_agent(name="a b")]})


def test_select_unknown_and_repeated_names(tmp_path):
    f = tmp_path / "fleet.toml"
    f.write_text('[[agent]]\nname="a1"\nlink="loop://"\ndevice="rpi4"\nrobot="sim:p"\n')
    inv = load_inventory(f)
    with pytest.raises(ConfigError, match=r"unknown agent 'zz'; agents are \['a1'\]"):
        inv.select("a1,zz")
    with pytest.raises(ConfigError, match="more than once"):
        inv.select(["a1", "a1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_inventory(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[[agent]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_inventory(tmp_path / "bad.toml")


def test_directory_or_non_utf8_fleet_file_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_inventory(tmp_path)
    assert str(tmp_path) in str(e.value) and "is a directory" in str(e.value)
    bad = tmp_path / "fleet.toml"
    bad.write_bytes(b"\xff\xfe[[agent]]\n")
    with pytest.raises(ConfigError) as e:
        load_inventory(bad)
    msg = str(e.value)
    assert str(bad) in msg and "not UTF-8" in msg and "0xff at offset 0" in msg and "\n" not in msg
    # a bad byte after valid text is located by its offset
    bad.write_bytes(b'# caf\xe9\n[[agent]]\nname = "a1"\n')
    with pytest.raises(ConfigError, match="byte 0xe9 at offset 5"):
        load_inventory(bad)


def test_unreadable_fleet_file_is_one_config_error(tmp_path):
    # an OSError other than "missing" or "a directory": a path that runs through a plain file
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"fleet file '.*file/fleet\.toml' cannot be read: Not a directory"):
        load_inventory(tmp_path / "file" / "fleet.toml")


# ----------------------------------------------------------------------------- TLS links, credentials
def test_tls_links_and_server_name_default_to_the_agent_name():
    inv = parse_inventory(
        {
            "agent": [
                _agent(name="cart-01", link="tls://10.0.0.11:7447"),
                _agent(name="cart-02", link="TLS://robot.lab:7447", server_name="cart-02.lab.example"),
                _agent(name="twin", link="tcp://127.0.0.1:7447"),
            ]
        }
    )
    assert [a.server_name for a in inv.agents] == ["cart-01", "cart-02.lab.example", "twin"]
    assert inv.agents[1].to_dict()["server_name"] == "cart-02.lab.example"
    assert inv.credentials is None
    # built in code, an entry's server name is still its name
    from robonas.fleet.inventory import AgentEntry

    assert AgentEntry("bot", "tls://h:1", "rpi4", "sim:p").server_name == "bot"


@pytest.mark.parametrize(
    "agent, words",
    [
        (_agent(link="tls://10.0.0.11"), ["needs a host and a port", "tls://127.0.0.1:7447"]),
        (_agent(link="tls://10.0.0.11:99999"), ["bad port"]),
        (_agent(link="tcp://h:1", server_name="a1"), ["'server_name' only applies to tls://", "tcp://h:1"]),
        (_agent(link="/dev/ttyUSB0", server_name="a1"), ["'server_name' only applies to tls://"]),
        (_agent(link="tls://h:1", server_name=""), ["'server_name' ''", "certificate"]),
        (_agent(link="tls://h:1", server_name="*.lab"), ["'server_name' '*.lab'"]),
        (_agent(link="tls://h:1", server_name=7), ["'server_name' 7"]),
    ],
)
def test_bad_tls_links_and_server_names(agent, words):
    with pytest.raises(ConfigError) as e:
        parse_inventory({"agent": [agent]}, "f.toml")
    msg = str(e.value)
    assert "f.toml: agent 'a1'" in msg
    for w in words:
        assert w in msg


def test_credentials_keys_folder_is_relative_to_the_fleet_file(tmp_path, monkeypatch):
    from robonas.fleet.inventory import CredentialsRef

    site = tmp_path / "site"
    site.mkdir()
    f = site / "fleet.toml"
    f.write_text(
        '[credentials]\nkeys = "../keys"\noperator = "alice"\n\n'
        '[[agent]]\nname = "cart-01"\nlink = "tls://10.0.0.11:7447"\n'
        'device = "rpi4"\nrobot = "serial:/dev/ttyACM0"\n'
    )
    monkeypatch.chdir(tmp_path / "site")
    inv = load_inventory("fleet.toml")  # a relative path to the file: the folder still comes out absolute
    monkeypatch.chdir("/")
    assert inv.credentials == CredentialsRef(keys=tmp_path / "keys", operator="alice")
    assert inv.credentials.keys.is_absolute()
    assert inv.credentials.to_dict() == {"keys": str(tmp_path / "keys"), "operator": "alice"}
    # operator is optional; an absolute folder stays as it is; parse_inventory defaults to the cwd
    inv = parse_inventory({"agent": [_agent()], "credentials": {"keys": str(tmp_path / "k")}})
    assert inv.credentials == CredentialsRef(tmp_path / "k", None)
    monkeypatch.chdir(tmp_path)
    assert (
        parse_inventory({"agent": [_agent()], "credentials": {"keys": "k"}}).credentials.keys
        == tmp_path / "k"
    )
    assert parse_inventory(
        {"agent": [_agent()], "credentials": {"keys": "k"}}, base_dir=site
    ).credentials == (CredentialsRef(site / "k"))


@pytest.mark.parametrize(
    "credentials, words",
    [
        ("keys", ["[credentials] must be a table"]),
        ({}, ["field 'keys' must be the folder", "fleet-ca.crt"]),
        ({"keys": ""}, ["field 'keys'"]),
        ({"keys": 3}, ["field 'keys'", "got 3"]),
        ({"keys": "k", "operater": "alice"}, ["unknown field(s) ['operater']", "['keys', 'operator']"]),
        ({"keys": "k", "operator": "../alice"}, ["field 'operator' '../alice'"]),
        ({"keys": "k", "operator": ""}, ["field 'operator' ''"]),
    ],
)
def test_bad_credentials_tables(credentials, words):
    with pytest.raises(ConfigError) as e:
        parse_inventory({"agent": [_agent()], "credentials": credentials}, "f.toml")
    msg = str(e.value)
    assert msg.startswith("f.toml: [credentials]")
    for w in words:
        assert w in msg


def test_launch_fleet_file_comments_match_the_agent_and_parse(tmp_path):
    """The comments say `serve --listen` for TCP agents (the agent's `--link` is for serial
    devices), and the commented [credentials] and TLS agent examples are a valid fleet file."""
    text = (REPO / "launch" / "fleet.toml").read_text()
    assert "--link tcp://" not in text and "serve --listen tcp://127.0.0.1:7447" in text
    lines = text.splitlines()

    def block(start: int) -> list[str]:
        """The commented example starting at lines[start], uncommented, up to a bare '#'."""
        out = []
        for line in lines[start:]:
            if line.strip() == "#" or not line.startswith("# "):
                break
            if not line.startswith("#      "):  # skip the continuation of a trailing comment
                out.append(line[2:])
        return out

    creds = block(lines.index("# [credentials]"))
    tls_link = lines.index('# link = "tls://10.0.0.12:7447"')
    tls_agent = block(max(i for i in range(tls_link) if lines[i] == "# [[agent]]"))
    (tmp_path / "fleet.toml").write_text("\n".join([*creds, "", *tls_agent]) + "\n")
    inv = load_inventory(tmp_path / "fleet.toml")
    assert inv.credentials is not None
    assert inv.credentials.keys == tmp_path / "keys" and inv.credentials.operator == "alice"
    assert inv.agents[0].link.startswith("tls://") and inv.agents[0].server_name == "cart-02"


# ----------------------------------------------------------------------------- rollout, scripted
MODEL = b"TFL3-fake-model-bytes" * 100
SHA = hashlib.sha256(MODEL).hexdigest()


class ScriptedClient:
    """Plays one agent: `plan[name]` is a list of outcomes, one per connection attempt."""

    log: ClassVar[list[tuple[Any, ...]]] = []

    def __init__(self, entry, plan):
        self.entry, self.plan = entry, plan

    def hello(self):
        self.log.append((self.entry.name, "hello"))
        return {"agent": self.entry.name, "protocol": 1}

    def status(self):
        return {"active": "a", "slots": {"a": {"sha256": "old"}}}

    def deploy(self, artifact_dir, canary, progress, signature=None):
        outcome = self.plan[self.entry.name].pop(0)
        self.log.append((self.entry.name, "deploy", outcome))
        if outcome == "drop":
            progress(len(MODEL) // 2, len(MODEL))
            raise LinkFailure(
                f"agent {self.entry.name}: deploy chunk failed: LinkClosed", self.entry.name, "deploy chunk"
            )
        progress(len(MODEL), len(MODEL))
        canary_report = {
            "returns": [120.0, 130.0],
            "timings_ms": {"p50": 0.05, "p99": 0.2},
            "deadline_misses": 0,
            "passed": outcome == "ok",
        }
        return DeployResult(
            self.entry.name,
            outcome == "ok",
            SHA,
            len(MODEL),
            reason="ok" if outcome == "ok" else "canary",
            detail="" if outcome == "ok" else "mean return 125 < 200",
            slot="b",
            active="b" if outcome == "ok" else "a",
            canary=canary_report,
            bytes_sent=len(MODEL),
            transfer_s=0.01,
            total_s=0.02,
        )

    def close(self):
        pass


@pytest.fixture()
def fleet(tmp_path, monkeypatch):
    import robonas.fleet.client as client_mod

    manifest = {"sha256": SHA, "trial": None, "format_version": 1}
    monkeypatch.setattr(client_mod, "read_artifact", lambda d: (dict(manifest), MODEL, "sig"))
    monkeypatch.setattr("robonas.fleet.deploy.RETRY_BACKOFF_S", 0.0)
    inv = parse_inventory(
        {
            "agent": [
                _agent(name=n, link=f"tcp://127.0.0.1:{7000 + i}") for i, n in enumerate(["c1", "r1", "r2"])
            ]
        }
    )
    ScriptedClient.log = []
    return inv, manifest


def _run(inv, plan, store=None, **kw):
    from robonas.fleet.deploy import rollout

    events = []
    result = rollout(
        "art",
        inv,
        store=store,
        progress=events.append,
        client_factory=lambda e: ScriptedClient(e, plan),
        **kw,
    )
    return result, events


def test_canary_failure_stops_the_rest(fleet):
    inv, _ = fleet
    result, events = _run(inv, {"c1": ["canary-fail"]}, canary_count=1)
    assert [r.status for r in result.robots] == ["refused", "skipped", "skipped"]
    assert result.robots[0].reason == "canary" and "125 < 200" in result.robots[0].detail
    assert "c1" in result.robots[1].detail
    assert not result.ok
    assert [x for x in ScriptedClient.log if x[1] == "deploy"] == [("c1", "deploy", "canary-fail")]
    assert {e.phase for e in events if e.agent == "r1"} == {"skipped"}


def test_all_pass_and_link_drop_is_retried(fleet):
    inv, _ = fleet
    plan = {"c1": ["ok"], "r1": ["drop", "ok"], "r2": ["drop", "drop"]}
    result, events = _run(inv, plan, canary_count=1, retries=1)
    by = {r.name: r for r in result.robots}
    assert by["c1"].status == "ok" and by["c1"].role == "canary" and by["c1"].attempts == 1
    assert by["r1"].status == "ok" and by["r1"].attempts == 2 and len(by["r1"].errors) == 1
    assert by["r2"].status == "link-failure" and by["r2"].attempts == 2
    assert "LinkClosed" in by["r2"].detail
    assert by["r2"].previous["active"] == "a"  # what the robot keeps running
    assert any(e.phase == "retry" and e.agent == "r1" for e in events)
    assert not result.ok


def test_rollout_records_devices_deployments_and_canary_reports(fleet, tmp_path):
    from robonas.fleet.reports import artifact_for_sha, find_artifact, last_reports
    from robonas.store import Store

    inv, manifest = fleet
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    study = store.create_study("s", {})
    trial = store.add_trial(study.id, 0, PolicyArch(4, 2, (Layer(8, "relu"),)))
    art = store.add_artifact(trial.id, "tflite-int8", str(tmp_path / "art"), SHA)
    manifest["trial"] = trial.id
    assert find_artifact(store, "art", manifest).artifact_id == art.id

    result, _ = _run(
        inv, {"c1": ["ok"], "r1": ["ok"], "r2": ["canary-fail"]}, store=store, canary_count=1, episodes=2
    )
    assert result.artifact_id == art.id
    assert [d.name for d in store.devices()] == ["c1", "r1", "r2"]
    assert all(d.last_seen is not None and d.profile == "x86-host" for d in store.devices())
    deps = store.deployments(artifact_id=art.id)
    assert [(d.device, d.status) for d in deps] == [("c1", "ok"), ("r1", "ok"), ("r2", "refused")]
    assert deps[0].detail["sha256"] == SHA and deps[0].detail["previous_active"] == "a"
    assert deps[2].detail["reason"] == "canary"
    reports = store.device_reports(kind="canary")
    assert len(reports) == 3 and {r.trial_id for r in reports} == {trial.id}
    p = reports[0].payload
    assert p["returns"] == [120.0, 130.0] and p["timings_ms"]["p99"] == 0.2
    assert p["host"]["passed"] is True and p["host"]["deployment_id"] == deps[0].id
    assert last_reports(store, "r2")["canary"].payload["host"]["passed"] is False
    assert artifact_for_sha(store, "c1", SHA).artifact_id == art.id
    assert artifact_for_sha(store, "c1", "other").artifact_id is None
    store.close()


def test_rollout_rejects_bad_options(fleet):
    inv, _ = fleet
    with pytest.raises(ConfigError, match="canary count"):
        _run(inv, {}, canary_count=-1)
    with pytest.raises(ConfigError, match="retries"):
        _run(inv, {}, retries=-2)
    with pytest.raises(ConfigError, match="canary episodes"):
        _run(inv, {}, episodes=0)
    with pytest.raises(ConfigError, match="unknown agent 'zz'"):
        _run(inv, {}, agents="zz")


# ----------------------------------------------------------------------------- client, scripted agent
def _scripted_agent(listener, drop_after_chunks=None, nack_end=None):
    """Serve one connection the PROTOCOL.md way; record what arrived."""
    from device_agents.protocol import LinkClosed, LinkTimeout, MsgType

    seen = {"chunks": [], "begin": None}

    def serve():
        link = listener.accept(timeout_s=5)
        received = bytearray()
        try:
            while True:
                try:
                    msg = link.receive(timeout_s=5)
                except (LinkClosed, LinkTimeout):
                    return
                if msg.type == MsgType.HELLO:
                    link.send(
                        msg.reply(
                            MsgType.HELLO, {"role": "agent", "protocol": 1, "agent": "fake", "active": "a"}
                        )
                    )
                elif msg.type == MsgType.DEPLOY_BEGIN:
                    seen["begin"] = msg.header
                    link.send(msg.reply(MsgType.ACK, {"next_offset": 0}))
                elif msg.type == MsgType.DEPLOY_CHUNK:
                    if drop_after_chunks is not None and len(seen["chunks"]) >= drop_after_chunks:
                        return
                    seen["chunks"].append((msg.header["offset"], len(msg.payload)))
                    received.extend(msg.payload)
                    link.send(msg.reply(MsgType.ACK, {"next_offset": len(received)}))
                elif msg.type == MsgType.DEPLOY_END:
                    seen["model"] = bytes(received)
                    if nack_end:
                        link.send(
                            msg.reply(
                                MsgType.NACK,
                                {"reason": nack_end, "detail": "x", "canary": {"returns": [1.0]}},
                            )
                        )
                    else:
                        link.send(
                            msg.reply(MsgType.ACK, {"slot": "b", "active": "b", "canary": {"returns": [9.0]}})
                        )
                elif msg.type == MsgType.PING:
                    link.send(msg.reply(MsgType.PONG, msg.header))
                elif msg.type == MsgType.ROLLBACK:
                    link.send(msg.reply(MsgType.NACK, {"reason": "no previous"}))
        finally:
            link.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, seen


@pytest.fixture()
def fake_artifact(monkeypatch):
    import robonas.fleet.client as client_mod

    model = bytes(range(256)) * 200  # 51200 B: four 16 KiB chunks, the last one short
    manifest = {"sha256": hashlib.sha256(model).hexdigest(), "format_version": 1}
    monkeypatch.setattr(client_mod, "read_artifact", lambda d: (dict(manifest), model, "c2ln"))
    return model


def test_client_deploy_sequence_progress_and_refusal(fake_artifact):
    from device_agents.link import listen
    from robonas.fleet.client import AgentRefused

    with listen("tcp://127.0.0.1:0") as lst:
        t, seen = _scripted_agent(lst)
        progress = []
        with AgentClient(lst.url, 5.0, name="fake") as c:
            assert c.hello()["agent"] == "fake"
            assert c.ping(n=7) < 5.0
            res = c.deploy(
                "art", {"episodes": 2, "seed": 3, "min_return": 50.0}, lambda s, n: progress.append((s, n))
            )
            with pytest.raises(AgentRefused, match=r"agent fake: rollback refused.*no previous"):
                c.rollback()
        t.join(5)
    assert res.ok and res.active == "b" and res.canary == {"returns": [9.0]}
    assert seen["model"] == fake_artifact
    assert [o for o, _ in seen["chunks"]] == [0, 16384, 32768, 49152]
    assert progress[-1] == (len(fake_artifact), len(fake_artifact))
    b = seen["begin"]
    assert b["size"] == len(fake_artifact) and b["signature"] == "c2ln"
    assert b["canary"]["episodes"] == 2 and b["canary"]["thresholds"] == {"min_return": 50.0}

    with listen("tcp://127.0.0.1:0") as lst:
        t, seen = _scripted_agent(lst, nack_end="canary failed")
        with AgentClient(lst.url, 5.0, name="fake") as c:
            res = c.deploy("art")
        t.join(5)
    assert not res.ok and res.reason == "canary failed" and res.step == "end"
    assert res.canary == {"returns": [1.0]}


def test_client_link_drop_mid_deploy_is_a_link_failure(fake_artifact):
    from device_agents.link import listen

    with listen("tcp://127.0.0.1:0") as lst:
        t, seen = _scripted_agent(lst, drop_after_chunks=2)
        c = AgentClient(lst.url, 2.0, name="bot7")
        with pytest.raises(LinkFailure, match="agent bot7: deploy chunk over tcp://") as e:
            c.deploy("art")
        assert e.value.agent == "bot7" and e.value.operation == "deploy chunk"
        c.close()
        t.join(5)
    assert len(seen["chunks"]) == 2
    with pytest.raises(LinkFailure, match="agent nobody: cannot open link"):
        AgentClient("tcp://127.0.0.1:1", 1.0, name="nobody").hello()


def test_refusal_at_hello_is_reported_not_raised(fleet):
    from robonas.fleet.client import AgentRefused

    class OldAgent(ScriptedClient):
        def hello(self):
            raise AgentRefused("agent c1: speaks protocol 2", "c1", "hello", "bad version", {})

    from robonas.fleet.deploy import rollout

    inv, _ = fleet
    result = rollout("art", inv, canary_count=1, client_factory=lambda e: OldAgent(e, {}))
    assert [r.status for r in result.robots] == ["refused", "skipped", "skipped"]
    assert result.robots[0].reason == "bad version" and result.robots[0].attempts == 1
