"""User-level audit at the federation level with canary clients (Andrew et al., ICLR 2024).

The server code runs unchanged (``server.federation.Federation``) over an in-process grid:
real clients are real MovieLens users running the real ClientApp; canary clients hold no
data and, whenever they are sampled, reply with the global state plus their own fixed
random direction scaled to the central clip norm. Half of the m canary clients join the
population; the other half never exist (the null). After training, each canary is scored
by the cosine between the final model change and its direction.

Two figures come out of the same scores:
- a rigorous lower bound on user-level epsilon with its confidence, from the one-run
  estimator of Steinke, Nasr and Jagielski (:mod:`server.audit.estimator`);
- Andrew et al.'s one-shot *estimate*: the cosines of inserted canaries against those of
  the never-inserted ones, read as a Gaussian-DP shift mu = (mean_in - mean_out) / std_out
  and converted to epsilon at delta. It is an estimate of the privacy a realistic
  adversary sees, not a bound, and depends on the Gaussian fit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from scipy import optimize, special

from common.run_config import resolve
from server.audit.estimator import audit_scores
from server.federation import Federation
from server.validation import expected_mechanism
from simulations.audits.mechanism import reading
from simulations.inprocess_grid import InProcessGrid

CANARY_NODE_BASE = 10_000_001


class CanaryClientGrid(InProcessGrid):
    """Real clients (nodes 101..) plus canary clients that answer with a fixed update."""

    def __init__(self, real_clients: int, run_config: dict, canary_updates: dict[int, np.ndarray]) -> None:
        super().__init__(real_clients, run_config)
        self.canary_updates = canary_updates  # node id -> flat unit direction x clip

    def get_node_ids(self) -> list[int]:
        return [*self.partition, *self.canary_updates]

    def send_and_receive(self, messages, timeout: float):
        real = [m for m in messages if m.metadata.dst_node_id not in self.canary_updates]
        out = list(super().send_and_receive(real, timeout))
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.canary_updates:
                continue
            if msg.metadata.message_type != MessageType.TRAIN:
                out.append(Message(content=RecordDict({"metrics": MetricRecord({"refused": 1.0}), "status": ConfigRecord(
                    {"refused": True, "reason": "client-error"})}), reply_to=msg))
                continue
            record = msg.content["arrays"]
            names = list(record.keys())
            arrays = [record[k].numpy() for k in names]
            update = unflatten(self.canary_updates[node], arrays)
            state = ArrayRecord({k: Array((a + u).astype(a.dtype)) for k, a, u in zip(names, arrays, update)})
            # The metrics an honest client of this run would report (the server validates them).
            metrics = {"refused": 0.0, "epsilon": 0.0, **expected_mechanism(self.run_config)}
            out.append(Message(content=RecordDict({"arrays": state, "metrics": MetricRecord(metrics)}), reply_to=msg))
        return out


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays]).astype(np.float64)


def unflatten(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for a in like:
        out.append(flat[start:start + a.size].reshape(a.shape).astype(a.dtype))
        start += a.size
    return out


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of mu-Gaussian DP (Dong, Roth and Su): the shift of two unit Gaussians.

    Computed in log space (the e^eps factor overflows for large mu); infinite mu gives infinity."""
    if math.isnan(mu):
        raise ValueError("mu is not a number")
    if mu <= 0:
        return 0.0
    if math.isinf(mu) or mu > 1e3:
        return math.inf

    def excess(eps: float) -> float:
        # delta(eps) = e^first - e^second, evaluated without overflow.
        first = float(special.log_ndtr(-eps / mu + mu / 2))
        second = eps + float(special.log_ndtr(-eps / mu - mu / 2))
        if second >= first:
            return -delta
        return float(np.exp(first) * -np.expm1(second - first)) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(optimize.brentq(excess, 0.0, hi))


