"""The device's ``privrec`` commands: ``export-user``, ``recommend``, ``feedback`` and the device side of
``deploy`` (``node-key``, ``supernode``). Plain functions; ``simulations/cli.py`` registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from common.cli_support import console, fail, load_dataset, plain


def deploy_node_key(name: str = typer.Argument(..., help="key name, e.g. the device's name"),
                    out: Path = typer.Option(Path("deploy/keys"), help="folder for NAME and NAME.pub")) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from client.deploy import make_node_key

    private, public = make_node_key(out, name)
    console.print(f"private key {plain(private)} (stays on the device); register {plain(public)} with "
                  f"`privrec deploy register`")


def deploy_supernode(superlink: str = typer.Option("127.0.0.1:9091", help="SuperLink Fleet address host:port"),
                     ca: Path = typer.Option(Path("deploy/certs/ca.crt"), help="the CA certificate"),
                     key: Path = typer.Option(..., help="this SuperNode's private key"),
                     data_path: Path = typer.Option(..., help="the device's data: events.jsonl + catalogue.jsonl"),
                     state_dir: Path = typer.Option(..., help="the device's persistent state (ledger, model, catalogue)"),
                     port: int = typer.Option(9094, help="local ClientApp API port (one per SuperNode on a machine)"),
                     client_id: Optional[str] = typer.Option(None, help="ledger name (default: device)"),
                     policy: Optional[list[str]] = typer.Option(
                         None, help="this device's privacy policy, KEY=VALUE (repeatable): privacy-local-dp, "
                                    "privacy-min-noise-multiplier, privacy-max-clip, privacy-delta, "
                                    "privacy-epsilon-budget, privacy-adjacency, privacy-max-history-len, "
                                    "privacy-max-length, privacy-reply-time-quantum (seconds; every reply leaves "
                                    "at a whole multiple of it after its request), and the secure-aggregation floors "
                                    "(docs/secure-aggregation.md)"),
                     approve: Optional[list[str]] = typer.Option(
                         None, help="also run the app bundle with this SHA-256 (repeatable); by default the device "
                                    "runs only the app of its own privrec installation")) -> None:
    """Run one device: its SuperNode and the SuperExec that starts only approved apps (until stopped)."""
    from client.deploy import device_launch, run_supervised
    from common.run_config import ConfigError, parse_overrides

    try:
        launch = device_launch(superlink, ca, key, data_path, state_dir, port, client_id,
                               parse_overrides(policy or []), approve=list(approve or []))
    except (ConfigError, FileNotFoundError) as exc:
        fail(exc, label=None)
    raise typer.Exit(run_supervised(launch))


def export_user_cmd(user: str = typer.Option(..., help="MovieLens user id (1..943)"),
                    out: Path = typer.Option(..., help="device data folder to write"),
                    data: Optional[Path] = typer.Option(None, help="GroupLens ml-100k/ folder (default: the recbole copy)")) -> None:
    """Export one MovieLens user to the device format (events.jsonl + catalogue.jsonl)."""
    from client.export import export_user
    from common.errors import DataFormatError

    try:
        folder, count = export_user(load_dataset(data, None, None), user, out)
    except (DataFormatError, ValueError) as exc:
        fail(exc)
    console.print(f"wrote {count} events of user {plain(user)} and the catalogue to {plain(folder)}/")


def recommend(state_dir: Path = typer.Option(..., help="the device's state folder"),
              k: int = typer.Option(10, help="how many items"),
              text: Optional[str] = typer.Option(None, help='free text leading the query, e.g. "like Alien but funny"'),
              personal: bool = typer.Option(True, help="the sequence model: add the personal offset fitted here on "
                                                       "this device's own history (never sent); --no-personal: the "
                                                       "global model alone (the text model has no personal part)")) -> None:
    """Recommend K unseen items for this device's user, on the device, with explanations."""
    from client.recommend import DeviceRecommender
    from common.errors import DataFormatError
    from common.personalisation import PersonalSettings

    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            fail("--text: not valid UTF-8 text (it holds bytes that are not characters)")
    try:
        recs = DeviceRecommender(state_dir, PersonalSettings() if personal else None).recommend(k, text)
    except (DataFormatError, ValueError) as exc:
        fail(exc)
    table = Table(title="recommendations (computed on this device)")
    for col in ("rank", "item", "title", "score", "because you"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for r in recs:
        table.add_row(str(r.rank), plain(r.item_id), plain(r.text), f"{r.score:.2f}",
                      "; ".join(f"{plain(what)} ({sim:.2f})" for _, what, sim in r.because))
    console.print(table)


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
        fail(exc)
    except OSError as exc:  # e.g. a full disk: nothing was recorded
        fail(f"feedback not recorded: {exc}", code=3)
    console.print(f"recorded {plain(event)} on this device")
