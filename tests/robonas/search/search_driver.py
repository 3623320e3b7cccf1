"""`robonas` as a real process whose trials run the slow stub trainer: what the multi-process
tests start (`python search_driver.py search CONFIG --store URL ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stub trainers, for the workers too

import robonas.search.loop
from robonas.cli.app import main

if __name__ == "__main__":  # the fork server imports this module: run only as the script
    robonas.search.loop.TRIAL_FN = "slow_stub_trainer:run_trial"
    main(sys.argv[1:])
