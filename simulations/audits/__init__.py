"""Empirical privacy audits: they train clients (one DP session, or the whole federation with canary
clients) and put a lower bound on epsilon with the estimator in :mod:`server.audit.estimator`.

:data:`AUDITS` is the registry the CLI and the benchmark run from: name -> (default canaries, runner).
A runner takes (run-config overrides, canaries, options) and returns the report dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class AuditOptions:
    """What the CLI passes through to any audit (each uses the fields it needs)."""

    out: Path
    broken: str = "none"
    users: int = 1
    real_clients: int = 20
    confidence: float = 0.95


def _mechanism(overrides: dict[str, Any], canaries: int, o: AuditOptions) -> dict[str, Any]:
    from simulations.audits.mechanism import run_mechanism_audit

    return run_mechanism_audit(overrides, canaries, broken=o.broken, confidence=o.confidence)


def _membership(overrides: dict[str, Any], canaries: int, o: AuditOptions) -> dict[str, Any]:
    from simulations.audits.membership import run_membership_audit

    return run_membership_audit(overrides, canaries, o.users, broken=o.broken, confidence=o.confidence)


def _clients(overrides: dict[str, Any], canaries: int, o: AuditOptions) -> dict[str, Any]:
    if o.broken != "none":
        raise ValueError("--broken applies to the mechanism, membership and secure-clients audits only")
    from simulations.audits.canary_clients import run_client_audit

    return run_client_audit(overrides, o.out, o.real_clients, canaries, confidence=o.confidence)


def _secure_clients(overrides: dict[str, Any], canaries: int, o: AuditOptions) -> dict[str, Any]:
    from simulations.audits.secure_canaries import run_secure_client_audit

    return run_secure_client_audit(overrides, o.out, o.real_clients, canaries, confidence=o.confidence,
                                   broken=o.broken)


@dataclass(frozen=True)
class Audit:
    default_canaries: int
    run: Callable[[dict[str, Any], int, AuditOptions], dict[str, Any]]


AUDITS: dict[str, Audit] = {
    "mechanism": Audit(2000, _mechanism),
    "membership": Audit(500, _membership),
    "clients": Audit(200, _clients),
    "secure-clients": Audit(200, _secure_clients),
}
