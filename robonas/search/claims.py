"""Who a search process is, whether another is gone, and the thread that keeps its claims alive.

Several `robonas search` processes may work one study (on one machine or many). Each trial is
claimed by one of them with a lease in the store (`Store.claim_trial`); a process renews the
leases of the trials it is running from a background thread, so a busy main loop (a long replay,
a slow scoring) never lets a live claim lapse. A process that dies stops renewing, and after
`lease_s` its trials are taken over by the others. On the same machine a dead holder is seen at
once (its pid is gone), so restarting a killed search does not wait for its own old leases.

Hand-written: this is a few lines over the store's claims, and no library we use has it (Ray's
fault tolerance covers tasks, not a driver's share of a study).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from robonas.errors import StoreError
from robonas.store import Store

log = logging.getLogger(__name__)

# Seconds a claim lasts without renewal, and how often it is renewed (three chances per lease).
DEFAULT_LEASE_S = 60.0


def worker_id() -> str:
    """This process's name in the store: host, pid and a random tag (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(worker: str) -> bool:
    """True when `worker` ran on this machine and its process no longer exists. Another
    machine's worker is never judged here: its lease decides."""
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False


class LeaseKeeper:
    """Renews this worker's claims every lease_s / 3 from a daemon thread.

    `lost()` returns (and forgets) the trials whose claim was found taken by another worker,
    which happens only when renewals failed for a whole lease (e.g. the store was unreachable).
    """

    def __init__(self, store: Store, worker: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.worker = worker
        self.lease_s = lease_s
        self._held: set[int] = set()
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="robonas-lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def lost(self) -> set[int]:
        with self._lock:
            lost, self._lost = self._lost, set()
            return lost

    def renew(self) -> None:
        with self._lock:
            ids = sorted(self._held)
        if not ids:
            return
        try:
            still = self.store.renew_leases(self.worker, ids, self.lease_s)
        except StoreError as e:
            log.warning("could not renew the claims on trials %s: %s", ids, e)
            return
        with self._lock:
            gone = (set(ids) & self._held) - still
            self._held -= gone
            self._lost |= gone
        for trial_id in sorted(gone):
            log.warning("trial %d: claim lost to another worker; its result here will be dropped", trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
