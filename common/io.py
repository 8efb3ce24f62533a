"""Every file privrec writes or reads back goes through here.

Writes are atomic and durable: a temp file beside the target (named by process), fsync, rename,
fsync of the folder; a failed write removes its temp file, so a crash or a full disk leaves the
old content, never a half-written file. ``private`` files are created 0600. Reads name the file
(and the line, for JSONL) when the content is not what was written.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataFormatError


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
                row = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
            except (UnicodeDecodeError, ValueError) as exc:
                raise DataFormatError(path, f"not valid JSON ({exc}); the file may have been cut short", number) \
                    from None
            if not isinstance(row, dict):
                raise DataFormatError(path, f"expected a JSON object, got {type(row).__name__}", number)
            rows.append(row)
    return rows


def write_json_atomic(path: str | Path, obj: Any, strict: bool = False, private: bool = False) -> Path:
    """Write JSON to a temp file beside ``path`` and rename it into place; ``strict`` refuses NaN and
    infinity (which strict JSON readers reject) with a ValueError instead of writing them."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=not strict) + "\n",
                             private=private)


def write_text_atomic(path: str | Path, text: str, private: bool = False) -> Path:
    """Write ``text`` (UTF-8) to a temp file beside ``path``, fsync, and rename it into place."""
    return write_bytes_atomic(path, text.encode("utf-8"), private=private)


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


def hold_lock(lock_path: str | Path) -> int | None:
    """Take an exclusive ``flock`` on ``lock_path`` (created 0600) without waiting: the descriptor that
    holds it (close it to release), or None when another process holds the lock."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: privrec never writes them, so reading one means a damaged file."""
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``; unreadable or invalid content is a DataFormatError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise DataFormatError(path, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(path, f"not valid JSON ({exc}); the file may have been cut short") from None


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as strict JSONL (no NaN or infinity), atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def save_tensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                 private: bool = False) -> bytes:
    """Write named float arrays as safetensors with string metadata, atomically; returns the bytes
    written (for a digest)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data, private=private)
    return data


def load_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any defect is a DataFormatError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "missing")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DataFormatError(path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def make_private_dir(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) and make it accessible by its owner only (0700), also
    when it already existed: it holds user data, keys or server state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
