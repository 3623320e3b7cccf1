"""`robonas-agent install-service`: the agent's serve command as a systemd unit.

The units it writes go through the real `systemd-analyze verify` (skipped where the machine has
none). On a unit file in a temp dir, verify parses every directive and reports unknown keys, bad
values, unbalanced quoting and an ExecStart= executable that is not there; it does not look up
User= or the paths, so the unit verifies as written, with nothing faked. A directive it only
warns about still exits 0, so a unit passes only when verify says nothing about it at all; the
bad-directive tests show that this catches real mistakes. `systemd-analyze security --offline`
rates the hardening. The ExecStart= line is split by the rules systemd documents (an
implementation here, independent of the module's quoting) and parsed by the agent's own parser.

The files the tests make lie under /tmp and this machine's interpreter under /root, which the
real unit hides from the service (PrivateTmp=, ProtectHome=) and install-service therefore
refuses; most tests lift that one check (`visible`), and `test_hidden_paths_are_refused` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_agents import cli, service
from device_agents.signing import generate_keypair
from robonas.credentials import make_agent, make_ca, make_operator

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze on this machine")
SERIAL_ROBOT = "serial:/dev/ttyACM0?baudrate=115200"
# argument values with everything a unit file treats specially: spaces, quotes, backslashes,
# %-specifiers, $VARIABLES, a lone semicolon
AWKWARD_ID = "lab 7 \"north\" 'bay' back\\slash 100% $HOME %h ${X} ;"


@dataclass(frozen=True)
class Files:
    root: Path
    trust: Path  # robonas.pub
    operators: Path
    cert: Path
    key: Path
    ca: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("etc-robonas-agent")
    _, pub = generate_keypair(root)
    make_ca(root)
    cert, key = make_agent(root, "robot-a", root)
    operator_cert, _ = make_operator(root, "alice", root)
    operators = root / "operators.json"
    operators.write_text(
        json.dumps({"operators": [{"name": "alice", "key": operator_cert.name, "roles": ["run"]}]})
    )
    return Files(root, pub, operators, cert, key, root / "fleet-ca.crt")


@pytest.fixture
def visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let install-service accept the temp files and this machine's interpreter (see the docstring)."""
    monkeypatch.setattr(service, "HIDDEN_DIRS", ())


@dataclass
class Result:
    rc: int
    out: str
    err: str


def install(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> Result:
    capsys.readouterr()
    try:
        rc = cli.main(["install-service", *map(str, argv)])
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code or 0)
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


def serial_args(files: Files, state: Path | str) -> list[str | os.PathLike[str]]:
    return ["--state", state, "--trust", files.trust, "--operators", files.operators,
            "--robot", SERIAL_ROBOT, "--link", "/dev/ttyUSB0"]  # fmt: skip


