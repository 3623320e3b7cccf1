"""The fleet inventory: which robots exist, how to reach each agent, and what computer it runs on.

Configuration is data (`launch/fleet.toml`, one `[[agent]]` table per robot), parsed with the
standard library's `tomllib` and validated here into frozen `AgentEntry` rows, so that a typo is
a ConfigError naming the agent and the field before any link is opened. Device profiles are
checked with `robonas.models.devices.load_device`; link URLs are checked against the schemes that
`device_agents.link.open_link` (pyserial's `serial_for_url`) accepts, plus `tls://HOST:PORT` for
an agent that takes operator certificates. The URL check is by hand because it must run without
opening anything: a serial port may not be plugged in yet.

Robots are grouped by optional labels on their `[[agent]]` table: `site` (where it is), `kind`
(what it is, named by the env id its policies are trained on, e.g. "sim/CartPole-v0"), `hw_rev`
(which hardware revision) and `tags` (plain names such as "outdoor"). `Inventory.where` selects by
a group spec such as "site=lab-a,tag=outdoor" (terms ANDed). A robot's kind is its `kind` field,
else, for a sim-backed robot ("sim:PROFILE"), its reality profile's env id (`robot_kind`, which
asks `sim.reality`; importing sim on the host is cheap and allowed, and only happens on demand).

An optional top-level `[credentials]` table names the folder with the fleet CA certificate and the
operator's certificate and key (`robonas keys ...`) and which operator to act as; it is parsed into
a `CredentialsRef` whose folder is resolved against the fleet file's own folder, so a fleet file
and its keys can move together. Only the reference is checked here; the files are read by whoever
opens a TLS link.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from robonas.errors import ConfigError
from robonas.toml_file import read_toml

AGENT_FIELDS = (
    "name",
    "link",
    "device",
    "robot",
    "timeout_s",
    "server_name",
    "site",
    "kind",
    "hw_rev",
    "tags",
)
REQUIRED_FIELDS = ("name", "link", "device", "robot")
TOP_LEVEL_KEYS = ("agent", "credentials", "rollout")
# `[rollout]`: the fleet's defaults for `robonas rollout start` (its options win), by type.
ROLLOUT_FIELDS: dict[str, tuple[type, ...]] = {
    "phases": (str,),
    "concurrency": (int,),
    "min_pass_rate": (int, float),
    "max_miss_rate": (int, float),
    "max_return_drop": (int, float),
    "soak_s": (int, float),
    "rollback": (bool,),
    "episodes": (int,),
    "min_return": (int, float),
    "retries": (int,),
}
CREDENTIALS_FIELDS = ("keys", "operator")
NET_SCHEMES = ("socket", "tcp", "rfc2217", "tls")
LINK_FORMS = (
    "socket://HOST:PORT",
    "tcp://HOST:PORT",
    "tls://HOST:PORT",
    "rfc2217://HOST:PORT",
    "loop://",
    "/dev/ttyUSB0?baudrate=115200 (a serial device path)",
)
SERIAL_PARAMS = ("baudrate", "rtscts")
DEFAULT_TIMEOUT_S = 5.0
# Agent names end up in store rows, file names and CLI lists (comma-separated): keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Group labels (site, hw_rev, tags) are typed in group specs (`site=lab-a,tag=x`), so they may not hold
# ',' or '=': the same plain names as agents. A kind is an env id, which also carries '/' and ':'.
_LABEL_RE = _NAME_RE
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
# The keys of a group spec, each with the plural its "no robot matches" message lists values under.
GROUP_KEYS = {"site": "sites", "kind": "kinds", "hw_rev": "hw_revs", "tag": "tags"}
# The name a TLS client checks in the agent's certificate: a DNS name or a plain agent name
# (letters, digits, '.', '-', '_'); no wildcards, since it names exactly one robot.
_SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class CredentialsRef:
    """Where the host's TLS credentials are: `keys` (absolute, resolved against the fleet file's
    folder) holds fleet-ca.crt and OPERATOR.crt/OPERATOR.key; `operator` picks one of them
    (None: the only operator certificate in the folder)."""

    keys: Path
    operator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"keys": str(self.keys), "operator": self.operator}


@dataclass(frozen=True)
class AgentEntry:
    """One robot: its agent's name, link URL, device profile name and robot back end."""

    name: str
    link: str
    device: str
    robot: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    # For tls:// links: the name the agent's certificate must carry. "" means the agent's name,
    # so that `AgentEntry(name, ...)` built in code needs no second spelling of it.
    server_name: str = ""
    # Group labels (see the module docstring); "" and () mean not given.
    site: str = ""
    kind: str = ""
    hw_rev: str = ""
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.server_name:
            object.__setattr__(self, "server_name", self.name)
        # a list from code becomes a tuple, so that entries stay hashable and immutable
        object.__setattr__(self, "tags", tuple(self.tags))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "link": self.link,
            "device": self.device,
            "robot": self.robot,
            "timeout_s": self.timeout_s,
            "server_name": self.server_name,
            "site": self.site,
            "kind": self.kind,
            "hw_rev": self.hw_rev,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class Inventory:
    """The agents of a fleet file, in file order."""

    agents: tuple[AgentEntry, ...]
    origin: str = "<inventory>"
    credentials: CredentialsRef | None = None
    rollout: Mapping[str, Any] = field(default_factory=dict)  # [rollout] defaults, checked types

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.agents]

    def get(self, name: str) -> AgentEntry:
        for a in self.agents:
            if a.name == name:
                return a
        raise ConfigError(f"{self.origin}: unknown agent {name!r}; agents are {self.names}")

    def select(self, names: Iterable[str] | str | None = None) -> list[AgentEntry]:
        """The named agents in the order given (all, in file order, for None or empty).

        `names` may be a comma-separated string, as typed after `--agents`.
        """
        if names is None:
            return list(self.agents)
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        wanted = [n for n in names if n]
        if not wanted:
            return list(self.agents)
        dupes = sorted({n for n in wanted if wanted.count(n) > 1})
        if dupes:
            raise ConfigError(f"agents {dupes} are named more than once in the selection")
        return [self.get(n) for n in wanted]

    def where(self, spec: str | None = None) -> list[AgentEntry]:
        """The agents in group `spec`, in file order (all for None or "").

        `spec` is terms KEY=VALUE joined by commas, all of which a robot must match, with KEY one
        of site, kind, hw_rev, tag (e.g. "site=lab-a,tag=outdoor"); `kind=` compares with
        `robot_kind()`. An unknown key, a malformed term or a group no robot is in is a
        ConfigError; the last lists the values the file does have for the spec's keys.
        """
        if spec is None or not spec.strip():
            return list(self.agents)
        terms = _group_terms(spec)
        kinds: dict[str, str | None] = {}
        if any(key == "kind" for key, _ in terms):
            kinds = {a.name: robot_kind(a) for a in self.agents}
        chosen = [a for a in self.agents if all(_matches(a, k, v, kinds) for k, v in terms)]
        if chosen:
            return chosen
        known = []
        for key in dict.fromkeys(k for k, _ in terms):
            values = _values(self.agents, key, kinds)
            known.append(f"{GROUP_KEYS[key]} in {self.origin}: {', '.join(values) if values else '(none)'}")
        raise ConfigError(f"no robot matches group {spec.strip()!r}; {'; '.join(known)}")


