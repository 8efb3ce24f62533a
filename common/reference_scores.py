"""Training-free reference scorers on the PROTOCOL split: popularity, the text heuristic, the text prior.

user     = sum over the last ``history_len`` items k of (r_k - 2.5) * decay^age_k * t_k   (age 0 = newest)
score(j) = cos(user, t_j) + pop_weight * log(1 + train count_j)

``t`` are the pretrained encoder's unit-norm item text vectors (public). No parameter is trained.
The published choice (decay 0.8, popularity weight 0.2) was made on the validation split from a
20-point grid (``simulations/text_heuristic.py``, ``simulations/results/sequence/``); with
popularity weight 0 it is the text prior alone (the sequence model's parameter-free prior, which is
also how the untrained sequence model ranks; not the "zero-shot encoder" baseline, which reads the
history as text).
"""

from __future__ import annotations

import numpy as np
import torch

from common.evaluation import evaluate_scores
from common.sequence import SequenceRows, evaluation_rows
from common.split import Split

HEURISTIC_DECAY = 0.8
HEURISTIC_POP_WEIGHT = 0.2
HEURISTIC_HISTORY = 50


def popularity_scores(split: Split, users: np.ndarray) -> np.ndarray:
    """[users x items] training interaction counts (every user gets the same ranking)."""
    counts = split.train_item_counts().astype(np.float64)
    return np.broadcast_to(counts, (len(users), counts.size))


def heuristic_users(item_text: torch.Tensor, rows: SequenceRows, decay: float) -> np.ndarray:
    """[rows x dim] unit-norm heuristic users; ``rows`` carry rating codes (0 = none, counted as 2.5)."""
    text = item_text.numpy().astype(np.float64)
    length = rows.items.shape[1]
    age = np.arange(length)[::-1]
    stars = np.where(rows.ratings > 0, rows.ratings, 2.5).astype(np.float64)
    weight = (stars - 2.5) * decay ** age[None, :] * (rows.items < text.shape[0])
    user = np.zeros((len(rows.items), text.shape[1]))
    for k in range(length):  # one history position at a time: no (rows x length x dim) array
        known = rows.items[:, k] < text.shape[0]
        user[known] += weight[known, k, None] * text[rows.items[known, k]]
    return user / np.maximum(np.linalg.norm(user, axis=1, keepdims=True), 1e-12)


def heuristic_scores(item_text: torch.Tensor, rows: SequenceRows, counts: np.ndarray, decay: float,
                     pop_weight: float, users: np.ndarray | None = None) -> np.ndarray:
    """[rows x items] scores of the heuristic (``users``: :func:`heuristic_users`, if already computed)."""
    if users is None:
        users = heuristic_users(item_text, rows, decay)
    text = item_text.numpy().astype(np.float64)
    return users @ text.T + pop_weight * np.log1p(counts.astype(np.float64))[None, :]


def reference_metrics(split: Split, item_text: torch.Tensor | None, users: np.ndarray,
                      which: str = "test") -> dict[str, float]:
    """NDCG@10 and HR@10 of the training-free references on ``which`` split, keyed ``ref_<name>_<metric>``
    (the per-run quality plot draws them as horizontal lines): popularity, and with the item text
    vectors the heuristic and the text prior alone."""
    counts = split.train_item_counts()
    scorers = {"popularity": lambda: popularity_scores(split, users)}
    if item_text is not None:
        rows = evaluation_rows(split, which, HEURISTIC_HISTORY, users)
        user_vectors = heuristic_users(item_text, rows, HEURISTIC_DECAY)
        scorers["heuristic"] = lambda: heuristic_scores(item_text, rows, counts, HEURISTIC_DECAY,
                                                        HEURISTIC_POP_WEIGHT, user_vectors)
        scorers["text_prior"] = lambda: heuristic_scores(item_text, rows, counts, HEURISTIC_DECAY, 0.0, user_vectors)
    out = {}
    for name, scores in scorers.items():
        metrics = evaluate_scores(scores(), split, which, users)
        out.update({f"ref_{name}_{k}": float(metrics[k]) for k in ("NDCG@10", "HR@10")})
    return out
