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


def write_bytes_atomic(path: str | Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` to a temp file beside ``path`` (named by process), fsync it, rename it into
    place and fsync the folder, so the new content survives a crash once this returns. A failed
    write removes its temp file. ``private`` makes the file readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
