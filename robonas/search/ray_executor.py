"""Trials on a Ray cluster: the `Executor` for searches past one machine (`[executor] kind = "ray"`).

Leans on Ray for placement, resources and retries: one trial is one Ray task that asks for
`cpus_per_trial` CPUs and is retried (`max_retries`) when the worker or node running it is lost.
Inside its Ray task a trial still runs in a child process of its own, through the same machinery
as `LocalProcessExecutor` (it dies with its Ray worker when the task is cancelled), so a trial that segfaults,
hangs or leaks is reported exactly as on one machine: the same error texts, exit codes and
timeouts, and the executor contract tests hold for both.

Ray is an optional extra (`pip install 'robonas[ray]'`), imported only when this executor is built.
It joins the cluster named by `address` or `RAY_ADDRESS`, else starts a local Ray on demand (and
stops it at shutdown); when Ray is already initialised in this process, it uses that.
Results travel back as the task's return value; the trial writes its curve to the store itself.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Hashable
from typing import Any

from robonas.errors import ConfigError
from robonas.search.executor import Executor, LocalProcessExecutor, TaskResult, check_submission


def _run_isolated(
    task_id: Hashable, fn_path: str, payload: dict[str, Any], timeout_s: float | None, sys_path: list[str]
) -> TaskResult:
    """The body of one Ray task: run the trial function in a fresh child process, wait for it."""
    # the driver's import path, so a task function the driver can import, the worker can too
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    # Not "spawn": it would re-import the worker's __main__ (Ray's worker loop) in the child. The
    # fork server exits when this worker dies, and its children with it (PR_SET_PDEATHSIG).
    ex = LocalProcessExecutor(workers=1)
    try:
        ex.submit(task_id, fn_path, payload, timeout_s)
        while True:
            for result in ex.poll(timeout=60.0):
                return result
    finally:
        ex.shutdown(kill=True)


class RayExecutor(Executor):
    """Up to `workers` trials at once on a Ray cluster (default: the cluster's CPUs)."""

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        cpus_per_trial: float = 1.0,
        max_retries: int = 2,
    ) -> None:
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ConfigError(f"executor workers: {workers!r} is not a positive integer")
        if not cpus_per_trial > 0:
            raise ConfigError(f"executor cpus_per_trial: {cpus_per_trial!r} is not a positive number")
        try:
            import ray
        except ImportError as e:
            raise ConfigError("executor kind 'ray' needs Ray: pip install 'robonas[ray]'") from e
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, **options)
            self._owns_ray = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1) // cpus_per_trial)
        self._workers = workers or max(1, cluster_cpus)
        self._remote = ray.remote(num_cpus=cpus_per_trial, max_retries=max_retries)(_run_isolated)
        self._queue: deque[tuple[Hashable, str, dict[str, Any], float | None]] = deque()
        self._active: dict[Any, tuple[Hashable, float]] = {}  # ObjectRef -> (task id, start)
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._workers

    def running(self) -> int:
        return len(self._active) + len(self._queue)

    def submit(
        self, task_id: Hashable, fn_path: str, payload: dict[str, Any], timeout_s: float | None = None
    ) -> None:
        in_flight = [t for t, _ in self._active.values()] + [q[0] for q in self._queue]
        check_submission(self._closed, task_id, fn_path, timeout_s, in_flight)
        self._queue.append((task_id, fn_path, payload, timeout_s))
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._active) < self._workers:
            task_id, fn_path, payload, timeout_s = self._queue.popleft()
            ref = self._remote.remote(task_id, fn_path, payload, timeout_s, list(sys.path))
            self._active[ref] = (task_id, time.monotonic())

    def poll(self, timeout: float) -> list[TaskResult]:
        """Collect finished tasks, waiting up to `timeout` s (in Ray's wait, not a spin) for one."""
        self._fill()
        if not self._active:
            return []
        ready, _ = self._ray.wait(list(self._active), num_returns=1, timeout=max(0.0, timeout))
        if ready:  # and whatever else finished meanwhile
            ready, _ = self._ray.wait(list(self._active), num_returns=len(self._active), timeout=0)
        done = [self._result(ref) for ref in ready]
        self._fill()
        return done

    def _result(self, ref: Any) -> TaskResult:
        task_id, started = self._active.pop(ref)
        try:
            result: TaskResult = self._ray.get(ref)
            return result
        except self._ray.exceptions.RayError as e:  # the task's worker or node was lost for good
            first = (str(e).strip().splitlines() or [""])[0]
            error = f"ray: {type(e).__name__}: {first}"
            return TaskResult(task_id, False, None, error, None, time.monotonic() - started)

    def shutdown(self, kill: bool = True) -> None:
        """Stop: drop queued tasks; cancel running ones (their trial processes die with their
        workers), or with kill=False wait for them. A Ray started here is stopped."""
        self._closed = True
        self._queue.clear()
        if self._active:
            if kill:
                for ref in self._active:
                    self._ray.cancel(ref, force=True)
            else:
                self._ray.wait(list(self._active), num_returns=len(self._active))
            self._active.clear()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False
