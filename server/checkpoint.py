"""Per-round checkpoints: the global state and server-optimiser moments (safetensors) plus a JSON
with the round number, the central-DP accountant history and the server's privacy records.

Both files are written to temp names and renamed; the JSON is renamed last and names
the tensor file it belongs to, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from common.results import write_json_atomic


def save_checkpoint(folder: Path, server_round: int, names: list[str], arrays: list[np.ndarray],
                    optimizer: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"state.{n}": np.ascontiguousarray(a) for n, a in zip(names, arrays)}
    tensors.update({f"optimizer.{k}": np.ascontiguousarray(v) for k, v in optimizer.items()})
    weights = folder / f"round-{server_round:04d}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"round": str(server_round)})
    tmp.replace(weights)
    meta = {"round": server_round, "weights": weights.name, "names": names, **state}
    write_json_atomic(folder / "latest.json", meta)
    for old in folder.glob("round-*.safetensors"):  # keep the latest two
        if old.name not in (weights.name, f"round-{server_round - 1:04d}.safetensors"):
            old.unlink(missing_ok=True)
    return weights


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], list[np.ndarray], dict[str, np.ndarray]]:
    """(meta, state arrays in ``meta['names']`` order, optimiser tensors) of the latest checkpoint."""
    meta_path = folder / "latest.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no checkpoint to resume from")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tensors = load_file(str(folder / meta["weights"]))
    arrays = [tensors[f"state.{n}"] for n in meta["names"]]
    optimizer = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return meta, arrays, optimizer
