"""The accounting audit of one run: what guarantee the released model carries, for which unit,
what every client spent, and whether the records agree with each other.

Inputs are only the files a run leaves behind: ``config.json``, ``rounds.jsonl`` (who was
sampled, trained, refused, rejected or failed in each round), ``metrics.jsonl``,
``result.json``, ``checkpoint/latest.json`` (the central-DP accountant state) and the client
ledgers (``clients/ledger-*.json`` in simulation; collected from devices in deployment).
Every epsilon in the report is recomputed from recorded mechanism histories with Opacus'
accountants; stored figures are only compared against those recomputations.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataFormatError
from common.results import read_jsonl
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session, ledger_paths
from common.privacy import client_schedule, interaction_group_size
from common.wire import EVALUATE_METRICS, RECORD_NAMES, REFUSAL_REASONS, STATUS_FIELDS, TRAIN_METRICS
from server.central_dp import CentralDP

REL_TOL = 1e-6
NO_DP_STATEMENT = ("This run used no differential privacy: neither local DP-SGD on the clients nor central DP "
                   "on the server. The released model carries no formal privacy guarantee for any unit "
                   "(example, interaction or user), and no epsilon applies.")


@dataclass
class Check:
    """One consistency check: ``status`` is pass, fail or n/a, with the reason in plain words."""

    name: str
    title: str
    status: str
    reason: str
    problems: list[str] = field(default_factory=list)


@dataclass
class LedgerRecord:
    """One client ledger as stored, plus its recomputed epsilon (None when unreadable)."""

    path: Path
    client_id: str = ""
    budget: float = math.nan
    delta: float = math.nan
    accountant: str = ""
    stored_epsilon: float = math.nan
    sessions: list[Session] = field(default_factory=list)
    epsilon: float | None = None
    error: str = ""
    policy: dict[str, Any] = field(default_factory=dict)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.exists():
        if required:
            raise DataFormatError(path, "missing: is this a privrec run folder?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataFormatError(path, f"not valid JSON ({exc})") from None


def read_ledger(path: Path) -> LedgerRecord:
    """Parse a ledger without trusting it: problems are kept in ``error``, never raised."""
    rec = LedgerRecord(path=path)
    try:
        ledger = PrivacyLedger.load(path)
        rec.client_id, rec.budget, rec.delta = ledger.client_id, ledger.budget_epsilon, ledger.delta
        rec.accountant, rec.stored_epsilon, rec.sessions = ledger.accountant, ledger.epsilon, ledger.sessions
        rec.policy = ledger.policy
        rec.epsilon = ledger.recomputed_epsilon()
        if not math.isfinite(rec.epsilon):
            raise ValueError(f"the recorded history composes to epsilon {rec.epsilon}")
    except (LedgerUnavailableError, ValueError, ArithmeticError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


def _summary(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"clients": 0}
    counts, edges = np.histogram(values, bins=min(10, max(1, len(set(values)))))
    return {"clients": len(values), "min": float(np.min(values)), "median": float(np.median(values)),
            "max": float(np.max(values)),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


GROUP_WHY = ("removing one rating removes the example it is the target of, rewrites the history text of up to "
             "{h} later examples (each a removal plus an addition) and, when examples-per-user keeps only the "
             "most recent targets, lets one older example in: datasets at most {k} examples apart")


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one unit gives (k eps, k e^((k-1) eps) delta) for a group of k units."""
    return k * epsilon, k * math.exp(min(700.0, (k - 1) * epsilon)) * delta


def _verdict(name: str, title: str, problems: list[str], failed: str, passed: str) -> Check:
    """A check that fails with ``failed`` when there are ``problems``, else passes with ``passed``."""
    return Check(name, title, "fail" if problems else "pass", failed if problems else passed, problems)


