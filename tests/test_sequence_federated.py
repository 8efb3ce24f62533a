"""The sequence model (the default user model) through the product's federated path: the exchanged
state, client sessions and their shape, the server's round loop, the device's stored state and
on-device recommendations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from client import session as session_mod
from client.export import export_user
from common.device_policy import DevicePolicy
from common.ledger import PrivacyLedger, ledger_paths
from common.evaluation import evaluate_scores
from common.partition import split_for
from common.run_config import resolve
from common.runtimes import make_runtime
from common.sequence import SequenceRecommender, evaluation_rows
from common.sequence_runtime import SequenceRuntime, client_sequences, padded_sequence_rows, set_sequence_state
from server.federation import Federation
from simulations.inprocess_grid import InProcessGrid

TINY = {"examples-per-user": 4, "batch-size": 2, "history-len": 3, "noise-multiplier": 2.0, "sequence-dim": 8}


@pytest.fixture
def tiny_runtime(tiny_grouplens):
    cfg = resolve({"dataset": str(tiny_grouplens), **TINY})
    split = split_for(cfg["dataset"])
    return make_runtime(split.data, cfg), split, cfg


def test_the_default_user_model_is_the_sequence_model_and_its_upload_is_small(ml100k):
    """Upload per client-round at most 0.5% of the encoder's bytes, at the published defaults."""
    from common.encoder import TextEncoder

    cfg = resolve({})
    runtime = make_runtime(ml100k, cfg)
    assert isinstance(runtime, SequenceRuntime) and runtime.settings.history_len == 50
    names, arrays = runtime.state()
    encoder_bytes = sum(p.numel() * p.element_size() for p in TextEncoder().parameters())
    upload = sum(a.nbytes for a in arrays)
    assert upload <= 0.005 * encoder_bytes, (upload, encoder_bytes)
    assert "item_bias" in names and names == sorted(names, key=lambda n: n.replace("item_bias", "item_bias.bias"))


def test_state_loading_refuses_wrong_names_shapes_and_values(tiny_runtime):
    runtime, _, _ = tiny_runtime
    names, arrays = runtime.state()
    before = [a.copy() for a in runtime.state()[1]]
    bad_shape = [a.copy() for a in arrays]
    bad_shape[-1] = np.zeros(bad_shape[-1].size + 1, dtype=np.float32)
    bad_value = [a.copy() for a in arrays]
    bad_value[0] = np.full_like(bad_value[0], np.nan)
    for bad_names, bad_arrays, match in ((names[::-1], arrays[::-1], "keys differ"), (names, bad_shape, "shape"),
                                         (names, bad_value, "non-finite")):
        with pytest.raises(ValueError, match=match):
            runtime.load_state(bad_names, bad_arrays)
    assert all(np.array_equal(a, b) for a, b in zip(before, runtime.state()[1]))  # nothing was loaded


def test_a_session_spends_before_it_trains_and_replies_only_the_exchanged_tensors(tiny_runtime, tmp_path):
    runtime, split, cfg = tiny_runtime
    names, start = runtime.state()
    result = session_mod.run_session(runtime, client_sequences(split, 0, 3, 4), cfg, tmp_path, "user-0", "run", 1)
    assert not result.refused and result.names == names
    assert [a.shape for a in result.arrays] == [a.shape for a in start]
    assert all(not np.array_equal(a, b) for a, b in zip(result.arrays, start))  # noise moved every tensor
    ledger = PrivacyLedger.load(ledger_paths(tmp_path, "user-0")[0], "user-0", 8.0)
    (session,) = ledger.sessions
    assert session.kind == "dp-sgd" and session.history_len == 3 and session.sensitivity == 2.0
    assert result.metrics["epsilon"] == pytest.approx(ledger.epsilon)


