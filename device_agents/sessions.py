"""Who is talking to the agent, what they may do, and who holds the robot right now.

A `Session` is one conversation: a TLS connection (the operator proved who they are with a client
certificate during the handshake), a plain link (a serial line or loopback TCP, where the
operator proves it by signing the agent's challenge with an AUTH message), or the robot's own
console (`Session.local()`: the `robonas-agent run` command, and in-process callers).

`Lease` is the one controlling session at a time: deploys, runs, benches and rollbacks take it;
status, ping and STOP never wait for it. A lease held by an open transfer expires once that
transfer has been idle for `idle_s`, so a host that went quiet halfway cannot lock the robot.

Standard library only (threading). Roles are `device_agents.operators.ROLES`.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from device_agents.link import Link
    from device_agents.operators import Operator
    from device_agents.protocol import Message

# Every role; the robot's own console holds all of them.
ALL_ROLES = frozenset({"status", "run", "deploy", "rollback", "bench"})


class Session:
    """One conversation with the agent; `roles` say what it may do."""

    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(self, transport: str, peer: str = "", link: Link | None = None):
        with Session._ids_lock:
            Session._ids += 1
            self.id = Session._ids
        self.transport = transport  # "tls", "tcp", "serial" or "local"
        self.peer = peer
        self.link = link
        self.operator: Operator | None = None
        self.challenge: str | None = None  # the one the last HELLO handed out (plain links)
        self.send_lock = threading.Lock()
        self.worker: threading.Thread | None = None
        self.closed = threading.Event()
        self.probes: dict[str, bytes] = {}  # BENCH probes kept for an interleaved measurement
        self._local = False
        self._working = False

    @classmethod
    def local(cls) -> Session:
        """The robot's own console: every role, no proof asked (it already runs on the robot)."""
        s = cls("local", "console")
        s._local = True
        return s

    @property
    def authenticated(self) -> bool:
        return self._local or self.operator is not None

    @property
    def who(self) -> str:
        if self._local:
            return "console"
        return self.operator.name if self.operator is not None else f"anonymous {self.transport} {self.peer}"

    def may(self, role: str) -> bool:
        if self._local:
            return True
        if role == "status":
            return True  # reading status needs no proof (HELLO, STATUS, PING)
        return self.operator is not None and self.operator.may(role)

    def roles(self) -> list[str]:
        if self._local:
            return sorted(ALL_ROLES)
        return sorted(self.operator.roles | {"status"}) if self.operator is not None else ["status"]

    def busy(self) -> bool:
        """A long request of this session is being worked on (its reply not yet handed over)."""
        return self._working

    def work_done(self) -> None:
        """The worker has its reply: the session may take its next long request, even if the
        worker thread has not quite ended yet (the host sends the next one on receipt)."""
        self._working = False

    def send(self, messages: list[Message]) -> None:
        """Send frames in order; several threads of a session (its reader, its worker) share
        the link, so the frames of one reply never interleave with another's."""
        if self.link is None:
            return
        with self.send_lock:
            for m in messages:
                self.link.send(m)

    def start_worker(self, target: Callable[[], None]) -> None:
        self._working = True
        self.worker = threading.Thread(target=target, name=f"session-{self.id}-worker", daemon=True)
        self.worker.start()


class Busy(Exception):
    """The robot is held by another session: `holder` and `what` say by whom and for what."""

    def __init__(self, holder: str, what: str, since_s: float):
        super().__init__(f"{holder} holds the robot for {what} (since {since_s:.1f} s)")
        self.holder = holder
        self.what = what


class Lease:
    """The controlling session: at most one at a time (see the module docstring)."""

    def __init__(self, idle_s: float = 10.0):
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self.owner: Session | None = None
        self.what = ""
        self.since = 0.0
        self.touched = 0.0
        self.expiring = False  # True while only an open transfer holds it (it may expire)
        self.on_expire: Callable[[], None] | None = None

    def acquire(self, session: Session, what: str, expiring: bool = False) -> None:
        """Take the lease for `what` or raise Busy. A session may re-take its own lease; a lease
        that is `expiring` and idle for `idle_s` is taken from its owner (its transfer dropped)."""
        with self._lock:
            now = time.monotonic()
            owner = self.owner
            if owner is not None and owner is not session:
                # only an open transfer's lease can go stale; a run or a canary keeps it until
                # it has ended (and halted the robot), whatever became of its session
                stale = self.expiring and (now - self.touched > self.idle_s or owner.closed.is_set())
                if not stale:
                    raise Busy(owner.who, self.what, now - self.since)
                if self.on_expire is not None:
                    self.on_expire()
            self.owner, self.what, self.since, self.touched = session, what, now, now
            self.expiring = expiring
            self.on_expire = None

    def touch(self, session: Session) -> None:
        with self._lock:
            if self.owner is session:
                self.touched = time.monotonic()

    def release(self, session: Session) -> None:
        with self._lock:
            if self.owner is session:
                self.owner, self.what, self.expiring, self.on_expire = None, "", False, None

    def holds(self, session: Session) -> bool:
        return self.owner is session

    def describe(self) -> dict[str, Any] | None:
        owner = self.owner
        if owner is None:
            return None
        return {"holder": owner.who, "what": self.what, "since_s": round(time.monotonic() - self.since, 3)}
