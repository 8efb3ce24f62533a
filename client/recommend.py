"""On-device recommendations: rank the published catalogue for this device's user with the latest
global model and the user's local history (plus optional free text), and explain each item by
the history items closest to it. Runs entirely on the device; nothing is sent anywhere.

The sequence model reads the user's last ``history-len`` items and scores the published item text
vectors, plus the device's personal offset (:mod:`common.personalisation`: fitted here on the user's
own history on top of the global model, kept in memory, never sent or stored); free text, if given,
adds the zero-shot encoder's cosine of the text with each item's vector at the model's prior weight.
The text model renders the history as text for its LoRA encoder."""

from __future__ import annotations

import os
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
from common.personalisation import PersonalSettings, fit_offsets, personal_rows, personal_scores
from common.sequence import SequenceRecommender, SequenceSettings, history_window
from common.sequence_runtime import checked_item_vectors, set_sequence_state
from common.split import Split, leave_one_out
from common.text import rating_words, user_text


ITEM_TEXT_TOKENS = 32  # free text for the sequence model is read like an item text
# The weight of the free-text cosine when the model's own text prior is off (weight 0): free text the
# user typed should still count, at the scale of one cosine.
FREE_TEXT_WEIGHT_WITHOUT_PRIOR = 1.0
# Rows per forward pass when fitting the personal offset: attention memory grows with the square of the
# server-chosen history length, so a device never runs many long histories at once.
DEVICE_ROWS_PER_PASS = 8


@dataclass
class Recommendation:
    rank: int
    item_id: str
    text: str
    score: float
    because: list[tuple[str, str, float]] = field(default_factory=list)  # (item id, "loved X", cosine)


def _file_stamp(path: Path) -> tuple[int, ...]:
    """What tells a changed file from the one read before: one stat's inode, size and nanosecond times (an
    append within one tick of a coarse clock still changes the size, a rewrite the inode or ctime)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (-1,)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class DeviceRecommender:
    """Loads the device's state once; :meth:`recommend` then answers in milliseconds."""

    def __init__(self, state_dir: str | Path, personal: PersonalSettings | None = PersonalSettings()) -> None:
        """``personal``: how the sequence model's personal offset is fitted (None: the global model alone)."""
        self.state_dir = Path(state_dir)
        self.personal = personal
        self._personal_terms: np.ndarray | None = None  # the personal score terms of the data last read
        info = read_device_info(self.state_dir)
        self.data_path = Path(info["data-path"])
        names, arrays, self.settings, self.meta = load_global_state(self.state_dir)
        self.catalogue = load_catalogue(self.state_dir)
        if self.catalogue.state_digest != state_digest(arrays):
            raise DataFormatError(self.state_dir / "catalogue.safetensors",
                                  "the catalogue belongs to another global state than global-state.safetensors")
        self._tokenizer = None  # loaded on first use (the sequence model needs it only for free text)
        self.sequence: SequenceRecommender | None = None
        self.encoder: TextEncoder | None = None
        if isinstance(self.settings, SequenceSettings):
            try:
                vectors = checked_item_vectors(self.catalogue.embeddings, len(self.catalogue.item_ids))
            except ValueError as exc:
                raise DataFormatError(self.state_dir / "catalogue.safetensors", str(exc)) from None
            self.sequence = SequenceRecommender(vectors, self.settings)
            try:
                set_sequence_state(self.sequence, names, arrays)
            except ValueError as exc:
                raise DataFormatError(self.state_dir / "global-state.safetensors", str(exc)) from None
            self.sequence.eval()
        else:
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
        self._split: Split | None = None
        self._data_stamp: tuple[tuple[int, ...], ...] | None = None

    def _history(self) -> tuple[Dataset, np.ndarray]:
        """The device's data (re-read only when its files change) and the user's rows, oldest first."""
        files = (self.data_path / "events.jsonl", self.data_path / "catalogue.jsonl")
        stamp = tuple(_file_stamp(f) for f in files)
        if self._data is None or stamp != self._data_stamp:
            data = device_dataset(self.data_path)
            if data.num_users != 1:
                raise DataFormatError(files[0], f"expected the events of exactly one user, found {data.num_users}")
            if [it.item_id for it in data.items] != self.catalogue.item_ids:
                raise DataFormatError(files[1], "item ids differ from the catalogue the server published")
            self._data, self._split, self._data_stamp = data, leave_one_out(data), stamp
            self._personal_terms = None  # refitted on the new history when next needed
        return self._data, self._split.all_rows(0)

    @torch.no_grad()
    def recommend(self, k: int = 10, text: str | None = None, explain: int = 2) -> list[Recommendation]:
        """Top ``k`` unseen items; ``text`` (e.g. "something like Alien but funny") leads the query."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        data, rows = self._history()
        scores = self._sequence_scores(data, rows, text) if self.sequence is not None else \
            self._text_scores(data, rows, text)
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

    def _personal_term(self, rows: np.ndarray) -> np.ndarray:
        """Each item's personal score term, <offset, t_j>, with the offset fitted on the user's rows ``rows``
        of the data last read (:meth:`_history`), once per read."""
        if self._personal_terms is None:
            settings = self.personal
            fitted = personal_rows(self._split, rows, self.settings.history_len, settings.rows,
                                   settings.min_target_rating)
            offset = fit_offsets(self.sequence, fitted, np.zeros(len(fitted), dtype=np.int64), 1, settings,
                                 chunk=DEVICE_ROWS_PER_PASS)
            if not torch.isfinite(offset).all():
                raise ValueError("the personal offset fitted on this device's history is not finite; "
                                 "--no-personal ranks with the global model alone")
            self._personal_terms = personal_scores(self.sequence, np.zeros((1, self.sequence.num_items),
                                                                           dtype=np.float32), offset)[0]
        return self._personal_terms

    @property
    def tokenizer(self):
        """The encoder's tokenizer, loaded once on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    def _text_scores(self, data: Dataset, rows: np.ndarray, text: str | None) -> np.ndarray:
        query = user_text(data, rows, self.settings.history_len)
        if text and text.strip():
            query = f"{text.strip()}; {query}"
        feats = compute_features(self.encoder, self.tokenizer, [query], self.settings.max_length)
        return user_scores(self.model, feats)[0]

    def _sequence_scores(self, data: Dataset, rows: np.ndarray, text: str | None) -> np.ndarray:
        items, codes = history_window(self._split, rows, self.settings.history_len)
        scores = self.sequence.score(torch.from_numpy(items[None]), torch.from_numpy(codes[None]))[0].numpy()
        if self.personal is not None and self.personal.steps > 0:
            scores = scores + self._personal_term(rows)
        if text and text.strip():
            if self.encoder is None:  # the zero-shot encoder (the item vectors' own), loaded on first use
                self.encoder = TextEncoder()
            feats = compute_features(self.encoder, self.tokenizer, [text.strip()], ITEM_TEXT_TOKENS)
            query = self.encoder.forward_features(feats.features, feats.mask)[0].numpy()
            weight = self.settings.prior_weight or FREE_TEXT_WEIGHT_WITHOUT_PRIOR
            scores = scores + weight * (self._unit @ (query / max(float(np.linalg.norm(query)), 1e-12)))
        return scores
