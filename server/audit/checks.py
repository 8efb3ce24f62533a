"""The consistency checks of the accounting audit: each reads what a :class:`RunAudit` loaded (the run
folder and the ledgers) and says pass, fail or n/a, with the reason and the problems it found.
:data:`CHECKS` is the registry, run in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from common.ledger import ledger_paths
from common.privacy import client_schedule, session_sensitivity
from common.wire import (EVALUATE_METRICS, RECORD_NAMES, REFUSAL_REASONS, SECURE_STAGE_FIELDS, STATUS_FIELDS,
                         TRAIN_METRICS)
from server.central_dp import client_rate

if TYPE_CHECKING:
    from server.audit.accounting import LedgerRecord, RunAudit

REL_TOL = 1e-6


@dataclass
class Check:
    """One consistency check: ``status`` is pass, fail or n/a, with the reason in plain words."""

    name: str
    title: str
    status: str
    reason: str
    problems: list[str] = field(default_factory=list)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))


def _verdict(name: str, title: str, problems: list[str], failed: str, passed: str) -> Check:
    """A check that fails with ``failed`` when there are ``problems``, else passes with ``passed``."""
    return Check(name, title, "fail" if problems else "pass", failed if problems else passed, problems)


def check_server_epsilon(audit: RunAudit) -> Check:
    title = "Each node's ledger holds at least the epsilon the server recorded for it"
    if not audit.local:
        return _na("ledgers_match_server_epsilon", title, "no local DP in this run")
    recorded = audit.server_epsilon
    if not recorded and audit.rounds and any(r.get("trained") or r.get("rejected") for r in audit.rounds):
        return Check("ledgers_match_server_epsilon", title, "fail",
                     "the server received updates but recorded no per-node epsilon (checkpoint/latest.json, "
                     "client-epsilon.json) to compare the ledgers with")
    by_node: dict[int, LedgerRecord] = {}
    for led in audit.ledgers:
        for s in led.sessions:
            if s.run_id == audit.run_id and s.node_id is not None:
                by_node[int(s.node_id)] = led
    bad = []
    for node, eps in sorted(recorded.items()):
        led = by_node.get(int(node))
        if led is None:
            bad.append(f"node {node}: the server recorded epsilon {float(eps):.6g}, but no ledger has a session "
                       f"of this run for that node (under-reported spend)")
        elif led.epsilon is not None and led.epsilon < float(eps) * (1 - REL_TOL):
            bad.append(f"{led.client_id} (node {node}): ledger history gives epsilon {led.epsilon:.6g}, below the "
                       f"{float(eps):.6g} the server recorded from its reply (the ledger under-reports)")
    return _verdict("ledgers_match_server_epsilon", title, bad, f"{len(bad)} ledgers under-report what the "
                    f"server received", f"every one of the {len(recorded)} nodes the server recorded has a "
                    f"ledger at or above that epsilon")


def check_policy(audit: RunAudit) -> Check:
    title = "Every ledger records the device policy, and every session of this run satisfies it"
    if not audit.local:
        return _na("policy_recorded", title, "no local DP in this run")
    bad = []
    for led in audit.ledgers:
        if led.error:
            continue
        p = led.policy
        needed = ("require_local_dp", "min_noise_multiplier", "max_clip", "delta", "epsilon_budget", "adjacency")
        if not all(k in p for k in needed):
            bad.append(f"{led.client_id}: no device policy recorded (missing {[k for k in needed if k not in p]})")
            continue
        if led.budget > float(p["epsilon_budget"]) * (1 + REL_TOL) or not _close(led.delta, float(p["delta"])):
            bad.append(f"{led.client_id}: ledger budget/delta {led.budget:g}/{led.delta:g} exceed the policy's "
                       f"{p['epsilon_budget']}/{p['delta']}")
        for s in led.sessions:
            if s.run_id != audit.run_id:
                continue
            clip_ok = s.kind == "evaluation" or s.max_grad_norm <= float(p["max_clip"]) * (1 + REL_TOL)
            # the policy's floor is on the noise per unit of sensitivity (a training session's / 2)
            per_sensitivity = s.noise_multiplier / (s.accounted_sensitivity if s.kind == "dp-sgd" else 1.0)
            if per_sensitivity < float(p["min_noise_multiplier"]) * (1 - REL_TOL) or not clip_ok \
                    or s.adjacency != p["adjacency"]:
                bad.append(f"{led.client_id} round {s.round}: noise {s.noise_multiplier:g} ({per_sensitivity:g} per "
                           f"unit of sensitivity), clip "
                           f"{s.max_grad_norm:g}, adjacency {s.adjacency} break the recorded policy {p}")
    return _verdict("policy_recorded", title, bad, f"{len(bad)} ledgers lack a policy or break it",
                    f"all {len(audit.ledgers)} ledgers record a device policy that every session of this run meets")


def check_ledger_storage(audit: RunAudit) -> Check:
    title = "Ledgers were written by the locked writer, and where they live is stated"
    if not audit.local:
        return _na("ledger_storage", title, "no local DP in this run")
    bad, notes = [], []
    for led in audit.ledgers:
        _, lock, marker = ledger_paths(led.path.parent, led.client_id or led.path.stem[len("ledger-"):])
        missing = [p.name for p in (lock, marker) if not p.exists()]
        if missing:
            bad.append(f"{led.path.name}: no {' / '.join(missing)} beside it (not written by the locked, "
                       f"enrolling ledger writer)")
    for folder in sorted({led.path.parent for led in audit.ledgers}):
        stray = sorted(p.name for p in folder.glob(".ledger-*.tmp"))
        if stray:
            notes.append(f"{folder}: {len(stray)} temp file(s) left by an interrupted write, e.g. {stray[0]}")
        inside = audit.run_dir.resolve() in folder.resolve().parents or folder.resolve() == audit.run_dir.resolve()
        notes.append(f"{folder}: " + ("inside the run folder: this run is a separate simulated deployment, and "
                                      "its budgets do not compose with other runs on the same data"
                                      if inside else "outside the run folder: budgets persist across runs"))
    reason = (f"{len(bad)} ledgers lack their lock or enrolment file" if bad else
              f"every ledger has its lock and enrolment files; {notes[-1] if notes else ''}")
    return Check("ledger_storage", title, "fail" if bad else "pass", reason, bad + notes)


def check_wire(audit: RunAudit) -> Check:
    title = "The wire log shows only the fields the privacy statement lists"
    path = audit.folder.wire
    if not path.exists():
        return _na("wire_fields", title, "wire-log was off in this run: no record of what devices sent")
    bad = []
    for number, row in enumerate(audit.folder.read_wire(), start=1):
        if "error" in row:
            continue
        where = f"wire.jsonl line {number} (round {row.get('round')}, node {row.get('node')})"
        if "stage" in row:
            bad += _secure_wire_problems(row, where)
            continue
        records = set(row.get("arrays", {})) | set(row.get("metrics", {})) | set(row.get("configs", {}))
        if records - RECORD_NAMES or set(row.get("arrays", {})) - {"arrays"} \
                or set(row.get("configs", {})) - {"status"}:
            bad.append(f"{where}: records {sorted(records)} beyond arrays / metrics / status")
        metrics = row.get("metrics", {}).get("metrics", {})
        extra = sorted(set(metrics) - set(TRAIN_METRICS) - set(EVALUATE_METRICS))
        if extra:
            bad.append(f"{where}: metric fields {extra} are not in the released-field list")
        status = row.get("configs", {}).get("status", {})
        if set(status) - set(STATUS_FIELDS) or ("reason" in status and status["reason"] not in REFUSAL_REASONS):
            bad.append(f"{where}: status {status} is not a fixed refusal code")
    return _verdict("wire_fields", title, bad, f"{len(bad)} replies carried fields outside the list",
                    "every logged reply carried only listed fields")


def _secure_wire_problems(row: dict, where: str) -> list[str]:
    """A SecAgg+ stage's reply against :data:`common.wire.SECURE_STAGE_FIELDS`."""
    allowed = SECURE_STAGE_FIELDS.get(row["stage"])
    if allowed is None:
        return [f"{where}: unknown secure aggregation stage {row['stage']!r}"]
    bad = []
    for kind in ("arrays", "metrics", "configs"):
        for name, fields in row.get(kind, {}).items():
            if name not in allowed:
                bad.append(f"{where}: record {name!r} is not sent in stage {row['stage']}")
            elif kind == "arrays" and fields:
                bad.append(f"{where}: array record {name!r} carried tensors {sorted(fields)[:3]} (must be masked)")
            elif set(fields) - allowed[name]:
                bad.append(f"{where}: {name} fields {sorted(set(fields) - allowed[name])} are not in the list")
    return bad


