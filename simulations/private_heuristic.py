"""The training-free heuristic with its popularity released under local DP: a private peer of the model.

    python -m simulations.private_heuristic [--draws 20] [--out simulations/results/private-heuristic]

The heuristic (:mod:`common.reference_scores`) ranks by the cosine of the user's rating-weighted,
recency-decayed text vector with each item, plus ``weight * log(1 + count)``; its only private input is
the training count of each item. Here that count comes from a simulated local-DP release: every one of
the N devices adds independent N(0, sigma^2) noise to its vector of per-item rating counts and the
server sums them (noise std sigma * sqrt(N) per item; negative sums count as 0). Adding or removing one
rating changes one count by 1, so one release is the Gaussian mechanism with L2 sensitivity 1 and
sigma is set for an interaction-level epsilon of at most the target at delta 1e-5 (Opacus' RDP
accountant, one full release; trust: nobody; the users' text vectors are computed on their devices from
public item text). This is a benchmark of the mechanism's expected quality, not a product feature: the
noise is drawn from seeded generators (one per draw) and each figure is the mean over the draws.

The popularity weight is chosen for each epsilon on the validation split among :data:`WEIGHTS` (decay
fixed at the published heuristic's 0.8); test is computed for the chosen weight only.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from common.io import write_json_atomic
from common.split import Split

OUT = Path(__file__).parent / "results" / "private-heuristic"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.5)  # declared before the first run
DELTA = 1e-5
DRAWS = 20


def release_noise(epsilon: float, delta: float = DELTA) -> float:
    """The per-device noise std of one count release (L2 sensitivity 1) costing at most ``epsilon`` at ``delta``
    (within Opacus' solver tolerance of 0.01 below it)."""
    from common.privacy import noise_for_epsilon

    return noise_for_epsilon(epsilon, delta, 1.0, 1, "rdp")


def noisy_counts(counts: np.ndarray, sigma: float, devices: int, rng: np.random.Generator) -> np.ndarray:
    """The server's sum of ``devices`` noisy count vectors: the true counts plus N(0, sigma^2 devices) per item."""
    return np.asarray(counts, dtype=np.float64) + rng.normal(0.0, sigma * np.sqrt(devices), np.shape(counts))


@dataclass
class HeuristicInputs:
    """What the heuristic needs on one split: the users, their heuristic vectors and the item texts."""

    split: Split
    users: np.ndarray
    user_vectors: dict[str, np.ndarray]  # per evaluation split
    item_text: np.ndarray  # float64 (items, dim)


def heuristic_inputs(split: Split | None = None) -> HeuristicInputs:
    """The heuristic's user vectors for validation and test on ``split`` (default: the default dataset's
    PROTOCOL split)."""
    from common.partition import split_for
    from common.reference_scores import HEURISTIC_DECAY, HEURISTIC_HISTORY, heuristic_users
    from common.run_config import resolve
    from common.sequence import evaluation_rows
    from common.sequence_runtime import item_text_vectors

    cfg = resolve({})
    split = split_for(cfg["dataset"]) if split is None else split
    users = split.eval_users()
    vectors = item_text_vectors(split.data, cfg["item-max-length"])
    user_vectors = {w: heuristic_users(vectors, evaluation_rows(split, w, HEURISTIC_HISTORY, users), HEURISTIC_DECAY)
                    for w in ("validation", "test")}
    return HeuristicInputs(split, users, user_vectors, vectors.numpy().astype(np.float64))


def target_ranks(inputs: HeuristicInputs, which: str, counts: np.ndarray, weight: float) -> np.ndarray:
    """Each user's 0-based rank of the ``which`` target under the heuristic with popularity ``counts``
    (negatives as 0)."""
    from common.evaluation import rank_targets

    scores = inputs.user_vectors[which] @ inputs.item_text.T + weight * np.log1p(np.maximum(counts, 0.0))[None, :]
    return rank_targets(scores, inputs.split, which, inputs.users)


def private_heuristic_ranks(inputs: HeuristicInputs, which: str, epsilon: float, weight: float,
                            draws: int = DRAWS) -> np.ndarray:
    """(draws, users) target ranks over ``draws`` simulated releases at ``epsilon`` (draw k: seed k)."""
    split = inputs.split
    counts, sigma, devices = split.train_item_counts(), release_noise(epsilon), len(split.train)
    return np.stack([target_ranks(inputs, which, noisy_counts(counts, sigma, devices, np.random.default_rng(k)),
                                  weight) for k in range(draws)])


def private_heuristic_ndcg(inputs: HeuristicInputs, which: str, epsilon: float, weight: float,
                           draws: int = DRAWS) -> np.ndarray:
    """(draws, users) per-user NDCG@10 over ``draws`` simulated releases at ``epsilon``."""
    from common.metrics import ndcg_at_10

    return ndcg_at_10(private_heuristic_ranks(inputs, which, epsilon, weight, draws))


def chosen_weight(inputs: HeuristicInputs, epsilon: float, draws: int = DRAWS) -> tuple[float, dict[float, float]]:
    """The weight of :data:`WEIGHTS` with the highest mean validation NDCG@10 over the draws, and every mean."""
    means = {w: float(private_heuristic_ndcg(inputs, "validation", epsilon, w, draws).mean()) for w in WEIGHTS}
    return max(means, key=means.get), means


def main(draws: int = typer.Option(DRAWS, help="simulated releases per figure"), out: Path = typer.Option(OUT)) -> None:
    """Choose the weight on validation for each epsilon and write the test figures of the choices."""
    from common.metrics import ndcg_at_10

    if draws < 2:
        raise typer.BadParameter(f"--draws must be at least 2 (the record gives the sd over draws), got {draws}")
    inputs = heuristic_inputs()
    points = []
    for epsilon in EPSILONS:
        weight, validation = chosen_weight(inputs, epsilon, draws)
        ranks = private_heuristic_ranks(inputs, "test", epsilon, weight, draws)
        test, hits = ndcg_at_10(ranks).mean(axis=1), (ranks < 10).mean(axis=1)
        points.append({"epsilon": epsilon, "delta": DELTA, "noise_std_per_device": release_noise(epsilon),
                       "validation_by_weight": validation, "chosen_weight": weight,
                       "test_NDCG@10_mean": statistics.mean(test), "test_NDCG@10_sd_over_draws": statistics.stdev(test),
                       "test_HR@10_mean": statistics.mean(hits), "validation_NDCG@10_mean": validation[weight]})
        print(json.dumps(points[-1]))
    record = {"benchmark": "private-heuristic", "devices": len(inputs.split.train), "draws": draws,
              "weights_tried": list(WEIGHTS), "unit": "one rating (interaction level; L2 sensitivity 1)",
              "trust": "nobody (local DP on every device)", "points": points}
    write_json_atomic(out / "private-heuristic.json", record)


if __name__ == "__main__":
    typer.run(main)
