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

import math
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataFormatError
from common.ledger import LedgerUnavailableError, PrivacyLedger, Session, UserRelease, share_only_epsilon
from common.skellam import plan_epsilon, secure_plan
from common.privacy import interaction_group_size
from server.audit.checks import CHECKS, Check
from server.central_dp import CentralDP
from server.resume import restored_releases, restored_spend
from server.run_folder import RunFolder

NO_DP_STATEMENT = ("This run used no differential privacy: neither local DP-SGD on the clients nor central DP "
                   "on the server. The released model carries no formal privacy guarantee for any unit "
                   "(example, interaction or user), and no epsilon applies.")


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
    user_releases: list[UserRelease] = field(default_factory=list)
    user_delta: float | None = None
    user_epsilon: float | None = None  # recomputed from user_releases (None: none recorded)


def read_ledger(path: Path) -> LedgerRecord:
    """Parse a ledger without trusting it: problems are kept in ``error``, never raised."""
    rec = LedgerRecord(path=path)
    try:
        ledger = PrivacyLedger.load(path)
        rec.client_id, rec.budget, rec.delta = ledger.client_id, ledger.budget_epsilon, ledger.delta
        rec.accountant, rec.stored_epsilon, rec.sessions = ledger.accountant, ledger.stored_epsilon, ledger.sessions
        rec.policy = ledger.policy
        rec.user_releases, rec.user_delta = ledger.user_releases, ledger.user_delta
        rec.user_epsilon = ledger.user_epsilon() if ledger.user_releases else None
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


