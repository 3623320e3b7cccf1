"""The README's robot install, tested: a wheel of this repository with only the `robot` extra.

The venv comes from tests/device_agents/robot_venv.py (`pip install 'robonas-*.whl[robot]'` into
a fresh venv; cached). Everything here runs in that venv from a scratch directory with no
PYTHONPATH, so only what the wheel installed is importable: the console scripts a robot gets, the
numpy and TFLite runtime the extra's environment markers chose, and no host package.

A failed build fails these tests rather than skipping them: a robot install that does not resolve
(a runtime with no wheel for this Python, say) is the bug they are here to catch.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.device_agents.robot_venv import REPO, RobotVenvError, robot_venv

NO_HOST_LINE = (
    "robonas: the host commands need the host extra: pip install 'robonas[host]' "
    "(this install has the robot agent: robonas-agent)"
)
# What only the host extra brings; none of it may reach a robot.
HOST_ONLY = ("torch", "pybullet", "gymnasium", "stable_baselines3", "typer", "rich", "pydantic", "optuna")

_PROBE = """
import importlib.metadata, importlib.util, json, platform, sys
import numpy, device_agents, robonas
print(json.dumps({
    "python": list(sys.version_info[:2]),
    "sys_platform": sys.platform,
    "machine": platform.machine(),
    "numpy": numpy.__version__,
    "device_agents": device_agents.__file__,
    "robonas": robonas.__file__,
    "runtimes": [m for m in ("tflite_runtime", "ai_edge_litert") if importlib.util.find_spec(m)],
    "host_only": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
    "requires": importlib.metadata.requires("robonas"),
}))
"""


def _robot_env() -> dict[str, str]:
    # No PYTHONPATH: the work tree must not stand in for what the wheel installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBONAS_TFLITE_RUNTIME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_robot_env(), capture_output=True, text=True, check=False, timeout=timeout
    )


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        return robot_venv()
    except RobotVenvError as e:
        pytest.fail(f"the README's robot install failed: {e}")


@pytest.fixture(scope="module")
def probe(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    proc = _run([str(venv / "bin" / "python"), "-c", _PROBE, *HOST_ONLY], tmp_path_factory.mktemp("probe"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _tflite_runtime_has_wheels(python: tuple[int, int], sys_platform: str, machine: str) -> bool:
    """Where tflite-runtime 2.14 publishes wheels: CPython 3.8-3.11 on Linux x86_64 and aarch64."""
    return python < (3, 12) and sys_platform == "linux" and machine in ("x86_64", "aarch64")


def test_the_wheel_is_what_runs_not_the_work_tree(probe: dict, venv: Path) -> None:
    for package in ("device_agents", "robonas"):
        installed = Path(probe[package]).resolve()
        assert installed.is_relative_to(venv.resolve()), installed
        assert not installed.is_relative_to(REPO), installed


def test_numpy_and_runtime_are_what_the_markers_choose(probe: dict) -> None:
    python = tuple(probe["python"])
    if _tflite_runtime_has_wheels(python, probe["sys_platform"], probe["machine"]):
        # tflite-runtime 2.14 is built against numpy 1.x: numpy 2 makes it fail to import.
        assert int(probe["numpy"].split(".")[0]) < 2, probe["numpy"]
        assert probe["runtimes"] == ["tflite_runtime"]
    else:
        assert probe["runtimes"] == ["ai_edge_litert"]
    if python == (3, 11):  # the case, spelled out
        assert probe["numpy"].startswith("1."), probe["numpy"]


@pytest.mark.parametrize(
    ("python", "sys_platform", "machine", "want"),
    [
        ((3, 9), "linux", "aarch64", {"tflite-runtime", "numpy<2"}),  # a Raspberry Pi OS robot
        ((3, 11), "linux", "x86_64", {"tflite-runtime", "numpy<2"}),
        ((3, 12), "linux", "aarch64", {"ai-edge-litert"}),  # no tflite-runtime wheel past 3.11
        ((3, 13), "linux", "x86_64", {"ai-edge-litert"}),
        ((3, 11), "darwin", "arm64", {"ai-edge-litert"}),  # no tflite-runtime 2.14 wheel for macOS
        ((3, 11), "win32", "AMD64", {"ai-edge-litert"}),
    ],
)
def test_the_robot_extra_picks_one_runtime_per_platform(
    probe: dict, python: tuple[int, int], sys_platform: str, machine: str, want: set[str]
) -> None:
    """The installed wheel's own metadata, evaluated for other robots' Pythons and platforms."""
    environment = {
        "python_version": f"{python[0]}.{python[1]}",
        "python_full_version": f"{python[0]}.{python[1]}.0",
        "sys_platform": sys_platform,
        "platform_machine": machine,
        "extra": "robot",
    }
    chosen = set()
    for line in probe["requires"]:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate(environment):
            continue  # a core dependency (no marker), or another extra's, or another platform's
        chosen.add(f"{req.name}{req.specifier}" if req.name == "numpy" else req.name)
    assert chosen == want


def test_robonas_agent_bench_runs_a_fresh_int8_model(
    policy_models, probe: dict, venv: Path, tmp_path: Path
) -> None:
    proc = _run(
        [
            str(venv / "bin" / "robonas-agent"),
            "bench",
            str(policy_models.int8_path),
            "--runs",
            "200",
            "--json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runtime"] == probe["runtimes"][0]
    assert result["model_bytes"] == len(policy_models.int8)
    assert result["input_dtype"] == "int8" and result["output_dtype"] == "int8"
    assert result["input_shape"] == [1, policy_models.arch.input_dim]
    assert result["runs"] == 200
    assert 0 < result["step_us"]["p50"] <= result["step_us"]["p99"]


def test_robonas_says_what_to_install_instead_of_a_traceback(venv: Path, tmp_path: Path) -> None:
    for args in (["--help"], ["search", "launch/cartpole.toml"], []):
        proc = _run([str(venv / "bin" / "robonas"), *args], tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.splitlines() == [NO_HOST_LINE], (args, proc.stderr)
        assert proc.stdout == ""


def test_no_host_package_reaches_the_robot(probe: dict, venv: Path, tmp_path: Path) -> None:
    assert probe["host_only"] == []
    script = (
        "import json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        __import__(name)\n"
        "        out[name] = None\n"
        "    except ModuleNotFoundError as e:\n"
        "        out[name] = e.name\n"
        "print(json.dumps(out))\n"
    )
    # robonas.search itself and its training module import (they import torch inside functions);
    # the search loop, the torch policy and the CLI app cannot.
    modules = ["torch", "robonas.search.loop", "robonas.search.sb3_policy", "robonas.cli.app"]
    proc = _run([str(venv / "bin" / "python"), "-c", script, *modules], tmp_path)
    assert proc.returncode == 0, proc.stderr
    missing = json.loads(proc.stdout)
    assert missing["torch"] == "torch"
    for module in modules[1:]:
        # It fails on a host package, not on a file the wheel lacks.
        assert missing[module] is not None, module
        assert missing[module].split(".")[0] not in ("robonas", "sim", "device_agents"), missing
