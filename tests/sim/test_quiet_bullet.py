"""pybullet's banner silencer swaps process-wide fds: it must be safe under threads."""

from __future__ import annotations

import os
import threading
import time

from sim.envs._quiet_bullet import silenced_fds


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_threads_silencing_at_once_leave_stdout_and_stderr_where_they_were():
    before = (_identity(1), _identity(2))

    def work() -> None:
        for _ in range(50):
            with silenced_fds():
                assert _identity(1) == _identity(2)  # both on /dev/null inside
                time.sleep(0.0005)  # let another thread enter meanwhile (pybullet's connect does)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (_identity(1), _identity(2)) == before
