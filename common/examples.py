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


def training_examples(split: Split, history_len: int, examples_per_user: int = 0,
                      min_history: int = 1) -> Examples:
    """One example per train interaction at position t >= ``min_history`` of a user's sequence.

    The input text uses only the interactions before t (newest first). With
    ``examples_per_user`` > 0 only each user's most recent that many targets are
    used (recent behaviour predicts the held-out items best); 0 keeps them all.
    """
    data = split.data
    texts, targets, users = [], [], []
    for u, rows in enumerate(split.train):
        first = max(min_history, len(rows) - examples_per_user) if examples_per_user > 0 else min_history
        for t in range(first, len(rows)):
            texts.append(user_text(data, rows[:t], history_len))
            targets.append(int(data.item[rows[t]]))
            users.append(u)
    return Examples(texts=texts, targets=np.array(targets, dtype=np.int64), users=np.array(users, dtype=np.int64))
