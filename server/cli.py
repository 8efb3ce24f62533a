"""The server operator's ``privrec`` commands: ``audit`` and the server side of ``deploy`` (``certs``,
``superlink``, ``connect``, ``register``, ``run``). Plain functions; ``simulations/cli.py`` registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from common.cli_support import console, fail


def audit(
    run_dir: Path = typer.Argument(..., help="a run folder (<output-dir>/<run-id>/)"),
    ledgers: Optional[list[Path]] = typer.Option(None, help="folder(s) of client ledgers (default RUN_DIR/clients)"),
) -> None:
    """Accounting audit of a run: write RUN_DIR/audit.json and RUN_DIR/audit.html.

    Exits 1 when a consistency check fails (the report is still written), 2 on unreadable or
    malformed input (the message names the file), 3 when the report cannot be written.
    """
    from common.errors import DataFormatError
    from server.audit.accounting import write_audit

    try:
        json_path, html_path, report = write_audit(run_dir, ledgers)
    except DataFormatError as exc:
        fail(exc, label="error (input)")
    except OSError as exc:
        fail(f"cannot write the audit into {run_dir}: {exc}", code=3, label="error (output)")
    console.print(report["statement"])
    table = Table(title=f"consistency checks of {report['run_id']}")
    for col in ("result", "check", "reason"):
        table.add_column(col)
    colour = {"pass": "green", "fail": "red"}
    for c in report["checks"]:
        table.add_row(f"[{colour.get(c['status'], 'dim')}]{c['status']}[/]", c["title"], c["reason"])
    console.print(table)
    for c in report["checks"]:
        for problem in c["problems"][:10]:
            console.print(f"  [red]{c['name']}[/red]: {problem}")
    console.print(f"wrote {json_path} and {html_path}")
    if not report["all_checks_passed"]:
        raise typer.Exit(1)


def deploy_certs(out: Path = typer.Option(Path("deploy/certs"), help="folder for ca.crt, ca.key, server.pem, server.key"),
                 host: list[str] = typer.Option(["localhost", "127.0.0.1"], help="SuperLink host name or IP "
                                                                                "(repeatable)")) -> None:
    """Create a CA and the SuperLink's TLS certificate (keys written with mode 0600)."""
    from server.deploy import make_certificates

    paths = make_certificates(out, host)
    console.print(f"CA {paths['ca_cert']} (give to SuperNodes and operators; keep {paths['ca_key']} offline); "
                  f"SuperLink certificate {paths['cert']} for {', '.join(host)}")


def deploy_superlink(certs: Path = typer.Option(Path("deploy/certs"), help="folder made by `privrec deploy certs`"),
                     port: int = typer.Option(9091, help="the SuperLink's one HTTPS port (Fleet, Control, Runtime)"),
                     host: str = typer.Option("127.0.0.1", help="interface to listen on"),
                     database: Optional[Path] = typer.Option(Path("deploy/superlink.db"),
                                                             help="state file: registrations survive restarts")) -> None:
    """Start the SuperLink with TLS and SuperNode authentication (replaces this process)."""
    import os

    from common.flower_env import flwr_env
    from server.deploy import superlink_command

    cmd = superlink_command(certs, port, host, database)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, flwr_env())


def deploy_connect(superlink: str = typer.Option("127.0.0.1:9091", help="SuperLink address host:port"),
                   ca: Path = typer.Option(Path("deploy/certs/ca.crt"), help="the CA certificate"),
                   name: str = typer.Option("edge", help="connection name used by register and run")) -> None:
    """Point the flwr CLI (FLWR_HOME, default .flwr-deploy) at the SuperLink, over TLS."""
    from server.deploy import write_connection

    console.print(f"wrote {write_connection(superlink, ca, name)}")


def deploy_register(public_key: Path = typer.Argument(..., help="a SuperNode's NAME.pub"),
                    name: str = typer.Option("edge", help="connection name (see `privrec deploy connect`)")) -> None:
    """Register a SuperNode's public key; only registered SuperNodes may join."""
    from server.deploy import register_supernode

    try:
        node = register_supernode(public_key, name)
    except RuntimeError as exc:
        fail(exc, code=1)
    console.print(f"registered {public_key}: node id {node}")


def deploy_run(run_config: Optional[list[str]] = typer.Option(None, help="run-config overrides, as for flwr run"),
               name: str = typer.Option("edge", help="connection name"),
               app_dir: Path = typer.Option(Path("."), help="the privrec app folder")) -> None:
    """Run the federation on the SuperLink (publishing the catalogue each round); exits 1 unless it completed."""
    from server.deploy import run_and_wait

    run_id, status = run_and_wait(app_dir, ["publish-catalogue=true", *(run_config or [])], name)
    console.print(f"run {run_id}: {status}")
    if not status.startswith("finished:completed"):
        raise typer.Exit(1)
