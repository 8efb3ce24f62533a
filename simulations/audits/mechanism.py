"""Mechanism audit: the client's DP-SGD, run exactly as a client runs it, with gradient canaries.

The training set is one client's real examples plus the *included* half of m canaries.
A canary is a row whose per-example gradient is a spike of norm ``100 x max-grad-norm``
on one trainable coordinate of its own (a "Dirac canary"). The rows go through the product's
training loop of the configured ``user-model``: the sequence model's
:func:`common.sequence_training.train_sequence` with the device's padded session rows and
``SequenceTrainConfig`` (coordinates of every exchanged tensor), or the text model's
``common.training.train`` with the client's ``TrainConfig`` (LoRA coordinates). Both use the same
DP-SGD engine (:func:`common.privacy.make_private`), Poisson sampling, per-example clipping and noise. A canary's score is how
far its coordinate moved down the gradient; the one-run estimator turns scores into a
lower bound on epsilon (:mod:`server.audit.estimator`).

``broken`` switches off a safeguard while the accountant keeps claiming the configured
mechanism: ``noise-off`` (noise multiplier 0) or ``clip-off`` (no clipping, noise still
calibrated to the configured clip). A sound audit must then find more than the claim.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from client.session import sequence_train_config, train_config
from common.ledger import Session, composed_epsilon
from common.model_state import ModelRuntime, ModelSettings, get_state
from common.partition import client_data, dataset_from_source, run_split, split_for
from common.run_config import resolve
from common.runtimes import make_runtime
from common.sequence_runtime import client_sequences, padded_sequence_rows
from common.sequence_training import SequenceTrainConfig, train_sequence
from common.training import TrainConfig, adapter_params, dp_schedule, planned_steps, train
from server.audit.estimator import audit_scores

BROKEN = ("none", "noise-off", "clip-off")
# either loop's config: the fields read here (noise, clip, rate inputs, accountant) are common to both
AnyTrainConfig = TrainConfig | SequenceTrainConfig
CANARY_NORM_FACTOR = 100.0  # canary gradient norm / clip: clipping, when on, cuts it to the clip
UNCLIPPED = 1e6  # the "clip" used for clip-off: no real gradient comes near it


class DiracCanaries:
    """m canaries on distinct adapter coordinates; only the included ones are training rows."""

    def __init__(self, params: list[torch.Tensor], included_ids: np.ndarray, coords: np.ndarray, norm: float):
        self.count = len(included_ids)
        self.position = {id(p): j for j, p in enumerate(params)}
        sizes = [p.numel() for p in params]
        self.offsets = np.cumsum([0, *sizes])
        self.coords = coords  # flat coordinate of every canary (included or not)
        self.included_ids = included_ids  # canary id of training row n + j
        self.norm = norm

    def rows(self, canary_index: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        ids = self.included_ids[canary_index.numpy()]
        out = []
        for p in params:
            rows = torch.zeros((len(ids), p.numel()), dtype=p.dtype)
            j = self.position.get(id(p))
            for r, cid in enumerate(ids if j is not None else []):
                c = self.coords[cid]
                if self.offsets[j] <= c < self.offsets[j + 1]:
                    rows[r, c - self.offsets[j]] = self.norm
            out.append(rows.view(len(ids), *p.shape))
        return out


def draw_canaries(params: list[torch.Tensor], canaries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(which canaries are included, each canary's distinct flat coordinate over ``params``). Inclusion
    must be unpredictable, as in the estimator's model (a generator keyed from the OS); the coordinates
    are public (the run's seed)."""
    included = np.random.default_rng().random(canaries) < 0.5
    total = sum(p.numel() for p in params)
    if canaries > total:
        raise ValueError(f"{canaries} canaries need distinct coordinates; the audited tensors have {total}")
    return included, np.random.default_rng(seed).choice(total, size=canaries, replace=False)


def audit_public_size(rows: int, canaries: int) -> int:
    """The audited session's public size: its rows and the expected number of included canaries. The
    audit, not a client, chooses it, and it must not depend on which canaries are included (the
    estimator models one fixed mechanism applied to a secret inclusion vector)."""
    return rows + canaries // 2


