"""PROTOCOL.md section 5 result files, written atomically."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import DataFormatError

PROTOCOL = "ml-100k-loo-full-v1"
NO_PRIVACY = {"unit": "none"}


def result_record(method: str, split: str, metrics: dict[str, float], users: int, seed: int,
                  privacy: dict[str, Any], wall_seconds: float, config: dict[str, Any]) -> dict[str, Any]:
    """One result object with exactly the protocol's fields."""
    return {"method": method, "split": split, "protocol": PROTOCOL, "metrics": metrics,
            "users": int(users), "seed": int(seed), "privacy": privacy,
            "wall_seconds": round(float(wall_seconds), 3), "config": config}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped; none when the file is absent); a line
    that is not a JSON object is a DataFormatError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise DataFormatError(path, f"not valid JSON ({exc}); the file may have been cut short", number) \
                    from None
            if not isinstance(row, dict):
                raise DataFormatError(path, f"expected a JSON object, got {type(row).__name__}", number)
            rows.append(row)
    return rows


def write_json_atomic(path: str | Path, obj: Any, strict: bool = False) -> Path:
    """Write JSON to a temp file beside ``path`` and rename it into place; ``strict`` refuses NaN and
    infinity (which strict JSON readers reject) with a ValueError instead of writing them."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=not strict) + "\n")


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
    tmp.unlink(missing_ok=True)  # a leftover of a crashed writer would keep its old mode
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


@contextmanager
def exclusive_lock(lock_path: str | Path, timeout: float, holder: str = "another process") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600, never removed: removing it would let
    two processes lock two different files) for the block; TimeoutError after ``timeout`` seconds."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: {holder} has held the lock for more than {timeout:g} s") \
                        from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
