"""The ``privrec`` command line (typer + rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="privrec: a privacy-preserving federated recommender.")
console = Console(width=None if Console().is_terminal else 170)


def load_dataset(data: Optional[Path], events: Optional[Path], catalogue: Optional[Path]):
    """MovieLens from a GroupLens folder, the generic JSONL pair, or (default) the recbole wheel."""
    from common.jsonl_format import load_jsonl
    from common.movielens import load_grouplens, load_recbole

    if events or catalogue:
        if not (events and catalogue):
            raise typer.BadParameter("--events and --catalogue must be given together")
        return load_jsonl(events, catalogue)
    if data is not None:
        return load_grouplens(data) if (data / "u.data").exists() else load_recbole(data)
    return load_recbole()


def _table(results: list[dict]) -> Table:
    from simulations.summary import summarise

    table = Table(title="PROTOCOL ml-100k-loo-full-v1 (mean ± std over seeds)")
    for col in ("method", "privacy", "seeds", "test HR@10", "test NDCG@10", "test MRR@10", "test HR@20",
                "val NDCG@10", "cold HR@10", "cold NDCG@10"):
        table.add_column(col, justify="left" if col in ("method", "privacy") else "right")
    for row in summarise(results):
        table.add_row(*row)
    return table


def _print_targets(results: list[dict]) -> None:
    from simulations.summary import target_lines

    for line in target_lines(results):
        console.print(line)


@app.command()
def baseline(
    method: str = typer.Argument(..., help="popularity | zeroshot | central | central-dp | all"),
    seed: int = typer.Option(0, help="seed (a single method)"),
    seeds: int = typer.Option(3, help="seeds per trained method with METHOD=all"),
    out: Path = typer.Option(Path("results/baselines"), help="folder for the PROTOCOL result files"),
    cold_start: bool = typer.Option(True, help="also train/evaluate the cold-start variant"),
    epochs: Optional[float] = typer.Option(None, help="training epochs (default: the config's)"),
    examples_per_user: Optional[int] = typer.Option(None, help="recent train targets per user (0: all)"),
    item_bias_scale: Optional[float] = typer.Option(
        None, help="item bias scale of both trained methods (default: 1 central, 10 central-dp)"),
    item_learning_rate: Optional[float] = typer.Option(
        None, help="learning rate of the item bias (default: the config's; per trained method otherwise)"),
    data: Optional[Path] = typer.Option(None, help="GroupLens ml-100k/ folder or RecBole atomic folder"),
    events: Optional[Path] = typer.Option(None, help="generic events JSONL"),
    catalogue: Optional[Path] = typer.Option(None, help="generic catalogue JSONL"),
) -> None:
    """Run central baselines; write one PROTOCOL result file per split and print the table."""
    import torch

    from common.errors import DataFormatError
    from simulations.baselines import METHODS, BaselineConfig, BaselineRunner

    if method != "all" and method not in METHODS:
        raise typer.BadParameter(f"METHOD must be one of {', '.join(METHODS)} or all; got {method!r}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        dataset = load_dataset(data, events, catalogue)
    except DataFormatError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    cfg = BaselineConfig()
    if epochs is not None:
        cfg.train.epochs = cfg.dp_train.epochs = epochs
    if examples_per_user is not None:
        cfg.examples_per_user = examples_per_user
    if item_bias_scale is not None:
        if not item_bias_scale > 0:
            raise typer.BadParameter(f"--item-bias-scale must be > 0, got {item_bias_scale}")
        cfg.item_bias_scale = cfg.dp_item_bias_scale = item_bias_scale
    if item_learning_rate is not None:
        cfg.train.item_learning_rate = cfg.dp_train.item_learning_rate = item_learning_rate
    runner = BaselineRunner(dataset, cfg)
    plan = [(method, seed)] if method != "all" else (
        [("popularity", 0), ("zeroshot", 0)]
        + [(m, s) for m in ("central", "central-dp") for s in range(seeds)])
    results: list[dict] = []
    for m, s in plan:
        console.print(f"[bold]running[/bold] {m} seed {s}")
        results += runner.run(m, s, out, cold_start=cold_start)
        console.print(_table(results))
    _print_targets(results)
    console.print(f"result files in {out}/")


@app.command()
def summary(folder: Path = typer.Argument(Path("results/baselines"))) -> None:
    """Print the comparison table from PROTOCOL result files already in FOLDER."""
    import json

    files = sorted(folder.glob("*.json"))
    if not files:
        console.print(f"[red]error:[/red] {folder}: no result files")
        raise typer.Exit(2)
    results = [json.loads(f.read_text()) for f in files]
    console.print(_table(results))
    _print_targets(results)


@app.command()
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
        console.print(f"[red]error (input):[/red] {exc}")
        raise typer.Exit(2)
    except OSError as exc:
        console.print(f"[red]error (output):[/red] cannot write the audit into {run_dir}: {exc}")
        raise typer.Exit(3)
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


@app.command("audit-empirical")
def audit_empirical(
    kind: str = typer.Argument(..., help="mechanism | membership | clients"),
    out: Path = typer.Option(..., help="folder for the audit JSON (and, for clients, the audited run)"),
    canaries: Optional[int] = typer.Option(None, help="canaries m (default: mechanism 2000, membership 500, "
                                                      "clients 200); each included with probability 1/2"),
    broken: str = typer.Option("none", help="mechanism/membership: none | noise-off | clip-off (a deliberately "
                                            "broken run that the accountant still describes as configured)"),
    users: int = typer.Option(1, help="membership: users whose real examples join the canaries "
                                      "(mechanism: always one client)"),
    real_clients: int = typer.Option(20, help="clients: real MovieLens users in the audited federation"),
    confidence: float = typer.Option(0.95, help="confidence of the lower bound"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="run-config override key=value (repeatable), "
                                                                 "as in flwr run --run-config"),
) -> None:
    """Empirical lower bound on epsilon beside the accountant's epsilon; writes OUT/audit-<kind>[-<broken>].json."""
    from common.results import write_json_atomic
    from common.run_config import ConfigError, parse_overrides

    if kind not in ("mechanism", "membership", "clients"):
        raise typer.BadParameter(f"KIND must be mechanism, membership or clients; got {kind!r}")
    if not 0 < confidence < 1:
        raise typer.BadParameter(f"--confidence must be in (0, 1), got {confidence}")
    if kind == "clients" and broken != "none":
        raise typer.BadParameter("--broken applies to the mechanism and membership audits only")
    try:
        overrides = parse_overrides(set_ or [])
        if kind == "mechanism":
            from server.audit.mechanism import run_mechanism_audit

            report = run_mechanism_audit(overrides, 2000 if canaries is None else canaries, broken=broken, confidence=confidence)
        elif kind == "membership":
            from server.audit.membership import run_membership_audit

            report = run_membership_audit(overrides, 500 if canaries is None else canaries, users, broken=broken, confidence=confidence)
        else:
            from server.audit.canary_clients import run_client_audit

            report = run_client_audit(overrides, out, real_clients, 200 if canaries is None else canaries, confidence=confidence)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    name = f"audit-{kind}" + (f"-{broken}" if broken != "none" else "") + ".json"
    path = write_json_atomic(out / name, report)
    table = Table(title=f"{kind} audit ({report['privacy_unit']})")
    for col in ("lower bound ε", "confidence", "accountant ε", "δ", "guesses (correct)", "largest reachable",
                "seconds"):
        table.add_column(col, justify="right")
    est = report["estimator"]
    table.add_row(f"{report['epsilon_lower_bound']:.3f}", f"{report['confidence']:.0%}",
                  f"{report['accountant_epsilon']:.3f}", f"{report['delta']:g}",
                  f"{est['guesses']} ({est['correct']})", f"{est['largest_reachable']:.3f}", f"{report['seconds']:.1f}")
    console.print(table)
    if report.get("epsilon_estimate_one_shot") is not None:
        console.print(f"one-shot estimate (Andrew et al., not a bound): ε ≈ {report['epsilon_estimate_one_shot']:.3f}")
    verdict = "EXCEEDS" if report["bound_exceeds_accountant"] else "is within"
    console.print(f"the lower bound {verdict} the accountant's epsilon; {report['reading']}")
    console.print(f"wrote {path}")


