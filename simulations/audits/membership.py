"""End-to-end membership audit on the encoder: canary examples, half inserted, scored by loss drop.

A canary is a training example with a random text (words drawn from the public catalogue's
titles) and a random target item. The included half joins the real examples of the
audited client(s); the product's client training (``client.session.train_config`` through
``common.training.train``) fine-tunes the LoRA adapters and item biases with DP-SGD. Each
canary is scored by how much its loss fell over training (the item embeddings re-encoded
with the final adapters); included canaries should fall more if the model memorises them.
This is a black-box-style audit of the whole pipeline: it is much weaker than the
mechanism audit, and a bound near 0 is the expected result under DP.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from client.session import train_config
from common.model import refresh_items
from common.model_state import ModelRuntime
from common.partition import client_data, split_for
from common.training import train
from simulations.audits.mechanism import BROKEN, audit_public_size, audit_runtime, session_report, with_broken


def canary_texts(titles: list[str], count: int, rng: np.random.Generator, words: tuple[int, int] = (8, 20)) -> list[str]:
    """``count`` random texts of random catalogue words (public vocabulary, no real history)."""
    vocab = sorted({w for t in titles for w in re.findall(r"[A-Za-z']{3,}", t)})
    return [" ".join(rng.choice(vocab, size=int(rng.integers(*words)))) for _ in range(count)]


@torch.no_grad()
def example_losses(runtime: ModelRuntime, features, targets: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy over the catalogue with the model's current item embeddings."""
    runtime.model.eval()
    logits = runtime.model(features.features, features.mask)
    return nn.functional.cross_entropy(logits, torch.as_tensor(targets), reduction="none").numpy().astype(np.float64)


def run_membership_audit(overrides: dict[str, Any] | None = None, canaries: int = 500, users: int = 1,
                         broken: str = "none", confidence: float = 0.95) -> dict[str, Any]:
    """Train one audited client on its real examples plus the included canaries; return the report."""
    if broken not in BROKEN:
        raise ValueError(f"broken must be one of {BROKEN}, got {broken!r}")
    if canaries < 2 or users < 1:
        raise ValueError(f"need at least 2 canaries and 1 user, got {canaries} and {users}")
    t0 = time.perf_counter()
    cfg, runtime = audit_runtime(overrides)
    data = runtime.data
    split = split_for(cfg["dataset"])
    texts: list[str] = []
    targets: list[int] = []
    for user in range(min(users, data.num_users)):
        part = client_data(split, user, cfg["history-len"], cfg["examples-per-user"])
        texts += part.train_texts
        targets += part.train_targets.tolist()

    secret = np.random.default_rng()
    included = secret.random(canaries) < 0.5
    c_texts = canary_texts([it.title for it in data.items], canaries, secret)
    # Targets among items no real example targets: their logits then move mainly through the
    # canaries themselves, not through the real data's pull (which would drown the signal).
    free_items = np.setdiff1d(np.arange(data.num_items), np.asarray(targets))
    if free_items.size == 0:
        raise ValueError(f"every catalogue item is a target of the {users} users' real examples: use fewer users")
    c_targets = secret.choice(free_items, size=canaries)
    c_features = runtime.features(c_texts)
    before = example_losses(runtime, c_features, c_targets)

    inc = np.flatnonzero(included)
    features = runtime.features(texts + [c_texts[i] for i in inc])
    all_targets = np.array(targets + c_targets[inc].tolist(), dtype=np.int64)
    claimed = replace(train_config(cfg, seed=cfg["seed"]), public_size=audit_public_size(len(targets), canaries))
    run_cfg = with_broken(claimed, broken)
    report = train(runtime.model, features, all_targets, runtime.item_features, run_cfg)
    refresh_items(runtime.model, runtime.item_features)  # score with the trained adapters' catalogue
    after = example_losses(runtime, c_features, c_targets)
    scores = before - after

    return {
        **session_report("membership", claimed, run_cfg, broken, len(all_targets), report.steps, scores, included,
                         confidence),
        "training_rows": {"real_examples": len(targets), "users": min(users, data.num_users),
                          "canary_rows": int(included.sum())},
        "canaries": {"kind": "random catalogue-word texts with random target items, scored by loss drop",
                     "count": canaries, "included": int(included.sum()),
                     "mean_score_included": float(scores[included].mean()) if included.any() else None,
                     "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else None,
                     "std_score_excluded": float(scores[~included].std()) if (~included).any() else None},
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(report.seconds, 2),
    }
