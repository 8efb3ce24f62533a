"""The client's privacy ledger: composition, budget, persistence, crashes, locking and enrolment."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest
from opacus.accountants import RDPAccountant

from common.ledger import LedgerUnavailableError, PrivacyLedger, Session, composed_epsilon, ledger_paths
from common.privacy import epsilon_of_history


def _session(steps: int = 50, sigma: float = 1.0, q: float = 0.05, **kw) -> Session:
    kw.setdefault("sensitivity", 2.0 if kw.get("adjacency") == "replace-one" else 1.0)
    return Session(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=1e-5, **kw)


def _open(folder, client="c", budget=50.0):
    return PrivacyLedger.session(folder, client, budget_epsilon=budget, delta=1e-5)


def test_epsilon_matches_the_accountant_on_the_history(tmp_path):
    with _open(tmp_path, "c1") as ledger:
        for sigma in (1.0, 0.8, 1.2):
            ledger.record(_session(sigma=sigma))
    acc = RDPAccountant()
    acc.history = [(1.0, 0.05, 50), (0.8, 0.05, 50), (1.2, 0.05, 50)]
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    with _open(tmp_path, "c1") as reloaded:
        assert reloaded.epsilon == ledger.epsilon == reloaded.recomputed_epsilon()
        assert len(reloaded.sessions) == 3


@pytest.mark.parametrize("history,delta", [
    ([(0.64, 1.0, 1)], 1e-5),
    ([(1.0, 0.5, 3), (0.64, 1.0, 1), (4.0, 1.0, 2)], 1e-5),
    ([(1.0, 0.02, 200), (1.0, 0.02, 200), (0.8, 0.1, 7)], 1e-4),
])
def test_epsilon_of_history_is_what_opacus_computes(history, delta):
    # the one-step RDP curves are cached per (noise, rate); the composed epsilon must not move
    acc = RDPAccountant()
    acc.history = list(history)
    for _ in range(2):  # cold and cached
        assert epsilon_of_history(history, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


def test_epsilon_is_monotone_and_replace_one_costs_more(tmp_path):
    with _open(tmp_path, budget=100.0) as ledger:
        previous = 0.0
        for _ in range(5):
            now = ledger.record(_session(steps=20))
            assert now > previous
            previous = now
    one = composed_epsilon([_session()], 1e-5)
    assert composed_epsilon([_session(adjacency="replace-one")], 1e-5) == pytest.approx(
        composed_epsilon([_session(sigma=0.5)], 1e-5))
    assert composed_epsilon([_session(adjacency="replace-one")], 1e-5) > one


def test_budget_caps_steps_and_refuses_at_the_cap(tmp_path):
    with _open(tmp_path, budget=2.0) as ledger:
        allowed = ledger.max_steps_within_budget(_session(steps=10_000))
        assert 0 < allowed < 10_000
        assert ledger.epsilon_after(_session(steps=allowed)) <= 2.0
        assert ledger.epsilon_after(_session(steps=allowed + 1)) > 2.0
        ledger.record(_session(steps=allowed))
        assert ledger.max_steps_within_budget(_session(steps=10_000)) == 0  # at its budget: refuse


def test_crash_after_the_write_never_under_reports(tmp_path):
    with _open(tmp_path, budget=10.0) as ledger:
        ledger.record(_session())
    # a crash right after record() but before any reply: the spend is already on disk
    with _open(tmp_path, budget=10.0) as after_crash:
        assert after_crash.epsilon == ledger.epsilon > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ledger-c.enrolled", "ledger-c.json", "ledger-c.lock"]  # no temp file left behind
    assert os.stat(tmp_path / "ledger-c.json").st_mode & 0o077 == 0  # readable by its owner only


def test_the_rename_is_made_durable_by_syncing_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with _open(tmp_path) as ledger:
        synced.clear()
        ledger.record(_session())
    assert str(tmp_path.resolve()) in synced, synced  # the folder, after the rename


def test_corrupt_foreign_or_missing_ledger_is_refused(tmp_path):
    path, _, _ = ledger_paths(tmp_path, "c")
    with _open(tmp_path) as ledger:
        ledger.record(_session())
    stored = json.loads(path.read_text())
    assert stored["sessions"][0]["noise_multiplier"] == 1.0 and stored["delta"] == 1e-5
    path.write_text("{not json")
    with pytest.raises(LedgerUnavailableError, match="unreadable privacy ledger"), _open(tmp_path):
        pass
    path.unlink()  # an enrolled client whose ledger is gone never starts again from 0
    with pytest.raises(LedgerUnavailableError, match="refusing to start again from epsilon 0"), _open(tmp_path):
        pass
    with _open(tmp_path, "d") as other:
        other.record(_session())
    os.replace(ledger_paths(tmp_path, "d")[0], path)
    with pytest.raises(LedgerUnavailableError, match="belongs to client 'd'"), _open(tmp_path):
        pass


@pytest.mark.parametrize("delta", [0.5, 0.0, float("nan")])
def test_a_ledger_with_an_invalid_delta_is_refused(tmp_path, delta):
    with _open(tmp_path) as ledger:
        ledger.record(_session())
    path = ledger_paths(tmp_path, "c")[0]
    raw = json.loads(path.read_text())
    raw["delta"] = delta
    for s in raw["sessions"]:
        s["delta"] = delta
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerUnavailableError), _open(tmp_path):
        pass
    with pytest.raises(ValueError, match="delta"):
        composed_epsilon([_session()], 0.5)


def _overlapping_session(folder: str, hold: float, sigma: float, started) -> None:
    """Plan against the history, then hold the ledger for ``hold`` seconds before recording."""
    with PrivacyLedger.session(folder, "c", budget_epsilon=100.0, delta=1e-5) as ledger:
        started.set()
        time.sleep(hold)
        ledger.record(_session(steps=1, q=1.0, sigma=sigma))


def test_overlapping_sessions_on_one_device_both_count(tmp_path):
    """Two processes that each read, plan and write the same ledger: without the lock the second
    write would drop the first session's spend."""
    ctx = mp.get_context("spawn")
    started, unused = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_overlapping_session, args=(str(tmp_path), 1.0, 0.64, started))
    first.start()
    assert started.wait(60)
    second = ctx.Process(target=_overlapping_session, args=(str(tmp_path), 0.0, 0.8, unused))
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == second.exitcode == 0
    with _open(tmp_path, budget=100.0) as ledger:
        assert sorted(s.noise_multiplier for s in ledger.sessions) == [0.64, 0.8]
        both = composed_epsilon([_session(steps=1, q=1.0, sigma=0.64), _session(steps=1, q=1.0, sigma=0.8)], 1e-5)
        assert ledger.epsilon == pytest.approx(both)