deploy = typer.Typer(no_args_is_help=True, help="Edge deployment: certificates, keys, SuperLink, SuperNodes, runs.")
app.add_typer(deploy, name="deploy")


@deploy.command("certs")
def deploy_certs(out: Path = typer.Option(Path("deploy/certs"), help="folder for ca.crt, ca.key, server.pem, server.key"),
                 host: list[str] = typer.Option(["localhost", "127.0.0.1"], help="SuperLink host name or IP "
                                                                                "(repeatable)")) -> None:
    """Create a CA and the SuperLink's TLS certificate (keys written with mode 0600)."""
    from server.deploy import make_certificates

    paths = make_certificates(out, host)
    console.print(f"CA {paths['ca_cert']} (give to SuperNodes and operators; keep {paths['ca_key']} offline); "
                  f"SuperLink certificate {paths['cert']} for {', '.join(host)}")


@deploy.command("node-key")
def deploy_node_key(name: str = typer.Argument(..., help="key name, e.g. the device's name"),
                    out: Path = typer.Option(Path("deploy/keys"), help="folder for NAME and NAME.pub")) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from client.deploy import make_node_key

    private, public = make_node_key(out, name)
    console.print(f"private key {private} (stays on the device); register {public} with `privrec deploy register`")


@deploy.command("superlink")
def deploy_superlink(certs: Path = typer.Option(Path("deploy/certs"), help="folder made by `privrec deploy certs`"),
                     port: int = typer.Option(9091, help="the SuperLink's one HTTPS port (Fleet, Control, Runtime)"),
                     host: str = typer.Option("127.0.0.1", help="interface to listen on"),
                     database: Optional[Path] = typer.Option(Path("deploy/superlink.db"),
                                                             help="state file: registrations survive restarts")) -> None:
    """Start the SuperLink with TLS and SuperNode authentication (replaces this process)."""
    import os

    from server.deploy import flwr_env, superlink_command

    cmd = superlink_command(certs, port, host, database)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, flwr_env())


