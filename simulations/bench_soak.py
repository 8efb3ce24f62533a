"""Soak benchmark: a default-size federation in which, every round, 10% of the sampled clients send
a hostile reply and 10% never answer.

The real ServerApp code (``server.federation.Federation``) drives the real ClientApp functions
in this process (:mod:`simulations.inprocess_grid`: no Flower transport, so the run is about as
long as the default ``flwr run``). Hostile replies cycle through the kinds a broken or malicious
client can send: non-finite or huge tensors, wrong shapes or dtypes, extra records, metrics
outside the wire list, a NaN or out-of-range epsilon, a mechanism other than the run's. Prints
the rounds completed, the rejections by reason and the final test quality, beside a clean run's
``result.json`` when one is given.

    python -m simulations.bench_soak [--seed 0] [--clean-result runs/default-seed0/result.json]
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from rich.console import Console
from rich.table import Table

from common.io import read_jsonl
from common.partition import dataset_from_source
from server.federation import Federation
from simulations.inprocess_grid import InProcessGrid, state_of

ROOT = Path(__file__).resolve().parent.parent


def _metrics(content, **values):
    merged = dict(content["metrics"]) if "metrics" in content.metric_records else {}
    merged.update(values)
    content["metrics"] = MetricRecord(merged)


def _tensors(content, change):
    arrays = state_of(content)
    first = next(iter(arrays))
    arrays[first] = change(arrays[first])
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


HOSTILE = {
    "nan-tensor": lambda c: _tensors(c, lambda a: np.full_like(a, np.nan)),
    "huge-update": lambda c: _tensors(c, lambda a: a + 1e6),
    "wrong-shape": lambda c: _tensors(c, lambda a: np.zeros((3, 3), dtype=np.float32)),
    "wrong-dtype": lambda c: _tensors(c, lambda a: a.astype(np.float64)),
    "extra-record": lambda c: c.__setitem__("loss", ConfigRecord({"train-loss": 2.5})),
    "unlisted-metric": lambda c: _metrics(c, **{"num-examples": 1e30}),
    "nan-epsilon": lambda c: _metrics(c, epsilon=float("nan")),
    "negative-epsilon": lambda c: _metrics(c, epsilon=-5.0),
    "other-mechanism": lambda c: _metrics(c, **{"noise-multiplier": 0.01}),
}


class SoakGrid(InProcessGrid):
    """Every train round: 10% of the destinations never answer, 10% answer with a hostile reply."""

    def __init__(self, num_nodes: int, run_config: dict, seed: int, hostile: float = 0.1, dropped: float = 0.1):
        super().__init__(num_nodes, run_config)
        self.rng = np.random.default_rng([seed, 77])
        self.hostile_rate, self.drop_rate = hostile, dropped
        self.sent_hostile: Counter = Counter()
        self.kinds = list(HOSTILE)
        self._turn: dict[int, str] = {}

    def send_and_receive(self, messages, timeout: float):
        train = [m for m in messages if m.metadata.message_type == "train"]
        nodes = [m.metadata.dst_node_id for m in train]
        k_drop, k_bad = round(self.drop_rate * len(nodes)), round(self.hostile_rate * len(nodes))
        picked = self.rng.permutation(len(nodes))
        self.drop = {nodes[i] for i in picked[:k_drop]}
        self._turn = {nodes[i]: self.kinds[int(self.rng.integers(len(self.kinds)))]
                      for i in picked[k_drop:k_drop + k_bad]}
        self.tamper = self._hostile
        return super().send_and_receive(messages, timeout)

    def _hostile(self, node: int, content) -> None:
        kind = self._turn.get(node)
        if kind is None or "arrays" not in content.array_records:
            return
        HOSTILE[kind](content)
        self.sent_hostile[kind] += 1


def _reason_kind(reason: str) -> str:
    """A rejection reason without its numbers and tensor names, for counting."""
    reason = re.sub(r"model\.[\w.]+", "<tensor>", reason)
    return re.sub(r"[-+]?\d[\d.e+-]*|nan|inf", "#", reason)[:90]


def main(seed: int = typer.Option(0, help="seed of the run and of who misbehaves"),
         clean_result: Optional[Path] = typer.Option(None, help="result.json of a clean run of the same config"),
         out: Path = typer.Option(ROOT / "runs", help="folder for the soak run"),
         rounds: Optional[int] = typer.Option(None, help="override num-server-rounds (default: the default's)"),
         clients: Optional[int] = typer.Option(None, help="use only the first N MovieLens users")) -> None:
    """Run the soak and print what was measured."""
    console = Console(width=150)
    population = clients or dataset_from_source("recbole").num_users
    cfg = {"seed": seed, "output-dir": str(out), "run-name": f"soak-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"}
    if rounds is not None:
        cfg["num-server-rounds"] = rounds
    grid = SoakGrid(population, cfg, seed)
    t0 = time.perf_counter()
    run_dir = Federation(grid, cfg).run()
    seconds = time.perf_counter() - t0
    rounds_rows = read_jsonl(run_dir / "rounds.jsonl")
    metrics_rows = read_jsonl(run_dir / "metrics.jsonl")
    reasons = Counter(_reason_kind(r) for row in rounds_rows for r in row.get("rejected_reasons", []))
    result = json.loads((run_dir / "result.json").read_text())
    failed = sum(len(r["failed"]) for r in rounds_rows)
    trained = sum(len(r["trained"]) for r in rounds_rows)

    table = Table(title=f"soak: {population} clients, 10% hostile and 10% silent per round ({run_dir.name})")
    for col in ("measure", "value"):
        table.add_column(col)
    table.add_row("rounds completed", f"{len(rounds_rows)} of {metrics_rows[-1]['round']}")
    table.add_row("server wall time", f"{seconds:.0f} s")
    table.add_row("hostile replies sent (by kind)", ", ".join(f"{k} {v}" for k, v in sorted(grid.sent_hostile.items())))
    table.add_row("replies rejected", str(sum(len(r["rejected"]) for r in rounds_rows)))
    table.add_row("clients silent (failed)", str(failed))
    table.add_row("updates aggregated", str(trained))
    from safetensors.numpy import load_file

    final = load_file(str(run_dir / "adapters.safetensors"))
    table.add_row("final global state finite", str(all(bool(np.isfinite(v).all()) for v in final.values())))
    table.add_row("test NDCG@10 / HR@10 (soak)", f"{result['metrics']['NDCG@10']:.4f} / {result['metrics']['HR@10']:.4f}")
    if clean_result is not None:
        clean = json.loads(clean_result.read_text())
        table.add_row("test NDCG@10 / HR@10 (clean run)",
                      f"{clean['metrics']['NDCG@10']:.4f} / {clean['metrics']['HR@10']:.4f} ({clean_result})")
    table.add_row("example-level epsilon max", f"{result['privacy'].get('epsilon', 0):.2f}")
    console.print(table)
    reason_table = Table(title="rejections by reason")
    reason_table.add_column("count", justify="right")
    reason_table.add_column("reason")
    for reason, count in reasons.most_common():
        reason_table.add_row(str(count), reason)
    console.print(reason_table)


if __name__ == "__main__":
    typer.run(main)
