"""The robot side runs on Python 3.9 (robots ship old interpreters; tflite-runtime has no wheel
past 3.11): every device_agents module compiles there, and the standard-library-only ones import.

mypy no longer type-checks for 3.9 and ruff checks syntax, not the standard library, so this runs
the real interpreter when the machine has one (pyenv's 3.9 here) and skips otherwise.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _python39() -> str | None:
    # pyenv's shim is on PATH even where 3.9 is not selected, so ask each candidate to run
    candidates = [*sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9")), shutil.which("python3.9")]
    for exe in filter(None, candidates):
        ok = subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], check=False,
                            capture_output=True)  # fmt: skip
        if ok.returncode == 0:
            return exe
    return None


PY39 = _python39()
pytestmark = pytest.mark.skipif(PY39 is None, reason="no python3.9 on this machine")

# Modules whose imports need nothing outside the standard library.
STDLIB_ONLY = ("device_agents.errors", "device_agents.atomic", "device_agents.robots")


def _run39(code: str) -> subprocess.CompletedProcess[str]:
    assert PY39 is not None
    return subprocess.run([PY39, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)


def test_every_device_agents_module_compiles_on_python39():
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "device_agents").rglob("*.py"))
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f).read(), f, 'exec')\n"
    assert PY39 is not None
    proc = subprocess.run([PY39, "-c", code, *files], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_stdlib_only_modules_import_on_python39():
    proc = _run39("\n".join(f"import {m}" for m in STDLIB_ONLY) + "\nprint('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
