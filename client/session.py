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
from typing import Any, Callable

import numpy as np

from client.released import ReleasedReplies
from common.device_policy import DevicePolicy
from common.features import FeatureSet
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session
from common.model_state import ModelRuntime
from common.partition import ClientData
from common.privacy import client_public_size, client_schedule, session_sensitivity
from common.runtimes import Runtime
from common.sequence_runtime import ClientSequences, SequenceRuntime, padded_sequence_rows
from common.sequence_training import SequenceTrainConfig, train_sequence
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


def sequence_train_config(cfg: dict[str, Any], seed: int) -> SequenceTrainConfig:
    """The sequence model's session knobs (one learning rate for every tensor)."""
    return SequenceTrainConfig(epochs=cfg["local-epochs"], batch_size=cfg["batch-size"],
                               learning_rate=cfg["learning-rate"], optimizer=cfg["local-optimizer"], seed=seed,
                               dp=cfg["local-dp"], target_epsilon=None, noise_multiplier=cfg["noise-multiplier"],
                               delta=cfg["delta"], max_grad_norm=cfg["max-grad-norm"], accountant=cfg["accountant"],
                               public_size=client_public_size(cfg))


def run_session(runtime: Runtime, data: ClientData | ClientSequences, cfg: dict[str, Any],
                ledger_dir: str | Path, client_id: str, run_id: str, server_round: int, node_id: int | None = None,
                policy: DevicePolicy | None = None) -> SessionResult:
    """Train the loaded global state on this client's data under its policy and budget; a refusal
    is returned, never raised. ``data`` is :class:`ClientData` for the text model and
    :class:`ClientSequences` for the sequence model."""
    policy = policy or DevicePolicy()
    if policy.violations(cfg):
        return refusal("privacy-policy")
    if not cfg["local-dp"]:  # allowed only by a device policy that does not require local DP
        train_locally(runtime, data, cfg, steps=None, sensitivity=1.0, on_start=None)
        names, arrays = runtime.state()
        return SessionResult(names=names, arrays=arrays, metrics={"refused": 0.0})
    tcfg = train_config(cfg, seed=cfg["seed"])
    schedule = client_schedule(cfg)  # the same for every client, whatever it holds
    released = ReleasedReplies(ledger_dir, client_id)
    try:
        with PrivacyLedger.session(ledger_dir, client_id, min(cfg["client-epsilon-budget"], policy.epsilon_budget),
                                   policy.delta, cfg["accountant"], policy.to_json()) as ledger:
            if ledger.accountant != cfg["accountant"] or \
                    policy.lengthens_unit(cfg, ledger.recorded_history_lens()):
                # its ledger composes with the other accountant, or the run would lengthen its unit
                return refusal("privacy-policy")
            if ledger.uncovered_user_releases():
                # its secure rounds without local DP released its data outside the example-level epsilon: a
                # ledger keeps one unit per device's data (common.ledger), so it spends no more at this one
                return refusal("privacy-budget")
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
            epsilon = train_locally(runtime, data, cfg, steps=session.steps, sensitivity=session.accounted_sensitivity,
                             on_start=lambda: ledger.record(session))
            if epsilon is not None and epsilon > ledger.epsilon + 1e-6:
                # Opacus' own accounting of this session exceeds what the ledger composed.
                raise RuntimeError(f"session epsilon {epsilon} exceeds the ledger's total {ledger.epsilon}")
            names, arrays = runtime.state()
            metrics = mechanism_metrics(ledger, session, schedule.expected_batch_size)
            released.save("train", run_id, server_round, names, arrays, metrics)  # kept before it leaves
            return SessionResult(names=names, arrays=arrays, metrics=metrics)
    except LedgerUnavailableError:
        return refusal("ledger-unavailable")


def train_locally(runtime: Runtime, data: ClientData | ClientSequences, cfg: dict[str, Any], steps: int | None,
           sensitivity: float, on_start: Callable[[], None] | None) -> float | None:
    """One session of the runtime's model on the client's rows padded to the public cap (DP-SGD with
    ``steps`` and ``sensitivity`` when local DP is on); Opacus' epsilon of the session, if any."""
    cap = cfg["examples-per-user"]
    if isinstance(runtime, SequenceRuntime):
        if not isinstance(data, ClientSequences):
            raise TypeError("the sequence model trains on ClientSequences")
        scfg = sequence_train_config(cfg, seed=cfg["seed"])
        scfg.max_steps, scfg.sensitivity = steps, sensitivity
        rows, weights = padded_sequence_rows(data.train, cap, runtime.model.num_items) if cap > 0 else \
            (data.train, None)
        return train_sequence(runtime.model, rows, scfg, row_weights=weights, on_start=on_start).epsilon
    if not isinstance(data, ClientData):
        raise TypeError("the text model trains on ClientData")
    tcfg = train_config(cfg, seed=cfg["seed"])
    tcfg.max_steps, tcfg.sensitivity = steps, sensitivity
    if not tcfg.dp:
        return train(runtime.model, runtime.features(data.train_texts), data.train_targets, None, tcfg).epsilon
    texts, targets, weights = padded_rows(data, cap)
    # The session never re-encodes the catalogue: item embeddings stay those of the global
    # state, so the runtime's catalogue cache stays valid for the next client of the round.
    return train(runtime.model, _features(runtime, texts), targets, None, tcfg, on_start=on_start,
                 row_weights=weights).epsilon


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
