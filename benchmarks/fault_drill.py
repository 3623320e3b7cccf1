"""Fault drill: what many `robonas search` processes on one PostgreSQL study lose to real faults.

    .venv/bin/python benchmarks/fault_drill.py --out /tmp/fault-drill
    .venv/bin/python benchmarks/fault_drill.py --out /tmp/fault-drill --trials 8 --steps 6000 --json

Real training (the real trial function, launch/cartpole.toml unless --config says otherwise, with
`--trials`/`--steps` overriding its budget), real processes, a throwaway PostgreSQL server
(tests/postgres_cluster.py, reached by putting the repository root on sys.path). Two runs, each
on a fresh database of that server, each started as `--processes` copies of

    robonas search CONFIG --store URL --workers W --artifacts OUT/<run>/artifacts
                          --trials N --steps S --json

1. baseline: no faults. Wall time (first start to last exit), trials complete, trials per hour.
2. faulted: the same, and while it runs, in this order:
   (a) once process A is training its first trial, SIGKILL that trial's process (A's
       multiprocessing fork server's child, found through /proc);
   (b) once A trains again (its re-run), SIGKILL A itself while the store shows it holding a
       running trial; then start A' with the same command (it joins the study). A's fork
       server and trial processes are watched: the timeline says when each really ended;
   (a) and (b) strike mid-trial: half the baseline's median trial time into it, unless
       --kill-trial-after-s / --kill-search-after-s say otherwise;
   (c) once A' holds a trial, stop the PostgreSQL server with `pg_ctl stop -m fast` (every
       connection dropped) for --outage-s seconds, then start it again.
   Then every process is waited for.

Then it reads the store and prints one table: planned trials, complete, failed, rows, re-runs
(attempts > 0), duplicated trials (two rows with one ask number: should be 0), lost trials (not
complete/failed/rejected/pruned at the end: should be 0), whether the event numbers are gapless,
the exit codes, the wall times and their ratio; then the faults' timeline, what became of the
trials they hit, and the warning lines the processes wrote to stderr. `--json` prints all of it
as JSON instead (OUT/fault_drill.json is always written).

Every file goes under --out: logs/ (each process's stdout and stderr, the PostgreSQL server's
log), <run>/artifacts, and the server's data directory while it runs (pg/, deleted afterwards).
Every process started here runs in a process group of its own and the whole group is SIGKILLed
on the way out (normal end, error, Ctrl-C, SIGTERM); every wait has a timeout.

Leans on the standard library for processes and /proc, robonas.store for reading the study, and
tests/postgres_cluster.py for the server (Debian's postgresql package; root runs it as postgres).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests/postgres_cluster.py, and robonas from a checkout

from robonas.store import Store, TrialRow  # noqa: E402  (after the sys.path line above)

if TYPE_CHECKING:
    from tests.postgres_cluster import Cluster

FINISHED = ("complete", "failed", "rejected", "pruned")
_T = TypeVar("_T")


# --- processes --------------------------------------------------------------------------------------
@dataclass
class Proc:
    """One `robonas search` process: its Popen, log files and when it started and ended."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float
    ended: float | None = None
    killed_by_drill: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code


@dataclass
class Procs:
    """Every process the drill started. Each leads a process group of its own (new session), so
    `kill_all` reaches its fork server and trial processes too, even after it died itself."""

    items: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cwd: Path, logs: Path) -> Proc:
        out, err = logs / f"{name}.stdout", logs / f"{name}.stderr"
        with open(out, "wb") as o, open(err, "wb") as e:
            popen = subprocess.Popen(cmd, cwd=cwd, stdout=o, stderr=e, start_new_session=True)
        p = Proc(name, popen, out, err, time.monotonic())
        self.items.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.items:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while members live
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
            p.poll()


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) of every process, from /proc."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) S ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        rest = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(rest[1]), rest[0], raw.replace(b"\0", b" ").decode(errors="replace").strip())
    return table


