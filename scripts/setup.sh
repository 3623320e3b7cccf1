#!/usr/bin/env bash
# Create .venv and install robonas with the host and test extras, from scratch.
# torch is installed first at its pinned version so that pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[host,test,postgres,ray,tensorboard]'
echo "robonas installed in .venv"
