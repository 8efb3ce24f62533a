"""One client training session: check the device policy, plan against the budget under the
ledger's lock, record the spend, train, and build a reply of public or DP-protected fields only.

Order matters for privacy: the session's spend is written to the ledger (durably) once the
DP machinery is in place and *before* the first step, so whatever happens afterwards (a
crash, a killed process, a lost reply) the ledger can only over-report. A session that
cannot start records nothing. The schedule (Poisson rate, steps, denominator) comes from
public numbers, so a client with no examples takes the same noise-only steps and nothing
in the reply depends on how many examples it holds (:mod:`common.wire`). A request for a (run,
round) the device already answered gets the reply it released then (:mod:`client.released`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.released import ReleasedReplies
from common.device_policy import DevicePolicy
from common.features import FeatureSet
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session
from common.model_state import ModelRuntime, get_state
from common.partition import ClientData
from common.privacy import client_public_size, client_schedule, session_sensitivity
from common.training import TrainConfig, train

PAD_TEXT = "no history yet"  # public: what a user with no history is rendered as


@dataclass
class SessionResult:
    """What the client may send back: tensors and the public fields of :mod:`common.wire`."""

    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    refused: bool = False
    reason: str = ""


def refusal(reason: str) -> SessionResult:
    """A refusal with one of the fixed codes of :data:`common.wire.REFUSAL_REASONS`."""
    return SessionResult(refused=True, reason=reason, metrics={"refused": 1.0})


def train_config(cfg: dict[str, Any], seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg["local-epochs"], batch_size=cfg["batch-size"], learning_rate=cfg["learning-rate"],
                       item_learning_rate=cfg["item-learning-rate"], seed=seed, dp=cfg["local-dp"],
                       noise_multiplier=cfg["noise-multiplier"], target_epsilon=None, delta=cfg["delta"],
                       max_grad_norm=cfg["max-grad-norm"], accountant=cfg["accountant"],
                       public_size=client_public_size(cfg), optimizer=cfg["local-optimizer"],
                       refresh_at_start=False, refresh_at_end=False, refresh_every=10**9)


def mechanism_metrics(ledger: PrivacyLedger, session: Session, expected_batch_size: int) -> dict[str, float]:
    """The public description of a recorded DP-SGD session (see :data:`common.wire.TRAIN_METRICS`)."""
    return {"refused": 0.0, "epsilon": ledger.epsilon, "delta": ledger.delta,
            "noise-multiplier": session.noise_multiplier, "max-grad-norm": session.max_grad_norm,
            "sample-rate": session.sample_rate, "steps": float(session.steps),
            "expected-batch-size": float(expected_batch_size),
            "adjacency-replace-one": 1.0 if session.adjacency == "replace-one" else 0.0}


def run_session(runtime: ModelRuntime, data: ClientData, cfg: dict[str, Any], ledger_dir: str | Path,
                client_id: str, run_id: str, server_round: int, node_id: int | None = None,
                policy: DevicePolicy | None = None) -> SessionResult:
    """Train the loaded global state on this client's data under its policy and budget; a refusal
    is returned, never raised."""
    policy = policy or DevicePolicy()
    if policy.violations(cfg):
        return refusal("privacy-policy")
    tcfg = train_config(cfg, seed=cfg["seed"])
    if not tcfg.dp:  # allowed only by a device policy that does not require local DP
        features = runtime.features(data.train_texts)
        train(runtime.model, features, data.train_targets, None, tcfg)
        names, arrays = get_state(runtime.model)
        return SessionResult(names=names, arrays=arrays, metrics={"refused": 0.0})
    schedule = client_schedule(cfg)  # the same for every client, whatever it holds
    released = ReleasedReplies(ledger_dir, client_id)
    try:
        with PrivacyLedger.session(ledger_dir, client_id, min(cfg["client-epsilon-budget"], policy.epsilon_budget),
                                   policy.delta, cfg["accountant"], policy.to_json()) as ledger:
            if ledger.accountant != cfg["accountant"]:
                return refusal("privacy-policy")  # its ledger composes with the other accountant
            planned = Session(tcfg.noise_multiplier, schedule.sample_rate, schedule.steps, tcfg.max_grad_norm,
                              ledger.delta, run_id=run_id, round=server_round, node_id=node_id, kind="dp-sgd",
                              adjacency=policy.adjacency,
                              sensitivity=session_sensitivity(cfg["examples-per-user"], policy.adjacency),
                              history_len=cfg["history-len"], max_length=cfg["max-length"])
            if ledger.recorded(run_id, server_round, "dp-sgd") is not None:
                kept = released.load("train", run_id, server_round)
                if kept is not None:  # asked again (a resumed server): the same bytes, no new spend
                    names, arrays, metrics = kept
                    return SessionResult(names=names, arrays=arrays, metrics=metrics)
            # Anything else is a new release, planned and charged as one: a recorded session whose
            # reply is not kept (any more) is never run again under that record.
            allowed = ledger.max_steps_within_budget(planned)
            if allowed == 0 or (allowed < planned.steps and cfg["budget-policy"] == "refuse"):
                return refusal("privacy-budget")
            session = replace(planned, steps=allowed)
            tcfg.max_steps, tcfg.sensitivity = session.steps, session.accounted_sensitivity
            texts, targets, weights = padded_rows(data, cfg["examples-per-user"])
            features = _features(runtime, texts)
            # The session never re-encodes the catalogue: item embeddings stay those of the global
            # state, so the runtime's catalogue cache stays valid for the next client of the round.
            report = train(runtime.model, features, targets, None, tcfg, on_start=lambda: ledger.record(session),
                           row_weights=weights)
            if report.epsilon is not None and report.epsilon > ledger.epsilon + 1e-6:
                # Opacus' own accounting of this session exceeds what the ledger composed.
                raise RuntimeError(f"session epsilon {report.epsilon} exceeds the ledger's total {ledger.epsilon}")
            names, arrays = get_state(runtime.model)
            metrics = mechanism_metrics(ledger, session, schedule.expected_batch_size)
            released.save("train", run_id, server_round, names, arrays, metrics)  # kept before it leaves
            return SessionResult(names=names, arrays=arrays, metrics=metrics)
    except LedgerUnavailableError:
        return refusal("ledger-unavailable")


def padded_rows(data: ClientData, cap: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The session's rows: the real examples, then padding rows (a fixed public text, weight 0) up to
    the public cap, so encoding and every Poisson batch cost the same whatever the client holds
    (the server sees when a reply arrives). Without a cap (0) there is nothing to pad to."""
    n = len(data.train_targets)
    pad = max(0, cap - n) if cap > 0 else 0
    texts = [*data.train_texts, *[PAD_TEXT] * pad]
    targets = np.concatenate([data.train_targets, np.zeros(pad, dtype=np.int64)])
    weights = np.concatenate([np.ones(n, dtype=np.float32), np.zeros(pad, dtype=np.float32)])
    return texts, targets, weights


def _features(runtime: ModelRuntime, texts: list[str]) -> FeatureSet:
    """The session's features at full length (a DP session's shapes do not depend on the data)."""
    if texts:
        return runtime.features(texts, fixed=True)
    return FeatureSet.empty(runtime.settings.max_length, runtime.encoder.dim, fixed=True)
