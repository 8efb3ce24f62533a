"""In-memory types for interactions and the item catalogue, shared by every loader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

RATING_MIN, RATING_MAX = 1.0, 5.0  # every format's rating scale (MovieLens stars; feedback uses the same)
_INTEGER_ID = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Item:
    """One catalogue item: public metadata used to render its text."""

    item_id: str
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()
    text: str | None = None  # free text (generic format); MovieLens renders title/year/genres

    def render(self) -> str:
        """The text the encoder sees for this item."""
        if self.text is not None:
            return self.text
        out = self.title if self.year is None else f"{self.title} ({self.year})"
        if self.genres:
            out += ". " + ", ".join(self.genres)
        return out


@dataclass
class Dataset:
    """Interactions in file order plus the catalogue, with dense indices.

    Items are indexed by ascending item id (numerically when every id is an
    integer), users likewise; arrays hold one row per interaction in the order
    the source file lists them (this order breaks timestamp ties).
    """

    items: list[Item]
    user_ids: list[str]
    user: np.ndarray  # int64 user index per interaction
    item: np.ndarray  # int64 item index per interaction
    rating: np.ndarray  # float64, NaN where the source has no rating
    timestamp: np.ndarray  # float64
    event_text: list[str | None] | None = None  # optional per-interaction free text
    item_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.item_index = {it.item_id: i for i, it in enumerate(self.items)}

    @classmethod
    def without_events(cls, items: list[Item]) -> "Dataset":
        """The catalogue and no interactions: a device that holds no events yet."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(items=items, user_ids=[], user=empty, item=empty, rating=np.zeros(0), timestamp=np.zeros(0))

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return int(self.user.shape[0])

    def item_texts(self) -> list[str]:
        """Rendered text of every item, in item-index order."""
        return [it.render() for it in self.items]


def sort_ids(ids: set[str] | list[str]) -> list[str]:
    """Ascending order: numeric when every id is an ASCII integer (``-?[0-9]+``), else lexicographic."""
    ids = list(set(ids))
    if all(_INTEGER_ID.fullmatch(i) for i in ids):
        # The string breaks ties between spellings of one number ("7" and "007"), keeping the order total.
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)