def _flat(params: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in params]).astype(np.float64)


def run_mechanism_audit(overrides: dict[str, Any] | None = None, canaries: int = 2000, user: int = 0,
                        broken: str = "none", confidence: float = 0.95) -> dict[str, Any]:
    """Run one audited client session and return the report (see module docstring)."""
    if broken not in BROKEN:
        raise ValueError(f"broken must be one of {BROKEN}, got {broken!r}")
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    t0 = time.perf_counter()
    if resolve(overrides or {})["user-model"] == "sequence":
        return _sequence_mechanism_audit(overrides, canaries, user, broken, confidence, t0)
    cfg, runtime = audit_runtime(overrides)
    client = client_data(split_for(cfg["dataset"]), user, cfg["history-len"], cfg["examples-per-user"])
    features = runtime.features(client.train_texts)

    params = adapter_params(runtime.model)
    included, coords = draw_canaries(params, canaries, cfg["seed"])
    claimed = replace(train_config(cfg, seed=cfg["seed"]), public_size=audit_public_size(len(client.train_targets),
                                                                                          canaries))
    run_cfg = with_broken(claimed, broken)
    injector = DiracCanaries(params, np.flatnonzero(included), coords, CANARY_NORM_FACTOR * claimed.max_grad_norm)

    before = _flat(params)
    report = train(runtime.model, features, client.train_targets, runtime.item_features, run_cfg, canaries=injector)
    moved = _flat(params) - before
    scores = -moved[coords]  # SGD and Adam both move a coordinate against its gradient

    n_rows = len(client.train_targets) + injector.count
    return {
        **session_report("mechanism", claimed, run_cfg, broken, n_rows, report.steps, scores, included, confidence),
        "user_model": "text",
        "training_rows": {"real_examples": len(client.train_targets), "user": user,
                          "canary_rows": injector.count, "public_size": claimed.public_size,
                          "planned_steps": planned_steps(n_rows, claimed)},
        "canaries": {"kind": "Dirac gradient canaries on distinct LoRA coordinates",
                     "gradient_norm": injector.norm, "count": canaries, "included": int(included.sum())},
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(report.seconds, 2),
    }


def _sequence_mechanism_audit(overrides: dict[str, Any] | None, canaries: int, user: int, broken: str,
                              confidence: float, t0: float) -> dict[str, Any]:
    """The same audit of the sequence model's session: the device's padded rows (its most recent
    ``examples-per-user`` examples and weight-0 padding up to that cap), the device's
    :class:`SequenceTrainConfig` and :func:`train_sequence`, Dirac canaries on distinct coordinates
    of the exchanged tensors (every trainable one)."""
    cfg = resolve({**(overrides or {}), "local-dp": True})
    split = run_split(cfg)  # the split the run's devices read (the data loaded once)
    runtime = make_runtime(split.data, cfg, seed=cfg["seed"])
    cap = cfg["examples-per-user"]
    rows, weights = padded_sequence_rows(client_sequences(split, user, cfg["history-len"], cap).train, cap,
                                         split.data.num_items)
    params = [p for p in runtime.model.parameters() if p.requires_grad]
    included, coords = draw_canaries(params, canaries, cfg["seed"])
    # a canary is an added row that shifts no window, so the claim is accounted at C
    claimed = replace(sequence_train_config(cfg, seed=cfg["seed"]), public_size=audit_public_size(len(rows), canaries))
    run_cfg = with_broken(claimed, broken)
    injector = DiracCanaries(params, np.flatnonzero(included), coords, CANARY_NORM_FACTOR * claimed.max_grad_norm)
    before = _flat(params)
    report = train_sequence(runtime.model, rows, run_cfg, row_weights=weights, canaries=injector)
    scores = -(_flat(params) - before)[coords]  # SGD and Adam both move a coordinate against its gradient
    n_rows = len(rows) + injector.count
    return {
        **session_report("mechanism", claimed, run_cfg, broken, n_rows, report.steps, scores, included, confidence),
        "user_model": "sequence",
        "training_rows": {"real_examples": int(weights.sum()), "padding_rows": int(len(rows) - weights.sum()),
                          "user": user, "canary_rows": injector.count, "public_size": claimed.public_size,
                          "planned_steps": dp_schedule(n_rows, claimed).steps},
        "canaries": {"kind": "Dirac gradient canaries on distinct coordinates of the sequence model's tensors",
                     "gradient_norm": injector.norm, "count": canaries, "included": int(included.sum())},
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(report.seconds, 2),
    }


