"""Device profiles: the shipped ones load, bad files and names give ConfigError that says why."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from robonas.errors import ConfigError
from robonas.models.devices import DEVICES_DIR_ENV, DeviceProfile, devices_dir, list_devices, load_device

SHIPPED = ["cortex-m7", "jetson-orin-nano-cpu", "rpi4", "x86-host"]

GOOD = """\
name = "{name}"
description = "test board"
arch = "aarch64"
compute_macs_per_s = 1.0e9
memory_bytes_per_s = 2.0e9
per_layer_overhead_us = 5.0
per_invoke_overhead_us = 50.0
p99_over_p50 = 1.5
sources = ["made up for a test"]
"""


@pytest.fixture
def tmp_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(DEVICES_DIR_ENV, str(tmp_path))
    return tmp_path


def test_shipped_profiles_all_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICES_DIR_ENV, raising=False)
    assert devices_dir() == Path(__file__).resolve().parents[3] / "launch" / "devices"
    assert set(SHIPPED) <= set(list_devices())
    for name in SHIPPED:
        prof = load_device(name)
        assert prof.name == name
        assert prof.compute_macs_per_s > 0 and prof.memory_bytes_per_s > 0
        assert prof.p99_over_p50 >= 1
        assert prof.sources and all(isinstance(s, str) for s in prof.sources)
        hash(prof)  # frozen and hashable


def test_profiles_are_ordered_sensibly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pi 4's A72 is the slowest of the three, the Xeon host the fastest at int8 MACs."""
    monkeypatch.delenv(DEVICES_DIR_ENV, raising=False)
    rpi, orin, host = (load_device(n) for n in ("rpi4", "jetson-orin-nano-cpu", "x86-host"))
    assert rpi.compute_macs_per_s < orin.compute_macs_per_s < host.compute_macs_per_s
    assert rpi.arch == orin.arch == "aarch64" and host.arch == "x86_64"


def test_unknown_name_lists_valid_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICES_DIR_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        load_device("rpi5")
    assert "rpi5" in str(e.value)
    for name in SHIPPED:
        assert name in str(e.value)


def test_env_var_overrides_directory_and_path_loading(tmp_devices: Path) -> None:
    (tmp_devices / "board.toml").write_text(GOOD.format(name="board"))
    assert list_devices() == ["board"]
    prof = load_device("board")
    assert prof == load_device(tmp_devices / "board.toml") == load_device(str(tmp_devices / "board.toml"))
    assert prof.sources == ("made up for a test",)
    assert DeviceProfile.from_mapping(prof.to_dict()) == prof


def _write(directory: Path, text: str) -> Path:
    path = directory / "board.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("replace", "by", "field"),
    [
        ("compute_macs_per_s = 1.0e9\n", "", "compute_macs_per_s"),  # missing
        ("compute_macs_per_s = 1.0e9", "compute_macs_per_s = 0", "compute_macs_per_s"),
        ("memory_bytes_per_s = 2.0e9", 'memory_bytes_per_s = "fast"', "memory_bytes_per_s"),
        ("per_layer_overhead_us = 5.0", "per_layer_overhead_us = -1.0", "per_layer_overhead_us"),
        ("p99_over_p50 = 1.5", "p99_over_p50 = 0.9", "p99_over_p50"),
        ("p99_over_p50 = 1.5", "p99_over_p50 = true", "p99_over_p50"),
        ('sources = ["made up for a test"]', "sources = []", "sources"),
        ('arch = "aarch64"', 'arch = ""', "arch"),
        ('arch = "aarch64"', 'arch = "aarch64"\nclock_ghz = 1.5', "clock_ghz"),  # unknown field
    ],
)
def test_bad_field_names_field_and_file(tmp_devices: Path, replace: str, by: str, field: str) -> None:
    text = GOOD.format(name="board")
    assert replace in text
    path = _write(tmp_devices, text.replace(replace, by))
    with pytest.raises(ConfigError) as e:
        load_device("board")
    assert field in str(e.value)
    assert str(path) in str(e.value)


def test_invalid_toml_and_mismatched_name(tmp_devices: Path) -> None:
    path = _write(tmp_devices, "name = [unterminated")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_device("board")
    assert str(path) in str(e.value)

    _write(tmp_devices, GOOD.format(name="other"))
    with pytest.raises(ConfigError, match="'name'"):
        load_device("board")


def test_missing_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_device(tmp_path / "nope.toml")


def test_shipped_files_carry_comments_for_each_figure() -> None:
    """Every numeric figure in a shipped profile is preceded by a comment (its citation)."""
    directory = Path(__file__).resolve().parents[3] / "launch" / "devices"
    for name in SHIPPED:
        lines = (directory / f"{name}.toml").read_text().splitlines()
        for i, line in enumerate(lines):
            key = line.split("=")[0].strip()
            if key in {"compute_macs_per_s", "memory_bytes_per_s", "p99_over_p50", "per_layer_overhead_us"}:
                assert lines[i - 1].startswith("#"), f"{name}: {key} has no comment above it"
        assert math.isfinite(load_device(directory / f"{name}.toml").compute_macs_per_s)
