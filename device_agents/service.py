"""`robonas-agent install-service`: the agent's `serve` command as a systemd service.

`TEMPLATE` is the unit as shipped (launch/systemd/robonas-agent.service holds the same text, for
people who fill it by hand; a test keeps the two identical). `install(args)` checks what the unit
will name before anything is written: the trust keys, operators file and TLS files load with
the agent's own loaders, the robot spec and the listen URL are ones `serve` accepts, every path
is one the hardened service can see, and the serve arguments it puts on `ExecStart=` parse back,
with `serve`'s own argument declarations, into what it was given. Then it fills the template,
writes `robonas-agent.service` (or prints it with --dry-run) and prints the commands still to
run as root. It never runs systemctl or useradd itself: installing a service is the operator's
call, and the command stays testable without systemd.

A bad input is a DeviceError (one line on stderr, exit 2 from the CLI) raised before any file
is touched. Standard library only at import time; the loaders it checks files with lean on
`cryptography`, like the agent that will read the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable, NoReturn

from device_agents.errors import DeviceError

UNIT_NAME = "robonas-agent.service"
DEFAULT_USER = "robonas-agent"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
SERIAL_GROUP = "dialout"  # who owns /dev/ttyACM*, /dev/ttyUSB* on Debian and Raspberry Pi OS
STATE_ROOT = "/var/lib/"  # where StateDirectory= puts state; anywhere else is ReadWritePaths=

# What the unit hides from the service: ProtectHome=yes makes /home, /root and /run/user
# inaccessible, PrivateTmp=yes gives the service its own empty /tmp and /var/tmp. A key, state
# directory or interpreter under one of them would be missing when the service starts.
HIDDEN_DIRS: tuple[str, ...] = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")

# Directories that must never be the agent's state (ReadWritePaths= there would undo
# ProtectSystem=strict), and trees it must not live in at all.
_SYSTEM_DIRS = frozenset(("/", "/bin", "/lib", "/opt", "/run", "/sbin", "/srv", "/var", "/var/lib", "/mnt"))
_SYSTEM_TREES = ("/usr", "/etc", "/boot", "/proc", "/sys", "/dev")

# serve options that name files: made absolute (a service starts in /, not where you typed)
PATH_OPTIONS = ("state", "trust", "operators", "tls_cert", "tls_key", "tls_ca", "reality_profiles")
# ... and those among them the agent only reads: they must not lie inside its writable state
CONFIG_OPTIONS = ("trust", "operators", "tls_cert", "tls_key", "tls_ca")

# Paths written into directives other than ExecStart= (and the interpreter, which systemd
# refuses to quote): plain characters only, so no directive needs its own escaping rules.
_PLAIN_PATH_RE = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
# ExecStart= words that need no quoting (systemd splits on whitespace and unquotes "...")
_BARE_WORD_RE = re.compile(r"^[A-Za-z0-9._/@+=:,?&%$-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")  # portable user names (useradd, systemd strict)
_FIELD_RE = re.compile(r"@([A-Z_]+)@")

TEMPLATE = """\
# robonas-agent.service: the robot agent (`robonas-agent serve`) as a systemd service.
#
# This is the unit as shipped, a template: `robonas-agent install-service ...` checks the files
# and serve arguments it is given, fills each field written between two @ signs and writes
# /etc/systemd/system/robonas-agent.service (or prints it with --dry-run). A field alone on its
# line may fill to nothing; the line and the comment above it then go. Filling it by hand works too.
#
# The layout it is made for: trust keys, operators file and TLS files under /etc/robonas-agent
# (owned by root, readable by the group robonas-agent, never writable by the agent); the A/B
# model slots and state.json under /var/lib/robonas-agent (the one place the agent writes); the
# agent installed outside /home and /root, e.g. a venv in /opt/robonas-agent.

