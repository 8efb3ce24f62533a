"""One secure-aggregation session (issue 22): train, clip the whole update, add a Skellam share.

The device trains on its rows padded to the public cap (example-level DP-SGD as well when the run
keeps ``local-dp``), takes the difference to the global state it received, and releases it through
the distributed Skellam mechanism (:mod:`common.skellam`): clipped to ``user-clip``, on the integer
grid, with ``1 / min-survivors`` of the accounted noise. The share then goes to Flower's
``secaggplus_mod``, which masks it: the server only ever unmasks the sum of a round's survivors.

Before the share may leave, the user-level release (and the DP-SGD session, if any) is recorded
in the device's ledger, under its lock, against the device's user-level budget.

A share is never sent twice. A plain round may answer a repeated request with the bytes it released
before (:mod:`client.released`), but a share replayed into a second secure sum lets the server
subtract two sums of mostly the same shares and isolate one device's share with only its own part
of the noise. A repeated request is a new release, trained, noised and charged afresh; the share is
still kept on the device (``released/``) as its record of what it sent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from client.released import ReleasedReplies
from client.session import SessionResult, refusal, train_config, train_locally
from common.device_policy import DevicePolicy
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session, UserRelease, user_epsilon
from common.privacy import client_schedule, session_sensitivity
from common.runtimes import Runtime
from common.secure_random import SecureStream
from common.sequence_runtime import ClientSequences
from common.skellam import SkellamNoise, encode_update, secure_plan, to_flower_grid

SHARE_NAME = "secure-share"  # the one tensor of a share: the flat update on Flower's quantisation grid


def flat_update(new: list[np.ndarray], old: list[np.ndarray]) -> np.ndarray:
    """The session's update as one float64 vector in the exchange order."""
    return np.concatenate([(n.astype(np.float64) - o.astype(np.float64)).ravel() for n, o in zip(new, old)])


def run_secure_session(runtime: Runtime, data: ClientSequences, cfg: dict[str, Any], ledger_dir: str | Path,
                       client_id: str, run_id: str, server_round: int, node_id: int | None,
                       policy: DevicePolicy, noise: SkellamNoise | None = None) -> SessionResult:
    """Train on the loaded global state and return this device's share (one flat tensor), or a refusal."""
    if policy.violations(cfg):
        return refusal("privacy-policy")
    names, received = runtime.state()
    plan = secure_plan(cfg, sum(int(a.size) for a in received))
    released = ReleasedReplies(ledger_dir, client_id)
    try:
        with PrivacyLedger.session(ledger_dir, client_id, min(cfg["client-epsilon-budget"], policy.epsilon_budget),
                                   policy.delta, cfg["accountant"], policy.to_json()) as ledger:
            release = UserRelease(plan.dim, plan.clip, plan.noise_multiplier, plan.min_survivors, plan.max_devices,
                                  run_id=run_id, round=server_round, node_id=node_id, history_len=cfg["history-len"])
            if ledger.accountant != cfg["accountant"] or \
                    policy.lengthens_unit(cfg, ledger.recorded_history_lens()) or \
                    (ledger.user_delta is not None and ledger.user_delta != cfg["user-delta"]):
                # another accountant, a longer unit than recorded, or another user delta than recorded
                return refusal("privacy-policy")
            budget = min(cfg["user-epsilon-budget"], policy.user_epsilon_budget)
            if user_epsilon([*ledger.user_releases, release], cfg["user-delta"]) > budget:
                return refusal("privacy-budget")
            if ledger.uncovered_sessions() or (cfg["local-dp"] and ledger.uncovered_user_releases()):
                # plain runs released its data outside any user-level release (no user-level epsilon can state
                # what the device has given away), or, for a round with local DP, secure rounds without it released
                # the data outside the example-level epsilon this round would report (common.ledger)
                return refusal("privacy-budget")
            session, steps, sensitivity = _example_level_session(ledger, cfg, policy, run_id, server_round, node_id)
            if cfg["local-dp"] and session is None:
                return refusal("privacy-budget")

            def record() -> None:  # before the first step: whatever happens next can only over-report
                ledger.record_user_release(release, cfg["user-delta"], session)  # one write, the pair tokened

            train_locally(runtime, data, cfg, steps=steps, sensitivity=sensitivity, on_start=record)
            _, trained = runtime.state()
            share = encode_update(flat_update(trained, received), plan, SecureStream(), noise or SkellamNoise())
            arrays = [to_flower_grid(share, plan)]
            metrics = {"refused": 0.0, "user-epsilon": ledger.user_epsilon(),
                       **({"epsilon": ledger.epsilon} if session is not None else {})}
            released.save("secure", run_id, server_round, [SHARE_NAME], arrays, metrics)  # the device's own record
            return SessionResult(names=[SHARE_NAME], arrays=arrays, metrics=metrics)
    except LedgerUnavailableError:
        return refusal("ledger-unavailable")


def _example_level_session(ledger: PrivacyLedger, cfg: dict[str, Any], policy: DevicePolicy, run_id: str,
                           server_round: int, node_id: int | None) -> tuple[Session | None, int | None, float]:
    """Under ``local-dp`` the DP-SGD session this share is trained with, its steps and sensitivity
    (None when the example-level budget cannot take the whole session: a secure session never
    truncates, its shape is public); without it (None, None, 1.0)."""
    if not cfg["local-dp"]:
        return None, None, 1.0
    schedule = client_schedule(cfg)
    tcfg = train_config(cfg, seed=cfg["seed"])
    planned = Session(tcfg.noise_multiplier, schedule.sample_rate, schedule.steps, tcfg.max_grad_norm, ledger.delta,
                      run_id=run_id, round=server_round, node_id=node_id, kind="dp-sgd", adjacency=policy.adjacency,
                      sensitivity=session_sensitivity(cfg["examples-per-user"], policy.adjacency),
                      history_len=cfg["history-len"], max_length=cfg["max-length"])
    if ledger.max_steps_within_budget(planned) < planned.steps:
        return None, None, 1.0
    session = replace(planned)
    return session, session.steps, session.accounted_sensitivity
