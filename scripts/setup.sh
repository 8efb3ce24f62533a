#!/usr/bin/env bash
# Create .venv and install privrec with pinned, tested versions (CPU-only torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first: the local CPU build; every later range admits only this version.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# MovieLens-100K ships inside the recbole wheel; it is a data source, never imported.
python -m pip install --quiet --no-deps "recbole==1.2.1"
python -c "import torch, common.movielens as m; print('torch', torch.__version__); print('data', m.recbole_ml100k_dir())"
