"""One round of secure aggregation through Flower's SecAgg+ (issue 22): the server gets only the sum.

Flower 1.42's ``SecAggPlusWorkflow`` runs on today's Grid behind a ``LegacyContext`` whose legacy
strategy samples and receives the result. privrec drives it one round at a time
(:func:`run_secure_round`) with a shim strategy that hands it the round's sampled nodes and keeps
what it returns, and a subclass that fixes what the study of its source found
(``docs/secure-aggregation-study.md``):

- every node gets its own copy of the round's content (the global state and config) in the stage
  that trains;
- a node that drops out before its key shares are out (stages 0 and 1) is left out of the round,
  where Flower's workflow would abort the whole round after everyone trained;
- a round whose masked vectors come from fewer than ``min-survivors`` devices is aborted before
  anything is unmasked: the accounted noise needs that many shares.

The devices' shares are integers on Flower's quantisation grid (:mod:`common.skellam`): the
unmasked mean times the survivors is their exact integer sum, checked against an honest bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from flwr.common.logger import log
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.secagg_params import neighbourhood, reconstruction_threshold, share_count
from common.skellam import SkellamPlan, from_flower_mean
from common.wire import REFUSAL_REASONS
from server.validation import printable


@dataclass
class SecureRound:
    """What a secure round gave the server: the integer sum of the survivors' shares, or why none."""

    sampled: list[int]
    survivors: list[int] = field(default_factory=list)  # the nodes whose masked share is in the sum
    total: np.ndarray | None = None  # the unmasked integer sum (None: aborted, nothing released)
    reason: str = ""
    unmasked: bool = False  # the workflow unmasked the sum (the survivors' shares were released to the server)
    metrics: dict[int, dict] = field(default_factory=dict)  # each survivor's public reply metrics
    refused: dict[int, str] = field(default_factory=dict)  # nodes whose error reply carried a refusal code
    malformed: dict[int, str] = field(default_factory=dict)  # nodes whose reply was dropped as unusable
    bytes_down: int = 0  # what the server sent in the round's four stages (content bytes)
    bytes_up: int = 0  # what came back
    wire: list[dict] = field(default_factory=list)  # what the ServerApp received, stage by stage


STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
# How Flower's runtimes report a SecureRefusal: the code itself (in process), "...Message: <code>'>"
# (the simulation engine) or "<class '...SecureRefusal'>:<'<code>'>" (a SuperNode).
_REFUSAL = re.compile(r"(?:^|[\s:<'\"])(" + "|".join(map(re.escape, REFUSAL_REASONS)) + r")['\">\s]*$")


def refusal_code(reason: str) -> str | None:
    """The refusal code a device's error reply ends with, if any."""
    match = _REFUSAL.search(reason.strip())
    return match.group(1) if match else None


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's tensors (their raw size, from the metadata: nothing is decoded) and of the bytes
    and strings in its config records."""
    total = sum(int(np.prod(rec[k].shape, dtype=np.int64)) * np.dtype(rec[k].dtype).itemsize
                for rec in content.array_records.values() for k in rec.keys())
    for rec in content.config_records.values():
        for value in rec.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (bytes, str)):
                    total += len(item)
    return total


class _ObservedGrid:
    """The round's Grid: it counts the bytes each way, keeps what every reply looked like, notes refusal
    codes, and drops a reply that is not what its stage needs (from a node that was not asked, or with
    missing, mistyped or out-of-range fields), as if it never came: one hostile device then only drops
    out, where Flower's workflow would raise on it and stop the run."""

    def __init__(self, grid: Grid, out: "SecureRound", describe: Callable | None, plan: SkellamPlan) -> None:
        self._grid, self._out, self._describe, self._plan, self._calls = grid, out, describe, plan, 0
        self._keys: set[bytes] = set()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        stage = STAGES[min(self._calls, len(STAGES) - 1)]
        self._calls += 1
        self._out.bytes_down += sum(content_bytes(m.content) for m in messages)
        destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages
                       if m.metadata.message_id}
        asked = {int(m.metadata.dst_node_id) for m in messages}
        kept, seen = [], set()
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            node = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            if self._describe is not None:
                self._out.wire.append({"stage": stage, "node": node, **self._describe(reply)})
            if reply.has_error():
                code = refusal_code(str(reply.error.reason))
                if code is not None:
                    self._out.refused[node] = code
                kept.append(reply)
                continue
            problem = "not asked, or a second reply" if node not in asked or node in seen or \
                node != int(reply.metadata.src_node_id) else reply_problem(stage, reply.content, self._plan)
            if not problem and stage == "setup":  # another node's key again would fail every neighbour
                keys = {bytes(reply.content.config_records[RECORD_KEY_CONFIGS][k]) for k in ("pk1", "pk2")}
                problem = "a public key another node already sent" if keys & self._keys else ""
                self._keys |= keys
            seen.add(node)
            if problem:
                log(WARNING, "secure aggregation, stage %s: dropped the reply of node %d (%s)", stage, node, problem)
                self._out.malformed[node] = problem
                continue
            self._out.bytes_up += content_bytes(reply.content)
            kept.append(reply)
        return kept

    def __getattr__(self, name):
        return getattr(self._grid, name)


