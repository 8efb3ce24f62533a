"""How well can per-client example-level DP learn even popularity? A reference for the federated targets.

    python -m simulations.bench_dp_popularity [--seeds 3]

The simplest recommender that privrec's model contains is its item bias: a softmax over the
catalogue with one logit per item, whose maximum-likelihood fit is log-popularity, i.e. the
popularity baseline. This benchmark learns that bias alone with the client-side mechanism of
the default run, simulated in numpy so that many settings fit in a minute:

- each round samples clients uniformly; a client trains at most as many sessions as its
  example-level budget allows (the ledger's RDP accountant, one full-batch Gaussian step
  per session at ``noise-multiplier``, q = 1, as in the defaults);
- a session uses the client's most recent ``examples-per-user`` training targets (0: all),
  clips each example's gradient (softmax - one-hot) to C = 1 and multiplies it by ``share``
  (the part of a jointly clipped gradient that is the bias's, next to the LoRA gradients;
  1 = a bias-only model), sums, adds N(0, (sigma C)^2) per item and divides by the number
  of examples;
- the server takes the unweighted mean of the client updates times a server learning rate
  chosen on the validation split from a fixed grid (the real runs weight by examples and
  use FedAdam); test NDCG@10 is PROTOCOL's full ranking.

It is a simulation of one part of the model, not a federated run: it shows how much of the
popularity signal survives the client-side noise at a given amount of client data. It is a
reference, not a bound on the real model, which also has the text similarity (the default
run beats the 20-example figure). Figures are printed, nothing is stored.
"""

from __future__ import annotations

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common.evaluation import evaluate_scores
from common.ledger import Session, composed_epsilon
from common.run_config import resolve
from server.federation import dataset_from_source, split_for

LEARNING_RATES = (3.0, 10.0, 30.0, 100.0)


def _max_sessions(noise: float, delta: float, budget: float) -> int:
    """Sessions of one full-batch step a client can run before its composed epsilon exceeds the budget."""
    n = 0
    while composed_epsilon([Session(noise, 1.0, 1, 1.0, delta, sensitivity=1.0)] * (n + 1), delta) <= budget:
        n += 1
        if n > 10_000:
            break
    return n


def _learn_bias(targets: list[np.ndarray], num_items: int, rounds: int, per_round: int, examples: int,
                noise: float, share: float, lr: float, sessions: int, rng: np.random.Generator) -> np.ndarray:
    bias = np.zeros(num_items)
    used = np.zeros(len(targets), dtype=np.int64)
    for _ in range(rounds):
        updates = []
        for u in rng.choice(len(targets), size=min(per_round, len(targets)), replace=False):
            y = targets[u][-examples:] if examples else targets[u]
            if used[u] >= sessions or len(y) == 0:
                continue
            used[u] += 1
            p = np.exp(bias - bias.max())
            p /= p.sum()
            norms = np.sqrt(np.maximum(1.0 - 2.0 * p[y] + (p ** 2).sum(), 1e-12))
            factor = share * np.minimum(1.0, 1.0 / norms)  # clip each example's gradient to share * C (C = 1)
            grad = factor.sum() * p
            np.add.at(grad, y, -factor)
            grad += rng.normal(0.0, noise, num_items)
            updates.append(-grad / len(y))
        if updates:
            bias += lr * np.mean(updates, axis=0)
    return bias


def main(seeds: int = typer.Option(3, help="seeds per setting (mean and std are printed)"),
         noise: float = typer.Option(1.0, help="client noise multiplier"),
         budget: float = typer.Option(8.0, help="client epsilon budget (delta 1e-5)")) -> None:
    """Print test NDCG@10 of a DP-learned popularity bias for several amounts of client data."""
    cfg = resolve({})
    data, split = dataset_from_source(cfg["dataset"]), split_for(cfg["dataset"])
    users = split.eval_users()
    # a user's training examples: every train row after the first (the first has no history)
    targets = [data.item[rows[1:]] for rows in split.train]
    sessions = _max_sessions(noise, cfg["delta"], budget)

    def ndcg(bias: np.ndarray, which: str) -> float:
        return evaluate_scores(np.repeat(bias[None], len(users), axis=0), split, which, users)["NDCG@10"]

    console = Console(width=150)
    popularity = ndcg(np.log1p(split.train_item_counts().astype(float)), "test")
    table = Table(title=f"DP-learned popularity bias (noise {noise}, {sessions} sessions per client under "
                        f"budget {budget:g}, server lr from {LEARNING_RATES} on validation); "
                        f"non-private popularity: test NDCG@10 {popularity:.4f}")
    for col in ("examples per session", "clients per round", "rounds", "bias share of clip", "lr",
                "test NDCG@10", "of popularity"):
        table.add_column(col, justify="right")
    settings = [(20, 100, 8, 1.0), (20, 100, 8, 0.3), (50, 100, 8, 1.0), (0, 100, 8, 1.0), (20, 943, 2, 1.0),
                (0, 943, 2, 1.0)]
    for examples, per_round, rounds, share in settings:
        def learn(lr: float, seed: int) -> np.ndarray:
            return _learn_bias(targets, data.num_items, rounds, per_round, examples, noise, share, lr, sessions,
                               np.random.default_rng(seed))
        best = max(LEARNING_RATES, key=lambda lr: np.mean([ndcg(learn(lr, s), "validation") for s in range(seeds)]))
        test = [ndcg(learn(best, s), "test") for s in range(seeds)]
        table.add_row("all" if examples == 0 else str(examples), str(per_round), str(rounds), f"{share:g}",
                      f"{best:g}", f"{np.mean(test):.4f} ± {np.std(test, ddof=1) if seeds > 1 else 0:.4f}",
                      f"{np.mean(test) / popularity:.0%}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
