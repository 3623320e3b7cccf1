"""Config validation: every bad input is one clear line naming the field, exit 2, store untouched."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from robonas.config import load_config, parse_config
from robonas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CARTPOLE = REPO / "launch" / "cartpole.toml"


def _base() -> dict:
    return tomllib.loads(CARTPOLE.read_text())


@pytest.mark.parametrize("name", ["cartpole", "swingup", "hopper"])
def test_launch_configs_load_and_reference_real_things(name):
    cfg = load_config(REPO / "launch" / f"{name}.toml")
    cfg.validate_references()
    assert cfg.budget.trials > 0 and cfg.device.latency_budget_ms > 0


def test_fingerprint_ignores_trial_count_but_not_space():
    a = parse_config(_base())
    assert a.fingerprint() == a.with_overrides(trials=99).fingerprint()
    d = _base()
    d["space"]["widths"] = [8]
    assert parse_config(d).fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["env"].update(colour="red"), "env.colour"),
        (lambda d: d.update(extra={"a": 1}), "extra"),
        (lambda d: d["budget"].update(trials=0), "budget.trials"),
        (lambda d: d["budget"].pop("steps_per_trial"), "budget.steps_per_trial"),
        (lambda d: d["strategy"].update(name="annealing"), "strategy.name"),
        (lambda d: d["device"].update(latency_budget_ms=-1), "device.latency_budget_ms"),
    ],
)
def test_schema_errors_name_the_field(mutate, needle):
    d = _base()
    mutate(d)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(d)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["env"].update(id="sim/Unicycle-v9"), "sim/Unicycle-v9"),
        (lambda d: d["device"].update(profile="cray-1"), "cray-1"),
        (lambda d: d["robustness"].update(mass_scale=[1.2, 0.8]), "mass_scale"),
    ],
)
def test_reference_errors_name_the_value(mutate, needle):
    d = _base()
    mutate(d)
    with pytest.raises(ConfigError, match=needle):
        parse_config(d).validate_references()


def test_malformed_toml_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[env\nid = 3")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_config(p)


def _write(tmp_path: Path, d: dict) -> Path:
    lines = []

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    p = tmp_path / "c.toml"
    p.write_text("\n".join(lines))
    return p


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (None, "malformed TOML"),
        (lambda d: d["env"].update(unknown_key=1), "env.unknown_key"),
        (lambda d: d["space"].update(widths=[]), "space.widths"),
        (lambda d: d["space"].update(widths=[-4, 8]), "space.widths"),
        (lambda d: d["env"].update(id="sim/Nope-v0"), "sim/Nope-v0"),
        (lambda d: d["device"].update(profile="toaster"), "toaster"),
    ],
)
def test_cli_bad_config_exit_2_one_line_and_store_untouched(tmp_path, mutate, needle):
    if mutate is None:
        path = tmp_path / "c.toml"
        path.write_text("[env]\nid = 'sim/CartPole-v0\n")
    else:
        d = _base()
        mutate(d)
        path = _write(tmp_path, d)
    db = tmp_path / "store.db"
    proc = subprocess.run(
        [sys.executable, "-m", "robonas.cli", "search", str(path), "--store", f"sqlite:///{db}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the exit code is what is tested
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in proc.stderr
    assert not db.exists()