class RunAudit:
    """Reads a run folder and its ledgers; :meth:`report` builds the audit.json content."""

    def __init__(self, run_dir: str | Path, ledger_dirs: list[str | Path] | None = None) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise DataFormatError(self.run_dir, "not a folder")
        self.cfg = _read_json(self.run_dir / "config.json")
        for key in ("local-dp", "central-dp", "delta", "noise-multiplier", "max-grad-norm", "client-epsilon-budget"):
            if key not in self.cfg:
                raise DataFormatError(self.run_dir / "config.json", f"missing field {key!r}")
        self.run_id = str(self.cfg.get("run-id", self.run_dir.name))
        self.rounds = read_jsonl(self.run_dir / "rounds.jsonl")
        for number, row in enumerate(self.rounds, start=1):
            ids = [row.get(k, []) for k in ("sampled", "trained", "refused", "rejected", "failed")]
            if not isinstance(row.get("round"), int) or not all(
                    isinstance(x, list) and all(isinstance(n, int) for n in x) for x in ids):
                raise DataFormatError(self.run_dir / "rounds.jsonl", "line {}: expected an integer 'round' and "
                                      "lists of integer node ids".format(number))
        self.metrics = read_jsonl(self.run_dir / "metrics.jsonl")
        self.result = _read_json(self.run_dir / "result.json", required=False)
        self.checkpoint = _read_json(self.run_dir / "checkpoint" / "latest.json", required=False)
        dirs = [Path(d) for d in (ledger_dirs or [self.run_dir / "clients"])]
        self.ledgers = [read_ledger(p) for d in dirs for p in sorted(d.glob("ledger-*.json"))]
        self.local = bool(self.cfg["local-dp"])
        self.central_on = bool(self.cfg["central-dp"])
        self.central = CentralDP.from_json(self.checkpoint["central_dp"]) \
            if self.central_on and self.checkpoint and self.checkpoint.get("central_dp") else None

    # -- who trained -------------------------------------------------------------------------
    def _node_to_client(self) -> dict[int, str]:
        out = {}
        for led in self.ledgers:
            for s in led.sessions:
                if s.node_id is not None and s.run_id == self.run_id:
                    out[int(s.node_id)] = led.client_id
        return out

    def _refusals(self) -> tuple[dict[str, int], int]:
        owner = self._node_to_client()
        per_client: dict[str, int] = {}
        unattributed = 0
        for row in self.rounds:
            for node in row.get("refused", []):
                if int(node) in owner:
                    per_client[owner[int(node)]] = per_client.get(owner[int(node)], 0) + 1
                else:
                    unattributed += 1
        return per_client, unattributed

    # -- the report --------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        checks = self.checks()
        out: dict[str, Any] = {
            "run_id": self.run_id, "run_dir": str(self.run_dir.resolve()),
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rounds_completed": max((r["round"] for r in self.rounds), default=0),
            "dp": {"local": self.local, "central": self.central_on},
            "statement": self.statement(),
            "units": self.units(),
            "versions": {**self.cfg.get("versions", {}), "audited_with": {
                p: version(p) for p in ("opacus", "numpy")}},
            "budget": self.budget() if self.local else None,
            "checks": [asdict(c) for c in checks],
            "all_checks_passed": all(c.status != "fail" for c in checks),
        }
        return out

    def statement(self) -> str:
        if not self.local and not self.central_on:
            return NO_DP_STATEMENT
        parts = []
        if self.local and not any(led.epsilon is not None for led in self.ledgers):
            parts.append("Local DP-SGD was configured, but no readable client ledger was found, so no "
                         "example-level spend can be stated; see the checks below.")
        elif self.local:
            eps = [led.epsilon for led in self.ledgers if led.epsilon is not None]
            top = max(eps, default=0.0)
            parts.append(f"Each client's own training examples are protected by local DP-SGD: example-level "
                         f"(epsilon <= {top:.3f}, delta = {self.cfg['delta']:g}) per client, composed over every "
                         f"session in its ledger (largest over {len(eps)} clients with a ledger).")
            unreadable = sum(1 for led in self.ledgers if led.error)
            if unreadable:
                parts.append(f"This bound covers only the {len(eps)} readable ledgers: {unreadable} more could not "
                             f"be read, and their clients' spend is unknown.")
        if self.central is not None:
            parts.append(f"Whole users are protected by central DP on the server's aggregate: user-level "
                         f"(epsilon = {self.central.epsilon():.3f}, delta = {self.central.delta:g}) for the "
                         f"released global model after {self.central.rounds} rounds.")
        elif self.central_on:
            parts.append("Central DP was configured, but no accountant state was found in the checkpoint: no "
                         "user-level guarantee can be stated.")
        else:
            parts.append("No user-level guarantee: without central DP, a whole user's contribution is not bounded.")
        if int(self.cfg.get("evaluate-clients", 0)) > 0:
            parts.append("Federated evaluation replies (each evaluated client's HR@10 and NDCG@10 on its own "
                         "held-out item) are Gaussian DP releases recorded in the client's ledger, so the "
                         "epsilons above include them.")
        return " ".join(parts)

    def units(self) -> list[dict[str, Any]]:
        if not self.local and not self.central_on:
            return []
        units: list[dict[str, Any]] = []
        if self.local:
            eps = [led.epsilon for led in self.ledgers if led.epsilon is not None]
            mech = sorted({(s.noise_multiplier, s.sample_rate, s.max_grad_norm) for led in self.ledgers
                           for s in led.sessions})
            units.append({
                "unit": "example", "scope": "per client (each client's own examples; composed over its sessions)",
                "epsilon": _summary(eps), "delta": self.cfg["delta"], "accountant": self.cfg.get("accountant", "rdp"),
                "mechanism": {"name": "DP-SGD (Opacus), Poisson sampling, flat per-example clipping, Gaussian noise",
                              "noise_multiplier": self.cfg["noise-multiplier"], "max_grad_norm": self.cfg["max-grad-norm"],
                              "sessions_recorded": sum(len(led.sessions) for led in self.ledgers),
                              "distinct_mechanisms": [{"noise_multiplier": z, "sample_rate": q, "max_grad_norm": c}
                                                      for z, q, c in mech]},
            })
            k = interaction_group_size(int(self.cfg.get("history-len", 5)), int(self.cfg.get("examples-per-user", 0)))
            top = max(eps, default=0.0)
            g_eps, g_delta = group_privacy(top, self.cfg["delta"], k)
            units.append({
                "unit": "interaction", "scope": "per client (one rating)", "exact": False,
                "bound": "group privacy", "group_size": k,
                "why": GROUP_WHY.format(h=int(self.cfg.get("history-len", 5)), k=k),
                "epsilon": g_eps, "delta": g_delta, "from_example_epsilon": top,
                "meaningful": g_delta < 1.0,
                "note": ("(k eps, k e^((k-1) eps) delta) from the largest example-level epsilon; "
                         + ("the delta is at least 1, so this bound says nothing: no interaction-level guarantee "
                            "can be claimed for this run" if g_delta >= 1.0 else "valid but loose")),
            })
        if self.central is not None:
            units.append({
                "unit": "user", "scope": "the released global model (all rounds)",
                "epsilon": self.central.epsilon(), "delta": self.central.delta, "accountant": "rdp",
                "mechanism": {"name": "DP-FedAvg: clip each client update, Gaussian noise on the sum, fixed denominator",
                              "noise_multiplier": self.central.noise_multiplier, "clip": self.central.clip,
                              "sample_rate": self.central.sample_rate, "rounds": self.central.rounds,
                              "population": self.central.population,
                              "sampling": "Poisson over clients (each client independently with rate q)"},
            })
        else:
            units.append({"unit": "user", "covered": False,
                          "why": "central DP was off: nothing bounds a whole user's influence on the model"})
        return units

    def budget(self) -> dict[str, Any]:
        refusals, unattributed = self._refusals()
        clients = []
        for led in self.ledgers:
            spent = led.epsilon
            clients.append({
                "client_id": led.client_id or led.path.name, "ledger": led.path.name,
                "cap": led.budget, "spent": spent, "remaining": None if spent is None else max(0.0, led.budget - spent),
                "sessions": len(led.sessions),
                "sessions_this_run": sum(1 for s in led.sessions if s.run_id == self.run_id),
                "refusals_this_run": refusals.get(led.client_id, 0), "readable": not led.error,
            })
        spent = [c["spent"] for c in clients if c["spent"] is not None]
        return {"cap": self.cfg["client-epsilon-budget"], "policy": self.cfg.get("budget-policy"),
                "clients_with_ledger": len(clients), "refusals_total": sum(len(r.get("refused", [])) for r in self.rounds),
                "refusals_unattributed": unattributed,
                "spent": _summary(spent), "clients": clients}

    # -- consistency ------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        return [self._check_readable(), self._check_recomputes(), self._check_server_rounds(),
                self._check_caps(), self._check_config(), self._check_server_report(), self._check_central(),
                self._check_policy(), self._check_ledger_storage(), self._check_wire(), self._check_server_epsilon()]

    def _check_server_epsilon(self) -> Check:
        title = "Each node's ledger holds at least the epsilon the server recorded for it"
        if not self.local:
            return self._na("ledgers_match_server_epsilon", title, "no local DP in this run")
        recorded = (self.checkpoint or {}).get("client_epsilon")
        if not isinstance(recorded, dict):
            return Check("ledgers_match_server_epsilon", title, "fail",
                         "checkpoint/latest.json holds no per-node epsilon to compare the ledgers with")
        by_node: dict[int, LedgerRecord] = {}
        for led in self.ledgers:
            for s in led.sessions:
                if s.run_id == self.run_id and s.node_id is not None:
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

    def _check_policy(self) -> Check:
        title = "Every ledger records the device policy, and every session of this run satisfies it"
        if not self.local:
            return self._na("policy_recorded", title, "no local DP in this run")
        bad = []
        for led in self.ledgers:
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
                if s.run_id != self.run_id:
                    continue
                clip_ok = s.kind == "evaluation" or s.max_grad_norm <= float(p["max_clip"]) * (1 + REL_TOL)
                if s.noise_multiplier < float(p["min_noise_multiplier"]) * (1 - REL_TOL) or not clip_ok \
                        or s.adjacency != p["adjacency"]:
                    bad.append(f"{led.client_id} round {s.round}: noise {s.noise_multiplier:g}, clip "
                               f"{s.max_grad_norm:g}, adjacency {s.adjacency} break the recorded policy {p}")
        return _verdict("policy_recorded", title, bad, f"{len(bad)} ledgers lack a policy or break it",
                        f"all {len(self.ledgers)} ledgers record a device policy that every session of this run meets")

    def _check_ledger_storage(self) -> Check:
        title = "Ledgers were written by the locked writer, and where they live is stated"
        if not self.local:
            return self._na("ledger_storage", title, "no local DP in this run")
        bad, notes = [], []
        for led in self.ledgers:
            _, lock, marker = ledger_paths(led.path.parent, led.client_id or led.path.stem[len("ledger-"):])
            missing = [p.name for p in (lock, marker) if not p.exists()]
            if missing:
                bad.append(f"{led.path.name}: no {' / '.join(missing)} beside it (not written by the locked, "
                           f"enrolling ledger writer)")
        for folder in sorted({led.path.parent for led in self.ledgers}):
            stray = sorted(p.name for p in folder.glob(".ledger-*.tmp"))
            if stray:
                notes.append(f"{folder}: {len(stray)} temp file(s) left by an interrupted write, e.g. {stray[0]}")
            inside = self.run_dir.resolve() in folder.resolve().parents or folder.resolve() == self.run_dir.resolve()
            notes.append(f"{folder}: " + ("inside the run folder: this run is a separate simulated deployment, and "
                                          "its budgets do not compose with other runs on the same data"
                                          if inside else "outside the run folder: budgets persist across runs"))
        reason = (f"{len(bad)} ledgers lack their lock or enrolment file" if bad else
                  f"every ledger has its lock and enrolment files; {notes[-1] if notes else ''}")
        return Check("ledger_storage", title, "fail" if bad else "pass", reason, bad + notes)

    def _check_wire(self) -> Check:
        title = "The wire log shows only the fields the privacy statement lists"
        path = self.run_dir / "wire.jsonl"
        if not path.exists():
            return self._na("wire_fields", title, "wire-log was off in this run: no record of what devices sent")
        bad = []
        for number, row in enumerate(read_jsonl(path), start=1):
            if "error" in row:
                continue
            where = f"wire.jsonl line {number} (round {row.get('round')}, node {row.get('node')})"
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

    def _na(self, name: str, title: str, why: str) -> Check:
        return Check(name, title, "n/a", why)

    def _check_readable(self) -> Check:
        title = "Every ledger can be read"
        if not self.local:
            return self._na("ledgers_readable", title, "no local DP in this run: clients keep no ledger")
        if not self.ledgers:
            return Check("ledgers_readable", title, "fail", "local DP was on but no ledger was found",
                         [f"looked in {self.run_dir / 'clients'}"])
        bad = [f"{led.path.name}: {led.error}" for led in self.ledgers if led.error]
        return _verdict("ledgers_readable", title, bad,
                        f"{len(bad)} of {len(self.ledgers)} ledgers are unreadable",
                        f"all {len(self.ledgers)} ledgers parse, with valid mechanism fields")

    def _check_recomputes(self) -> Check:
        title = "Every ledger's epsilon recomputes from its recorded history"
        if not self.local:
            return self._na("ledger_epsilon_recomputes", title, "no local DP in this run")
        bad = [f"{led.client_id}: stored epsilon {led.stored_epsilon:.6g}, history gives {led.epsilon:.6g}"
               for led in self.ledgers if led.epsilon is not None and not _close(led.stored_epsilon, led.epsilon)]
        return _verdict("ledger_epsilon_recomputes", title, bad,
                        f"{len(bad)} ledgers state an epsilon their history does not give",
                        "every stored epsilon equals the Opacus accountant on the recorded sessions")

    def _check_server_rounds(self) -> Check:
        title = "Ledgers agree with the server's record of who trained in which round"
        if not self.local:
            return self._na("ledgers_match_rounds", title, "no local DP in this run")
        if not self.rounds:
            return Check("ledgers_match_rounds", title, "fail", "rounds.jsonl is missing or empty")
        recorded: dict[tuple[int, int], str] = {}
        for led in self.ledgers:
            for s in led.sessions:
                if s.run_id == self.run_id and s.node_id is not None and s.round is not None:
                    recorded[(int(s.round), int(s.node_id))] = led.client_id
        sampled = {(int(r["round"]), int(n)) for r in self.rounds for n in r.get("sampled", [])}
        problems = []
        for r in self.rounds:
            for node in [*r.get("trained", []), *r.get("rejected", [])]:
                if (int(r["round"]), int(node)) not in recorded:
                    problems.append(f"round {r['round']}: the server received an update from node {node}, "
                                    f"but no ledger records a session for that node and round (under-reported spend)")
        resumed = bool(self.cfg.get("resume"))
        extra = sorted(k for k in recorded if k not in sampled)
        notes = []
        for rnd, node in extra:
            msg = f"round {rnd}: ledger of {recorded[(rnd, node)]} records a session as node {node}, which the server did not sample"
            (notes if resumed else problems).append(msg)
        if problems:
            return Check("ledgers_match_rounds", title, "fail",
                         f"{len(problems)} disagreements between ledgers and rounds.jsonl", problems + notes)
        reason = f"every update the server received in {len(self.rounds)} rounds has a matching ledger session"
        if notes:
            reason += (f"; {len(notes)} ledger sessions belong to rounds re-run after a resume (spend recorded "
                       f"for an update the server never used: over-reported, which is safe)")
        return Check("ledgers_match_rounds", title, "pass", reason, notes)

    def _check_caps(self) -> Check:
        title = "No client exceeded its budget"
        if not self.local:
            return self._na("within_budget", title, "no local DP in this run: no per-client budget applies")
        cap = float(self.cfg["client-epsilon-budget"])
        bad = [f"{led.client_id}: spent {led.epsilon:.6g} > cap {led.budget:g}" for led in self.ledgers
               if led.epsilon is not None and led.epsilon > led.budget * (1 + REL_TOL)]
        bad += [f"{led.client_id}: ledger cap {led.budget:g} differs from the configured {cap:g}"
                for led in self.ledgers if not led.error and not _close(led.budget, cap)]
        return _verdict("within_budget", title, bad,
                        f"{len(bad)} budget violations",
                        f"every client's recomputed epsilon is within the configured cap {cap:g}")

    def _check_config(self) -> Check:
        title = "The config's claimed settings match what was recorded"
        if not self.local and not self.central_on:
            return self._na("config_matches_records", title, "no DP claimed, none recorded")
        want = {"noise_multiplier": float(self.cfg["noise-multiplier"]), "max_grad_norm": float(self.cfg["max-grad-norm"]),
                "delta": float(self.cfg["delta"])}
        schedule = client_schedule({"examples-per-user": int(self.cfg.get("examples-per-user", 0)),
                                     "batch-size": int(self.cfg.get("batch-size", 1)),
                                     "local-epochs": float(self.cfg.get("local-epochs", 1.0))})
        eval_noise = self.cfg.get("eval-noise-multiplier")
        bad = []
        if self.local:
            for led in self.ledgers:
                if led.error:
                    continue
                if not _close(led.delta, want["delta"]) or led.accountant != self.cfg.get("accountant", "rdp"):
                    bad.append(f"{led.client_id}: ledger delta/accountant {led.delta:g}/{led.accountant} "
                               f"differ from the config's {want['delta']:g}/{self.cfg.get('accountant', 'rdp')}")
                for s in led.sessions:
                    if s.run_id != self.run_id:
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
                    if not _close(s.sample_rate, schedule.sample_rate):
                        bad.append(f"{where}: sample rate {s.sample_rate:g}, the public schedule gives "
                                   f"{schedule.sample_rate:g}")
                    elif s.steps > schedule.steps:
                        bad.append(f"{where}: {s.steps} steps exceed the public schedule's {schedule.steps}")
        if self.central_on:
            if self.central is None:
                bad.append("central-dp=true but checkpoint/latest.json holds no central-DP accountant state")
            else:
                pairs = (("noise_multiplier", self.central.noise_multiplier, self.cfg.get("central-noise-multiplier")),
                         ("clip", self.central.clip, self.cfg.get("central-clip")),
                         ("delta", self.central.delta, self.cfg.get("central-delta")))
                bad += [f"central DP {k}: recorded {a:g}, config says {b}" for k, a, b in pairs
                        if b is None or not _close(a, float(b))]
                expected_q = min(1.0, float(self.cfg["clients-per-round"]) / self.central.population)
                if not _close(self.central.sample_rate, expected_q):
                    bad.append(f"central DP sample rate {self.central.sample_rate:g} is not clients-per-round / "
                               f"population = {expected_q:g}")
        return _verdict("config_matches_records", title, bad,
                        f"{len(bad)} recorded settings differ from the config",
                        "noise, clip, delta, accountant and sampling recorded in every session match config.json")

    def _check_server_report(self) -> Check:
        title = "The server's reported example-level epsilon matches the ledgers"
        if not self.local:
            return self._na("server_report_matches_ledgers", title, "no local DP in this run")
        eps = [led.epsilon for led in self.ledgers if led.epsilon is not None]
        top = max(eps, default=0.0)
        bad = []
        reported = (self.result or {}).get("privacy", {}).get("epsilon")
        if reported is None:
            bad.append("result.json is missing or states no example-level epsilon")
        elif not _close(float(reported), top):
            word = "under-reports" if float(reported) < top else "differs from"
            bad.append(f"result.json states epsilon {float(reported):.6g}; the ledgers give {top:.6g} ({word} the ledgers)")
        last = [r for r in self.metrics if r.get("epsilon_max") is not None]
        if last and float(last[-1]["epsilon_max"]) < top * (1 - REL_TOL):
            bad.append(f"metrics.jsonl's last epsilon_max {last[-1]['epsilon_max']:.6g} is below the ledgers' {top:.6g}")
        return _verdict("server_report_matches_ledgers", title, bad,
                        "the server's figures disagree with the ledgers",
                        f"result.json's epsilon {top:.6g} is the largest recomputed ledger epsilon")

    def _check_central(self) -> Check:
        title = "The user-level epsilon recomputes from the server's accountant history"
        if not self.central_on:
            return self._na("user_epsilon_recomputes", title, "central DP was off")
        if self.central is None:
            return Check("user_epsilon_recomputes", title, "fail", "no central-DP accountant state in the checkpoint")
        eps = self.central.epsilon()
        bad = []
        last_round = max((r["round"] for r in self.rounds), default=0)
        if self.central.rounds != last_round:
            bad.append(f"accountant history composes {self.central.rounds} rounds; rounds.jsonl has {last_round}")
        reported = (self.result or {}).get("privacy", {}).get("user_epsilon")
        if reported is None or not _close(float(reported), eps):
            bad.append(f"result.json user_epsilon {reported}, accountant history gives {eps:.6g}")
        return _verdict("user_epsilon_recomputes", title, bad,
                        "user-level figures disagree",
                        f"user-level epsilon {eps:.6g} recomputes over {self.central.rounds} rounds")


def write_audit(run_dir: str | Path, ledger_dirs: list[str | Path] | None = None) -> tuple[Path, Path, dict]:
    """Write ``RUN_DIR/audit.json`` and ``RUN_DIR/audit.html`` (atomically); returns both paths and the report."""
    from common.results import write_json_atomic, write_text_atomic
    from server.audit.html_report import render_html

    try:
        audit = RunAudit(run_dir, ledger_dirs)
        report = audit.report()
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DataFormatError(run_dir, f"malformed run records ({type(exc).__name__}: {exc}); expected the files "
                                       f"a privrec run writes") from None
    json_path = write_json_atomic(audit.run_dir / "audit.json", report)
    html_path = write_text_atomic(audit.run_dir / "audit.html", render_html(report, audit.metrics))
    return json_path, html_path, report
