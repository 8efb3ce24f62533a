"""A sequence user model over text-initialised item vectors, built for per-example DP-SGD.

The user is the ordered list of their last ``history_len`` items (with ratings), read by a
small transformer; items are scored by their text vector (the encoder's embedding of the item
text, a public function of the catalogue) plus, optionally, ID terms that only items seen in
training have::

    u         = transformer([text_in(t_k) + id_in(k) + rating(r_k) + position(k)] + [query])[query]
    score(j)  = <text_out(u), t_j> + w . t_j  +  known_j * (<id_out_j, u> + b_j)

``t_j`` is item j's unit-norm text vector (a buffer), ``w . t_j`` a bias predicted from the
text (so an item nobody has rated gets a calibrated bias rather than none), ``id_out`` and ``b``
per-item ID parameters. Items not ``known`` (never in training) are scored by the text terms
alone: no trained ID parameter of theirs touches them, and the softmax of training leaves them
out. At ranking time they get the constant ``new_item_boost`` in place of the ID terms they lack
(a calibrated mix of text and ID terms: a positive boost lifts every new item by the same factor
``exp(boost)`` against the known items, whose trained biases otherwise keep new ones out of a top
10); it is the same for every unseen item and no trained parameter, so their order among
themselves is the text's and their scores depend on no ID parameter.

DP-compatibility: every trainable module is an Opacus-supported layer (Linear, Embedding,
LayerNorm) or one of the two registered here (:class:`TextBias`, ``ItemBias``), the attention
is written with Linear layers, and there is no batch statistic; one row is one
(history prefix, next item) example, so per-example clipping clips exactly that example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.model import ItemBias
from common.split import Split

NUM_RATING_CODES = 6  # 0: padding or no rating; 1..5 the rounded stars


@dataclass(frozen=True)
class SequenceSettings:
    """Shape of the sequence model (one config object; recorded with every result)."""

    history_len: int = 50
    dim: int = 64
    layers: int = 2
    heads: int = 2
    id_terms: bool = True  # per-item ID embeddings (input and output)
    item_bias: bool = True  # per-item bias
    # the bias is stored as item_bias_scale x the trained parameter, which sets its share of DP-SGD's
    # joint clip norm (as the text model's item-bias-scale)
    item_bias_scale: float = 1.0
    text_bias: bool = True
    id_dropout: float = 0.0  # training only: share of items whose ID terms are dropped per row
    dropout: float = 0.0  # training only: on the inputs and inside every block
    # A parameter-free text prior added to every score: prior_weight x cos(h, t_j), where h is the
    # rating-weighted ((r - 2.5)), recency-decayed (prior_decay per step) sum of the history's text
    # vectors (the training-free heuristic's user). 0: off.
    prior_weight: float = 0.0
    prior_decay: float = 0.8
    # Ranking only: an item never seen in training gets this constant in place of the ID terms it lacks (in
    # logits: its probability is multiplied by exp(new_item_boost)); 0 is the text terms alone.
    new_item_boost: float = 0.0
    # Training only: the items in a row's own history (other than its target) leave that row's softmax. They
    # are never recommended to the user (ranking excludes seen items), so the model need not push them down.
    # The mask is a function of the row's own input: each loss still depends on its own example alone.
    exclude_history: bool = False

    def __post_init__(self) -> None:
        if self.history_len < 1 or self.dim < 1 or self.layers < 0 or self.heads < 1:
            raise ValueError(f"invalid sequence settings {self}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if not math.isfinite(self.new_item_boost):
            raise ValueError(f"new_item_boost must be finite, got {self.new_item_boost}")
        if not (self.prior_weight >= 0 and 0 < self.prior_decay <= 1):
            raise ValueError(f"prior_weight must be >= 0 and prior_decay in (0, 1], got {self}")
        for name in ("id_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# ----------------------------------------------------------------------------- rows


@dataclass
class SequenceRows:
    """Training or evaluation inputs: left-padded item histories (most recent last) and ratings."""

    items: np.ndarray  # (N, L) int64 item index; padding = num_items
    ratings: np.ndarray  # (N, L) int64 rating code (0 = padding / no rating)
    targets: np.ndarray  # (N,) int64 target item (-1 where there is none, evaluation inputs)
    users: np.ndarray  # (N,) int64 user index (never leaves a device in federated use)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def rating_codes(ratings: np.ndarray) -> np.ndarray:
    """Rounded stars 1..5 as codes 1..5; NaN (no rating) as 0."""
    ratings = np.asarray(ratings, dtype=np.float64)
    codes = np.clip(np.rint(np.nan_to_num(ratings, nan=0.0)), 0, 5).astype(np.int64)
    codes[np.isnan(ratings)] = 0
    return codes


def history_window(split: Split, rows: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``history_len`` of ``rows`` (a user's allowed history, oldest first), left-padded."""
    data = split.data
    recent = np.asarray(rows, dtype=np.int64)[-history_len:] if history_len > 0 else np.empty(0, np.int64)
    items = np.full(history_len, data.num_items, dtype=np.int64)
    codes = np.zeros(history_len, dtype=np.int64)
    if len(recent):
        items[history_len - len(recent):] = data.item[recent]
        codes[history_len - len(recent):] = rating_codes(data.rating[recent])
    return items, codes


