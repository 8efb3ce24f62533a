"""Render a user's allowed history as text: newest first, each item with its rating as words."""

from __future__ import annotations

import math

import numpy as np

from common.dataset import Dataset

RATING_WORDS = {1: "hated", 2: "disliked", 3: "was lukewarm on", 4: "liked", 5: "loved"}


def rating_words(rating: float) -> str | None:
    """Words for a rating on the 1-5 scale (rounded); None when there is no rating."""
    if rating is None or math.isnan(rating):
        return None
    return RATING_WORDS.get(int(min(5, max(1, round(rating)))))


def history_item_text(data: Dataset, row: int) -> str:
    """One history entry: the rating as words, then the item's short name, then any event text."""
    item = data.items[int(data.item[row])]
    name = item.text if item.text is not None else (
        item.title if item.year is None else f"{item.title} ({item.year})"
    )
    words = rating_words(float(data.rating[row]))
    out = f"{words} {name}" if words else name
    if data.event_text is not None and data.event_text[row]:
        out += f": {data.event_text[row]}"
    return out


def user_text(data: Dataset, history_rows: np.ndarray, history_len: int) -> str:
    """The user's most recent ``history_len`` allowed interactions, newest first.

    ``history_rows`` are the rows the user may use, oldest first (see Split.history_rows).
    """
    if history_len < 1:
        raise ValueError(f"history_len must be at least 1, got {history_len}")
    recent = history_rows[::-1][:history_len]
    if len(recent) == 0:
        return "no history yet"
    return "; ".join(history_item_text(data, int(r)) for r in recent)
