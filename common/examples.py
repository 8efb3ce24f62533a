"""Turn a split into training examples: (user text from the allowed history, target item)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.split import Split
from common.text import user_text


@dataclass
class Examples:
    texts: list[str]
    targets: np.ndarray  # item index per example
    users: np.ndarray  # user index per example (never leaves a client in federated use)


def user_examples(split: Split, user: int, history_len: int, examples_per_user: int = 0,
                  min_history: int = 1) -> tuple[list[str], list[int]]:
    """One user's (texts, targets): each train interaction at position t >= ``min_history``.

    The input text uses only the interactions before t (newest first). With
    ``examples_per_user`` > 0 only the user's most recent that many targets are
    used (recent behaviour predicts the held-out items best); 0 keeps them all.
    """
    data, rows = split.data, split.train[user]
    first = max(min_history, len(rows) - examples_per_user) if examples_per_user > 0 else min_history
    steps = range(first, len(rows))
    return [user_text(data, rows[:t], history_len) for t in steps], [int(data.item[rows[t]]) for t in steps]


def training_examples(split: Split, history_len: int, examples_per_user: int = 0,
                      min_history: int = 1) -> Examples:
    """:func:`user_examples` of every user, concatenated (central training)."""
    texts, targets, users = [], [], []
    for u in range(len(split.train)):
        t, y = user_examples(split, u, history_len, examples_per_user, min_history)
        texts += t
        targets += y
        users += [u] * len(y)
    return Examples(texts=texts, targets=np.array(targets, dtype=np.int64), users=np.array(users, dtype=np.int64))
