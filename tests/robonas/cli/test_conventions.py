"""What users of any command-line tool expect: --version on both commands, `python -m robonas`,
shell completion, help text that keeps the brackets the source wrote, a LICENSE file."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": "/tmp"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_both_commands_print_their_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    host = _run("-m", "robonas", "--version")
    agent = _run("-m", "device_agents", "--version")
    assert (host.returncode, host.stdout.strip()) == (0, f"robonas {version}")
    assert (agent.returncode, agent.stdout.strip()) == (0, f"robonas-agent {version}")


def test_python_dash_m_robonas_is_the_cli_and_completion_is_offered():
    r = _run("-m", "robonas", "--help")
    assert r.returncode == 0 and "search" in r.stdout and "rollout" in r.stdout
    assert "--install-completion" in r.stdout


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (["deploy"], "[[agent]]"),
        (["fleet", "status"], "[[agent]]"),
        (["rollout", "start"], "[[agent]]"),
        (["rollout", "start"], "[rollout]"),
        (["search"], "[study].name"),
        (["search"], "robonas[ray]"),
        (["export"], "[export].max_return_drop"),
    ],
)
def test_help_keeps_the_brackets_the_source_wrote(command, text):
    r = _run("-m", "robonas", *command, "--help")
    flat = re.sub(r"[│\s]+", " ", r.stdout)  # rich wraps help into boxes
    assert r.returncode == 0 and text in flat.replace("' robonas", "'robonas"), flat


def test_the_license_file_is_the_one_the_metadata_names():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    text = (REPO / "LICENSE").read_text()
    assert meta["license"] == "Apache-2.0"
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )
