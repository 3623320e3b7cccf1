"""Tests of robonas.search.executor. `ExecutorContract` is what every Executor must pass; a new
executor (e.g. Ray) subclasses it with its own `make`."""

from __future__ import annotations

import os
import time

import pytest

from robonas.errors import ConfigError
from robonas.search.executor import Executor, LocalProcessExecutor, TaskResult

try:  # tests/robonas is a plain directory today; keep working if it becomes a package
    import executor_tasks as tasks
except ImportError:  # pragma: no cover
    from tests.robonas import executor_tasks as tasks

T = tasks.__name__


def drain(ex: Executor, n: int, limit_s: float = 60.0) -> dict[object, TaskResult]:
    """Poll until n results are in; fail the test rather than hang."""
    out: dict[object, TaskResult] = {}
    end = time.monotonic() + limit_s
    while len(out) < n:
        assert time.monotonic() < end, f"only {sorted(map(str, out))} finished in {limit_s} s"
        for r in ex.poll(timeout=5.0):
            assert r.task_id not in out
            out[r.task_id] = r
    return out


class ExecutorContract:
    # how long a test waits for its tasks: a Ray worker's first task also starts the worker
    limit_s = 60.0

    def make(self, workers: int) -> Executor:
        raise NotImplementedError

    def drain(self, ex: Executor, n: int) -> dict[object, TaskResult]:
        return drain(ex, n, self.limit_s)

    @pytest.fixture
    def ex2(self):
        ex = self.make(2)
        yield ex
        ex.shutdown(kill=True)

    def test_success_values_come_back(self, ex2):
        for i in range(3):
            ex2.submit(i, f"{T}:square", {"x": i + 2}, timeout_s=60)
        res = self.drain(ex2, 3)
        assert {i: r.value for i, r in res.items()} == {0: 4, 1: 9, 2: 16}
        assert all(r.ok and r.error is None and r.exit_code == 0 and r.wall_s > 0 for r in res.values())
        assert ex2.running() == 0

    def test_failures_are_reported_while_others_succeed(self, ex2):
        ex2.submit("raise", f"{T}:boom", {"x": 7})
        ex2.submit("segv", f"{T}:segfault", {})
        ex2.submit("slow", f"{T}:sleep", {"s": 60}, timeout_s=1.5)
        ex2.submit("exit", f"{T}:exit_quietly", {})
        ex2.submit("missing", "no_such_module_xyz:f", {})
        ex2.submit("good", f"{T}:square", {"x": 5})
        res = self.drain(ex2, 6)
        assert res["good"].ok and res["good"].value == 25
        assert not any(r.ok for k, r in res.items() if k != "good")
        assert res["raise"].error.splitlines()[-1] == "ValueError: bad value 7"
        assert "in boom" in res["raise"].error  # the traceback's last frames come along
        assert res["segv"].error == "died with signal SIGSEGV (exit -11)"
        assert res["segv"].exit_code == -11
        assert res["slow"].error == "timed out after 1.5 s"
        assert 1.5 <= res["slow"].wall_s < 10
        assert res["exit"].error == "exited with code 3 without a result"
        assert "ModuleNotFoundError" in res["missing"].error
        assert all(r.value is None for k, r in res.items() if k != "good")

    def test_concurrency_is_bounded_by_workers(self, ex2):
        assert ex2.capacity == 2
        for i in range(5):
            ex2.submit(i, f"{T}:window", {"s": 0.6})
        assert ex2.running() == 5  # queued tasks count until they are returned
        res = self.drain(ex2, 5)
        spans = [r.value[:2] for r in res.values()]
        overlap = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert overlap == 2
        assert len({r.value[2] for r in res.values()}) == 5  # one process per task

    def test_poll_times_out_empty_without_spinning(self, ex2):
        ex2.submit("long", f"{T}:sleep", {"s": 30})
        assert ex2.poll(0.3) == [] or pytest.fail("a 30 s task cannot be done")
        cpu0, t0 = time.process_time(), time.monotonic()
        assert ex2.poll(1.0) == []
        assert time.monotonic() - t0 >= 0.95
        assert time.process_time() - cpu0 < 0.2  # waited on pipes, did not busy-poll
        assert ex2.running() == 1

    def test_shutdown_kills_children(self):
        ex = self.make(2)
        ex.submit("a", f"{T}:sleep", {"s": 60})
        ex.submit("b", f"{T}:sleep", {"s": 60})
        ex.submit("c", f"{T}:sleep", {"s": 60})  # queued, never started
        ex.poll(0.5)
        t0 = time.monotonic()
        ex.shutdown(kill=True)
        assert time.monotonic() - t0 < 5
        assert ex.running() == 0
        with pytest.raises(ConfigError, match="shut down"):
            ex.submit("d", f"{T}:square", {"x": 1})

    def test_bad_submissions_rejected(self, ex2):
        with pytest.raises(ConfigError, match=r"'executor_tasks.square'.*module:function"):
            ex2.submit(1, "executor_tasks.square", {})
        with pytest.raises(ConfigError, match="timeout"):
            ex2.submit(1, f"{T}:square", {"x": 1}, timeout_s=0)
        ex2.submit(1, f"{T}:sleep", {"s": 0.1})
        with pytest.raises(ConfigError, match="task id 1 is already submitted"):
            ex2.submit(1, f"{T}:square", {"x": 1})
        assert self.drain(ex2, 1)[1].ok


class TestLocalProcessExecutor(ExecutorContract):
    def make(self, workers: int) -> Executor:
        return LocalProcessExecutor(workers=workers)

    def test_child_runs_single_threaded_and_ignores_ctrl_c(self, ex2):
        ex2.submit("env", f"{T}:child_env", {})
        r = self.drain(ex2, 1)["env"]
        assert r.ok, r.error
        assert r.value == {"omp": "1", "threads": 1, "sigint": True}

    def test_unpicklable_result_is_an_error(self, ex2):
        ex2.submit("u", f"{T}:unpicklable", {})
        r = self.drain(ex2, 1)["u"]
        assert not r.ok and "could not be sent back" in r.error

    def test_shutdown_really_ends_the_processes(self):
        ex = LocalProcessExecutor(workers=1)
        ex.submit("a", f"{T}:sleep", {"s": 60})
        ex.poll(0.3)
        pid = ex._active["a"].proc.pid
        ex.shutdown(kill=True)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    def test_bad_construction(self):
        with pytest.raises(ConfigError, match="workers: 0"):
            LocalProcessExecutor(workers=0)
        with pytest.raises(ConfigError, match="'fork' is not one of forkserver, spawn"):
            LocalProcessExecutor(workers=1, start_method="fork")
        assert LocalProcessExecutor().capacity == (os.cpu_count() or 1)


@pytest.mark.slow  # a Ray cluster is many processes, and each worker's first task imports torch
class TestRayExecutor(ExecutorContract):
    """The same contract on a local Ray started once for the class (two CPUs)."""

    limit_s = 300.0

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def local_ray(cls):
        ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'robonas[ray]')")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()

    def make(self, workers: int) -> Executor:
        from robonas.search.ray_executor import RayExecutor

        return RayExecutor(workers=workers)

    def test_a_cancelled_task_leaves_no_trial_process(self, tmp_path):
        ex = self.make(1)
        pidfile = tmp_path / "pid"
        ex.submit("long", f"{T}:sleep_recording_pid", {"s": 60, "pidfile": str(pidfile)})
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline:
            ex.poll(0.2)
        assert pidfile.exists(), "the task never started"
        pid = int(pidfile.read_text())
        assert pid != os.getpid() and _alive(pid)
        ex.shutdown(kill=True)
        end = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _alive(pid), "the trial process outlived its cancelled Ray task"


def test_a_task_dies_with_the_process_waiting_for_it(tmp_path):
    """SIGKILL the process that owns a LocalProcessExecutor: its running task must not train on
    (its parent is the fork server, which outlives the owner while it has tasks)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pidfile = tmp_path / "pid"
    here = str(Path(__file__).resolve().parent)
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            f"sys.path.insert(0, {here!r})\n"
            "from robonas.search.executor import LocalProcessExecutor\n"
            "ex = LocalProcessExecutor(workers=1)\n"
            f"payload = {{'s': 120, 'pidfile': {str(pidfile)!r}}}\n"
            "ex.submit('t', 'executor_tasks:sleep_recording_pid', payload)\n"
            "while True: ex.poll(1.0)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert owner.poll() is None and time.monotonic() < deadline, "the task never started"
            time.sleep(0.1)
        pid = int(pidfile.read_text())
        assert _alive(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        end = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(pid), "the task process outlived the process waiting for its result"
    finally:
        owner.kill()
        owner.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