def reply_problem(stage: str, content: RecordDict, plan: SkellamPlan) -> str:
    """Why a non-error reply cannot be used in ``stage`` ("" when it can)."""
    try:
        if any(len(record) for record in content.array_records.values()):
            return "a tensor in a reply that must carry none (secaggplus_mod clears them)"
        configs = content.config_records[RECORD_KEY_CONFIGS]
        if stage == "setup":  # two distinct, loadable public keys (a bad one would fail every neighbour)
            keys = [configs[k] for k in ("pk1", "pk2")]
            ok = all(isinstance(k, bytes) for k in keys) and keys[0] != keys[1]
            for key in keys if ok else []:
                bytes_to_public_key(key)
        elif stage == "share_keys":
            dsts, ctxts = list(configs["dsts"]), list(configs["ctxts"])
            ok = len(dsts) == len(ctxts) and all(isinstance(d, int) for d in dsts) and \
                all(isinstance(c, bytes) for c in ctxts)
        elif stage == "collect_masked_vectors":
            masked = [bytes_to_ndarray(b) for b in configs["masked_params"]]
            ok = len(masked) == 2 and masked[0].shape == (1,) and masked[1].shape == (plan.dim,) and \
                all(m.dtype == np.int64 and int(m.min()) >= 0 and int(m.max()) < plan.modulus for m in masked)
            ok = ok and content.metric_records["fitres.num_examples"]["num_examples"] == 1
        else:
            nids, shares = list(configs["nids"]), list(configs["shares"])
            ok = len(nids) == len(shares) and len(set(nids)) == len(nids) and \
                all(isinstance(n, int) for n in nids) and all(isinstance(b, bytes) for b in shares)
    except Exception as exc:  # noqa: BLE001 - whatever a hostile reply holds
        return f"unreadable ({type(exc).__name__})"
    return "" if ok else "fields of the wrong type, length, shape or range"


class _RoundStrategy(Strategy):
    """A legacy strategy that samples the given nodes and keeps the aggregate SecAgg+ hands back."""

    def __init__(self, nodes: list[int], grid: Grid, run_id: int) -> None:
        self.nodes, self.grid, self.run_id = nodes, grid, run_id
        self.results: list | None = None

    def initialize_parameters(self, client_manager):  # noqa: D102 - never called by the workflow
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        return [(GridClientProxy(nid, self.grid, self.run_id), FitIns(Parameters([], ""), {})) for nid in self.nodes]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


