"""The layers of the design hold: the robot package pulls in no host machinery."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import device_agents

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "pybullet", "gymnasium", "robonas", "sim", "stable_baselines3", "optuna")
# The sim-backed robot twin may import `sim` lazily, only when chosen; it is excluded here.
LAZY_SIM_MODULES = {"device_agents.robots.sim_twin"}


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_device_agents_loads_no_host_packages():
    loaded = _loaded_after("import device_agents")
    assert not set(FORBIDDEN) & set(loaded)


def test_every_device_agents_module_loads_no_host_packages():
    modules = [
        m.name
        for m in pkgutil.walk_packages(device_agents.__path__, "device_agents.")
        if m.name not in LAZY_SIM_MODULES and not m.name.endswith("__main__")
    ]
    assert modules, "device_agents has no modules to check"
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    bad = set(FORBIDDEN) & set(loaded)
    assert not bad, f"device_agents modules {modules} pulled in {sorted(bad)}"


def test_robonas_help_imports_no_torch():
    loaded = _loaded_after(
        "import sys\nsys.argv=['robonas','--help']\nfrom robonas import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass"
    )
    assert "torch" not in loaded and "pybullet" not in loaded


def _modules_of(package: str) -> list[str]:
    pkg = __import__(package, fromlist=["__path__"])
    return [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")]


def test_sim_imports_nothing_of_robonas_or_the_robot_side():
    modules = _modules_of("sim")
    loaded = set(_loaded_after("\n".join(f"import {m}" for m in modules)))
    assert not {"robonas", "device_agents"} & loaded, f"sim modules {modules} pulled in {sorted(loaded)}"


# The host subpackages that rank, store and model candidates run without the training stack:
# `robonas top`, `report`, `calibrate` and the strategies' asks never import torch or pybullet.
LIGHT_HOST_PACKAGES = ("robonas.models", "robonas.strategies", "robonas.fleet", "robonas.cli")
LIGHT_HOST_MODULES = (
    "robonas.space",
    "robonas.metrics",
    "robonas.scoring",
    "robonas.store",
    "robonas.study_views",
    "robonas.config",
    "robonas.search.loop",
    "robonas.search.executor",
    "robonas.search.curves",
)


def test_host_ranking_storing_and_modelling_import_no_training_stack():
    modules = [m for p in LIGHT_HOST_PACKAGES for m in _modules_of(p) if not m.endswith("__main__")]
    modules += LIGHT_HOST_MODULES
    loaded = set(_loaded_after("\n".join(f"import {m}" for m in modules)))
    heavy = {"torch", "pybullet", "stable_baselines3", "litert_torch", "ai_edge_quantizer"} & loaded
    assert not heavy, f"{sorted(heavy)} imported by {modules}"
