"""Many `robonas search` processes on one study, and the faults they must survive, with real
processes: every planned trial runs once and is recorded once, the strategy's history replays,
a killed trial process or search process costs a re-run of its trial and nothing else, and a
PostgreSQL server that drops out for ten seconds costs only the wait.

The processes run the slow stub trainer (slow_stub_trainer.py): no training, a scripted curve, a
sleep to be killed in, and a log line per start and end of a trial so runs can be counted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from robonas.config import load_config
from robonas.search.loop import Search, SearchPlan
from robonas.store import Store

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "search_driver.py"
TRIALS = 10


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else json.dumps(v)


def _write_config(path: Path, lease_s: float = 60.0) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "study": {"name": "shared"},
        "env": {"id": "sim/CartPole-v0", "return_target": 500.0, "return_floor": 20.0, "return_max": 500.0},
        "space": {
            "depths": [1, 2],
            "widths": [8, 16, 32, 48],
            "activations": ["relu", "tanh"],
            "layer_norm": [False],
            "residual": [False],
            "shared_trunk": [False],
        },
        # adaptive: its asks depend on the tells, so the replay check means something
        "strategy": {"name": "evolution", "seed": 5, "options": {"population": 4, "sample": 2}},
        "budget": {"trials": TRIALS, "steps_per_trial": 8000, "checkpoints": 4},
        "seed_check": {"top": 1, "seeds": 2},
        "objective": {"auc": 0.3, "real_return": 0.7},
        "device": {"profile": "rpi4", "latency_budget_ms": 5.0},
        "executor": {"lease_s": lease_s},
    }
    text = "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for name, table in tables.items()
    )
    path.write_text(text)
    return path


def _start(
    config: Path, url: str, tmp: Path, log: Path, sleep_s: float, workers: int = 1
) -> subprocess.Popen[str]:
    env = {**os.environ, "STUB_TRIAL_LOG": str(log), "STUB_SLEEP_S": str(sleep_s)}
    cmd = [sys.executable, str(DRIVER), "search", str(config), "--store", url, "--workers", str(workers)]
    cmd += ["--artifacts", str(tmp / "shared-files"), "--json"]
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _runs(log: Path) -> tuple[Counter[int], Counter[int]]:
    starts: Counter[int] = Counter()
    ends: Counter[int] = Counter()
    for line in log.read_text().splitlines() if log.exists() else []:
        event, trial, _pid = line.split()
        (starts if event == "start" else ends)[int(trial)] += 1
    return starts, ends


def _check_study(url: str, config: Path, log: Path, relaunched: set[int] = frozenset()) -> list[Any]:
    """The study's invariants after every process is done; returns its trials."""
    with Store(url) as store:
        study = store.get_study("shared")
        trials = store.trials(study.id)
        asked = [t for t in trials if t.origin == "ask" and t.status != "rejected"]
        assert len(asked) == TRIALS, [(t.id, t.status) for t in trials]
        assert all(t.status in ("complete", "rejected") for t in trials), [
            (t.id, t.status, t.error) for t in trials
        ]
        # the seed check ran once over the whole study: the best candidate has its two seeds
        best = Counter(t.arch_id for t in trials if t.status == "complete").most_common(1)[0]
        assert best[1] == 2, best
        # one event counter, no number used twice, none skipped
        events = [t.seq for t in trials] + [t.tell_seq for t in trials if t.tell_seq is not None]
        assert sorted(events) == list(range(len(events)))
        assert all(t.tell_seq is not None for t in trials if t.origin == "ask")
        # every trained trial ran once to its end; a killed attempt's trial started once more
        starts, ends = _runs(log)
        trained = {t.id for t in trials if t.status == "complete"}
        assert set(ends) == trained, ends
        for i in trained:
            # a killed process's trial may have reached its end before its result was recorded
            assert (starts[i], ends[i]) in (((2, 1), (2, 2)) if i in relaunched else ((1, 1),)), (
                i,
                starts,
                ends,
            )
        # the strategy's replay from the store asks exactly what was asked
        replayed = Search(SearchPlan.build(load_config(config), "shared"), store, workers=1)
        with store.study_lock(study.id):
            replayed._catch_up(study)
        for t in trials:
            if t.origin == "ask":
                assert replayed._asked[t.id] == t.arch, t.id
        return trials


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_processes_share_one_study(url, tmp_path, processes, caplog):
    config = _write_config(tmp_path / "shared.toml")
    log = tmp_path / "runs.log"
    procs = [_start(config, url, tmp_path, log, sleep_s=0.6) for _ in range(processes)]
    results = _wait(procs)
    for code, _out, err in results:
        assert code == 0, err[-2000:]
    with caplog.at_level(logging.WARNING, logger="robonas.search.loop"):
        trials = _check_study(url, config, log)
    assert not [r for r in caplog.records if "replay:" in r.getMessage()]
    workers = {t.worker for t in trials if t.status == "complete"}
    assert len(workers) >= 2, workers  # the work was shared
    for t in trials:
        if t.status == "complete":
            assert Path(t.worker.split(":")[0]).name  # host:pid:tag
    summaries = [json.loads(out) for _c, out, _e in results]
    assert all(s["complete"] == summaries[0]["complete"] for s in summaries)


