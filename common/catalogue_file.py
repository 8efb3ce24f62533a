"""The catalogue file the server publishes each round: item ids, display texts, item embeddings and
biases for one global state, in safetensors, identified by its SHA-256.

The server computes it (:mod:`server.catalogue`); a device stores it with the checksum it was
sent and verifies it before every use, so a catalogue altered on the device is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from common.errors import DataFormatError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PublishedCatalogue:
    """One published catalogue, as read back (after its checksum was verified)."""

    item_ids: list[str]
    texts: list[str]
    embeddings: np.ndarray  # float32 [items, dim]
    bias: np.ndarray | None  # float32 [items] in logit units (item-bias-scale x the exchanged parameter); None without a bias
    state_digest: str  # which global state these embeddings belong to
    run_id: str
    round: int
    scale: float


def catalogue_bytes(cat: PublishedCatalogue) -> bytes:
    """Serialise ``cat`` (the exact bytes whose SHA-256 is published)."""
    tensors = {"item_embeddings": np.ascontiguousarray(cat.embeddings, dtype=np.float32)}
    if cat.bias is not None:
        tensors["item_bias"] = np.ascontiguousarray(cat.bias, dtype=np.float32)
    meta = {"item_ids": json.dumps(cat.item_ids), "texts": json.dumps(cat.texts), "state_digest": cat.state_digest,
            "run_id": cat.run_id, "round": str(cat.round), "scale": repr(cat.scale)}
    return save(tensors, metadata=meta)


def read_catalogue(path: str | Path, expected_sha256: str) -> PublishedCatalogue:
    """Load a published catalogue, refusing it unless its bytes hash to ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "missing: no catalogue has been received from the server yet")
    data = path.read_bytes()
    got = sha256_hex(data)
    if got != expected_sha256:
        raise DataFormatError(path, f"checksum mismatch: SHA-256 {got[:16]}..., the server published "
                                    f"{expected_sha256[:16]}...; refusing a modified catalogue")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            emb = f.get_tensor("item_embeddings")
            bias = f.get_tensor("item_bias") if "item_bias" in f.keys() else None
        cat = PublishedCatalogue(item_ids=json.loads(meta["item_ids"]), texts=json.loads(meta["texts"]),
                                 embeddings=emb, bias=bias, state_digest=meta["state_digest"],
                                 run_id=meta["run_id"], round=int(meta["round"]), scale=float(meta["scale"]))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a format error of this file
        raise DataFormatError(path, f"unreadable catalogue ({type(exc).__name__}: {exc})") from None
    if len(cat.item_ids) != emb.shape[0] or len(cat.texts) != emb.shape[0]:
        raise DataFormatError(path, f"{len(cat.item_ids)} item ids for {emb.shape[0]} embeddings")
    return cat
