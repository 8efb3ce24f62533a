"""Chronological leave-one-out split and the cold-start item hold-out (PROTOCOL.md sections 1, 2, 4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.dataset import Dataset

COLD_START_FRACTION = 0.1
COLD_START_SEED = 0
MIN_EVENTS = 3  # train (at least one), validation and test


class NoEvaluationUsersError(ValueError):
    """No user has the :data:`MIN_EVENTS` events the leave-one-out split needs to evaluate anyone."""


@dataclass
class Split:
    """Per-user chronological sequences (row indices into the Dataset arrays).

    ``train[u]`` lists user u's train rows oldest first; ``valid[u]`` / ``test[u]``
    are single rows (-1 for a user with fewer than 3 interactions, who then has
    no evaluation target and keeps every interaction in train).
    """

    data: Dataset
    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray

    @property
    def num_train(self) -> int:
        return int(sum(len(t) for t in self.train))

    def eval_users(self) -> np.ndarray:
        """Users with both a validation and a test target; raises :class:`NoEvaluationUsersError` if none."""
        users = np.flatnonzero(self.test >= 0)
        if users.size == 0:
            raise NoEvaluationUsersError(
                f"no user has the {MIN_EVENTS} events the leave-one-out split needs (train, validation and "
                f"test): all {self.data.num_users} users have fewer than {MIN_EVENTS} interactions, so there "
                f"is nobody to evaluate"
            )
        return users

    def all_rows(self, user: int) -> np.ndarray:
        """Every row of the user, oldest first (train, then the validation and test targets)."""
        held = [r for r in (self.valid[user], self.test[user]) if r >= 0]
        return np.concatenate([self.train[user], np.asarray(held, dtype=np.int64)]).astype(np.int64)

    def history_rows(self, user: int, split: str) -> np.ndarray:
        """Rows a user's input may use before the target of ``split``, oldest first."""
        if split == "validation":
            return self.train[user]
        if split == "test":
            return np.append(self.train[user], self.valid[user])
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")

    def target_row(self, user: int, split: str) -> int:
        return int(self.valid[user] if split == "validation" else self.test[user])

    def train_item_counts(self) -> np.ndarray:
        """Interactions per item over train rows only (the popularity statistic)."""
        rows = np.concatenate(self.train) if self.train else np.empty(0, dtype=np.int64)
        return np.bincount(self.data.item[rows], minlength=self.data.num_items)


def leave_one_out(data: Dataset) -> Split:
    """Stable chronological sort per user; last -> test, second-to-last -> validation."""
    n = data.num_interactions
    # lexsort: last key is primary; the row number keeps file order for equal timestamps.
    order = np.lexsort((np.arange(n), data.timestamp, data.user))
    users_sorted = data.user[order]
    bounds = np.searchsorted(users_sorted, np.arange(data.num_users + 1))
    train, valid, test = [], np.full(data.num_users, -1), np.full(data.num_users, -1)
    for u in range(data.num_users):
        rows = order[bounds[u]: bounds[u + 1]]
        if len(rows) >= MIN_EVENTS:
            train.append(rows[:-2])
            valid[u], test[u] = rows[-2], rows[-1]
        else:
            train.append(rows)
    return Split(data=data, train=train, valid=valid, test=test)


def cold_start_items(num_items: int, fraction: float = COLD_START_FRACTION, seed: int = COLD_START_SEED) -> np.ndarray:
    """Item indices held out from training: ``round(fraction * num_items)`` drawn uniformly
    without replacement by ``numpy.random.default_rng(seed)``, sorted."""
    rng = np.random.default_rng(seed)
    k = int(round(fraction * num_items))
    return np.sort(rng.choice(num_items, size=k, replace=False))


def without_items(split: Split, held_out: np.ndarray) -> Split:
    """The same split with every train interaction on a held-out item removed.

    Validation and test targets are unchanged; training histories built from the
    returned split never mention a held-out item.
    """
    mask = np.zeros(split.data.num_items, dtype=bool)
    mask[held_out] = True
    train = [rows[~mask[split.data.item[rows]]] for rows in split.train]
    return Split(data=split.data, train=train, valid=split.valid, test=split.test)