class PrivrecSecAgg(SecAggPlusWorkflow):
    """Flower's SecAgg+ with privrec's content, early-dropout handling and survivor threshold."""

    def __init__(self, content: Callable[[], RecordDict], min_survivors: int,
                 on_unmask: Callable[[list[int]], None] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._content, self.min_survivors, self._on_unmask = content, min_survivors, on_unmask
        self.survivors: list[int] = []
        self.abort_reason = ""

    def setup_stage(self, grid, context, state) -> bool:  # noqa: D102
        ok = super().setup_stage(grid, context, state)
        if ok:  # one RecordDict per node: the workflow writes each node's ciphertexts into it
            state.nid_to_fitins = {nid: self._content() for nid in state.nid_to_fitins}
        else:
            self.abort_reason = "setup failed (too few nodes answered)"
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D102
        ok = super().share_keys_stage(grid, context, state)
        if ok:  # nodes gone before sharing their keys are not in the round at all
            state.sampled_node_ids = set(state.active_node_ids)
            for nid in list(state.nid_to_neighbours):
                state.nid_to_neighbours[nid] &= state.active_node_ids
        else:
            self.abort_reason = "key sharing failed (too few nodes answered)"
        return ok

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: D102
        ok = super().collect_masked_vectors_stage(grid, context, state)
        if not ok:
            self.abort_reason = "too few masked shares for SecAgg+'s reconstruction threshold"
            return False
        self.survivors = sorted(state.active_node_ids)
        if len(self.survivors) < self.min_survivors:
            self.abort_reason = (f"{len(self.survivors)} masked shares < min-survivors {self.min_survivors}: "
                                 f"aborted before unmasking")
            return False
        if self._on_unmask is not None:  # counted before anyone is asked for the secrets that unmask the sum
            self._on_unmask(self.survivors)
        return True

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: D102
        ok = super().unmask_stage(grid, context, state)
        if not ok:
            self.abort_reason = "unmasking failed (too few shares of a secret)"
        return ok


def run_secure_round(grid: Grid, nodes: list[int], content: Callable[[], RecordDict], plan: SkellamPlan,
                     server_round: int, threshold: float, timeout: float, run_id: int = 0, neighbours: int = 0,
                     describe: Callable | None = None,
                     on_unmask: Callable[[list[int]], None] | None = None) -> SecureRound:
    """Run SecAgg+ over ``nodes`` for one round and return the integer sum of the survivors' shares.

    ``content`` builds the content every node trains on (a fresh RecordDict per call); ``threshold`` is
    SecAgg+'s reconstruction threshold as a share of each neighbourhood (every node is every other's
    neighbour unless ``neighbours`` > 0: then each shares with that many others, SecAgg+'s sparse graph);
    ``describe`` (a reply -> dict function) keeps what every reply looked like in ``wire``."""
    out = SecureRound(sampled=list(nodes))
    if len(nodes) < max(2, plan.min_survivors):
        out.reason = f"{len(nodes)} sampled nodes < min-survivors {plan.min_survivors}"
        return out
    grid = _ObservedGrid(grid, out, describe, plan)
    strategy = _RoundStrategy(nodes, grid, run_id)
    share_num = neighbourhood(len(nodes), neighbours)
    workflow = None
    try:
        workflow = PrivrecSecAgg(content, plan.min_survivors, on_unmask,
                                 num_shares=share_count(len(nodes), neighbours),
                                 reconstruction_threshold=reconstruction_threshold(share_num, threshold, len(nodes)),
                                 max_weight=1.0, clipping_range=plan.clipping_range, quantization_range=plan.levels,
                                 modulus_range=plan.modulus, timeout=timeout)
        context = LegacyContext(Context(run_id, 0, {}, RecordDict(), {}), strategy=strategy)
        context.state.config_records["config"] = ConfigRecord({"current_round": server_round})
        context.state.array_records["parameters"] = ArrayRecord()  # the content carries the state
        workflow(grid, context)
    except Exception as exc:  # noqa: BLE001 - a round that fails in the protocol is aborted, never the run
        # The text may quote what a device sent: printable and bounded, so it can forge no log line.
        log(WARNING, "round %d: secure aggregation failed (%s: %s); nothing released", server_round,
            type(exc).__name__, printable(exc, 300))
        out.survivors = workflow.survivors if workflow is not None else []
        out.unmasked = False
        out.reason = printable(f"the protocol failed ({type(exc).__name__}: {exc})", 300)
        return out
    out.survivors = workflow.survivors
    out.unmasked = strategy.results is not None
    if strategy.results is None:
        out.reason = workflow.abort_reason or "secure aggregation halted"
        log(WARNING, "round %d: secure aggregation aborted: %s; nothing released", server_round, out.reason)
        return out
    if not strategy.results:
        out.reason = "no results"
        return out
    (mean,) = parameters_to_ndarrays(strategy.results[0][1].parameters)
    total = from_flower_mean(mean, len(out.survivors), plan)
    bound = honest_sum_bound(plan, len(out.survivors))
    norm = float(np.linalg.norm(total.astype(np.float64)))
    if total.shape != (plan.dim,) or not math.isfinite(norm) or norm > bound:
        out.reason = f"the unmasked sum (shape {total.shape}, norm {norm:.4g}) exceeds what honest shares give ({bound:.4g})"
        log(WARNING, "round %d: %s; nothing applied", server_round, out.reason)
        return out
    out.total = total
    out.metrics = {int(proxy.node_id): dict(res.metrics) for proxy, res in strategy.results}
    log(INFO, "round %d: secure sum of %d shares (of %d sampled)", server_round, len(out.survivors), len(nodes))
    return out


def honest_sum_bound(plan: SkellamPlan, survivors: int) -> float:
    """An L2 bound (integer units) on the sum of ``survivors`` honest shares: the rounded updates add at
    most ``survivors`` times the L2 sensitivity, and the summed noise (variance v = survivors x the share
    variance per coordinate, sums of Poissons with means in the thousands, Gaussian to within a
    kurtosis excess of 1/v) has squared norm below v (d + 2 sqrt(30 d) + 60) except with probability
    about e^-30 (Laurent and Massart's chi-square bound). A hostile device can add at most the slack."""
    variance = survivors * plan.share_variance
    d = plan.dim
    return survivors * plan.l2_sensitivity + math.sqrt(variance * (d + 2 * math.sqrt(30 * d) + 60))
