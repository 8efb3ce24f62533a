"""A client's persistent privacy ledger: every DP release of the client, and the composed epsilon.

One JSON file per client (``ledger-<client>.json``), beside two companions:

- ``ledger-<client>.lock``: an exclusive ``flock`` held around plan, record and training
  (:meth:`PrivacyLedger.session`), so two overlapping sessions on one device cannot both plan
  against the same history and overwrite each other's spend;
- ``ledger-<client>.enrolled``: written once, right after the client's first (empty) ledger is
  created. A client that is enrolled but whose ledger is missing or unreadable refuses to train:
  it never starts again from 0. Deleting both files (the device's owner can always erase its own
  state) starts it again from 0: that is outside the guarantee, which is per ledger.

A release is recorded (temp file, fsync, rename, fsync of the folder) *before* its result may
leave the device, so a crash can only over-report. The cumulative epsilon is recomputed from
the recorded history with an Opacus accountant, never summed by hand.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.io import exclusive_lock, write_bytes_atomic
from common.privacy import epsilon_of_history
from common.skellam import SkellamPlan, skellam_epsilon

LEDGER_VERSION = 6
ADJACENCIES = ("add-remove", "replace-one")
KINDS = ("dp-sgd", "evaluation")
MAX_DELTA = 1e-2  # a delta above this is no privacy guarantee worth stating
LOCK_TIMEOUT_S = 600.0


class LedgerUnavailableError(RuntimeError):
    """The ledger cannot be used (missing for an enrolled client, unreadable, or locked too long):
    the client must refuse rather than train without it."""


@dataclass(frozen=True)
class Session:
    """One recorded release: a sampled Gaussian mechanism composed over ``steps``.

    ``kind`` is ``dp-sgd`` (a training session) or ``evaluation`` (a noisy evaluation reply,
    sample rate 1, one step). ``sensitivity`` is the L2 sensitivity of the released sum in units
    of ``max_grad_norm`` (:func:`common.privacy.session_sensitivity`): 2 when one changed example
    can move the clipped sum by twice the clip (a window over the device's examples lets another in
    when one is removed; or replace-one adjacency), so the accountant sees the noise multiplier
    divided by it. Sessions recorded before the field existed (ledger versions 1 and 2) carry None:
    a training session among them is accounted at 2 (their default session was already capped at
    50 examples, and which of them were capped was not recorded, so the larger value is the one
    that cannot under-report), an evaluation release at 2 under replace-one, else 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    run_id: str = ""
    round: int | None = None
    node_id: int | None = None  # the Flower node that trained (matches the server's round records)
    recorded_at: float = 0.0
    kind: str = "dp-sgd"
    adjacency: str = "add-remove"
    sensitivity: float | None = None
    # What one example was in this session (the unit the epsilon is about): its history length and
    # token limit. None in sessions recorded before ledger version 4.
    history_len: int | None = None
    max_length: int | None = None
    # A token the device draws for a secure round with local DP, stored on that round's session and its
    # user-level release (never sent): what pairs them, not the server's run and round labels (version 6).
    secure_release: str = ""

    @property
    def accounted_sensitivity(self) -> float:
        if self.sensitivity is not None:
            return float(self.sensitivity)
        return 2.0 if self.kind == "dp-sgd" or self.adjacency == "replace-one" else 1.0

    @property
    def accounted_noise(self) -> float:
        """The noise multiplier in units of the release's sensitivity."""
        return self.noise_multiplier / self.accounted_sensitivity


@dataclass(frozen=True)
class UserRelease:
    """One user-level release: the device's whole clipped session update with its share of Skellam
    noise, sent into a secure sum (:mod:`common.skellam`). Its plan fixes the sensitivities and the
    noise; the accounted noise needs at least ``plan.min_survivors`` shares in the sum."""

    dim: int
    clip: float
    noise_multiplier: float
    min_survivors: int
    max_devices: int
    run_id: str = ""
    round: int | None = None
    node_id: int | None = None
    recorded_at: float = 0.0
    history_len: int | None = None
    secure_release: str = ""  # the token of its round's DP-SGD session, with local DP (see Session)

    @property
    def plan(self) -> SkellamPlan:
        return SkellamPlan(self.dim, self.clip, self.noise_multiplier, self.min_survivors, self.max_devices)


def user_epsilon(releases: list[UserRelease], delta: float) -> float:
    """User-level epsilon of the composed releases (trust: a semi-honest server and at least each
    release's ``min_survivors`` honest devices in its sum); 0 when there are none."""
    return skellam_epsilon([(r.plan.l1_sensitivity, r.plan.l2_sensitivity, r.plan.variance) for r in releases],
                           delta)


