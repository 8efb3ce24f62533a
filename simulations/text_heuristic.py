"""The training-free reference: zero-shot text vectors, a rating-weighted recency-decayed user, popularity.

user     = sum over the last ``history_len`` items k of (r_k - 2.5) * decay^age_k * t_k   (age 0 = newest)
score(j) = cos(user, t_j) + pop_weight * log(1 + train count_j)

No parameter is trained; ``decay`` and ``pop_weight`` are chosen on the validation split from a
small public grid (:data:`GRID`), and the test split is scored once with the choice.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from common.evaluation import evaluate_scores
from common.sequence import SequenceRows
from common.split import Split

GRID = {"decay": (0.7, 0.8, 0.9, 1.0), "pop_weight": (0.0, 0.1, 0.2, 0.3, 0.5)}


def heuristic_scores(item_text: torch.Tensor, rows: SequenceRows, counts: np.ndarray, decay: float,
                     pop_weight: float) -> np.ndarray:
    """[rows x items] scores of the heuristic; ``rows`` carry rating codes (0 = none, counted as 2.5)."""
    text = item_text.numpy().astype(np.float64)
    padded = np.vstack([text, np.zeros((1, text.shape[1]))])
    n, length = rows.items.shape
    age = np.arange(length)[::-1]
    stars = np.where(rows.ratings > 0, rows.ratings, 2.5).astype(np.float64)
    weight = (stars - 2.5) * decay ** age[None, :] * (rows.items < text.shape[0])
    user = np.einsum("nl,nld->nd", weight, padded[rows.items])
    user /= np.maximum(np.linalg.norm(user, axis=1, keepdims=True), 1e-12)
    return user @ text.T + pop_weight * np.log1p(counts.astype(np.float64))[None, :]


def choose_on_validation(item_text: torch.Tensor, split: Split, validation: SequenceRows,
                         users: np.ndarray) -> tuple[dict, list[dict]]:
    """The grid point with the best validation NDCG@10 (ties: the first), and every point's figure."""
    counts = split.train_item_counts()
    tried = []
    for decay, pop in itertools.product(GRID["decay"], GRID["pop_weight"]):
        scores = heuristic_scores(item_text, validation, counts, decay, pop)
        ndcg = evaluate_scores(scores, split, "validation", users)["NDCG@10"]
        tried.append({"decay": decay, "pop_weight": pop, "validation_NDCG@10": ndcg})
    best = max(tried, key=lambda r: r["validation_NDCG@10"])
    return {"decay": best["decay"], "pop_weight": best["pop_weight"]}, tried
