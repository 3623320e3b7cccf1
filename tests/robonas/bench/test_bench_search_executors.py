"""`robonas bench search` over worker counts and executors, through the real search loop, store and
worker processes, with the scripted trainer of the search tests (tests/robonas/search/stub_trainer.py)
so a trial costs milliseconds and its results are known in advance.

The default-suite tests stand a recording executor in for Ray (same constructor, local processes)
so they check the benchmark's rows, order and ratios without paying for a Ray start; the real Ray
run is marked slow."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from robonas.bench.search_workers import SearchBench, bench_search
from robonas.errors import ConfigError
from robonas.search.executor import LocalProcessExecutor

SEARCH_TESTS = Path(__file__).resolve().parents[1] / "search"
STUB = "stub_trainer:run_trial"

CONFIG = """
[study]
name = "bench-stub"

[env]
id = "sim/CartPole-v0"
return_target = 500.0
return_floor = 20.0
return_max = 500.0

[space]
depths = [1]
widths = [16, 32, 48]
activations = ["relu"]
layer_norm = [false]
residual = [false]
shared_trunk = [false]

[strategy]
name = "evolution"
seed = 3
options = { population = 2, sample = 1 }

[budget]
trials = 3
steps_per_trial = 4000
checkpoints = 4

[seed_check]
top = 1
seeds = 2

[objective]
auc = 0.3
real_return = 0.7

[device]
profile = "rpi4"
latency_budget_ms = 5.0
"""


@pytest.fixture
def stubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file, the scripted trainer in place of training, trial folders under tmp_path."""
    monkeypatch.syspath_prepend(str(SEARCH_TESTS))  # workers get the driver's sys.path
    monkeypatch.setattr("robonas.search.loop.TRIAL_FN", STUB)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "stub.toml"
    path.write_text(CONFIG)
    return path


class RecordingRay(LocalProcessExecutor):
    """Stands in for RayExecutor: the constructor it is called with, trials in local processes."""

    built: ClassVar[list[int | None]] = []

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        cpus_per_trial: float = 1.0,
        max_retries: int = 2,
    ) -> None:
        RecordingRay.built.append(workers)
        super().__init__(workers=workers or 1)


def _check_figures(r: SearchBench) -> None:
    """A row's own rates follow from its counts and its wall time."""
    assert r.trained == r.trials + r.pruned + r.seed_trials
    assert r.wall_s > 0
    assert math.isclose(r.trials_per_h, r.trained * 3600.0 / r.wall_s, rel_tol=1e-9)
    assert math.isclose(r.steps_per_s, r.env_steps / r.wall_s, rel_tol=1e-9)
    assert r.first_trial_s is not None and 0 < r.first_trial_s <= r.wall_s


def test_a_row_per_executor_and_worker_count_with_ratios_against_the_first(
    stubbed: Path, monkeypatch: pytest.MonkeyPatch
):
    RecordingRay.built = []
    monkeypatch.setattr("robonas.search.ray_executor.RayExecutor", RecordingRay)
    logged: list[str] = []
    rows = bench_search(str(stubbed), [1, 2], None, None, executors=["local", "ray"], log=logged.append)

    assert [(r.executor, r.workers) for r in rows] == [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    assert RecordingRay.built == [1, 2]  # the ray rows really went through the ray executor
    assert logged == []  # no trial failed
    base = rows[0]
    assert (base.speedup, base.trials_per_h_ratio, base.steps_per_s_ratio) == (1.0, 1.0, 1.0)
    for r in rows:
        _check_figures(r)
        # 3 asked trials (the budget's, the scripted trainer never fails) and the seed check's
        # second seed of the best candidate
        assert (r.trials, r.pruned, r.failed, r.seed_trials) == (3, 0, 0, 1)
        assert r.env_steps == 4 * 4000
        # every row trains the same architectures on the same seeds: the same best
        assert r.best_objective == base.best_objective
        assert math.isclose(r.speedup, base.wall_s / r.wall_s, rel_tol=1e-9)
        assert math.isclose(r.trials_per_h_ratio, r.trials_per_h / base.trials_per_h, rel_tol=1e-9)
        assert math.isclose(r.steps_per_s_ratio, r.steps_per_s / base.steps_per_s, rel_tol=1e-9)
    d = rows[1].to_dict()
    assert d["executor"] == "local" and d["trained"] == 4 and d["speedup"] == rows[1].speedup


def test_bad_executor_is_refused_before_any_search_runs(stubbed: Path, monkeypatch: pytest.MonkeyPatch):
    def no_search(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a search ran before the executor list was checked")

    monkeypatch.setattr("robonas.bench.search_workers._run_one", no_search)
    with pytest.raises(ConfigError, match="'dask' is not one of local, ray"):
        bench_search(str(stubbed), [1], None, None, executors=["local", "dask"])
    with pytest.raises(ConfigError, match="--workers: 0"):
        bench_search(str(stubbed), [1, 0], None, None)


def _main(*args: str) -> None:
    from robonas.cli.app import main

    main(list(args))


def test_cli_prints_json_rows(stubbed: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:  # typer's standalone mode exits, 0 on success
        _main("bench", "search", str(stubbed), "--workers", "1", "--trials", "2", "--json")
    assert info.value.code == 0
    out = capsys.readouterr().out
    rows = json.loads(out)  # nothing else on stdout
    got = [(r["executor"], r["workers"], r["trials"], r["seed_trials"], r["trained"]) for r in rows]
    assert got == [("local", 1, 2, 1, 3)]
    assert rows[0]["speedup"] == rows[0]["trials_per_h_ratio"] == rows[0]["steps_per_s_ratio"] == 1.0


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        _main(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("robonas: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_mistakes_and_a_missing_ray_are_one_line_errors(
    stubbed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    err = _one_line_error(capsys, "bench", "search", str(stubbed), "--executors", "local,spark")
    assert "--executors: 'local,spark'" in err
    err = _one_line_error(capsys, "bench", "search", str(stubbed), "--workers", "1,x")
    assert "--workers" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = _one_line_error(capsys, "bench", "search", str(stubbed), "--workers", "1", "--executors", "ray")
    assert "executor kind 'ray' needs Ray" in err


@pytest.mark.slow
def test_real_ray_rows(stubbed: Path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robonas[ray]')")
    import ray

    assert not ray.is_initialized()
    rows = bench_search(str(stubbed), [1, 2], 2, None, executors=["local", "ray"])
    assert [(r.executor, r.workers) for r in rows] == [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    assert not ray.is_initialized()  # each ray row started its own local Ray and stopped it
    for r in rows:
        _check_figures(r)
        assert (r.trials, r.failed, r.seed_trials) == (2, 0, 1)
        assert r.best_objective == rows[0].best_objective
