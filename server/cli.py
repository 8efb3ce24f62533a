"""The server operator's ``privrec`` commands: ``audit`` and the server side of ``deploy`` (``certs``,
``superlink``, ``connect``, ``register``, ``run``). Plain functions; ``simulations/cli.py`` registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from common.cli_support import console, fail, plain


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
    console.print(plain(report["statement"]))
    table = Table(title=f"consistency checks of {report['run_id']}")
    for col in ("result", "check", "reason"):
        table.add_column(col)
    colour = {"pass": "green", "fail": "red"}
    for c in report["checks"]:
        table.add_row(f"[{colour.get(c['status'], 'dim')}]{c['status']}[/]", plain(c["title"]), plain(c["reason"]))
    console.print(table)
    for c in report["checks"]:
        for problem in c["problems"][:10]:
            console.print(f"  [red]{c['name']}[/red]: {plain(problem)}")
    console.print(f"wrote {plain(json_path)} and {plain(html_path)}")
    if not report["all_checks_passed"]:
        raise typer.Exit(1)


def deploy_certs(out: Path = typer.Option(Path("deploy/certs"), help="folder for ca.crt, ca.key, server.pem, server.key"),
                 host: list[str] = typer.Option(["localhost", "127.0.0.1"], help="SuperLink host name or IP "
                                                                                "(repeatable)")) -> None:
    """Create a CA and the SuperLink's TLS certificate (keys written with mode 0600)."""
    from server.deploy import make_certificates

    paths = make_certificates(out, host)
    console.print(f"CA {plain(paths['ca_cert'])} (give to SuperNodes and operators; keep {plain(paths['ca_key'])} offline); "
                  f"SuperLink certificate {paths['cert']} for {', '.join(host)}")


def deploy_superlink(certs: Path = typer.Option(Path("deploy/certs"), help="folder made by `privrec deploy certs`"),
                     port: int = typer.Option(9091, help="the Fleet API's HTTPS port (what devices connect to)"),
                     host: str = typer.Option("127.0.0.1", help="interface of the Fleet API (0.0.0.0: all)"),
                     control_port: int = typer.Option(9093, help="loopback-only HTTPS port of the Control and Runtime "
                                                                 "APIs (register, run, logs)"),
                     database: Optional[Path] = typer.Option(Path("deploy/superlink.db"),
                                                             help="state file: registrations survive restarts")) -> None:
    """Start the SuperLink: TLS, SuperNode authentication, Fleet API public, Control API on loopback only."""
    import os

    from common.flower_env import flwr_env
    from server.deploy import superlink_command

    try:
        cmd = superlink_command(certs, port, host, database, control_port)
    except FileNotFoundError as exc:
        fail(exc)
    os.execvpe(cmd[0], cmd, flwr_env())


def deploy_connect(superlink: str = typer.Option("127.0.0.1:9093", help="the SuperLink's Control API, on this host "
                                                                        "(127.0.0.1:<control-port>)"),
                   ca: Path = typer.Option(Path("deploy/certs/ca.crt"), help="the CA certificate"),
                   name: str = typer.Option("edge", help="connection name used by register and run")) -> None:
    """Point the flwr CLI (FLWR_HOME, default .flwr-deploy) at the SuperLink's Control API, over TLS."""
    from server.deploy import write_connection

    try:
        console.print(f"wrote {plain(write_connection(superlink, ca, name))}")
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)


def deploy_register(public_key: Path = typer.Argument(..., help="a SuperNode's NAME.pub"),
                    name: str = typer.Option("edge", help="connection name (see `privrec deploy connect`)")) -> None:
    """Register a SuperNode's public key; only registered SuperNodes may join."""
    from server.deploy import register_supernode

    try:
        node = register_supernode(public_key, name)
    except RuntimeError as exc:
        fail(exc, code=1)
    console.print(f"registered {plain(public_key)}: node id {node}")


def deploy_run(run_config: Optional[list[str]] = typer.Option(None, help="run-config overrides, as for flwr run"),
               name: str = typer.Option("edge", help="connection name"),
               app_dir: Path = typer.Option(Path("."), help="the privrec app folder")) -> None:
    """Run the federation on the SuperLink (publishing the catalogue each round); exits 1 unless it completed."""
    from server.deploy import run_and_wait

    run_id, status = run_and_wait(app_dir, ["publish-catalogue=true", *(run_config or [])], name)
    console.print(f"run {run_id}: {plain(status)}")
    if not status.startswith("finished:completed"):
        raise typer.Exit(1)
