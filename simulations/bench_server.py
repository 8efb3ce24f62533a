"""Server benchmark: aggregation time for many replies, and upload size against the full encoder.

    python -m simulations.bench_server [--replies 1000] [--repeats 3]

Builds ``--replies`` client states shaped exactly like the default model's exchanged
tensors (adapters + item bias), then times what the server does with a round's
replies: validation of every reply, the example-weighted mean (Flower's FedAvg
aggregation) and the server step; and the same with user-level central DP
(clipping, noise). Prints the measured seconds and the bytes one client uploads.
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
from server.aggregation import make_server_step, server_step, weighted_mean
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
    weights = [float(rng.integers(1, 21)) for _ in range(replies)]
    central = CentralDP(noise_multiplier=1.0, clip=0.5, sample_rate=0.1, population=10 * replies, delta=1e-4)

    def plain() -> None:
        ok = [s for s in states if validate_reply(names, s, specs, global_state, 50.0).accepted]
        server_step(make_server_step("fedavg", 1.0), 1, names, global_state,
                    weighted_mean(names, ok, weights[:len(ok)]))

    def with_central_dp() -> None:
        ok = [s for s in states if validate_reply(names, s, specs, global_state, 50.0).accepted]
        deltas = [[a - g for a, g in zip(s, global_state)] for s in ok]
        noisy = central.noisy_mean(deltas, rng)
        server_step(make_server_step("fedadam", 0.01), 1, names, global_state,
                    [g + d for g, d in zip(global_state, noisy)])

    table = Table(title=f"server aggregation of {replies} replies (median of {repeats})")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    for label, fn in (("validate + FedAvg", plain), ("validate + central DP + FedAdam", with_central_dp)):
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
