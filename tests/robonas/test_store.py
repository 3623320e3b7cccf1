"""Tests of robonas.store: round trips, schema-version refusal, concurrent writers, requeue."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from robonas.errors import StoreError
from robonas.metrics import TrialMetrics
from robonas.space import Layer, PolicyArch
from robonas.store import SCHEMA_VERSION, Store, default_store_url

REPO = Path(__file__).resolve().parents[2]


def _arch(width: int = 8) -> PolicyArch:
    return PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width, "tanh"),))


@pytest.fixture
def store(url: str):
    s = Store(url)
    yield s
    s.close()


def test_default_url_env_and_relative_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBONAS_STORE", raising=False)
    assert default_store_url() == "sqlite:///runs/robonas.db"
    monkeypatch.chdir(tmp_path)
    Store().close()
    assert (tmp_path / "runs" / "robonas.db").exists()
    monkeypatch.setenv("ROBONAS_STORE", "sqlite:///elsewhere.db")
    assert default_store_url() == "sqlite:///elsewhere.db"


def test_sqlite_pragmas(sqlite_url):
    store = Store(sqlite_url)
    with store._engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert store.schema_version() == SCHEMA_VERSION


def test_study_round_trip_and_unknown_name(store):
    a = store.create_study("alpha", {"env": "sim/Hopper-v0", "budget": {"trials": 3}})
    store.create_study("beta", {})
    got = store.get_study("alpha")
    assert got == a
    assert got.config == {"env": "sim/Hopper-v0", "budget": {"trials": 3}}
    assert got.status == "created" and got.created_at.tzinfo == UTC
    assert [s.name for s in store.list_studies()] == ["alpha", "beta"]
    with pytest.raises(StoreError, match=r"'gamma'.*alpha, beta"):
        store.get_study("gamma")
    with pytest.raises(StoreError, match="already exists"):
        store.create_study("alpha", {})
    store.set_study_status(a.id, "running")
    assert store.get_study("alpha").status == "running"
    store.update_study_config(a.id, {"resolved": {"obs_dim": 11}})
    after = store.get_study("alpha")
    assert after.config == {"resolved": {"obs_dim": 11}} and after.updated_at >= a.updated_at
    with pytest.raises(StoreError, match="unknown study id 4242"):
        store.update_study_config(4242, {})
    with pytest.raises(StoreError, match="'bogus' is not one of created"):
        store.set_study_status(a.id, "bogus")


def test_trial_lifecycle_round_trip(store):
    sid = store.create_study("s", {}).id
    t = store.add_trial(sid, 0, _arch(64))
    assert (t.status, t.attempts, t.metrics, t.tell_seq) == ("pending", 0, None, None)
    assert store.next_seq(sid) == 1
    store.set_trial_status(t.id, "running")
    assert store.get_trial(t.id).started_at is not None
    curve = [(0, -10.0, 2.0), (1000, 5.5, 1.25), (2000, 12.0, 0.5)]
    metrics = TrialMetrics.from_dict({"auc": 0.75, "asymptote": 12.0})  # an unknown key is kept
    store.complete_trial(t.id, metrics, curve, wall_s=3.5, env_steps=2000)
    done = store.get_trial(t.id)
    assert done.status == "complete" and done.error is None
    assert done.metrics is not None and done.metrics.to_dict() == {"auc": 0.75, "asymptote": 12.0}
    assert (done.wall_s, done.env_steps) == (3.5, 2000)
    assert done.finished_at is not None
    assert store.curve(t.id) == curve
    store.record_tell(t.id, 0)
    assert store.get_trial(t.id).tell_seq == 0

    f = store.add_trial(sid, 1, _arch(8))
    assert f.arch == _arch(8) and f.arch_id == _arch(8).arch_id
    store.fail_trial(f.id, "Traceback ...\nValueError: nan loss", wall_s=1.0)
    r = store.add_trial(sid, 2, _arch())
    store.reject_trial(r.id, "predicted 3.1 ms > budget 2.0 ms", TrialMetrics(p99_ms=3.1))
    assert store.get_trial(r.id).metrics == TrialMetrics(p99_ms=3.1)
    assert [x.status for x in store.trials(sid)] == ["complete", "failed", "rejected"]
    assert [x.seq for x in store.trials(sid, status="failed")] == [1]
    assert "nan loss" in store.get_trial(f.id).error
    with pytest.raises(StoreError, match="'done' is not one of pending"):
        store.trials(sid, status="done")


def test_bad_writes_raise_store_error_and_leave_nothing(store):
    sid = store.create_study("s", {}).id
    store.add_trial(sid, 0, _arch())
    with pytest.raises(StoreError, match="refused"):
        store.add_trial(sid, 0, _arch())  # seq is unique per study
    with pytest.raises(StoreError, match="unknown study id 999"):
        store.add_trial(999, 0, _arch())
    with pytest.raises(StoreError, match="unknown trial id 12345"):
        store.get_trial(12345)
    t = store.trials(sid)[0]
    with pytest.raises(StoreError, match="not \\(step, mean_return, std_return\\)"):
        store.complete_trial(t.id, TrialMetrics(auc=1.0), [(0, 1.0)], 1.0, 10)
    assert store.get_trial(t.id).status == "pending" and store.curve(t.id) == []
    store.record_tell(t.id, 0)
    t2 = store.add_trial(sid, 1, _arch())
    with pytest.raises(StoreError, match="refused"):
        store.record_tell(t2.id, 0)  # tell order is unique per study


def test_requeue_interrupted(store):
    sid = store.create_study("s", {}).id
    other = store.create_study("other", {}).id
    ids = [store.add_trial(sid, i, _arch()).id for i in range(4)]
    store.set_trial_status(ids[0], "running")
    store.set_trial_status(ids[1], "running")
    store.complete_trial(ids[2], TrialMetrics(), [], 1.0, 1)
    o = store.add_trial(other, 0, _arch(), status="running")
    assert store.requeue_interrupted(sid) == 2
    rows = {t.id: t for t in store.trials(sid)}
    assert [(rows[i].status, rows[i].attempts) for i in ids] == [
        ("pending", 1),
        ("pending", 1),
        ("complete", 0),
        ("pending", 0),
    ]
    assert store.get_trial(o.id).status == "running"  # other studies untouched
    assert store.requeue_interrupted(sid) == 0
    store.set_trial_status(ids[0], "running")
    assert store.requeue_interrupted(sid) == 1
    assert store.get_trial(ids[0]).attempts == 2


def test_schema_version_mismatch_refused(url):
    Store(url).close()
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("UPDATE robonas_meta SET value = '999' WHERE key = 'schema_version'"))
    eng.dispose()
    with pytest.raises(StoreError, match=f"schema version 999.*needs {SCHEMA_VERSION}"):
        Store(url)


def test_foreign_tables_without_version_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE robonas_trials (id INTEGER PRIMARY KEY)"))
    eng.dispose()
    with pytest.raises(StoreError, match="no schema version"):
        Store(url)


def test_artifacts_devices_deployments_reports_models(store):
    sid = store.create_study("s", {}).id
    tid = store.add_trial(sid, 0, _arch()).id
    w = store.add_artifact(tid, "weights", Path("/tmp/w.pt"), "ab" * 32, {"bytes": 10})
    q = store.add_artifact(tid, "tflite-int8", "/tmp/m.tflite", "cd" * 32)
    assert w.path == "/tmp/w.pt" and w.meta == {"bytes": 10}
    assert store.artifacts(tid) == [w, q]
    assert store.artifacts(tid, kind="tflite-int8") == [q]
    assert store.get_artifact(q.id) == q

    store.add_device("pi-1", "rpi4")
    store.add_device("pi-1", "rpi5")
    store.touch_device("pi-1")
    (d,) = store.devices()
    assert d.profile == "rpi5" and d.last_seen is not None
    with pytest.raises(StoreError, match="unknown device 'nope'"):
        store.touch_device("nope")

    dep = store.add_deployment(q.id, "pi-1", "pushed", {"slot": "B"})
    store.set_deployment_status(dep.id, "active")
    assert [(x.status, x.detail) for x in store.deployments(device="pi-1")] == [("active", {"slot": "B"})]
    assert store.deployments(artifact_id=w.id) == []

    store.add_device_report("pi-1", "bench", {"p50_ms": 0.4}, artifact_id=q.id)
    store.add_device_report("pi-1", "run", {"return": 10.0}, artifact_id=q.id, trial_id=tid)
    assert [r.payload for r in store.device_reports(kind="run")] == [{"return": 10.0}]
    assert len(store.device_reports(device="pi-1")) == 2
    with pytest.raises(StoreError, match="'telemetry' is not one of run, bench, canary"):
        store.add_device_report("pi-1", "telemetry", {})

    m1 = store.add_model_version("latency", {"a": 1}, {"mae": 0.2}, device="pi-1")
    m2 = store.add_model_version("latency", {"a": 2}, {"mae": 0.1}, device="pi-1")
    g1 = store.add_model_version("gap", {"w": [1]}, {}, study_id=sid)
    assert (m1.version, m2.version, g1.version) == (1, 2, 1)
    assert store.latest_model_version("latency", device="pi-1") == m2
    assert store.latest_model_version("latency") is None
    assert store.latest_model_version("gap", study_id=sid) == g1
    assert store.model_versions("latency") == [m1, m2]


_WRITER = textwrap.dedent("""
    import sys
    from robonas.space import Layer, PolicyArch
    from robonas.store import Store
    url, study, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = Store(url)
    sid = s.get_study(study).id if study != "-" else s.create_study(f"w{worker}", {}).id
    for i in range(50):
        arch = PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(worker * 50 + i + 1, "tanh"),))
        t = s.add_trial(sid, worker * 1000 + i, arch)
        s.set_trial_status(t.id, "running")
