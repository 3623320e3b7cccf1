"""Tiny task functions the executor tests run in child processes (imported by name there)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def square(payload: dict[str, Any]) -> int:
    return payload["x"] ** 2


def boom(payload: dict[str, Any]) -> None:
    raise ValueError(f"bad value {payload['x']}")


def segfault(payload: dict[str, Any]) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)


def exit_quietly(payload: dict[str, Any]) -> None:
    os._exit(3)  # no cleanup, no result: like a native crash that exits


def sleep(payload: dict[str, Any]) -> float:
    time.sleep(payload["s"])
    return payload["s"]


def window(payload: dict[str, Any]) -> tuple[float, float, int]:
    """Sleep and report (start, end, pid) in wall-clock time so overlap can be counted."""
    t0 = time.time()
    time.sleep(payload["s"])
    return t0, time.time(), os.getpid()


def child_env(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
        "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
    }


def unpicklable(payload: dict[str, Any]) -> Any:
    return lambda: None


def sleep_recording_pid(payload: dict[str, Any]) -> None:
    with open(payload["pidfile"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(payload["s"])