GROUP_WHY = ("removing one rating removes the example it is the target of (with a most-recent window, one older "
             "example comes in: a removal and an addition, which the 2C accounting of every session covers as one "
             "example) and changes the history of up to {h} later examples (each a replacement, also one "
             "accounted example at 2C): datasets at most {k} accounted examples apart")


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one unit gives (k eps, k e^((k-1) eps) delta) for a group of k units."""
    return k * epsilon, k * math.exp(min(700.0, (k - 1) * epsilon)) * delta


class RunAudit:
    """Reads a run folder and its ledgers; :meth:`report` builds the audit.json content."""

    def __init__(self, run_dir: str | Path, ledger_dirs: list[str | Path] | None = None) -> None:
        self.folder = RunFolder(run_dir, create=False)
        self.run_dir = self.folder.root
        if not self.folder.config.exists():
            raise DataFormatError(self.folder.config, "missing: is this a privrec run folder?")
        self.cfg = self.folder.read_config()
        self.run_id = str(self.cfg.get("run-id", self.run_dir.name))
        self.rounds = self.folder.read_rounds()
        self.metrics = self.folder.read_metrics()
        self.result = self.folder.read_result()
        self.checkpoint = self.folder.read_checkpoint_meta()
        dirs = [Path(d) for d in (ledger_dirs or [self.folder.clients])]
        self.ledgers = [read_ledger(p) for d in dirs for p in sorted(d.glob("ledger-*.json"))]
        self.local = bool(self.cfg["local-dp"])
        self.central_on = bool(self.cfg["central-dp"])
        self.central = self._central() if self.central_on else None
        self.secure_on = bool(self.cfg.get("secure-aggregation", False))
        # the larger of the checkpoint's and the file's count of each node's unmasked shares (server.resume)
        self.server_user_releases = restored_releases(self.folder, self.checkpoint)
        self.reported_user_epsilon = self.folder.read_node_numbers(self.folder.user_spend)
        # what the server recorded of each node's spend: the larger of the checkpoint's and the record
        # written as each round's replies were judged (it can be a round ahead after a crash)
        self.server_epsilon = restored_spend(self.folder, self.checkpoint)

    def _central(self) -> CentralDP | None:
        """The server's user-level accountant: the record with the most rounds (``central-dp.json`` is
        written before each release is used, so it can be a round ahead of the checkpoint)."""
        records = [(self.checkpoint or {}).get("central_dp"), self.folder.read_central_dp()]
        accountants = []
        for record, path in zip(records, (self.folder.checkpoints / "latest.json", self.folder.central_dp)):
            if record:
                try:
                    accountants.append(CentralDP.from_json(record))
                except (KeyError, TypeError, ValueError) as exc:
                    raise DataFormatError(path, f"not a central-DP accountant ({exc})") from None
        return max(accountants, key=lambda c: c.rounds) if accountants else None

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
            "dp": {"local": self.local, "central": self.central_on, "secure_aggregation": self.secure_on},
            "statement": self.statement(),
            "units": self.units(),
            "versions": {**self.cfg.get("versions", {}), "audited_with": {
                p: version(p) for p in ("opacus", "numpy")}},
            "budget": self.budget() if self.local else None,
            "checks": [asdict(c) for c in checks],
            "all_checks_passed": all(c.status != "fail" for c in checks),
        }
        return out

    def secure_user_epsilon(self) -> float:
        """User-level epsilon of a secure run: over the most unmasked sums one device's share entered (the
        server's count), or the largest a readable ledger composes, whichever is larger."""
        most = max(self.server_user_releases.values(), default=0)
        plan = secure_plan(self.cfg, self._secure_dim())
        counted = plan_epsilon(plan, float(self.cfg["user-delta"]), most) if most and plan else 0.0
        ledgers = [led.user_epsilon for led in self.ledgers if led.user_epsilon is not None]
        return max([counted, *ledgers, *map(float, self.reported_user_epsilon.values())])

    def _secure_dim(self) -> int:
        dims = {r.dim for led in self.ledgers for r in led.user_releases if r.run_id == self.run_id}
        if dims:
            return max(dims)
        plan = (self.result or {}).get("privacy", {}).get("user_mechanism", {})
        return int(plan.get("dim", 1))

    def statement(self) -> str:
        if not self.local and not self.central_on and not self.secure_on:
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
        if self.secure_on:
            parts.append(f"Whole users are protected by distributed DP on a secure sum (Flower SecAgg+, Skellam "
                         f"noise shares from the devices): user-level (epsilon <= {self.secure_user_epsilon():.3f}, "
                         f"delta = {float(self.cfg['user-delta']):g} plus the clamp bound in result.json), trusting "
                         f"a semi-honest server and at least min-survivors={self.cfg['min-survivors']} honest "
                         f"devices in every unmasked sum.")
        elif self.central is not None:
            parts.append(f"Whole users are protected by central DP on the server's aggregate: user-level "
                         f"(epsilon = {self.central.epsilon():.3f}, delta = {self.central.delta:g}) for the "
                         f"released global model after {self.central.rounds} rounds.")
        elif self.central_on:
            parts.append("Central DP was configured, but no accountant state was found in the checkpoint: no "
                         "user-level guarantee can be stated.")
        else:
            parts.append("No user-level guarantee: without central DP, a whole user's contribution is not bounded.")
        if int(self.cfg["evaluate-clients"]) > 0:
            parts.append("Federated evaluation replies (each evaluated client's HR@10 and NDCG@10 on its own "
                         "held-out item) are Gaussian DP releases recorded in the client's ledger, so the "
                         "epsilons above include them.")
        return " ".join(parts)

    def units(self) -> list[dict[str, Any]]:
        if not self.local and not self.central_on and not self.secure_on:
            return []
        units: list[dict[str, Any]] = []
        if self.local:
            eps = [led.epsilon for led in self.ledgers if led.epsilon is not None]
            mech = sorted({(s.noise_multiplier, s.sample_rate, s.max_grad_norm) for led in self.ledgers
                           for s in led.sessions})
            units.append({
                "unit": "example", "scope": "per client (each client's own examples; composed over its sessions)",
                "epsilon": _summary(eps), "delta": self.cfg["delta"], "accountant": self.cfg["accountant"],
                "mechanism": {"name": "DP-SGD (Opacus), Poisson sampling, flat per-example clipping, Gaussian noise",
                              "noise_multiplier": self.cfg["noise-multiplier"], "max_grad_norm": self.cfg["max-grad-norm"],
                              "sessions_recorded": sum(len(led.sessions) for led in self.ledgers),
                              "distinct_mechanisms": [{"noise_multiplier": z, "sample_rate": q, "max_grad_norm": c}
                                                      for z, q, c in mech]},
            })
            # the longest history any counted session used (a ledger kept across runs may hold longer
            # ones than this run's; sessions that did not record it count at this run's)
            lengths = sorted({int(self.cfg["history-len"])} | {s.history_len for led in self.ledgers
                                                                for s in led.sessions if s.history_len is not None})
            history = lengths[-1]
            # a ledger kept across runs may compose sessions whose examples were defined by different histories
            units[-1]["mechanism"]["history_lengths"] = lengths
            k = interaction_group_size(history, int(self.cfg["examples-per-user"]))
            top = max(eps, default=0.0)
            g_eps, g_delta = group_privacy(top, self.cfg["delta"], k)
            units.append({
                "unit": "interaction", "scope": "per client (one rating)", "exact": False,
                "bound": "group privacy", "group_size": k,
                "why": GROUP_WHY.format(h=history, k=k),
                "epsilon": g_eps, "delta": g_delta, "from_example_epsilon": top,
                "meaningful": g_delta < 1.0,
                "note": ("(k eps, k e^((k-1) eps) delta) from the largest example-level epsilon; "
                         + ("the delta is at least 1, so this bound says nothing: no interaction-level guarantee "
                            "can be claimed for this run" if g_delta >= 1.0 else "valid but loose")),
            })
        if self.secure_on:
            releases = [r for led in self.ledgers for r in led.user_releases]
            share_only = [share_only_epsilon(led.user_releases, led.user_delta) for led in self.ledgers
                          if led.user_releases and led.user_delta is not None]
            units.append({
                "unit": "user", "scope": "the released global model (all rounds)",
                "epsilon": self.secure_user_epsilon(), "delta": float(self.cfg["user-delta"]),
                "accountant": "rdp (Skellam, Agarwal, Kairouz and Liu 2021)",
                "trust": (f"a semi-honest server and at least min-survivors={self.cfg['min-survivors']} honest devices "
                          f"in every unmasked sum"),
                "trust_nobody_epsilon": _summary(share_only),
                "mechanism": {"name": "distributed Skellam on a SecAgg+ sum: each device clips its whole update and "
                                      "adds 1/min-survivors of the noise",
                              "user_noise_multiplier": self.cfg["user-noise-multiplier"],
                              "user_clip": self.cfg["user-clip"], "min_survivors": self.cfg["min-survivors"],
                              "releases_recorded": len(releases),
                              "most_releases_per_device": max(self.server_user_releases.values(), default=0)},
            })
        elif self.central is not None:
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
                "cap": None if led.error else led.budget, "spent": spent,
                "remaining": None if spent is None or led.error else max(0.0, led.budget - spent),
                "sessions": len(led.sessions),
                "sessions_this_run": sum(1 for s in led.sessions if s.run_id == self.run_id),
                "refusals_this_run": refusals.get(led.client_id, 0), "readable": not led.error,
            })
        spent = [c["spent"] for c in clients if c["spent"] is not None]
        return {"cap": self.cfg["client-epsilon-budget"], "policy": self.cfg["budget-policy"],
                "clients_with_ledger": len(clients), "refusals_total": sum(len(r.get("refused", [])) for r in self.rounds),
                "refusals_unattributed": unattributed,
                "spent": _summary(spent), "clients": clients}

    # -- consistency ------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        return [check(self) for check in CHECKS]


def write_audit(run_dir: str | Path, ledger_dirs: list[str | Path] | None = None) -> tuple[Path, Path, dict]:
    """Write ``RUN_DIR/audit.json`` and ``RUN_DIR/audit.html`` (atomically); returns both paths and the report."""
    from common.io import write_json_atomic, write_text_atomic
    from server.audit.html_report import render_html

    try:
        audit = RunAudit(run_dir, ledger_dirs)
        report = audit.report()
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as exc:
        raise DataFormatError(run_dir, f"malformed run records ({type(exc).__name__}: {exc}); expected the files "
                                       f"a privrec run writes") from None
    json_path = write_json_atomic(audit.run_dir / "audit.json", report, strict=True)
    html_path = write_text_atomic(audit.run_dir / "audit.html", render_html(report, audit.metrics))
    return json_path, html_path, report
