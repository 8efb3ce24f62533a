"""The sequence user model as a federated runtime: its settings from the run config, the public
item text vectors it scores with, the exchanged state and each client's rows.

The exchanged state is every trainable tensor of :class:`common.sequence.SequenceRecommender`
in sorted-name order, the item bias named ``item_bias`` (the server removes its common mode
before aggregating, :func:`server.aggregators.without_common_mode`). The item text vectors are
the zero-shot encoder's embeddings of the public catalogue: nothing of any user's data goes into
them, every process computes the same ones (or takes the server's published copy), and they never
travel as state. Under federated DP every catalogue item is "known" (which items anyone rated is
private, so no rule may depend on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from common.dataset import Dataset
from common.encoder import TextEncoder, load_tokenizer
from common.features import compute_features
from common.model import catalogue_vectors
from common.model_state import ITEM_BIAS_KEY, check_state_values, checked_stored_values
from common.sequence import SequenceRecommender, SequenceRows, SequenceSettings, concat_rows, history_window, \
    user_sequence_rows
from common.split import Split

TEXT_DIM = 384  # all-MiniLM-L6-v2's embedding width
_ITEM_TEXT_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def sequence_settings(cfg: dict[str, Any]) -> SequenceSettings:
    """The model shape a run config asks for (no ID embeddings: every parameter is shared and small)."""
    return SequenceSettings(history_len=cfg["history-len"], dim=cfg["sequence-dim"], layers=cfg["sequence-layers"],
                            heads=cfg["sequence-heads"], id_terms=False, item_bias=cfg["item-bias"],
                            item_bias_scale=cfg["item-bias-scale"], text_bias=True,
                            id_dropout=cfg["sequence-id-dropout"], prior_weight=cfg["sequence-prior-weight"],
                            new_item_boost=cfg["sequence-new-item-boost"],
                            exclude_history=cfg["sequence-exclude-history"])


_RUN_CONFIG_KEY = {"history_len": "history-len", "dim": "sequence-dim", "layers": "sequence-layers",
                   "heads": "sequence-heads", "item_bias_scale": "item-bias-scale",
                   "prior_weight": "sequence-prior-weight", "id_dropout": "sequence-id-dropout",
                   "new_item_boost": "sequence-new-item-boost"}


def settings_from_stored(raw: Any) -> SequenceSettings:
    """Settings read back from a device's state file, each field checked (ValueError naming it): its
    type, the run config's range where it has one, and the model's own checks."""
    values = checked_stored_values(raw, asdict(SequenceSettings()), _RUN_CONFIG_KEY)
    return SequenceSettings(**values)  # its own __post_init__ checks the rest and the combinations


def checked_item_vectors(vectors: np.ndarray | torch.Tensor, num_items: int) -> torch.Tensor:
    """``vectors`` as float32, refused (ValueError) unless they are ``num_items`` finite unit vectors of the
    encoder's width: what the server publishes reaches the model only after this."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.shape != (num_items, TEXT_DIM):
        raise ValueError(f"published item vectors have shape {array.shape}, the model expects {(num_items, TEXT_DIM)}")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > 1e-3:
        raise ValueError("published item vectors must be finite unit vectors (the encoder's output); "
                         "refusing a catalogue that is not")
    return torch.from_numpy(array.copy())


def item_text_vectors(data: Dataset, item_max_length: int) -> torch.Tensor:
    """(items, dim) unit-norm zero-shot embeddings of the catalogue's texts (public), cached per process."""
    texts = data.item_texts()
    key = (hashlib.sha256("\n".join(texts).encode()).hexdigest(), item_max_length)
    if key not in _ITEM_TEXT_CACHE:
        encoder = TextEncoder()  # LoRA B matrices start at zero: the pretrained encoder exactly
        feats = compute_features(encoder, load_tokenizer(), texts, item_max_length)
        _ITEM_TEXT_CACHE[key] = catalogue_vectors(encoder, feats)
    return _ITEM_TEXT_CACHE[key]


def exchanged_parameters(model: SequenceRecommender) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The trainable tensors in exchange order (sorted names; the item bias as ``item_bias``)."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return [ITEM_BIAS_KEY if n == "item_bias.bias" else n for n, _ in named], [p for _, p in named]


def set_sequence_state(model: SequenceRecommender, names: list[str], arrays: list[np.ndarray]) -> None:
    """Load exchanged tensors: names exactly :func:`exchanged_parameters`' in order, shapes equal, every
    value finite and bounded (:func:`common.model_state.check_state_values`); nothing is changed otherwise."""
    check_state_values(names, arrays)
    expected, params = exchanged_parameters(model)
    if list(names) != expected:
        raise ValueError(f"model state keys differ from the expected {len(expected)} keys "
                         f"(first expected {expected[:2]}, got {list(names)[:2]})")
    for name, p, a in zip(names, params, arrays):
        if tuple(np.shape(a)) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(np.shape(a))}, expected {tuple(p.shape)}")
    with torch.no_grad():
        for p, a in zip(params, arrays):
            p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))


