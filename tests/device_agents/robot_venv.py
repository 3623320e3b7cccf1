"""A robot's virtualenv for tests, installed the way the README tells a robot to install.

A wheel of this repository (`pip wheel --no-deps`, with pip's build isolation, as a workstation
builds it) is installed into a fresh venv with the `robot` extra only: `pip install
'robonas-*.whl[robot]'`. So the environment markers of the `robot` extra in pyproject.toml
choose the TFLite runtime and the numpy, not this helper (on CPython 3.11 / Linux x86_64:
tflite-runtime 2.14 with numpy<2), and the venv has the console scripts a robot gets
(`robonas-agent`, and a `robonas` that only says what to install). Tests can also run
`python -m device_agents ...` from the source tree in it (PYTHONPATH=repo) under the real
`tflite_runtime`, which does not import with the host's numpy 2.

Cached in two layers, because PyPI downloads are the slow part and sources change often:
- the venv, under `~/.cache/robonas/robot-wheel-venv-<hash>` (or the directory named by
  `ROBONAS_ROBOT_VENV`), keyed by what decides its third-party packages: the core dependencies
  and the `robot` extra as pyproject.toml lists them, and the Python version;
- the project inside it, keyed by a hash of every file the wheel is built from (pyproject.toml,
  README.md, LICENSE, robonas/, sim/, device_agents/). When that hash changes a new wheel is built
  and reinstalled with `--no-deps --force-reinstall`, a few seconds.
A lock file keeps parallel workers from building at once; a marker file written last holds both
hashes and means "complete", so a killed build is redone, not trusted.

The wheel is built from a copy of the sources in a temporary directory: setuptools builds in the
tree it is given, and a stale `build/lib` in the work tree would put deleted files in the wheel.

Run as a script (`python tests/device_agents/robot_venv.py`) to build it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "ROBONAS_ROBOT_VENV"
EXTRA = "robot"
# What setuptools reads to build the wheel (pyproject's readme and license files included).
WHEEL_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "robonas", "sim", "device_agents")
_MARKER = ".robonas-ready"
# Bump to rebuild every cached venv when the way it is built changes.
_LAYOUT = "wheel-v1"


class RobotVenvError(RuntimeError):
    """The robot venv could not be built (no network, no wheel for this platform...)."""


def _requirements_key() -> str:
    """What decides the venv's third-party packages: core dependencies, the robot extra, Python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    robot = project.get("optional-dependencies", {}).get(EXTRA, [])
    lines = [_LAYOUT, *project.get("dependencies", []), f"[{EXTRA}]", *robot]
    return "\n".join(lines) + f"\npy{sys.version_info.major}.{sys.version_info.minor}"


def venv_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    digest = hashlib.sha256(_requirements_key().encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "robonas" / f"robot-wheel-venv-{digest}"


def _source_files() -> list[Path]:
    files = []
    for name in WHEEL_INPUTS:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
            )
    return sorted(files)


def source_hash() -> str:
    """sha256 over the path and bytes of every file the wheel is built from."""
    h = hashlib.sha256()
    for path in _source_files():
        h.update(str(path.relative_to(REPO)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / (f"{name}.exe" if os.name == "nt" else name)


def _base_python() -> str:
    # The host venv's python would make a venv that still sees nothing of the host's packages
    # (venv never inherits site-packages), but base it on the real interpreter to be plain.
    return getattr(sys, "_base_executable", None) or sys.executable


def _env() -> dict[str, str]:
    # A PYTHONPATH pointing at the work tree (as tests set for their subprocesses) would let the
    # install see the sources instead of the wheel.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(cmd: list[str], timeout: float) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, env=_env())


def build_wheel(out_dir: Path, timeout: float = 600.0) -> Path:
    """A wheel of this repository's current sources in `out_dir` (pip wheel --no-deps)."""
    with tempfile.TemporaryDirectory(prefix="robonas-wheel-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in WHEEL_INPUTS:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif path.is_file():
                shutil.copy2(path, src / name)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                str(src),
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                "-w",
                str(out_dir),
            ],
            timeout,
        )
    wheels = sorted(out_dir.glob("robonas-*.whl"))
    if len(wheels) != 1:
        raise RobotVenvError(f"expected one robonas wheel in {out_dir}, found {wheels}")
    return wheels[0]


def _install(venv: Path, fresh: bool, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="robonas-wheel-") as tmp:
        wheel = build_wheel(Path(tmp), timeout)
        pip = [str(_bin(venv, "python")), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
        if fresh:
            # The README's command: the wheel with the robot extra, nothing else.
            _run([*pip, f"{wheel}[{EXTRA}]"], timeout)
        else:
            # Same dependencies (they are in the venv's key): only the project's own files changed.
            _run([*pip, "--no-deps", "--force-reinstall", str(wheel)], timeout)


def robot_venv(timeout: float = 600.0) -> Path:
    """The robot venv's directory, built or brought up to date with the sources first if needed."""
    venv = venv_dir()
    requirements = hashlib.sha256(_requirements_key().encode()).hexdigest()
    want = f"{requirements}\n{source_hash()}\n"  # the marker's text once the venv is up to date
    marker = venv / _MARKER
    if _read(marker) == want:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait for it
        found = _read(marker)
        if found == want:
            return venv
        # New dependencies (possible under ROBONAS_ROBOT_VENV, whose path has no key) need a new venv.
        fresh = found is None or found.split("\n")[0] != requirements
        try:
            if fresh:
                shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from a killed run
                _run([_base_python(), "-m", "venv", str(venv)], timeout)
            else:
                marker.unlink()  # a reinstall killed half-way must not pass for complete
            _install(venv, fresh, timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            tail = str(detail).strip().splitlines()[-3:]
            raise RobotVenvError(f"cannot build robot venv at {venv}: {' | '.join(tail)}") from e
        marker.write_text(want)
    return venv


def _read(marker: Path) -> str | None:
    try:
        return marker.read_text()
    except FileNotFoundError:
        return None


def robot_python(timeout: float = 600.0) -> Path:
    """Path of the robot venv's python, building the venv first if needed."""
    return _bin(robot_venv(timeout), "python")


def robot_script(name: str, timeout: float = 600.0) -> Path:
    """Path of a console script (`robonas-agent`, `robonas`) the wheel installed in the venv."""
    return _bin(robot_venv(timeout), name)


if __name__ == "__main__":
    print(robot_python())
