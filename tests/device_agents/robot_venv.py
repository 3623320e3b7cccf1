"""A robot-style virtualenv for tests: numpy<2, tflite-runtime, pyserial, cryptography, nothing else.

It is what a robot installs (see the `robot` extra in pyproject.toml), so tests can run
`python -m device_agents ...` from the source tree under the real `tflite_runtime`, which does not
import with the host's numpy 2. Built once with the standard library's `venv` and pip, cached
under `~/.cache/robonas/robot-venv-<hash of the requirements and python version>` (or the
directory named by `ROBONAS_ROBOT_VENV`). A lock file keeps parallel workers from building it
twice; a marker file written last means "complete", so a killed build is rebuilt, not trusted.

Run as a script (`python tests/device_agents/robot_venv.py`) to build it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = ("numpy<2", "tflite-runtime", "pyserial", "cryptography")
ENV_VAR = "ROBONAS_ROBOT_VENV"
_MARKER = ".robonas-ready"


class RobotVenvError(RuntimeError):
    """The robot venv could not be built (no network, no wheel for this platform...)."""


def venv_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    key = "\n".join(REQUIREMENTS) + f"\npy{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "robonas" / f"robot-venv-{digest}"


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _base_python() -> str:
    # The host venv's python would make a venv that still sees nothing of the host's packages
    # (venv never inherits site-packages), but base it on the real interpreter to be plain.
    return getattr(sys, "_base_executable", None) or sys.executable


def robot_python(timeout: float = 600.0) -> Path:
    """Path of the robot venv's python, building the venv first if needed."""
    venv = venv_dir()
    if (venv / _MARKER).exists():
        return _python_in(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait for it
        if (venv / _MARKER).exists():
            return _python_in(venv)
        shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from a killed run
        try:
            subprocess.run(
                [_base_python(), "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            subprocess.run(
                [
                    str(_python_in(venv)),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--quiet",
                    *REQUIREMENTS,
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            tail = str(detail).strip().splitlines()[-3:]
            raise RobotVenvError(f"cannot build robot venv at {venv}: {' | '.join(tail)}") from e
        (venv / _MARKER).write_text("\n".join(REQUIREMENTS) + "\n")
    return _python_in(venv)


if __name__ == "__main__":
    print(robot_python())
