"""privrec ServerApp (Flower Message API): federated DP training of the global adapters."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the configured federation; artefacts go to ``<output-dir>/<run-id>/``."""
    run_federation(grid, dict(context.run_config), flower_run_id=int(context.run_id))
