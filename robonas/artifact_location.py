"""Where a study's files (trial weights, exported artifacts) go, so that every worker can read them.

A SQLite store is one machine's file: its files go beside it, as they always have. A shared store
(PostgreSQL) is read from many machines, so an implicit `./runs` of whichever machine ran a trial
would point the others at files they cannot read: a shared store needs an artifact directory
named by `--artifacts`, `ROBONAS_ARTIFACTS` or the config's `[artifacts] dir`, mounted at the
same path on every machine (NFS, a cluster file system). A study records the directory it was
started with, so processes that join it later need not repeat it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from robonas.errors import ConfigError

if TYPE_CHECKING:
    from robonas.store import Store, StudyRow

ENV_VAR = "ROBONAS_ARTIFACTS"
_SQLITE = "sqlite:///"


def local_store_dir(store_url: str) -> Path | None:
    """The directory of a SQLite store's file; None for any other store (or in-memory SQLite)."""
    if store_url.startswith(_SQLITE) and store_url[len(_SQLITE) :] not in ("", ":memory:"):
        return Path(store_url[len(_SQLITE) :]).resolve().parent
    return None


def artifact_root(
    store_url: str, flag: str | None = None, config_dir: str | None = None, recorded: str | None = None
) -> Path:
    """The root of the artifact tree: the --artifacts flag, else ROBONAS_ARTIFACTS, else the
    config's [artifacts] dir, else what the study recorded, else beside a SQLite store; a shared
    store with none of these is a ConfigError."""
    chosen = flag or os.environ.get(ENV_VAR) or config_dir or recorded
    if chosen:
        if "://" in chosen:
            raise ConfigError(
                f"artifacts dir: {chosen!r} is a URL; name a directory every worker mounts "
                "(object-store URLs are not supported yet)"
            )
        return Path(chosen).expanduser().resolve()
    local = local_store_dir(store_url)
    if local is None:
        if store_url.startswith("sqlite"):
            return Path("runs").resolve()  # in-memory SQLite: one process, tests and demos
        raise ConfigError(
            f"store {_redacted(store_url)} is shared, so trial files need a directory every worker "
            f"can read: pass --artifacts DIR, set {ENV_VAR} or the config's [artifacts] dir"
        )
    return local


def study_artifact_root(store: Store, study: StudyRow) -> Path:
    """The root a study's files are under: its recorded directory (unless ROBONAS_ARTIFACTS
    names another, e.g. where this machine mounts the shared one)."""
    recorded = (study.config.get("resolved") or {}).get("artifact_dir")
    return artifact_root(store.url, recorded=recorded)


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (a message helper must not fail)
        return "(unparsable URL)"
