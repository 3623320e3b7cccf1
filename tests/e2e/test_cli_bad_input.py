"""Bad input at the CLI of export and calibration: one line naming the problem, exit code 2,
nothing partial stored."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from robonas.store import Store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _robonas(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robonas.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _one_line_exit_2(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("INFO:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{work / 'runs' / 'robonas.db'}"
    proc = _robonas(
        work,
        "search",
        str(REPO / "launch" / "cartpole.toml"),
        "--trials",
        "1",
        "--steps",
        "1500",
        "--store",
        url,
    )
    assert proc.returncode == 0, proc.stderr
    return work, url


def test_export_unknown_trial_and_study(searched):
    work, url = searched
    _one_line_exit_2(_robonas(work, "export", "cartpole", "--trial", "999", "--store", url), "999")
    _one_line_exit_2(_robonas(work, "export", "nosuch", "--best", "--store", url), "nosuch")
    _one_line_exit_2(_robonas(work, "export", "cartpole", "--store", url), "--best")


def test_export_trial_without_weights(searched):
    work, url = searched
    store = Store(url)
    trial = store.trials(store.get_study("cartpole").id, status="complete")[0]
    weights = Path(store.artifacts(trial.id, kind="weights")[0].meta["actor"])
    moved = weights.with_suffix(".moved")
    weights.rename(moved)
    try:
        _one_line_exit_2(
            _robonas(work, "export", "cartpole", "--trial", str(trial.id), "--store", url), "weights file"
        )
    finally:
        moved.rename(weights)


def test_calibrate_gap_with_too_few_reports_says_how_many(searched):
    work, url = searched
    _one_line_exit_2(_robonas(work, "calibrate", "gap", "--study", "cartpole", "--store", url), "at least 3")
    assert not Store(url).model_versions("gap")


def test_calibrate_latency_on_an_unreachable_agent_stores_nothing(searched, tmp_path):
    work, url = searched
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[agent]]\nname = "gone"\nlink = "socket://127.0.0.1:{port}"\n'
        'device = "x86-host"\nrobot = "sim:cartpole-lab-a"\n'
    )
    before = len(Store(url).device_reports())
    _one_line_exit_2(
        _robonas(
            work,
            "calibrate",
            "latency",
            "--fleet",
            str(fleet),
            "--agent",
            "gone",
            "--n-archs",
            "6",
            "--store",
            url,
        ),
        "gone",
    )
    store = Store(url)
    assert not store.model_versions("latency") and len(store.device_reports()) == before
