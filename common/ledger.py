"""A client's persistent privacy ledger: every DP training session, and the composed epsilon.

One JSON file per client. The spend of a session is written (atomically: temp file,
fsync, rename) *before* the session's update may leave the device, so a crash can
only over-report, never under-report. The cumulative epsilon is always recomputed
from the recorded mechanism history with an Opacus accountant, never summed by hand.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant

from common.errors import DataFormatError

LEDGER_VERSION = 1


@dataclass(frozen=True)
class Session:
    """The mechanism of one DP-SGD session on this client (sampled Gaussian, composed over steps)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    run_id: str = ""
    round: int | None = None
    node_id: int | None = None  # the Flower node that trained (matches the server's round records)
    recorded_at: float = 0.0


def composed_epsilon(sessions: list[Session], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of every session (0 when there are none)."""
    history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in sessions if s.steps > 0]
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """What one client has spent, under which mechanism, against which budget."""

    path: Path
    client_id: str
    budget_epsilon: float
    delta: float
    accountant: str = "rdp"
    sessions: list[Session] = field(default_factory=list)
    epsilon: float = 0.0  # cached composed epsilon, rewritten with every record

    @classmethod
    def open(cls, path: str | Path, client_id: str, budget_epsilon: float, delta: float,
             accountant: str = "rdp") -> "PrivacyLedger":
        """Load the ledger at ``path`` or start an empty one; the stored delta/accountant win."""
        path = Path(path)
        if not path.exists():
            return cls(path=path, client_id=client_id, budget_epsilon=budget_epsilon, delta=delta,
                       accountant=accountant)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            sessions = [Session(**s) for s in raw["sessions"]]
            ledger = cls(path=path, client_id=raw["client_id"], budget_epsilon=budget_epsilon,
                         delta=float(raw["delta"]), accountant=raw["accountant"], sessions=sessions,
                         epsilon=float(raw["epsilon"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(path, f"unreadable privacy ledger ({exc}); refusing to train without it") from None
        if ledger.client_id != client_id:
            raise DataFormatError(path, f"ledger belongs to client {ledger.client_id!r}, not {client_id!r}")
        return ledger

    def recomputed_epsilon(self) -> float:
        """Epsilon composed from the recorded history (what ``epsilon`` must equal)."""
        return composed_epsilon(self.sessions, self.delta, self.accountant)

    def epsilon_after(self, planned: Session) -> float:
        """Cumulative epsilon if ``planned`` were added to the history."""
        return composed_epsilon([*self.sessions, planned], self.delta, self.accountant)

    def max_steps_within_budget(self, noise_multiplier: float, sample_rate: float, max_steps: int) -> int:
        """Largest step count <= ``max_steps`` that keeps the total within the budget (0 if none)."""
        def fits(steps: int) -> bool:
            s = Session(noise_multiplier, sample_rate, steps, 0.0, self.delta)
            return self.epsilon_after(s) <= self.budget_epsilon

        if fits(max_steps):
            return max_steps
        lo, hi = 0, max_steps  # fits(lo) holds (adds nothing), fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def record(self, session: Session) -> float:
        """Append ``session``, recompute the total and persist atomically; returns the new epsilon."""
        if session.delta != self.delta:
            raise ValueError(f"session delta {session.delta} differs from the ledger's {self.delta}")
        stamped = Session(**{**asdict(session), "recorded_at": session.recorded_at or time.time()})
        self.sessions.append(stamped)
        self.epsilon = self.recomputed_epsilon()
        self._write()
        return self.epsilon

    def to_json(self) -> dict:
        return {"version": LEDGER_VERSION, "client_id": self.client_id, "accountant": self.accountant,
                "delta": self.delta, "budget_epsilon": self.budget_epsilon, "epsilon": self.epsilon,
                "sessions": [asdict(s) for s in self.sessions]}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