@deploy.command("connect")
def deploy_connect(superlink: str = typer.Option("127.0.0.1:9091", help="SuperLink address host:port"),
                   ca: Path = typer.Option(Path("deploy/certs/ca.crt"), help="the CA certificate"),
                   name: str = typer.Option("edge", help="connection name used by register and run")) -> None:
    """Point the flwr CLI (FLWR_HOME, default .flwr-deploy) at the SuperLink, over TLS."""
    from server.deploy import write_connection

    console.print(f"wrote {write_connection(superlink, ca, name)}")


@deploy.command("register")
def deploy_register(public_key: Path = typer.Argument(..., help="a SuperNode's NAME.pub"),
                    name: str = typer.Option("edge", help="connection name (see `privrec deploy connect`)")) -> None:
    """Register a SuperNode's public key; only registered SuperNodes may join."""
    from server.deploy import register_supernode

    try:
        node = register_supernode(public_key, name)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    console.print(f"registered {public_key}: node id {node}")


@deploy.command("supernode")
def deploy_supernode(superlink: str = typer.Option("127.0.0.1:9091", help="SuperLink address host:port"),
                     ca: Path = typer.Option(Path("deploy/certs/ca.crt"), help="the CA certificate"),
                     key: Path = typer.Option(..., help="this SuperNode's private key"),
                     data_path: Path = typer.Option(..., help="the device's data: events.jsonl + catalogue.jsonl"),
                     state_dir: Path = typer.Option(..., help="the device's persistent state (ledger, model, catalogue)"),
                     port: int = typer.Option(9094, help="local ClientApp API port (one per SuperNode on a machine)"),
                     client_id: Optional[str] = typer.Option(None, help="ledger name (default: device)"),
                     policy: Optional[list[str]] = typer.Option(
                         None, help="this device's privacy policy, KEY=VALUE (repeatable): privacy-local-dp, "
                                    "privacy-min-noise-multiplier, privacy-max-clip, privacy-delta, "
                                    "privacy-epsilon-budget, privacy-adjacency")) -> None:
    """Start a SuperNode for one device (replaces this process)."""
    import os

    from client.deploy import supernode_command
    from common.run_config import ConfigError, parse_overrides
    from server.deploy import flwr_env

    try:
        cmd = supernode_command(superlink, ca, key, data_path, state_dir, port, client_id,
                                parse_overrides(policy or []))
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, flwr_env())


