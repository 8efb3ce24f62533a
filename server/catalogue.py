"""Publishing the catalogue each round: item embeddings of the current global state, written to the
run folder and sent, with their SHA-256, to the clients that need them (on-device recommendations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.catalogue_file import PublishedCatalogue, catalogue_bytes, sha256_hex
from common.io import write_bytes_atomic, write_text_atomic
from common.model_state import state_digest
from common.runtimes import Runtime
from common.sequence_runtime import SequenceRuntime


class CataloguePublisher:
    """Computes and writes the catalogue once per global state (cached by the state's digest)."""

    def __init__(self, runtime: Runtime, folder: Path, run_id: str) -> None:
        self.runtime, self.folder, self.run_id = runtime, folder, run_id
        self._digest: str | None = None
        self.data = b""
        self.sha256 = ""

    def publish(self, names: list[str], arrays: list[np.ndarray], rnd: int) -> tuple[bytes, str]:
        """The catalogue file's bytes and SHA-256 for this state (written as ``catalogue.safetensors``)."""
        digest = state_digest(arrays)
        if digest == self._digest:
            return self.data, self.sha256
        self.runtime.load_state(names, arrays)  # the text model re-encodes the catalogue with these adapters
        items = self.runtime.data.items
        if isinstance(self.runtime, SequenceRuntime):  # the public text vectors the model scores with
            model = self.runtime.model
            embeddings, scale = self.runtime.item_vectors, 1.0
            bias = model.item_bias.effective().detach().numpy().copy() if model.item_bias is not None else None
        else:
            head = self.runtime.model.head
            embeddings, scale = head.item_emb.detach().numpy().copy(), head.scale
            bias = head.bias.effective().detach().numpy().copy() if head.bias is not None else None
        cat = PublishedCatalogue(
            item_ids=[it.item_id for it in items], texts=self.runtime.data.item_texts(), embeddings=embeddings,
            bias=bias, state_digest=digest, run_id=self.run_id, round=rnd, scale=scale)
        self.data = catalogue_bytes(cat)
        self.sha256 = sha256_hex(self.data)
        write_bytes_atomic(self.folder / "catalogue.safetensors", self.data)
        write_text_atomic(self.folder / "catalogue.sha256", self.sha256 + "\n")
        self._digest = digest
        return self.data, self.sha256