[Unit]
Description=robonas agent: deploys, canaries and runs policies on this robot
# --listen binds an address, so it waits for the network (After=/Wants=network-online.target);
# a serial link does not, and this fills to nothing so boot is not held up by a network wait.
@NETWORK@
# Never give up restarting: a USB robot unplugged or late at boot comes back by itself, and
# nobody may be next to the robot to run `systemctl reset-failed`.
StartLimitIntervalSec=0

[Service]
# exec: `systemctl start` fails at once when the interpreter cannot be started.
Type=exec
# A dedicated system user with no login and no files of its own: a compromised agent reaches
# only what this unit gives it.
User=@USER@
Group=@USER@
# Serial devices (/dev/ttyACM0, /dev/ttyUSB0) belong to this group; filled only when the robot
# or the link is a serial device.
@SERIAL_GROUP@
# The agent's state (A/B slots, state.json), the one place it may write: StateDirectory= when it
# lies under /var/lib (systemd creates it and hands it to the user), else ReadWritePaths=.
@STATE@
# Filled only for an agent run from a copied source tree (no pip install): where it lies.
@ENVIRONMENT@
ExecStart=@EXEC_START@

# Restart after a crash or a failed start (the robot was not plugged in yet), not after a stop.
Restart=on-failure
RestartSec=5s
# On SIGTERM the agent ends the run in progress with the robot halted (within one control
# period), closes its sessions and exits 0. TimeoutStopSec bounds that; past it systemd sends
# SIGKILL, and only the firmware's heartbeat fallback is left to stop the robot.
KillSignal=SIGTERM
TimeoutStopSec=10s

# Hardening that leaves serial ports alone.
# No setuid escalation, no capabilities at all: the agent needs none.
NoNewPrivileges=yes
CapabilityBoundingSet=
# The whole file system read-only except the state directory; homes hidden; a private /tmp.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
PrivateMounts=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
# TCP/TLS to the host, AF_UNIX for logging, AF_NETLINK for getaddrinfo's address checks.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
# What ordinary services call, minus mount, chown, setuid, clock setting and the like. @resources
# stays allowed: the TFLite thread pool may set its threads' CPU affinity.
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
# A filtered call fails with EPERM rather than killing the agent mid-run with the robot moving.
SystemCallErrorNumber=EPERM
# State files readable by the agent's group at most.
UMask=0027
# Left out on purpose, because each breaks the robot:
#   PrivateDevices=yes       hides /dev/ttyACM0 and every other serial port;
#   ProtectClock=yes         implies DeviceAllow=char-rtc, which closes every other device;
#   DevicePolicy=/DeviceAllow=  serial device majors differ between boards and adapters;
#   PrivateUsers=yes         the serial group would not map into the service's user namespace;
#   MemoryDenyWriteExecute=yes  libffi callbacks and TFLite delegates may need such pages;
#   ProcSubset=pid           the TFLite runtime reads /proc/cpuinfo to pick its kernels.

[Install]
WantedBy=multi-user.target
"""


# --- arguments -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """install-service's own options; `serve`'s arguments are added beside them by the CLI."""
    p.add_argument(
        "--user",
        default=DEFAULT_USER,
        help=f"the system user (and group) the agent runs as (default {DEFAULT_USER})",
    )
    p.add_argument(
        "--unit-dir",
        default=DEFAULT_UNIT_DIR,
        metavar="DIR",
        help=f"where {UNIT_NAME} is written (default {DEFAULT_UNIT_DIR})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the unit on stdout (and the next commands on stderr); write nothing",
    )
    # One line for a usage mistake too, like every other bad input of this command: the full
    # usage of a command with this many options would bury the line that matters. Set on this
    # parser instance only; cli.py builds the parsers and the other subcommands keep argparse's.
    p.error = _one_line_error(p.prog)  # type: ignore[method-assign,assignment]  # an instance override


def _one_line_error(prog: str) -> Callable[[str], NoReturn]:
    def error(message: str) -> NoReturn:
        print(f"{prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    return error


class _ServeParser(argparse.ArgumentParser):
    """`serve`'s arguments, exactly as the CLI declares them, with errors as DeviceError."""

    def error(self, message: str) -> NoReturn:
        raise DeviceError(f"the serve arguments do not parse: {message}")


