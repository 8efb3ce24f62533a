"""Feedback on the device: a rating, or accept / reject of a shown recommendation, appended to the
device's own events file (validated, under a lock). The next training session learns from it; it
never leaves the device except through DP training."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from client.device_state import read_device_info
from common.dataset import RATING_MAX, RATING_MIN
from common.errors import DataFormatError
from common.io import exclusive_lock
from common.partition import device_dataset

ACCEPT_RATING = 5.0  # "loved": the user asked for more of this
REJECT_RATING = 1.0  # "hated": shown, and turned down
LOCK_TIMEOUT_S = 30.0


def _append(events: Path, line: str) -> None:
    """Append ``line`` with one ``write`` on an O_APPEND descriptor, then fsync; first completes a
    last line that lacks its newline."""
    fd = os.open(events, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        needs_newline = False
        if size:
            with open(events, "rb") as f:
                f.seek(size - 1)
                needs_newline = f.read(1) != b"\n"
        payload = (("\n" if needs_newline else "") + line).encode("utf-8")
        written = os.write(fd, payload)
        if written != len(payload):
            raise OSError(f"{events}: short write ({written} of {len(payload)} bytes); the last line may be "
                          f"incomplete")
        os.fsync(fd)
    finally:
        os.close(fd)


def record_feedback(state_dir: str | Path, item_id: str, rating: float) -> dict:
    """Append ``{"user", "item", "timestamp", "rating"}`` to the device's events.jsonl; returns the event."""
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating) \
            or not RATING_MIN <= rating <= RATING_MAX:
        raise ValueError(f"rating must be a number from {RATING_MIN:g} to {RATING_MAX:g}, got {rating!r}")
    info = read_device_info(Path(state_dir))
    data_path = Path(info["data-path"])
    events = data_path / "events.jsonl"
    if not events.is_file():
        raise DataFormatError(events, "missing: feedback is recorded in the JSONL user format (events.jsonl + "
                                      "catalogue.jsonl); a GroupLens slice is read-only here")
    lock = events.with_name(events.name + ".lock")
    with exclusive_lock(lock, LOCK_TIMEOUT_S, holder="another feedback writer"):
        data = device_dataset(data_path)  # validates both files before anything is written
        if str(item_id) not in data.item_index:
            raise DataFormatError(data_path / "catalogue.jsonl", f"unknown item id {item_id!r}: feedback must "
                                                                 f"name a catalogue item")
        if data.num_users > 1:
            raise DataFormatError(events, f"expected the events of exactly one user, found {data.num_users}")
        # A device with no events yet takes its user id from its device file (the id never leaves it).
        user = data.user_ids[0] if data.num_users else info["client-id"]
        # Never earlier than the newest event, so the chronological order keeps the feedback last.
        stamp = max([float(int(time.time())), *([float(data.timestamp.max())] if data.num_interactions else [])])
        event = {"user": user, "item": str(item_id), "timestamp": stamp, "rating": float(rating)}
        _append(events, json.dumps(event) + "\n")
    return event