def audit_runtime(overrides: dict[str, Any] | None) -> tuple[dict[str, Any], ModelRuntime]:
    """The resolved config (local DP on) and a runtime at the starting global state, with the
    catalogue embedded for it, as a client would hold it."""
    cfg = resolve({**(overrides or {}), "local-dp": True})
    runtime = ModelRuntime(dataset_from_source(cfg["dataset"]), ModelSettings.from_run_config(cfg), seed=cfg["seed"])
    runtime.load_state(*get_state(runtime.model))
    return cfg, runtime


def with_broken(claimed: AnyTrainConfig, broken: str) -> AnyTrainConfig:
    """The configuration actually run: ``claimed``, or it with the noise or the clipping switched off."""
    if broken == "noise-off":
        return replace(claimed, noise_multiplier=0.0)
    if broken == "clip-off":
        # Noise stays calibrated to the claimed clip (sigma * C), but nothing is clipped.
        return replace(claimed, max_grad_norm=UNCLIPPED,
                       noise_multiplier=claimed.noise_multiplier * claimed.max_grad_norm / UNCLIPPED)
    return claimed


def session_report(kind: str, claimed: AnyTrainConfig, run_cfg: AnyTrainConfig, broken: str, rows: int, steps: int,
                   scores: np.ndarray, included: np.ndarray, confidence: float) -> dict[str, Any]:
    """The fields every audit of one client DP-SGD session reports: the bound beside the accountant's
    epsilon for the *claimed* mechanism (Poisson rate from ``rows``, ``steps`` taken)."""
    q = dp_schedule(rows, claimed).sample_rate
    # the canary is one added example with no window to shift: sensitivity C
    claimed_eps = composed_epsilon([Session(claimed.noise_multiplier, q, steps, claimed.max_grad_norm,
                                            claimed.delta, sensitivity=1.0)], claimed.delta, claimed.accountant)
    bound = audit_scores(scores, included, claimed.delta, confidence)
    return {
        "audit": kind,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": confidence,
        "accountant_epsilon": claimed_eps,
        "delta": claimed.delta,
        "privacy_unit": "example (one training row of one client), one DP-SGD session",
        "broken": broken,
        "bound_exceeds_accountant": bound.epsilon_lower_bound > claimed_eps,
        "mechanism_claimed": {"noise_multiplier": claimed.noise_multiplier, "max_grad_norm": claimed.max_grad_norm,
                              "sample_rate": q, "steps": steps, "accountant": claimed.accountant,
                              "sampling": "poisson (secure stream)", "optimizer": claimed.optimizer,
                              "batch_size": claimed.batch_size, "epochs": claimed.epochs},
        "mechanism_run": {"noise_multiplier": run_cfg.noise_multiplier, "max_grad_norm": run_cfg.max_grad_norm},
        "estimator": {"method": "Steinke, Nasr and Jagielski (NeurIPS 2023), one run, Theorem 5.2 with delta",
                      **bound.to_json()},
        "reading": reading(bound.largest_reachable, len(scores), confidence),
    }


def reading(largest: float, canaries: int, confidence: float) -> str:
    """What such a bound can and cannot show (shared by every audit's report)."""
    return (f"A lower bound: with {confidence:.0%} confidence the mechanism is NOT (epsilon, delta)-DP for any "
            f"epsilon below it. It can catch a broken implementation, never certify a correct one: a bound "
            f"below the accountant's epsilon is expected even for a perfect implementation, because one run "
            f"with {canaries} canaries cannot show more than {largest:.2f} at this confidence (every guess "
            f"right), and weak scores show much less.")

