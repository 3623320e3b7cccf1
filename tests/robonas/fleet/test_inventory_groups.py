"""Groups in the fleet file: the optional site, kind, hw_rev and tags of an [[agent]] table, the
robot's kind (its own field, else its sim reality profile's env id), and `Inventory.where`
selecting by a group spec. No agent is started: this is parsing and selection only."""

from __future__ import annotations

from pathlib import Path

import pytest

from robonas.errors import ConfigError
from robonas.fleet.inventory import AgentEntry, load_inventory, parse_inventory, robot_kind


def _agent(name: str, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": name,
        "link": "tls://127.0.0.1:7447",
        "device": "x86-host",
        "robot": "sim:cartpole-lab-a",
    }
    base.update(kw)
    return base


FLEET = """\
[[agent]]
name = "a1"
link = "tls://127.0.0.1:7001"
device = "x86-host"
robot = "sim:cartpole-lab-a"
site = "lab-a"
hw_rev = "2"
tags = ["outdoor", "slow"]

[[agent]]
name = "b1"
link = "tls://127.0.0.1:7002"
device = "x86-host"
robot = "sim:reacher-lab-a"
site = "lab-b"
hw_rev = "3"
tags = ["outdoor"]

[[agent]]
name = "a2"
link = "tls://127.0.0.1:7003"
device = "x86-host"
robot = "serial:/dev/ttyACM0"
site = "lab-a"
kind = "sim/CartPole-v0"
hw_rev = "2"

[[agent]]
name = "c1"
link = "tls://127.0.0.1:7004"
device = "x86-host"
robot = "serial:/dev/ttyACM1"
"""


@pytest.fixture
def fleet(tmp_path: Path):
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    return load_inventory(path)


def _names(entries: list[AgentEntry]) -> list[str]:
    return [e.name for e in entries]


# ----------------------------------------------------------------------------- the fields
def test_labels_are_parsed_and_default_to_empty(fleet):
    a1, b1, a2, c1 = fleet.agents
    assert (a1.site, a1.kind, a1.hw_rev, a1.tags) == ("lab-a", "", "2", ("outdoor", "slow"))
    assert (b1.site, b1.kind, b1.hw_rev, b1.tags) == ("lab-b", "", "3", ("outdoor",))
    assert (a2.site, a2.kind, a2.hw_rev, a2.tags) == ("lab-a", "sim/CartPole-v0", "2", ())
    assert (c1.site, c1.kind, c1.hw_rev, c1.tags) == ("", "", "", ())
    d = a1.to_dict()
    assert {k: d[k] for k in ("site", "kind", "hw_rev", "tags")} == {
        "site": "lab-a",
        "kind": "",
        "hw_rev": "2",
        "tags": ["outdoor", "slow"],
    }


def test_entries_built_in_code_keep_working():
    e = AgentEntry("bot", "tls://h:1", "rpi4", "sim:p")
    assert (e.server_name, e.site, e.kind, e.hw_rev, e.tags) == ("bot", "", "", "", ())
    tagged = AgentEntry("bot", "tls://h:1", "rpi4", "sim:p", tags=["x", "y"])  # type: ignore[arg-type]  # a list, as code may pass
    assert tagged.tags == ("x", "y")
    hash(tagged)  # frozen entries stay hashable with tags


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("site", 3, ["field 'site'", "string", "int"]),
        ("site", "lab a", ["field 'site'", "'lab a'"]),
        ("site", "lab,a", ["field 'site'", "no ','"]),
        ("site", "", ["field 'site'"]),
        ("hw_rev", 2, ["field 'hw_rev'", "string", '"2"']),
        ("hw_rev", "rev=2", ["field 'hw_rev'", "'='"]),
        ("kind", 5, ["field 'kind'", "sim/CartPole-v0"]),
        ("kind", "cart pole", ["field 'kind'", "'cart pole'"]),
        ("tags", "outdoor", ["field 'tags'", "list", "'outdoor'"]),
        ("tags", [1], ["field 'tags'", "1 is not a tag name"]),
        ("tags", ["a=b"], ["field 'tags'", "'a=b'"]),
        ("tags", ["x", "y", "x"], ["field 'tags'", "['x']", "more than once"]),
    ],
)
def test_bad_labels_name_the_agent_and_the_field(field, value, words):
    with pytest.raises(ConfigError) as e:
        parse_inventory({"agent": [_agent("ok"), _agent("bot-7", **{field: value})]}, "f.toml")
    message = str(e.value)
    assert message.startswith("f.toml: agent 'bot-7': ")
    for w in words:
        assert w in message, (w, message)


