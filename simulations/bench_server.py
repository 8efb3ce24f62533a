"""Server benchmark: aggregation time for many replies, and upload size against the full encoder.

    python -m simulations.bench_server [--replies 1000] [--repeats 3]

Builds ``--replies`` client states shaped exactly like the default model's exchanged
tensors (adapters + item bias), then times what the server does with a round's
replies: validation of every reply, each aggregator of :mod:`server.aggregators` and
the server step; and the mean with user-level central DP (clipping, noise) and FedAdam.
Prints the measured seconds and the bytes one client uploads.
"""

from __future__ import annotations

import time

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common.encoder import LoraSettings, TextEncoder
from common.model import Recommender
from common.model_state import get_state, state_bytes
from common.run_config import resolve
from common.secure_random import SecureStream
from server.aggregation import make_server_step, server_step
from server.aggregators import AGGREGATORS, aggregate
from server.central_dp import CentralDP
from server.validation import adapter_specs, validate_reply

NUM_ITEMS = 1682


def run(replies: int = typer.Option(1000, help="Client replies to aggregate."),
        repeats: int = typer.Option(3, help="Timed repetitions (the median is reported).")) -> None:
    console = Console()
    encoder = TextEncoder(LoraSettings())
    model = Recommender(encoder, NUM_ITEMS)
    names, global_state = get_state(model)
    specs = adapter_specs(names, global_state)
    rng = np.random.default_rng(0)
    states = [[g + rng.normal(0, 1e-3, g.shape).astype(np.float32) for g in global_state] for _ in range(replies)]
    central = CentralDP(noise_multiplier=1.0, clip=0.5, sample_rate=0.1, population=10 * replies, delta=1e-4)

    def plain(aggregator: str):
        cfg = resolve({"aggregator": aggregator, "byzantine-clients": max(1, replies // 20)})

        def run_it() -> None:
            ok = [s for s in states if validate_reply(names, s, specs, global_state, 50.0).accepted]
            server_step(make_server_step("fedavg", 1.0), 1, names, global_state, aggregate(ok, cfg))
        return run_it

    def with_central_dp() -> None:
        ok = [s for s in states if validate_reply(names, s, specs, global_state, 50.0).accepted]
        deltas = [[a - g for a, g in zip(s, global_state)] for s in ok]
        noisy = central.noisy_mean(deltas, [g.shape for g in global_state], SecureStream())
        server_step(make_server_step("fedadam", 0.01), 1, names, global_state,
                    [g + d for g, d in zip(global_state, noisy)])

    table = Table(title=f"server aggregation of {replies} replies (median of {repeats})")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    paths = [(f"validate + {name} + FedAvg step", plain(name)) for name in AGGREGATORS]
    for label, fn in (*paths, ("validate + central DP + FedAdam", with_central_dp)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        table.add_row(label, f"{float(np.median(times)):.3f}")
    console.print(table)
    upload = state_bytes(global_state)
    full = sum(p.numel() * p.element_size() for n, p in encoder.named_parameters() if "lora_" not in n)
    console.print(f"upload per client per round: {upload:,} bytes ({len(names)} tensors, "
                  f"{sum(a.size for a in global_state):,} float32 values)")
    console.print(f"full encoder (all-MiniLM-L6-v2 weights, float32): {full:,} bytes")
    console.print(f"upload / full encoder = {100 * upload / full:.3f}% (target at most 0.5%)")


def main() -> None:
    typer.run(run)


if __name__ == "__main__":
    main()