def _forward_calls_per_device(runtime, split, cfg, tmp_path, monkeypatch, record) -> dict[str, list]:
    """Run one session each for devices holding none, two and all of user 0's rows (same start state);
    ``record(items, ratings, id_mask)`` is called at every forward pass; its values per device."""
    names, start = runtime.state()
    calls: list = []
    real = SequenceRecommender.forward

    def spy(self, items, ratings, id_mask=None):
        calls.append(record(items, ratings, id_mask))
        return real(self, items, ratings, id_mask)

    monkeypatch.setattr(SequenceRecommender, "forward", spy)
    full = client_sequences(split, 0, 3, 0)
    assert len(full.train) > 4
    seen = {}
    for name, keep in (("none", 0), ("two", 2), ("all", len(full.train))):
        data = client_sequences(split, 0, 3, 0)
        data.train = type(full.train)(*(getattr(full.train, f)[len(full.train) - keep:]
                                        for f in ("items", "ratings", "targets", "users")))
        runtime.load_state(names, start)
        calls.clear()
        # the schedule draws Poisson batches from the OS; under a rate of 1 every batch holds every row
        result = session_mod.run_session(runtime, data, cfg, tmp_path / name, "u", "r", 1,
                                         policy=DevicePolicy(epsilon_budget=1000.0))
        assert not result.refused
        seen[name] = list(calls)
    return seen


def test_a_sessions_model_inputs_have_the_same_shape_whatever_the_device_holds(tiny_runtime, tmp_path, monkeypatch):
    """0 rows, fewer than the cap, and more: the model sees the same batches of the same shape, and the
    same number of steps is taken (what the server can time does not depend on the data)."""
    runtime, split, cfg = tiny_runtime
    cfg = dict(cfg, **{"client-epsilon-budget": 1000.0, "batch-size": 4})
    seen = _forward_calls_per_device(runtime, split, cfg, tmp_path, monkeypatch,
                                     lambda items, ratings, _: (tuple(items.shape), tuple(ratings.shape)))
    assert seen["none"] == seen["two"] == seen["all"] == [((4, 3), (4, 3))]


def test_id_dropout_masks_under_dp_are_secret_and_shaped_by_the_public_batch(tiny_grouplens, tmp_path, monkeypatch):
    """Under local DP the rows' item-bias masks come from the device's secure stream: the same shape and
    number whatever the device holds, and never the pattern a seed known to the server would give (with
    seeded, position-tied masks a removal that shifts the rows would change every shifted row's gradient
    and break the accounted 2C)."""
    cfg = resolve({"dataset": str(tiny_grouplens), **TINY, "sequence-id-dropout": 0.5, "batch-size": 4,
                   "client-epsilon-budget": 1000.0})
    split = split_for(cfg["dataset"])
    runtime = make_runtime(split.data, cfg)
    assert runtime.model.settings.id_dropout == 0.5
    seen = _forward_calls_per_device(runtime, split, cfg, tmp_path, monkeypatch,
                                     lambda items, ratings, id_mask: id_mask.clone())
    masks = [seen[name][0] for name in ("none", "two", "all")]
    assert all(len(seen[name]) == 1 for name in seen)
    assert all(m.shape == (4, split.data.num_items) for m in masks)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    # 48 independent fair draws per mask: two masks are equal with probability 2**-48 (below 1e-14)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    seeded = (torch.rand(4, split.data.num_items, generator=torch.Generator().manual_seed(cfg["seed"])) >= 0.5).float()
    assert not any(torch.equal(m, seeded) for m in masks)


def test_padding_rows_are_public_and_weightless(tiny_runtime):
    runtime, split, _ = tiny_runtime
    rows = client_sequences(split, 0, 3, 2).train
    padded, weights = padded_sequence_rows(rows, 5, split.data.num_items)
    assert len(padded) == 5 and weights.tolist() == [1, 1, 0, 0, 0]
    assert (padded.items[2:] == split.data.num_items).all() and (padded.ratings[2:] == 0).all()
    assert (padded.targets[2:] == 0).all() and (padded.users[2:] == 0).all()  # nothing of the user's


