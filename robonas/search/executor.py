"""Trial executors: run one trial function per task somewhere else and report how it ended.

`Executor` is the extension point (a Ray executor is the scaled-up form); `LocalProcessExecutor`
is the embedded default. It leans on the standard library's `multiprocessing`: each task runs in
its OWN child process, so a trial that segfaults inside pybullet, leaks memory or hangs costs
only itself. Children start with the "forkserver" context (the parent usually has torch loaded
with its thread pools, which must not be forked); the fork server preloads torch once so every
child starts with it already imported. Waiting is done on the result pipes and the process
sentinels with `multiprocessing.connection.wait`, never by spinning.

The function a task runs is named by a string, "package.module:function", and imported in the
child, so the parent never imports trial code (nor torch, for the CLI's sake).
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import os
import signal
import sys
import time
import weakref
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from robonas.errors import ConfigError

if TYPE_CHECKING:
    # ForkServerContext exists only where fork does (not on Windows): annotations only
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess

# How many trailing traceback lines a failed task reports (the exception and where it was raised).
TRACEBACK_LINES = 12
# Grace period between SIGTERM and SIGKILL when stopping a child.
TERMINATE_GRACE_S = 1.0
# How long a child may take to exit after sending its result before it is stopped.
EXIT_GRACE_S = 10.0
# Environment a child sets before importing anything, so numeric libraries use one thread
# per trial process: the parallelism is across processes.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class TaskResult:
    """How one task ended. `value` is the function's return value when ok, else None."""

    task_id: Hashable
    ok: bool
    value: Any | None
    error: str | None
    exit_code: int | None
    wall_s: float
    # the task's process died without a result (killed, crashed): worth running again
    lost: bool = False


class Executor(abc.ABC):
    """Runs tasks `fn_path(payload)` concurrently, at most `capacity` at a time.

    `submit` never blocks: tasks beyond capacity wait in a queue. `poll` returns the tasks that
    finished, waiting up to `timeout` seconds for at least one. `running()` counts tasks
    submitted and not yet returned by `poll` (queued ones included), so a driver keeps
    `capacity - running()` tasks in flight.
    """

    @property
    @abc.abstractmethod
    def capacity(self) -> int: ...

    @abc.abstractmethod
    def submit(
        self, task_id: Hashable, fn_path: str, payload: dict[str, Any], timeout_s: float | None = None
    ) -> None: ...

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[TaskResult]: ...

    @abc.abstractmethod
    def running(self) -> int: ...

    @abc.abstractmethod
    def shutdown(self, kill: bool = True) -> None: ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(kill=True)


def check_fn_path(fn_path: str) -> tuple[str, str]:
    """Split "package.module:function"; raise ConfigError naming the bad value otherwise."""
    module, sep, name = fn_path.partition(":")
    if (
        not sep
        or not module
        or not name.isidentifier()
        or not all(p.isidentifier() for p in module.split("."))
    ):
        raise ConfigError(f"task function {fn_path!r} is not of the form 'package.module:function'")
    return module, name


def _exit_when_orphaned(conn: Connection) -> None:
    """Exit this task's process as soon as the process that waits for its result is gone.

    PR_SET_PDEATHSIG (`_die_with_parent`) names the *fork server* as the parent, and the fork
    server lives on while any task it forked does (each task inherits a copy of the pipe the
    fork server watches for its client's death). So a SIGKILLed search's trials would train on,
    unwatched and past their timeouts, beside the re-runs that take them over. The result pipe
    says it instead: its write end reports an error once the reading end's only holder, the
    waiting process, has died. A daemon thread blocks on that without using any CPU.
    """
    import select
    import threading

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLERR | select.POLLHUP)
        while True:
            try:
                if poller.poll():
                    os._exit(70)  # nobody is left to read the result (EX_SOFTWARE)
            except InterruptedError:
                continue

    threading.Thread(target=watch, name="robonas-orphan-watch", daemon=True).start()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG): a trial
    must not outlive a search killed with SIGKILL, nor a Ray worker that was cancelled (with the
    fork server as the parent this covers the fork server's death; `_exit_when_orphaned` covers
    the search's)."""
    if not sys.platform.startswith("linux"):
        return
    import contextlib
    import ctypes

    # no prctl in this libc: the parent's shutdown still stops the child
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def check_submission(
    closed: bool, task_id: Hashable, fn_path: str, timeout_s: float | None, pending: Iterable[Hashable]
) -> None:
    """What every executor refuses at submit: after shutdown, a bad function path or timeout, and
    a task id that is still in flight (`pending`)."""
    if closed:
        raise ConfigError("executor is shut down; create a new one to submit tasks")
    check_fn_path(fn_path)
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"task timeout: {timeout_s!r} is not a positive number of seconds")
    if task_id in pending:
        raise ConfigError(f"task id {task_id!r} is already submitted and not yet returned")