def _na(name: str, title: str, why: str) -> Check:
    return Check(name, title, "n/a", why)


def check_readable(audit: RunAudit) -> Check:
    title = "Every ledger can be read"
    if not audit.local:
        return _na("ledgers_readable", title, "no local DP in this run: clients keep no ledger")
    if not audit.ledgers:
        return Check("ledgers_readable", title, "fail", "local DP was on but no ledger was found",
                     [f"looked in {audit.run_dir / 'clients'}"])
    bad = [f"{led.path.name}: {led.error}" for led in audit.ledgers if led.error]
    return _verdict("ledgers_readable", title, bad,
                    f"{len(bad)} of {len(audit.ledgers)} ledgers are unreadable",
                    f"all {len(audit.ledgers)} ledgers parse, with valid mechanism fields")


def check_recomputes(audit: RunAudit) -> Check:
    title = "Every ledger's epsilon recomputes from its recorded history"
    if not audit.local:
        return _na("ledger_epsilon_recomputes", title, "no local DP in this run")
    bad = [f"{led.client_id}: stored epsilon {led.stored_epsilon:.6g}, history gives {led.epsilon:.6g}"
           for led in audit.ledgers if led.epsilon is not None and not _close(led.stored_epsilon, led.epsilon)]
    return _verdict("ledger_epsilon_recomputes", title, bad,
                    f"{len(bad)} ledgers state an epsilon their history does not give",
                    "every stored epsilon equals the Opacus accountant on the recorded sessions")