def children(pid: int, table: dict[int, tuple[int, str, str]] | None = None) -> list[int]:
    """Live (not zombie) children of `pid`."""
    table = _proc_table() if table is None else table
    return sorted(c for c, (ppid, state, _cmd) in table.items() if ppid == pid and state != "Z")


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of `pid` with their command lines."""
    table = _proc_table()
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children(todo.pop(), table):
            out[c] = table[c][2]
            todo.append(c)
    return out


def trial_processes(search_pid: int) -> list[int]:
    """The trial processes of a search process: the children of its multiprocessing fork server
    (search -> fork server -> one child per running trial)."""
    table = _proc_table()
    servers = [c for c in children(search_pid, table) if "forkserver" in table[c][2]]
    return [t for s in servers for t in children(s, table)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :].split()[0] != "Z"


# --- the store ----------------------------------------------------------------------------------
def database_url(server_url: str, name: str) -> str:
    """Create database `name` on the server; its URL."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def study_id(store: Store) -> int | None:
    studies = store.list_studies()
    return studies[0].id if len(studies) == 1 else None


def held_by(store: Store, proc: Proc) -> list[TrialRow]:
    """Running trials whose claim names `proc` (worker ids are host:PID:tag)."""
    sid = study_id(store)
    if sid is None:
        return []
    return [t for t in store.trials(sid, "running") if t.worker and f":{proc.pid}:" in t.worker]


def trial_brief(t: TrialRow) -> dict[str, Any]:
    return {
        "id": t.id,
        "seq": t.seq,
        "origin": t.origin,
        "status": t.status,
        "attempts": t.attempts,
        "worker": t.worker,
        "error": t.error,
        "wall_s": t.wall_s,
    }


def analyse_study(url: str) -> dict[str, Any]:
    """The study's rows and the invariants a faulted run must keep."""
    with Store(url) as store:
        sid = study_id(store)
        if sid is None:
            return {"error": f"expected one study in {url}, found {len(store.list_studies())}"}
        rows = store.trials(sid)
    status = Counter(t.status for t in rows)
    seqs = Counter(t.seq for t in rows)
    events = sorted([t.seq for t in rows] + [t.tell_seq for t in rows if t.tell_seq is not None])
    return {
        "rows": len(rows),
        "asked": sum(t.origin == "ask" for t in rows),
        "asked_trained": sum(t.origin == "ask" and t.status != "rejected" for t in rows),
        "seed_check": sum(t.origin == "seed" for t in rows),
        "status": dict(status),
        "complete": status["complete"],
        "failed": status["failed"],
        "rejected": status["rejected"],
        "pruned": status["pruned"],
        "reruns": [t.id for t in rows if t.attempts > 0],
        "duplicated": sorted(seq for seq, n in seqs.items() if n > 1),
        "lost": [t.id for t in rows if t.status not in FINISHED],
        # every ask and every tell took the next number of one counter: none twice, none skipped
        "events_gapless": events == list(range(len(events))),
        "untold": [t.id for t in rows if t.origin == "ask" and t.tell_seq is None],
        "failed_trials": [trial_brief(t) for t in rows if t.status == "failed"],
        "trials": [trial_brief(t) for t in rows],
    }


# --- logs ---------------------------------------------------------------------------------------
def stderr_notes(path: Path) -> dict[str, Any]:
    """One process's stderr as distinct kinds of line, each with its first exact text and a
    count (digits, such as pids and seconds, do not make a new kind). With --json a search
    writes nothing else there, so every kind is worth a look."""
    text = path.read_text(errors="replace") if path.exists() else ""
    records: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t") and records:  # a driver's message continued on a tab line
            records[-1] += " " + line.strip()
        elif line.strip():
            records.append(line.rstrip())
    kinds: dict[str, dict[str, Any]] = {}
    for r in records:
        kinds.setdefault(re.sub(r"\d+", "N", r), {"count": 0, "line": r})["count"] += 1
    return {
        "lines": len(records),
        "retrying": sum("retrying" in r for r in records),
        "distinct": list(kinds.values()),
    }


