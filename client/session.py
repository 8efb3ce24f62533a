"""One client training session: plan against the privacy budget, record the spend, train, report.

Order matters for privacy: the session's spend is written to the ledger (atomically)
*before* training starts, so whatever happens afterwards (a crash, a killed process,
a lost reply) the ledger can only over-report. The reply carries only the adapter
tensors and numbers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.ledger import PrivacyLedger, Session
from common.model_state import ModelRuntime, get_state
from common.partition import ClientData
from common.training import TrainConfig, dp_sample_rate, planned_steps, train


@dataclass
class SessionResult:
    """What the client may send back: tensors, numbers, and a refusal reason of its own making."""

    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    refused: bool = False
    reason: str = ""


def ledger_path(state_dir: str | Path, client_id: str) -> Path:
    return Path(state_dir) / f"ledger-{client_id}.json"


def train_config(cfg: dict[str, Any], seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg["local-epochs"], batch_size=cfg["batch-size"], learning_rate=cfg["learning-rate"],
                       item_learning_rate=cfg["item-learning-rate"], seed=seed, dp=cfg["local-dp"],
                       noise_multiplier=cfg["noise-multiplier"], target_epsilon=None, delta=cfg["delta"],
                       max_grad_norm=cfg["max-grad-norm"], accountant=cfg["accountant"],
                       optimizer=cfg["local-optimizer"], refresh_at_start=False, refresh_at_end=False, refresh_every=10**9)


def run_session(runtime: ModelRuntime, data: ClientData, cfg: dict[str, Any], state_dir: str | Path,
                client_id: str, run_id: str, server_round: int, node_id: int | None = None) -> SessionResult:
    """Train the loaded global state on this client's data under its budget; never raises on refusal."""
    n = len(data.train_targets)
    if n == 0:
        return SessionResult(refused=True, reason="no training examples on this client",
                             metrics={"refused": 1.0, "num-examples": 0.0})
    seed = (cfg["seed"] * 1_000_003 + server_round * 7919 + zlib.crc32(client_id.encode()) % 7919) % (2**31)
    tcfg = train_config(cfg, seed)
    steps = planned_steps(n, tcfg)
    metrics: dict[str, float] = {"refused": 0.0, "truncated": 0.0}
    ledger = None
    if tcfg.dp:
        ledger = PrivacyLedger.open(ledger_path(state_dir, client_id), client_id, cfg["client-epsilon-budget"],
                                    cfg["delta"], cfg["accountant"])
        q = dp_sample_rate(n, tcfg.batch_size)
        allowed = ledger.max_steps_within_budget(tcfg.noise_multiplier, q, steps)
        if allowed < steps and (allowed == 0 or cfg["budget-policy"] == "refuse"):
            after = ledger.epsilon_after(Session(tcfg.noise_multiplier, q, steps, tcfg.max_grad_norm, ledger.delta))
            return SessionResult(refused=True, metrics={"refused": 1.0, "num-examples": 0.0,
                                                        "epsilon": ledger.epsilon},
                                 reason=(f"privacy budget: spent epsilon {ledger.epsilon:.3f}, this session "
                                         f"would bring it to {after:.3f} > budget {ledger.budget_epsilon:g}"))
        if allowed < steps:
            metrics["truncated"] = 1.0
            steps = allowed
        # Record the spend before any training: a crash from here on can only over-report.
        ledger.record(Session(tcfg.noise_multiplier, q, steps, tcfg.max_grad_norm, ledger.delta,
                              run_id=run_id, round=server_round, node_id=node_id))
    tcfg.max_steps = steps
    features = runtime.features(data.train_texts)
    # Item embeddings stay those of the global state (no refresh inside a session), so the
    # runtime's catalogue cache remains valid for the next client of this round.
    # The session never re-encodes the catalogue (refresh off), so it needs no catalogue features.
    report = train(runtime.model, features, data.train_targets, None, tcfg)
    names, arrays = get_state(runtime.model)
    metrics.update({
        "num-examples": float(n),
        "train-loss": float(np.mean(report.losses)) if report.losses else math.nan,
        "steps": float(report.steps),
        "train-seconds": float(report.seconds),
    })
    if ledger is not None:
        if report.epsilon is not None and report.epsilon > ledger.epsilon + 1e-6:
            # Opacus' own accounting of this session exceeds what the ledger composed: never under-report.
            raise RuntimeError(f"session epsilon {report.epsilon} exceeds the ledger's total {ledger.epsilon}")
        metrics.update({"epsilon": ledger.epsilon, "session-epsilon": float(report.epsilon or 0.0),
                        "noise-multiplier": float(report.noise_multiplier), "sample-rate": float(report.sample_rate),
                        "delta": ledger.delta, "max-grad-norm": tcfg.max_grad_norm})
    if not math.isfinite(metrics["train-loss"]):
        metrics["train-loss"] = 0.0
    return SessionResult(names=names, arrays=arrays, metrics=metrics)
