"""The generic domain format: a JSONL of per-user events plus a catalogue JSONL.

Events: one JSON object per line, ``{"user", "item", "timestamp", "rating"?, "text"?}``.
Catalogue: one JSON object per line, ``{"item", "text"}``. File order of the events
breaks timestamp ties, exactly as ``u.data`` order does for MovieLens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common.dataset import RATING_MAX, RATING_MIN, Dataset, Item, sort_ids
from common.errors import DataFormatError


def _json_lines(path: Path):
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(path, f"not valid UTF-8 text ({exc.reason})", no) from None
            if not line.strip():
                raise DataFormatError(path, "empty line; expected one JSON object per line", no)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"unparsable JSON ({exc.msg})", no) from None
            except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, or nesting too deep
                raise DataFormatError(path, f"unparsable JSON ({type(exc).__name__}: {str(exc)[:80]})", no) from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, "expected a JSON object", no)
            yield no, obj


def _id(path: Path, no: int, obj: dict, key: str) -> str:
    if key not in obj:
        raise DataFormatError(path, f"missing field {key!r}", no)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, f"field {key!r} must be a string or integer id, got {value!r}", no)
    return str(value)


def _number(path: Path, no: int, obj: dict, key: str, required: bool) -> float:
    if key not in obj or obj[key] is None:
        if required:
            raise DataFormatError(path, f"missing field {key!r}", no)
        return math.nan
    value = obj[key]
    try:
        number = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # a JSON integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise DataFormatError(path, f"field {key!r} must be a finite number, got {value!r}", no)
    return number


def _rating(path: Path, no: int, obj: dict) -> float:
    """The optional rating: NaN when absent, else a finite number within 1..5."""
    rating = _number(path, no, obj, "rating", required=False)
    if not math.isnan(rating) and not RATING_MIN <= rating <= RATING_MAX:
        raise DataFormatError(
            path, f"field 'rating' must be within {RATING_MIN:g}..{RATING_MAX:g}, got {obj['rating']!r}", no
        )
    return rating


def load_catalogue(path: str | Path) -> list[Item]:
    """Read a catalogue JSONL ``{"item", "text"}``; ids must be unique, text non-empty."""
    path = Path(path)
    items: dict[str, Item] = {}
    for no, obj in _json_lines(path):
        item_id = _id(path, no, obj, "item")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(path, "field 'text' must be a non-empty string", no)
        if item_id in items:
            raise DataFormatError(path, f"duplicate item id {item_id!r}", no)
        items[item_id] = Item(item_id=item_id, title=text, text=text)
    if not items:
        raise DataFormatError(path, "empty catalogue")
    return [items[i] for i in sort_ids(list(items))]


def load_jsonl(events_path: str | Path, catalogue_path: str | Path) -> Dataset:
    """Load events and catalogue to a Dataset; unknown item ids are an error, never dropped."""
    events_path = Path(events_path)
    items = load_catalogue(catalogue_path)
    index = {it.item_id: k for k, it in enumerate(items)}
    users, item_idx, ratings, stamps, texts = [], [], [], [], []
    for no, obj in _json_lines(events_path):
        user = _id(events_path, no, obj, "user")
        item = _id(events_path, no, obj, "item")
        if item not in index:
            raise DataFormatError(events_path, f"unknown item id {item!r} (not in {Path(catalogue_path).name})", no)
        text = obj.get("text")
        if text is not None and not isinstance(text, str):
            raise DataFormatError(events_path, f"field 'text' must be a string, got {text!r}", no)
        users.append(user)
        item_idx.append(index[item])
        stamps.append(_number(events_path, no, obj, "timestamp", required=True))
        ratings.append(_rating(events_path, no, obj))
        texts.append(text)
    if not users:
        raise DataFormatError(events_path, "no events")
    user_ids = sort_ids(users)
    uindex = {u: k for k, u in enumerate(user_ids)}
    return Dataset(
        items=items, user_ids=user_ids,
        user=np.array([uindex[u] for u in users], dtype=np.int64),
        item=np.array(item_idx, dtype=np.int64),
        rating=np.array(ratings, dtype=np.float64),
        timestamp=np.array(stamps, dtype=np.float64),
        event_text=texts if any(t is not None for t in texts) else None,
    )