def stdout_summary(path: Path) -> dict[str, Any] | None:
    """The `--json` summary a search prints at its end, or None (killed, or it failed)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --- one run ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One study's run: its processes, its timeline and the deadline every wait in it keeps."""

    name: str
    url: str
    cmd: list[str]
    cwd: Path
    logs: Path
    procs: Procs
    deadline: float
    members: list[Proc] = field(default_factory=list)
    # processes to report the end of (a killed search's fork server and trial processes)
    watched: dict[int, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0

    def start(self, name: str) -> Proc:
        if not self.t0:
            self.t0 = time.monotonic()
        p = self.procs.start(f"{self.name}-{name}", self.cmd, self.cwd, self.logs)
        self.members.append(p)
        self.note(f"started search process {name} (pid {p.pid})")
        return p

    def note(self, text: str, **data: Any) -> None:
        t = time.monotonic() - self.t0
        self.events.append({"t_s": round(t, 1), "event": text, **data})
        print(f"  [{self.name} {t:7.1f} s] {text}", file=sys.stderr, flush=True)

    def live(self) -> list[Proc]:
        return [p for p in self.members if p.poll() is None]

    def tick(self) -> None:
        for pid, label in list(self.watched.items()):
            if not alive(pid):
                del self.watched[pid]
                self.note(f"{label} (pid {pid}) exited", pid=pid)

    def wait_for(self, what: str, check: Callable[[], _T | None], timeout_s: float) -> _T | None:
        """Poll `check` until it returns a value; None (noted) when `timeout_s` passes, the run's
        deadline passes, or no search process is left to make it true."""
        end = min(time.monotonic() + timeout_s, self.deadline)
        while time.monotonic() < end:
            if not self.live():
                self.note(f"gave up waiting for {what}: every search process has exited")
                return None
            self.tick()
            value = check()
            if value is not None:
                return value
            time.sleep(0.25)
        self.note(f"gave up waiting for {what}: timed out")
        return None

    def wait_all(self) -> None:
        while self.live() and time.monotonic() < self.deadline:
            self.tick()
            time.sleep(0.5)
        self.tick()
        for pid, label in self.watched.items():
            self.note(f"{label} (pid {pid}) still alive after every search process exited", pid=pid)
        if self.live():
            self.note("run deadline passed: killing what is left", live=[p.name for p in self.live()])
            for p in self.live():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=10)
                p.poll()

    def result(self) -> dict[str, Any]:
        ends = [p.ended for p in self.members if p.ended is not None]
        wall = (max(ends) - self.t0) if ends else None
        study = analyse_study(self.url)
        complete = study.get("complete", 0)
        processes = {
            p.name: {
                "pid": p.pid,
                "exit_code": p.popen.returncode,
                "killed_by_drill": p.killed_by_drill,
                "wall_s": None if p.ended is None else round(p.ended - p.started, 1),
                "summary": stdout_summary(p.stdout),
                "stderr": stderr_notes(p.stderr),
            }
            for p in self.members
        }
        return {
            "wall_s": None if wall is None else round(wall, 1),
            "trials_per_h": None if not wall else round(complete / (wall / 3600.0), 1),
            "study": study,
            "processes": processes,
            "events": self.events,
        }


def baseline(run: Run, processes: int) -> dict[str, Any]:
    for i in range(processes):
        run.start(chr(ord("A") + i))
    run.wait_all()
    return run.result()