def test_a_removal_that_shifts_the_window_is_accounted_at_2c(tiny_runtime, tmp_path):
    """Neighbouring devices: above the cap, and the same without the newest example. Their noiseless
    clipped sums differ by more than one clip norm; the ledger accounts 2C."""
    _, split, cfg = tiny_runtime
    cap = 3
    cfg = dict(cfg, **{"examples-per-user": cap, "batch-size": cap, "client-epsilon-budget": 100.0})
    runtime = make_runtime(split.data, cfg, seed=0)
    torch.nn.init.normal_(runtime.model.text_out.weight, std=0.5)  # a model whose gradients are not all tiny
    rows = client_sequences(split, 0, cfg["history-len"], 0).train
    assert len(rows) > cap
    clip = cfg["max-grad-norm"]
    params = runtime.parameters

    def clipped_sum(sl: slice) -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for i in range(*sl.indices(len(rows))):
            logits = runtime.model(torch.from_numpy(rows.items[i:i + 1]), torch.from_numpy(rows.ratings[i:i + 1]))
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(rows.targets[i:i + 1]))
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            total = [t + min(1.0, clip / (float(norm) + 1e-6)) * g for t, g in zip(total, grads)]
        return total

    a = clipped_sum(slice(len(rows) - cap, len(rows)))
    b = clipped_sum(slice(len(rows) - 1 - cap, len(rows) - 1))
    moved = float(torch.sqrt(sum(((x - y).double() ** 2).sum() for x, y in zip(a, b))))
    session_mod.run_session(runtime, client_sequences(split, 0, cfg["history-len"], cap), cfg, tmp_path, "user-0",
                            "run", 1, policy=DevicePolicy(epsilon_budget=100.0))
    assert clip * 1.05 < moved <= 2 * clip + 1e-5
    assert PrivacyLedger.load(ledger_paths(tmp_path, "user-0")[0], "user-0", 100.0).sessions[0].sensitivity == 2.0


def test_a_federated_run_of_the_sequence_model_trains_evaluates_and_accounts(tiny_grouplens, tmp_path):
    cfg = {"dataset": str(tiny_grouplens), **TINY, "num-server-rounds": 2, "clients-per-round": 3,
           "evaluate-clients": 2, "eval-every": 1, "output-dir": str(tmp_path / "runs"), "run-name": "s",
           "client-epsilon-budget": 8.0, "eval-noise-multiplier": 40.0}
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    folder = fed.run()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_accepted"] for r in rows[1:]] == [3, 3]
    assert any(not np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    result = json.loads((folder / "result.json").read_text())
    assert result["config"]["user-model"] == "sequence" and result["privacy"]["unit"] == "example"
    for reply in grid.replies:  # nothing but the exchanged tensors and the wire's fields
        if "arrays" in reply.content.array_records:
            assert list(reply.content["arrays"].keys()) == fed.names
    assert rows[-1]["federated_clients"] == 2  # the evaluation releases arrived and were counted
    # Round 0 records the training-free references the quality plot draws, computed on the same users.
    users = fed.evaluator.users
    split = fed.evaluator.split
    assert rows[0]["ref_popularity_NDCG@10"] == pytest.approx(
        evaluate_scores(np.tile(split.train_item_counts().astype(float), (len(users), 1)), split, "test",
                        users)["NDCG@10"])
    text = fed.runtime.item_vectors.astype(np.float64)
    rows50 = evaluation_rows(split, "test", 50, users)
    user = np.zeros((len(users), text.shape[1]))
    for k in range(len(users)):  # the heuristic's user, written out one history item at a time
        for age, (item, code) in enumerate(zip(rows50.items[k][::-1], rows50.ratings[k][::-1])):
            if item < split.data.num_items:
                user[k] += ((code if code > 0 else 2.5) - 2.5) * 0.8 ** age * text[item]
    user /= np.maximum(np.linalg.norm(user, axis=1, keepdims=True), 1e-12)
    for key, weight in (("ref_heuristic_NDCG@10", 0.2), ("ref_text_prior_NDCG@10", 0.0)):
        scores = user @ text.T + weight * np.log1p(split.train_item_counts())[None, :]
        assert rows[0][key] == pytest.approx(evaluate_scores(scores, split, "test", users)["NDCG@10"], abs=1e-9)
    assert all(not any(k.startswith("ref_") for k in r) for r in rows[1:])


def _device_message(names, arrays, catalogue: tuple[bytes, str] | None = None) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = {"server-round": 1, "run-id": "t", "run-dir": "/nonexistent"}
    content = {"arrays": ArrayRecord({n: Array(a) for n, a in zip(names, arrays)})}
    if catalogue is not None:
        content["catalogue"] = ConfigRecord({"file": catalogue[0]})
        config["catalogue-sha256"] = catalogue[1]
    content["config"] = ConfigRecord(config)
    return Message(content=RecordDict(content), dst_node_id=5, message_type=MessageType.TRAIN)


def _device_after_one_session(ml100k, small_ml100k, tmp_path):
    """(reply, exchanged names) of a device holding MovieLens user 1 after one session with the published
    catalogue; its state folder is ``tmp_path / "state"``."""
    from server.catalogue import CataloguePublisher

    cfg = {"dataset": str(small_ml100k), "output-dir": str(tmp_path / "runs"), "run-name": "d"}
    fed = Federation(InProcessGrid(1, cfg), cfg)
    catalogue = CataloguePublisher(fed.runtime, tmp_path / "pub", "t").publish(fed.names, fed.arrays, 1)
    data = tmp_path / "data"
    export_user(ml100k, "1", data)
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                  node_config={"data-path": str(data), "state-dir": str(tmp_path / "state")})
    return client_app.train(_device_message(fed.names, fed.arrays, catalogue), ctx), fed.names


