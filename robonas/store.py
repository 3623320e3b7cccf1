"""The run store: every study, trial, curve point, artifact, device, deployment, device report and
calibrated model version, as rows in a SQL database.

Leans on SQLAlchemy 2.x (typed declarative ORM) so the same code runs on the default SQLite file
and on a shared PostgreSQL URL. One `Store` per process; each public method is one short
transaction and returns plain frozen dataclasses, never ORM objects that outlive their session.

SQLite is made safe for several worker processes writing at once by hand, following the recipe in
SQLAlchemy's SQLite dialect docs ("Enabling Non-Legacy SQLite Transactional Modes"): WAL journal
(readers never block the writer), a 30 s busy_timeout (writers queue instead of failing), and
write transactions opened with `BEGIN IMMEDIATE`, because a deferred transaction that reads and
then writes can fail with "database is locked" without ever waiting on the busy handler.

Several search processes may work one study (robonas.search.loop): a trial is *claimed* by one
worker with a lease (`claim_trial`, `renew_leases`) that the worker renews while it trains; a
claim whose lease ran out is taken over, a live one never is. A finished trial is written only
by the worker that holds its claim, and numbered events (asks, tells) only in order
(`ordered=True`): so a worker that lost its claim or its study lock cannot write over another's.
`study_lock` serialises the asks and tells of one study across processes and machines.

On PostgreSQL every public method waits out a dropped connection (a server restart, a network
blip) for up to `RECONNECT_S`, then fails with StoreUnavailable; SQLite is a local file and
fails at once.

The schema carries a version in the `meta` table. A store of an older version this module knows how
to bring forward is migrated in place (`_MIGRATIONS`, additive steps only, one write transaction);
any other version is refused with StoreError.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast, overload

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from robonas.errors import ClaimLost, EventOrderConflict, RobonasError, StoreError, StoreUnavailable
from robonas.metrics import TrialMetrics
from robonas.space import PolicyArch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
# Every table's name starts with this, so Optuna's storage (tables `studies`, `trials`, ...) or
# another application can share the database.
TABLE_PREFIX = "robonas_"
_TABLES = (
    "meta",
    "studies",
    "trials",
    "curve_points",
    "artifacts",
    "devices",
    "deployments",
    "device_reports",
    "model_versions",
)
# Tables added after version 1, by the version that added them: a migration creates them.
_NEW_TABLES = {5: ("rollouts", "rollout_robots")}
DEFAULT_URL = "sqlite:///runs/robonas.db"
TRIAL_STATUSES = ("pending", "running", "complete", "failed", "rejected", "pruned")
# Why a trial exists: a strategy asked for it, or the seed check trains a candidate again.
TRIAL_ORIGINS = ("ask", "seed")
# Schema steps from version N to N+1, as SQL that PostgreSQL and SQLite both accept.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE trials ADD COLUMN origin VARCHAR(16) NOT NULL DEFAULT 'ask'",),
    2: tuple(f"ALTER TABLE {name} RENAME TO {TABLE_PREFIX}{name}" for name in _TABLES),
    3: (
        f"ALTER TABLE {TABLE_PREFIX}trials ADD COLUMN worker VARCHAR(200)",
        f"ALTER TABLE {TABLE_PREFIX}trials ADD COLUMN lease_until FLOAT",
    ),
    4: (),  # new tables only (_NEW_TABLES)
}
# Foreign-key targets.
_STUDY_ID, _TRIAL_ID, _ARTIFACT_ID = (TABLE_PREFIX + t + ".id" for t in ("studies", "trials", "artifacts"))
# Before version 3 the version lived in `meta`, since in `robonas_meta`.
_PREFIXED_SINCE = 3
STUDY_STATUSES = ("created", "running", "interrupted", "complete", "failed")
# A rollout (robonas.fleet.rollouts) and each of its robots.
ROLLOUT_STATUSES = ("running", "paused", "aborted", "complete", "incomplete")
ROLLOUT_ROBOT_STATES = ("pending", "sending", "updated", "failed", "offline", "rolled-back", "skipped")
REPORT_KINDS = ("run", "bench", "canary")
MODEL_KINDS = ("latency", "gap", "twin")
# The PostgreSQL advisory lock that serialises schema creation and migration ("robonas" in ASCII).
_SCHEMA_LOCK_KEY = 0x726F626F6E6173
# The first key of the per-study advisory locks ("robo"); the second is the study id.
_STUDY_LOCK_SPACE = 0x726F626F
# Milliseconds a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Seconds a method waits for a dropped PostgreSQL connection to come back before giving up.
RECONNECT_S = 90.0


def default_store_url() -> str:
    """The store URL: env ROBONAS_STORE, else a SQLite file under ./runs/."""
    return os.environ.get("ROBONAS_STORE") or DEFAULT_URL


def _now() -> datetime:
    return datetime.now(UTC)


@overload
def _utc(t: datetime) -> datetime: ...
@overload
def _utc(t: None) -> None: ...
def _utc(t: datetime | None) -> datetime | None:
    # SQLite drops the zone on the way back; PostgreSQL returns the session's zone. Every time
    # we write is UTC, and every time we hand out is in datetime.UTC.
    if t is None:
        return t
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


def _rowcount(s: Session, statement: Any) -> int:
    """Rows an UPDATE changed (execute() is typed as a plain Result; an UPDATE's is a cursor's)."""
    return cast(CursorResult[Any], s.execute(statement)).rowcount


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise StoreError(f"{what}: {value!r} is not one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- ORM tables


class _Base(DeclarativeBase):
    pass


class _Meta(_Base):
    __tablename__ = TABLE_PREFIX + "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class _Study(_Base):
    __tablename__ = TABLE_PREFIX + "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(32))


class _Trial(_Base):
    __tablename__ = TABLE_PREFIX + "trials"
    __table_args__ = (
        UniqueConstraint("study_id", "seq", name=TABLE_PREFIX + "uq_trial_seq"),
        # NULLs never collide, so only told trials are held to a unique order.
        UniqueConstraint("study_id", "tell_seq", name=TABLE_PREFIX + "uq_trial_tell_seq"),
        Index(TABLE_PREFIX + "ix_trials_study_status", "study_id", "status"),
        Index(TABLE_PREFIX + "ix_trials_arch", "study_id", "arch_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey(_STUDY_ID, ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    arch_id: Mapped[str] = mapped_column(String(128))
    arch_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(16), default="ask", server_default="ask")
    error: Mapped[str | None] = mapped_column(Text)
    metrics_json: Mapped[str | None] = mapped_column(Text)
    tell_seq: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wall_s: Mapped[float | None] = mapped_column(Float)
    env_steps: Mapped[int | None] = mapped_column(Integer)
    # who holds (or last held) the trial, and until when (epoch seconds) the claim is theirs
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[float | None] = mapped_column(Float)


class _CurvePoint(_Base):
    __tablename__ = TABLE_PREFIX + "curve_points"
    trial_id: Mapped[int] = mapped_column(ForeignKey(_TRIAL_ID, ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    mean_return: Mapped[float] = mapped_column(Float)
    std_return: Mapped[float] = mapped_column(Float)


class _Artifact(_Base):
    __tablename__ = TABLE_PREFIX + "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey(_TRIAL_ID, ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    meta_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Device(_Base):
    __tablename__ = TABLE_PREFIX + "devices"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    profile: Mapped[str] = mapped_column(String(200))
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _Deployment(_Base):
    __tablename__ = TABLE_PREFIX + "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey(_ARTIFACT_ID), index=True)
    # Device names are not foreign keys: a report may arrive from a robot not yet registered.
    device: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(32))
    detail_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _DeviceReport(_Base):
    __tablename__ = TABLE_PREFIX + "device_reports"
    __table_args__ = (Index(TABLE_PREFIX + "ix_reports_device_kind", "device", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(200))
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey(_ARTIFACT_ID), index=True)
    trial_id: Mapped[int | None] = mapped_column(ForeignKey(_TRIAL_ID), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    payload_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _ModelVersion(_Base):
    __tablename__ = TABLE_PREFIX + "model_versions"
    __table_args__ = (Index(TABLE_PREFIX + "ix_model_scope", "kind", "device", "study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(200))
    study_id: Mapped[int | None] = mapped_column(ForeignKey(_STUDY_ID))
    version: Mapped[int] = mapped_column(Integer)
    params_json: Mapped[str] = mapped_column(Text)
    metrics_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Rollout(_Base):
    __tablename__ = TABLE_PREFIX + "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    fleet: Mapped[str] = mapped_column(Text)
    plan_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    report_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _RolloutRobot(_Base):
    __tablename__ = TABLE_PREFIX + "rollout_robots"
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey(TABLE_PREFIX + "rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    phase: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    detail_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# ----------------------------------------------------------------------------- plain rows


@dataclass(frozen=True)
class StudyRow:
    id: int
    name: str
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    status: str


@dataclass(frozen=True)
class TrialRow:
    id: int
    study_id: int
    seq: int
    arch_id: str
    arch: PolicyArch
    status: str
    error: str | None
    metrics: TrialMetrics | None
    tell_seq: int | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    wall_s: float | None
    env_steps: int | None
    origin: str = "ask"
    worker: str | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class ArtifactRow:
    id: int
    trial_id: int
    kind: str
    path: str
    sha256: str
    meta: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class DeviceRow:
    name: str
    profile: str
    last_seen: datetime | None


@dataclass(frozen=True)
class DeploymentRow:
    id: int
    artifact_id: int
    device: str
    status: str
    detail: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class DeviceReportRow:
    id: int
    device: str
    artifact_id: int | None
    trial_id: int | None
    kind: str
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ModelVersionRow:
    id: int
    kind: str
    device: str | None
    study_id: int | None
    version: int
    params: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class RolloutRow:
    id: int
    artifact: str
    sha256: str
    fleet: str
    plan: dict[str, Any]
    status: str
    report: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RolloutRobotRow:
    rollout_id: int
    name: str
    phase: int
    position: int
    state: str
    attempts: int
    detail: dict[str, Any]
    updated_at: datetime


def _rollout_row(r: _Rollout) -> RolloutRow:
    return RolloutRow(
        r.id,
        r.artifact,
        r.sha256,
        r.fleet,
        _loads(r.plan_json),
        r.status,
        _loads(r.report_json),
        _utc(r.created_at),
        _utc(r.updated_at),
    )


def _rollout_robot_row(r: _RolloutRobot) -> RolloutRobotRow:
    return RolloutRobotRow(
        r.rollout_id,
        r.name,
        r.phase,
        r.position,
        r.state,
        r.attempts,
        _loads(r.detail_json),
        _utc(r.updated_at),
    )


def _study_row(s: _Study) -> StudyRow:
    return StudyRow(s.id, s.name, _loads(s.config_json), _utc(s.created_at), _utc(s.updated_at), s.status)


def _arch(t: _Trial) -> PolicyArch:
    try:
        return PolicyArch.from_json(t.arch_json)
    except (ValueError, TypeError, KeyError, RobonasError) as e:
        raise StoreError(f"trial {t.id}: stored architecture is not a PolicyArch: {e}") from e


def _trial_row(t: _Trial) -> TrialRow:
    return TrialRow(
        id=t.id,
        study_id=t.study_id,
        seq=t.seq,
        arch_id=t.arch_id,
        arch=_arch(t),
        status=t.status,
        error=t.error,
        metrics=None if t.metrics_json is None else TrialMetrics.from_dict(_loads(t.metrics_json)),
        tell_seq=t.tell_seq,
        attempts=t.attempts,
        started_at=_utc(t.started_at),
        finished_at=_utc(t.finished_at),
        wall_s=t.wall_s,
        env_steps=t.env_steps,
        origin=t.origin,
        worker=t.worker,
        lease_until=t.lease_until,
    )


def _artifact_row(a: _Artifact) -> ArtifactRow:
    return ArtifactRow(a.id, a.trial_id, a.kind, a.path, a.sha256, _loads(a.meta_json), _utc(a.created_at))


def _device_row(d: _Device) -> DeviceRow:
    return DeviceRow(d.name, d.profile, _utc(d.last_seen))


def _deployment_row(d: _Deployment) -> DeploymentRow:
    return DeploymentRow(d.id, d.artifact_id, d.device, d.status, _loads(d.detail_json), _utc(d.created_at))


def _report_row(r: _DeviceReport) -> DeviceReportRow:
    return DeviceReportRow(
        r.id, r.device, r.artifact_id, r.trial_id, r.kind, _loads(r.payload_json), _utc(r.created_at)
    )


def _model_row(m: _ModelVersion) -> ModelVersionRow:
    return ModelVersionRow(
        m.id,
        m.kind,
        m.device,
        m.study_id,
        m.version,
        _loads(m.params_json),
        _loads(m.metrics_json),
        _utc(m.created_at),
    )


# ----------------------------------------------------------------------------- engine


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(
            f"store URL {url!r} is not a database URL (e.g. {DEFAULT_URL} or postgresql+psycopg://host/db)"
        ) from e
    if parsed.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as e:
            extra = " (pip install 'robonas[postgres]')" if (e.name or "").startswith("psycopg") else ""
            raise StoreError(f"store URL {url!r} needs the {e.name} driver{extra}") from e

    db = parsed.database
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver so `_on_begin` decides its kind.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # busy_timeout first: switching to WAL itself needs the lock on a fresh file.
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("robonas_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


# ----------------------------------------------------------------------------- the store

_F = TypeVar("_F", bound=Any)
_T = TypeVar("_T")


def _reconnecting(method: _F) -> _F:
    """Run a store method again while its server is unreachable, for up to RECONNECT_S.

    Each method is one transaction, so re-running it after a failed one is safe: a failed
    transaction was rolled back. (A commit whose acknowledgement was lost is the exception; the
    ordered and claimed writes refuse to apply twice.)"""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.reconnect_s
        pause = 0.25
        while True:
            try:
                return method(self, *args, **kwargs)
            except StoreUnavailable as e:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("%s; retrying for up to %.0f s more", e, deadline - time.monotonic())
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    return cast(_F, wrapper)


def _reconnecting_methods(cls: type[_T]) -> type[_T]:
    """Every public method of the class waits out a dropped connection (see `_reconnecting`)."""
    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_") and name not in ("close", "study_lock"):
            setattr(cls, name, _reconnecting(value))
    return cls


@_reconnecting_methods
class Store:
    """One handle on the run database; create one per process (it owns a connection pool)."""

    def __init__(
        self, url: str | None = None, reconnect_s: float = RECONNECT_S, wait_to_open: bool = False
    ) -> None:
        """`wait_to_open`: wait out an unreachable server when opening too (a trial's worker
        does; a command a person typed fails at once, so a wrong URL is not a long wait)."""
        self.url = url or default_store_url()
        self.reconnect_s = reconnect_s
        self._thread_lock = threading.Lock()
        self._engine = _make_engine(self.url)
        # Same pool; the option only tells `_on_begin` to take the write lock up front.
        self._write_engine = self._engine.execution_options(robonas_write=True)
        (_reconnecting(Store._init_schema) if wait_to_open else Store._init_schema)(self)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- sessions and schema

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any error."""
        try:
            with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError as e:
            raise StoreError(f"store refused the write: {e.orig}") from e
        except DBAPIError as e:
            raise self._failure(e) from e

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with Session(self._engine) as s, s.begin():
                yield s
        except DBAPIError as e:
            raise self._failure(e) from e

    def _failure(self, e: DBAPIError) -> StoreError:
        """A server that dropped or refused the connection is worth waiting for (`_reconnecting`);
        anything else, and any SQLite error, is not."""
        text = f"store {self.url} failed: {str(e.orig).strip()}"
        dropped = e.connection_invalidated or isinstance(e, OperationalError | InterfaceError)
        if self._engine.dialect.name != "sqlite" and dropped:
            return StoreUnavailable(text)
        return StoreError(text)

    def _init_schema(self) -> None:
        # One write transaction, so processes opening a new store together create it once.
        # (SQLite DDL is transactional; on PostgreSQL create_all checks first.)
        with self._write() as s:
            conn = s.connection()
            if conn.dialect.name == "postgresql":
                # PostgreSQL's DDL is transactional too, but two processes can both see no tables
                # and both create them: a transaction-scoped advisory lock makes them take turns.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY})")
            tables = set(inspect(conn).get_table_names())
            meta = next((m for m in (_Meta.__tablename__, "meta") if m in tables), None)
            if meta is not None:
                self._migrate(conn, meta)
                return
            if tables & set(_Base.metadata.tables):
                raise StoreError(
                    f"store {self.url} has robonas tables but no schema version; "
                    f"refusing to guess its layout, use a new store URL"
                )
            _Base.metadata.create_all(conn)
            s.add(_Meta(key="schema_version", value=str(SCHEMA_VERSION)))

    def _migrate(self, conn: Any, meta: str) -> None:
        """Bring a store of an older known version forward, in the caller's transaction."""
        query = f"SELECT value FROM {meta} WHERE key = 'schema_version'"
        found = conn.exec_driver_sql(query).scalar()
        version = int(found) if found is not None and str(found).isdigit() else -1
        start = version
        while version in _MIGRATIONS and version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                conn.exec_driver_sql(statement)
            version += 1
            for name in _NEW_TABLES.get(version, ()):
                _Base.metadata.tables[TABLE_PREFIX + name].create(conn, checkfirst=True)
        if version != start:
            table = _Meta.__tablename__ if version >= _PREFIXED_SINCE else "meta"
            conn.exec_driver_sql(f"UPDATE {table} SET value = '{version}' WHERE key = 'schema_version'")
        if version != SCHEMA_VERSION:
            got = "none" if found is None else found
            raise StoreError(
                f"store {self.url} has schema version {got}, this robonas needs "
                f"{SCHEMA_VERSION}; use a new store URL (no automatic migration)"
            )

    @contextmanager
    def study_lock(self, study_id: int) -> Iterator[None]:
        """Hold the study's lock, which every process working the study takes to ask or tell.

        PostgreSQL: a session advisory lock on a connection of its own (the server drops it with
        the connection, so a killed holder never leaves it behind). A SQLite file: an flock on a
        file beside the database (the kernel drops it with the process). In-memory SQLite has
        one process only: a thread lock."""
        if self._engine.dialect.name == "postgresql":
            with self._advisory_lock(study_id):
                yield
            return
        db = make_url(self.url).database
        if not db or db == ":memory:" or db.startswith("file:"):
            with self._thread_lock:
                yield
            return
        import fcntl

        path = Path(db).resolve().parent / f"{Path(db).name}.study-{study_id}.lock"
        with open(path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def _advisory_lock(self, study_id: int) -> Iterator[None]:
        deadline = time.monotonic() + self.reconnect_s
        while True:
            conn = None
            try:
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({_STUDY_LOCK_SPACE}, {int(study_id)})")
                break
            except DBAPIError as e:
                if conn is not None:
                    with contextlib.suppress(DBAPIError):
                        conn.close()
                if not isinstance(self._failure(e), StoreUnavailable) or time.monotonic() > deadline:
                    raise self._failure(e) from e
                time.sleep(1.0)
        try:
            yield
        finally:
            try:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_STUDY_LOCK_SPACE}, {int(study_id)})")
            except DBAPIError:
                pass  # the connection is gone, and the lock with it
            finally:
                conn.close()

    def schema_version(self) -> int:
        with self._read() as s:
            row = s.get(_Meta, "schema_version")
            return int(row.value) if row else 0

    # --------------------------------------------------------------- studies

    def create_study(self, name: str, config: dict[str, Any], status: str = "created") -> StudyRow:
        _check_choice("study status", status, STUDY_STATUSES)
        if not name:
            raise StoreError("study name: empty; give a non-empty name")
        now = _now()
        with self._write() as s:
            if s.scalar(select(_Study.id).where(_Study.name == name)) is not None:
                raise StoreError(f"study {name!r} already exists; pick another name or resume it")
            study = _Study(
                name=name, config_json=_dumps(config), created_at=now, updated_at=now, status=status
            )
            s.add(study)
            s.flush()
            return _study_row(study)

    def get_study(self, name: str) -> StudyRow:
        with self._read() as s:
            study = s.scalar(select(_Study).where(_Study.name == name))
            if study is None:
                known = s.scalars(select(_Study.name).order_by(_Study.name)).all()
                raise StoreError(f"unknown study {name!r}; known studies: {', '.join(known) or '(none)'}")
            return _study_row(study)

    def get_study_by_id(self, study_id: int) -> StudyRow:
        with self._read() as s:
            study = s.get(_Study, study_id)
            if study is None:
                raise StoreError(f"unknown study id {study_id}")
            return _study_row(study)

    def list_studies(self) -> list[StudyRow]:
        with self._read() as s:
            return [_study_row(x) for x in s.scalars(select(_Study).order_by(_Study.id))]

    def set_study_status(self, study_id: int, status: str) -> None:
        _check_choice("study status", status, STUDY_STATUSES)
        with self._write() as s:
            n = _rowcount(
                s, update(_Study).where(_Study.id == study_id).values(status=status, updated_at=_now())
            )
            if n == 0:
                raise StoreError(f"unknown study id {study_id}")

    def update_study_config(self, study_id: int, config: dict[str, Any]) -> None:
        """Replace a study's config (e.g. to record values resolved on the first run)."""
        with self._write() as s:
            n = _rowcount(
                s,
                update(_Study)
                .where(_Study.id == study_id)
                .values(config_json=_dumps(config), updated_at=_now()),
            )
            if n == 0:
                raise StoreError(f"unknown study id {study_id}")

    # --------------------------------------------------------------- trials

    @staticmethod
    def _touch(s: Session, study_id: int) -> None:
        s.execute(update(_Study).where(_Study.id == study_id).values(updated_at=_now()))

    @staticmethod
    def _trial(s: Session, trial_id: int) -> _Trial:
        t = s.get(_Trial, trial_id)
        if t is None:
            raise StoreError(f"unknown trial id {trial_id}")
        return t

    def add_trial(
        self,
        study_id: int,
        seq: int,
        arch: PolicyArch,
        status: str = "pending",
        origin: str = "ask",
        *,
        ordered: bool = False,
        worker: str | None = None,
        lease_s: float | None = None,
        error: str | None = None,
        metrics: TrialMetrics | None = None,
    ) -> TrialRow:
        """Add a trial numbered `seq` in the study's event order. With `ordered`, `seq` must be the
        study's next event (EventOrderConflict otherwise). With `worker`, the trial is added
        `running` and claimed by it for `lease_s` seconds; `error`/`metrics` go with a trial
        added already finished (e.g. `rejected`)."""
        _check_choice("trial status", status, TRIAL_STATUSES)
        _check_choice("trial origin", origin, TRIAL_ORIGINS)
        if worker is not None and (status != "running" or lease_s is None):
            raise StoreError("a trial added with a worker is added running, with a lease")
        with self._write() as s:
            if s.get(_Study, study_id) is None:
                raise StoreError(f"unknown study id {study_id}")
            if ordered:
                self._check_next_event(s, study_id, seq)
            now = _now()
            t = _Trial(
                study_id=study_id,
                seq=seq,
                arch_id=arch.arch_id,
                arch_json=arch.to_json(),
                status=status,
                origin=origin,
                attempts=0,
                started_at=now if status == "running" else None,
                finished_at=now if status in ("complete", "failed", "rejected", "pruned") else None,
                worker=worker,
                lease_until=None if lease_s is None else time.time() + lease_s,
                error=error,
                metrics_json=None if metrics is None else _dumps(metrics.to_dict()),
            )
            s.add(t)
            self._touch(s, study_id)
            s.flush()
            return _trial_row(t)

    @staticmethod
    def _next_event_in(s: Session, study_id: int) -> int:
        seq = s.scalar(select(func.max(_Trial.seq)).where(_Trial.study_id == study_id))
        tell = s.scalar(select(func.max(_Trial.tell_seq)).where(_Trial.study_id == study_id))
        return max(-1 if seq is None else seq, -1 if tell is None else tell) + 1

    def _check_next_event(self, s: Session, study_id: int, event: int) -> None:
        # The study's row lock makes the check and the write one step on PostgreSQL (SQLite's
        # write transactions are serialised already).
        s.execute(select(_Study.id).where(_Study.id == study_id).with_for_update())
        expected = self._next_event_in(s, study_id)
        if event != expected:
            raise EventOrderConflict(
                f"study {study_id}: event {event} is not the next one ({expected}); "
                "another process wrote first"
            )

    def next_event(self, study_id: int) -> int:
        """The number of the study's next event (asks and tells share one counter; 0 when empty)."""
        with self._read() as s:
            return self._next_event_in(s, study_id)

    def next_seq(self, study_id: int) -> int:
        """The seq the next asked trial of this study should get (0 for an empty study)."""
        with self._read() as s:
            top = s.scalar(select(func.max(_Trial.seq)).where(_Trial.study_id == study_id))
            return 0 if top is None else top + 1

    def set_trial_status(self, trial_id: int, status: str, error: str | None = None) -> None:
        _check_choice("trial status", status, TRIAL_STATUSES)
        with self._write() as s:
            t = self._trial(s, trial_id)
            t.status = status
            t.error = error
            if status == "running":
                t.started_at = _now()
                t.finished_at = None
            elif status in ("complete", "failed", "rejected", "pruned"):
                t.finished_at = _now()
            self._touch(s, t.study_id)

    def complete_trial(
        self,
        trial_id: int,
        metrics: TrialMetrics,
        curve: Sequence[tuple[int, float, float]],
        wall_s: float,
        env_steps: int,
        status: str = "complete",
        *,
        worker: str | None = None,
        tell_seq: int | None = None,
    ) -> None:
        """Mark a trial complete (or `pruned`: stopped early, with the curve it reached) with its
        metrics and learning curve, in one transaction. With `worker`, only while that worker
        holds the trial's claim (ClaimLost otherwise); with `tell_seq`, the tell is recorded in
        the same transaction, as the study's next event."""
        _check_choice("finished trial status", status, ("complete", "pruned"))
        points = []
        for p in curve:
            if len(p) != 3:
                raise StoreError(f"curve point {p!r} is not (step, mean_return, std_return)")
            points.append((int(p[0]), float(p[1]), float(p[2])))
        with self._write() as s:
            t = self._held_trial(s, trial_id, worker)
            if tell_seq is not None:
                self._check_next_event(s, t.study_id, tell_seq)
                t.tell_seq = tell_seq
            # A re-run trial replaces whatever curve an interrupted attempt left behind.
            s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id == trial_id))
            s.add_all(
                _CurvePoint(trial_id=trial_id, step=st, mean_return=m, std_return=sd) for st, m, sd in points
            )
            t.status = status
            t.error = None
            t.metrics_json = _dumps(metrics.to_dict())
            t.wall_s = float(wall_s)
            t.env_steps = int(env_steps)
            t.finished_at = _now()
            t.lease_until = None
            self._touch(s, t.study_id)

    def fail_trial(
        self,
        trial_id: int,
        error: str,
        wall_s: float | None = None,
        *,
        worker: str | None = None,
        tell_seq: int | None = None,
    ) -> None:
        """Mark a trial failed; `worker` and `tell_seq` as for `complete_trial`."""
        with self._write() as s:
            t = self._held_trial(s, trial_id, worker)
            if tell_seq is not None:
                self._check_next_event(s, t.study_id, tell_seq)
                t.tell_seq = tell_seq
            t.status, t.error, t.finished_at, t.lease_until = "failed", error, _now(), None
            if wall_s is not None:
                t.wall_s = float(wall_s)
            self._touch(s, t.study_id)

    def _held_trial(self, s: Session, trial_id: int, worker: str | None) -> _Trial:
        """The trial, locked for this write; with `worker`, only while that worker holds it."""
        t = s.scalar(select(_Trial).where(_Trial.id == trial_id).with_for_update())
        if t is None:
            raise StoreError(f"unknown trial id {trial_id}")
        if worker is not None and (t.worker != worker or t.status != "running"):
            raise ClaimLost(
                f"trial {trial_id} is no longer held by {worker} (now {t.status}"
                f"{', held by ' + t.worker if t.worker and t.status == 'running' else ''}); result dropped"
            )
        return t

    def reject_trial(self, trial_id: int, reason: str, metrics: TrialMetrics | None = None) -> None:
        """A candidate refused before training (e.g. predicted latency over budget)."""
        with self._write() as s:
            t = self._trial(s, trial_id)
            t.status, t.error, t.finished_at = "rejected", reason, _now()
            if metrics is not None:
                t.metrics_json = _dumps(metrics.to_dict())
            self._touch(s, t.study_id)

    def update_trial_metrics(self, trial_id: int, metrics: TrialMetrics) -> None:
        """Replace a finished trial's metrics (re-scoring after a model recalibration)."""
        with self._write() as s:
            t = self._trial(s, trial_id)
            t.metrics_json = _dumps(metrics.to_dict())
            self._touch(s, t.study_id)

    def record_tell(self, trial_id: int, tell_seq: int, *, ordered: bool = False) -> None:
        """Record that the strategy was told the trial's result, as event `tell_seq` (with
        `ordered`: only as the study's next event)."""
        with self._write() as s:
            t = self._trial(s, trial_id)
            if ordered:
                if t.tell_seq is not None:
                    raise EventOrderConflict(f"trial {trial_id} was told already (event {t.tell_seq})")
                self._check_next_event(s, t.study_id, tell_seq)
            t.tell_seq = tell_seq

    def trials(self, study_id: int, status: str | None = None) -> list[TrialRow]:
        """Trials of a study in ask order, optionally only those with one status."""
        q = select(_Trial).where(_Trial.study_id == study_id).order_by(_Trial.seq)
        if status is not None:
            _check_choice("trial status", status, TRIAL_STATUSES)
            q = q.where(_Trial.status == status)
        with self._read() as s:
            return [_trial_row(t) for t in s.scalars(q)]

    def get_trial(self, trial_id: int) -> TrialRow:
        with self._read() as s:
            return _trial_row(self._trial(s, trial_id))

    def curve(self, trial_id: int) -> list[tuple[int, float, float]]:
        q = (
            select(_CurvePoint.step, _CurvePoint.mean_return, _CurvePoint.std_return)
            .where(_CurvePoint.trial_id == trial_id)
            .order_by(_CurvePoint.step)
        )
        with self._read() as s:
            return [(int(a), float(b), float(c)) for a, b, c in s.execute(q)]

    def add_curve_point(self, trial_id: int, step: int, mean_return: float, std_return: float) -> None:
        """One evaluation of a running trial, written as it happens (what pruning compares)."""
        with self._write() as s:
            self._trial(s, trial_id)
            s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id == trial_id, _CurvePoint.step == step))
            s.add(
                _CurvePoint(trial_id=trial_id, step=int(step), mean_return=mean_return, std_return=std_return)
            )

    def curves(self, study_id: int) -> dict[int, list[tuple[int, float, float]]]:
        """Every trial's curve points so far (running trials included), by trial id."""
        q = (
            select(_CurvePoint.trial_id, _CurvePoint.step, _CurvePoint.mean_return, _CurvePoint.std_return)
            .join(_Trial, _Trial.id == _CurvePoint.trial_id)
            .where(_Trial.study_id == study_id)
            .order_by(_CurvePoint.trial_id, _CurvePoint.step)
        )
        out: dict[int, list[tuple[int, float, float]]] = {}
        with self._read() as s:
            for tid, step, mean, std in s.execute(q):
                out.setdefault(int(tid), []).append((int(step), float(mean), float(std)))
        return out

    def requeue_interrupted(self, study_id: int) -> int:
        """Put trials left `running` by a killed search back to `pending`; returns how many.
        The curve points their attempt wrote go too: the trial runs again from the start."""
        with self._write() as s:
            running = select(_Trial.id).where(_Trial.study_id == study_id, _Trial.status == "running")
            s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id.in_(running)))
            n = _rowcount(
                s,
                update(_Trial)
                .where(_Trial.study_id == study_id, _Trial.status == "running")
                .values(status="pending", attempts=_Trial.attempts + 1, started_at=None),
            )
            if n:
                self._touch(s, study_id)
            return n

    # --------------------------------------------------------------- claims

    def claim_trial(
        self,
        study_id: int,
        worker: str,
        lease_s: float,
        lost: Callable[[str], bool] | None = None,
    ) -> TrialRow | None:
        """Claim the study's first trial (in ask order) that nobody holds: `pending`, or `running`
        under a claim whose lease ran out (or whose holder `lost(holder)` says is gone). Taking a
        lapsed claim over counts an attempt and drops the curve the old attempt wrote. Returns
        the claimed trial, running and held by `worker` for `lease_s` s, or None."""
        now = time.time()
        with self._write() as s:
            q = (
                select(_Trial)
                .where(_Trial.study_id == study_id, _Trial.status.in_(("pending", "running")))
                .order_by(_Trial.seq)
                # PostgreSQL: skip rows another claimer is taking right now instead of queueing
                .with_for_update(skip_locked=True)
            )
            for t in s.scalars(q):
                lapsed = (
                    t.lease_until is None
                    or t.lease_until < now
                    or (t.worker is not None and lost and lost(t.worker))
                )
                if t.status == "running" and not lapsed:
                    continue
                if t.status == "running":
                    s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id == t.id))
                    t.attempts += 1
                    log.warning("trial %d: the claim of %s lapsed; running it again", t.id, t.worker)
                t.status, t.worker, t.lease_until = "running", worker, now + lease_s
                t.started_at, t.finished_at, t.error = _now(), None, None
                self._touch(s, study_id)
                s.flush()
                return _trial_row(t)
            return None

    def renew_leases(self, worker: str, trial_ids: Sequence[int], lease_s: float) -> set[int]:
        """Extend `worker`'s claims on `trial_ids`; returns the ids it still holds."""
        if not trial_ids:
            return set()
        with self._write() as s:
            held = _Trial.id.in_(list(trial_ids)), _Trial.worker == worker, _Trial.status == "running"
            s.execute(update(_Trial).where(*held).values(lease_until=time.time() + lease_s))
            return {int(i) for i in s.scalars(select(_Trial.id).where(*held))}

    def release_claims(self, study_id: int, worker: str) -> int:
        """Put the trials `worker` holds back to `pending` (a search stopped with Ctrl-C); the
        curve points their attempts wrote go too. Returns how many."""
        with self._write() as s:
            held = _Trial.study_id == study_id, _Trial.worker == worker, _Trial.status == "running"
            s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id.in_(select(_Trial.id).where(*held))))
            n = _rowcount(
                s,
                update(_Trial)
                .where(*held)
                .values(status="pending", attempts=_Trial.attempts + 1, started_at=None, lease_until=None),
            )
            if n:
                self._touch(s, study_id)
            return n

    def restart_attempt(self, trial_id: int, worker: str, lease_s: float) -> TrialRow:
        """A held trial whose process was lost starts again under the same claim: one more
        attempt, the old attempt's curve points dropped (ClaimLost if `worker` lost the claim)."""
        with self._write() as s:
            t = self._held_trial(s, trial_id, worker)
            s.execute(delete(_CurvePoint).where(_CurvePoint.trial_id == trial_id))
            t.attempts += 1
            t.lease_until = time.time() + lease_s
            t.started_at = _now()
            s.flush()
            return _trial_row(t)

    # --------------------------------------------------------------- artifacts

    def add_artifact(
        self,
        trial_id: int,
        kind: str,
        path: str | os.PathLike[str],
        sha256: str,
        meta: dict[str, Any] | None = None,
    ) -> ArtifactRow:
        """Record a file made from a trial; kind e.g. `weights`, `tflite-int8`, `tflite-fp32`."""
        if not kind:
            raise StoreError("artifact kind: empty; e.g. weights, tflite-int8, tflite-fp32")
        with self._write() as s:
            self._trial(s, trial_id)
            a = _Artifact(
                trial_id=trial_id,
                kind=kind,
                path=os.fspath(path),
                sha256=sha256,
                meta_json=_dumps(meta or {}),
                created_at=_now(),
            )
            s.add(a)
            s.flush()
            return _artifact_row(a)

    def artifacts(self, trial_id: int, kind: str | None = None) -> list[ArtifactRow]:
        q = select(_Artifact).where(_Artifact.trial_id == trial_id).order_by(_Artifact.id)
        if kind is not None:
            q = q.where(_Artifact.kind == kind)
        with self._read() as s:
            return [_artifact_row(a) for a in s.scalars(q)]

    def get_artifact(self, artifact_id: int) -> ArtifactRow:
        with self._read() as s:
            a = s.get(_Artifact, artifact_id)
            if a is None:
                raise StoreError(f"unknown artifact id {artifact_id}")
            return _artifact_row(a)

    # --------------------------------------------------------------- devices and deployments

    def add_device(self, name: str, profile: str, last_seen: datetime | None = None) -> DeviceRow:
        """Register a device, or update its profile and last_seen if already known."""
        with self._write() as s:
            d = s.get(_Device, name)
            if d is None:
                d = _Device(name=name, profile=profile, last_seen=last_seen)
                s.add(d)
            else:
                d.profile = profile
                if last_seen is not None:
                    d.last_seen = last_seen
            s.flush()
            return _device_row(d)

    def touch_device(self, name: str, when: datetime | None = None) -> None:
        with self._write() as s:
            n = _rowcount(s, update(_Device).where(_Device.name == name).values(last_seen=when or _now()))
            if n == 0:
                raise StoreError(f"unknown device {name!r}; register it with add_device first")

    def devices(self) -> list[DeviceRow]:
        with self._read() as s:
            return [_device_row(d) for d in s.scalars(select(_Device).order_by(_Device.name))]

    def add_deployment(
        self, artifact_id: int, device: str, status: str, detail: dict[str, Any] | None = None
    ) -> DeploymentRow:
        with self._write() as s:
            d = _Deployment(
                artifact_id=artifact_id,
                device=device,
                status=status,
                detail_json=_dumps(detail or {}),
                created_at=_now(),
            )
            s.add(d)
            s.flush()
            return _deployment_row(d)

    def set_deployment_status(
        self, deployment_id: int, status: str, detail: dict[str, Any] | None = None
    ) -> None:
        values: dict[str, Any] = {"status": status}
        if detail is not None:
            values["detail_json"] = _dumps(detail)
        with self._write() as s:
            n = _rowcount(s, update(_Deployment).where(_Deployment.id == deployment_id).values(**values))
            if n == 0:
                raise StoreError(f"unknown deployment id {deployment_id}")

    def deployments(self, device: str | None = None, artifact_id: int | None = None) -> list[DeploymentRow]:
        q = select(_Deployment).order_by(_Deployment.id)
        if device is not None:
            q = q.where(_Deployment.device == device)
        if artifact_id is not None:
            q = q.where(_Deployment.artifact_id == artifact_id)
        with self._read() as s:
            return [_deployment_row(d) for d in s.scalars(q)]

    def add_device_report(
        self,
        device: str,
        kind: str,
        payload: dict[str, Any],
        artifact_id: int | None = None,
        trial_id: int | None = None,
    ) -> DeviceReportRow:
        _check_choice("device report kind", kind, REPORT_KINDS)
        with self._write() as s:
            r = _DeviceReport(
                device=device,
                kind=kind,
                payload_json=_dumps(payload),
                artifact_id=artifact_id,
                trial_id=trial_id,
                created_at=_now(),
            )
            s.add(r)
            s.flush()
            return _report_row(r)

    def device_reports(
        self, device: str | None = None, kind: str | None = None, artifact_id: int | None = None
    ) -> list[DeviceReportRow]:
        q = select(_DeviceReport).order_by(_DeviceReport.id)
        if device is not None:
            q = q.where(_DeviceReport.device == device)
        if kind is not None:
            _check_choice("device report kind", kind, REPORT_KINDS)
            q = q.where(_DeviceReport.kind == kind)
        if artifact_id is not None:
            q = q.where(_DeviceReport.artifact_id == artifact_id)
        with self._read() as s:
            return [_report_row(r) for r in s.scalars(q)]

    # --------------------------------------------------------------- calibrated models

    @staticmethod
    def _scope(q: Any, device: str | None, study_id: int | None) -> Any:
        # A model's scope is exact: device None means "the device-independent model".
        q = q.where(_ModelVersion.device.is_(None) if device is None else _ModelVersion.device == device)
        return q.where(
            _ModelVersion.study_id.is_(None) if study_id is None else _ModelVersion.study_id == study_id
        )

    def add_model_version(
        self,
        kind: str,
        params: dict[str, Any],
        metrics: dict[str, Any],
        device: str | None = None,
        study_id: int | None = None,
    ) -> ModelVersionRow:
        """Store a new fit; its version is one past the latest of the same (kind, device, study)."""
        _check_choice("model kind", kind, MODEL_KINDS)
        with self._write() as s:
            q = self._scope(
                select(func.max(_ModelVersion.version)).where(_ModelVersion.kind == kind), device, study_id
            )
            top = s.scalar(q)
            m = _ModelVersion(
                kind=kind,
                device=device,
                study_id=study_id,
                version=1 if top is None else top + 1,
                params_json=_dumps(params),
                metrics_json=_dumps(metrics),
                created_at=_now(),
            )
            s.add(m)
            s.flush()
            return _model_row(m)

    def model_versions(self, kind: str | None = None) -> list[ModelVersionRow]:
        q = select(_ModelVersion).order_by(_ModelVersion.id)
        if kind is not None:
            _check_choice("model kind", kind, MODEL_KINDS)
            q = q.where(_ModelVersion.kind == kind)
        with self._read() as s:
            return [_model_row(m) for m in s.scalars(q)]

    def latest_model_version(
        self, kind: str, device: str | None = None, study_id: int | None = None
    ) -> ModelVersionRow | None:
        _check_choice("model kind", kind, MODEL_KINDS)
        q = self._scope(select(_ModelVersion).where(_ModelVersion.kind == kind), device, study_id)
        q = q.order_by(_ModelVersion.version.desc()).limit(1)
        with self._read() as s:
            m = s.scalar(q)
            return None if m is None else _model_row(m)

    # --------------------------------------------------------------- rollouts

    def create_rollout(
        self, artifact: str, sha256: str, fleet: str, plan: dict[str, Any], robots: Sequence[tuple[str, int]]
    ) -> RolloutRow:
        """A rollout of `artifact` to `robots` ((name, phase) in the order they are updated)."""
        now = _now()
        with self._write() as s:
            r = _Rollout(
                artifact=artifact,
                sha256=sha256,
                fleet=fleet,
                plan_json=_dumps(plan),
                status="running",
                report_json=_dumps({}),
                created_at=now,
                updated_at=now,
            )
            s.add(r)
            s.flush()
            s.add_all(
                _RolloutRobot(
                    rollout_id=r.id,
                    name=name,
                    phase=phase,
                    position=i,
                    state="pending",
                    attempts=0,
                    detail_json=_dumps({}),
                    updated_at=now,
                )
                for i, (name, phase) in enumerate(robots)
            )
            return _rollout_row(r)

    def get_rollout(self, rollout_id: int) -> RolloutRow:
        with self._read() as s:
            r = s.get(_Rollout, rollout_id)
            if r is None:
                known = s.scalars(select(_Rollout.id).order_by(_Rollout.id)).all()
                raise StoreError(
                    f"unknown rollout {rollout_id}; rollouts: {', '.join(map(str, known)) or '(none)'}"
                )
            return _rollout_row(r)

    def rollouts(self) -> list[RolloutRow]:
        with self._read() as s:
            return [_rollout_row(r) for r in s.scalars(select(_Rollout).order_by(_Rollout.id))]

    def set_rollout_status(self, rollout_id: int, status: str, report: dict[str, Any] | None = None) -> None:
        _check_choice("rollout status", status, ROLLOUT_STATUSES)
        values: dict[str, Any] = {"status": status, "updated_at": _now()}
        if report is not None:
            values["report_json"] = _dumps(report)
        with self._write() as s:
            if _rowcount(s, update(_Rollout).where(_Rollout.id == rollout_id).values(**values)) == 0:
                raise StoreError(f"unknown rollout {rollout_id}")

    def rollout_robots(self, rollout_id: int) -> list[RolloutRobotRow]:
        q = (
            select(_RolloutRobot)
            .where(_RolloutRobot.rollout_id == rollout_id)
            .order_by(_RolloutRobot.position)
        )
        with self._read() as s:
            return [_rollout_robot_row(r) for r in s.scalars(q)]

    def set_rollout_robot(
        self,
        rollout_id: int,
        name: str,
        state: str,
        detail: dict[str, Any] | None = None,
        attempt: bool = False,
    ) -> None:
        """A robot's new state in a rollout; `detail` is merged into what is recorded, `attempt`
        counts one more transfer started."""
        _check_choice("rollout robot state", state, ROLLOUT_ROBOT_STATES)
        with self._write() as s:
            r = s.get(_RolloutRobot, (rollout_id, name))
            if r is None:
                raise StoreError(f"rollout {rollout_id} has no robot {name!r}")
            r.state = state
            if detail:
                r.detail_json = _dumps({**_loads(r.detail_json), **detail})
            if attempt:
                r.attempts += 1
            r.updated_at = _now()
            s.execute(update(_Rollout).where(_Rollout.id == rollout_id).values(updated_at=_now()))
