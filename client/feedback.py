"""Feedback on the device: a rating, or accept / reject of a shown recommendation, appended to the
device's own events file (validated, atomically). The next training session learns from it; it
never leaves the device except through DP training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from client.device_state import read_device_info
from common.errors import DataFormatError
from common.partition import device_dataset
from common.results import write_text_atomic

ACCEPT_RATING = 5.0  # "loved": the user asked for more of this
REJECT_RATING = 1.0  # "hated": shown, and turned down


def record_feedback(state_dir: str | Path, item_id: str, rating: float) -> dict:
    """Append ``{"user", "item", "timestamp", "rating"}`` to the device's events.jsonl; returns the event."""
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating) \
            or not 1 <= rating <= 5:
        raise ValueError(f"rating must be a number from 1 to 5, got {rating!r}")
    data_path = Path(read_device_info(Path(state_dir))["data-path"])
    events = data_path / "events.jsonl"
    if not events.is_file():
        raise DataFormatError(events, "missing: feedback is recorded in the JSONL user format (events.jsonl + "
                                      "catalogue.jsonl); a GroupLens slice is read-only here")
    data = device_dataset(data_path)  # validates both files before anything is written
    if str(item_id) not in data.item_index:
        raise DataFormatError(data_path / "catalogue.jsonl", f"unknown item id {item_id!r}: feedback must name a "
                                                             f"catalogue item")
    if data.num_users != 1:
        raise DataFormatError(events, f"expected the events of exactly one user, found {data.num_users}")
    # Never earlier than the newest event, so the chronological order keeps the feedback last.
    stamp = max(float(int(time.time())), float(data.timestamp.max()))
    event = {"user": data.user_ids[0], "item": str(item_id), "timestamp": stamp, "rating": float(rating)}
    text = events.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    write_text_atomic(events, text + json.dumps(event) + "\n")
    return event
