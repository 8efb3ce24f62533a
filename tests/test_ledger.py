"""The client's privacy ledger: composition, monotonicity, budget, persistence and crashes."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from common.errors import DataFormatError
from common.ledger import PrivacyLedger, Session


def _session(steps: int = 50, sigma: float = 1.0, q: float = 0.05) -> Session:
    return Session(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=1e-5)


def test_epsilon_matches_the_accountant_on_the_history(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "c1.json", "c1", budget_epsilon=50.0, delta=1e-5)
    for sigma in (1.0, 0.8, 1.2):
        ledger.record(_session(sigma=sigma))
    acc = RDPAccountant()
    acc.history = [(1.0, 0.05, 50), (0.8, 0.05, 50), (1.2, 0.05, 50)]
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    reloaded = PrivacyLedger.open(tmp_path / "c1.json", "c1", budget_epsilon=50.0, delta=1e-5)
    assert reloaded.epsilon == ledger.epsilon == reloaded.recomputed_epsilon()
    assert len(reloaded.sessions) == 3


def test_epsilon_is_monotone(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "c.json", "c", budget_epsilon=100.0, delta=1e-5)
    previous = 0.0
    for _ in range(5):
        now = ledger.record(_session(steps=20))
        assert now > previous
        previous = now


def test_budget_caps_steps_and_refuses_at_the_cap(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "c.json", "c", budget_epsilon=2.0, delta=1e-5)
    allowed = ledger.max_steps_within_budget(1.0, 0.05, max_steps=10_000)
    assert 0 < allowed < 10_000
    assert ledger.epsilon_after(_session(steps=allowed)) <= 2.0
    assert ledger.epsilon_after(_session(steps=allowed + 1)) > 2.0
    ledger.record(_session(steps=allowed))
    assert ledger.max_steps_within_budget(1.0, 0.05, max_steps=10_000) == 0  # at its budget: refuse


def test_crash_after_the_write_never_under_reports(tmp_path):
    path = tmp_path / "c.json"
    ledger = PrivacyLedger.open(path, "c", budget_epsilon=10.0, delta=1e-5)
    ledger.record(_session())
    # a crash right after record() but before any reply: the spend is already on disk
    after_crash = PrivacyLedger.open(path, "c", budget_epsilon=10.0, delta=1e-5)
    assert after_crash.epsilon == ledger.epsilon > 0
    # a crash in the middle of a write leaves only a temp file; the ledger itself stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_corrupt_or_foreign_ledger_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match="unreadable privacy ledger"):
        PrivacyLedger.open(path, "c", budget_epsilon=1.0, delta=1e-5)
    ledger = PrivacyLedger.open(tmp_path / "d.json", "d", budget_epsilon=10.0, delta=1e-5)
    ledger.record(_session())
    with pytest.raises(DataFormatError, match="belongs to client 'd'"):
        PrivacyLedger.open(tmp_path / "d.json", "e", budget_epsilon=10.0, delta=1e-5)
    stored = json.loads((tmp_path / "d.json").read_text())
    assert stored["sessions"][0]["noise_multiplier"] == 1.0 and stored["delta"] == 1e-5
