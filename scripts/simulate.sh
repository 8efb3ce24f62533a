#!/usr/bin/env bash
# The main job: federated DP training with every MovieLens-100K user as a Flower client.
# Runs `flwr run .` on a simulation SuperLink of its own (Ray backend) through
# simulations/simulate.py; pass overrides as --run-config 'num-server-rounds=20'.
# PRIVREC_SUPERNODES sets the number of simulated clients (default: all 943 users),
# PRIVREC_CPUS the CPUs Ray may use (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/flwr ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
# The app's dependencies are already in .venv; never let Flower re-resolve them (that
# would pull a CUDA build of torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1  # no network here; skip the version check
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$FLWR_HOME"
supernodes="${PRIVREC_SUPERNODES:-943}"
case "$supernodes" in
  ''|*[!0-9]*) echo "error: PRIVREC_SUPERNODES must be a positive whole number, got '$supernodes'" >&2; exit 2 ;;
esac
args=(--supernodes "$supernodes")
if [ -n "${PRIVREC_CPUS:-}" ]; then
  case "$PRIVREC_CPUS" in
    *[!0-9]*) echo "error: PRIVREC_CPUS must be a positive whole number, got '$PRIVREC_CPUS'" >&2; exit 2 ;;
  esac
  args+=(--cpus "$PRIVREC_CPUS")
fi
# The launcher checks the run config before Flower does (naming a bad key), exits non-zero
# unless the run completed, and stops the SuperLink it started.
exec .venv/bin/python -m simulations.simulate "${args[@]}" --run-config "output-dir='$PWD/runs'" "$@"
