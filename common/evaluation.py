"""Score users against the full catalogue and compute PROTOCOL.md metrics."""

from __future__ import annotations

import numpy as np
import torch

from common.metrics import check_finite, metrics_from_ranks, rank_checked
from common.split import Split
from common.text import user_text


def eval_texts(split: Split, which: str, history_len: int, users: np.ndarray | None = None) -> list[str]:
    """Input texts for evaluating ``users`` (default: all with targets) on ``which`` split."""
    users = split.eval_users() if users is None else users
    return [user_text(split.data, split.history_rows(int(u), which), history_len) for u in users]


def rank_targets(scores: np.ndarray, split: Split, which: str, users: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target; excluded candidates are the user's allowed history items.

    Raises :class:`~common.metrics.NonFiniteScoresError` if any score is NaN or +-inf.
    """
    check_finite(scores)
    data = split.data
    ranks = np.empty(len(users), dtype=np.int64)
    for k, u in enumerate(users):
        excluded = np.zeros(data.num_items, dtype=bool)
        excluded[data.item[split.history_rows(int(u), which)]] = True
        ranks[k] = rank_checked(scores[k], int(data.item[split.target_row(int(u), which)]), excluded)
    return ranks


def evaluate_scores(scores: np.ndarray, split: Split, which: str, users: np.ndarray) -> dict[str, float]:
    """PROTOCOL metrics for a [users x items] score matrix."""
    return metrics_from_ranks(rank_targets(scores, split, which, users))


@torch.no_grad()
def user_scores(model, features) -> np.ndarray:
    """[users x items] scores from a Recommender over cached user features."""
    model.eval()
    out = []
    for start in range(0, len(features), 256):
        idx = torch.arange(start, min(start + 256, len(features)))
        feats, mask = features.batch(idx)
        out.append(model.head.score(model.encoder.forward_features(feats, mask)).numpy())
    return np.concatenate(out)
