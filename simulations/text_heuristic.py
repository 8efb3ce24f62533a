"""Choosing the training-free heuristic's settings (:mod:`common.reference_scores`) on validation.

No parameter is trained; ``decay`` and ``pop_weight`` are chosen on the validation split from a
small public grid (:data:`GRID`), and the test split is scored once with the choice.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from common.evaluation import evaluate_scores
from common.reference_scores import heuristic_scores
from common.sequence import SequenceRows
from common.split import Split

GRID = {"decay": (0.7, 0.8, 0.9, 1.0), "pop_weight": (0.0, 0.1, 0.2, 0.3, 0.5)}


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
