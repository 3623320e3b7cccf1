"""The fleet inventory: which robots exist, how to reach each agent, and what computer it runs on.

Configuration is data (`launch/fleet.toml`, one `[[agent]]` table per robot), parsed with the
standard library's `tomllib` and validated here into frozen `AgentEntry` rows, so that a typo is
a ConfigError naming the agent and the field before any link is opened. Device profiles are
checked with `robonas.models.devices.load_device`; link URLs are checked against the schemes that
`device_agents.link.open_link` (pyserial's `serial_for_url`) accepts. The URL check is by hand
because it must run without opening anything: a serial port may not be plugged in yet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from robonas.errors import ConfigError
from robonas.toml_file import read_toml

AGENT_FIELDS = ("name", "link", "device", "robot", "timeout_s")
REQUIRED_FIELDS = ("name", "link", "device", "robot")
TOP_LEVEL_KEYS = ("agent",)
NET_SCHEMES = ("socket", "tcp", "rfc2217")
LINK_FORMS = (
    "socket://HOST:PORT",
    "tcp://HOST:PORT",
    "rfc2217://HOST:PORT",
    "loop://",
    "/dev/ttyUSB0?baudrate=115200 (a serial device path)",
)
SERIAL_PARAMS = ("baudrate", "rtscts")
DEFAULT_TIMEOUT_S = 5.0
# Agent names end up in store rows, file names and CLI lists (comma-separated): keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class AgentEntry:
    """One robot: its agent's name, link URL, device profile name and robot back end."""

    name: str
    link: str
    device: str
    robot: str
    timeout_s: float = DEFAULT_TIMEOUT_S

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "link": self.link,
            "device": self.device,
            "robot": self.robot,
            "timeout_s": self.timeout_s,
        }


@dataclass(frozen=True)
class Inventory:
    """The agents of a fleet file, in file order."""

    agents: tuple[AgentEntry, ...]
    origin: str = "<inventory>"

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
    return AgentEntry(name=name, link=link, device=device, robot=robot, timeout_s=float(timeout))


def parse_inventory(data: Mapping[str, Any], origin: str = "<inventory>") -> Inventory:
    """Validate a parsed fleet TOML document (`{"agent": [{...}, ...]}`)."""
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown top-level key(s) {unknown}; a fleet file holds only [[agent]] tables"
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
    return Inventory(tuple(agents), origin)


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Parse and validate a fleet file such as `launch/fleet.toml`."""
    return parse_inventory(read_toml(path, "fleet"), str(Path(path)))


__all__ = ["AgentEntry", "Inventory", "check_link_url", "load_inventory", "parse_inventory"]
