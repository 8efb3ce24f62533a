"""A client's training session: device policy, budget planning under the ledger lock, spend recorded
before anything leaves, and replies that do not depend on how many examples the client holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import client.session as session_mod
import common.training as training_mod
from common.device_policy import DevicePolicy
from common.ledger import PrivacyLedger, ledger_paths
from common.model_state import ModelRuntime, ModelSettings, get_state
from common.partition import ClientData, client_data, split_for
from common.run_config import resolve
from common.wire import TRAIN_METRICS


@pytest.fixture(scope="module")
def runtime_and_data(tiny_grouplens):
    cfg = resolve({"dataset": str(tiny_grouplens), "examples-per-user": 4, "history-len": 3, "max-length": 32,
                   "batch-size": 2, "noise-multiplier": 1.0})
    split = split_for(cfg["dataset"])
    runtime = ModelRuntime(split.data, ModelSettings.from_run_config(cfg))
    runtime.load_state(*get_state(runtime.model))
    return runtime, client_data(split, 0, 3, 4), cfg


def _ledger(folder, budget=8.0):
    return PrivacyLedger.load(ledger_paths(folder, "user-0")[0], "user-0", budget)


def test_crash_during_training_still_leaves_the_spend_recorded(runtime_and_data, tmp_path, monkeypatch):
    runtime, data, cfg = runtime_and_data

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-session")

    monkeypatch.setattr(training_mod, "_run_steps", crash)
    with pytest.raises(KeyboardInterrupt):
        session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1)
    raw = json.loads(ledger_paths(tmp_path, "user-0")[0].read_text())
    assert len(raw["sessions"]) == 1 and raw["epsilon"] > 0


def test_a_session_that_cannot_start_records_nothing_and_leaves_no_hooks(runtime_and_data, tmp_path, monkeypatch):
    runtime, data, cfg = runtime_and_data
    real = training_mod.make_private

    def broken(*args, **kwargs):
        raise RuntimeError("cannot wrap the model")

    monkeypatch.setattr(training_mod, "make_private", broken)
    with pytest.raises(RuntimeError):
        session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1)
    assert _ledger(tmp_path).sessions == []
    # a failure in the middle of the loop removes Opacus' hooks: the next session still runs
    monkeypatch.setattr(training_mod, "make_private", real)
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        raise ValueError("corrupt state")

    monkeypatch.setattr(training_mod, "_check_adapters", fail_once)
    with pytest.raises(ValueError):
        session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 2)
    monkeypatch.undo()
    result = session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 3)
    assert not result.refused and calls == [1]


def test_budget_truncates_then_refuses(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    full = session_mod.run_session(runtime, data, cfg, tmp_path / "a", "user-0", "run", 1)
    one_session = full.metrics["epsilon"]
    assert full.metrics["steps"] == 2  # public schedule: q = 2/4, ceil(1 / q) steps
    budget = 2.0 * one_session
    tight = dict(cfg, **{"client-epsilon-budget": budget})
    roomy = DevicePolicy(epsilon_budget=1000.0)  # the run's budget is the binding one here
    results = [session_mod.run_session(runtime, data, tight, tmp_path / "b", "user-0", "run", r, policy=roomy)
               for r in range(1, 12)]
    trained = [r for r in results if not r.refused]
    assert all(r.metrics["epsilon"] <= budget + 1e-9 for r in trained)
    assert [r.metrics["epsilon"] for r in trained] == sorted(r.metrics["epsilon"] for r in trained)
    assert results[-1].refused and results[-1].reason == "privacy-budget" and not results[-1].arrays
    assert results[-1].metrics == {"refused": 1.0}  # the refusal tells nothing about the spend history
    assert any(r.metrics["steps"] < 2 for r in trained) or results[len(trained)].refused
    ledger = _ledger(tmp_path / "b", budget)
    assert len(ledger.sessions) == len(trained) >= 2
    assert ledger.recomputed_epsilon() == pytest.approx(ledger.epsilon) and ledger.epsilon <= budget + 1e-9
    refuse = dict(tight, **{"budget-policy": "refuse"})
    assert session_mod.run_session(runtime, data, refuse, tmp_path / "b", "user-0", "run", 99, policy=roomy).refused


def test_lora_weights_change_in_a_dp_session(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    names, before = get_state(runtime.model)
    runtime.load_state(names, before)
    result = session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1)
    changed = [n for n, a, b in zip(names, before, result.arrays) if "lora" in n and not (a == b).all()]
    assert changed
    runtime.load_state(names, before)


def test_reply_fields_do_not_depend_on_the_number_of_examples(runtime_and_data, tmp_path):
    """Under add/remove adjacency the example count is private: a client with 4 examples, one with 1
    and one with none send the same public fields (and the same values) beside their tensors."""
    runtime, data, cfg = runtime_and_data
    names, start = get_state(runtime.model)
    replies = []
    for keep in (4, 1, 0):
        fewer = ClientData(data.train_texts[:keep], data.train_targets[:keep], data.eval_text, data.eval_target,
                           data.eval_excluded)
        runtime.load_state(names, start)
        result = session_mod.run_session(runtime, fewer, cfg, tmp_path / str(keep), "user-0", "run", 1)
        assert not result.refused and set(result.metrics) <= set(TRAIN_METRICS)
        assert all(not np.array_equal(a, b) for a, b in zip(result.arrays, start))  # noise moved everything
        replies.append(result.metrics)
    runtime.load_state(names, start)
    assert replies[0] == replies[1] == replies[2]
    assert replies[0]["expected-batch-size"] == 2 and replies[0]["sample-rate"] == 0.5


@pytest.mark.parametrize("override", [{"local-dp": False}, {"noise-multiplier": 0.3}, {"max-grad-norm": 5.0},
                                      {"client-epsilon-budget": 50.0}, {"delta": 1e-3}],
                         ids=["dp-off", "less-noise", "larger-clip", "larger-budget", "larger-delta"])
def test_a_run_asking_for_less_than_the_device_policy_is_refused(runtime_and_data, tmp_path, override):
    runtime, data, cfg = runtime_and_data
    names, start = get_state(runtime.model)
    result = session_mod.run_session(runtime, data, dict(cfg, **override), tmp_path, "user-0", "run", 1,
                                     policy=DevicePolicy())
    assert result.refused and result.reason == "privacy-policy" and not result.arrays
    assert not ledger_paths(tmp_path, "user-0")[0].exists()  # nothing trained, nothing spent
    assert all(np.array_equal(a, b) for a, b in zip(get_state(runtime.model)[1], start))
    # a device whose own policy allows it trains (DP off: no ledger, no guarantee)
    asked = {**cfg, "client-epsilon-budget": 100.0, **override}
    lax = DevicePolicy(require_local_dp=False, min_noise_multiplier=0.1, max_clip=10.0, delta=asked["delta"],
                       epsilon_budget=100.0)
    assert not session_mod.run_session(runtime, data, asked, tmp_path, "user-0", "run", 1, policy=lax).refused
    runtime.load_state(names, start)


def test_every_session_encodes_and_samples_the_public_number_of_rows(runtime_and_data, tmp_path, monkeypatch):
    """The server sees when a reply arrives: the work must not depend on how many examples a client holds."""
    runtime, data, cfg = runtime_and_data
    names, start = get_state(runtime.model)
    seen = []
    real_train = session_mod.train

    def spy(model, features, targets, item_features, tcfg, **kw):
        seen.append((len(features), float(kw["row_weights"].sum())))
        return real_train(model, features, targets, item_features, tcfg, **kw)

    monkeypatch.setattr(session_mod, "train", spy)
    for keep in (4, 1, 0):
        fewer = ClientData(data.train_texts[:keep], data.train_targets[:keep], None, None, data.eval_excluded)
        runtime.load_state(names, start)
        session_mod.run_session(runtime, fewer, cfg, tmp_path / str(keep), "user-0", "run", 1)
    runtime.load_state(names, start)
    assert seen == [(4, 4.0), (4, 1.0), (4, 0.0)]  # always the cap's rows, padding rows weigh 0


def test_a_ledger_kept_with_the_other_accountant_refuses_before_recording(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    names, start = get_state(runtime.model)
    assert not session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1).refused
    other = dict(cfg, accountant="prv")
    result = session_mod.run_session(runtime, data, other, tmp_path, "user-0", "run", 2)
    assert result.refused and result.reason == "privacy-policy"
    assert len(_ledger(tmp_path).sessions) == 1
    runtime.load_state(names, start)


def test_an_example_with_a_non_finite_gradient_contributes_nothing():
    """A model crafted to overflow for some inputs only must not make the step fail for those data."""
    import torch

    from common.privacy import PublicSchedule, make_private

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = make_private(model, optimizer, 1.0, 1.0, PublicSchedule(1.0, 1, 4), "rdp")
    try:
        x = torch.tensor([[1.0, 2.0, 3.0], [float("inf"), 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
        private.module(x).sum().backward()
        private.optimizer.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        private.close()


def test_a_repeated_request_gets_the_kept_reply_and_nothing_else_is_free(runtime_and_data, tmp_path, monkeypatch):
    """The same (run, round) again: the same bytes, no new spend. A server that cycles round numbers
    until the device has dropped an old kept reply, or that asks again after a crash before the reply
    was kept, gets a new session, charged as one: one recorded spend never yields two releases."""
    from client.released import KEEP

    runtime, data, cfg = runtime_and_data
    cfg = dict(cfg, **{"client-epsilon-budget": 50.0})

    policy = DevicePolicy(epsilon_budget=50.0)

    def ask(rnd):
        return session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", rnd, policy=policy)

    first = ask(1)
    assert first.arrays and not first.refused
    again = ask(1)
    assert [a.tobytes() for a in again.arrays] == [a.tobytes() for a in first.arrays]
    assert again.metrics == first.metrics and len(_ledger(tmp_path, 50.0).sessions) == 1
    for rnd in range(2, KEEP + 3):  # round 1's kept reply is dropped as old
        ask(rnd)
    spent = len(_ledger(tmp_path, 50.0).sessions)
    replay = ask(1)
    assert len(_ledger(tmp_path, 50.0).sessions) == spent + 1  # charged as a new session
    assert replay.metrics["epsilon"] > first.metrics["epsilon"]
    # killed after recording a session but before its reply was kept: asking again charges again
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-session")

    monkeypatch.setattr(training_mod, "_run_steps", crash)
    with pytest.raises(KeyboardInterrupt):
        ask(100)
    monkeypatch.undo()
    before = len(_ledger(tmp_path, 50.0).sessions)
    ask(100)
    assert len(_ledger(tmp_path, 50.0).sessions) == before + 1
