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


if __name__ == "__main__":
    app()