def test_a_device_trains_keeps_the_state_and_recommends_on_its_own(ml100k, small_ml100k, tmp_path):
    """A device with the published catalogue: its session, the kept global state (marked as the sequence
    model), and top-k recommendations computed on the device, unseen items only, with free text."""
    from client.recommend import DeviceRecommender

    reply, names = _device_after_one_session(ml100k, small_ml100k, tmp_path)
    assert "status" not in reply.content.config_records and list(reply.content["arrays"].keys()) == names
    recommender = DeviceRecommender(tmp_path / "state")
    assert recommender.sequence is not None
    seen = {ml100k.items[i].item_id for i in ml100k.item[ml100k.user == ml100k.user_ids.index("1")]}
    top = recommender.recommend(k=10)
    assert len(top) == 10 and not {r.item_id for r in top} & seen
    assert [r.rank for r in top] == list(range(1, 11)) and all(np.isfinite(r.score) for r in top)
    steered = recommender.recommend(k=10, text="a science fiction film about space travel")
    assert len(steered) == 10 and not {r.item_id for r in steered} & seen


def test_a_device_ranks_with_its_personal_offset_and_keeps_it_to_itself(ml100k, small_ml100k, tmp_path):
    """The default device recommender adds the offset fitted on its own events to the global scores;
    ``personal=None`` is the global model; ranking writes nothing to the device's state folder."""
    from client.recommend import DEVICE_ROWS_PER_PASS, DeviceRecommender
    from common.personalisation import PersonalSettings, fit_offsets, personal_rows

    _device_after_one_session(ml100k, small_ml100k, tmp_path)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "state").rglob("*")}
    personal, plain = DeviceRecommender(tmp_path / "state"), DeviceRecommender(tmp_path / "state", personal=None)
    everything = {r.item_id: r.score for r in plain.recommend(k=ml100k.num_items)}
    top = personal.recommend(k=10)
    split = plain._split
    rows = split.all_rows(0)
    fitted = personal_rows(split, rows, plain.settings.history_len, PersonalSettings().rows)
    # the device's own computation, pass for pass (the same rows per pass, so the same rounding)
    offset = fit_offsets(plain.sequence, fitted, np.zeros(len(fitted), dtype=np.int64), 1, PersonalSettings(),
                         chunk=DEVICE_ROWS_PER_PASS)[0]
    assert len(fitted) == min(len(rows) - 1, PersonalSettings().rows) and offset.abs().sum() > 0
    index = {item.item_id: k for k, item in enumerate(ml100k.items)}
    text = plain.sequence.item_text[: plain.sequence.num_items]
    terms = [float(offset @ text[index[r.item_id]]) for r in top]
    assert max(abs(t) for t in terms) > 1e-2  # the personal term is far above the tolerance below
    for r, term in zip(top, terms):
        assert r.score == pytest.approx(everything[r.item_id] + term, abs=1e-4)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "state").rglob("*")} == files


def test_the_stored_sequence_state_must_match_the_model(tiny_runtime):
    runtime, split, _ = tiny_runtime
    names, arrays = runtime.state()
    other = SequenceRecommender(torch.as_tensor(runtime.item_vectors), runtime.settings)
    set_sequence_state(other, names, arrays)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), runtime.model.parameters()))