@deploy.command("run")
def deploy_run(run_config: Optional[list[str]] = typer.Option(None, help="run-config overrides, as for flwr run"),
               name: str = typer.Option("edge", help="connection name"),
               app_dir: Path = typer.Option(Path("."), help="the privrec app folder")) -> None:
    """Run the federation on the SuperLink (publishing the catalogue each round); exits 1 unless it completed."""
    from server.deploy import run_and_wait

    run_id, status = run_and_wait(app_dir, ["publish-catalogue=true", *(run_config or [])], name)
    console.print(f"run {run_id}: {status}")
    if not status.startswith("finished:completed"):
        raise typer.Exit(1)


@app.command("export-user")
def export_user_cmd(user: str = typer.Option(..., help="MovieLens user id (1..943)"),
                    out: Path = typer.Option(..., help="device data folder to write"),
                    data: Optional[Path] = typer.Option(None, help="GroupLens ml-100k/ folder (default: the recbole copy)")) -> None:
    """Export one MovieLens user to the device format (events.jsonl + catalogue.jsonl)."""
    from client.export import export_user
    from common.errors import DataFormatError

    try:
        folder, count = export_user(load_dataset(data, None, None), user, out)
    except (DataFormatError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    console.print(f"wrote {count} events of user {user} and the catalogue to {folder}/")


@app.command()
def recommend(state_dir: Path = typer.Option(..., help="the device's state folder"),
              k: int = typer.Option(10, help="how many items"),
              text: Optional[str] = typer.Option(None, help='free text leading the query, e.g. "like Alien but funny"')) -> None:
    """Recommend K unseen items for this device's user, on the device, with explanations."""
    from client.recommend import DeviceRecommender
    from common.errors import DataFormatError

    try:
        recs = DeviceRecommender(state_dir).recommend(k, text)
    except (DataFormatError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    table = Table(title="recommendations (computed on this device)")
    for col in ("rank", "item", "title", "score", "because you"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for r in recs:
        table.add_row(str(r.rank), r.item_id, r.text, f"{r.score:.2f}",
                      "; ".join(f"{what} ({sim:.2f})" for _, what, sim in r.because))
    console.print(table)


@app.command()
def feedback(state_dir: Path = typer.Option(..., help="the device's state folder"),
             item: str = typer.Option(..., help="catalogue item id"),
             rating: Optional[float] = typer.Option(None, help="rating 1-5"),
             accept: bool = typer.Option(False, "--accept", help="accept a shown recommendation (rating 5)"),
             reject: bool = typer.Option(False, "--reject", help="reject a shown recommendation (rating 1)")) -> None:
    """Record feedback in the device's own data; the next training session learns from it."""
    from client.feedback import ACCEPT_RATING, REJECT_RATING, record_feedback
    from common.errors import DataFormatError

    given = [x for x in (rating is not None, accept, reject) if x]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --rating, --accept or --reject")
    value = rating if rating is not None else (ACCEPT_RATING if accept else REJECT_RATING)
    try:
        event = record_feedback(state_dir, item, value)
    except (DataFormatError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    except OSError as exc:  # e.g. a full disk: nothing was recorded
        console.print(f"[red]error:[/red] feedback not recorded: {exc}")
        raise typer.Exit(3)
    console.print(f"recorded {event} on this device")


if __name__ == "__main__":
    app()
