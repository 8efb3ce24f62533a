"""Edge benchmarks on this machine: on-device recommendation latency and memory, and one client
round on one MovieLens user (about 100 examples) on one core.

    python -m simulations.bench_device [--user 426] [--calls 50] [--user-model sequence|text]

The parent prepares what a device holds after joining a run: the user's exported data, the
global state and the catalogue the server publishes (computed by the server's own code). Each
measurement then runs in a fresh process, as on a device:
- recommend: load the state once, then ``calls`` recommendations; prints the first call (with the
  sequence model, it fits the personal offset), the median and 95th percentile of the rest (the
  offset kept), one call that refits it as after new events, and the process's peak resident memory
  (target: median <= 50 ms, peak <= 700 MB);
- client round: a new process pinned to one core with one torch thread runs the real ClientApp
  train function on a TRAIN message (DP-SGD session with the product's defaults: the user's
  ``examples-per-user`` most recent examples, padded to that cap); prints the wall time of the message handling and of the process
  (target <= 10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=160)


def _run_config(user_model: str) -> dict:
    """The published defaults for ``user_model`` (the text model with its 5-item history)."""
    return {"user-model": user_model, **({"history-len": 5} if user_model == "text" else {})}


def _prepare(root: Path, user: str, user_model: str) -> dict:
    from safetensors.numpy import save_file

    from client.device_state import save_global_state, store_catalogue, write_device_info
    from client.export import export_user
    from common.partition import dataset_from_source
    from common.run_config import resolve
    from common.runtimes import make_runtime
    from server.catalogue import CataloguePublisher

    cfg = resolve(_run_config(user_model))
    data = dataset_from_source("recbole")
    _, events = export_user(data, user, root / "data")
    runtime = make_runtime(data, cfg)
    names, arrays = runtime.state()
    payload, sha = CataloguePublisher(runtime, root, "bench").publish(names, arrays, 1)
    state = root / "state"
    save_global_state(state, names, arrays, runtime.settings, "bench", 1)
    store_catalogue(state, payload, sha)
    write_device_info(state, str(root / "data"), "bench")
    save_file(dict(zip(names, arrays)), str(root / "global.safetensors"), metadata={"names": json.dumps(names)})
    return {"events": events, "catalogue_bytes": len(payload)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over exec from the parent, so a fresh worker would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def recommend_worker(state: Path, calls: int) -> None:
    import numpy as np

    from client.recommend import DeviceRecommender

    t0 = time.perf_counter()
    rec = DeviceRecommender(state)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec.recommend(10)
    first = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = rec.recommend(10)
        times.append(time.perf_counter() - t0)
    assert len(out) == 10
    refit = None
    if rec.sequence is not None and rec.personal is not None:  # as after new events: data re-read, offset refitted
        events = rec.data_path / "events.jsonl"
        stamp = events.stat().st_mtime_ns
        os.utime(events, ns=(stamp + 10**9, stamp + 10**9))
        t0 = time.perf_counter()
        rec.recommend(10)
        refit = (time.perf_counter() - t0) * 1e3
    print(json.dumps({"load_s": load, "first_ms": first * 1e3, "median_ms": float(np.median(times)) * 1e3,
                      "p95_ms": float(np.percentile(times, 95)) * 1e3, "refit_ms": refit,
                      "peak_rss_mb": _peak_rss_mb()}))


def round_worker(root: Path, user_model: str) -> None:
    start = time.perf_counter()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors import safe_open

    import client.app as client_app
    from common.partition import device_client_data, device_client_sequences
    from common.run_config import resolve

    with safe_open(str(root / "global.safetensors"), framework="np") as f:
        names = json.loads(f.metadata()["names"])
        arrays = {n: f.get_tensor(n) for n in names}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(arrays[n]) for n in names}),
        "config": ConfigRecord({"server-round": 1, "run-id": "bench", "run-dir": str(root),
                                "catalogue-sha256": (root / "catalogue.sha256").read_text().strip()}),
        "catalogue": ConfigRecord({"file": (root / "catalogue.safetensors").read_bytes()})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=_run_config(user_model),
                  node_config={"data-path": str(root / "data"), "state-dir": str(root / "round-state"),
                               "client-id": "bench"})
    imported = time.perf_counter() - start
    t0 = time.perf_counter()
    reply = client_app.train(msg, ctx)
    handled = time.perf_counter() - t0
    metrics = dict(reply.content["metrics"])
    assert "arrays" in reply.content.array_records, reply.content
    # The example count is read here, on the device: the reply does not carry it.
    cfg = resolve(_run_config(user_model))
    if user_model == "sequence":
        examples = len(device_client_sequences(root / "data", cfg["history-len"], cfg["examples-per-user"]).train)
    else:
        examples = len(device_client_data(root / "data", cfg["history-len"], cfg["examples-per-user"]).train_targets)
    print(json.dumps({"imports_s": imported, "message_s": handled, "process_s": time.perf_counter() - start,
                      "examples": examples, "steps": metrics["steps"], "epsilon": metrics["epsilon"],
                      "peak_rss_mb": _peak_rss_mb()}))


def _worker(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "simulations.bench_device", "--worker", *args], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(user: str = typer.Option("426", help="MovieLens user id (user 426 has 101 ratings: 100 examples)"),
         calls: int = typer.Option(50, help="timed recommendations after the first"),
         user_model: str = typer.Option("sequence", help="sequence (the default) or text"),
         out: Path = typer.Option(None, help="also write the measurements to this JSON file")) -> None:
    """Run both measurements and print what was measured."""
    if user_model not in ("sequence", "text"):
        raise typer.BadParameter(f"--user-model {user_model!r}: expected sequence or text")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = _prepare(root, user, user_model)
        rec = _worker("recommend-worker", str(root / "state"), str(calls))
        rnd = _worker("round-worker", str(root), user_model)
    table = Table(title=f"edge benchmarks, {user_model} model (MovieLens user {user}, {info['events']} events; "
                        f"catalogue file "
                        f"{info['catalogue_bytes'] / 1e6:.1f} MB)")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    table.add_row("recommend: state load", f"{rec['load_s']:.2f} s", "")
    table.add_row("recommend: first call", f"{rec['first_ms']:.1f} ms", "")
    table.add_row(f"recommend: median of {calls} calls", f"{rec['median_ms']:.1f} ms", "<= 50 ms")
    table.add_row("recommend: 95th percentile", f"{rec['p95_ms']:.1f} ms", "")
    if rec["refit_ms"] is not None:
        table.add_row("recommend: a call that refits the personal offset (new events)", f"{rec['refit_ms']:.1f} ms", "")
    table.add_row("recommend: peak resident memory", f"{rec['peak_rss_mb']:.0f} MB", "<= 700 MB")
    table.add_row("client round: examples used / DP steps", f"{rnd['examples']:.0f} / {rnd['steps']:.0f}",
                  "the cap (examples-per-user) most recent")
    table.add_row("client round: message handling (one core)", f"{rnd['message_s']:.2f} s", "<= 10 s")
    table.add_row("client round: whole fresh process incl. imports", f"{rnd['process_s']:.2f} s", "")
    table.add_row("client round: peak resident memory", f"{rnd['peak_rss_mb']:.0f} MB", "")
    console.print(table)
    if out is not None:
        from common.io import write_json_atomic

        write_json_atomic(out, {"benchmark": "device", "user": user, "user_model": user_model, "calls": calls, **info,
                                "recommend": rec, "client_round": rnd})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one measurement in this fresh process
        kind, *rest = sys.argv[2:]
        if kind == "recommend-worker":
            recommend_worker(Path(rest[0]), int(rest[1]))
        else:
            round_worker(Path(rest[0]), rest[1])
    else:
        typer.run(main)