def share_only_epsilon(releases: list[UserRelease], delta: float) -> float:
    """User-level epsilon if every release were seen alone with its own share of noise (trust: nobody;
    what a server that broke secure aggregation could learn)."""
    return skellam_epsilon([(r.plan.l1_sensitivity, r.plan.l2_sensitivity, r.plan.share_variance)
                            for r in releases], delta)


def user_release_from_json(raw: dict[str, Any]) -> UserRelease:
    """A stored user-level release; unknown fields are an error and the plan is re-checked."""
    known = {f.name for f in fields(UserRelease)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown user release field(s) {unknown}")
    release = UserRelease(**raw)
    if not isinstance(release.secure_release, str):
        raise ValueError(f"user release field secure_release: {release.secure_release!r}, expected a string")
    release.plan  # noqa: B018 - raises ValueError on an invalid plan
    return release


def session_from_json(raw: dict[str, Any]) -> Session:
    """A stored session; unknown fields are an error (a ledger is never read loosely)."""
    known = {f.name for f in fields(Session)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown session field(s) {unknown}")
    return Session(**raw)


def validate_session(s: Session) -> None:
    """Raise ValueError naming the field when ``s`` is not a mechanism an accountant can compose."""
    numbers = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")
    bad = [f for f in numbers if isinstance(getattr(s, f), bool) or not isinstance(getattr(s, f), (int, float))
           or not math.isfinite(getattr(s, f))]
    if not bad:
        bad += [f for f, ok in (("noise_multiplier", s.noise_multiplier > 0), ("sample_rate", 0 < s.sample_rate <= 1),
                                ("steps", s.steps >= 0 and s.steps == int(s.steps)),
                                ("max_grad_norm", s.max_grad_norm > 0), ("delta", 0 < s.delta <= MAX_DELTA))
                if not ok]
    if s.sensitivity is not None and (isinstance(s.sensitivity, bool) or not isinstance(s.sensitivity, (int, float))
                                      or not math.isfinite(s.sensitivity) or s.sensitivity < 1):
        bad.append("sensitivity")
    for name in ("history_len", "max_length"):
        value = getattr(s, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            bad.append(name)
    if s.kind not in KINDS:
        bad.append("kind")
    if not isinstance(s.secure_release, str):
        bad.append("secure_release")
    if s.adjacency not in ADJACENCIES:
        bad.append("adjacency")
    if bad:
        raise ValueError(f"invalid {', '.join(bad)} in session {asdict(s)}")


def composed_epsilon(sessions: list[Session], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of every session (0 when there are none)."""
    if not 0 < delta <= MAX_DELTA:
        raise ValueError(f"delta must be in (0, {MAX_DELTA:g}], got {delta}")
    return epsilon_of_history([(s.accounted_noise, s.sample_rate, s.steps) for s in sessions], delta, accountant)


def ledger_paths(folder: str | Path, client_id: str) -> tuple[Path, Path, Path]:
    """(ledger, lock, enrolment marker) of ``client_id`` in ``folder``."""
    folder = Path(folder)
    return (folder / f"ledger-{client_id}.json", folder / f"ledger-{client_id}.lock",
            folder / f"ledger-{client_id}.enrolled")


@contextmanager
def _held(lock: Path, timeout: float) -> Iterator[None]:
    try:
        with exclusive_lock(lock, timeout, holder="another session"):
            yield
    except TimeoutError as exc:
        raise LedgerUnavailableError(str(exc)) from None


def _enrol(marker: Path, client_id: str) -> None:
    write_bytes_atomic(marker, f"{client_id} {time.time():.3f}\n".encode(), private=True)


@dataclass
class PrivacyLedger:
    """What one client has released, under which mechanisms, against which budget and policy.

    Two units: example-level sessions (:attr:`epsilon`) and user-level releases into secure sums
    (:meth:`user_epsilon`). A secure round with local DP records both, for the same data, and each figure
    holds at its unit. A secure round without local DP releases the data at every unit, outside
    :attr:`epsilon`; a plain run releases it outside every user-level release. Neither figure can state
    such a mix, so a device keeps to one: after a secure release without local DP it makes no more
    example-level releases, and after a plain run's release it joins no secure round (both refused as
    ``privacy-budget``; :meth:`uncovered_user_releases`, :meth:`uncovered_sessions`).
    """

    path: Path
    client_id: str
    budget_epsilon: float
    delta: float
    accountant: str = "rdp"
    sessions: list[Session] = field(default_factory=list)
    epsilon: float = 0.0  # cached composed epsilon, rewritten with every record
    policy: dict[str, Any] = field(default_factory=dict)  # the device policy in force at the last record
    stored_epsilon: float | None = None  # the total as read from the file (what an audit checks), None if new
    # user-level releases into secure sums (ledger version 5), accounted at their own delta
    user_releases: list[UserRelease] = field(default_factory=list)
    user_delta: float | None = None

    @classmethod
    @contextmanager
    def session(cls, folder: str | Path, client_id: str, budget_epsilon: float, delta: float,
                accountant: str = "rdp", policy: dict[str, Any] | None = None,
                lock_timeout: float = LOCK_TIMEOUT_S) -> Iterator["PrivacyLedger"]:
        """The client's ledger, held under its exclusive lock for the whole block (plan, record,
        train, reply). A new client is enrolled; an enrolled client whose ledger is gone or
        unreadable raises :class:`LedgerUnavailableError`."""
        path, lock, marker = ledger_paths(folder, client_id)
        with _held(lock, lock_timeout):
            if path.exists():
                ledger = cls.load(path, client_id, budget_epsilon)
                if not marker.exists():  # enrolled before the marker existed, or a crash between the two
                    _enrol(marker, client_id)
            elif marker.exists():
                raise LedgerUnavailableError(f"{path}: missing, but {marker.name} shows this client has a ledger; "
                                             f"refusing to start again from epsilon 0")
            else:
                ledger = cls(path=path, client_id=client_id, budget_epsilon=budget_epsilon, delta=delta,
                             accountant=accountant, policy=dict(policy or {}))
                # First the empty ledger, then the marker: a crash or a full disk between the two leaves
                # a ledger without a marker (enrolled at the next session), never a marker without a
                # ledger, which would make the device refuse for ever although it released nothing.
                ledger._write()
                _enrol(marker, client_id)
            if policy is not None:
                ledger.policy = dict(policy)
            yield ledger

    @classmethod
    def load(cls, path: str | Path, client_id: str | None = None,
             budget_epsilon: float | None = None) -> "PrivacyLedger":
        """Read the ledger at ``path`` (of ``client_id`` when given); any defect is a
        :class:`LedgerUnavailableError` naming the file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw.get("version", 1), int) or raw.get("version", 1) > LEDGER_VERSION:
                raise ValueError(f"ledger version {raw.get('version')!r}; this privrec reads up to {LEDGER_VERSION}")
            sessions = [session_from_json(s) for s in raw["sessions"]]
            for s in sessions:
                validate_session(s)
            ledger = cls(path=path, client_id=str(raw["client_id"]),
                         budget_epsilon=float(raw["budget_epsilon"] if budget_epsilon is None else budget_epsilon),
                         delta=float(raw["delta"]), accountant=str(raw["accountant"]), sessions=sessions,
                         epsilon=float(raw["epsilon"]), policy=dict(raw.get("policy", {})),
                         user_releases=[user_release_from_json(r) for r in raw.get("user_releases", [])],
                         user_delta=None if raw.get("user_delta") is None else float(raw["user_delta"]))
            if ledger.user_releases and not (ledger.user_delta is not None and 0 < ledger.user_delta <= MAX_DELTA):
                raise ValueError(f"user_delta {ledger.user_delta!r} out of range for the recorded user releases")
            if not 0 < ledger.delta <= MAX_DELTA or ledger.accountant not in ("rdp", "prv"):
                raise ValueError(f"delta {ledger.delta} / accountant {ledger.accountant!r} out of range")
            if any(s.delta != ledger.delta for s in sessions):
                raise ValueError("a session's delta differs from the ledger's")
            # an older ledger's stored total may predate today's accounting of its sessions
            ledger.stored_epsilon = ledger.epsilon
            recomputed = ledger.recomputed_epsilon()
            if not math.isfinite(recomputed):
                raise ValueError(f"the recorded sessions compose to epsilon {recomputed}")
            ledger.epsilon = max(ledger.epsilon, recomputed)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerUnavailableError(f"{path}: unreadable privacy ledger ({exc}); refusing to train "
                                         f"without it") from None
        if client_id is not None and ledger.client_id != client_id:
            raise LedgerUnavailableError(f"{path}: ledger belongs to client {ledger.client_id!r}, not {client_id!r}")
        return ledger

    def recorded(self, run_id: str, server_round: int, kind: str) -> Session | None:
        """The session this ledger recorded for (run, round, kind), if any (the latest)."""
        matches = [s for s in self.sessions if s.run_id == run_id and s.round == server_round and s.kind == kind]
        return matches[-1] if matches else None

    def uncovered_user_releases(self) -> list[UserRelease]:
        """User-level releases without a paired DP-SGD session (a secure round without local DP): they
        release the device's data at the example level too, outside :attr:`epsilon`."""
        paired = {s.secure_release for s in self.sessions if s.secure_release and s.kind == "dp-sgd"}
        return [r for r in self.user_releases if not (r.secure_release and r.secure_release in paired)]

    def uncovered_sessions(self) -> list[Session]:
        """Example-level releases (training sessions, evaluations) without a paired user-level release (plain
        runs): no user-level epsilon bounds them, so :meth:`user_epsilon` does not cover the device's data.
        Pairs are the device's own tokens, never the run and round labels a server chooses."""
        paired = {r.secure_release for r in self.user_releases if r.secure_release}
        return [s for s in self.sessions if not (s.secure_release and s.secure_release in paired)]

    def recorded_history_lens(self) -> list[int | None]:
        """The history length of every release this device made, sessions and user-level releases alike
        (what :meth:`common.device_policy.DevicePolicy.lengthens_unit` compares a run against)."""
        return [s.history_len for s in self.sessions] + [r.history_len for r in self.user_releases]

    def recomputed_epsilon(self) -> float:
        """Epsilon composed from the recorded history (what ``epsilon`` must equal)."""
        return composed_epsilon(self.sessions, self.delta, self.accountant)

    def epsilon_after(self, planned: Session) -> float:
        """Cumulative epsilon if ``planned`` were added to the history."""
        return composed_epsilon([*self.sessions, planned], self.delta, self.accountant)

    def max_steps_within_budget(self, planned: Session) -> int:
        """Largest step count <= ``planned.steps`` that keeps the total within the budget (0 if none)."""
        def fits(steps: int) -> bool:
            return self.epsilon_after(Session(**{**asdict(planned), "steps": steps})) <= self.budget_epsilon

        if fits(planned.steps):
            return planned.steps
        lo, hi = 0, planned.steps  # fits(lo) holds (adds nothing), fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def record(self, session: Session) -> float:
        """Append ``session``, recompute the total and persist durably; returns the new epsilon."""
        self.sessions.append(self._stamped(session))
        self.epsilon = self.recomputed_epsilon()
        self._write()
        return self.epsilon

    def _stamped(self, session: Session) -> Session:
        if session.delta != self.delta:
            raise ValueError(f"session delta {session.delta} differs from the ledger's {self.delta}")
        stamped = Session(**{**asdict(session), "recorded_at": session.recorded_at or time.time()})
        validate_session(stamped)
        return stamped

    def user_epsilon(self, extra: UserRelease | None = None) -> float:
        """User-level epsilon of the recorded releases (and ``extra``) at the ledger's user delta."""
        releases = [*self.user_releases, *([extra] if extra else [])]
        return user_epsilon(releases, self.user_delta) if releases else 0.0

    def record_user_release(self, release: UserRelease, delta: float, session: Session | None = None) -> float:
        """Append a user-level release (and, for a secure round with local DP, its DP-SGD ``session``, paired by
        a fresh token) and persist both in one write, before the share may leave the device; returns the new
        user-level epsilon. Every release of a ledger is accounted at one delta."""
        if self.user_delta is not None and delta != self.user_delta:
            raise ValueError(f"user delta {delta} differs from the ledger's {self.user_delta}")
        if not 0 < delta <= MAX_DELTA:
            raise ValueError(f"user delta must be in (0, {MAX_DELTA:g}], got {delta}")
        token = secrets.token_hex(16) if session is not None else ""
        stamped = UserRelease(**{**asdict(release), "recorded_at": release.recorded_at or time.time(),
                                 "secure_release": token})
        stamped.plan  # noqa: B018 - raises ValueError on an invalid plan
        if session is not None:
            paired = self._stamped(replace(session, secure_release=token))
            self.sessions.append(paired)
            self.epsilon = self.recomputed_epsilon()
        self.user_delta = delta
        self.user_releases.append(stamped)
        self._write()
        return self.user_epsilon()

    def to_json(self) -> dict:
        out = {"version": LEDGER_VERSION, "client_id": self.client_id, "accountant": self.accountant,
               "delta": self.delta, "budget_epsilon": self.budget_epsilon, "epsilon": self.epsilon,
               "policy": self.policy, "sessions": [asdict(s) for s in self.sessions]}
        if self.user_releases:
            out.update({"user_delta": self.user_delta, "user_epsilon": self.user_epsilon(),
                        "user_epsilon_share_only": share_only_epsilon(self.user_releases, self.user_delta),
                        "user_releases": [asdict(r) for r in self.user_releases]})
        return out

    def _write(self) -> None:
        write_bytes_atomic(self.path, (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8"), private=True)
