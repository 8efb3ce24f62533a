"""The ``privacy`` object of a run's ``result.json`` (PROTOCOL.md sections 5 and 6): each unit protected,
with its epsilon, delta, accountant, adjacency and trust model, and what lies outside the guarantee."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.ledger import LedgerUnavailableError, PrivacyLedger
from common.skellam import SkellamPlan, plan_epsilon, share_epsilon
from common.privacy import client_schedule, interaction_group_size, selection_rule, session_sensitivity
from common.run_config import DEFAULTS_CONFIGURATIONS_TRIED
from common.wire import EVALUATE_METRICS, TRAIN_METRICS
from server.central_dp import CentralDP


REPLY_PACING = ("A deployed device holds every reply until the first whole multiple of its policy's "
                "privacy-reply-time-quantum after its app took the request, so the server sees only how many quanta "
                "the work took (a device sets the quantum above its slowest session); simulated devices are not "
                "paced, and there that time is outside the epsilon")


def ledgers_epsilon(folder: Path) -> tuple[float | None, int]:
    """(the largest epsilon recomputed from the readable ledgers in ``folder``, the number that cannot
    be read): the simulated clients' ledgers, which the server can read; (None, 0) when there are
    none (a deployment: the ledgers stay on the devices)."""
    paths = sorted(Path(folder).glob("ledger-*.json")) if Path(folder).is_dir() else []
    values, unreadable = [], 0
    for p in paths:
        try:
            values.append(PrivacyLedger.load(p).recomputed_epsilon())
        except LedgerUnavailableError:
            unreadable += 1
    return (max(values) if values else None), unreadable


def ledgers_user_epsilon(folder: Path) -> float | None:
    """The largest user-level epsilon of the readable simulated ledgers in ``folder`` (None: none hold one)."""
    values = []
    for p in sorted(Path(folder).glob("ledger-*.json")) if Path(folder).is_dir() else []:
        try:
            ledger = PrivacyLedger.load(p)
        except LedgerUnavailableError:
            continue
        if ledger.user_releases:
            values.append(ledger.user_epsilon())
    return max(values) if values else None


def secure_statement(cfg: dict[str, Any], plan: SkellamPlan, releases: dict[str, int],
                     ledger_user_epsilon: float | None = None,
                     reported: dict[str, float] | None = None) -> dict[str, Any]:
    """The user-level guarantee of a secure-aggregation run: epsilon over the most releases any device
    made (the server's count of unmasked shares), or the simulated ledgers' own figure, or what a device
    reported (a device whose node id changed is counted anew by the server), whichever is largest."""
    most = max(releases.values()) if releases else 0
    counted = plan_epsilon(plan, cfg["user-delta"], most) if most else 0.0
    epsilon = max([counted, ledger_user_epsilon or 0.0, *(reported or {}).values()])
    delta = cfg["user-delta"] + plan.clamp_probability() * max(1, most)
    return {"user_epsilon": epsilon, "user_delta": delta,
            "user_accountant": "rdp (Skellam, Agarwal, Kairouz and Liu, NeurIPS 2021)",
            "user_adjacency": ("add-remove of one user's data: that device's update is replaced by zero while its "
                               "participation and its noise share stay (participation is public)"),
            "user_trust": (f"a semi-honest server (it runs Flower's SecAgg+ as written: relays public keys unchanged "
                           f"and sends every device the same dropout lists) and, in every unmasked sum, at least "
                           f"min-survivors={plan.min_survivors} devices that add their noise share and do not reveal "
                           f"it; no coalition of the server with a reconstruction threshold of a device's "
                           f"neighbours (at least a strict majority; secagg-threshold={cfg['secagg-threshold']}); the "
                           f"server aborts a round before unmasking when fewer shares arrive, and so does every "
                           f"device that sees a short list (with secagg-neighbours=0)"),
            "user_epsilon_is": f"composed over the most secure sums one device's share entered ({most})",
            "user_epsilon_share_only": share_epsilon(plan, cfg["user-delta"]) if most else 0.0,
            "user_epsilon_share_only_is": ("one release seen alone with only the device's own noise share: what a "
                                           "server that broke secure aggregation would learn (trust: nobody)"),
            "user_mechanism": {"noise": "symmetric Skellam, each device's share from a ChaCha20 stream keyed from "
                                        "the OS; stochastic rounding from a second one",
                               "delta_includes": f"{plan.clamp_probability():.3g} per release, a bound on the "
                                                 f"chance that a share leaves the integer range and is clamped",
                               **plan.to_json()},
            "secure_aggregation": {"protocol": "Flower SecAgg+ (flwr 1.42 SecAggPlusWorkflow, secaggplus_mod)",
                                   "threshold": cfg["secagg-threshold"], "neighbours": cfg["secagg-neighbours"] or
                                   "all", "known_weakness": ("Flower expands mask seeds folded to 32 bits with "
                                                            "NumPy's MT19937 (docs/secure-aggregation-study.md)")},
            "outside_user_guarantee": ("which devices were sampled, which dropped out and when (rounds.jsonl), and "
                                       "the timing of each device's reply")}


def privacy_statement(cfg: dict[str, Any], client_epsilon: dict[str, float], central: CentralDP | None,
                      ledgers: tuple[float | None, int] = (None, 0),
                      secure: dict[str, Any] | None = None) -> dict[str, Any]:
    """PROTOCOL.md section 6: the unit(s) protected, with delta, accountant, adjacency and trust.

    ``client_epsilon`` is what the devices reported; ``ledgers`` the largest epsilon the simulated
    devices' own ledgers give and how many of them could not be read (:func:`ledgers_epsilon`;
    None in a deployment, where the ledgers stay on the devices). The stated epsilon is the larger of the two, so a device that reports too little
    cannot lower it; in a deployment it is what the devices reported."""
    eps = list(client_epsilon.values())
    reported = max(eps) if eps else 0.0
    ledger_epsilon, unreadable = ledgers
    out: dict[str, Any] = {"unit": "none"}
    if cfg["local-dp"]:
        schedule = client_schedule(cfg)
        source = ("the simulated devices' ledgers, recomputed with the accountant (the largest, or the largest "
                  "reported value if that is larger)" if ledger_epsilon is not None else
                  "what the devices reported with their replies; each device's own ledger is the authority")
        out = {"unit": "example", "epsilon": max(reported, ledger_epsilon or 0.0), "delta": cfg["delta"],
               "accountant": cfg["accountant"], "adjacency": "add-remove", "trust": "none",
               "epsilon_is": "max over clients of the composed per-client epsilon (every DP-SGD session and "
                             "every evaluation release in its ledger)",
               "epsilon_source": source + (f"; {unreadable} ledger(s) could not be read (privrec audit names "
                                           f"them)" if unreadable else ""),
               "epsilon_reported_by_devices": reported,
               "client_epsilon_budget": cfg["client-epsilon-budget"], "noise_multiplier": cfg["noise-multiplier"],
               "max_grad_norm": cfg["max-grad-norm"], "sample_rate": schedule.sample_rate,
               "steps_per_session": schedule.steps, "denominator": schedule.expected_batch_size,
               "selection": selection_rule(cfg["examples-per-user"]),
               "sensitivity": session_sensitivity(cfg["examples-per-user"], "add-remove"),
               "sampling": "poisson per example, from a ChaCha20 stream keyed from the OS",
               "timing": (("every session pads its rows to examples-per-user, each row a history of history-len "
                           "slots (left-padded), and takes the public steps: the tensors entering the model, and "
                           "so its work, have the same shape whatever the device holds; reading the device's files "
                           "and building its rows still take time in proportion to its history (measured: see the "
                           "README). " + REPLY_PACING) if cfg["user-model"] == "sequence" else
                          ("every session pads its rows to examples-per-user and every text to max-length tokens, "
                           "and takes the public steps: the tensors entering the encoder, and so its work, have "
                           "the same shape whatever the device holds; reading the device's files and building "
                           "and tokenizing its example texts still take time in proportion to its history "
                           "(measured: see the README). " + REPLY_PACING)),
               "noise": "Gaussian from a separate ChaCha20 stream, snapped to a power-of-two grid",
               "released_fields": {"train": ["arrays", *(f"metrics.{k}" for k in sorted(TRAIN_METRICS))],
                                   "evaluate": [f"metrics.{k}" for k in sorted(EVALUATE_METRICS)]},
               "ledgers": (f"persistent folder {cfg['ledger-dir']}" if cfg["ledger-dir"] else
                           "per run (simulation: clients/ in the run folder). Each simulated run is a "
                           "separate deployment: budgets do not compose across runs on the same data; set "
                           "ledger-dir to account for repeated runs. Deployed devices keep their ledger in "
                           "their own state-dir."),
               "note": (f"example-level per client; one rating changes up to "
                        f"{interaction_group_size(cfg['history-len'], cfg['examples-per-user'])} accounted examples "
                        f"(its own, and the rewritten histories of later ones), so interaction-level DP "
                        f"follows only by group privacy with that group size"),
               "outside_guarantee": ("a device's owner can erase its own ledger and enrolment record, which "
                                     "starts its spend again at 0; the guarantee is per ledger")}
    if central is not None:
        if out["unit"] == "none":
            out = {"unit": "user", "epsilon": central.epsilon(), "delta": central.delta,
                   "accountant": "rdp", "adjacency": "add-remove", "trust": "the server (aggregator)"}
        out.update({"user_epsilon": central.epsilon(), "user_delta": central.delta,
                    "user_accountant": "rdp", "user_adjacency": "add-remove (one whole client)",
                    "user_trust": "the server (aggregator) adds the noise and keeps who was sampled secret",
                    "user_sampling": (f"poisson, q={central.sample_rate:.4g} = clients-per-round / N, with N the "
                                      f"{central.population} nodes connected at the start (treated as public; "
                                      f"nodes that join later are never sampled and a node that leaves keeps "
                                      f"its place, so each node is included with exactly the accounted q)"),
                    "user_noise_multiplier": central.noise_multiplier, "user_clip": central.clip,
                    "outside_user_guarantee": ("metrics.jsonl and rounds.jsonl (who was sampled, per-round "
                                               "counts of accepted, refused, rejected and failed clients) are "
                                               "the trusted server's own records, not covered by the "
                                               "user-level epsilon: do not publish them")})
    if secure is not None:
        if out["unit"] == "none":
            out = {"unit": "user", "epsilon": secure["user_epsilon"], "delta": secure["user_delta"],
                   "accountant": secure["user_accountant"], "adjacency": secure["user_adjacency"],
                   "trust": secure["user_trust"]}
        out.update(secure)
    if out["unit"] != "none":
        out["tuning"] = (f"the published defaults were chosen on this data's validation split among "
                         f"{DEFAULTS_CONFIGURATIONS_TRIED} configurations, the test split read once per configuration "
                         f"(README, Results); the epsilon covers one run of fixed settings: it is the guarantee of a "
                         f"deployment that uses the published defaults without tuning them on its own population, "
                         f"and choosing settings by runs on the same data is outside it")
    return out