# ----------------------------------------------------------------------------- kinds
def test_robot_kind_is_the_field_else_the_sim_profiles_env():
    assert robot_kind(AgentEntry("a", "loop://", "x86-host", "sim:cartpole-lab-a")) == "sim/CartPole-v0"
    assert robot_kind(AgentEntry("a", "loop://", "x86-host", "sim:hopper-lab-a")) == "sim/Hopper-v0"
    # the field wins: an agent started with --kind says what it is
    assert robot_kind(AgentEntry("a", "loop://", "x86-host", "sim:hopper-lab-a", kind="k/X-v1")) == "k/X-v1"
    # a serial robot says its kind only in its HELLO; a profile this host does not know, nothing
    assert robot_kind(AgentEntry("a", "loop://", "x86-host", "serial:/dev/ttyACM0")) is None
    assert robot_kind(AgentEntry("a", "loop://", "x86-host", "sim:no-such-profile")) is None


# ----------------------------------------------------------------------------- where
@pytest.mark.parametrize(
    "spec, names",
    [
        (None, ["a1", "b1", "a2", "c1"]),
        ("", ["a1", "b1", "a2", "c1"]),
        ("site=lab-a", ["a1", "a2"]),
        ("site=lab-b", ["b1"]),
        ("hw_rev=2", ["a1", "a2"]),
        ("tag=outdoor", ["a1", "b1"]),
        ("site=lab-a,tag=outdoor", ["a1"]),
        (" site = lab-a , hw_rev = 2 ", ["a1", "a2"]),
        ("tag=outdoor,tag=slow", ["a1"]),
        # a1 is a cartpole by its sim profile, a2 by its kind field; b1 is a reacher
        ("kind=sim/CartPole-v0", ["a1", "a2"]),
        ("kind=sim/Reacher-v0", ["b1"]),
        ("kind=sim/CartPole-v0,site=lab-a,hw_rev=2", ["a1", "a2"]),
    ],
)
def test_where_selects_the_group_in_file_order(fleet, spec, names):
    assert _names(fleet.where(spec)) == names


def test_where_refuses_an_unknown_key_listing_the_valid_ones(fleet):
    with pytest.raises(ConfigError, match=r"unknown key 'room'; valid keys are site, kind, hw_rev, tag"):
        fleet.where("site=lab-a,room=3")


@pytest.mark.parametrize("spec", ["site", "site=", "=lab-a", "site=lab-a,,tag=x"])
def test_where_refuses_a_term_that_is_not_key_value(fleet, spec):
    with pytest.raises(ConfigError, match=r"is not KEY=VALUE"):
        fleet.where(spec)


def test_no_match_lists_the_values_the_file_has(fleet):
    origin = fleet.origin
    with pytest.raises(ConfigError) as e:
        fleet.where("site=lab-z")
    assert str(e.value) == f"no robot matches group 'site=lab-z'; sites in {origin}: lab-a, lab-b"
    with pytest.raises(ConfigError) as e:
        fleet.where("site=lab-b,tag=slow")  # each matches someone; together, nobody
    assert str(e.value) == (
        f"no robot matches group 'site=lab-b,tag=slow'; sites in {origin}: lab-a, lab-b; "
        f"tags in {origin}: outdoor, slow"
    )
    with pytest.raises(ConfigError) as e:
        fleet.where("kind=sim/Hopper-v0")
    assert str(e.value).endswith(f"kinds in {origin}: sim/CartPole-v0, sim/Reacher-v0")


def test_no_match_says_when_no_robot_has_the_label(tmp_path):
    path = tmp_path / "bare.toml"
    path.write_text(
        '[[agent]]\nname = "x"\nlink = "loop://"\ndevice = "x86-host"\nrobot = "serial:/dev/ttyACM0"\n'
    )
    with pytest.raises(ConfigError, match=r"hw_revs in .*bare\.toml: \(none\)$"):
        load_inventory(path).where("hw_rev=1")