def _group_terms(spec: str) -> list[tuple[str, str]]:
    terms = []
    for part in spec.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key or not value:
            raise ConfigError(
                f"group {spec!r}: term {part.strip()!r} is not KEY=VALUE; write e.g. "
                f"'site=lab-a,tag=outdoor' with KEY one of {', '.join(GROUP_KEYS)}"
            )
        if key not in GROUP_KEYS:
            raise ConfigError(f"group {spec!r}: unknown key {key!r}; valid keys are {', '.join(GROUP_KEYS)}")
        terms.append((key, value))
    return terms


def _matches(agent: AgentEntry, key: str, value: str, kinds: Mapping[str, str | None]) -> bool:
    if key == "tag":
        return value in agent.tags
    if key == "kind":
        return kinds.get(agent.name) == value
    return bool(getattr(agent, key) == value)


def _values(agents: Iterable[AgentEntry], key: str, kinds: Mapping[str, str | None]) -> list[str]:
    """The distinct values `key` has among `agents`, in file order (for an error message)."""
    found: dict[str, None] = {}
    for a in agents:
        if key == "tag":
            found.update(dict.fromkeys(a.tags))
        else:
            value = kinds.get(a.name) if key == "kind" else getattr(a, key)
            if value:
                found[value] = None
    return list(found)