def faulted(run: Run, processes: int, server: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """The three faults, each once the run is where it should hit; a fault whose moment never
    comes (the study ended first, a timeout) is noted and skipped, never forced."""
    a = run.start("A")
    for i in range(1, processes):
        run.start(chr(ord("A") + i))
    faults: dict[str, Any] = {}
    with Store(run.url) as store:
        # (a) A's first trial is running: kill its process
        def a_training() -> tuple[int, TrialRow] | None:
            kids, held = trial_processes(a.pid), held_by(store, a)
            return (kids[0], held[0]) if kids and held else None

        got = run.wait_for("A to train its first trial", a_training, args.fault_timeout_s)
        if got:
            time.sleep(args.kill_trial_after_s)  # into the training, not its first instant
            pid, trial = got
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
                run.note(f"(a) SIGKILL trial process {pid} of A (trial {trial.id})", pid=pid, trial=trial.id)
                faults["a"] = {"pid": pid, "trial": trial.id}

        # (b) A trains again (the re-run, or its next trial): kill A while it holds a trial
        killed = faults.get("a", {}).get("pid")
        since: dict[int, float] = {}

        def a_retraining() -> list[TrialRow] | None:
            kids = [k for k in trial_processes(a.pid) if k != killed]
            now = time.monotonic()
            for k in kids:
                since.setdefault(k, now)
            if not any(now - since[k] >= args.kill_search_after_s for k in kids):
                return None
            return held_by(store, a) or None

        held = run.wait_for("A to train again", a_retraining, args.fault_timeout_s)
        if held and a.poll() is None:
            family, trial_kids = descendants(a.pid), trial_processes(a.pid)
            a.killed_by_drill = True
            os.kill(a.pid, signal.SIGKILL)
            a.popen.wait(timeout=30)
            a.poll()
            ids = [t.id for t in held]
            run.note(f"(b) SIGKILL search process A (pid {a.pid}) holding trial(s) {ids}", trials=ids)
            # Expected: its fork server sees its pipe close and exits, and its trial processes
            # die with it (PR_SET_PDEATHSIG). Watched, so the timeline says when each really ends.
            for pid, cmd in family.items():
                kind = "trial process" if pid in trial_kids else "helper"
                if "forkserver" in cmd and pid not in trial_kids:
                    kind = "fork server"
                run.watched[pid] = f"A's {kind}"
            faults["b"] = {"pid": a.pid, "trials": ids, "descendants": family, "trial_processes": trial_kids}
            a = run.start("A2")  # A': the same command, joining the study

        # (c) A' (or A, if (b) never came) holds a trial: drop the database server for outage_s
        first_held: list[float] = []

        def a_holds() -> bool | None:
            if not held_by(store, a):
                return None
            first_held.append(time.monotonic())
            return True if time.monotonic() - first_held[0] >= args.outage_after_s else None

        if run.wait_for(f"{a.name} to hold a trial", a_holds, args.fault_timeout_s) is None and run.live():
            run.note("(c) the moment never came: dropping the server anyway")
        if run.live():
            sid = study_id(store)
            running = [t.id for t in store.trials(sid, "running")] if sid is not None else []
            store.close()  # our own pool: nothing of ours to drop along with theirs
            t_stop = time.monotonic()
            server.stop("fast")
            stopped = time.monotonic()
            run.note(
                f"(c) PostgreSQL stopped (fast, {stopped - t_stop:.1f} s) with trials {running} running",
                running=running,
            )
            time.sleep(args.outage_s)
            server.start()
            down = time.monotonic() - stopped
            run.note(f"(c) PostgreSQL started again after {down:.1f} s down")
            faults["c"] = {"running": running, "down_s": round(down, 1)}
    run.wait_all()
    result = run.result()
    trials = {t["id"]: t for t in result["study"].get("trials", [])}
    if "a" in faults:
        faults["a"]["trial_after"] = trials.get(faults["a"]["trial"])
    if "b" in faults:
        faults["b"]["trials_after"] = [trials.get(i) for i in faults["b"]["trials"]]
    result["faults"] = faults
    return result


# --- output -------------------------------------------------------------------------------------
def _short(name: str, prefix: str) -> str:
    """faulted-A2 -> A'"""
    return name.removeprefix(prefix).replace("A2", "A'")


def _codes(result: dict[str, Any], prefix: str) -> str:
    return ", ".join(
        f"{_short(name, prefix)} {p['exit_code']}"
        + (" (killed by the drill)" if p["killed_by_drill"] else "")
        for name, p in result["processes"].items()
    )


def _retries(result: dict[str, Any], prefix: str) -> str:
    return ", ".join(
        f"{_short(name, prefix)} {p['stderr']['retrying']}" for name, p in result["processes"].items()
    )


def _ids(values: list[Any]) -> str:
    return f"{len(values)}" + (f" {values}" if values else "")


def table(report: dict[str, Any], out: TextIO) -> None:
    runs = [(name, report[name]) for name in ("baseline", "faulted") if report.get(name)]
    base_wall = (report.get("baseline") or {}).get("wall_s")

    def ratio(r: dict[str, Any]) -> str:
        return f"{r['wall_s'] / base_wall:.2f}x" if base_wall and r["wall_s"] else "-"

    rows: list[tuple[str, Callable[[str, dict[str, Any]], str]]] = [
        ("planned trials (--trials)", lambda n, r: str(report["settings"]["trials"])),
        ("asked: trained / rejected", lambda n, r: "{asked_trained} / {rejected}".format(**r["study"])),
        ("seed-check trials", lambda n, r: str(r["study"]["seed_check"])),
        ("rows in the store", lambda n, r: str(r["study"]["rows"])),
        ("complete", lambda n, r: str(r["study"]["complete"])),
        ("failed", lambda n, r: _ids([t["id"] for t in r["study"]["failed_trials"]])),
        ("re-runs (attempts > 0)", lambda n, r: _ids(r["study"]["reruns"])),
        ("duplicated trials (same seq)", lambda n, r: _ids(r["study"]["duplicated"])),
        ("lost trials", lambda n, r: _ids(r["study"]["lost"])),
        ("event numbers gapless", lambda n, r: "yes" if r["study"]["events_gapless"] else "NO"),
        ("exit codes", lambda n, r: _codes(r, f"{n}-")),
        ("'retrying' lines in stderr", lambda n, r: _retries(r, f"{n}-")),
        ("wall time", lambda n, r: f"{r['wall_s']} s"),
        ("wall time / baseline", lambda n, r: ratio(r)),
        ("trials complete per hour", lambda n, r: str(r["trials_per_h"])),
    ]
    cells: list[list[str]] = [["", *(name for name, _r in runs)]]
    for label, fn in rows:
        cells.append([label, *(r["study"].get("error") or fn(n, r) for n, r in runs)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    s = report["settings"]
    print(
        f"fault drill: {s['config']}, --trials {s['trials']} --steps {s['steps']}, "
        f"{s['processes']} processes x {s['workers']} worker(s), PostgreSQL",
        file=out,
    )
    if "kill_trial_after_s" in s:
        print(
            f"faults: (a) {s['kill_trial_after_s']} s into A's first trial, (b) {s['kill_search_after_s']} s "
            f"into its next training, (c) server down {s['outage_s']:g} s",
            file=out,
        )
    for i, c in enumerate(cells):
        print("| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |", file=out)
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    f = report.get("faulted")
    if f:
        print("\nfaulted run, t since its start:", file=out)
        for e in f["events"]:
            print(f"  {e['t_s']:7.1f} s  {e['event']}", file=out)
        faults = f.get("faults", {})
        after = (faults.get("a") or {}).get("trial_after")
        if after:
            print(f"  (a)'s trial {after['id']}: {after['status']}, attempts {after['attempts']}", file=out)
        for t in (faults.get("b") or {}).get("trials_after") or []:
            if t:
                print(
                    f"  (b)'s trial {t['id']}: {t['status']}, attempts {t['attempts']}, by {t['worker']}",
                    file=out,
                )
    for name, r in runs:
        for pname, p in r["processes"].items():
            kinds = p["stderr"]["distinct"]
            if kinds:
                print(f"\n{pname} stderr ({p['stderr']['lines']} lines), each kind once:", file=out)
                for item in kinds[:20]:
                    print(f"  {item['count']:4d}x {item['line'][:400]}", file=out)
                if len(kinds) > 20:
                    print(f"  ... {len(kinds) - 20} more kinds in fault_drill.json", file=out)
        for t in r["study"].get("failed_trials", []):
            print(f"\n{name}: trial {t['id']} failed: {t['error']}", file=out)
    for n in report["notes"]:
        print(f"note: {n}", file=out)


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Directory for every file (new or empty).")
    p.add_argument("--config", type=Path, default=REPO / "launch" / "cartpole.toml")
    p.add_argument("--trials", type=int, default=8, help="Trained trials per study (default 8).")
    p.add_argument("--steps", type=int, default=6000, help="Env steps per trial (default 6000).")
    p.add_argument("--processes", type=int, default=2, help="Search processes per run (default 2).")
    p.add_argument("--workers", type=int, default=1, help="--workers of each process (default 1).")
    p.add_argument("--outage-s", type=float, default=10.0, help="How long the server is down (10).")
    p.add_argument(
        "--kill-trial-after-s",
        type=float,
        help="(a): seconds into A's first trial (default: half the baseline's median trial, else 3).",
    )
    p.add_argument(
        "--kill-search-after-s",
        type=float,
        help="(b): seconds into A's next training (default: half the baseline's median trial, else 3).",
    )
    p.add_argument("--outage-after-s", type=float, default=3.0, help="(c): s after A' holds a trial.")
    p.add_argument("--fault-timeout-s", type=float, default=300.0, help="Longest wait for a fault's moment.")
    p.add_argument("--run-timeout-s", type=float, default=1200.0, help="Longest run; then it is killed.")
    p.add_argument("--no-baseline", action="store_true", help="Only the faulted run.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON instead of the table.")
    args = p.parse_args(argv)
    if args.processes < 2:
        p.error("--processes: at least 2 (A is killed; another must carry the study)")
    return args


def search_command(args: argparse.Namespace, url: str, artifacts: Path) -> list[str]:
    exe = Path(sys.executable).parent / "robonas"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "robonas.cli"]
    return [
        *head,
        "search",
        str(args.config.resolve()),
        "--store",
        url,
        "--workers",
        str(args.workers),
        "--artifacts",
        str(artifacts),
        "--trials",
        str(args.trials),
        "--steps",
        str(args.steps),
        "--json",
    ]


@contextlib.contextmanager
def postgres(out: Path, notes: list[str]) -> Iterator[Cluster]:
    """A throwaway server with its data under OUT/pg (the system temp dir if the server's user
    cannot reach OUT); its log is copied to OUT/logs/postgres.log at the end."""
    from tests.postgres_cluster import cluster, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"fault_drill: no PostgreSQL here: {why}")
    pg = out / "pg"
    pg.mkdir()
    pg.chmod(0o755)  # the server runs as `postgres` when we are root
    with contextlib.ExitStack() as stack:
        old = tempfile.tempdir
        tempfile.tempdir = str(pg)  # Cluster makes its directory with mkdtemp
        try:
            server = stack.enter_context(cluster())
        except subprocess.CalledProcessError as e:
            notes.append(f"server under {pg} failed ({e.stderr!r}); it ran in the system temp dir")
            tempfile.tempdir = old
            server = stack.enter_context(cluster())
        finally:
            tempfile.tempdir = old
        try:
            yield server
        finally:
            with contextlib.suppress(OSError):
                shutil.copyfile(server.root / "log", out / "logs" / "postgres.log")


def one_run(
    name: str, args: argparse.Namespace, server: Cluster, out: Path, procs: Procs, report: dict[str, Any]
) -> dict[str, Any]:
    """One study on a fresh database of `server`: the baseline, or the faulted run."""
    url = database_url(server.url, f"drill_{name}")
    (out / name).mkdir()
    cmd = search_command(args, url, out / name / "artifacts")
    report.setdefault("commands", {})[name] = cmd
    Store(url).close()  # the schema, made before the processes race to make it
    run = Run(name, url, cmd, out / name, out / "logs", procs, time.monotonic() + args.run_timeout_s)
    print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if name == "baseline":
        return baseline(run, args.processes)
    # Kill mid-trial by default: half a typical trial of the baseline (a trial's length depends
    # on --steps and the machine, so a fixed delay could land after its end).
    walls = [t["wall_s"] for t in (report.get("baseline") or {}).get("study", {}).get("trials", [])]
    walls = [w for w in walls if w]
    mid = round(statistics.median(walls) / 2, 1) if walls else 3.0
    for flag in ("kill_trial_after_s", "kill_search_after_s"):
        if getattr(args, flag) is None:
            setattr(args, flag, mid)
        report["settings"][flag] = getattr(args, flag)
    return faulted(run, args.processes, server, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"fault_drill: --out {out} is not empty")
    logs = out / "logs"
    logs.mkdir(parents=True)
    notes: list[str] = []
    procs = Procs()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    report: dict[str, Any] = {
        "settings": {
            "config": str(args.config),
            "trials": args.trials,
            "steps": args.steps,
            "processes": args.processes,
            "workers": args.workers,
            "outage_s": args.outage_s,
        },
        "notes": notes,
    }
    try:
        with postgres(out, notes) as server:
            try:
                for name in ([] if args.no_baseline else ["baseline"]) + ["faulted"]:
                    report[name] = one_run(name, args, server, out, procs, report)
                    (out / "fault_drill.json").write_text(json.dumps(report, indent=2, default=str))
            finally:
                procs.kill_all()  # before the server goes: no process is left retrying into nothing
    except KeyboardInterrupt:
        print("fault_drill: interrupted; stopped every process it started", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        table(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
