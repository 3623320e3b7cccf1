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
    except IsADirectoryError as e:
        raise ConfigError(f"{what} file {str(p)!r} is a directory; pass a TOML file") from e
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        raise ConfigError(
            f"{what} file {str(p)!r} is not UTF-8 text (byte 0x{bad} at offset {e.start}); TOML must be UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"{what} file {str(p)!r} cannot be read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
