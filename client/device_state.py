"""A device's persistent state folder (``state-dir``): what survives restarts of the SuperNode.

- ``ledger-<client-id>.json``: the privacy ledger (:mod:`common.ledger`);
- ``global-state.safetensors``: the latest global state received (the text model's adapters and
  item biases, or the sequence model's layers), with the model settings needed to use them;
- ``catalogue.safetensors`` + ``catalogue.sha256``: the catalogue the server published for that
  state, and the checksum it was sent with (verified on every read);
- ``device.json``: where the device's own data lives and who it is.

Every file is written atomically (temp file, then rename). Nothing here is ever sent anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.catalogue_file import PublishedCatalogue, read_catalogue, sha256_hex
from common.errors import DataFormatError
from common.io import load_tensors, save_tensors, write_bytes_atomic, write_json_atomic, write_text_atomic
from common.model_state import ModelSettings
from common.sequence import SequenceSettings
from common.sequence_runtime import settings_from_stored

GLOBAL_STATE = "global-state.safetensors"
CATALOGUE = "catalogue.safetensors"
CATALOGUE_SHA = "catalogue.sha256"
DEVICE = "device.json"


def save_global_state(state_dir: Path, names: list[str], arrays: list[np.ndarray],
                      settings: ModelSettings | SequenceSettings, run_id: str, server_round: int) -> Path:
    """Keep the latest global state (the exchange order and which user model it is go in the metadata)."""
    path = Path(state_dir) / GLOBAL_STATE
    kind = "sequence" if isinstance(settings, SequenceSettings) else "text"
    meta = {"names": json.dumps(names), "settings": json.dumps(asdict(settings)), "user-model": kind,
            "run_id": run_id, "round": str(server_round)}
    save_tensors(path, dict(zip(names, arrays)), meta, private=True)
    return path


def load_global_state(state_dir: Path
                      ) -> tuple[list[str], list[np.ndarray], ModelSettings | SequenceSettings, dict[str, str]]:
    """(names, arrays, model settings, metadata) of the latest global state on this device; the settings
    are :class:`SequenceSettings` for the sequence model (metadata ``user-model``), else the text model's."""
    path = Path(state_dir) / GLOBAL_STATE
    if not path.is_file():
        raise DataFormatError(path, "missing: this device has not received a global model yet (join a run first)")
    tensors, meta = load_tensors(path)
    try:
        names = json.loads(meta["names"])
        arrays = [tensors[n] for n in names]
        kind = meta.get("user-model", "text")  # states saved before the sequence model existed are text
        if kind not in ("text", "sequence"):
            raise ValueError(f"unknown user-model {kind!r}")
        stored = json.loads(meta["settings"])
        settings = settings_from_stored(stored) if kind == "sequence" else ModelSettings.from_stored(stored)
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(path, f"unreadable global state ({type(exc).__name__}: {exc})") from None
    return names, arrays, settings, meta


def store_catalogue(state_dir: Path, data: bytes, expected_sha256: str) -> PublishedCatalogue:
    """Verify a received catalogue against the checksum sent with it, then keep both."""
    got = sha256_hex(data)
    if got != expected_sha256:
        raise DataFormatError(Path(state_dir) / CATALOGUE, f"received catalogue has SHA-256 {got[:16]}..., "
                                                            f"the server announced {expected_sha256[:16]}...")
    # Catalogue first, checksum second: a crash in between leaves a pair that is refused (safe)
    # until the next message brings both again.
    write_bytes_atomic(state_dir / CATALOGUE, data)
    write_text_atomic(state_dir / CATALOGUE_SHA, expected_sha256 + "\n")
    return load_catalogue(state_dir)


def load_catalogue(state_dir: Path) -> PublishedCatalogue:
    """The stored catalogue, refused unless it still hashes to the checksum it was received with."""
    sha_path = Path(state_dir) / CATALOGUE_SHA
    if not sha_path.is_file():
        raise DataFormatError(sha_path, "missing: no catalogue has been received from the server yet")
    return read_catalogue(Path(state_dir) / CATALOGUE, sha_path.read_text(encoding="utf-8").strip())


def write_device_info(state_dir: Path, data_path: str, client_id: str) -> None:
    write_json_atomic(Path(state_dir) / DEVICE, {"data-path": str(Path(data_path).resolve()), "client-id": client_id},
                      private=True)


def read_device_info(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / DEVICE
    if not path.is_file():
        raise DataFormatError(path, "missing: start this device's SuperNode with --node-config "
                                    "\"data-path='...' state-dir='...'\" and let it join a run first")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return {"data-path": str(info["data-path"]), "client-id": str(info["client-id"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(path, f"unreadable device file ({exc})") from None