def _sim_profile_kind(profile: str) -> str | None:
    """The env id of reality profile `profile`, or None where sim is not installed or does not
    know the profile (e.g. one the agent loads from its own --reality-profiles file)."""
    try:
        from sim.errors import SimError
        from sim.reality import get_profile
    except ModuleNotFoundError:
        return None
    try:
        return get_profile(profile).env_id
    except SimError:
        return None


def robot_kind(entry: AgentEntry) -> str | None:
    """What robot `entry` is, as the env id its policies are trained on: its `kind` field; else,
    for a sim-backed robot ("sim:PROFILE"), that reality profile's env id; else None (unknown
    here: a serial robot says its kind only in its HELLO)."""
    if entry.kind:
        return entry.kind
    backend, sep, argument = entry.robot.partition(":")
    if sep and backend == "sim" and argument:
        return _sim_profile_kind(argument)
    return None


def check_link_url(url: Any, where: str) -> str:
    """Return `url` if `open_link` could open it, else ConfigError naming `where` and the forms."""
    forms = ", ".join(LINK_FORMS)
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"{where}: field 'link' must be a non-empty URL string, got {url!r}; valid forms: {forms}"
        )
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme == "loop":
            return url
        if scheme not in NET_SCHEMES:
            raise ConfigError(f"{where}: field 'link' {url!r} has scheme {scheme!r}; valid forms: {forms}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"{where}: field 'link' {url!r} has a bad port: {e}") from e
        if not parts.hostname or port is None:
            raise ConfigError(
                f"{where}: field 'link' {url!r} needs a host and a port, e.g. {scheme}://127.0.0.1:7447"
            )
        return url
    path, _, query = url.partition("?")
    if not path.startswith("/") and not re.match(r"^COM\d+$", path, re.IGNORECASE):
        raise ConfigError(
            f"{where}: field 'link' {url!r} is neither a URL nor a serial device path; valid forms: {forms}"
        )
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in SERIAL_PARAMS:
            raise ConfigError(
                f"{where}: field 'link' {url!r}: unknown serial parameter {key!r}; "
                f"valid: {list(SERIAL_PARAMS)}"
            )
        if key == "baudrate" and (not value.isdigit() or int(value) <= 0):
            raise ConfigError(
                f"{where}: field 'link' {url!r}: baudrate {value!r} is not a positive integer (e.g. 115200)"
            )
    return url


def _agent(table: Any, index: int, origin: str) -> AgentEntry:
    where = f"{origin}: [[agent]] #{index + 1}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table with fields {list(AGENT_FIELDS)}")
    name = table.get("name")
    if isinstance(name, str) and name:
        where = f"{origin}: agent {name!r}"
    unknown = sorted(set(table) - set(AGENT_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {list(AGENT_FIELDS)}")
    missing = [f for f in REQUIRED_FIELDS if f not in table]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{where}: field 'name' {name!r} must be 1-64 letters, digits, '.', "
            f"'_' or '-', starting with a letter or digit"
        )
    link = check_link_url(table["link"], where)
    device = table["device"]
    if not isinstance(device, str) or not device:
        raise ConfigError(f"{where}: field 'device' must be a device profile name, got {device!r}")
    from robonas.models.devices import load_device

    try:
        load_device(device)
    except ConfigError as e:
        raise ConfigError(f"{where}: field 'device': {e}") from e
    robot = table["robot"]
    if not isinstance(robot, str) or not robot.strip():
        raise ConfigError(
            f"{where}: field 'robot' must be the agent's robot back end name "
            f"(a non-empty string), got {robot!r}"
        )
    timeout = table.get("timeout_s", DEFAULT_TIMEOUT_S)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigError(f"{where}: field 'timeout_s' must be a positive number of seconds, got {timeout!r}")
    server_name = _server_name(table, link, name, where)
    return AgentEntry(
        name=name,
        link=link,
        device=device,
        robot=robot,
        timeout_s=float(timeout),
        server_name=server_name,
        site=_label(table, "site", where, "a site name such as 'lab-a'"),
        kind=_kind(table, where),
        hw_rev=_label(table, "hw_rev", where, 'a hardware revision as a string, e.g. "2" or "rev-b"'),
        tags=_tags(table, where),
    )


_LABEL_FORM = "letters, digits, '.', '_' or '-', starting with a letter or digit (no ',' or '=')"


def _label(table: Mapping[str, Any], field: str, where: str, example: str) -> str:
    """An optional plain-name label (site, hw_rev); "" when the field is left out."""
    if field not in table:
        return ""
    value = table[field]
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: field {field!r} must be a string ({example}), got {type(value).__name__} {value!r}"
        )
    if not _LABEL_RE.match(value):
        raise ConfigError(f"{where}: field {field!r} {value!r} must be {example}: {_LABEL_FORM}")
    return value


