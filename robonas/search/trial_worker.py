"""What runs inside a trial's worker process: train one candidate and return plain data.

Kept tiny and importable by path ("robonas.search.trial_worker:run_trial") so the executor's child
process imports only what one trial needs.
"""

from __future__ import annotations

from typing import Any


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    from robonas.search.training import train_trial

    outcome = train_trial(payload["spec"])
    return outcome.to_dict()
