"""Export one MovieLens user to the device format (``events.jsonl`` + ``catalogue.jsonl``), for trying
out a SuperNode with a real user's history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common.dataset import Dataset
from common.io import make_private_dir, write_text_atomic


def export_user(data: Dataset, user_id: str, out: str | Path) -> tuple[Path, int]:
    """Write the user's events (chronological, file order breaking ties) and the whole catalogue;
    returns the folder and the number of events."""
    if user_id not in data.user_ids:
        raise ValueError(f"unknown user id {user_id!r}; ids run from {data.user_ids[0]} to {data.user_ids[-1]}")
    out = make_private_dir(out)  # a person's ratings: readable by the device's owner only
    u = data.user_ids.index(user_id)
    rows = np.flatnonzero(data.user == u)
    rows = rows[np.argsort(data.timestamp[rows], kind="stable")]
    lines = []
    for r in rows:
        event = {"user": user_id, "item": data.items[int(data.item[r])].item_id, "timestamp": float(data.timestamp[r])}
        if not math.isnan(data.rating[r]):
            event["rating"] = float(data.rating[r])
        if data.event_text is not None and data.event_text[r]:
            event["text"] = data.event_text[r]
        lines.append(json.dumps(event))
    write_text_atomic(out / "events.jsonl", "\n".join(lines) + "\n", private=True)
    write_text_atomic(out / "catalogue.jsonl",
                      "\n".join(json.dumps({"item": it.item_id, "text": it.render()}) for it in data.items) + "\n")
    return out, len(rows)
