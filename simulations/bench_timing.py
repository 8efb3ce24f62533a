"""Session duration against what a device holds: the real ClientApp ``train`` on devices with 0, 1, 10
and cap + 10 events, with the shortest or the longest titles, with the product's defaults.

A DP session pads its rows to ``examples-per-user`` and every text to ``max-length`` tokens and
takes the public steps, so the tensors entering the encoder have the same shapes on every device
(``tests/test_client_session.py`` checks them); what still scales with the device's history is
reading its files and building its example texts. This measures what is left: the median wall
time of each device's session over interleaved repetitions in one warm process on one core, and
the spread between the fastest and the slowest device. With ``--paced`` each session goes through the
whole ClientApp, its reply held to the device's time quantum (``client.reply_pacing``, the default device
policy's 1 s): the time a server would see.

    python -m simulations.bench_timing [--repeats 7] [--user 1] [--user-model sequence|text] [--paced]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from common.io import write_json_atomic


def _devices(root: Path, user: str, cap: int) -> dict[str, Path]:
    """Device data folders with 0, 1, 10 and cap + 10 events of one MovieLens user (short or long titles)."""
    from client.export import export_user
    from common.partition import dataset_from_source

    data = dataset_from_source("recbole")
    export_user(data, user, root / "source")
    events = (root / "source" / "events.jsonl").read_text().splitlines()
    if len(events) < cap + 10:
        raise typer.BadParameter(f"user {user} has {len(events)} events; pick one with at least {cap + 10}")
    title = {it.item_id: len(it.title) for it in data.items}
    by_length = sorted(events, key=lambda e: title[json.loads(e)["item"]])
    picks = {"0 events": [], "1 event, short title": by_length[:1], "10 events, short titles": by_length[:10],
             "10 events, long titles": by_length[-10:], f"{cap + 10} events": events[:cap + 10]}
    out = {}
    for name, lines in picks.items():
        folder = root / name.replace(" ", "-").replace(",", "")
        folder.mkdir()
        (folder / "catalogue.jsonl").write_bytes((root / "source" / "catalogue.jsonl").read_bytes())
        (folder / "events.jsonl").write_text("".join(line + "\n" for line in lines))
        out[name] = folder
    return out


def main(repeats: int = typer.Option(7, min=1, help="sessions per device (interleaved); the median is reported"),
         user: str = typer.Option("1", help="MovieLens user whose events the devices hold"),
         user_model: str = typer.Option("sequence", help="sequence (the default) or text"),
         paced: bool = typer.Option(False, help="through the whole ClientApp, the reply held to the device's time "
                                                "quantum (the default policy's): what the server sees"),
         out: Optional[Path] = typer.Option(None, help="also write the figures to this JSON file")) -> None:
    """Measure and print each device's median session time and the spread."""
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from common.partition import dataset_from_source
    from common.run_config import resolve
    from common.runtimes import make_runtime

    if user_model not in ("sequence", "text"):
        raise typer.BadParameter(f"--user-model {user_model!r}: expected sequence or text")
    torch.set_num_threads(1)
    model_config = {"user-model": user_model, **({"history-len": 5} if user_model == "text" else {})}
    cfg = resolve(model_config)
    names, arrays = make_runtime(dataset_from_source("recbole"), cfg).state()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        devices = _devices(root, user, cfg["examples-per-user"])

        def session(name: str, folder: Path, rnd: int) -> float:
            msg = Message(RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in zip(names, arrays)}),
                                      "config": ConfigRecord({"server-round": rnd, "run-id": "timing",
                                                              "run-dir": str(root)})}),
                          dst_node_id=5, message_type=MessageType.TRAIN)
            ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={**model_config, "client-epsilon-budget": 1e6},
                          node_config={"data-path": str(folder), "state-dir": str(root / f"state-{folder.name}"),
                                       "privacy-epsilon-budget": 1e6})
            t0 = time.perf_counter()
            reply = (client_app.app if paced else client_app.train)(msg, ctx)
            seconds = time.perf_counter() - t0
            if "arrays" not in reply.content.array_records:
                raise RuntimeError(f"{name}: the session did not train ({dict(reply.content['metrics'])})")
            return seconds

        for name, folder in devices.items():  # warm-up: each device's runtime and the catalogue cache
            session(name, folder, 0)
        for rnd in range(1, repeats + 1):
            for name, folder in devices.items():
                times.setdefault(name, []).append(session(name, folder, rnd))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    what = "reply time through the ClientApp, paced" if paced else "DP session duration"
    table = Table(title=f"{what} by what the device holds ({user_model} model, defaults; median of "
                        f"{repeats}, one core, warm process)")
    for col in ("device", "median s", "min s", "max s"):
        table.add_column(col)
    for name, ts in times.items():
        table.add_row(name, f"{medians[name]:.4f}", f"{min(ts):.4f}", f"{max(ts):.4f}")
    console = Console(width=140)
    console.print(table)
    spread = max(medians.values()) - min(medians.values())
    console.print(f"spread of the medians: {spread * 1000:.2f} ms ({100 * spread / min(medians.values()):.2f}% of "
                  f"the fastest)")
    if out is not None:
        write_json_atomic(out, {"benchmark": "session-timing", "what": what, "user_model": user_model, "paced": paced,
                                "repeats": repeats, "torch_threads": 1,
                                "seconds": {name: {"median": round(medians[name], 5), "min": round(min(ts), 5),
                                                   "max": round(max(ts), 5)} for name, ts in times.items()},
                                "spread_of_medians_ms": round(1000 * spread, 2)})


if __name__ == "__main__":
    typer.run(main)
