"""Full-ranking metrics exactly as PROTOCOL.md section 3 defines them."""

from __future__ import annotations

import numpy as np

CUTOFFS = {"HR@10": 10, "NDCG@10": 10, "MRR@10": 10, "HR@20": 20}


class NonFiniteScoresError(ValueError):
    """Scores hold NaN or +-inf: comparisons with NaN are false, so ranking them would count hits."""


def check_finite(scores: np.ndarray) -> None:
    """Raise :class:`NonFiniteScoresError` if any score is NaN or +-inf."""
    bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
    if bad:
        raise NonFiniteScoresError(f"{bad} of {np.size(scores)} scores are not finite (NaN or +-inf); "
                                   f"refusing to rank them")


def target_rank(scores: np.ndarray, target: int, excluded: np.ndarray) -> int:
    """0-based rank of ``target`` among the candidates (all items not ``excluded``).

    rank = #candidates scoring strictly higher + #candidates scoring equal with a
    smaller item index. ``excluded`` is a boolean mask; the target itself always
    stays a candidate. Raises :class:`NonFiniteScoresError` if any score is not finite.
    """
    check_finite(scores)
    return rank_checked(scores, target, excluded)


def rank_checked(scores: np.ndarray, target: int, excluded: np.ndarray) -> int:
    """:func:`target_rank` for scores the caller has already passed through :func:`check_finite`."""
    candidate = ~excluded
    candidate[target] = True
    s = scores[target]
    higher = np.count_nonzero((scores > s) & candidate)
    tied_before = np.count_nonzero((scores[:target] == s) & candidate[:target])
    return int(higher + tied_before)


def ndcg_at_10(ranks: np.ndarray) -> np.ndarray:
    """Each 0-based rank's NDCG@10 (one held-out item: 1 / log2(rank + 2) inside the top 10, else 0)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """Mean HR@10, NDCG@10, MRR@10 and HR@20 over the given 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to average (no users evaluated)")
    hit10 = ranks < 10
    return {
        "HR@10": float(hit10.mean()),
        "NDCG@10": float(ndcg_at_10(ranks).mean()),
        "MRR@10": float(np.where(hit10, 1.0 / (ranks + 1.0), 0.0).mean()),
        "HR@20": float((ranks < 20).mean()),
    }