def _first_start(log: Path, timeout: float = 120) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            event, trial, pid = line.split()
            if event == "start":
                return int(trial), int(pid)
        time.sleep(0.1)
    raise AssertionError("no trial started")


def test_a_trial_process_killed_mid_trial_runs_again(sqlite_url, tmp_path):
    config = _write_config(tmp_path / "shared.toml")
    log = tmp_path / "runs.log"
    driver = _start(config, sqlite_url, tmp_path, log, sleep_s=1.5)
    trial_id, pid = _first_start(log)
    os.kill(pid, signal.SIGKILL)
    ((code, out, err),) = _wait([driver])
    assert code == 0, err[-2000:]
    trials = _check_study(sqlite_url, config, log, relaunched={trial_id})
    killed = next(t for t in trials if t.id == trial_id)
    assert killed.status == "complete" and killed.attempts == 1
    assert json.loads(out)["failed"] == 0


@pytest.mark.slow
def test_a_killed_search_process_trials_are_taken_over(url, tmp_path):
    """Two processes; one is SIGKILLed while it trains. The other runs the dead one's trial again
    and finishes the study (on this machine the dead holder is seen at once; on another the
    lease lapses: test_store_claims covers that)."""
    config = _write_config(tmp_path / "shared.toml", lease_s=10)
    log = tmp_path / "runs.log"
    a = _start(config, url, tmp_path, log, sleep_s=1.5)
    b = _start(config, url, tmp_path, log, sleep_s=1.5)
    with Store(url) as store:
        deadline = time.monotonic() + 120
        held: list[int] = []
        while not held:
            assert time.monotonic() < deadline, "process a never held a trial"
            try:
                study = store.get_study("shared")
            except Exception:  # noqa: BLE001  (not created yet)
                time.sleep(0.2)
                continue
            # a trial a holds whose training has started (claimed is not enough: under load the
            # trial process may start seconds after the claim)
            started = _runs(log)[0]
            running = store.trials(study.id, "running")
            held = [t.id for t in running if t.worker and f":{a.pid}:" in t.worker and started[t.id]]
            time.sleep(0.1)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    ((code, _out, err),) = _wait([b])
    assert code == 0, err[-2000:]
    starts, _ends = _runs(log)
    relaunched = {i for i in held if starts[i] == 2}
    assert relaunched, (held, starts)  # it had started training before the kill
    trials = _check_study(url, config, log, relaunched=relaunched)
    assert all(t.worker and f":{b.pid}:" in t.worker for t in trials if t.id in held)


@pytest.mark.slow
def test_the_database_dropping_for_ten_seconds_costs_only_the_wait(tmp_path):
    from tests.postgres_cluster import cluster, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    with cluster() as server:
        config = _write_config(tmp_path / "shared.toml")
        log = tmp_path / "runs.log"
        procs = [_start(config, server.url, tmp_path, log, sleep_s=1.0) for _ in range(2)]
        deadline = time.monotonic() + 120
        while sum(_runs(log)[1].values()) < 2:  # two trials done: mid-search
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        server.stop("fast")  # every connection dropped
        time.sleep(10)
        server.start()
        results = _wait(procs)
        for code, _out, err in results:
            assert code == 0, err[-2000:]
        assert any("retrying" in err for _c, _o, err in results)  # they did see it go
        _check_study(server.url, config, log)
