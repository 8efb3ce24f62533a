"""A client's training session: budget planning, spend recorded before anything leaves."""

from __future__ import annotations

import json

import pytest

import client.session as session_mod
from common.ledger import PrivacyLedger
from common.model_state import ModelRuntime, ModelSettings, get_state
from common.partition import client_data, split_for
from common.run_config import resolve


@pytest.fixture(scope="module")
def runtime_and_data(small_ml100k):
    cfg = resolve({"dataset": str(small_ml100k), "examples-per-user": 4, "history-len": 3, "max-length": 32,
                   "batch-size": 2, "noise-multiplier": 1.0})
    split = split_for(cfg["dataset"])
    runtime = ModelRuntime(split.data, ModelSettings.from_run_config(cfg))
    runtime.load_state(*get_state(runtime.model))
    return runtime, client_data(split, 0, 3, 4), cfg


def test_crash_during_training_still_leaves_the_spend_recorded(runtime_and_data, tmp_path, monkeypatch):
    runtime, data, cfg = runtime_and_data

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-session")

    monkeypatch.setattr(session_mod, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1)
    raw = json.loads(session_mod.ledger_path(tmp_path, "user-0").read_text())
    assert len(raw["sessions"]) == 1 and raw["epsilon"] > 0


def test_budget_truncates_then_refuses(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    full = session_mod.run_session(runtime, data, cfg, tmp_path / "a", "user-0", "run", 1)
    one_session = full.metrics["epsilon"]
    assert full.metrics["steps"] >= 2 and full.metrics["truncated"] == 0
    budget = 2.0 * one_session
    tight = dict(cfg, **{"client-epsilon-budget": budget})
    results = [session_mod.run_session(runtime, data, tight, tmp_path / "b", "user-0", "run", r) for r in range(1, 12)]
    trained = [r for r in results if not r.refused]
    assert all(r.metrics["epsilon"] <= budget + 1e-9 for r in trained)
    assert [r.metrics["epsilon"] for r in trained] == sorted(r.metrics["epsilon"] for r in trained)
    assert results[-1].refused and "budget" in results[-1].reason and not results[-1].arrays
    assert any(r.metrics.get("truncated") == 1 for r in trained) or results[len(trained)].refused
    ledger = PrivacyLedger.open(session_mod.ledger_path(tmp_path / "b", "user-0"), "user-0", budget, 1e-5)
    assert len(ledger.sessions) == len(trained) >= 2
    assert ledger.recomputed_epsilon() == pytest.approx(ledger.epsilon) and ledger.epsilon <= budget + 1e-9
    refuse = dict(tight, **{"budget-policy": "refuse"})
    assert session_mod.run_session(runtime, data, refuse, tmp_path / "b", "user-0", "run", 99).refused


def test_lora_weights_change_in_a_dp_session(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    names, before = get_state(runtime.model)
    runtime.load_state(names, before)
    result = session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1)
    changed = [n for n, a, b in zip(names, before, result.arrays) if "lora" in n and not (a == b).all()]
    assert changed
