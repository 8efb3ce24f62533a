"""Per-round checkpoints: the global state and server-optimiser moments (safetensors) plus a JSON
with the round number, the SHA-256 of the tensor file, the central-DP accountant history and the
server's privacy records.

Both files are written atomically (temp file, fsync, rename, fsync of the folder); the JSON is
written last and names the tensor file and its digest, so a crash mid-write leaves the previous
checkpoint intact. Loading verifies the digest and that every tensor is finite, and any defect
is an error that names the file: a damaged checkpoint is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors

from common.errors import DataFormatError
from common.io import save_tensors, write_json_atomic

LATEST = "latest.json"


def save_checkpoint(folder: Path, server_round: int, names: list[str], arrays: list[np.ndarray],
                    optimizer: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    """Write round ``server_round``'s checkpoint; keeps the latest two tensor files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"state.{n}": np.ascontiguousarray(a) for n, a in zip(names, arrays)}
    tensors.update({f"optimizer.{k}": np.ascontiguousarray(v) for k, v in optimizer.items()})
    weights = folder / f"round-{server_round:04d}.safetensors"
    data = save_tensors(weights, tensors, {"round": str(server_round)})
    meta = {"round": server_round, "weights": weights.name, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "names": names, **state}
    write_json_atomic(folder / LATEST, meta, strict=True)
    for old in folder.glob("round-*.safetensors"):  # keep the latest two
        if old.name not in (weights.name, f"round-{server_round - 1:04d}.safetensors"):
            old.unlink(missing_ok=True)
    return weights


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], list[np.ndarray], dict[str, np.ndarray]]:
    """(meta, state arrays in ``meta['names']`` order, optimiser tensors) of the latest checkpoint."""
    meta_path = folder / LATEST
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no checkpoint to resume from")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"), parse_constant=_no_constants)
        if not isinstance(meta, dict):
            raise ValueError(f"holds {type(meta).__name__}, expected a JSON object")
        round_, weights_name, digest, names = meta["round"], meta["weights"], meta["weights_sha256"], meta["names"]
        if not (isinstance(round_, int) and isinstance(weights_name, str) and isinstance(digest, str)
                and isinstance(names, list) and all(isinstance(n, str) for n in names)
                and isinstance(meta.get("client_epsilon", {}), dict)):
            raise ValueError("round, weights, weights_sha256, names or client_epsilon has the wrong type")
        for node, eps in meta.get("client_epsilon", {}).items():
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
                raise ValueError(f"client_epsilon of node {node} is {eps!r}, expected a finite number >= 0")
    except (OSError, ValueError, KeyError) as exc:
        raise DataFormatError(meta_path, f"unreadable checkpoint record ({exc}); expected the JSON written by "
                                         f"the server with round, weights, weights_sha256 and names") from None
    weights = folder / Path(weights_name).name
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise DataFormatError(weights, f"checkpoint tensors unreadable ({exc})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise DataFormatError(weights, f"SHA-256 differs from the digest in {meta_path.name}: the checkpoint is "
                                       f"damaged; refusing to resume from it")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DataFormatError(weights, f"not a safetensors file ({type(exc).__name__}: {exc})") from None
    missing = [n for n in names if f"state.{n}" not in tensors]
    if missing:
        raise DataFormatError(weights, f"missing state tensors {missing[:3]}")
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        raise DataFormatError(weights, f"non-finite values in {bad[:3]}: refusing to resume from a corrupt model")
    arrays = [tensors[f"state.{n}"] for n in names]
    optimizer = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return meta, arrays, optimizer
