"""A real search through the CLI, in real processes: store contents, ranking, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robonas.errors import StoreError
from robonas.metrics import TrialMetrics
from robonas.store import Store, TrialRow

REPO = Path(__file__).resolve().parents[2]
CARTPOLE = (REPO / "launch" / "cartpole.toml").read_text()

pytestmark = pytest.mark.e2e


def _m(t: TrialRow) -> TrialMetrics:
    assert t.metrics is not None, f"trial {t.id} has no metrics"
    return t.metrics


def _config(tmp_path: Path, **replace: str) -> Path:
    text = CARTPOLE
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    p = tmp_path / "cartpole.toml"
    p.write_text(text)
    return p


def _robonas(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robonas.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs' / 'robonas.db'}"


def test_search_fills_store_and_top_ranks(tmp_path):
    cfg = _config(tmp_path)
    url = _store_url(tmp_path)
    proc = _robonas(
        tmp_path,
        "search",
        str(cfg),
        "--trials",
        "3",
        "--steps",
        "3000",
        "--workers",
        "2",
        "--store",
        url,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["complete"] == 3 and summary["failed"] == 0

    top = _robonas(tmp_path, "top", "cartpole", "--json", "--store", url)
    assert top.returncode == 0, top.stderr
    table = json.loads(top.stdout)
    rows = table["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    # the best candidate was trained on a second seed before it was reported (launch/cartpole.toml)
    assert rows[0]["seeds"] == 2 and summary["best_seeds"] == 2 and summary["seed_trials"] == 1
    # candidates in order of their figure: the mean over seeds less its standard error
    figures = [r["seed_mean"] - r["seed_std"] / r["seeds"] ** 0.5 for r in rows]
    assert figures == sorted(figures, reverse=True)
    assert table["models"] == {"latency_model": "analytic-roofline@1", "gap_model": "heuristic-gap@1"}
    assert any(r["pareto"] for r in rows)

    store = Store(url)
    study = store.get_study("cartpole")
    for t in store.trials(study.id, status="complete"):
        curve = store.curve(t.id)
        assert len(curve) >= 2 and curve[-1][0] >= 3000
        m = t.metrics
        assert m is not None and m.auc is not None and m.p99_ms is not None
        assert 0.0 <= m.auc <= 1.0
        assert m.p99_ms <= 0.25  # the config's latency budget
        assert m.predicted_real_return is not None and m.asymptotic_return is not None
        assert m.predicted_real_return <= m.asymptotic_return
        (weights,) = store.artifacts(t.id, kind="weights")
        assert Path(weights.meta["actor"]).is_file() and Path(weights.meta["obs_norm"]).is_file()
    # candidates over the budget were recorded as rejected, never trained
    for t in store.trials(study.id, status="rejected"):
        assert t.metrics is not None and t.metrics.p99_ms is not None
        assert t.metrics.p99_ms > 0.25 and t.env_steps is None
        assert not store.curve(t.id)

    status = _robonas(tmp_path, "status", "cartpole", "--json", "--store", url)
    info = json.loads(status.stdout)
    assert info["counts"]["complete"] == 4  # 3 asked + the best candidate's second seed
    assert info["best_seeds"] == 2 and info["failures"] == {}


def test_sigkill_midway_then_resume_runs_every_trial_once(tmp_path):
    cfg = _config(tmp_path)
    url = _store_url(tmp_path)
    args = [
        sys.executable,
        "-m",
        "robonas.cli",
        "search",
        str(cfg),
        "--trials",
        "5",
        "--steps",
        "3000",
        "--workers",
        "2",
        "--store",
        url,
        "--json",
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    db = tmp_path / "runs" / "robonas.db"
    deadline = time.monotonic() + 300
    killed_with_running = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not db.exists():
                continue
            store = Store(url)
            try:
                study = store.get_study("cartpole")
            except StoreError:  # the search has not created the study yet
                continue
            trials = store.trials(study.id)
            done = sum(t.status == "complete" for t in trials)
            running = sum(t.status == "running" for t in trials)
            if done >= 1 and running >= 1:
                os.killpg(proc.pid, signal.SIGKILL)  # the search and its trial processes
                killed_with_running = True
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_with_running, "the search finished or stalled before it could be killed mid-way"

    before = {t.seq: t for t in Store(url).trials(Store(url).get_study("cartpole").id)}
    resumed = _robonas(
        tmp_path,
        "search",
        str(cfg),
        "--trials",
        "5",
        "--steps",
        "3000",
        "--workers",
        "2",
        "--store",
        url,
        "--json",
    )
    assert resumed.returncode == 0, resumed.stderr

    store = Store(url)
    trials = store.trials(store.get_study("cartpole").id)
    trained = [t for t in trials if t.status != "rejected" and t.origin == "ask"]
    assert len(trained) == 5 and all(t.status == "complete" for t in trained)
    # then the seed check trained the best candidate on a second seed, once
    (seed_trial,) = [t for t in trials if t.origin == "seed"]
    assert seed_trial.status == "complete"
    assert len({t.seq for t in trials}) == len(trials)  # no duplicates
    # finished trials were kept as they were; interrupted ones reran under the same row
    for seq, old in before.items():
        new = next(t for t in trials if t.seq == seq)
        assert new.id == old.id and new.arch_id == old.arch_id
        if old.status == "complete":
            assert new.finished_at == old.finished_at and new.attempts == old.attempts
        if old.status == "running":
            assert new.attempts == old.attempts + 1
    # every asked trial was told to the strategy exactly once (the seed check's never are)
    tells = [t.tell_seq for t in trials if t.origin == "ask"]
    assert None not in tells and len(set(tells)) == len(tells)


def test_trials_that_raise_or_time_out_are_recorded_failed(tmp_path):
    url = _store_url(tmp_path)
    raising = _config(tmp_path, **{"hyperparams = {}": "hyperparams = { n_steps = 0 }"})
    proc = _robonas(
        tmp_path,
        "search",
        str(raising),
        "--trials",
        "2",
        "--steps",
        "2000",
        "--store",
        url,
        "--study",
        "raises",
        "--json",
    )
    # no trial completed: exit 1, with the reason (issue 17), the summary still printed
    assert proc.returncode == 1, proc.stderr
    assert "no trial of study 'raises' completed (2 failed" in proc.stderr and "n_steps" in proc.stderr
    assert json.loads(proc.stdout)["failed"] == 2
    store = Store(url)
    failed = store.trials(store.get_study("raises").id, status="failed")
    assert len(failed) == 2 and all("n_steps" in t.error for t in failed)

    slow = _config(tmp_path, **{"trial_timeout_s = 600": "trial_timeout_s = 1.5"})
    proc = _robonas(
        tmp_path,
        "search",
        str(slow),
        "--trials",
        "2",
        "--steps",
        "50000",
        "--store",
        url,
        "--study",
        "slow",
        "--json",
    )
    assert proc.returncode == 1 and "timed out" in proc.stderr, proc.stderr
    failed = store.trials(store.get_study("slow").id, status="failed")
    assert len(failed) == 2 and all("timed out" in t.error for t in failed)


def test_resume_with_a_different_space_is_refused(tmp_path):
    url = _store_url(tmp_path)
    cfg = _config(tmp_path)
    assert (
        _robonas(tmp_path, "search", str(cfg), "--trials", "1", "--steps", "1000", "--store", url).returncode
        == 0
    )
    changed = _config(tmp_path, **{"widths = [16, 32, 64, 128]": "widths = [16, 32]"})
    proc = _robonas(tmp_path, "search", str(changed), "--trials", "2", "--store", url)
    assert proc.returncode == 2 and "different config" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_env_json_reports_ratio_to_cartpole_v1(tmp_path):
    proc = _robonas(tmp_path, "bench", "env", "sim/CartPole-v0", "sim/Hopper-v0", "--steps", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    results = {r["env_id"]: r for r in json.loads(proc.stdout)["results"]}
    assert set(results) == {"CartPole-v1", "sim/CartPole-v0", "sim/Hopper-v0"}
    ref = results["CartPole-v1"]["steps_per_s"]
    for r in results.values():
        assert r["steps_per_s"] > 0
        assert r["ratio_to_reference"] == pytest.approx(r["steps_per_s"] / ref)
    bad = _robonas(tmp_path, "bench", "env", "sim/Unicycle-v0")
    assert bad.returncode == 2 and "sim/CartPole-v0" in bad.stderr


def test_results_do_not_depend_on_the_worker_count(tmp_path):
    """The n-th candidate trains under the same seed whatever the parallelism: a search is
    reproducible from its config alone (random strategy: the asks do not depend on results)."""
    cfg = _config(
        tmp_path,
        **{
            'name = "evolution"': 'name = "random"',
            "options = { population = 4, sample = 2 }": "options = {}",
        },
    )
    figures = {}
    for workers in ("1", "2"):
        url = f"sqlite:///{tmp_path / f'w{workers}.db'}"
        proc = _robonas(
            tmp_path,
            "search",
            str(cfg),
            "--trials",
            "2",
            "--steps",
            "2000",
            "--workers",
            workers,
            "--store",
            url,
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        store = Store(url)
        trials = [t for t in store.trials(store.get_study("cartpole").id) if t.status == "complete"]
        figures[workers] = [
            (t.arch_id, _m(t).auc, _m(t).asymptotic_return, store.curve(t.id)) for t in trials
        ]
    assert figures["1"] == figures["2"]


def test_after_robot_reports_the_next_candidates_are_asked_and_scored_with_the_calibrated_models(tmp_path):
    """Reports recalibrate the models that rank the *next* candidates too: a search resumed after
    a latency calibration rejects the asks the calibrated model puts over the budget and scores
    the new trials with it, while the strategy replays with what it was told before."""
    from robonas.models.latency_calibration import LatencySample
    from robonas.models.recalibrate import fit_latency, rescore_study
    from robonas.space import Layer, PolicyArch

    cfg = REPO / "launch" / "cartpole-mcu.toml"
    url = _store_url(tmp_path)
    first = _robonas(
        tmp_path, "search", str(cfg), "--trials", "2", "--steps", "2000", "--workers", "1", "--store", url
    )
    assert first.returncode == 0, first.stderr
    store = Store(url)
    study = store.get_study("cartpole-mcu")
    told_before = {t.id: (_m(t).objective, _m(t).p99_ms) for t in store.trials(study.id, status="complete")}

    # a robot's BENCH timings of a slow MCU: 2 ms of overhead plus the MACs at 5e5 MAC/s
    samples = []
    for widths in ((16,), (64,), (256,), (16, 16), (64, 64), (256, 64), (256, 256), (64, 256)):
        arch = PolicyArch(
            obs_dim=5,
            act_dim=1,
            layers=tuple(Layer(w, "tanh") for w in widths),
            layer_norm=True,
            shared_trunk=True,
        )
        ms = 2.0 + arch.cost_summary()["macs"] / 5e5 * 1e3
        samples.append(LatencySample(arch, ms, ms * 1.05))
    fit_latency(store, "cortex-m7", samples)
    rescore_study(store, "cartpole-mcu")
    for t in store.trials(study.id, status="complete"):  # re-scored, but what was told is kept
        assert _m(t).latency_model == "calibrated-roofline@1"
        told = _m(t).told
        assert told is not None and (told["objective"], told["p99_ms"]) == told_before[t.id]

    more = _robonas(
        tmp_path, "search", str(cfg), "--trials", "4", "--steps", "2000", "--workers", "1", "--store", url
    )
    assert more.returncode == 0, more.stderr
    assert "replay:" not in more.stderr  # the recorded asks replayed as they were
    new = [t for t in store.trials(study.id) if t.id not in told_before]
    complete = [t for t in new if t.status == "complete"]
    assert len(complete) == 2 and any(t.status == "rejected" for t in new)
    for t in new:
        wide = len(t.arch.layers) == 2  # 2x256: about 136 ms now
        if t.status == "rejected":
            assert wide and "calibrated-roofline@1" in t.error, t.error
        else:
            assert not wide and _m(t).latency_model == "calibrated-roofline@1"
            assert (_m(t).p99_ms or 0.0) < 20.0
