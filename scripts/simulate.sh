#!/usr/bin/env bash
# The main job: federated DP training with every MovieLens-100K user as a Flower client.
# Runs `flwr run .` against Flower's managed local SuperLink (simulation runtime, Ray
# backend) through simulations/simulate.py; pass overrides as --run-config 'num-server-rounds=20'.
# PRIVREC_SUPERNODES sets the number of simulated clients (default: all 943 users).
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
# Flower's managed local SuperLink listens on fixed ports (39091/39093) by default, so two FLWR_HOMEs
# (two checkouts, a test beside a benchmark) would share one SuperLink and run on each other's
# installation. Each FLWR_HOME gets its own pair of ports unless they are set explicitly.
if [ -z "${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-}" ]; then
  slot=$(( $(printf '%s' "$FLWR_HOME" | cksum | cut -d' ' -f1) % 4000 ))
  export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$(( 41000 + 2 * slot ))
  export FLWR_LOCAL_CONTROL_API_PORT=$(( 41001 + 2 * slot ))
fi
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = ${PRIVREC_SUPERNODES:-943}
options.backend.client-resources.num-cpus = 1
TOML
# With RAY_ADDRESS set, Flower's Ray backend joins that existing cluster (ray.init reads it);
# Ray then refuses a CPU count, so one is only given for a fresh local Ray instance.
if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "options.backend.init-args.num-cpus = ${PRIVREC_CPUS:-$(nproc)}" >> "$FLWR_HOME/config.toml"
fi
# The launcher checks the run config before Flower does (naming a bad key) and exits non-zero
# unless the run completed: `flwr run --stream` alone exits 0 when the ServerApp fails.
exec .venv/bin/python -m simulations.simulate --run-config "output-dir='$PWD/runs'" "$@"