def check_server_rounds(audit: RunAudit) -> Check:
    title = "Ledgers agree with the server's record of who trained or evaluated in which round"
    if not audit.local:
        return _na("ledgers_match_rounds", title, "no local DP in this run")
    if not audit.rounds:
        return Check("ledgers_match_rounds", title, "fail", "rounds.jsonl is missing or empty")
    trained: dict[tuple[int, int], str] = {}
    evaluated: dict[tuple[int, int], str] = {}
    for led in audit.ledgers:
        for s in led.sessions:
            if s.run_id == audit.run_id and s.node_id is not None and s.round is not None:
                (evaluated if s.kind == "evaluation" else trained)[(int(s.round), int(s.node_id))] = led.client_id
    sampled = {(int(r["round"]), int(n)) for r in audit.rounds for n in r.get("sampled", [])}
    asked = {(int(r["round"]), int(n)) for r in audit.rounds for n in r.get("evaluated", [])}
    records_evaluators = all("evaluated" in r for r in audit.rounds)  # older run folders lack the field
    problems = []
    for r in audit.rounds:
        for node in [*r.get("trained", []), *r.get("rejected", [])]:
            if (int(r["round"]), int(node)) not in trained:
                problems.append(f"round {r['round']}: the server received an update from node {node}, "
                                f"but no ledger records a session for that node and round (under-reported spend)")
        for node in r.get("evaluation_released", []):
            if (int(r["round"]), int(node)) not in evaluated:
                problems.append(f"round {r['round']}: the server received an evaluation release from node {node}, "
                                f"but no ledger records it (under-reported spend)")
    resumed = bool(audit.cfg["resume"])
    notes = []
    unexplained = [(k, trained[k], "trained", "sample") for k in sorted(trained) if k not in sampled]
    unexplained += [(k, evaluated[k], "evaluated", "ask to evaluate") for k in sorted(evaluated)
                    if k not in asked and records_evaluators]
    for (rnd, node), client, did, verb in unexplained:
        msg = f"round {rnd}: ledger of {client} records that node {node} {did}, which the server did not {verb}"
        (notes if resumed else problems).append(msg)
    if problems:
        return Check("ledgers_match_rounds", title, "fail",
                     f"{len(problems)} disagreements between ledgers and rounds.jsonl", problems + notes)
    reason = (f"every update the server received in {len(audit.rounds)} rounds has a matching ledger session, "
              f"and every ledger session of this run was asked for")
    if not records_evaluators and evaluated:
        reason += " (this run's rounds.jsonl predates the record of evaluators: evaluation sessions not matched)"
    if notes:
        reason += (f"; {len(notes)} ledger sessions belong to rounds re-run after a resume (spend recorded "
                   f"for an update the server never used: over-reported, which is safe)")
    return Check("ledgers_match_rounds", title, "pass", reason, notes)


