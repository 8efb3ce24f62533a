"""Tokenise texts and cache the frozen bottom-layer features the adapted layers start from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.encoder import TextEncoder
from common.progress import progress_bar


@dataclass
class FeatureSet:
    """Cached frozen features for a list of texts, padded to one length."""

    features: torch.Tensor  # float32 [N, L, d]
    mask: torch.Tensor  # int64 [N, L]
    truncated: int  # how many texts were cut at max_length
    # True on a device under DP: batches keep the full length L, so no tensor entering the encoder
    # has a shape that depends on how long the device's texts are; the server sees when a reply
    # arrives (tokenizing the texts still takes time in proportion to their length).
    fixed: bool = False

    @classmethod
    def empty(cls, max_length: int, dim: int, fixed: bool = False) -> "FeatureSet":
        """No texts (a client with no examples still takes its noise-only DP steps)."""
        return cls(features=torch.zeros(0, max_length, dim), mask=torch.zeros(0, max_length, dtype=torch.long),
                   truncated=0, fixed=fixed)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest text among them (padding beyond it is inert), or at the
        full length when ``fixed``."""
        mask = self.mask[idx]
        if self.fixed:
            return self.features[idx], mask
        length = max(1, int(mask.sum(1).max())) if len(idx) else 1
        return self.features[idx, :length], mask[:, :length]


# Characters kept per allowed token before tokenising. Real text averages a few characters per
# WordPiece token, so the first max_length tokens of any text lie well inside the cut (ids are
# unchanged) while a 20 MB text costs no more than a short one. A text longer than the budget is
# counted as truncated without tokenising the rest (only pathological texts, e.g. long runs of
# blanks, would have fit in max_length tokens).
CHARS_PER_TOKEN_BUDGET = 32


def char_budget(max_length: int) -> int:
    """Characters of a text that are tokenised at most (far more than ``max_length`` tokens need)."""
    return max_length * CHARS_PER_TOKEN_BUDGET


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids and masks padded to ``max_length``; also counts texts that were truncated.

    Each text is first cut to :func:`char_budget` characters; a text counts as truncated if that
    cut happened or its tokens exceed ``max_length``.
    """
    budget = char_budget(max_length)
    capped = [t[:budget] for t in texts]
    full = tokenizer(capped, add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(1 for t, ids in zip(texts, full) if len(t) > budget or len(ids) > max_length)
    enc = tokenizer(capped, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], truncated


def compute_features(encoder: TextEncoder, tokenizer, texts: list[str], max_length: int,
                     chunk: int = 256, label: str | None = None, fixed: bool = False) -> FeatureSet:
    """Frozen features for every text, in chunks, with a progress bar when ``label`` is given. With
    ``fixed`` every chunk runs at ``max_length`` and the set keeps that length in every batch (a
    device's DP session: its work must not depend on its texts' lengths)."""
    ids, mask, truncated = tokenize(tokenizer, texts, max_length)
    # Sort by length so each chunk pads only to its own longest text.
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True)
    out = torch.zeros(len(texts), max_length, encoder.dim)
    was_training = encoder.training
    encoder.eval()
    with progress_bar(label, total=len(texts)) as advance:
        for start in range(0, len(texts), chunk):
            rows = order[start: start + chunk]
            length = max_length if fixed else max(1, int(lengths[rows].max()))
            out[rows, :length] = encoder.frozen_features(ids[rows, :length], mask[rows, :length])
            advance(len(rows))
    encoder.train(was_training)
    return FeatureSet(features=out, mask=mask, truncated=truncated, fixed=fixed)
