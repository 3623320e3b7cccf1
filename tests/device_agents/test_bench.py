"""device_agents.bench and `robonas-agent bench` through the measurement protocol, on the real
interpreter with the session's small policy models (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from device_agents import bench
from device_agents.bench import bench_model, bench_models, overall_verdict, split_runs
from device_agents.cli import main
from device_agents.errors import DeviceError

PROTOCOL_KEYS = {
    "noise",
    "median_us",
    "spread_us",
    "rounds",
    "per_round",
    "settled",
    "warmup_steps",
    "noise_verdict",
}


def _check(result: dict, model_bytes: int) -> None:
    assert result["model_bytes"] == model_bytes
    for span in ("invoke_us", "step_us"):
        s = result[span]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], s
        assert s["min"] <= s["mean"] <= s["max"], s
    # the invoke is timed inside each step, so its round medians are below the step's, and so is
    # their median
    assert result["invoke_us"]["p50"] <= result["step_us"]["p50"] == result["median_us"]
    assert math.isfinite(result["noise"]) and result["noise"] >= 0
    assert result["spread_us"] == pytest.approx(result["noise"] * result["step_us"]["p50"])
    assert result["runs"] == result["rounds"] * result["per_round"]
    assert isinstance(result["settled"], bool)
    assert result["warmup_steps"] >= max(result["warmup"], 1)
    v = result["noise_verdict"]
    assert {"ok", "refuse", "message"} <= set(v) and isinstance(v["message"], str) and v["message"]
    assert v["worst"] == pytest.approx(result["noise"])
    assert not (v["ok"] and v["refuse"])


def test_bench_model_measures_through_the_protocol(policy_models) -> None:
    result = bench_model(policy_models.int8, runs=1000, warmup=30)
    _check(result, len(policy_models.int8))
    assert set(result) >= PROTOCOL_KEYS
    assert (result["rounds"], result["per_round"], result["runs"]) == (25, 40, 1000)
    assert result["warmup"] == 30 and result["input_dtype"] == "int8"
    assert result["first_us"] > 0 and result["warmup_mean_us"] > 0 and result["init_us"] > 0
    json.dumps(result, allow_nan=False)  # travels as a BENCH reply header


def test_bench_models_times_several_interleaved(policy_models) -> None:
    models = {"int8": policy_models.int8, "fp32": policy_models.fp32_path}
    results = bench_models(models, rounds=8, per_round=25, seed=3)
    assert list(results) == ["int8", "fp32"]
    single = bench_model(policy_models.fp32, runs=50)
    for name, size in (("int8", len(policy_models.int8)), ("fp32", len(policy_models.fp32))):
        r = results[name]
        assert set(r) == set(single)  # the same keys as bench_model's result
        _check(r, size)
        assert (r["rounds"], r["per_round"], r["runs"]) == (8, 25, 200)
    assert results["fp32"]["model"] == str(policy_models.fp32_path)
    assert results["int8"]["input_dtype"] == "int8" and results["fp32"]["input_dtype"] == "float32"
    # warmed up in lockstep
    assert results["int8"]["warmup_steps"] == results["fp32"]["warmup_steps"]

    overall = overall_verdict(results)
    assert overall["worst"] == pytest.approx(max(r["noise"] for r in results.values()))
    assert overall["ok"] == all(r["noise_verdict"]["ok"] for r in results.values())
    assert overall["refuse"] == any(r["noise_verdict"]["refuse"] for r in results.values())
    forged = {n: {**r, "noise": 0.2} if n == "fp32" else r for n, r in results.items()}
    assert overall_verdict(forged)["refuse"] and overall_verdict(forged)["noisy"][0] == "fp32"


def test_split_runs() -> None:
    assert split_runs(1000) == (25, 40)
    assert split_runs(300) == (15, 20)
    assert split_runs(600) == (15, 40)
    assert split_runs(1) == (1, 1)
    assert split_runs(7) == (7, 1)
    assert split_runs(16) == (16, 1)
    assert split_runs(50) == (25, 2)
    assert split_runs(200) == (20, 10)  # exact when a split with 15 to 30 rounds exists
    assert split_runs(211) == (16, 14)  # else just over
    for runs in (1, 2, 14, 15, 16, 31, 50, 99, 100, 211, 999, 1001, 99_991, 100_000):
        rounds, per = split_runs(runs)
        assert runs <= rounds * per < runs + per, runs
        assert rounds >= min(15, runs)
    assert split_runs(1000, rounds=10) == (10, 100)
    assert split_runs(1000, per_round=30) == (34, 30)
    assert split_runs(5, rounds=3, per_round=4) == (3, 4)
    with pytest.raises(DeviceError, match="runs: 0"):
        split_runs(0)
    with pytest.raises(DeviceError, match="per_round: 0"):
        split_runs(10, per_round=0)


@pytest.mark.parametrize("kw, match", [({"runs": 0}, "runs: 0"), ({"warmup": -1}, "warmup: -1")])
def test_bench_model_bad_numbers(policy_models, kw, match) -> None:
    with pytest.raises(DeviceError, match=match):
        bench_model(policy_models.int8, **kw)


# --- robonas-agent bench ----------------------------------------------------------------------
def test_cli_prints_the_noise_line(policy_models, capsys) -> None:
    assert main(["bench", str(policy_models.int8_path), "--rounds", "10", "--per-round", "20"]) == 0
    out = capsys.readouterr().out
    noise = [line for line in out.splitlines() if line.startswith("noise")]
    assert len(noise) == 1, out
    assert "% (IQR" in noise[0] and "10 round medians, 20 steps each" in noise[0]
    assert "warm-up steps" in noise[0] and "(200 runs)" in out


def test_cli_several_files_json(policy_models, capsys) -> None:
    files = [str(policy_models.int8_path), str(policy_models.fp32_path)]
    assert main(["bench", *files, "--runs", "120", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"models", "noise_verdict"} and sorted(doc["models"]) == sorted(files)
    for r in doc["models"].values():
        assert r["runs"] == 120 and (r["rounds"], r["per_round"]) == (15, 8)
    assert doc["noise_verdict"]["worst"] == pytest.approx(max(r["noise"] for r in doc["models"].values()))


def test_cli_several_files_table(policy_models, capsys) -> None:
    assert main(["bench", str(policy_models.int8_path), str(policy_models.fp32_path), "--runs", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("noise      ") == 2 and out.count("model      ") == 2
    assert out.rstrip().splitlines()[-1].split()[0] in ("overall", "WARNING")


def test_cli_same_file_twice_is_refused(policy_models, capsys) -> None:
    f = str(policy_models.int8_path)
    assert main(["bench", f, f]) == 2
    err = capsys.readouterr().err
    assert "given twice" in err and err.count("\n") == 1


@pytest.fixture
def noisy_clock(monkeypatch):
    """Make the bench's clock jumpy: every reading adds a lognormal delay (median 5 us, sigma 1.5),
    as a machine shared with a busy neighbour would; the real step still runs in between."""
    rng = np.random.default_rng(0)
    elapsed = [0]
    real = time.perf_counter_ns

    def clock() -> int:
        elapsed[0] += int(5000 * rng.lognormal(0.0, 1.5))
        return real() + elapsed[0]

    monkeypatch.setattr(bench.time, "perf_counter_ns", clock)


def test_cli_warns_when_too_noisy_and_strict_exits_3(policy_models, capsys, noisy_clock) -> None:
    f = str(policy_models.int8_path)
    assert main(["bench", f, "--runs", "300"]) == 0
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "too noisy" in warning[0], out
    assert main(["bench", f, "--runs", "300", "--strict"]) == 3
    assert main(["bench", f, "--runs", "300", "--strict", "--json"]) == 3
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["noise_verdict"]["refuse"]
