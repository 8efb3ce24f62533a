"""Poisoning benchmark: one hostile client in every round's sample promotes one item.

The real ServerApp code (``server.federation.Federation``) drives the real ClientApp functions in
this process (:mod:`simulations.inprocess_grid`), on all 943 MovieLens users with the default
configuration unless told otherwise. Every round, one of the sampled clients is hostile: it trains
honestly (so its metrics are those of a valid session) and then replaces its update by the one that
pushes the promoted item hardest under the run's aggregator, within what validation accepts (the
run's update norm bound). Its best response per rule (the server's configuration is public):

| aggregator | the hostile update |
|---|---|
| mean | all of the admissible norm on the promoted item's bias |
| median, trimmed-mean | the promoted item's bias above the honest range and the biases of the 50 items the global model ranks highest below it (6 noise std of an honest coordinate), the other items' raised just enough to keep the update's sum zero (the server removes any common mode); the adapters unchanged |
| krum, multikrum, bulyan | no change except the promoted item's bias, by 0.8 x the norm of an honest update's noise, so that it sits closer to every honest update than they sit to each other |

The promoted item is the catalogue item with the median number of training ratings among rated
items (the lowest index on ties). Reported for each configuration, clean and attacked: test
NDCG@10 and HR@10 (PROTOCOL), and over the test users who have not rated the promoted item, its
median rank and the share of users with it in their top 10.

    python -m simulations.bench_poison [--aggregator trimmed-mean] [--strategy fedadam] [--seed 0]
        [--rounds 48] [--clients 943] [--only attacked|clean] [--out simulations/results/poison]
        [--resume RUN-FOLDER-NAME]  (an interrupted run continues from its checkpoint; the hostile
        client of each later round is drawn from a fresh stream)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from flwr.app import Array, ArrayRecord
from rich.console import Console
from rich.table import Table

from common.io import write_json_atomic
from common.partition import dataset_from_source, split_for
from common.privacy import client_schedule
from common.run_config import resolve
from server.federation import Federation
from simulations.inprocess_grid import InProcessGrid, state_of

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_LOG = "hostile.jsonl"  # one line per hostile reply sent, in the run folder
RIVALS = 50  # the items the hostile update pushes down: those the global model ranks highest
BEST_RESPONSE = {"mean": "norm", "median": "rank", "trimmed-mean": "rank", "krum": "closest",
                 "multikrum": "closest", "bulyan": "closest"}


def promoted_item(source: str) -> int:
    """The rated item with the median training count (lowest index on ties)."""
    split = split_for(source)
    data = split.data
    counts = np.zeros(data.num_items, dtype=np.int64)
    for u in range(data.num_users):
        np.add.at(counts, data.item[split.train[u]], 1)
    rated = np.flatnonzero(counts > 0)
    order = rated[np.lexsort((rated, counts[rated]))]
    return int(order[len(order) // 2])


def honest_noise_std(cfg: dict) -> float:
    """Std of the DP noise on one coordinate of an honest SGD update (public: lr sigma C sqrt(K) / B)."""
    schedule = client_schedule(cfg)
    lr = max(cfg["learning-rate"], cfg["item-learning-rate"])
    return lr * cfg["noise-multiplier"] * cfg["max-grad-norm"] * math.sqrt(schedule.steps) / \
        schedule.expected_batch_size


class PoisonGrid(InProcessGrid):
    """Every train round, the first sampled node (in a fresh random order) answers with a hostile update."""

    def __init__(self, num_nodes: int, run_config: dict, seed: int, target: int, mode: str | None) -> None:
        super().__init__(num_nodes, run_config, tamper=self._poison if mode else None)
        self.seed = seed
        self.target, self.mode = target, mode
        self.federation: Federation | None = None
        self.hostile: int | None = None

    def send_and_receive(self, messages, timeout: float):
        train = [m for m in messages if m.metadata.message_type == "train"]
        self.hostile, self.round = None, None
        if train:  # drawn from (seed, round): a resumed run draws what an uninterrupted one would
            rnd = self.round = int(train[0].content["config"]["server-round"])
            self.hostile = int(np.random.default_rng([self.seed, 99, rnd]).choice(
                [m.metadata.dst_node_id for m in train]))
        return super().send_and_receive(messages, timeout)

    def _poison(self, node: int, content) -> None:
        fed = self.federation
        if node != self.hostile or fed is None or "arrays" not in content.array_records:
            return
        cfg, names = fed.cfg, fed.names
        states = state_of(content)
        current = dict(zip(names, fed.arrays))
        delta = {k: states[k].astype(np.float64) - current[k] for k in names}
        bound = 0.999 * fed.max_update_norm
        bias = "item_bias"
        if self.mode == "norm":
            delta = {k: np.zeros_like(v) for k, v in delta.items()}
            delta[bias][self.target] = bound
        elif self.mode == "rank":
            r = 6 * honest_noise_std(cfg)
            delta = {k: np.zeros_like(v) for k, v in delta.items()}
            current_bias = current[bias].astype(np.float64).copy()
            current_bias[self.target] = -np.inf
            rivals = np.argsort(-current_bias, kind="stable")[:RIVALS]
            others = np.ones(len(current_bias), dtype=bool)
            others[rivals] = False
            others[self.target] = False
            delta[bias][rivals] = -r
            delta[bias][self.target] = r
            delta[bias][others] = (RIVALS - 1) * r / others.sum()  # zero sum: nothing for the server to remove
        else:  # "closest": near every honest update, with a bump on the promoted item
            dimension = sum(v.size for v in delta.values())
            delta = {k: np.zeros_like(v) for k, v in delta.items()}
            delta[bias][self.target] = 0.8 * honest_noise_std(cfg) * math.sqrt(dimension)
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in delta.values()))
        if norm > bound:
            delta = {k: v * (bound / norm) for k, v in delta.items()}
        content["arrays"] = ArrayRecord({k: Array((current[k] + delta[k]).astype(np.float32)) for k in names})
        with open(fed.folder.root / HOSTILE_LOG, "a", encoding="utf-8") as log:  # survives a resume
            log.write(json.dumps({"round": self.round, "node": node, "mode": self.mode}) + "\n")


def promotion(fed: Federation, target: int) -> dict:
    """Median rank of ``target`` and the share of test users with it in their top 10 (users who rated
    it excluded), on the final global state."""
    split, users = fed.evaluator.split, fed.evaluator.users
    scores = fed.evaluator.scores(fed.names, fed.arrays, "test")
    ranks = []
    for k, u in enumerate(users):
        seen = np.zeros(split.data.num_items, dtype=bool)
        seen[split.data.item[split.history_rows(int(u), "test")]] = True
        if seen[target]:
            continue
        s = scores[k]
        candidates = ~seen
        ranks.append(int(np.count_nonzero((s > s[target]) & candidates)
                         + np.count_nonzero((s[:target] == s[target]) & candidates[:target])))
    ranks_a = np.array(ranks)
    return {"users": int(len(ranks_a)), "median_rank": float(np.median(ranks_a)),
            "top10_share": float(np.mean(ranks_a < 10))}


def run_one(aggregator: str, strategy: str, seed: int, attacked: bool, rounds: int | None, clients: int | None,
            out: Path, extra: dict, resume: str | None = None) -> dict:
    source = "recbole"
    population = clients or dataset_from_source(source).num_users
    target = promoted_item(source)
    name = f"{aggregator}-{strategy}-{'attacked' if attacked else 'clean'}-seed{seed}"
    run_name = resume or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and not resume.startswith(name + "-"):
        raise typer.BadParameter(f"--resume {resume}: not a run folder of {name}")
    cfg = {"seed": seed, "aggregator": aggregator, "strategy": strategy, "output-dir": str(out / "runs"),
           "run-name": run_name, "resume": bool(resume), **extra}
    if rounds is not None:
        cfg["num-server-rounds"] = rounds
    resolve(cfg)
    grid = PoisonGrid(population, cfg, seed, target, BEST_RESPONSE[aggregator] if attacked else None)
    t0 = time.perf_counter()
    fed = Federation(grid, cfg)
    grid.federation = fed
    run_dir = fed.run()
    before_seconds = _seconds_before(run_dir, fed.start_round - 1)
    result = json.loads((run_dir / "result.json").read_text())
    rounds_rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    row = {"aggregator": aggregator, "strategy": strategy, "seed": seed, "attacked": attacked,
           "attack": BEST_RESPONSE[aggregator] if attacked else None, "promoted_item": target,
           "promoted_item_id": fed.runtime.data.items[target].item_id, "hostile_replies": _hostile_replies(run_dir),
           "resumed_after_round": fed.start_round - 1,
           "rejected": sum(len(r["rejected"]) for r in rounds_rows), "max_update_norm": fed.max_update_norm,
           "test_NDCG@10": result["metrics"]["NDCG@10"], "test_HR@10": result["metrics"]["HR@10"],
           **promotion(fed, target), "clients": population, "rounds": result["config"]["rounds"],
           "wall_seconds": round(before_seconds + time.perf_counter() - t0, 1), "run_dir": str(run_dir), "extra": extra}
    write_json_atomic(out / f"{name}.json", row)
    return row


def _hostile_replies(run_dir: Path) -> int:
    """Hostile replies sent over the whole run (both sides of a resume; a round re-run after a crash
    counts once)."""
    log = run_dir / HOSTILE_LOG
    if not log.exists():
        return 0
    return len({json.loads(x)["round"] for x in log.read_text(encoding="utf-8").splitlines()})


def _seconds_before(run_dir: Path, last_round: int) -> float:
    """The recorded seconds of rounds 1..last_round (those a resumed run took over)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return float(sum(r.get("round_seconds", 0.0) for r in rows if 1 <= r["round"] <= last_round))