def test_a_device_never_lets_a_run_lengthen_the_unit_its_ledger_recorded_unless_its_owner_says(tiny_runtime,
                                                                                               tmp_path):
    """A device whose ledger holds 3-item sessions refuses a 5-item run under the default policy (an
    upgrade that raised the default changes nothing for it); its owner can raise the limit explicitly."""
    runtime, split, cfg = tiny_runtime
    cfg = dict(cfg, **{"client-epsilon-budget": 100.0})
    roomy = DevicePolicy.from_node_config({"privacy-epsilon-budget": 100.0})
    names, start = runtime.state()
    first = session_mod.run_session(runtime, client_sequences(split, 0, 3, 4), cfg, tmp_path, "u", "r", 1,
                                    policy=roomy)
    assert not first.refused
    longer = make_runtime(split.data, dict(cfg, **{"history-len": 5}))
    asked = dict(cfg, **{"history-len": 5})
    refused = session_mod.run_session(longer, client_sequences(split, 0, 5, 4), asked, tmp_path, "u", "r", 2,
                                      policy=roomy)
    assert refused.refused and refused.reason == "privacy-policy"
    assert len(PrivacyLedger.load(ledger_paths(tmp_path, "u")[0], "u", 100.0).sessions) == 1  # nothing recorded
    owner = DevicePolicy.from_node_config({"privacy-epsilon-budget": 100.0, "privacy-max-history-len": 5})
    allowed = session_mod.run_session(longer, client_sequences(split, 0, 5, 4), asked, tmp_path, "u", "r", 3,
                                      policy=owner)
    assert not allowed.refused
    assert DevicePolicy().lengthens_unit({"history-len": 50}, [None])  # a ledger from before v4: unit of 5


def test_published_item_vectors_are_checked_before_the_model_uses_them(tiny_runtime):
    runtime, split, cfg = tiny_runtime
    good = runtime.item_vectors
    for bad in (good[:, :7], np.full_like(good, np.nan), 2 * good, good[:-1]):
        with pytest.raises(ValueError, match="item vectors"):
            make_runtime(split.data, cfg, item_text=bad)
        with pytest.raises(ValueError, match="item vectors"):
            runtime.use_item_embeddings(bad)
    assert np.array_equal(runtime.item_vectors, good)  # the refused ones were never taken


def test_cold_start_holdout_items_are_scored_by_text_alone_and_held_by_no_client(ml100k):
    """PROTOCOL section 4 in the product: the published items join after training; no client's rows
    mention them and their scores ignore the trained item bias."""
    from common.partition import run_split
    from common.split import cold_start_items

    cfg = resolve({"cold-start-holdout": True, "sequence-new-item-boost": 0.0})  # text terms alone
    held = cold_start_items(ml100k.num_items)
    split = run_split(cfg)
    assert not np.isin(split.data.item[np.concatenate(split.train)], held).any()
    runtime = make_runtime(ml100k, cfg)
    rows = client_sequences(split, 0, 50, 0).eval_row
    before = runtime.model.score(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))[0]
    with torch.no_grad():
        runtime.model.item_bias.bias.normal_(std=5.0)
    after = runtime.model.score(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))[0]
    assert torch.equal(before[held], after[held])  # text terms only
    assert not torch.equal(before, after)
    logits = runtime.model(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))[0]
    rest = torch.ones(ml100k.num_items, dtype=torch.bool)
    rest[torch.from_numpy(held)] = False
    assert torch.isinf(logits[held]).all() and torch.isfinite(logits[rest]).all()  # out of the softmax
    # the run config's new-item boost lifts exactly the held-out items, by exactly itself
    boosted = make_runtime(ml100k, resolve({"cold-start-holdout": True, "sequence-new-item-boost": 0.3}))
    boosted.load_state(*runtime.state())
    lifted = boosted.model.score(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))[0]
    assert torch.equal(lifted[rest], after[rest])
    assert torch.allclose(lifted[held] - after[held], torch.full((len(held),), 0.3), atol=1e-6)
    # and does nothing where every item is trained on (a run without the hold-out, every device)
    plain_split = run_split(resolve({}))
    plain_rows = client_sequences(plain_split, 0, 50, 0).eval_row
    scores = {}
    for boost in (0.0, 0.3):
        rt = make_runtime(ml100k, resolve({"sequence-new-item-boost": boost}))
        rt.load_state(*runtime.state())
        scores[boost] = rt.model.score(torch.from_numpy(plain_rows.items), torch.from_numpy(plain_rows.ratings))[0]
    assert torch.equal(scores[0.0], scores[0.3])
