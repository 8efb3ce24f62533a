#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import common, opacus, flwr, ray" 2>/dev/null || bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
