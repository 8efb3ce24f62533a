"""A federated evaluation reply as a DP release: the device's HR@10 and NDCG@10 on its own
held-out item, with Gaussian noise, recorded in its ledger before the reply is built.

Each metric lies in [0, 1] and adding or removing one example (the held-out item, or an item
in the history text it is scored from) moves each by at most 1, so the pair has L2
sensitivity sqrt(2): the release is the Gaussian mechanism with noise std
``eval-noise-multiplier * sqrt(2)``, composed in the ledger as one step at sample rate 1.
A device without a held-out item releases noise around (0, 0), so the reply does not tell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from client.released import ReleasedReplies
from client.session import PAD_TEXT, SessionResult, refusal
from common.device_policy import DevicePolicy
from common.evaluation import user_scores
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session
from common.metrics import metrics_from_ranks, target_rank
from common.partition import ClientData
from common.runtimes import Runtime
from common.sequence import sequence_scores
from common.sequence_runtime import ClientSequences, SequenceRuntime
from common.secure_random import SecureStream, add_gaussian_noise

SENSITIVITY = math.sqrt(2.0)


def exact_metrics(runtime: Runtime, data: ClientData | ClientSequences) -> tuple[float, float]:
    """(HR@10, NDCG@10) of the loaded global state on the device's held-out item.

    Total by design: without a held-out item, or when the received model scores it with a
    non-finite value, the pair is (0, 0) (a device does the same work either way). A reply or
    refusal that depended on the data would be a release outside the mechanism.
    """
    if isinstance(runtime, SequenceRuntime):
        if not isinstance(data, ClientSequences):
            raise TypeError("the sequence model evaluates ClientSequences")
        scores = sequence_scores(runtime.model, data.eval_row)[0]  # an all-padding row without a target
    else:
        feats = runtime.features([data.eval_text if data.eval_target is not None else PAD_TEXT], fixed=True)
        scores = user_scores(runtime.model, feats)[0]
    if data.eval_target is None or not np.isfinite(scores).all():
        return 0.0, 0.0
    excluded = np.zeros(len(scores), dtype=bool)
    excluded[data.eval_excluded] = True
    m = metrics_from_ranks(np.array([target_rank(scores, data.eval_target, excluded)]))
    return m["HR@10"], m["NDCG@10"]


def run_evaluation(runtime: Runtime, data: ClientData | ClientSequences, cfg: dict[str, Any], ledger_dir: str | Path,
                   client_id: str, run_id: str, server_round: int, node_id: int | None = None,
                   policy: DevicePolicy | None = None) -> SessionResult:
    """The noisy (HR@10, NDCG@10) pair, or a refusal (policy, budget, ledger)."""
    policy = policy or DevicePolicy()
    z = cfg["eval-noise-multiplier"]
    if policy.violations(cfg):  # includes the noise floor on evaluation releases
        return refusal("privacy-policy")
    try:
        with PrivacyLedger.session(ledger_dir, client_id, min(cfg["client-epsilon-budget"], policy.epsilon_budget),
                                   policy.delta, cfg["accountant"], policy.to_json()) as ledger:
            if ledger.accountant != cfg["accountant"] or \
                    policy.lengthens_unit(cfg, ledger.recorded_history_lens()):
                return refusal("privacy-policy")
            if ledger.uncovered_user_releases():  # as a training session (client.session)
                return refusal("privacy-budget")
            # Both metrics lie in [0, 1]: any two pairs, whatever the adjacency or which event is held
            # out, differ by at most sqrt(2), the clip recorded here, so the sensitivity is 1 clip.
            release = Session(z, 1.0, 1, SENSITIVITY, ledger.delta, run_id=run_id, round=server_round,
                              node_id=node_id, kind="evaluation", adjacency=policy.adjacency, sensitivity=1.0,
                              history_len=cfg["history-len"], max_length=cfg["max-length"])
            released = ReleasedReplies(ledger_dir, client_id)
            if ledger.recorded(run_id, server_round, "evaluation") is not None:
                kept = released.load("evaluation", run_id, server_round)
                if kept is not None:  # asked again (a resumed server): the same values, no new spend
                    return SessionResult(metrics=kept[2])
            if ledger.epsilon_after(release) > ledger.budget_epsilon:  # anything else: a new, charged release
                return refusal("privacy-budget")
            exact = np.array(exact_metrics(runtime, data))
            ledger.record(release)
            noisy = add_gaussian_noise(exact, z * SENSITIVITY, SecureStream())
            metrics = {"refused": 0.0, "HR@10": float(noisy[0]), "NDCG@10": float(noisy[1]),
                       "eval-noise-multiplier": z, "epsilon": ledger.epsilon, "delta": ledger.delta}
            released.save("evaluation", run_id, server_round, [], [], metrics)  # kept before it leaves
            return SessionResult(metrics=metrics)
    except LedgerUnavailableError:
        return refusal("ledger-unavailable")