def _kind(table: Mapping[str, Any], where: str) -> str:
    if "kind" not in table:
        return ""
    value = table["kind"]
    if not isinstance(value, str) or not _KIND_RE.match(value):
        raise ConfigError(
            f"{where}: field 'kind' must be the env id the robot's policies are trained on, "
            f"e.g. 'sim/CartPole-v0' (letters, digits, '.', '_', '-', '/', ':'), got {value!r}"
        )
    return value


def _tags(table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if "tags" not in table:
        return ()
    value = table["tags"]
    if not isinstance(value, list):
        raise ConfigError(
            f'{where}: field \'tags\' must be a list of names, e.g. tags = ["outdoor", "slow"], '
            f"got {type(value).__name__} {value!r}"
        )
    for tag in value:
        if not isinstance(tag, str) or not _LABEL_RE.match(tag):
            raise ConfigError(f"{where}: field 'tags': {tag!r} is not a tag name: {_LABEL_FORM}")
    dupes = sorted({t for t in value if value.count(t) > 1})
    if dupes:
        raise ConfigError(f"{where}: field 'tags' lists {dupes} more than once")
    return tuple(value)


def _server_name(table: Mapping[str, Any], link: str, name: str, where: str) -> str:
    """The agent's `server_name` (default: its name). Only a tls:// link checks a certificate, so
    the field anywhere else is a mistake (e.g. a tcp:// link someone believes is encrypted)."""
    if "server_name" not in table:
        return name
    value = table["server_name"]
    if not link.lower().startswith("tls://"):
        raise ConfigError(
            f"{where}: field 'server_name' only applies to tls:// links (the name in the agent's "
            f"certificate); link is {link!r}"
        )
    if not isinstance(value, str) or not _SERVER_NAME_RE.match(value):
        raise ConfigError(
            f"{where}: field 'server_name' {value!r} must be the name in the agent's certificate: "
            f"letters, digits, '.', '_' or '-' (e.g. 'cart-01' or 'cart-01.lab.example')"
        )
    return value


def _credentials(table: Any, origin: str, base_dir: Path) -> CredentialsRef:
    where = f"{origin}: [credentials]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{where} must be a table with fields {list(CREDENTIALS_FIELDS)}, got {type(table).__name__}"
        )
    unknown = sorted(set(table) - set(CREDENTIALS_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {list(CREDENTIALS_FIELDS)}")
    keys = table.get("keys")
    if not isinstance(keys, str) or not keys.strip():
        raise ConfigError(
            f"{where}: field 'keys' must be the folder with fleet-ca.crt and the operator's "
            f"NAME.crt/NAME.key (made by `robonas keys`), got {keys!r}"
        )
    operator = table.get("operator")
    if operator is not None and (not isinstance(operator, str) or not _NAME_RE.match(operator)):
        raise ConfigError(
            f"{where}: field 'operator' {operator!r} must be an operator name (the stem of "
            f"NAME.crt/NAME.key: letters, digits, '.', '_' or '-'), or left out to use the only one"
        )
    # abspath, not resolve(): normalise "..", but keep a symlinked keys folder as the user named it
    folder = Path(os.path.abspath(base_dir / Path(keys).expanduser()))
    return CredentialsRef(keys=folder, operator=operator)


def parse_inventory(
    data: Mapping[str, Any],
    origin: str = "<inventory>",
    base_dir: str | os.PathLike[str] | None = None,
) -> Inventory:
    """Validate a parsed fleet TOML document (`{"agent": [{...}, ...]}`, optionally
    `"credentials": {...}`). A relative `[credentials] keys` folder is taken relative to
    `base_dir` (the fleet file's folder; default: the current directory)."""
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown top-level key(s) {unknown}; a fleet file holds [[agent]] tables "
            f"and optional [credentials] and [rollout] tables"
        )
    tables = data.get("agent")
    if not isinstance(tables, Sequence) or isinstance(tables, (str, bytes)) or not tables:
        raise ConfigError(
            f"{origin}: no [[agent]] tables; add one per robot with fields {list(REQUIRED_FIELDS)}"
        )
    agents = [_agent(t, i, origin) for i, t in enumerate(tables)]
    seen: dict[str, int] = {}
    for i, a in enumerate(agents):
        if a.name in seen:
            raise ConfigError(
                f"{origin}: agent name {a.name!r} is used by [[agent]] "
                f"#{seen[a.name] + 1} and #{i + 1}; names must be unique"
            )
        seen[a.name] = i
    credentials = None
    if "credentials" in data:
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        credentials = _credentials(data["credentials"], origin, base)
    return Inventory(tuple(agents), origin, credentials, _rollout_defaults(data.get("rollout", {}), origin))


def _rollout_defaults(table: Any, origin: str) -> dict[str, Any]:
    """The `[rollout]` table, each field of the type its option takes (values are checked where
    they are used, by `robonas.fleet.rollouts`, with the same messages as the options')."""
    where = f"{origin}: [rollout]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table with fields {list(ROLLOUT_FIELDS)}")
    unknown = sorted(set(table) - set(ROLLOUT_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {list(ROLLOUT_FIELDS)}")
    for key, value in table.items():
        types = ROLLOUT_FIELDS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: field {key!r} must be a {kinds}, got {value!r}")
    return dict(table)


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Parse and validate a fleet file such as `launch/fleet.toml`.

    Anything wrong with the file itself (missing, a directory, unreadable, not UTF-8, not TOML)
    is one ConfigError naming it: the CLI prints that as one line instead of a traceback.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"fleet file {str(p)!r} is a directory; pass a fleet TOML file such as launch/fleet.toml"
        )
    try:
        data = read_toml(p, "fleet")
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself; TOML must be UTF-8
        raise ConfigError(
            f"fleet file {str(p)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); a fleet file is TOML, which must be UTF-8"
        ) from e
    except OSError as e:  # permission denied, a FIFO gone away, an I/O error on the medium
        raise ConfigError(f"fleet file {str(p)!r} cannot be read: {e.strerror or e}") from e
    return parse_inventory(data, str(p), p.parent)


__all__ = [
    "GROUP_KEYS",
    "AgentEntry",
    "CredentialsRef",
    "Inventory",
    "check_link_url",
    "load_inventory",
    "parse_inventory",
    "robot_kind",
]
