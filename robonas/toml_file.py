"""Read one TOML file the user named (a device profile, a fleet file): a missing or malformed
file is one ConfigError line naming it, never a traceback."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from robonas.errors import ConfigError


def read_toml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The parsed table of `path`; `what` names the file in errors ("fleet", "device profile")."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as e:
        raise ConfigError(f"{what} file {str(p)!r} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
