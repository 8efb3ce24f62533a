"""PROTOCOL.md sections 1, 2 and 4 on the real data and on hand-made ties."""

from __future__ import annotations

import numpy as np

from common.dataset import Dataset, Item
from common.movielens import load_grouplens, write_grouplens
from common.split import cold_start_items, leave_one_out, without_items


def test_counts(ml100k, ml100k_split):
    assert ml100k.num_users == 943
    assert ml100k.num_items == 1682
    assert ml100k.num_interactions == 100_000
    assert ml100k_split.num_train == 98_114
    assert int((ml100k_split.valid >= 0).sum()) == 943
    assert int((ml100k_split.test >= 0).sum()) == 943


def test_split_is_chronological_and_disjoint(ml100k, ml100k_split):
    for u in range(ml100k.num_users):
        rows = np.append(ml100k_split.train[u], [ml100k_split.valid[u], ml100k_split.test[u]])
        assert len(set(rows.tolist())) == len(rows)
        assert np.all(np.diff(ml100k.timestamp[rows]) >= 0)
        assert np.all(ml100k.user[rows] == u)


def _tiny(timestamps: list[int]) -> Dataset:
    n = len(timestamps)
    items = [Item(item_id=str(i + 1), title=f"movie {i + 1}") for i in range(n)]
    return Dataset(items=items, user_ids=["1"], user=np.zeros(n, dtype=np.int64),
                   item=np.arange(n, dtype=np.int64), rating=np.full(n, 4.0),
                   timestamp=np.array(timestamps, dtype=np.float64))


def test_ties_keep_file_order():
    # rows 1..4 share a timestamp: file order must decide, so the last row is the test item
    split = leave_one_out(_tiny([5, 9, 9, 9, 9, 1]))
    assert split.train[0].tolist() == [5, 0, 1, 2]
    assert split.valid[0] == 3
    assert split.test[0] == 4


def test_ties_on_real_data_keep_file_order(ml100k, ml100k_split):
    checked = 0
    for u in range(ml100k.num_users):
        rows = np.append(ml100k_split.train[u], [ml100k_split.valid[u], ml100k_split.test[u]])
        ts = ml100k.timestamp[rows]
        same = np.flatnonzero(ts[1:] == ts[:-1])
        for k in same:
            assert rows[k] < rows[k + 1]
            checked += 1
    assert checked > 1000  # MovieLens-100K has many same-second ratings


def test_both_formats_give_the_same_split(ml100k, ml100k_split, tmp_path):
    grouplens = load_grouplens(write_grouplens(ml100k, tmp_path / "ml-100k"))
    assert grouplens.items == ml100k.items
    assert grouplens.user_ids == ml100k.user_ids
    for name in ("user", "item", "rating", "timestamp"):
        assert np.array_equal(getattr(grouplens, name), getattr(ml100k, name))
    other = leave_one_out(grouplens)
    assert np.array_equal(other.valid, ml100k_split.valid)
    assert np.array_equal(other.test, ml100k_split.test)
    assert all(np.array_equal(a, b) for a, b in zip(other.train, ml100k_split.train))


def test_item_text_from_both_formats(ml100k):
    assert ml100k.items[0].render() == "Toy Story (1995). Animation, Children's, Comedy"
    assert ml100k.items[266].title == "unknown" and ml100k.items[266].year is None


def test_cold_start_hold_out(ml100k, ml100k_split):
    held = cold_start_items(ml100k.num_items)
    assert len(held) == 168 and len(set(held.tolist())) == 168
    assert np.array_equal(held, cold_start_items(ml100k.num_items))  # seed 0 is deterministic
    cold = without_items(ml100k_split, held)
    train_items = np.concatenate([ml100k.item[r] for r in cold.train])
    assert not np.isin(train_items, held).any()
    assert np.array_equal(cold.test, ml100k_split.test)


def test_popularity_uses_train_only(ml100k, ml100k_split):
    counts = ml100k_split.train_item_counts()
    assert counts.sum() == 98_114
    all_counts = np.bincount(ml100k.item, minlength=ml100k.num_items)
    assert (all_counts - counts).sum() == 943 * 2