""")


def _run_writers(url: str, study: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, study, str(w)], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for w in range(4)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs


def test_concurrent_writers_from_four_processes(url):
    with Store(url) as s:
        sid = s.create_study("shared", {}).id
    _run_writers(url, "shared")
    with Store(url) as s:
        trials = s.trials(sid)
        assert len(trials) == 200
        assert {t.arch_id for t in trials} == {
            _arch(w * 50 + i + 1).arch_id for w in range(4) for i in range(50)
        }
        assert all(t.status == "running" for t in trials)
        assert s.requeue_interrupted(sid) == 200


def test_concurrent_processes_create_a_new_store_once(url):
    # All four race to create the schema in a file that does not exist yet.
    _run_writers(url, "-")
    with Store(url) as s:
        assert sorted(x.name for x in s.list_studies()) == ["w0", "w1", "w2", "w3"]
        assert sum(len(s.trials(x.id)) for x in s.list_studies()) == 200


def test_a_schema_1_store_is_migrated_in_place_and_keeps_its_trials(tmp_path):
    import sqlite3

    from robonas.store import _TABLES

    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    with Store(url) as store:
        study = store.create_study("old", {})
        trial = store.add_trial(study.id, 0, PolicyArch(4, 1, (Layer(8, "tanh"),)))
        store.complete_trial(trial.id, TrialMetrics(objective=0.5), [(100, 1.0, 0.0)], 1.0, 100)
    # make it what robonas wrote at schema 1: no table prefix, no trial origin, no claims
    with sqlite3.connect(path) as db:
        for name in _TABLES:
            db.execute(f"ALTER TABLE robonas_{name} RENAME TO {name}")
        for column in ("origin", "worker", "lease_until"):
            db.execute(f"ALTER TABLE trials DROP COLUMN {column}")  # SQLite >= 3.35
        for name in ("rollout_robots", "rollouts"):
            db.execute(f"DROP TABLE robonas_{name}")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with Store(url) as store:
        assert store.schema_version() == SCHEMA_VERSION == 5
        (trial,) = store.trials(store.get_study("old").id)
        assert trial.origin == "ask" and trial.arch.layers[0].width == 8 and trial.status == "complete"
        assert trial.worker is None and trial.lease_until is None
        assert store.curve(trial.id) == [(100, 1.0, 0.0)]
        seeded = store.add_trial(trial.study_id, 1, trial.arch, origin="seed")
        assert store.get_trial(seeded.id).origin == "seed"
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {f"robonas_{name}" for name in (*_TABLES, "rollouts", "rollout_robots")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(robonas_trials)")}
        assert {"origin", "worker", "lease_until"} <= columns
        # foreign keys follow the renamed tables
        fks = {row[2] for row in db.execute("PRAGMA foreign_key_list(robonas_curve_points)")}
        assert fks == {"robonas_trials"}


def test_optuna_and_robonas_share_one_database(url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = url  # the same SQLAlchemy URL for both
    store = Store(url)
    sid = store.create_study("robonas-study", {}).id
    store.add_trial(sid, 0, _arch())
    study = optuna.create_study(study_name="optuna-study", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
    store.close()
    again = Store(url)  # robonas opens a database that also holds Optuna's tables
    assert [s.name for s in again.list_studies()] == ["robonas-study"]
    assert len(again.trials(sid)) == 1
    assert len(optuna.load_study(study_name="optuna-study", storage=storage).trials) == 3


def test_a_url_whose_driver_is_missing_is_one_line_from_the_cli(tmp_path):
    # pg8000 is a PostgreSQL driver robonas does not install: the same path as a missing psycopg
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robonas.cli",
            "status",
            "x",
            "--store",
            "postgresql+pg8000://u@127.0.0.1:1/db",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "robonas: error: store URL 'postgresql+pg8000://u@127.0.0.1:1/db' needs the pg8000 driver"
    ]