@dataclass
class ClientSequences:
    """One user's sequence-model inputs (stay on the client)."""

    train: SequenceRows  # the most recent ``examples-per-user`` (history prefix, next item) rows
    eval_row: SequenceRows  # one row: the history before the held-out item (all padding without one)
    eval_target: int | None
    eval_excluded: np.ndarray  # items the user already has (not rankable)


def client_sequences(split: Split, user: int, history_len: int, examples_per_user: int) -> ClientSequences:
    """The user's training rows and held-out (test) input, from their own rows of ``split`` only."""
    if not 0 <= user < split.data.num_users:
        raise ValueError(f"partition-id {user} is outside 0..{split.data.num_users - 1}")
    data = split.data
    train = user_sequence_rows(split, user, history_len, examples_per_user)
    hist = split.history_rows(user, "test") if split.test[user] >= 0 else split.train[user]
    items, codes = history_window(split, hist, history_len)
    target = int(data.item[split.target_row(user, "test")]) if split.test[user] >= 0 else None
    eval_row = SequenceRows(items[None], codes[None], np.array([-1 if target is None else target]),
                            np.array([user]))
    return ClientSequences(train=train, eval_row=eval_row, eval_target=target,
                           eval_excluded=np.unique(data.item[hist]))


def empty_sequences(num_items: int, history_len: int) -> ClientSequences:
    """A device with no events: no rows, an all-padding evaluation input, no target."""
    pad = np.full((1, history_len), num_items, dtype=np.int64)
    return ClientSequences(train=concat_rows([], history_len),
                           eval_row=SequenceRows(pad, np.zeros_like(pad), np.array([-1]), np.array([0])),
                           eval_target=None, eval_excluded=np.zeros(0, dtype=np.int64))


def padded_sequence_rows(rows: SequenceRows, cap: int, num_items: int) -> tuple[SequenceRows, np.ndarray]:
    """The most recent ``cap`` of ``rows`` (the session's selection rule, which the 2C accounting
    covers), then weight-0 padding rows (empty history, target 0) up to the public ``cap``."""
    history_len = rows.items.shape[1]
    if len(rows) > cap:
        rows = SequenceRows(*(getattr(rows, f)[len(rows) - cap:] for f in ("items", "ratings", "targets", "users")))
    pad = cap - len(rows)
    padding = SequenceRows(np.full((pad, history_len), num_items, dtype=np.int64),
                           np.zeros((pad, history_len), dtype=np.int64), np.zeros(pad, dtype=np.int64),
                           np.zeros(pad, dtype=np.int64))
    weights = np.concatenate([np.ones(len(rows), dtype=np.float32), np.zeros(pad, dtype=np.float32)])
    return concat_rows([rows, padding], history_len), weights


class SequenceRuntime:
    """One process's sequence model for a catalogue (the item text vectors computed once)."""

    kind = "sequence"

    def __init__(self, data: Dataset, settings: SequenceSettings, item_max_length: int = 32, seed: int = 0,
                 item_text: torch.Tensor | np.ndarray | None = None) -> None:
        self.data, self.settings = data, settings
        vectors = item_text_vectors(data, item_max_length) if item_text is None else \
            checked_item_vectors(item_text, data.num_items)
        torch.manual_seed(seed)
        self.model = SequenceRecommender(vectors, settings)
        # The first global model is the parameter-free text prior alone (plus the zero text bias).
        torch.nn.init.zeros_(self.model.text_out.weight)
        self.names, self.parameters = exchanged_parameters(self.model)

    @property
    def item_vectors(self) -> np.ndarray:
        """The catalogue's text vectors the model scores with (what a published catalogue carries)."""
        return self.model.item_text[: self.model.num_items].numpy().copy()

    def state(self) -> tuple[list[str], list[np.ndarray]]:
        """Names and float32 copies of the exchanged tensors."""
        return list(self.names), [p.detach().numpy().astype(np.float32).copy() for p in self.parameters]

    def load_state(self, names: list[str], arrays: list[np.ndarray], refresh: bool = True) -> None:
        """Set the exchanged tensors (:func:`set_sequence_state`). ``refresh`` is accepted for the text
        runtime's interface: the item vectors never depend on the state."""
        set_sequence_state(self.model, names, arrays)

    def use_item_embeddings(self, embeddings: np.ndarray, digest: str | None = None) -> None:
        """Score with published item text vectors (finite unit vectors of the expected shape)."""
        vectors = checked_item_vectors(embeddings, self.model.num_items)
        with torch.no_grad():
            self.model.item_text[: self.model.num_items] = vectors
