"""On-device recommendations: rank the published catalogue for this device's user with the latest
global adapters and the user's local history (plus optional free text), and explain each item by
the history items closest to it. Runs entirely on the device; nothing is sent anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.device_state import load_catalogue, load_global_state, read_device_info
from common.dataset import Dataset
from common.encoder import LoraSettings, TextEncoder, load_tokenizer
from common.errors import DataFormatError
from common.evaluation import user_scores
from common.features import compute_features
from common.model import Recommender
from common.model_state import set_state, state_digest
from common.partition import device_dataset
from common.split import leave_one_out
from common.text import rating_words, user_text


@dataclass
class Recommendation:
    rank: int
    item_id: str
    text: str
    score: float
    because: list[tuple[str, str, float]] = field(default_factory=list)  # (item id, "loved X", cosine)


class DeviceRecommender:
    """Loads the device's state once; :meth:`recommend` then answers in milliseconds."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        info = read_device_info(self.state_dir)
        self.data_path = Path(info["data-path"])
        names, arrays, self.settings, self.meta = load_global_state(self.state_dir)
        self.catalogue = load_catalogue(self.state_dir)
        if self.catalogue.state_digest != state_digest(arrays):
            raise DataFormatError(self.state_dir / "catalogue.safetensors",
                                  "the catalogue belongs to another global state than global-state.safetensors")
        self.tokenizer = load_tokenizer()
        self.encoder = TextEncoder(LoraSettings(rank=self.settings.lora_rank, alpha=self.settings.lora_alpha))
        self.model = Recommender(self.encoder, len(self.catalogue.item_ids), scale=self.catalogue.scale,
                                 item_bias=self.settings.item_bias, bias_scale=self.settings.item_bias_scale)
        set_state(self.model, names, arrays)
        self.model.head.item_emb.copy_(torch.as_tensor(self.catalogue.embeddings))
        self.model.eval()
        unit = self.catalogue.embeddings / np.maximum(np.linalg.norm(self.catalogue.embeddings, axis=1,
                                                                     keepdims=True), 1e-12)
        self._unit = unit.astype(np.float32)
        self._data: Dataset | None = None
        self._data_stamp: tuple[float, float] | None = None

    def _history(self) -> tuple[Dataset, np.ndarray]:
        """The device's data (re-read only when its files change) and the user's rows, oldest first."""
        files = (self.data_path / "events.jsonl", self.data_path / "catalogue.jsonl")
        stamp = tuple(f.stat().st_mtime if f.exists() else -1.0 for f in files)
        if self._data is None or stamp != self._data_stamp:
            data = device_dataset(self.data_path)
            if data.num_users != 1:
                raise DataFormatError(files[0], f"expected the events of exactly one user, found {data.num_users}")
            if [it.item_id for it in data.items] != self.catalogue.item_ids:
                raise DataFormatError(files[1], "item ids differ from the catalogue the server published")
            self._data, self._data_stamp = data, stamp
        return self._data, leave_one_out(self._data).all_rows(0)

    @torch.no_grad()
    def recommend(self, k: int = 10, text: str | None = None, explain: int = 2) -> list[Recommendation]:
        """Top ``k`` unseen items; ``text`` (e.g. "something like Alien but funny") leads the query."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        data, rows = self._history()
        query = user_text(data, rows, self.settings.history_len)
        if text and text.strip():
            query = f"{text.strip()}; {query}"
        feats = compute_features(self.encoder, self.tokenizer, [query], self.settings.max_length)
        scores = user_scores(self.model, feats)[0]
        if not np.isfinite(scores).all():
            raise ValueError("the stored global model scores items with non-finite values; refusing to recommend")
        seen = np.unique(data.item[rows])
        scores[seen] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argsort(-scores, kind="stable")[:k]
        history = rows[::-1]  # newest first: explanations prefer recent items on ties
        liked = history[np.isnan(data.rating[history]) | (data.rating[history] >= 4)]
        if len(liked):  # explain by what the user liked when there is any
            history = liked
        hist_items = data.item[history]
        out = []
        for rank, j in enumerate(top, start=1):
            sims = self._unit[hist_items] @ self._unit[j] if len(hist_items) else np.zeros(0)
            best = np.argsort(-sims, kind="stable")[:explain]
            because = [(self.catalogue.item_ids[int(hist_items[b])],
                        f"{rating_words(float(data.rating[history[b]])) or 'had'} {self.catalogue.texts[int(hist_items[b])]}",
                        float(sims[b])) for b in best]
            out.append(Recommendation(rank, self.catalogue.item_ids[int(j)], self.catalogue.texts[int(j)],
                                      float(scores[j]), because))
        return out
