"""The store's claims and event order, on SQLite and PostgreSQL: what lets many search processes
work one study (robonas.search.loop) without running a trial twice or writing over each other."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from robonas.errors import ClaimLost, EventOrderConflict
from robonas.metrics import TrialMetrics
from robonas.search.claims import LeaseKeeper, holder_is_gone, worker_id
from robonas.space import Layer, PolicyArch
from robonas.store import Store


def _arch(width: int = 8) -> PolicyArch:
    return PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width, "tanh"),))


@pytest.fixture
def store(url: str):
    s = Store(url)
    yield s
    s.close()


def test_a_pending_trial_is_claimed_once_and_a_live_claim_is_never_taken(store):
    sid = store.create_study("s", {}).id
    ids = [store.add_trial(sid, i, _arch(8 + i)).id for i in range(3)]
    first = store.claim_trial(sid, "a", lease_s=60)
    second = store.claim_trial(sid, "b", lease_s=60)
    assert (first.id, first.worker, first.status) == (ids[0], "a", "running")
    assert second.id == ids[1] and second.worker == "b"
    assert first.lease_until > time.time() + 50
    assert store.claim_trial(sid, "c", lease_s=60).id == ids[2]
    assert store.claim_trial(sid, "c", lease_s=60) is None  # every claim is live


def test_a_lapsed_claim_is_taken_over_and_its_old_holder_cannot_write(store):
    sid = store.create_study("s", {}).id
    tid = store.add_trial(sid, 0, _arch()).id
    store.claim_trial(sid, "dead", lease_s=60)
    store.add_curve_point(tid, 100, 1.0, 0.0)
    assert store.claim_trial(sid, "alive", lease_s=60) is None
    # the holder's process is known to be gone: taken at once
    taken = store.claim_trial(sid, "alive", lease_s=60, lost=lambda w: w == "dead")
    assert taken.id == tid and taken.worker == "alive" and taken.attempts == 1
    assert store.curve(tid) == []  # the old attempt's points went with it
    with pytest.raises(ClaimLost, match="no longer held by dead"):
        store.complete_trial(tid, TrialMetrics(objective=0.1), [(100, 1.0, 0.0)], 1.0, 100, worker="dead")
    with pytest.raises(ClaimLost):
        store.fail_trial(tid, "boom", worker="dead")
    store.complete_trial(tid, TrialMetrics(objective=0.2), [(100, 2.0, 0.0)], 1.0, 100, worker="alive")
    done = store.get_trial(tid)
    assert done.status == "complete" and done.metrics.objective == 0.2 and done.lease_until is None


def test_a_lease_that_ran_out_lapses_and_renewal_keeps_one_alive(store):
    sid = store.create_study("s", {}).id
    a, b = (store.add_trial(sid, i, _arch(8 + i)).id for i in range(2))
    store.claim_trial(sid, "w1", lease_s=0.5)
    store.claim_trial(sid, "w2", lease_s=0.5)
    time.sleep(0.3)
    assert store.renew_leases("w1", [a, b], lease_s=60) == {a}  # b is w2's
    time.sleep(0.4)
    taken = store.claim_trial(sid, "w3", lease_s=60)
    assert taken.id == b  # w2 never renewed; w1's renewed claim holds
    assert store.renew_leases("w2", [b], lease_s=60) == set()


def test_events_are_written_only_in_order(store):
    sid = store.create_study("s", {}).id
    assert store.next_event(sid) == 0
    t = store.add_trial(sid, 0, _arch(), ordered=True, status="running", worker="w", lease_s=60)
    with pytest.raises(EventOrderConflict, match="not the next one"):
        store.add_trial(sid, 0, _arch(16), ordered=True)  # another process got 0 first
    with pytest.raises(EventOrderConflict):
        store.add_trial(sid, 5, _arch(16), ordered=True)
    store.complete_trial(t.id, TrialMetrics(objective=0.1), [], 1.0, 0, worker="w", tell_seq=1)
    assert store.get_trial(t.id).tell_seq == 1 and store.next_event(sid) == 2
    with pytest.raises(EventOrderConflict, match="told already"):
        store.record_tell(t.id, 2, ordered=True)
    # a refused write leaves nothing behind
    assert [x.id for x in store.trials(sid)] == [t.id]


def test_release_puts_only_the_holders_trials_back(store):
    sid = store.create_study("s", {}).id
    ids = [store.add_trial(sid, i, _arch(8 + i)).id for i in range(3)]
    for w in ("a", "b", "a"):
        store.claim_trial(sid, w, lease_s=60)
    store.add_curve_point(ids[0], 10, 1.0, 0.0)
    assert store.release_claims(sid, "a") == 2
    statuses = {t.id: (t.status, t.worker, t.attempts) for t in store.trials(sid)}
    assert statuses[ids[1]] == ("running", "b", 0)
    assert statuses[ids[0]][0] == statuses[ids[2]][0] == "pending"
    assert store.curve(ids[0]) == []


def test_concurrent_claimers_never_share_a_trial(url):
    """Eight threads with a store each race for 40 trials: each trial is claimed exactly once."""
    with Store(url) as setup:
        sid = setup.create_study("race", {}).id
        for i in range(40):
            setup.add_trial(sid, i, _arch(8 + i))
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        with Store(url) as s:
            while (t := s.claim_trial(sid, name, lease_s=60)) is not None:
                with lock:
                    claimed.append((name, t.id))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = [tid for _, tid in claimed]
    assert len(ids) == 40 and len(set(ids)) == 40
    with Store(url) as check:
        assert {(t.worker, t.id) for t in check.trials(sid)} == {(w, tid) for w, tid in claimed}


def test_the_study_lock_excludes_other_processes(url, tmp_path):
    """A second process blocks on the study lock until the first lets go (flock on SQLite, an
    advisory lock on PostgreSQL), and gets it when the holder is SIGKILLed."""
    with Store(url) as s:
        sid = s.create_study("locked", {}).id
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from robonas.store import Store\n"
            f"s = Store({url!r})\n"
            f"with s.study_lock({sid}):\n"
            f"    pathlib.Path({str(ready)!r}).write_text('x')\n"
            "    time.sleep(600)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        got = threading.Event()

        def take() -> None:
            with Store(url) as s2, s2.study_lock(sid):
                got.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not got.wait(1.5)  # held by the other process
        os.kill(holder.pid, 9)
        assert got.wait(30)  # the kernel or the server dropped the dead holder's lock
    finally:
        holder.kill()
        holder.wait()


def test_holder_is_gone_knows_only_this_machine():
    me = worker_id()
    assert not holder_is_gone(me)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = me.split(":")[0]
    assert holder_is_gone(f"{host}:{child.pid}:deadbeef")
    assert not holder_is_gone(f"another-host:{child.pid}:deadbeef")  # its lease decides


def test_the_lease_keeper_renews_and_reports_a_claim_it_lost(sqlite_url):
    store = Store(sqlite_url)
    sid = store.create_study("k", {}).id
    tid = store.add_trial(sid, 0, _arch()).id
    store.claim_trial(sid, "me", lease_s=6)
    keeper = LeaseKeeper(store, "me", lease_s=6).start()
    keeper.hold(tid)
    try:
        time.sleep(2.5)  # one renewal (every lease / 3)
        assert store.get_trial(tid).lease_until > time.time() + 4.5
        store.release_claims(sid, "me")
        store.claim_trial(sid, "other", lease_s=60)
        keeper.renew()
        assert keeper.lost() == {tid} and keeper.lost() == set()
    finally:
        keeper.stop()