def one_shot_shift(scores: np.ndarray, included: np.ndarray
                   ) -> tuple[float | None, float | None, float | None, float | None]:
    """Andrew et al.'s one-shot reading of canary scores: (mean in, mean out, std out, mu), with
    mu = (mean in - mean out) / std out; all None when there is no included canary or fewer than two
    excluded ones (no null group to compare against)."""
    if included.sum() < 1 or (~included).sum() < 2:
        return None, None, None, None
    mean_in, mean_out = float(scores[included].mean()), float(scores[~included].mean())
    std_out = float(scores[~included].std(ddof=1))
    return mean_in, mean_out, std_out, (mean_in - mean_out) / std_out if std_out > 0 else math.inf


def run_client_audit(overrides: dict[str, Any] | None = None, out: str | Path = "audits", real_clients: int = 20,
                     canaries: int = 200, confidence: float = 0.95) -> dict[str, Any]:
    """Run a small federation with central DP and canary clients; return the report."""
    if canaries < 2 or real_clients < 0:
        raise ValueError(f"need at least 2 canaries and >= 0 real clients, got {canaries} and {real_clients}")
    t0 = time.perf_counter()
    given = dict(overrides or {})
    secret = np.random.default_rng()
    included = secret.random(canaries) < 0.5
    # Fixed from the *expected* population, before (and independently of) which canaries are in.
    defaults = {"clients-per-round": max(1, round(0.25 * (real_clients + canaries / 2))), "evaluate-clients": 0,
                "eval-every": 10**6, "output-dir": str(Path(out) / "runs"),
                "run-name": f"audit-clients-{time.strftime('%Y%m%d-%H%M%S')}"}
    cfg = resolve({**defaults, **given, "central-dp": True})
    grid = CanaryClientGrid(real_clients, cfg, {})
    fed = Federation(grid, cfg)
    start = flatten(fed.arrays)
    directions = secret.normal(size=(canaries, start.size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    grid.canary_updates = {CANARY_NODE_BASE + i: directions[i] * cfg["central-clip"]
                           for i in np.flatnonzero(included)}
    run_dir = fed.run()
    change = flatten(fed.arrays) - start
    norm = float(np.linalg.norm(change))
    cosines = directions @ change / norm if norm > 0 else np.zeros(canaries)

    bound = audit_scores(cosines, included, fed.central.delta, confidence)
    mean_in, mean_out, std_out, mu = one_shot_shift(cosines, included)
    estimate = None if mu is None else gdp_epsilon(mu, fed.central.delta)
    return {
        "audit": "clients",
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": confidence,
        "accountant_epsilon": fed.central.epsilon(),
        "delta": fed.central.delta,
        "privacy_unit": "user (one client's whole update stream), central DP over rounds",
        "bound_exceeds_accountant": bound.epsilon_lower_bound > fed.central.epsilon(),
        "epsilon_estimate_one_shot": estimate,
        "one_shot": {"method": "Andrew et al. (ICLR 2024), one-shot estimation, Gaussian-DP fit",
                     "mean_cosine_included": mean_in, "mean_cosine_excluded": mean_out,
                     "std_cosine_excluded": std_out, "null_std_expected": 1 / math.sqrt(start.size), "mu": mu,
                     "note": "an estimate for this adversary and these canaries, not a bound"},
        "mechanism_claimed": {"noise_multiplier": fed.central.noise_multiplier, "clip": fed.central.clip,
                              "sample_rate": fed.central.sample_rate, "rounds": fed.central.rounds,
                              "population": fed.central.population, "accountant": "rdp",
                              "sampling": "poisson over clients", "strategy": cfg["strategy"]},
        "population": {"real_clients": real_clients, "canary_clients": int(included.sum()),
                       "local_dp": cfg["local-dp"]},
        "canaries": {"kind": "clients replying global + clip x a fixed random unit direction; score = cosine "
                             "with the final model change", "count": canaries, "included": int(included.sum()),
                     "dimension": int(start.size)},
        "estimator": {"method": "Steinke, Nasr and Jagielski (NeurIPS 2023), one run, Theorem 5.2 with delta",
                      **bound.to_json()},
        "run_dir": str(run_dir),
        "reading": reading(bound.largest_reachable, canaries, confidence),
        "seconds": round(time.perf_counter() - t0, 2),
    }
