"""What every ``privrec`` command module shares: the console, the error exit and dataset loading.

The commands themselves live with their area (``client/cli.py``, ``server/cli.py``) and are
assembled into the ``privrec`` app by ``simulations/cli.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console(width=None if Console().is_terminal else 170)


def plain(text: object) -> str:
    """``text`` safe to show on a terminal through rich: control characters (terminal escape sequences
    among them) replaced by U+FFFD, rich markup escaped. For anything that comes from data: catalogue
    titles the server published, item ids, file paths, messages quoting them."""
    shown = "".join(ch if ch.isprintable() or ch == " " else "\ufffd" for ch in str(text))
    return escape(shown)


def fail(message: object, code: int = 2, label: Optional[str] = "error") -> NoReturn:
    """Print ``label: message`` in red (the whole message in red without a label) and exit with ``code``
    (2: unreadable or malformed input, the default). The message is shown as plain text."""
    console.print(f"[red]{label}:[/red] {plain(message)}" if label is not None else f"[red]{plain(message)}[/red]")
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