def check_caps(audit: RunAudit) -> Check:
    title = "No client exceeded its budget"
    if not audit.local:
        return _na("within_budget", title, "no local DP in this run: no per-client budget applies")
    cap = float(audit.cfg["client-epsilon-budget"])
    bad = [f"{led.client_id}: spent {led.epsilon:.6g} > cap {led.budget:g}" for led in audit.ledgers
           if led.epsilon is not None and led.epsilon > led.budget * (1 + REL_TOL)]
    bad += [f"{led.client_id}: ledger cap {led.budget:g} differs from the configured {cap:g}"
            for led in audit.ledgers if not led.error and not _close(led.budget, cap)]
    return _verdict("within_budget", title, bad,
                    f"{len(bad)} budget violations",
                    f"every client's recomputed epsilon is within the configured cap {cap:g}")


def check_config(audit: RunAudit) -> Check:
    title = "The config's claimed settings match what was recorded"
    if not audit.local and not audit.central_on:
        return _na("config_matches_records", title, "no DP claimed, none recorded")
    want = {"noise_multiplier": float(audit.cfg["noise-multiplier"]), "max_grad_norm": float(audit.cfg["max-grad-norm"]),
            "delta": float(audit.cfg["delta"])}
    schedule = client_schedule(audit.cfg)
    eval_noise = audit.cfg["eval-noise-multiplier"]
    bad = []
    if audit.local:
        for led in audit.ledgers:
            if led.error:
                continue
            if not _close(led.delta, want["delta"]) or led.accountant != audit.cfg["accountant"]:
                bad.append(f"{led.client_id}: ledger delta/accountant {led.delta:g}/{led.accountant} "
                           f"differ from the config's {want['delta']:g}/{audit.cfg['accountant']}")
            for s in led.sessions:
                if s.run_id != audit.run_id:
                    continue
                where = f"{led.client_id} round {s.round} ({s.kind})"
                if s.kind == "evaluation":
                    if eval_noise is None or not _close(s.noise_multiplier, float(eval_noise)) \
                            or s.sample_rate != 1.0 or s.steps != 1:
                        bad.append(f"{where}: noise {s.noise_multiplier:g}, rate {s.sample_rate:g}, steps "
                                   f"{s.steps}; the config's evaluation release is noise {eval_noise}, rate 1, "
                                   f"one step")
                    continue
                for key, value in want.items():
                    if not _close(float(getattr(s, key)), value):
                        bad.append(f"{where}: {key} {getattr(s, key):g}, config says {value:g}")
                need = session_sensitivity(int(audit.cfg["examples-per-user"]), s.adjacency)
                if s.accounted_sensitivity < need:
                    bad.append(f"{where}: accounted at sensitivity {s.accounted_sensitivity:g} x the clip; the "
                               f"session's selection rule needs {need:g} (a removal that shifts its window)")
                if not _close(s.sample_rate, schedule.sample_rate):
                    bad.append(f"{where}: sample rate {s.sample_rate:g}, the public schedule gives "
                               f"{schedule.sample_rate:g}")
                elif s.steps > schedule.steps:
                    bad.append(f"{where}: {s.steps} steps exceed the public schedule's {schedule.steps}")
    if audit.central_on:
        if audit.central is None:
            bad.append("central-dp=true but checkpoint/latest.json holds no central-DP accountant state")
        else:
            pairs = (("noise_multiplier", audit.central.noise_multiplier, audit.cfg["central-noise-multiplier"]),
                     ("clip", audit.central.clip, audit.cfg["central-clip"]),
                     ("delta", audit.central.delta, audit.cfg["central-delta"]))
            bad += [f"central DP {k}: recorded {a:g}, config says {b}" for k, a, b in pairs
                    if b is None or not _close(a, float(b))]
            expected_q = client_rate(int(audit.cfg["clients-per-round"]), audit.central.population)
            if not _close(audit.central.sample_rate, expected_q):
                bad.append(f"central DP sample rate {audit.central.sample_rate:g} is not clients-per-round / "
                           f"population = {expected_q:g}")
    return _verdict("config_matches_records", title, bad,
                    f"{len(bad)} recorded settings differ from the config",
                    "noise, clip, delta, accountant and sampling recorded in every session match config.json")


