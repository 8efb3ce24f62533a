"""The recommender: a LoRA text encoder for users, scored against catalogue item embeddings.

score(user, item) = scale * <u, e_item + r_item> + b_item, where
  u       = encoder(user text)                        (trainable through LoRA),
  e_item  = encoder(item text), recomputed on refresh (constant within a step, so the
            positive and all negatives are scored by the same function),
  r_item  = optional trainable ID residual, b_item = optional trainable item bias,
            stored as b_item = bias_scale * beta_item with beta the trained (and exchanged)
            parameter. Under DP-SGD's joint per-example clipping bias_scale sets the bias's
            share of the clip norm: its gradient is bias_scale times larger, while the LoRA
            gradients are not.
Items never seen in training (``known`` False) are scored by their text alone:
r = 0 and b = mean bias over known items.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.encoder import TextEncoder
from common.features import FeatureSet


class ItemBias(nn.Module):
    """Adds one trainable bias per item to the logits: ``scale * bias``."""

    def __init__(self, num_items: int, scale: float = 1.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"item bias scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.zeros(num_items))

    def effective(self) -> torch.Tensor:
        """The bias in logit units."""
        return self.scale * self.bias

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.effective()


@register_grad_sampler(ItemBias)
def _item_bias_grad_sample(layer: ItemBias, activations, backprops: torch.Tensor) -> dict:
    # d logit_j / d bias_j = scale, so example i's gradient is its own backprop row times scale.
    return {layer.bias: backprops * layer.scale}


class ItemHead(nn.Module):
    """Scores user vectors against the cached catalogue embeddings."""

    def __init__(self, num_items: int, dim: int, scale: float, item_bias: bool, id_residual: bool,
                 bias_scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("item_emb", torch.zeros(num_items, dim))
        self.register_buffer("known", torch.ones(num_items, dtype=torch.bool))
        self.bias = ItemBias(num_items, bias_scale) if item_bias else None
        self.residual = nn.Linear(dim, num_items, bias=False) if id_residual else None
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)

    def forward(self, user_vec: torch.Tensor) -> torch.Tensor:
        """Training logits; items not ``known`` are masked out of the softmax."""
        logits = user_vec @ self.item_emb.T
        if self.residual is not None:
            logits = logits + self.residual(user_vec)
        logits = logits * self.scale
        if self.bias is not None:
            logits = self.bias(logits)
        return logits.masked_fill(~self.known, float("-inf"))

    @torch.no_grad()
    def score(self, user_vec: torch.Tensor) -> torch.Tensor:
        """Ranking scores over the full catalogue; unknown items use text only."""
        sims = user_vec @ self.item_emb.T
        if self.residual is not None:
            sims = sims + (user_vec @ self.residual.weight.T) * self.known
        scores = sims * self.scale
        if self.bias is not None:
            b = self.bias.effective()
            fill = b[self.known].mean() if bool(self.known.any()) else torch.zeros(())
            scores = scores + torch.where(self.known, b, fill)
        return scores


class Recommender(nn.Module):
    """The trainable tower: adapted top encoder layers over cached features, then the item head."""

    def __init__(self, encoder: TextEncoder, num_items: int, scale: float = 20.0,
                 item_bias: bool = True, id_residual: bool = False, bias_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ItemHead(num_items, encoder.dim, scale, item_bias, id_residual, bias_scale)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(features, attention_mask))

    def item_side_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable item-side tensors (empty when both options are off)."""
        out = {}
        if self.head.bias is not None:
            out["item_bias"] = self.head.bias.bias.detach().clone()
        if self.head.residual is not None:
            out["item_residual"] = self.head.residual.weight.detach().clone()
        return out


@torch.no_grad()
def refresh_items(model: Recommender, item_features: FeatureSet, chunk: int = 512) -> None:
    """Re-encode the catalogue with the current adapters into the head's cached item embeddings."""
    was_training = model.training
    model.eval()
    # Chunks of similar length pad less (batch() trims each chunk to its longest text).
    order = torch.argsort(item_features.mask.sum(1))
    for start in range(0, len(item_features), chunk):
        idx = order[start: start + chunk]
        feats, mask = item_features.batch(idx)
        model.head.item_emb[idx] = model.encoder.forward_features(feats, mask)
    model.train(was_training)


@torch.no_grad()
def catalogue_vectors(encoder: TextEncoder, item_features: FeatureSet) -> torch.Tensor:
    """The encoder's unit-norm embedding of every item text (with its current adapters), (items, dim)."""
    model = Recommender(encoder, len(item_features), item_bias=False)
    refresh_items(model, item_features)
    return model.head.item_emb.clone()
