"""A client's training session: device policy, budget planning under the ledger lock, spend recorded
before anything leaves, and replies that do not depend on how many examples the client holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import client.session as session_mod
import common.training as training_mod
from common.device_policy import DevicePolicy
from common.errors import ConfigError
from common.ledger import PrivacyLedger, ledger_paths
from common.model_state import ModelRuntime, ModelSettings, get_state
from common.partition import ClientData, client_data, split_for
from common.run_config import resolve
from common.wire import TRAIN_METRICS


@pytest.fixture(scope="module")
def runtime_and_data(tiny_grouplens):
    cfg = resolve({"dataset": str(tiny_grouplens), "user-model": "text", "examples-per-user": 4, "history-len": 3,
                   "max-length": 32, "batch-size": 2, "noise-multiplier": 2.0})
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


# noise 0.9 is above the floor of 0.5 but a capped session is accounted at 2C: 0.45 per unit of sensitivity
@pytest.mark.parametrize("override", [{"local-dp": False}, {"noise-multiplier": 0.3}, {"noise-multiplier": 0.9},
                                      {"max-grad-norm": 5.0}, {"client-epsilon-budget": 50.0}, {"delta": 1e-3},
                                      {"history-len": 51}, {"max-length": 128}],
                         ids=["dp-off", "less-noise", "less-noise-per-sensitivity", "larger-clip", "larger-budget",
                              "larger-delta", "longer-history", "more-tokens"])
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
                       epsilon_budget=100.0, max_history_len=1000, max_length=512)
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


def test_each_session_records_the_unit_it_was_about(runtime_and_data, tmp_path):
    runtime, data, cfg = runtime_and_data
    names, start = get_state(runtime.model)
    assert not session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1).refused
    runtime.load_state(names, start)
    session = _ledger(tmp_path).sessions[0]
    assert (session.history_len, session.max_length) == (cfg["history-len"], cfg["max-length"])


def test_a_policy_bounds_the_history_and_token_limit_from_the_node_config():
    policy = DevicePolicy.from_node_config({"privacy-max-history-len": 20, "privacy-max-length": 64})
    assert (policy.max_history_len, policy.max_length) == (20, 64)
    for bad in ({"privacy-max-history-len": 2.5}, {"privacy-max-length": 0}, {"privacy-max-history-len": True}):
        with pytest.raises(ConfigError):
            DevicePolicy.from_node_config(bad)


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


def test_a_sessions_tensors_have_the_same_shape_whatever_the_device_holds(ml100k, small_ml100k, tmp_path,
                                                                          monkeypatch):
    """Devices with 0, 1, 10 and cap+10 events, short and long titles: every tensor that enters the
    encoder, in the same order, has the same shape (the server sees when a reply arrives)."""
    import client.app as client_app
    from client.export import export_user
    from common.encoder import TextEncoder
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    cap = 6
    run_config = {"dataset": str(small_ml100k), "user-model": "text", "examples-per-user": cap, "batch-size": cap,
                  "history-len": 3, "max-length": 32, "noise-multiplier": 1.5}
    runtime = ModelRuntime(ml100k, ModelSettings.from_run_config(resolve(run_config)))
    names, arrays = get_state(runtime.model)
    export_user(ml100k, "1", tmp_path / "user1")
    events = (tmp_path / "user1" / "events.jsonl").read_text().splitlines()
    by_length = sorted(events, key=lambda e: len(ml100k.items[ml100k.item_index[json.loads(e)["item"]]].title))
    devices = {"none": [], "one-short": by_length[:1], "ten-long": by_length[-10:], "cap+10": events[:cap + 10]}
    seen: dict[str, list] = {}
    calls: list = []
    for method in ("frozen_features", "forward_features"):
        real = getattr(TextEncoder, method)

        def spy(self, *tensors, _real=real, _name=method):
            calls.append((_name, [tuple(t.shape) for t in tensors]))
            return _real(self, *tensors)

        monkeypatch.setattr(TextEncoder, method, spy)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    for warm_up_then_name in ["warm-up", *devices]:
        lines = devices.get(warm_up_then_name, [])
        folder = tmp_path / warm_up_then_name
        folder.mkdir(exist_ok=True)
        (folder / "catalogue.jsonl").write_bytes((tmp_path / "user1" / "catalogue.jsonl").read_bytes())
        (folder / "events.jsonl").write_text("".join(line + "\n" for line in lines))
        msg = Message(RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in zip(names, arrays)}),
                                  "config": ConfigRecord({"server-round": 1, "run-id": warm_up_then_name,
                                                          "run-dir": str(tmp_path)})}),
                      dst_node_id=5, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=run_config,
                      node_config={"data-path": str(folder), "state-dir": str(tmp_path / f"state-{warm_up_then_name}"),
                                   "privacy-epsilon-budget": 60.0})
        calls.clear()
        reply = client_app.train(msg, ctx)
        assert "arrays" in reply.content.array_records, warm_up_then_name
        seen[warm_up_then_name] = list(calls)
    del seen["warm-up"]  # the first session also encodes the catalogue once for the process
    shapes = list(seen.values())
    assert shapes[0] and all(s == shapes[0] for s in shapes), seen
    session = [ts for _, ts in shapes[0] if ts[0][0] == cap]  # the session's rows (the rest is the catalogue)
    assert session and all(shape[1] == 32 for ts in session for shape in ts)  # every text at full max-length


def _clipped_sum(runtime, texts: list[str], targets: list[int], clip: float) -> list:
    """Sum over examples of each example's own gradient clipped to ``clip`` (Opacus' flat clipping), no noise."""
    import torch

    params = [p for p in runtime.model.parameters() if p.requires_grad]
    feats = runtime.features(texts, fixed=True)
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(texts)):
        x, m = feats.batch(torch.tensor([i]))
        loss = torch.nn.functional.cross_entropy(runtime.model(x, m), torch.tensor([targets[i]]))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return total


def test_a_removal_that_shifts_the_window_stays_within_the_accounted_sensitivity(runtime_and_data, tmp_path):
    """A device above the cap, and the same device without its newest example: the window takes the next
    older example in, so the session's noiseless clipped sum moves by more than one clip norm (a removal
    and an addition). The ledger must account at least that."""
    import torch

    from common.examples import user_examples

    _, _, cfg = runtime_and_data
    cap = 3
    cfg = dict(cfg, **{"examples-per-user": cap, "batch-size": cap, "client-epsilon-budget": 100.0})
    split = split_for(cfg["dataset"])
    # a fresh model from a fixed seed: the shared one has taken noisy steps in other tests, and the
    # size of the move below must not depend on them
    runtime = ModelRuntime(split.data, ModelSettings.from_run_config(cfg), seed=0)
    texts, targets = user_examples(split, 0, cfg["history-len"], 0)
    assert len(targets) > cap  # the device holds more than the cap
    window = (texts[-cap:], targets[-cap:])
    without_newest = (texts[:-1][-cap:], targets[:-1][-cap:])  # the neighbouring dataset's window
    clip = cfg["max-grad-norm"]
    a = _clipped_sum(runtime, *window, clip)
    b = _clipped_sum(runtime, *without_newest, clip)
    moved = float(torch.sqrt(sum(((x - y).double() ** 2).sum() for x, y in zip(a, b))))
    data = client_data(split, 0, cfg["history-len"], cap)
    session_mod.run_session(runtime, data, cfg, tmp_path, "user-0", "run", 1, policy=DevicePolicy(epsilon_budget=100.0))
    assert moved > 1.05 * clip  # more than one example's worth: the add/remove accounting of before was wrong
    assert _ledger(tmp_path, 100.0).sessions[0].sensitivity == 2.0  # what the ledger accounts: 2C