def check_server_report(audit: RunAudit) -> Check:
    title = "The server's reported example-level epsilon matches the ledgers"
    if not audit.local:
        return _na("server_report_matches_ledgers", title, "no local DP in this run")
    eps = [led.epsilon for led in audit.ledgers if led.epsilon is not None]
    top = max(eps, default=0.0)
    bad = []
    reported = (audit.result or {}).get("privacy", {}).get("epsilon")
    if reported is None:
        bad.append("result.json is missing or states no example-level epsilon")
    elif not _close(float(reported), top):
        word = "under-reports" if float(reported) < top else "differs from"
        bad.append(f"result.json states epsilon {float(reported):.6g}; the ledgers give {top:.6g} ({word} the ledgers)")
    last = [r for r in audit.metrics if r.get("epsilon_max") is not None]
    if last and float(last[-1]["epsilon_max"]) < top * (1 - REL_TOL):
        bad.append(f"metrics.jsonl's last epsilon_max {last[-1]['epsilon_max']:.6g} is below the ledgers' {top:.6g}")
    return _verdict("server_report_matches_ledgers", title, bad,
                    "the server's figures disagree with the ledgers",
                    f"result.json's epsilon {top:.6g} is the largest recomputed ledger epsilon")


def check_secure(audit: RunAudit) -> Check:
    """A secure run: every share the server unmasked is in a ledger, within the user-level budget, and
    result.json states the user-level epsilon the records give."""
    title = "The user-level epsilon of secure aggregation recomputes from the ledgers and the server's count"
    if not audit.secure_on:
        return _na("secure_user_epsilon_recomputes", title, "secure aggregation was off")
    recorded: dict[int, int] = {}
    for led in audit.ledgers:
        for r in led.user_releases:
            if r.run_id == audit.run_id and r.node_id is not None:
                recorded[int(r.node_id)] = recorded.get(int(r.node_id), 0) + 1
    bad = [f"node {node}: the server unmasked {count} of its shares, its ledger records {recorded.get(int(node), 0)} "
           f"(under-reported spend)" for node, count in sorted(audit.server_user_releases.items())
           if recorded.get(int(node), 0) < int(count)]
    budget = float(audit.cfg["user-epsilon-budget"])
    bad += [f"{led.client_id}: user-level epsilon {led.user_epsilon:.6g} > budget {budget:g}"
            for led in audit.ledgers if led.user_epsilon is not None and led.user_epsilon > budget * (1 + REL_TOL)]
    eps = audit.secure_user_epsilon()
    reported = (audit.result or {}).get("privacy", {}).get("user_epsilon")
    if reported is None or not _close(float(reported), eps):
        bad.append(f"result.json user_epsilon {reported}, the ledgers and the server's count give {eps:.6g}")
    return _verdict("secure_user_epsilon_recomputes", title, bad, "user-level records disagree",
                    f"user-level epsilon {eps:.6g}: every unmasked share is in a ledger, every ledger within budget")


def check_central(audit: RunAudit) -> Check:
    title = "The user-level epsilon recomputes from the server's accountant history"
    if not audit.central_on:
        return _na("user_epsilon_recomputes", title, "central DP was off")
    if audit.central is None:
        return Check("user_epsilon_recomputes", title, "fail",
                     "no central-DP accountant state in the checkpoint or central-dp.json")
    eps = audit.central.epsilon()
    bad = []
    last_round = max((r["round"] for r in audit.rounds), default=0)
    notes = []
    if audit.central.rounds < last_round:
        bad.append(f"accountant history composes {audit.central.rounds} rounds; rounds.jsonl has {last_round} "
                   f"(under-reported)")
    elif audit.central.rounds > last_round:
        notes.append(f"the accountant composes {audit.central.rounds} releases for {last_round} rounds: rounds "
                     f"re-run after a crash count twice (over-reported, which is safe)")
    reported = (audit.result or {}).get("privacy", {}).get("user_epsilon")
    if reported is None or not _close(float(reported), eps):
        bad.append(f"result.json user_epsilon {reported}, accountant history gives {eps:.6g}")
    if bad:
        return Check("user_epsilon_recomputes", title, "fail", "user-level figures disagree", bad + notes)
    return Check("user_epsilon_recomputes", title, "pass",
                 f"user-level epsilon {eps:.6g} recomputes over {audit.central.rounds} releases", notes)


CHECKS: list[Callable[[RunAudit], Check]] = [
    check_readable,
    check_recomputes,
    check_server_rounds,
    check_caps,
    check_config,
    check_server_report,
    check_central,
    check_secure,
    check_policy,
    check_ledger_storage,
    check_wire,
    check_server_epsilon,
]