def rows_at(split: Split, rows: np.ndarray, positions: list[int], history_len: int, user: int = 0) -> SequenceRows:
    """One row per position t of ``positions`` in a user's interactions ``rows`` (oldest first): its target
    is the interaction at t, its history the interactions before t (never t or later ones)."""
    rows = np.asarray(rows, dtype=np.int64)
    items = np.empty((len(positions), history_len), dtype=np.int64)
    codes = np.empty((len(positions), history_len), dtype=np.int64)
    for k, t in enumerate(positions):
        items[k], codes[k] = history_window(split, rows[:t], history_len)
    targets = np.array([int(split.data.item[rows[t]]) for t in positions], dtype=np.int64)
    return SequenceRows(items, codes, targets, np.full(len(positions), user, dtype=np.int64))


def user_sequence_rows(split: Split, user: int, history_len: int, examples_per_user: int = 0,
                       min_history: int = 1) -> SequenceRows:
    """One user's training rows: each train interaction at position t >= ``min_history`` is the
    target of one row whose history is the interactions before t (never t or later ones). With
    ``examples_per_user`` > 0 only the most recent that many targets are used."""
    rows = split.train[user]
    first = max(min_history, len(rows) - examples_per_user) if examples_per_user > 0 else min_history
    return rows_at(split, rows, list(range(first, len(rows))), history_len, user)


def concat_rows(parts: list[SequenceRows], history_len: int) -> SequenceRows:
    """Rows of several users, concatenated in order."""
    if not parts:
        empty = np.empty((0, history_len), dtype=np.int64)
        return SequenceRows(empty, empty.copy(), np.empty(0, np.int64), np.empty(0, np.int64))
    return SequenceRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("items", "ratings", "targets",
                                                                                  "users")))


def training_rows(split: Split, history_len: int, examples_per_user: int = 0) -> SequenceRows:
    """:func:`user_sequence_rows` of every user (central training)."""
    return concat_rows([user_sequence_rows(split, u, history_len, examples_per_user)
                        for u in range(len(split.train))], history_len)


def evaluation_rows(split: Split, which: str, history_len: int, users: np.ndarray) -> SequenceRows:
    """The inputs for ranking ``which`` split's targets: each user's allowed history before it."""
    items = np.empty((len(users), history_len), dtype=np.int64)
    codes = np.empty((len(users), history_len), dtype=np.int64)
    for k, u in enumerate(users):
        items[k], codes[k] = history_window(split, split.history_rows(int(u), which), history_len)
    targets = np.array([int(split.data.item[split.target_row(int(u), which)]) for u in users], dtype=np.int64)
    return SequenceRows(items, codes, targets, np.asarray(users, dtype=np.int64))


# ----------------------------------------------------------------------------- layers


class TextBias(nn.Module):
    """The item bias predicted from each item's text vector, ``T w``, added to the user's text-space vector
    before it meets the catalogue: ``(z + w) . t_j = z . t_j + w . t_j``. Each example's gradient is its own
    backprop into ``z`` (no product with the catalogue per step, which measurably changed no step time), and
    the module holds no copy of the catalogue, so the model's one item-text buffer is the only one."""

    def __init__(self, text_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(text_dim))

    def forward(self, user_text: torch.Tensor) -> torch.Tensor:
        return user_text + self.weight


@register_grad_sampler(TextBias)
def _text_bias_grad_sample(layer: TextBias, activations, backprops: torch.Tensor) -> dict:
    # d (z_i + w) / d w is the identity, so example i's gradient is its backprop into z_i.
    return {layer.weight: backprops}


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear layers (Opacus computes their per-sample gradients)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = att.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.ff_in, self.ff_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), padding))
        return x + self.drop(self.ff_out(nn.functional.gelu(self.ff_in(self.norm2(x)))))


