"""Watching a search: one line per trial as it ends (also into a file or a pipe), the study's
log file written as it goes, and a search where no trial completed exiting non-zero with why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_shared_study import DRIVER, _write_config

LINE = re.compile(r"^trial \d+( \(seed check\))? (complete|failed|rejected|pruned)  ")


def _search(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = _write_config(tmp_path / "shared.toml")
    url = f"sqlite:///{tmp_path / 'db' / 'robonas.db'}"
    cmd = [
        sys.executable,
        str(DRIVER),
        "search",
        str(config),
        "--store",
        url,
        "--workers",
        "2",
        "--trials",
        "4",
        *extra,
    ]
    run_env = {**os.environ, "STUB_SLEEP_S": "0.2", **(env or {})}
    with open(tmp_path / "out.txt", "w") as out:  # a file, not a terminal
        r = subprocess.run(
            cmd,
            cwd=tmp_path,
            env=run_env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
            check=False,
        )
    return subprocess.CompletedProcess(r.args, r.returncode, (tmp_path / "out.txt").read_text(), r.stderr)


def test_a_search_into_a_file_shows_one_line_per_trial_and_logs_as_it_goes(tmp_path):
    r = _search(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if LINE.match(line)]
    from robonas.store import Store

    with Store(f"sqlite:///{tmp_path / 'db' / 'robonas.db'}") as store:
        trials = store.trials(store.get_study("shared").id)
    assert len(lines) == len(trials) >= 4, r.stdout
    for t in trials:  # each trial's line names it, its figures and its architecture
        (line,) = [x for x in lines if x.startswith(f"trial {t.id} ")]
        assert t.status in line and t.arch.describe() in line and "objective" in line and " s  " in line
    log = (tmp_path / "db" / "studies" / "shared" / "search.log").read_text().splitlines()
    assert "joins study shared" in log[0] and "done: " in log[-1]
    logged = [x.split(" ", 2)[2] for x in log if LINE.match(x.split(" ", 2)[2])]
    assert sorted(logged) == sorted(lines)


def test_a_search_where_every_trial_failed_exits_non_zero_with_the_reason(tmp_path):
    r = _search(tmp_path, "--json", env={"STUB_FAIL": "1"})
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("robonas: error: no trial of study 'shared' completed (4 failed, 0 rejected)")
    assert "the stub trainer was told to fail" in last
    # with --json the trial lines go to stderr, and stdout is the summary alone
    assert sum(bool(LINE.match(x)) for x in r.stderr.splitlines()) == 4
    import json

    assert json.loads(r.stdout)["failed"] == 4
    # `top` says why the table has no rows
    url = f"sqlite:///{tmp_path / 'db' / 'robonas.db'}"
    top = subprocess.run(
        [sys.executable, "-m", "robonas", "top", "shared", "--store", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert top.returncode == 0, top.stderr
    failed = [x for x in top.stdout.splitlines() if re.match(r"^trial \d+ failed: .*told to fail", x)]
    assert len(failed) == 4, top.stdout