def _child_main(conn: Connection, fn_path: str, payload: dict[str, Any], sys_path: list[str]) -> None:
    """Entry point of a task's process: run the function, send ("ok", value) or ("err", text)."""
    import importlib
    import importlib.util
    import traceback

    # The terminal's Ctrl-C goes to the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _exit_when_orphaned(conn)
    os.environ.update(_CHILD_ENV)
    # The fork server may have started before the caller extended sys.path.
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        module, name = check_fn_path(fn_path)
        if importlib.util.find_spec("torch") is not None:
            import torch

            torch.set_num_threads(1)
        fn = getattr(importlib.import_module(module), name)
        msg: tuple[str, Any] = ("ok", fn(payload))
    except BaseException:  # noqa: BLE001  (whatever the task raised goes back to the parent as text)
        lines = traceback.format_exc().rstrip().splitlines()
        msg = ("err", "\n".join(lines[-TRACEBACK_LINES:]))
    try:
        conn.send(msg)
    except Exception as e:  # noqa: BLE001  (the value could not be pickled; pickle raises many kinds)
        conn.send(("err", f"task result could not be sent back: {type(e).__name__}: {e}"))
    conn.close()


def _death_message(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"died with signal {name} (exit {exit_code})"
    return f"exited with code {exit_code} without a result"


def _stop(proc: BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(TERMINATE_GRACE_S)
    if proc.is_alive():
        proc.kill()
    proc.join()


def _stop_all(procs: dict[Hashable, _Running]) -> None:
    for task in list(procs.values()):
        _stop(task.proc)
        task.conn.close()
    procs.clear()


@dataclass
class _Running:
    task_id: Hashable
    proc: BaseProcess
    conn: Connection
    started: float
    deadline: float | None
    timeout_s: float | None
    message: tuple[str, Any] | None = field(default=None)
    eof: bool = False


def _default_context() -> ForkServerContext | SpawnContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Import torch once in the (clean, single-threaded) fork server; children inherit it.
        # Ignored by multiprocessing if torch is not installed.
        ctx.set_forkserver_preload(["torch"])
        return ctx
    return mp.get_context("spawn")


class LocalProcessExecutor(Executor):
    """Up to `workers` tasks at once on this machine, each in a fresh child process."""

    def __init__(self, workers: int | None = None, start_method: str | None = None) -> None:
        workers = (os.cpu_count() or 1) if workers is None else workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"executor workers: {workers!r} is not a positive integer")
        if start_method is not None and start_method not in ("forkserver", "spawn"):
            raise ConfigError(
                f"executor start method: {start_method!r} is not one of "
                "forkserver, spawn (fork is unsafe with torch loaded)"
            )
        self._workers = workers
        self._ctx: ForkServerContext | SpawnContext
        if start_method is None:
            self._ctx = _default_context()
        elif start_method == "forkserver":
            self._ctx = mp.get_context("forkserver")
        else:
            self._ctx = mp.get_context("spawn")
        self._queue: deque[tuple[Hashable, str, dict[str, Any], float | None]] = deque()
        self._active: dict[Hashable, _Running] = {}
        self._closed = False
        # Children are not daemonic (a trial may start its own vec-env processes), so make
        # sure none outlives the executor if the caller forgets shutdown().
        self._finalizer = weakref.finalize(self, _stop_all, self._active)

    @property
    def capacity(self) -> int:
        return self._workers

    def running(self) -> int:
        return len(self._active) + len(self._queue)

    def submit(
        self, task_id: Hashable, fn_path: str, payload: dict[str, Any], timeout_s: float | None = None
    ) -> None:
        check_submission(
            self._closed, task_id, fn_path, timeout_s, [*self._active, *(q[0] for q in self._queue)]
        )
        self._queue.append((task_id, fn_path, payload, timeout_s))
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._active) < self._workers:
            task_id, fn_path, payload, timeout_s = self._queue.popleft()
            recv, send = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(
                target=_child_main, args=(send, fn_path, payload, sys.path), name=f"robonas-task-{task_id}"
            )
            started = time.monotonic()
            proc.start()
            send.close()  # the parent's copy; EOF on `recv` then means the child is gone
            deadline = None if timeout_s is None else started + timeout_s
            self._active[task_id] = _Running(task_id, proc, recv, started, deadline, timeout_s)

    def poll(self, timeout: float) -> list[TaskResult]:
        """Collect finished tasks, waiting up to `timeout` s for the first one."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            self._fill()
            done = self._collect()
            now = time.monotonic()
            if done or not self._active or now >= end:
                self._fill()
                return done
            deadlines = [t.deadline for t in self._active.values() if t.deadline is not None]
            wake = min([end, *deadlines])
            # Pipes for the result, sentinels for a death: a grandchild holding a copy of the
            # pipe must not hide its parent's death.
            handles: list[Any] = [t.proc.sentinel for t in self._active.values()]
            handles += [t.conn for t in self._active.values() if t.message is None and not t.eof]
            wait(handles, timeout=max(0.0, wake - now))

    def _collect(self) -> list[TaskResult]:
        """Finish every task that has sent its result, died, or run past its deadline."""
        done: list[TaskResult] = []
        now = time.monotonic()
        for task in list(self._active.values()):
            self._read_result(task, now)
            task.proc.join(0)
            exited = task.proc.exitcode is not None
            if exited:
                # It may have sent and exited between the read above and the join.
                self._read_result(task, now)
            late = task.deadline is not None and now >= task.deadline
            if task.message is not None:
                if not exited and not late:
                    continue
                _stop(task.proc)
                ok = task.message[0] == "ok"
                done.append(
                    self._finish(task, ok, task.message[1] if ok else None, None if ok else task.message[1])
                )
            elif exited:
                done.append(self._finish(task, False, None, _death_message(task.proc.exitcode), lost=True))
            elif late:
                _stop(task.proc)
                done.append(self._finish(task, False, None, f"timed out after {task.timeout_s:g} s"))
        return done

    @staticmethod
    def _read_result(task: _Running, now: float) -> None:
        if task.message is not None or task.eof or not task.conn.poll():
            return
        try:
            task.message = task.conn.recv()
        except (EOFError, OSError):
            task.eof = True  # closed without a result: it died, the exit code says how
            return
        # A child that hangs on its way out after sending is not waited on forever.
        exit_by = now + EXIT_GRACE_S
        task.deadline = exit_by if task.deadline is None else min(task.deadline, exit_by)

    def _finish(
        self, task: _Running, ok: bool, value: Any, error: str | None, lost: bool = False
    ) -> TaskResult:
        del self._active[task.task_id]
        task.conn.close()
        exit_code = task.proc.exitcode
        task.proc.close()
        return TaskResult(task.task_id, ok, value, error, exit_code, time.monotonic() - task.started, lost)

    def shutdown(self, kill: bool = True) -> None:
        """Stop: drop queued tasks; kill running children, or with kill=False wait for them."""
        self._closed = True
        self._queue.clear()
        if not kill:
            for task in self._active.values():
                task.proc.join()
        _stop_all(self._active)
