"""The main job's launcher: check the run config, start a simulation SuperLink of its own
(:mod:`simulations.local_superlink`), run ``flwr run`` on it, follow its log, exit with the run's
outcome, and stop the SuperLink.

``flwr run --stream`` exits 0 even when the ServerApp fails, and Flower refuses an unknown
run-config key without naming it. This launcher checks every key and value before Flower sees
them (exit 2, naming the key), then reads the run's final status from the SuperLink and exits 0
only for ``finished:completed`` (1 otherwise, with the status printed). It does not wait for
client tasks still running after the ServerApp completed (:func:`server.deploy.run_and_wait`).

    python -m simulations.simulate [--run-config 'key=value ...'] [--supernodes N] [--cpus C]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from common.device_policy import DevicePolicy
from common.run_config import DEFAULTS, ConfigError, resolve

ROOT = Path(__file__).resolve().parent.parent


def check_overrides(run_configs: list[str]) -> dict:
    """The overrides Flower will read from the ``--run-config`` strings (with Flower's own parser),
    resolved against the defaults; raises ConfigError naming the first unknown or invalid key."""
    import click
    from flwr.common.config import parse_config_args

    try:
        merged = parse_config_args(run_configs)
    except (click.ClickException, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise ConfigError(f"--run-config {run_configs!r}: {message}") from None
    unknown = sorted(set(merged) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"--run-config: unknown key(s) {unknown}; the keys are those of [tool.flwr.app.config] "
                          f"in pyproject.toml ({len(DEFAULTS)} keys, e.g. num-server-rounds, noise-multiplier)")
    cfg = resolve(merged)
    simulated = DevicePolicy.from_node_config({"partition-id": 0})  # what every simulated device applies
    asked_less = simulated.violations(cfg)
    if asked_less:
        raise ConfigError(f"--run-config: {asked_less} ask for less privacy than the simulated devices' policy "
                          f"(common/device_policy.py: {simulated.to_json()}); every device would refuse")
    return merged


def main(run_config: Optional[list[str]] = typer.Option(None, help="run-config overrides, as for flwr run"),
         supernodes: int = typer.Option(943, min=1, help="simulated clients (MovieLens users)"),
         cpus: Optional[int] = typer.Option(None, min=1, help="CPUs for the simulation (default: all; ignored "
                                                               "when RAY_ADDRESS joins an existing Ray cluster)"),
         timeout: float = typer.Option(6 * 3600, help="seconds to wait for the run to end"),
         app_dir: Path = typer.Option(ROOT, help="the Flower app folder to run (default: privrec)")) -> None:
    """Run the federation and exit 0 only if it completed."""
    from server.deploy import run_and_wait
    from simulations.local_superlink import local_superlink

    configs = list(run_config or [])
    try:
        check_overrides(configs)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    home = os.environ.get("FLWR_HOME") or str(ROOT / ".flwr")
    ray_cpus = None if os.environ.get("RAY_ADDRESS") else (cpus or os.cpu_count() or 1)
    with local_superlink(home, supernodes, ray_cpus) as port:
        typer.echo(f"simulation SuperLink on 127.0.0.1:{port} (FLWR_HOME {home})")
        run_id, status = run_and_wait(app_dir, configs, "local", home, timeout=timeout, stream=sys.stdout)
    typer.echo(f"run {run_id}: {status}")
    if not status.startswith("finished:completed"):
        typer.echo(f"error: run {run_id} did not complete ({status}); see the log above", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
