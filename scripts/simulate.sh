#!/usr/bin/env bash
# The main job: federated DP training with every MovieLens-100K user as a Flower client.
# Runs `flwr run .` against Flower's managed local SuperLink (simulation runtime, Ray
# backend). Extra arguments go to `flwr run`, e.g. --run-config 'num-server-rounds=20'.
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
exec .venv/bin/flwr run . local --stream --run-config "output-dir='$PWD/runs'" "$@"