def markdown_table(folder: Path) -> str:
    """The result rows in ``folder``, clean beside attacked for each configuration and seed."""
    from common.io import read_json

    rows = [read_json(p) for p in sorted(folder.glob("*.json"))]
    keyed = {(r["aggregator"], r["strategy"], r["seed"], r["attacked"]): r for r in rows}
    lines = ["| aggregator + server step | seed | clean test NDCG@10 | attacked test NDCG@10 | promoted item: clean "
             "top-10 share / median rank | attacked top-10 share / median rank | attack | rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for (agg, strat, seed, attacked), r in sorted(keyed.items()):
        if attacked:
            continue
        a = keyed.get((agg, strat, seed, True))
        lines.append(f"| {agg} + {strat} | {seed} | {r['test_NDCG@10']:.4f} | "
                     f"{a['test_NDCG@10']:.4f} | {100 * r['top10_share']:.1f}% / {r['median_rank']:.0f} | "
                     f"{100 * a['top10_share']:.1f}% / {a['median_rank']:.0f} | {a['attack']} | {a['rejected']} |"
                     if a else f"| {agg} + {strat} | {seed} | {r['test_NDCG@10']:.4f} | - | "
                               f"{100 * r['top10_share']:.1f}% / {r['median_rank']:.0f} | - | - | - |")
    return "\n".join(lines)


def main(aggregator: str = typer.Option("trimmed-mean", help="aggregator under test"),
         strategy: str = typer.Option("fedadam", help="server step"),
         seed: int = typer.Option(0, help="seed of the run and of which client is hostile"),
         rounds: Optional[int] = typer.Option(None, help="override num-server-rounds"),
         clients: Optional[int] = typer.Option(None, help="use only the first N MovieLens users"),
         only: Optional[str] = typer.Option(None, help="run only 'clean' or 'attacked'"),
         table: bool = typer.Option(False, "--table", help="print the markdown table of the rows in --out and stop"),
         resume: Optional[str] = typer.Option(None, help="continue this interrupted run folder (under --out/runs) "
                                              "from its checkpoint; needs --only"),
         set_: Optional[list[str]] = typer.Option(None, "--set", help="run-config override key=value (repeatable)"),
         out: Path = typer.Option(ROOT / "simulations" / "results" / "poison", help="folder for the result rows")) -> None:
    """Run the clean and the attacked federation for one configuration and print the comparison."""
    from common.run_config import parse_overrides

    if table:
        print(markdown_table(out))
        return
    extra = parse_overrides(set_ or [])
    if resume and only is None:
        raise typer.BadParameter("--resume continues one run: say which with --only")
    which = [False, True] if only is None else [only == "attacked"]
    rows = [run_one(aggregator, strategy, seed, attacked, rounds, clients, out, extra, resume) for attacked in which]
    table = Table(title=f"poisoning: 1 hostile client per round, {aggregator} + {strategy}, seed {seed}")
    for col in ("run", "attack", "test NDCG@10", "test HR@10", "promoted median rank", "promoted top-10 share",
                "hostile sent", "rejected", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row("attacked" if r["attacked"] else "clean", r["attack"] or "-", f"{r['test_NDCG@10']:.4f}",
                      f"{r['test_HR@10']:.4f}", f"{r['median_rank']:.0f}", f"{100 * r['top10_share']:.1f}%",
                      str(r["hostile_replies"]), str(r["rejected"]), f"{r['wall_seconds']:.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)