def serve_parser() -> argparse.ArgumentParser:
    """A parser holding what `robonas-agent serve` accepts (its own declarations, not a copy)."""
    from device_agents.cli import PROG, _serve_arguments

    p = _ServeParser(prog=f"{PROG} serve", add_help=False)
    _serve_arguments(p)
    return p


def _serve_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    # argparse keeps its declarations in `_actions`, the one place that lists them all; reading
    # them here means a new serve option reaches the unit without a change to this module.
    return [a for a in p._actions if a.option_strings]


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` arguments in `args` (from install-service's parser) as a command line.

    Options left at their default are left out, so the unit follows serve's defaults.
    """
    argv: list[str] = []
    for action in _serve_actions(serve_parser()):
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        if action.nargs == 0:  # store_true: the flag alone says it
            argv.append(flag)
        elif isinstance(value, list):  # append: once per value
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_serve(argv: Sequence[str]) -> argparse.Namespace:
    """`argv` parsed as `serve` parses it; DeviceError if it does not."""
    return serve_parser().parse_args(list(argv))


# --- ExecStart= quoting ----------------------------------------------------------------------
def exec_word(arg: str) -> str:
    """One ExecStart= word that systemd turns back into exactly `arg`.

    systemd expands %-specifiers on the whole line and $VAR in arguments, so "%" and "$" are
    doubled; a word with anything beyond plain characters goes in double quotes, where "\\" and
    '"' are escaped (systemd C-unescapes inside quotes). Control characters are refused: no
    path or name of the agent's has a reason to hold one.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise DeviceError(f"argument {arg!r} holds a control character, which a unit file cannot carry")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if arg and _BARE_WORD_RE.match(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Sequence[str]) -> str:
    """The value of ExecStart= for `argv` (argv[0] an absolute path of plain characters)."""
    if not argv or not _PLAIN_PATH_RE.match(argv[0]):
        raise DeviceError(f"the interpreter path {argv[0] if argv else ''!r} must be absolute and plain")
    return " ".join([argv[0], *(exec_word(a) for a in argv[1:])])


# --- the unit --------------------------------------------------------------------------------
def render(
    *,
    user: str,
    exec_argv: Sequence[str],
    state_dir: str,
    serial_group: str | None = None,
    network: bool = False,
    pythonpath: str | None = None,
) -> str:
    """The unit text: TEMPLATE with every @FIELD@ filled (a field alone on its line may vanish)."""
    if state_dir.startswith(STATE_ROOT):
        state = f"StateDirectory={state_dir[len(STATE_ROOT) :]}\nStateDirectoryMode=0750"
    else:
        state = f"ReadWritePaths={state_dir}"
    fields = {
        "USER": user,
        "NETWORK": "After=network-online.target\nWants=network-online.target" if network else "",
        "SERIAL_GROUP": f"SupplementaryGroups={serial_group}" if serial_group else "",
        "STATE": state,
        "ENVIRONMENT": f"Environment=PYTHONPATH={pythonpath}" if pythonpath else "",
        "EXEC_START": exec_line(exec_argv),
    }
    missing = sorted(set(_FIELD_RE.findall(TEMPLATE)) - set(fields))
    if missing:  # pragma: no cover - TEMPLATE and this function change together
        raise DeviceError(f"the unit template has fields nobody fills: {missing}")
    lines: list[str] = []
    for line in TEMPLATE.splitlines():
        whole = _FIELD_RE.fullmatch(line)
        if whole and not fields[whole.group(1)]:
            while lines and lines[-1].startswith("#"):  # its comment goes with it
                lines.pop()
            continue
        lines.append(_FIELD_RE.sub(lambda m: fields[m.group(1)], line))
    return "\n".join(lines) + "\n"


# --- checks ----------------------------------------------------------------------------------
def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_visible(what: str, path: str) -> None:
    """Refuse a path the service would not see (under HIDDEN_DIRS), as typed or as resolved."""
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        for folder in HIDDEN_DIRS:
            if _under(candidate, folder):
                shown = path if candidate == path else f"{path} (really {candidate})"
                raise DeviceError(
                    f"{what} {shown} lies under {folder}, which the service cannot see "
                    "(ProtectHome=yes hides /home, /root and /run/user; PrivateTmp=yes gives it its "
                    "own /tmp and /var/tmp): keep keys and files in /etc/robonas-agent, state in "
                    "/var/lib/robonas-agent and the agent's venv in /opt"
                )


def _check_plain(what: str, path: str) -> None:
    if not _PLAIN_PATH_RE.match(path):
        raise DeviceError(
            f"{what} {path!r} holds characters a unit file would need escaped (spaces, quotes, %, $, "
            "backslash): use a path of letters, digits and ._-+@"
        )


def _check_state(state: str) -> None:
    _check_plain("state directory", state)
    if state in _SYSTEM_DIRS or any(_under(state, t) for t in _SYSTEM_TREES):
        raise DeviceError(
            f"state directory {state} is a system directory; the agent writes there: use a directory "
            "of its own, e.g. /var/lib/robonas-agent"
        )
    if os.path.exists(state) and not os.path.isdir(state):
        raise DeviceError(f"state directory {state} exists and is not a directory")
    _check_visible("state directory", state)


def _check_trust(sources: list[str]) -> None:
    from device_agents.signing import load_public_keys

    if not sources:
        raise DeviceError(
            "install-service needs --trust PUBKEY (a key file or a directory of *.pub): an agent "
            "trusting no key refuses every artifact"
        )
    for source in sources:
        if not os.path.exists(source):
            raise DeviceError(f"trust key {source} does not exist")
        if not load_public_keys(source):  # a file that is no key raises SigningError itself
            raise DeviceError(f"trust directory {source} holds no *.pub key")


def _check_operators(path: str | None) -> None:
    from device_agents.operators import Operators

    if path is None:
        raise DeviceError(
            "install-service needs --operators FILE (robonas keys trust writes it): without it the "
            "agent answers status only and nobody may deploy, run or roll back"
        )
    if not os.path.isfile(path):
        raise DeviceError(f"operators file {path} does not exist")
    Operators.from_file(path)  # TrustConfigError names the file and entry


def _check_endpoint(args: argparse.Namespace) -> bool:
    """Check --listen/--link and the TLS files against each other; True when listening."""
    from urllib.parse import urlsplit

    tls_files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    given = [flag for flag, value in tls_files.items() if value]
    if args.listen is None:
        if given:
            raise DeviceError(f"{', '.join(given)} apply to --listen tls://HOST:PORT only, not to --link")
        return False
    url = args.listen
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise DeviceError(f"listen URL {url!r} is not valid: {e}") from e
    if parts.scheme not in ("tls", "tcp") or not host or port is None:
        raise DeviceError(f"listen URL {url!r} must be tls://HOST:PORT or tcp://127.0.0.1:PORT")
    if port == 0:
        raise DeviceError(
            f"listen URL {url!r} has port 0, a new free port at every start: give the service a fixed port"
        )
    if parts.scheme == "tcp":
        from device_agents.server import _is_loopback  # the rule serve applies, not a copy

        if not _is_loopback(host):
            raise DeviceError(
                f"plain {url} would let anyone on the network reach the robot unencrypted; listen on "
                "tls://HOST:PORT with --tls-cert/--tls-key/--tls-ca, or on tcp://127.0.0.1:PORT"
            )
        if given:
            raise DeviceError(f"{', '.join(given)} apply to --listen tls://HOST:PORT only, not to {url}")
        return True
    missing = [flag for flag, value in tls_files.items() if not value]
    if missing:
        raise DeviceError(f"--listen {url} needs {', '.join(missing)} (robonas keys agent writes them)")
    for flag, value in tls_files.items():
        if not os.path.isfile(value):
            raise DeviceError(f"{flag} {value} does not exist")
    from device_agents.tls import server_context

    server_context(args.tls_cert, args.tls_key, args.tls_ca)  # key matches cert, CA loads
    return True


def _device_path(url: str | None) -> str | None:
    """The device node of a serial URL (`/dev/ttyACM0?baudrate=115200`), None for socket:// etc."""
    if url is None or not url.startswith("/"):
        return None
    return url.split("?", 1)[0]


def _serial_group(device: str, warn: list[str]) -> str:
    """The group to join for `device`: the node's own group when it is here, else dialout."""
    group = SERIAL_GROUP
    try:
        gid = os.stat(device).st_gid
    except OSError:
        warn.append(
            f"{device} is not here now; the service will retry every few seconds until it is "
            f"(it joins the group {group})"
        )
        gid = None
    if gid:  # root's group (0) says nothing about serial access
        with contextlib.suppress(KeyError):  # a gid with no name here: keep dialout
            group = grp.getgrgid(gid).gr_name
    try:
        grp.getgrnam(group)
    except KeyError:
        warn.append(f"group {group} does not exist on this machine; systemd will refuse to start the unit")
    return group


def _check_robot(args: argparse.Namespace, warn: list[str]) -> str | None:
    """Check --robot (and a serial --link); the serial group to join, or None."""
    from device_agents.robots import parse_spec

    spec = parse_spec(args.robot)
    devices = [d for d in (_device_path(spec.argument) if spec.scheme == "serial" else None,
                           _device_path(args.link)) if d]  # fmt: skip
    group = None
    for device in dict.fromkeys(devices):
        _check_visible("serial device", device)
        group = _serial_group(device, warn)
    return group


def _needs_pythonpath(python: str) -> str | None:
    """The folder holding device_agents when `python` cannot import it on its own (an agent run
    from a copied source tree with PYTHONPATH=.), else None."""
    import subprocess  # here, not at import: every robonas-agent start builds this parser

    probe = subprocess.run(
        [python, "-I", "-c", "import device_agents"],  # -I: no PYTHONPATH, no cwd, no user site
        cwd="/",
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return None
    return str(Path(__file__).resolve().parent.parent)


def _unreadable(paths: Iterable[str]) -> list[str]:
    """Of `paths` and the folders above them, those another user cannot read (a file, or a
    directory of keys: r, and x for a directory) or pass through (a folder above: x)."""
    out: dict[str, None] = {}
    for path in paths:
        p = Path(path)
        for q in [p, *p.parents]:
            try:
                mode = q.stat().st_mode
            except OSError:
                continue
            need = 0o001 if q != p else (0o005 if q.is_dir() else 0o004)  # o+x above, o+r(x) itself
            if mode & need != need:
                out[str(q)] = None
    return sorted(out)


# --- the command -----------------------------------------------------------------------------
def install(args: argparse.Namespace) -> int:
    """Check, fill, write (or print) the unit and print the next commands. DeviceError on bad input."""
    user = args.user
    if not _USER_RE.match(user) or user == "root":
        raise DeviceError(
            f"--user {user!r} must be a system user of its own (lower-case letters, digits, _ and -; "
            "not root), e.g. robonas-agent"
        )
    unit_dir = os.path.abspath(args.unit_dir)
    if not args.dry_run and not os.path.isdir(unit_dir):
        raise DeviceError(f"--unit-dir {unit_dir} is not a directory")
    for dest in PATH_OPTIONS:  # a service starts in /, so every path is made absolute
        value = getattr(args, dest)
        if isinstance(value, list):
            setattr(args, dest, [os.path.abspath(v) for v in value])
        elif value is not None:
            setattr(args, dest, os.path.abspath(value))

    python = sys.executable
    if not python or not os.path.isabs(python):
        raise DeviceError("cannot tell which Python runs this command; run it with the agent's interpreter")
    _check_plain("the interpreter", python)
    _check_visible("the interpreter", python)
    import device_agents

    _check_visible("the agent package", str(Path(device_agents.__file__).resolve().parent))

    state = args.state
    _check_state(state)
    _check_trust(args.trust)
    _check_operators(args.operators)
    network = _check_endpoint(args)
    warnings: list[str] = []
    serial_group = _check_robot(args, warnings)
    for path in args.reality_profiles:
        if not os.path.exists(path):
            raise DeviceError(f"reality profiles {path} do not exist")
    config = list(args.trust)  # the files the agent only reads
    config += [getattr(args, d) for d in CONFIG_OPTIONS if d != "trust" and getattr(args, d)]
    for path in [*config, *args.reality_profiles]:
        _check_visible("file", path)
    for path in config:
        if _under(os.path.realpath(path), os.path.realpath(state)):
            raise DeviceError(
                f"{path} lies inside the state directory {state}, which the agent may write: it could "
                "rewrite whom it trusts. Keep keys, operators and TLS files in /etc/robonas-agent"
            )
    if args.max_sessions < 1 or args.canary_episodes < 1:  # what serve refuses at start
        raise DeviceError("--max-sessions and --canary-episodes must be at least 1")

    argv = serve_argv(args)
    parsed = parse_serve(argv)
    for action in _serve_actions(serve_parser()):  # the round trip must give back every value
        if getattr(parsed, action.dest) != getattr(args, action.dest):
            raise DeviceError(  # pragma: no cover - a fault in serve_argv, not in the input
                f"internal: serve option {action.dest} does not survive the unit's command line"
            )
    pythonpath = _needs_pythonpath(python)
    if pythonpath is not None:
        _check_plain("the agent's source tree", pythonpath)
        _check_visible("the agent's source tree", pythonpath)

    unit = render(
        user=user,
        exec_argv=[python, "-m", "device_agents", "serve", *argv],
        state_dir=state,
        serial_group=serial_group,
        network=network,
        pythonpath=pythonpath,
    )
    for line in warnings:
        print(f"robonas-agent: warning: {line}", file=sys.stderr, flush=True)
    target = os.path.join(unit_dir, UNIT_NAME)
    replaced = os.path.exists(target)
    out = sys.stderr if args.dry_run else sys.stdout
    if args.dry_run:
        sys.stdout.write(unit)
        sys.stdout.flush()
    else:
        from device_agents.atomic import atomic_write

        try:
            atomic_write(target, unit.encode("utf-8"), mode=0o644)
        except OSError as e:
            raise DeviceError(
                f"cannot write {target}: {e.strerror or e} (run as root, or use --dry-run)"
            ) from e
        print(f"wrote {target}", file=out)
    print("next, as root:", file=out)
    for command in next_commands(user, state, [*config, *args.reality_profiles], replaced=replaced):
        print(f"  {command}", file=out)
    out.flush()
    return 0


def next_commands(user: str, state: str, files: Sequence[str], replaced: bool = False) -> list[str]:
    """What is left to do as root: the user, file permissions, and systemd."""
    import shlex

    q, unit = shlex.quote, UNIT_NAME[: -len(".service")]
    home = state if state.startswith(STATE_ROOT) else "/nonexistent"
    commands = [
        f"id -u {q(user)} >/dev/null 2>&1 || useradd --system --user-group --no-create-home "
        f"--home-dir {q(home)} --shell /usr/sbin/nologin {q(user)}"
    ]
    if not state.startswith(STATE_ROOT):  # StateDirectory= creates and chowns its own
        if os.path.isdir(state):
            commands.append(f"chown -R {q(user)}:{q(user)} {q(state)}")
        else:
            commands.append(f"install -d -o {q(user)} -g {q(user)} -m 0750 {q(state)}")
    private = _unreadable(files)
    if private:
        names = " ".join(q(p) for p in private)
        commands.append(f"chgrp {q(user)} {names} && chmod g+rX {names}")
    commands += [
        "systemctl daemon-reload",
        f"systemctl enable --now {unit}",
        *([f"systemctl restart {unit}"] if replaced else []),
        f"journalctl -u {unit} -f",
    ]
    return commands