class SequenceRecommender(nn.Module):
    """The user tower (transformer over the history) and the text + ID item scorer."""

    def __init__(self, item_text: torch.Tensor, settings: SequenceSettings,
                 known: torch.Tensor | None = None) -> None:
        super().__init__()
        num_items, text_dim = item_text.shape
        d = settings.dim
        self.settings, self.num_items = settings, int(num_items)
        padded = torch.cat([item_text.float(), torch.zeros(1, text_dim)])
        self.register_buffer("item_text", padded, persistent=False)
        known = torch.ones(num_items, dtype=torch.bool) if known is None else known.bool()
        self.register_buffer("known", torch.cat([known, torch.zeros(1, dtype=torch.bool)]), persistent=False)
        self.text_in = nn.Linear(text_dim, d)
        self.position = nn.Embedding(settings.history_len + 1, d)
        self.rating = nn.Embedding(NUM_RATING_CODES, d)
        self.query = nn.Embedding(1, d)
        self.blocks = nn.ModuleList(Block(d, settings.heads, settings.dropout) for _ in range(settings.layers))
        self.drop = nn.Dropout(settings.dropout)
        self.norm = nn.LayerNorm(d)
        self.text_out = nn.Linear(d, text_dim, bias=False)
        self.text_bias = TextBias(text_dim) if settings.text_bias else None
        self.id_in = nn.Embedding(num_items + 1, d) if settings.id_terms else None
        self.id_out = nn.Linear(d, num_items, bias=False) if settings.id_terms else None
        self.item_bias = ItemBias(num_items, settings.item_bias_scale) if settings.item_bias else None
        for layer in (self.id_in, self.id_out):
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def set_known(self, known: torch.Tensor) -> None:
        """Mark which items have been in training (the others are scored by their text alone)."""
        self.known[: self.num_items] = torch.as_tensor(known, dtype=torch.bool)

    def user_vectors(self, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """(B, dim) user vectors from left-padded histories (B, L)."""
        b, n = items.shape
        x = self.text_in(nn.functional.embedding(items, self.item_text))  # a row gather (fast), as item_text[items]
        if self.id_in is not None:
            x = x + self.id_in(items) * self.known[items].unsqueeze(-1)  # no ID term for unseen items
        x = x + self.rating(ratings) + self.position(torch.arange(n).expand(b, n))
        q = self.query(torch.zeros(b, 1, dtype=torch.long)) + self.position(torch.full((b, 1), n))
        x = self.drop(torch.cat([x, q], dim=1))
        padding = torch.cat([items == self.num_items, torch.zeros(b, 1, dtype=torch.bool)], dim=1)
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x[:, -1])

    def text_prior(self, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """(B, num_items) the parameter-free prior: cosine of the heuristic user with every item text."""
        n, dtype = items.shape[1], self.item_text.dtype
        stars = torch.where(ratings > 0, ratings.to(dtype), torch.full_like(ratings, 2.5, dtype=dtype))
        decay = self.settings.prior_decay ** torch.arange(n - 1, -1, -1, dtype=dtype)
        weight = (stars - 2.5) * decay * (items < self.num_items)
        # the weighted sum of the history's text vectors without gathering them first
        user = nn.functional.normalize(nn.functional.embedding_bag(items, self.item_text, per_sample_weights=weight,
                                                                   mode="sum"), dim=-1)
        return user @ self.item_text[: self.num_items].T

    def _logits(self, user: torch.Tensor, id_mask: torch.Tensor | None,
                prior: torch.Tensor | None = None, ranking: bool = False) -> torch.Tensor:
        text_side = self.text_out(user)
        if self.text_bias is not None:
            text_side = self.text_bias(text_side)
        logits = text_side @ self.item_text[: self.num_items].T
        if prior is not None:
            logits = logits + self.settings.prior_weight * prior
        known = self.known[: self.num_items]
        if self.id_out is not None or self.item_bias is not None:
            id_part = self.id_out(user) if self.id_out is not None else torch.zeros_like(logits)
            if self.item_bias is not None:
                id_part = self.item_bias(id_part)
            mask = known.to(logits.dtype)
            if id_mask is not None:
                mask = mask * id_mask
            logits = logits + id_part * mask
        if ranking and self.settings.new_item_boost != 0.0:
            logits = logits + self.settings.new_item_boost * (~known).to(logits.dtype)
        return logits

    def forward(self, items: torch.Tensor, ratings: torch.Tensor,
                id_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits over the catalogue; items not ``known`` are left out of the softmax.
        ``id_mask`` (B, num_items) of 0/1 drops chosen items' ID terms for that row."""
        logits = self._logits(self.user_vectors(items, ratings), id_mask, self._prior(items, ratings))
        return logits.masked_fill(~self.known[: self.num_items], float("-inf"))

    @torch.no_grad()
    def score(self, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """Ranking scores over the full catalogue (unknown items by their text terms and the new-item boost)."""
        return self._logits(self.user_vectors(items, ratings), None, self._prior(items, ratings), ranking=True)

    def _prior(self, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor | None:
        return self.text_prior(items, ratings) if self.settings.prior_weight > 0 else None


def history_mask(items: torch.Tensor, targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, num_items) True where an item is in the row's history ``items`` (left-padded with ``num_items``)
    and is not the row's target (a repeated item stays a valid target)."""
    seen = torch.zeros(items.shape[0], num_items + 1, dtype=torch.bool)
    seen.scatter_(1, items, True)
    seen = seen[:, :num_items]
    rows = torch.arange(items.shape[0])
    valid = (targets >= 0) & (targets < num_items)
    seen[rows[valid], targets[valid]] = False
    return seen


@torch.no_grad()
def sequence_scores(model: SequenceRecommender, rows: SequenceRows, chunk: int = 512) -> np.ndarray:
    """[rows x items] ranking scores."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), chunk):
        sl = slice(start, start + chunk)
        out.append(model.score(torch.from_numpy(rows.items[sl]), torch.from_numpy(rows.ratings[sl])).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.empty((0, model.num_items), dtype=np.float32)
