"""Device profiles: the figures the latency model needs about one kind of robot computer.

A profile is data, not code (README.md, "Data, not code"): one TOML file per device in
`launch/devices/`, each figure commented with where it comes from. This module only finds,
parses (standard-library `tomllib`) and validates those files into a frozen `DeviceProfile`.
The figures are priors; the calibrated latency model refits them from what the agents report.

The directory is `<repo>/launch/devices`, or `$ROBONAS_DEVICES_DIR` when that is set (read at
each call, so a test or a deployment can point elsewhere without re-importing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from robonas.errors import ConfigError
from robonas.toml_file import read_toml

DEVICES_DIR_ENV = "ROBONAS_DEVICES_DIR"
_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "launch" / "devices"


@dataclass(frozen=True)
class DeviceProfile:
    """What one single-threaded int8 TFLite interpreter achieves on one kind of device.

    compute_macs_per_s:      int8 multiply-accumulates per second on the layers robonas builds
    memory_bytes_per_s:      bytes per second one core streams to and from memory
    per_layer_overhead_us:   fixed interpreter cost of running one op (dispatch, set-up)
    per_invoke_overhead_us:  fixed cost of one Invoke() including input and output copies
    p99_over_p50:            tail ratio of the inference time distribution (>= 1)
    sources:                 citations for the figures (title and URL)
    """

    name: str
    description: str
    arch: str
    compute_macs_per_s: float
    memory_bytes_per_s: float
    per_layer_overhead_us: float
    per_invoke_overhead_us: float
    p99_over_p50: float
    # A tuple, not a list, so the profile stays hashable.
    sources: tuple[str, ...]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> DeviceProfile:
        """Validate a parsed TOML table (or a store row); `origin` names it in error messages."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{origin}: unknown field(s) {unknown}; valid fields are {names}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"{origin}: missing field(s) {missing}")

        values: dict[str, Any] = {}
        for key in ("name", "description", "arch"):
            value = data[key]
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{origin}: field {key!r} must be a non-empty string, got {value!r}")
            values[key] = value
        for key in ("compute_macs_per_s", "memory_bytes_per_s"):
            values[key] = _number(data, key, origin, minimum=0.0, strict=True)
        for key in ("per_layer_overhead_us", "per_invoke_overhead_us"):
            values[key] = _number(data, key, origin, minimum=0.0, strict=False)
        values["p99_over_p50"] = _number(data, "p99_over_p50", origin, minimum=1.0, strict=False)

        sources = data["sources"]
        if (
            not isinstance(sources, (list, tuple))
            or not sources
            or not all(isinstance(s, str) and s.strip() for s in sources)
        ):
            raise ConfigError(
                f"{origin}: field 'sources' must be a non-empty list of citation strings, got {sources!r}"
            )
        values["sources"] = tuple(sources)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def _number(data: Mapping[str, Any], key: str, origin: str, *, minimum: float, strict: bool) -> float:
    value = data[key]
    # bool is an int subclass; `true` in a TOML file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{origin}: field {key!r} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"{origin}: field {key!r} must be {bound}, got {value!r}")
    return float(value)


def devices_dir() -> Path:
    """The directory profiles are read from: $ROBONAS_DEVICES_DIR or <repo>/launch/devices."""
    override = os.environ.get(DEVICES_DIR_ENV)
    return Path(override) if override else _DEFAULT_DIR


def list_devices() -> list[str]:
    """Names of the profiles in `devices_dir()`, sorted."""
    directory = devices_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_device_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """Parse and validate one profile file."""
    return DeviceProfile.from_mapping(read_toml(path, "device profile"), origin=str(Path(path)))


def load_device(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A profile by name (a file stem in `devices_dir()`) or by path to a `.toml` file."""
    text = os.fspath(name_or_path)
    looks_like_path = text.endswith(".toml") or os.sep in text or (os.altsep and os.altsep in text)
    if looks_like_path:
        return load_device_file(text)

    valid = list_devices()
    if text not in valid:
        raise ConfigError(f"unknown device {text!r}; valid devices are {valid} (profiles in {devices_dir()})")
    path = devices_dir() / f"{text}.toml"
    profile = load_device_file(path)
    if profile.name != text:
        # Otherwise load_device("rpi4") could silently hand back another device's figures.
        raise ConfigError(f"{path}: field 'name' is {profile.name!r} but the file is named {text!r}")
    return profile
