#!/usr/bin/env bash
# Experiment for the unfinished loop test of issue "Close the loop" (see run_on_robot.py).
# Usage: bash scripts/experiments/latency_flip/run.sh WORKDIR [PROFILE]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$work"
"$here/../../../.venv/bin/robonas" search "$here/flip.toml" --workers 2 --store "sqlite:///$work/runs/robonas.db"
"$here/../../../.venv/bin/python" "$here/run_on_robot.py" "$work" "${2:-cartpole-mcu-d}"
