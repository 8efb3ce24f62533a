"""User-level audit of the secure path (issue 22): canary devices inside a SecAgg+ sum with Skellam noise.

The product's server (``server.federation.Federation`` with Flower's SecAgg+ workflow) and ClientApp
(``secaggplus_mod`` under privrec's checks, the ledger, ``encode_update``'s clip, rounding and Skellam
share) run unchanged over an in-process grid (:class:`SecureInProcessGrid`). Real devices are
MovieLens users 0..R-1 and train as usual. Canary devices are users R..R+m-1 whose training is
replaced: a canary that is *in* sets its session update to its own secret random direction at the
user clip; one that is *out* keeps the global state (a zero update: its data removed). Everything
after training is the device's real code, noise share included.

Every device takes part whether its canary is in or out, so the round has the same shape either way
(who replies, how much, when) and the sum always holds all R + m noise shares: ``min-survivors`` is
set to R + m, so the sum carries exactly the noise the accountant models, no more. The neighbouring
datasets are the canary's update against a zero update from the same device, which the accountant
covers (one device's rounded update has L2 norm at most Delta_2 either way).

One round, each device once, so each canary's accountant epsilon is one release's. The server's
strategy is FedAvg: the model change is then the released sum over the fixed ``clients-per-round``,
and the score of canary i is the cosine between the change and its direction, a post-processing of
what the server sees (another strategy is still post-processing, but ``mu_expected`` then no longer
describes the scores). Two figures come out, as in :mod:`simulations.audits.canary_clients`: the
one-run lower bound (Steinke, Nasr and Jagielski) and Andrew et al.'s one-shot Gaussian estimate,
beside the shift the accounted noise predicts.

Both the bound and the accountant are taken at ``audit_delta`` (default 1e-6, below the product's
``user-delta`` 1e-4): the RDP accountant gives epsilon at any delta, and the 2 m delta term of the
estimator caps what m canaries can show at delta 1e-4 below the epsilon of any useful noise level.

With ``dropouts`` D > 0, D more real devices (the users after the canaries, fixed before the canary
draw) are sampled and drop out after key sharing, before their masked share: the sum then holds
exactly ``min-survivors`` = R + m shares of a round of R + m + D, the case the accountant's
minimum is for, and its noise must still be the accounted one.

What the audit cannot see: the attacker here holds the unmasked sum, so it tests the devices' clip,
rounding and noise and the server's decoding, not the masking (shares sent unmasked would give the
same sum).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import client.secure_session as secure_session
from common.partition import dataset_from_source
from common.run_config import resolve
from common.skellam import plan_epsilon, secure_plan
from server.audit.estimator import audit_scores
from server.federation import Federation
from simulations.audits.canary_clients import flatten, gdp_epsilon, one_shot_shift, unflatten
from simulations.audits.mechanism import reading
from simulations.inprocess_grid import SecureInProcessGrid

BROKEN = ("none", "noise-off")
AUDIT_DELTA = 1e-6


class _NoNoise:
    """The broken setup: a device that adds no Skellam share (its accountant still claims the noise)."""

    def draw(self, variance: float, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)


@contextmanager
def canary_devices(grid: SecureInProcessGrid, updates: dict[int, np.ndarray], broken: str) -> Iterator[None]:
    """While active, the devices in ``updates`` (node -> flat update in exchange order) train by setting
    their state to the received one plus their update; every other device trains as usual. With
    ``broken='noise-off'`` no device adds noise."""
    real_train, real_noise = secure_session.train_locally, secure_session.SkellamNoise

    def train(runtime, data, cfg, steps, sensitivity, on_start):
        node = grid.current_node
        if node not in updates:
            return real_train(runtime, data, cfg, steps=steps, sensitivity=sensitivity, on_start=on_start)
        if on_start is not None:
            on_start()  # the ledger records the release first, as for any device
        names, state = runtime.state()
        moved = [(a.astype(np.float64) + u).astype(a.dtype) for a, u in zip(state, unflatten(updates[node], state))]
        runtime.load_state(names, moved)
        return None

    secure_session.train_locally = train
    if broken == "noise-off":
        secure_session.SkellamNoise = _NoNoise
    try:
        yield
    finally:
        secure_session.train_locally, secure_session.SkellamNoise = real_train, real_noise


def run_secure_client_audit(overrides: dict[str, Any] | None = None, out: str | Path = "audits",
                            real_clients: int = 20, canaries: int = 200, confidence: float = 0.95,
                            broken: str = "none", included: np.ndarray | None = None,
                            audit_delta: float = AUDIT_DELTA, dropouts: int = 0) -> dict[str, Any]:
    """Run one secure round with R real devices and m canary devices; return the report.

    ``included`` (tests) fixes which canaries are in; by default each is in with probability 1/2 from
    a generator seeded by the OS, drawn before anything else is known. Raises RuntimeError when the
    round did not release a sum of every device's share (nothing to audit)."""
    if broken not in BROKEN:
        raise ValueError(f"broken must be one of {BROKEN}, got {broken!r}")
    if canaries < 2 or real_clients < 0 or real_clients + canaries < 3:
        raise ValueError(f"need at least 2 canaries, >= 0 real clients and 3 devices in all (a secure sum's "
                         f"minimum), got {canaries} and {real_clients}")
    if dropouts < 0:
        raise ValueError(f"dropouts must be >= 0, got {dropouts}")
    if not 0 < audit_delta < 1:
        raise ValueError(f"audit_delta must be in (0, 1), got {audit_delta}")
    t0 = time.perf_counter()
    secret = np.random.default_rng()
    included = secret.random(canaries) < 0.5 if included is None else np.asarray(included, dtype=bool)
    if included.shape != (canaries,):
        raise ValueError(f"included has shape {included.shape}, expected ({canaries},)")
    devices = real_clients + canaries  # the shares the sum must hold
    defaults = {"secure-aggregation": True, "local-dp": False, "num-server-rounds": 1, "strategy": "fedavg",
                "secagg-neighbours": min(devices + dropouts - 1, 20), "eval-every": 10**6,
                "output-dir": str(Path(out) / "runs"),
                "run-name": f"audit-secure-clients-{time.strftime('%Y%m%d-%H%M%S')}"}
    # Every device in one round, and the sum must hold all of the survivors' shares (the accounted noise
    # exactly); the droppers' places are public and fixed before the canaries are drawn.
    fixed = {"secure-aggregation": True, "clients-per-round": devices + dropouts, "min-survivors": devices,
             "num-server-rounds": 1}
    cfg = resolve({**defaults, **dict(overrides or {}), **fixed})
    available = dataset_from_source(cfg["dataset"]).num_users
    if devices + dropouts > available:
        raise ValueError(f"{real_clients} real clients + {canaries} canaries + {dropouts} dropouts need "
                         f"{devices + dropouts} users (one per device), the dataset {cfg['dataset']!r} has {available}")
    droppers = {101 + devices + i: "collect_masked_vectors" for i in range(dropouts)}
    grid = SecureInProcessGrid(devices + dropouts, cfg, drop_at=droppers)
    users = grid.partition  # node -> MovieLens user: R real, then the m canaries, then the droppers
    fed = Federation(grid, cfg)
    start = flatten(fed.arrays)
    plan = secure_plan(cfg, start.size)
    directions = secret.normal(size=(canaries, start.size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    canary_nodes = sorted(users, key=users.get)[real_clients:devices]
    updates = {node: directions[i] * plan.clip if included[i] else np.zeros(start.size)
               for i, node in enumerate(canary_nodes)}
    with canary_devices(grid, updates, broken):
        run_dir = fed.run()
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    secure_round = next((r for r in rows if r["round"] == 1), {})
    if not secure_round.get("aggregated") or secure_round.get("clients_accepted") != devices:
        raise RuntimeError(f"the audited round released no sum of all {devices} devices' shares "
                           f"({secure_round or 'no round record'}); see {run_dir}")
    change = flatten(fed.arrays) - start
    norm = float(np.linalg.norm(change))
    if norm == 0:
        raise RuntimeError(f"the audited round left the model unchanged; see {run_dir}")
    cosines = directions @ change / norm

    # The accountant at the audit's delta; the bound at that delta plus the clamp bound, the
    # mechanism's whole delta (as the privacy statement adds it to user-delta).
    delta = audit_delta + plan.clamp_probability()
    accountant = plan_epsilon(plan, audit_delta)
    bound = audit_scores(cosines, included, delta, confidence)
    # The shift the accounted noise predicts along a unit direction, in grid units: the canary's norm
    # C / gamma against the sum's noise z * Delta_2 (all min-survivors shares present).
    mu_expected = (plan.clip / plan.gamma) / (plan.noise_multiplier * plan.l2_sensitivity)
    mean_in, mean_out, std_out, mu = one_shot_shift(cosines, included)
    estimate = None if mu is None else gdp_epsilon(mu, delta)
    return {
        "audit": "secure-clients",
        "broken": broken,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": confidence,
        "accountant_epsilon": accountant,
        "delta": delta,
        "product_user_delta": cfg["user-delta"],
        "accountant_epsilon_at_user_delta": plan_epsilon(plan, cfg["user-delta"]),
        "privacy_unit": "user (one device's whole session update in one secure sum), distributed Skellam noise",
        "trust": f"a semi-honest server and all {devices} devices of the sum honest (the audit's min-survivors)",
        "bound_exceeds_accountant": bound.epsilon_lower_bound > accountant,
        "epsilon_estimate_one_shot": estimate,
        "one_shot": {"method": "Andrew et al. (ICLR 2024), one-shot estimation, Gaussian-DP fit",
                     "mean_cosine_included": mean_in, "mean_cosine_excluded": mean_out,
                     "std_cosine_excluded": std_out, "mu": mu, "mu_expected": mu_expected,
                     "epsilon_of_mu_expected": gdp_epsilon(mu_expected, delta),
                     "note": "an estimate for this adversary and these canaries, not a bound; mu_expected is the "
                             "shift the accounted noise gives a canary at the clip (Gaussian approximation)"},
        "mechanism_claimed": {"mechanism": "distributed Skellam on a SecAgg+ sum", "noise_multiplier":
                              plan.noise_multiplier, "clip": plan.clip, "gamma": plan.gamma,
                              "l2_sensitivity_grid": plan.l2_sensitivity, "min_survivors": plan.min_survivors,
                              "releases_per_device": 1, "strategy": cfg["strategy"],
                              "secagg_neighbours": cfg["secagg-neighbours"]},
        "population": {"real_clients": real_clients, "canary_devices": canaries, "dropped_mid_round": dropouts,
                       "local_dp": cfg["local-dp"]},
        "canaries": {"kind": "devices whose session update is clip x a secret random unit direction (in) or zero "
                             "(out), then the device's own clip, rounding, noise share and masking; score = cosine "
                             "with the model change (FedAvg: the released sum)",
                     "count": canaries, "included": int(included.sum()), "dimension": int(start.size),
                     "neighbouring": "the canary's update replaced by zero; the device's participation and "
                                     "noise share stay (every device replies either way)"},
        "scores": [float(c) for c in cosines],
        "included": [bool(i) for i in included],
        "estimator": {"method": "Steinke, Nasr and Jagielski (NeurIPS 2023), one run, Theorem 5.2 with delta",
                      **bound.to_json()},
        "run_dir": str(run_dir),
        "round": {k: secure_round.get(k) for k in ("clients_sampled", "clients_accepted", "aggregated",
                                                     "secure_round_seconds", "sum_norm", "noise_norm_expected")},
        "reading": reading(bound.largest_reachable, canaries, confidence),
        "seconds": round(time.perf_counter() - t0, 2),
    }