def tls_args(files: Files, state: Path | str) -> list[str | os.PathLike[str]]:
    return ["--state", state, "--trust", files.root, "--operators", files.operators,
            "--robot", "sim:cartpole-lab-a", "--listen", "tls://0.0.0.0:7448",
            "--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]  # fmt: skip


def written(capsys: pytest.CaptureFixture[str], unit_dir: Path, *argv: str | os.PathLike[str]) -> str:
    unit_dir.mkdir(exist_ok=True)
    r = install(capsys, *argv, "--unit-dir", unit_dir)
    assert r.rc == 0, r.err
    return (unit_dir / service.UNIT_NAME).read_text()


def verify_problems(unit: str, folder: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit (nothing, for a good one)."""
    assert SYSTEMD_ANALYZE is not None
    folder.mkdir(exist_ok=True)
    path = folder / service.UNIT_NAME
    path.write_text(unit)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    # only lines about this unit: on some machines verify also grumbles about system units
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if service.UNIT_NAME in ln]
    return lines + ([f"exit status {proc.returncode}"] if proc.returncode else [])


def exec_start(unit: str) -> str:
    (value,) = [ln[len("ExecStart=") :] for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    return value


def systemd_split(value: str) -> list[str]:
    """ExecStart= as systemd.service(5) splits it, written here apart from service.exec_word:
    words split on whitespace with shell-like double and single quotes and backslash escapes;
    in each word "%%" is "%" and "$$" is "$", while any other "%x" specifier or "$NAME"/"${NAME}"
    would be expanded by systemd, which fails the test: the agent must get the word as given."""
    return [_unescape(w) for w in shlex.split(value, posix=True)]


def _unescape(word: str) -> str:
    out, i = [], 0
    while i < len(word):
        c, after = word[i], word[i + 1 : i + 2]
        if c in "%$" and after == c:
            out.append(c)
            i += 2
            continue
        if c == "%" or (c == "$" and re.match(r"[A-Za-z_{]", after)):
            raise AssertionError(f"systemd would expand {word[i : i + 2]!r} in {word!r}")
        out.append(c)
        i += 1
    return "".join(out)


def serve_namespace(*argv: str | os.PathLike[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *map(str, argv)])


# --- the units pass systemd's own checks ---------------------------------------------------------
@needs_systemd
def test_serial_unit_passes_systemd_verify(visible, files, tmp_path, capsys):
    unit = written(capsys, tmp_path / "units", *serial_args(files, tmp_path / "state"))
    assert verify_problems(unit, tmp_path / "verify") == []
    assert "SupplementaryGroups=dialout" in unit  # neither device is here: Debian's serial group
    assert f"ReadWritePaths={tmp_path / 'state'}" in unit  # not under /var/lib: an explicit path
    assert "\nAfter=network-online.target" not in unit  # a serial robot does not wait for the network


@needs_systemd
def test_tls_unit_passes_systemd_verify(visible, files, tmp_path, capsys):
    unit = written(capsys, tmp_path / "units", *tls_args(files, "/var/lib/robonas-agent"))
    assert verify_problems(unit, tmp_path / "verify") == []
    assert "\nStateDirectory=robonas-agent\n" in unit and "\nReadWritePaths=" not in unit
    assert "After=network-online.target\nWants=network-online.target\n" in unit
    assert "\nSupplementaryGroups=" not in unit  # no serial device to reach


@needs_systemd
@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key 'ProtectSytem'"),
        ("RestartSec=5s", "RestartSec=five", "sec value"),
        (f"ExecStart={sys.executable} ", "ExecStart=/nonexistent/python ", "not executable"),
        ("--state ", '--state "', "Unbalanced quoting"),
    ],
)
def test_verify_catches_a_bad_directive(visible, files, tmp_path, capsys, old, new, said):
    unit = written(capsys, tmp_path / "units", *serial_args(files, tmp_path / "state"))
    assert old in unit
    problems = verify_problems(unit.replace(old, new, 1), tmp_path / "verify")
    assert any(said in p for p in problems), problems


@needs_systemd
def test_hardening_is_rated_by_systemd(visible, files, tmp_path, capsys):
    """`systemd-analyze security` scores exposure 0-10; the unit stays at 3.0 or below ("OK").
    Without its hardening lines the same unit scores far above (the check can fail)."""
    unit = written(capsys, tmp_path / "units", *serial_args(files, tmp_path / "state"))
    probe = subprocess.run([SYSTEMD_ANALYZE or "", "security", "--help"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (systemd < 250)")

    def exposure_ok(text: str) -> bool:
        folder = tmp_path / f"security-{len(text)}"
        folder.mkdir()
        (folder / service.UNIT_NAME).write_text(text)
        proc = subprocess.run([SYSTEMD_ANALYZE or "", "security", "--offline=yes", "--threshold=30",
                               str(folder / service.UNIT_NAME)], capture_output=True, text=True,
                              check=False, timeout=60)  # fmt: skip
        return proc.returncode == 0

    start = unit.index("# Hardening")
    bare = unit[:start] + unit[unit.index("[Install]") :]
    assert exposure_ok(unit)
    assert not exposure_ok(bare)


def test_serial_access_is_kept(visible, files, tmp_path, capsys):
    """Nothing in the unit closes devices, and the agent joins the group of the serial node it
    will open (a pty stands in for /dev/ttyACM0)."""
    import grp

    main_fd, sub_fd = os.openpty()
    try:
        device = os.ttyname(sub_fd)
        unit = written(capsys, tmp_path / "units", "--state", tmp_path / "state", "--trust", files.trust,
                       "--operators", files.operators, "--robot", f"serial:{device}",
                       "--listen", "tcp://127.0.0.1:7447")  # fmt: skip
        gid = os.stat(device).st_gid
    finally:
        os.close(main_fd)
        os.close(sub_fd)
    # root's group says nothing about serial access (a container's ptys): then Debian's dialout
    group = grp.getgrgid(gid).gr_name if gid else service.SERIAL_GROUP
    assert f"\nSupplementaryGroups={group}\n" in unit
    for closing in (
        "PrivateDevices=yes",
        "ProtectClock=yes",
        "DevicePolicy=",
        "DeviceAllow=",
        "PrivateUsers=yes",
    ):
        assert f"\n{closing}" not in unit


def test_serial_group_is_the_device_nodes_own(tmp_path):
    import grp

    node = tmp_path / "ttyACM9"
    node.write_text("")
    others = [g for g in grp.getgrall() if g.gr_gid not in (0, os.stat(node).st_gid)]
    try:
        os.chown(node, -1, others[0].gr_gid)
    except (IndexError, PermissionError):
        pytest.skip("cannot give a file another group here")
    warnings: list[str] = []
    assert service._serial_group(str(node), warnings) == others[0].gr_name
    assert warnings == []
    assert service._serial_group(str(tmp_path / "absent"), warnings) == service.SERIAL_GROUP
    assert "not here now" in warnings[0]


# --- ExecStart= is the serve command it was given --------------------------------------------
@needs_systemd
def test_exec_start_parses_back_into_the_serve_arguments(visible, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files.root)  # relative paths: the unit must hold them made absolute
    state = tmp_path / "state"
    given = ["--state", state, "--trust", files.trust.name, "--trust", files.root,
             "--operators", files.operators.name, "--robot", SERIAL_ROBOT, "--link", "/dev/ttyUSB0",
             "--id", AWKWARD_ID, "--kind", "sim/CartPoleSwingUp-v0", "--fallback", "safe",
             "--canary-episodes", "3", "--canary-max-miss-rate", "0.05", "--canary-min-return", "-12.5",
             "--max-model-bytes", "4194304", "--max-sessions", "2", "--device", "rpi4", "-v"]  # fmt: skip
    unit = written(capsys, tmp_path / "units", *given)
    assert verify_problems(unit, tmp_path / "verify") == []  # systemd takes the quoting as it is

    argv = systemd_split(exec_start(unit))
    assert argv[:4] == [sys.executable, "-m", "device_agents", "serve"]
    absolute = [str(files.root / a) if a in (files.trust.name, files.operators.name) else a for a in given]
    assert serve_namespace(*argv[4:]) == serve_namespace(*absolute)
    assert serve_namespace(*argv[4:]).id == AWKWARD_ID


def test_exec_start_runs_the_agent_and_sigterm_is_a_clean_stop(visible, files, tmp_path, capsys):
    """The ExecStart= words, run as systemd would (from /, with systemd's bare environment), start
    an agent that serves; SIGTERM (KillSignal=) ends it with status 0, so Restart=on-failure does
    not bring back an agent that `systemctl stop` stopped."""
    import select
    import signal
    import socket

    with socket.socket() as probe:  # a free port for the unit's fixed --listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unit = written(capsys, tmp_path / "units", "--state", tmp_path / "state", "--trust", files.trust,
                   "--operators", files.operators, "--robot", "sim:cartpole-lab-a",
                   "--listen", f"tcp://127.0.0.1:{port}")  # fmt: skip
    argv = systemd_split(exec_start(unit))
    agent = subprocess.Popen(argv, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready, _, _ = select.select([agent.stdout], [], [], 60.0)  # generous: bounds a broken start only
        assert ready and agent.stdout is not None, "the agent printed nothing"
        assert agent.stdout.readline().strip() == f"listening on tcp://127.0.0.1:{port}"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.stderr.read() if agent.stderr else ""
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_exec_word_matches_the_documented_splitting():
    words = [AWKWARD_ID, "", "plain", "a b", 'q"q', "back\\", "50%", "$$", "ü-ñ", ";", "-x"]
    assert systemd_split(" ".join(service.exec_word(w) for w in words)) == words
    with pytest.raises(service.DeviceError, match="control character"):
        service.exec_word("line\nbreak")


@needs_systemd
def test_a_quoted_semicolon_is_an_argument_to_systemd(tmp_path):
    """A bare ";" would end ExecStart='s command and start another; exec_word's does not."""
    true = shutil.which("true") or "/bin/true"
    bare = f"[Service]\nExecStart={true} ; next\n"
    assert any("more than one ExecStart" in p for p in verify_problems(bare, tmp_path / "bare"))
    quoted = f"[Service]\nExecStart={true} {service.exec_word(';')} next\n"
    assert verify_problems(quoted, tmp_path / "quoted") == []


# --- --dry-run, bad input, what it prints --------------------------------------------------------
def test_dry_run_writes_nothing_and_prints_the_unit(visible, files, tmp_path, capsys):
    units = tmp_path / "units"
    units.mkdir()
    args = tls_args(files, "/var/lib/robonas-agent")
    dry = install(capsys, *args, "--unit-dir", units, "--dry-run")
    assert dry.rc == 0, dry.err
    assert list(units.iterdir()) == []
    real = written(capsys, units, *args)
    assert dry.out == real  # stdout is exactly the unit a real run writes
    assert "systemctl enable --now robonas-agent" in dry.err  # the next steps go to stderr
    # a missing --unit-dir is no reason to refuse a dry run: nothing is written there
    assert install(capsys, *args, "--unit-dir", tmp_path / "nowhere", "--dry-run").rc == 0


def test_next_commands_are_printed_not_run(visible, files, tmp_path, capsys, monkeypatch):
    bin_dir, ran = tmp_path / "bin", tmp_path / "ran"
    bin_dir.mkdir()
    for tool in ("systemctl", "useradd", "chown", "install"):  # any of them running leaves a trace
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\necho {tool} >> {ran}\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    units = tmp_path / "units"
    units.mkdir()
    r = install(capsys, *serial_args(files, tmp_path / "state"), "--unit-dir", units)
    assert r.rc == 0, r.err
    assert not ran.exists()
    steps = r.out.splitlines()
    assert steps[0] == f"wrote {units / service.UNIT_NAME}"
    assert any("useradd --system --user-group" in s and s.endswith(" robonas-agent") for s in steps)
    assert f"  install -d -o robonas-agent -g robonas-agent -m 0750 {tmp_path / 'state'}" in steps
    assert steps.index("  systemctl daemon-reload") < steps.index("  systemctl enable --now robonas-agent")
    # pytest's temp folders are private (0700): the service user could not read the keys in them
    assert any(s.startswith("  chgrp robonas-agent ") and str(files.root) in s for s in steps)
    assert "  systemctl restart robonas-agent" not in steps  # a first install: nothing to restart
    again = install(capsys, *serial_args(files, tmp_path / "state"), "--unit-dir", units)
    assert "  systemctl restart robonas-agent" in again.out.splitlines()


def _bad_cases(files: Files, tmp: Path) -> dict[str, tuple[list[str | os.PathLike[str]], str]]:
    state = tmp / "state"
    good = serial_args(files, state)
    tls = tls_args(files, state)
    not_a_dir = tmp / "a-file"
    not_a_dir.write_text("x")
    inside = tmp / "state-with-key"
    inside.mkdir()
    shutil.copy(files.trust, inside / "robonas.pub")

    def without(args: list, *flags: str) -> list:
        out, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a in flags:
                skip = True
                continue
            out.append(a)
        return out

    return {
        "missing trust key": ([*without(good, "--trust"), "--trust", tmp / "nope.pub"], "does not exist"),
        "trust file is no key": ([*without(good, "--trust"), "--trust", files.operators], "not an Ed25519"),
        "no trust at all": (without(good, "--trust"), "needs --trust"),
        "no operators": (without(good, "--operators"), "needs --operators"),
        "operators not JSON": ([*without(good, "--operators"), "--operators", files.trust], "operators file"),
        "tls without its key": (without(tls, "--tls-key"), "needs --tls-key"),
        "tls files with a link": ([*good, "--tls-cert", files.cert], "--listen tls://"),
        "plain tcp off loopback": (
            [*without(good, "--link"), "--listen", "tcp://0.0.0.0:7447"],
            "unencrypted",
        ),
        "port 0": ([*without(tls, "--listen"), "--listen", "tls://0.0.0.0:0"], "fixed port"),
        "mismatched tls key": (
            [*without(tls, "--tls-key"), "--tls-key", files.root / "alice.key"],
            "cannot be used together",
        ),
        "unknown robot": ([*without(good, "--robot"), "--robot", "ros:arm"], "unknown"),
        "root user": ([*good, "--user", "root"], "--user"),
        "state is a file": ([*without(good, "--state"), "--state", not_a_dir], "not a directory"),
        "state in /etc": ([*without(good, "--state"), "--state", "/etc/robonas-agent"], "system directory"),
        "trust inside state": (
            [*without(good, "--state", "--trust"), "--state", inside, "--trust", inside / "robonas.pub"],
            "inside the state directory",
        ),
        "zero sessions": ([*good, "--max-sessions", "0"], "at least 1"),
        "no unit dir": ([*good, "--unit-dir", tmp / "nowhere"], "not a directory"),
        "no robot (argparse)": (without(good, "--robot"), "--robot"),
        "listen and link (argparse)": ([*good, "--listen", "tls://0.0.0.0:7448"], "not allowed with"),
    }


BAD_CASES = ("missing trust key", "trust file is no key", "no trust at all", "no operators",
             "operators not JSON", "tls without its key", "tls files with a link", "plain tcp off loopback",
             "port 0", "mismatched tls key", "unknown robot", "root user", "state is a file", "state in /etc",
             "trust inside state", "zero sessions", "no unit dir", "no robot (argparse)",
             "listen and link (argparse)")  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(visible, files, tmp_path, capsys, case):
    units = tmp_path / "units"
    units.mkdir()
    cases = _bad_cases(files, tmp_path)
    assert set(cases) == set(BAD_CASES)
    argv, said = cases[case]
    if case != "no unit dir":
        argv = [*argv, "--unit-dir", units]
    r = install(capsys, *argv)
    assert r.rc == 2
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("robonas-agent"), r.err
    assert said in lines[0]
    assert list(units.iterdir()) == []


def test_hidden_paths_are_refused(files, tmp_path, capsys):
    """The real list: what ProtectHome=/PrivateTmp= hide is refused, as typed or behind a symlink."""
    for hidden in ("/tmp/robonas/state", "/home/pi/keys/robonas.pub", "/root/venv/bin/python", "/var/tmp/x"):
        with pytest.raises(service.DeviceError, match="cannot see"):
            service._check_visible("file", hidden)
    service._check_visible("file", "/etc/robonas-agent/robonas.pub")
    service._check_visible("file", "/var/lib/robonas-agent")
    real = os.path.realpath(sys.executable)
    hidden_as_typed = any(sys.executable.startswith(h + "/") for h in service.HIDDEN_DIRS)
    if any(real.startswith(h + "/") for h in service.HIDDEN_DIRS) and sys.executable != real:
        # this venv's python is a symlink into a hidden folder; where the checkout itself lies in
        # one (a clone under /tmp), the path as typed is refused first
        with pytest.raises(service.DeviceError, match="lies under" if hidden_as_typed else "really"):
            service._check_visible("the interpreter", sys.executable)
    assert str(tmp_path).startswith("/tmp/")  # pytest's temp root on this machine
    # through the command: the temp state dir (or this machine's interpreter) is refused
    units = tmp_path / "units"
    units.mkdir()
    r = install(capsys, *serial_args(files, tmp_path / "state"), "--unit-dir", units)
    assert r.rc == 2 and "cannot see" in r.err and len(r.err.splitlines()) == 1
    assert list(units.iterdir()) == []


# --- the template ----------------------------------------------------------------------------
def test_launch_file_is_the_template():
    assert (REPO / "launch/systemd/robonas-agent.service").read_text() == service.TEMPLATE


def test_template_fields_are_all_filled(visible, files, tmp_path, capsys):
    fields = set(re.findall(r"@([A-Z_]+)@", service.TEMPLATE))
    assert fields == {"USER", "NETWORK", "SERIAL_GROUP", "STATE", "ENVIRONMENT", "EXEC_START"}
    for args in (serial_args(files, tmp_path / "s1"), tls_args(files, "/var/lib/robonas-agent")):
        unit = written(capsys, tmp_path / f"units-{len(args)}", *args)
        assert not re.search(r"@[A-Z_]+@", unit)
        for line in ("Restart=on-failure", "User=robonas-agent", "Group=robonas-agent", "KillSignal=SIGTERM",
                     "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                     "WantedBy=multi-user.target"):  # fmt: skip
            assert f"\n{line}\n" in unit


def test_custom_user(visible, files, tmp_path, capsys):
    unit = written(capsys, tmp_path / "units", *serial_args(files, tmp_path / "state"), "--user", "agent7")
    assert "\nUser=agent7\nGroup=agent7\n" in unit


@needs_systemd
def test_source_tree_agent_gets_pythonpath(tmp_path):
    """An interpreter that cannot import device_agents by itself (a copied tree) gets PYTHONPATH."""
    system_python = "/usr/bin/python3"
    if not os.path.exists(system_python) or service._needs_pythonpath(system_python) is None:
        pytest.skip("no interpreter here that lacks device_agents")
    assert service._needs_pythonpath(sys.executable) is None  # this venv has it installed
    tree = service._needs_pythonpath(system_python)
    assert tree == str(REPO)
    unit = service.render(user="robonas-agent", exec_argv=[system_python, "-m", "device_agents", "serve"],
                          state_dir="/var/lib/robonas-agent", pythonpath=tree)  # fmt: skip
    assert f"\nEnvironment=PYTHONPATH={REPO}\n" in unit
    assert verify_problems(unit, tmp_path / "verify") == []
