"""Evaluation of the global state: server-side on the full PROTOCOL split (validation and test), and
the mean of the clients' noisy federated-evaluation releases.

In simulation the server holds the public benchmark split for measurement only; it never sends it
to clients, and clients never send it anything outside :mod:`common.wire`.
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Message
from flwr.common.logger import log

from common.evaluation import eval_texts, evaluate_scores, user_scores
from common.reference_scores import reference_metrics
from common.runtimes import Runtime
from common.sequence import evaluation_rows, sequence_scores
from common.sequence_runtime import SequenceRuntime
from common.split import Split
from common.wire import EVALUATE_RECORD_NAMES
from server.validation import printable, validate_metrics


class ServerEvaluator:
    """Full-ranking PROTOCOL metrics for every user with targets, inputs (features or rows) built once."""

    def __init__(self, runtime: Runtime, split: Split) -> None:
        self.runtime, self.split = runtime, split
        self.users = split.eval_users()
        hl = runtime.settings.history_len
        if isinstance(runtime, SequenceRuntime):
            self._features = {w: evaluation_rows(split, w, hl, self.users) for w in ("validation", "test")}
        else:
            self._features = {w: runtime.features(eval_texts(split, w, hl, self.users))
                              for w in ("validation", "test")}

    def evaluate(self, names: list[str], arrays: list[np.ndarray]) -> dict[str, dict[str, float]]:
        """Metrics per split for the given global state."""
        return {w: evaluate_scores(self.scores(names, arrays, w), self.split, w, self.users) for w in self._features}

    def references(self) -> dict[str, float]:
        """Test NDCG@10 and HR@10 of the training-free references for the same users, keyed ``ref_*``:
        popularity, and for the sequence model (whose runtime holds the zero-shot item text vectors) the
        text heuristic and the text prior alone. The text model's runs get popularity only: encoding the
        catalogue once more would cost seconds per run."""
        vectors = torch.from_numpy(self.runtime.item_vectors) if isinstance(self.runtime, SequenceRuntime) else None
        return reference_metrics(self.split, vectors, self.users)

    def scores(self, names: list[str], arrays: list[np.ndarray], which: str) -> np.ndarray:
        """[users x items] scores of the given global state for the ``which`` split's inputs."""
        self.runtime.load_state(names, arrays)
        if isinstance(self.runtime, SequenceRuntime):
            return sequence_scores(self.runtime.model, self._features[which])
        return user_scores(self.runtime.model, self._features[which])


def federated_evaluation(replies: Iterable[Message], sent: list[Message],
                         cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[int, float]]:
    """(metrics row, node -> reported epsilon) from the replies to ``sent`` evaluation messages: the median
    of the validated noisy (HR@10, NDCG@10) releases (see :mod:`client.evaluation`) and its noise std;
    refusals and invalid replies are counted, never used; failed, unsolicited and second replies are
    ignored.

    A release outside the range an honest one can take (:func:`server.validation.evaluation_release_range`)
    is rejected; within it, one device can move the median of m releases by at most one order
    statistic, about s * sqrt(pi/2) / m for noise std s (a mean would move by up to the range / m)."""
    chosen = {int(m.metadata.dst_node_id) for m in sent}
    destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
    rows, refused, rejected = [], 0, 0
    answered: set[int] = set()
    epsilons: dict[int, float] = {}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        if reply.has_error() or node not in chosen or node in answered:
            continue
        answered.add(node)
        try:
            extra = set(reply.content.keys()) - EVALUATE_RECORD_NAMES
            if extra:
                rejected += 1
                log(WARNING, "evaluation reply of node %d rejected: unexpected record(s) %s", node,
                    printable(sorted(extra)[:5]))
                continue
            if "status" in reply.content.config_records:
                refused += 1
                continue
            metrics = dict(reply.content["metrics"])
        except Exception:  # noqa: BLE001 - a malformed reply is rejected, never raised
            rejected += 1
            continue
        verdict = validate_metrics("evaluate", metrics, cfg)
        if not verdict.accepted:
            rejected += 1
            log(WARNING, "evaluation reply of node %d rejected: %s", node, printable(verdict.reason))
            continue
        if "epsilon" in metrics:
            epsilons[node] = float(metrics["epsilon"])
        rows.append(metrics)
    out: dict[str, Any] = {"federated_clients": len(rows), "federated_refused": refused,
                           "federated_rejected": rejected}
    if rows:
        out["federated_HR@10"] = float(np.median([r["HR@10"] for r in rows]))
        out["federated_NDCG@10"] = float(np.median([r["NDCG@10"] for r in rows]))
        # The median of m releases with Gaussian noise of std s has std about s * sqrt(pi / (2m)).
        out["federated_noise_std_of_median"] = cfg["eval-noise-multiplier"] * math.sqrt(2.0) * math.sqrt(
            math.pi / (2 * len(rows)))
    return out, epsilons
