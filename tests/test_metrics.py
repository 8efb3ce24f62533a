"""Metrics on hand-computed rankings, ties and exclusions (PROTOCOL.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics import metrics_from_ranks, target_rank


def _none(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


def test_rank_strictly_higher():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert target_rank(scores, 2, _none(4)) == 2  # 0.9 and 0.7 beat it
    assert target_rank(scores, 1, _none(4)) == 0


def test_ties_count_smaller_index_only():
    scores = np.array([0.5, 0.5, 0.5, 0.9])
    assert target_rank(scores, 0, _none(4)) == 1  # only item 3 is higher
    assert target_rank(scores, 1, _none(4)) == 2  # item 3, and tie with smaller index 0
    assert target_rank(scores, 2, _none(4)) == 3


def test_excluded_items_do_not_count():
    scores = np.array([0.9, 0.8, 0.5, 0.5])
    excluded = np.array([True, False, True, False])
    assert target_rank(scores, 3, excluded) == 1  # 0 and 2 excluded; 1 is higher
    # the target is never excluded from its own ranking
    assert target_rank(scores, 3, np.array([True, True, True, True])) == 0


def test_metric_values():
    m = metrics_from_ranks(np.array([0, 1, 9, 10, 19, 25]))
    assert m["HR@10"] == pytest.approx(3 / 6)
    assert m["HR@20"] == pytest.approx(5 / 6)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 6)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 6)


def test_no_users_is_an_error():
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([]))


def test_popularity_ranking_matches_hand_count(ml100k_split):
    from common.evaluation import rank_targets
    from simulations.baselines import popularity_scores

    split = ml100k_split
    data = split.data
    users = split.eval_users()[:5]
    ranks = rank_targets(popularity_scores(split, users), split, "test", users)
    counts = split.train_item_counts()
    for u, r in zip(users, ranks):
        target = data.item[split.test[u]]
        seen = set(data.item[split.history_rows(int(u), "test")].tolist())
        expected = sum(1 for i in range(data.num_items) if i not in seen and i != target and
                       (counts[i] > counts[target] or (counts[i] == counts[target] and i < target)))
        assert r == expected
