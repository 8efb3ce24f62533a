"""A personal part of the sequence model that never leaves the device: one offset vector in the
item-text space, fitted on the user's own history on top of the frozen global model.

    personal_score(j) = global_score(j) + <offset_user, t_j>

``t_j`` is item j's public text vector, so the offset moves the user toward items whose text is
like what they picked before, including items nobody has rated. It is fitted by a few full-batch
Adam steps on the user's most recent (history prefix, next item) rows with the global model's own
loss (softmax over the catalogue, the row's own history items left out when the model trains that
way) plus an L2 pull toward zero, i.e. toward the global model. The global model is frozen: only
the offset is trained, and it is computed, used and kept on the device. It is never sent, so it
needs no DP and costs no epsilon; the trust model of what leaves the device is unchanged.

Several users are fitted at once (the simulation harness): the loss is a sum of per-user terms
over disjoint offsets and Adam's update is elementwise, so each user's offset depends on that
user's rows alone: mathematically the one it gets fitted alone. Numerically, batching changes the
rounding of the matrix products, and Adam's normalised step can magnify that on coordinates whose
gradient is near zero; in float64 the two agree to 1e-6 (``tests/test_personalisation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.sequence import SequenceRecommender, SequenceRows, history_mask, rows_at
from common.split import Split

ROWS_PER_CHUNK = 2048  # rows per forward pass of the frozen model (a device passes a small one)


@dataclass(frozen=True)
class PersonalSettings:
    """How a device fits its personal offset (one config object; recorded with every result)."""

    steps: int = 50  # full-batch Adam steps (0: the global model unchanged)
    learning_rate: float = 0.05
    l2: float = 0.1  # weight of the squared norm of the offset (the pull toward the global model)
    rows: int = 50  # the user's most recent training rows the fit reads
    # rows whose target the user rated below this are left out of the fit (an unrated event counts as
    # chosen); 0: every row, as the global model trains
    min_target_rating: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.rows < 1:
            raise ValueError(f"personal steps must be >= 0 and rows >= 1, got {self}")
        if not (np.isfinite(self.min_target_rating) and 0 <= self.min_target_rating <= 5):
            raise ValueError(f"personal min_target_rating must be in [0, 5], got {self}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0 and np.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"personal learning_rate must be > 0 and l2 >= 0 (finite), got {self}")


def personal_rows(split: Split, rows: np.ndarray, history_len: int, cap: int,
                  min_target_rating: float = 0.0, known: np.ndarray | None = None) -> SequenceRows:
    """The (history prefix, next item) rows of one user's interactions ``rows`` (oldest first): each of the
    most recent ``cap`` interactions after the first is a target, its history the interactions before it;
    targets rated below ``min_target_rating`` are left out (an unrated one is kept), and with ``known``
    (a mask over the catalogue) targets the global model never trained on, which have no logit in it."""
    rows = np.asarray(rows, dtype=np.int64)
    rating, item = split.data.rating, split.data.item
    positions = [t for t in range(max(1, len(rows) - cap), len(rows))
                 if not (min_target_rating > 0 and rating[rows[t]] < min_target_rating)  # NaN < x is False
                 and (known is None or known[item[rows[t]]])]
    return rows_at(split, rows, positions, history_len)


@torch.no_grad()
def _frozen_logits(model: SequenceRecommender, rows: SequenceRows, chunk: int) -> torch.Tensor:
    """The global model's training logits of ``rows`` (its own history items masked when it trains that way)."""
    out = []
    for start in range(0, len(rows), chunk):
        sl = slice(start, start + chunk)
        items, targets = torch.from_numpy(rows.items[sl]), torch.from_numpy(rows.targets[sl])
        logits = model(items, torch.from_numpy(rows.ratings[sl]))
        if model.settings.exclude_history:
            logits = logits.masked_fill(history_mask(items, targets, model.num_items), float("-inf"))
        out.append(logits)
    return torch.cat(out) if out else torch.empty(0, model.num_items)


def fit_offsets(model: SequenceRecommender, rows: SequenceRows, owners: np.ndarray, num_owners: int,
                settings: PersonalSettings, chunk: int = ROWS_PER_CHUNK) -> torch.Tensor:
    """(num_owners, text dim) offsets, owner k's fitted on the rows with ``owners == k`` only (an owner without
    rows keeps a zero offset). The model is not changed. ``chunk``: rows per forward pass of the model."""
    owners = np.asarray(owners)
    if num_owners < 1 or chunk < 1 or owners.shape != (len(rows),) or not np.issubdtype(owners.dtype, np.integer) \
            or (len(owners) and not (0 <= owners.min() and owners.max() < num_owners)):
        raise ValueError(f"owners must give each of the {len(rows)} rows an integer owner in 0..{num_owners - 1}")
    owners_t = torch.as_tensor(owners.astype(np.int64))
    text = model.item_text[: model.num_items]
    offsets = torch.zeros(num_owners, text.shape[1], dtype=text.dtype, requires_grad=True)
    if settings.steps == 0 or len(rows) == 0:
        return offsets.detach()
    was_training = model.training
    model.eval()
    base = _frozen_logits(model, rows, chunk)
    model.train(was_training)
    targets = torch.from_numpy(rows.targets)
    counts = torch.bincount(owners_t, minlength=num_owners).clamp(min=1).to(base.dtype)
    optimizer = torch.optim.Adam([offsets], lr=settings.learning_rate)
    with torch.enable_grad():  # callers may rank under no_grad
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            (personal_objective(base, targets, owners_t, counts, offsets, text, settings.l2).sum()).backward()
            optimizer.step()
    return offsets.detach()


def personal_objective(base: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, counts: torch.Tensor,
                       offsets: torch.Tensor, text: torch.Tensor, l2: float) -> torch.Tensor:
    """(owners,) each owner's mean loss over its rows plus ``l2`` times its offset's squared norm."""
    # (offsets @ T^T)[owners], not offsets[owners] @ T^T: one product per owner instead of one per row
    per_row = nn.functional.cross_entropy(base + (offsets @ text.T)[owners], targets, reduction="none")
    per_owner = torch.zeros(len(offsets), dtype=base.dtype).index_add(0, owners, per_row) / counts
    return per_owner + l2 * offsets.pow(2).sum(1)


def personal_scores(model: SequenceRecommender, global_scores: np.ndarray | torch.Tensor,
                    offsets: torch.Tensor) -> np.ndarray:
    """Ranking scores of each owner: its global scores (owners x items) plus its offset's text term."""
    text = model.item_text[: model.num_items]
    with torch.no_grad():
        return (torch.as_tensor(global_scores) + offsets @ text.T).numpy()
