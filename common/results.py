"""PROTOCOL.md section 5 result files, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROTOCOL = "ml-100k-loo-full-v1"
NO_PRIVACY = {"unit": "none"}


def result_record(method: str, split: str, metrics: dict[str, float], users: int, seed: int,
                  privacy: dict[str, Any], wall_seconds: float, config: dict[str, Any]) -> dict[str, Any]:
    """One result object with exactly the protocol's fields."""
    return {"method": method, "split": split, "protocol": PROTOCOL, "metrics": metrics,
            "users": int(users), "seed": int(seed), "privacy": privacy,
            "wall_seconds": round(float(wall_seconds), 3), "config": config}


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temp file beside ``path``, fsync, and rename it into place."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` (named by process), fsync, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
