"""The scripted stub trainer (stub_trainer.py), made to take time and to leave a trace: it sleeps
STUB_SLEEP_S seconds spread over its checkpoints (so a test can kill it mid-trial) and appends
"start"/"end" lines with its trial id and pid to the file named by STUB_TRIAL_LOG, so a test can
count how often each trial really ran. With STUB_FAIL set, every trial fails."""

from __future__ import annotations

import os
import time
from typing import Any

import stub_trainer


def _log(event: str, trial_id: int) -> None:
    path = os.environ.get("STUB_TRIAL_LOG")
    if path:
        # one short line per write with O_APPEND: whole lines even with many writers
        with open(path, "a") as f:
            f.write(f"{event} {trial_id} {os.getpid()}\n")


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    spec = payload["spec"]
    trial_id = spec.report.trial_id if spec.report is not None else -1
    _log("start", trial_id)
    time.sleep(float(os.environ.get("STUB_SLEEP_S", "0")))
    if os.environ.get("STUB_FAIL"):
        raise RuntimeError("the stub trainer was told to fail (STUB_FAIL)")
    out = stub_trainer.run_trial(payload)
    _log("end", trial_id)
    return out
