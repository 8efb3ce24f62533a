"""The ``privrec`` command line (typer + rich): the root app.

It registers the experiment commands (``baseline``, ``summary``, ``audit-empirical``) itself and
assembles the device's commands (:mod:`client.cli`) and the server operator's (:mod:`server.cli`),
including the ``deploy`` sub-app that holds both sides of an edge deployment. It lives at the top
layer because it is the one module that may import every area.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from client import cli as client_cli
from common.cli_support import console, fail, load_dataset, plain
from server import cli as server_cli

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="privrec: a privacy-preserving federated recommender.")


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
        fail(exc)
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
    try:
        runner = BaselineRunner(dataset, cfg)
        runner.split.eval_users()  # nobody to evaluate is an input error, said before any training
    except ValueError as exc:
        fail(exc)
    plan = [(method, seed)] if method != "all" else (
        [("popularity", 0), ("zeroshot", 0)]
        + [(m, s) for m in ("central", "central-dp") for s in range(seeds)])
    results: list[dict] = []
    for m, s in plan:
        console.print(f"[bold]running[/bold] {m} seed {s}")
        results += runner.run(m, s, out, cold_start=cold_start)
        console.print(_table(results))
    _print_targets(results)
    console.print(f"result files in {plain(out)}/")


@app.command()
def summary(folder: Path = typer.Argument(Path("results/baselines"))) -> None:
    """Print the comparison table from PROTOCOL result files already in FOLDER."""
    from common.errors import DataFormatError
    from common.io import read_json

    files = sorted(folder.glob("*.json"))
    if not files:
        fail(f"{folder}: no result files")
    results = []
    try:
        for f in files:
            r = read_json(f)
            if not (isinstance(r, dict) and isinstance(r.get("metrics"), dict) and "method" in r and "split" in r):
                raise DataFormatError(f, "expected a PROTOCOL result object with method, split and metrics")
            results.append(r)
    except DataFormatError as exc:
        fail(exc)
    console.print(_table(results))
    _print_targets(results)


app.command()(server_cli.audit)


@app.command("audit-empirical")
def audit_empirical(
    kind: str = typer.Argument(..., help="mechanism | membership | clients | secure-clients"),
    out: Path = typer.Option(..., help="folder for the audit JSON (and, for clients, the audited run)"),
    canaries: Optional[int] = typer.Option(None, help="canaries m (default: mechanism 2000, membership 500, "
                                                      "clients and secure-clients 200); each included with "
                                                      "probability 1/2"),
    broken: str = typer.Option("none", help="mechanism/membership: none | noise-off | clip-off; secure-clients: "
                                            "none | noise-off (a deliberately broken run that the accountant "
                                            "still describes as configured)"),
    users: int = typer.Option(1, help="membership: users whose real examples join the canaries "
                                      "(mechanism: always one client)"),
    real_clients: int = typer.Option(20, help="clients, secure-clients: real MovieLens users in the audited "
                                              "federation (secure-clients: canary devices are the next m users)"),
    confidence: float = typer.Option(0.95, help="confidence of the lower bound"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="run-config override key=value (repeatable), "
                                                                 "as in flwr run --run-config"),
) -> None:
    """Empirical lower bound on epsilon beside the accountant's epsilon; writes OUT/audit-<kind>[-<broken>].json."""
    from common.io import write_json_atomic
    from common.run_config import ConfigError, parse_overrides
    from simulations.audits import AUDITS, AuditOptions

    if kind not in AUDITS:
        raise typer.BadParameter(f"KIND must be one of {', '.join(AUDITS)}; got {kind!r}")
    if not 0 < confidence < 1:
        raise typer.BadParameter(f"--confidence must be in (0, 1), got {confidence}")
    audit = AUDITS[kind]
    try:
        options = AuditOptions(out=out, broken=broken, users=users, real_clients=real_clients, confidence=confidence)
        report = audit.run(parse_overrides(set_ or []), audit.default_canaries if canaries is None else canaries,
                           options)
    except (ConfigError, ValueError, RuntimeError) as exc:
        fail(exc)
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
    console.print(f"wrote {plain(path)}")


deploy = typer.Typer(no_args_is_help=True, help="Edge deployment: certificates, keys, SuperLink, SuperNodes, runs.")
app.add_typer(deploy, name="deploy")
# Both sides of an edge deployment under one ``privrec deploy``, in the order an operator uses them.
deploy.command("certs")(server_cli.deploy_certs)
deploy.command("node-key")(client_cli.deploy_node_key)
deploy.command("superlink")(server_cli.deploy_superlink)
deploy.command("connect")(server_cli.deploy_connect)
deploy.command("register")(server_cli.deploy_register)
deploy.command("supernode")(client_cli.deploy_supernode)
deploy.command("run")(server_cli.deploy_run)

app.command("export-user")(client_cli.export_user_cmd)
app.command()(client_cli.recommend)
app.command()(client_cli.feedback)


if __name__ == "__main__":
    app()
