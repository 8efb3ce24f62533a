"""What every ``privrec`` command module shares: the console, the error exit and dataset loading.

The commands themselves live with their area (``client/cli.py``, ``server/cli.py``) and are
assembled into the ``privrec`` app by ``simulations/cli.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

console = Console(width=None if Console().is_terminal else 170)


def fail(message: object, code: int = 2, label: Optional[str] = "error") -> NoReturn:
    """Print ``label: message`` in red (the whole message in red without a label) and exit with ``code``
    (2: unreadable or malformed input, the default)."""
    console.print(f"[red]{label}:[/red] {message}" if label is not None else f"[red]{message}[/red]")
    raise typer.Exit(code)


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