def test_a_crash_between_the_first_ledger_and_its_marker_does_not_brick_the_device(tmp_path, monkeypatch):
    import common.ledger as ledger_mod

    def crash(marker, client_id):
        raise OSError(28, "No space left on device")  # room for the ledger, not for the marker

    monkeypatch.setattr(ledger_mod, "_enrol", crash)
    with pytest.raises(OSError), _open(tmp_path):
        pass
    monkeypatch.undo()
    path, _, marker = ledger_paths(tmp_path, "c")
    assert path.exists() and not marker.exists()  # nothing was released; the ledger is readable
    with _open(tmp_path) as ledger:  # the next session enrols it and trains
        ledger.record(_session())
    assert marker.exists() and PrivacyLedger.load(path).epsilon > 0


def test_a_first_ledger_that_cannot_be_written_leaves_no_marker(tmp_path, monkeypatch):
    import common.ledger as ledger_mod

    real = ledger_mod.write_bytes_atomic

    def room_for_the_marker_only(path, data, private=False):
        if str(path).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real(path, data, private=private)

    monkeypatch.setattr(ledger_mod, "write_bytes_atomic", room_for_the_marker_only)
    with pytest.raises(OSError), _open(tmp_path):
        pass
    monkeypatch.undo()
    path, _, marker = ledger_paths(tmp_path, "c")
    assert not path.exists() and not marker.exists()  # never enrolled: a later session starts cleanly
    with _open(tmp_path) as ledger:
        ledger.record(_session())
    assert marker.exists() and PrivacyLedger.load(path).epsilon > 0


def test_a_held_lock_times_out_into_a_refusal(tmp_path):
    with _open(tmp_path):
        with pytest.raises(LedgerUnavailableError, match="another session has held the lock"):
            with PrivacyLedger.session(tmp_path, "c", 50.0, 1e-5, lock_timeout=0.2):
                pass


def test_an_older_ledger_is_read_at_todays_sensitivity_and_never_below_it(tmp_path):
    """A version-2 ledger has no sensitivity field; its training sessions used the capped window by
    default, so they count at 2C (their stored total was computed at C), evaluation releases at C."""
    train = {"noise_multiplier": 0.64, "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0, "delta": 1e-5,
             "run_id": "old", "round": 1, "kind": "dp-sgd", "adjacency": "add-remove"}
    evaluation = {**train, "noise_multiplier": 4.0, "round": 2, "kind": "evaluation"}
    old_total = composed_epsilon([_session(steps=1, sigma=0.64, q=1.0)], 1e-5)  # what version 2 stored
    path = tmp_path / "ledger-c.json"
    path.write_text(json.dumps({"version": 2, "client_id": "c", "accountant": "rdp", "delta": 1e-5,
                                "budget_epsilon": 100.0, "epsilon": old_total, "policy": {},
                                "sessions": [train, evaluation]}))
    ledger = PrivacyLedger.load(path, "c")
    assert [s.accounted_sensitivity for s in ledger.sessions] == [2.0, 1.0]
    expected = composed_epsilon([_session(steps=1, sigma=0.32, q=1.0), _session(steps=1, sigma=4.0, q=1.0)], 1e-5)
    assert ledger.epsilon == pytest.approx(expected, rel=1e-12)
    assert ledger.epsilon > 2 * old_total  # 7.97 stored, about 18.8 accounted
    assert ledger.stored_epsilon == old_total  # kept as read, for the audit's comparison
